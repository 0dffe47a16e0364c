"""Pixel data codecs run in worker processes, never in the server (threat model SR-13).

Decoding a stored codestream (JPEG, JPEG-LS, JPEG 2000, RLE; PS3.5 Annex A.4) runs native
code on bytes that came from a peer. A codec that crashes (SIGSEGV), loops or allocates
without bound must cost one request, not the server. Every server process (DIMSE worker,
HTTP worker) therefore holds a :class:`DecodePool`: up to ``decode_workers`` decoder
processes, started when first needed and reused while they stay healthy. Each one:

* is a fresh interpreter (``python -m stockade.dicom.sandbox``, started with
  :class:`subprocess.Popen`, never a fork of the threaded server) that imports the codecs
  and then caps its own address space with ``RLIMIT_AS`` at what it uses at rest plus
  ``decode_memory_limit``; an allocation past it fails (``MemoryError``) and the worker
  retires after answering;
* runs one job at a time under a deadline of ``decode_timeout`` seconds kept by the server
  (and an ``RLIMIT_CPU`` backstop set before each job); a worker past its deadline is
  killed, one that dies (a signal, an abort) is reaped, and either is replaced by a new one
  at the next job;
* talks over a Unix socket pair in explicit frames: a 12-byte head (header length, payload
  length, big endian), a JSON header of plain values (job name and parameters, or the
  outcome) and raw bytes. Nothing is pickled (threat model SR-15).

The jobs are ``transcode`` (:func:`stockade.dicom.transcode.transcode`: a stored Part 10
file to a data set in another transfer syntax, decoding and encoding pixel data) and
``render`` (:func:`stockade.web.render.render_part10`: one frame as JPEG, PNG or GIF). The
server checks what it can from the header before a job is sent (the decoded size against
``max_decoded_size``, Rows x Columns x Samples per Pixel x Bits Allocated x Number of
Frames; the codestream headers against the DICOM header), so that an oversized object never
reaches a codec; the worker checks again. Conversions that involve no codec (between the
uncompressed transfer syntaxes, PS3.5 A.1-A.3, A.5) run in the server.

A job that fails in the worker comes back as the error it raised (``CannotTranscode``,
``NotFound``, ``InvalidQuery``); a crash, a timeout or exhausted memory as
:class:`~stockade.errors.DecodeFailure` (HTTP 500, a failed sub-operation in DIMSE).

``decode_in_process`` runs the same functions in the server itself (:class:`InProcess`):
for debugging only, without any of this protection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from stockade.dicom import transcode as tc
from stockade.errors import CannotTranscode, DecodeFailure, InvalidQuery, NotFound, StockadeError

if TYPE_CHECKING:
    from stockade.settings import Settings
    from stockade.web.render import RenderOptions

log = logging.getLogger(__name__)

__all__ = [
    "TEST_FAULTS_ENV",
    "DecodePool",
    "Decoder",
    "InProcess",
    "default_memory_limit",
    "open_decoder",
]

MiB = 1024 * 1024
#: Frame head: JSON header length (4 bytes), payload length (8 bytes), big endian.
_HEAD = struct.Struct(">IQ")
#: Largest JSON header accepted from either side.
MAX_HEADER = 64 * 1024
#: Seconds a new worker has to import its codecs and say it is ready.
START_TIMEOUT = 60.0
#: Largest rendered image accepted from a worker (4096 x 4096 RGBA, uncompressed, and more).
_MAX_RENDERED = 80 * MiB
#: Environment variable that, set to ``1``, gives the workers test-only faults (see
#: :func:`_test_fault`). Tests use it; it is never set in production.
TEST_FAULTS_ENV = "STOCKADE_TEST_DECODE_FAULTS"
_FAULT_MARK = b"STOCKADE-TEST-FAULT:"
#: Exit status of a worker that could not allocate a job's payload (ENOMEM).
_EXIT_NO_MEMORY = 12
_FAULTS = ("segv", "spin", "hog", "exit")

#: Errors a worker may report by code, and the class the server raises for each.
_ERRORS: dict[str, type[StockadeError]] = {
    CannotTranscode.code: CannotTranscode,
    NotFound.code: NotFound,
    InvalidQuery.code: InvalidQuery,
    DecodeFailure.code: DecodeFailure,
}

Wire = dict[str, Any]


def default_memory_limit(max_decoded_size: int) -> int:
    """``decode_memory_limit`` when it is left at 0: four times the largest decoded pixel
    data and 1 GiB.

    Measured: a transcode to native pixel data peaks at about four times the decoded size
    beyond the worker's rest (the stored object, the codec's array, its bytes, the encoded
    data set); rendering adds the floating-point arrays of one frame (at most
    :data:`stockade.web.render.MAX_RENDER_PIXELS` pixels, about 1 GiB for the largest).
    """
    return 4 * max_decoded_size + 1024 * MiB


class Decoder(Protocol):
    """Where stored pixel data is decoded and encoded: a :class:`DecodePool` or
    :class:`InProcess`."""

    def transcode(
        self, part10: bytes | bytearray | memoryview, target_ts: str, *, max_pixel_bytes: int
    ) -> bytes | memoryview:
        """The data set of *part10* in *target_ts* (see
        :func:`stockade.dicom.transcode.transcode`)."""

    def render(self, part10: bytes, options: RenderOptions, *, max_pixel_bytes: int) -> bytes:
        """One frame of *part10* rendered (see :func:`stockade.web.render.render_part10`)."""

    def close(self) -> None:
        """Stop the workers, if any."""


def open_decoder(settings: Settings) -> Decoder:
    """The decoder the settings ask for: a pool of workers unless ``decode_in_process``.

    No process starts here; the pool starts its workers when a job first needs one.
    """
    if settings.decode_in_process:
        return InProcess()
    return DecodePool(
        workers=settings.decode_workers,
        timeout=settings.decode_timeout,
        memory_limit=settings.decode_memory_limit
        or default_memory_limit(settings.max_decoded_size),
        test_faults=os.environ.get(TEST_FAULTS_ENV) == "1",
    )


class InProcess:
    """Codecs in the server process itself (``decode_in_process``): no isolation."""

    def transcode(
        self, part10: bytes | bytearray | memoryview, target_ts: str, *, max_pixel_bytes: int
    ) -> bytes | memoryview:
        """See :func:`stockade.dicom.transcode.transcode`."""
        return tc.transcode(part10, target_ts, max_pixel_bytes=max_pixel_bytes)

    def render(self, part10: bytes, options: RenderOptions, *, max_pixel_bytes: int) -> bytes:
        """See :func:`stockade.web.render.render_part10`."""
        from stockade.web import render

        render.check_size(part10, max_pixel_bytes)
        return render.render_part10(part10, options, max_pixel_bytes=max_pixel_bytes)

    def close(self) -> None:
        """Nothing to stop."""


# -- frames on the socket --------------------------------------------------------------------


def _send(sock: socket.socket, header: Wire, payload: bytes | bytearray | memoryview) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_HEAD.pack(len(head), len(payload)) + head)
    if len(payload):
        sock.sendall(payload)


def _read_exact(sock: socket.socket, size: int, deadline: float | None) -> bytearray:
    """*size* bytes from *sock*; EOFError if it closes first, TimeoutError at *deadline*."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError
        got += n
    return buf


def _receive(
    sock: socket.socket, deadline: float | None, max_payload: int
) -> tuple[Wire, bytearray]:
    """One frame: its JSON header (an object) and its payload.

    Raises
    ------
    EOFError
        The other side closed the socket.
    TimeoutError
        *deadline* passed.
    ValueError
        A malformed frame: a header over :data:`MAX_HEADER` or not a JSON object, a payload
        over *max_payload*.
    """
    header_length, payload_length = _HEAD.unpack(_read_exact(sock, _HEAD.size, deadline))
    if header_length > MAX_HEADER:
        raise ValueError(f"a header of {header_length} bytes")
    if payload_length > max_payload:
        raise ValueError(f"a payload of {payload_length} bytes, over {max_payload}")
    header = json.loads(_read_exact(sock, header_length, deadline))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, _read_exact(sock, payload_length, deadline)


# -- render options as plain values ----------------------------------------------------------


def options_to_wire(options: RenderOptions) -> Wire:
    """*options* as JSON values (the ``render`` job's parameters)."""
    window = options.window
    viewport = options.viewport
    return {
        "media_type": options.media_type,
        "frame": options.frame,
        "quality": options.quality,
        "window": None if window is None else [window.center, window.width, window.function],
        "viewport": None
        if viewport is None
        else {
            "width": viewport.width,
            "height": viewport.height,
            "region": None if viewport.region is None else list(viewport.region),
            "relative": viewport.relative,
            "enlarge": viewport.enlarge,
        },
    }


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind | int):
        raise ValueError(f"{value!r} is not a {kind.__name__}")
    return kind(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(_number(value, int))


def options_from_wire(wire: Mapping[str, Any]) -> RenderOptions:
    """The :class:`~stockade.web.render.RenderOptions` of :func:`options_to_wire`.

    Raises
    ------
    ValueError
        A value of the wrong type.
    """
    from stockade.web.render import RenderOptions, Viewport, Window

    window = wire.get("window")
    viewport = wire.get("viewport")
    media_type = wire.get("media_type")
    if not isinstance(media_type, str):
        raise ValueError("media_type is not a string")
    return RenderOptions(
        media_type=media_type,
        frame=_number(wire.get("frame"), int),
        quality=_number(wire.get("quality"), int),
        window=None
        if window is None
        else Window(_number(window[0], float), _number(window[1], float), str(window[2])),
        viewport=None
        if viewport is None
        else Viewport(
            _optional_int(viewport["width"]),
            _optional_int(viewport["height"]),
            None
            if viewport["region"] is None
            else (
                _number(viewport["region"][0], float),
                _number(viewport["region"][1], float),
                _number(viewport["region"][2], float),
                _number(viewport["region"][3], float),
            ),
            relative=bool(viewport["relative"]),
            enlarge=bool(viewport["enlarge"]),
        ),
    )


# -- the server side ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    """One decoder process and the server's end of its socket."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    jobs: int = 0


class DecodePool:
    """Decoder worker processes of one server process (see the module docstring).

    Thread-safe: each call takes a free worker (starting one when fewer than *workers*
    run), or waits for one.

    Parameters
    ----------
    workers : int
        Most decoder processes at once.
    timeout : float
        Seconds one job may take (sending, decoding, answering) before its worker is killed.
    memory_limit : int
        Bytes of address space a worker may add to what it uses at rest (``RLIMIT_AS``).
    test_faults : bool
        Give the workers the test-only faults of :func:`_test_fault`. Tests only.
    """

    def __init__(
        self, *, workers: int, timeout: float, memory_limit: int, test_faults: bool = False
    ) -> None:
        self.workers = workers
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.test_faults = test_faults
        self._slots = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._closed = False
        #: Workers started, and workers ended (crashed, killed or retired): for tests.
        self.started = 0
        self.discarded = 0

    # -- jobs

    def transcode(
        self, part10: bytes | bytearray | memoryview, target_ts: str, *, max_pixel_bytes: int
    ) -> bytes | memoryview:
        """The data set of *part10* in *target_ts*; a codec runs in a worker.

        See :func:`stockade.dicom.transcode.transcode`, which makes every check that needs
        no codec here, and does here the conversions without one (the stored transfer
        syntax, or between uncompressed ones); the rest is a ``transcode`` job.

        Raises
        ------
        CannotTranscode
            As :func:`~stockade.dicom.transcode.transcode`.
        DecodeFailure
            The worker crashed, ran out of time or memory.
        """
        return tc.transcode(
            part10, target_ts, max_pixel_bytes=max_pixel_bytes, delegate=self._transcode_job
        )

    def _transcode_job(
        self, part10: bytes | bytearray | memoryview, target_ts: str, max_pixel_bytes: int
    ) -> memoryview:
        params = {"target": target_ts, "max_pixel_bytes": max_pixel_bytes}
        limit = max_pixel_bytes + len(part10) + 16 * MiB
        _, body = self.run("transcode", params, part10, max_result=limit)
        return memoryview(body)

    def render(self, part10: bytes, options: RenderOptions, *, max_pixel_bytes: int) -> bytes:
        """One frame of *part10* rendered in a worker (:func:`render.render_part10`).

        The decoded size is checked from the header first
        (:func:`stockade.web.render.check_size`).

        Raises
        ------
        CannotTranscode, NotFound, InvalidQuery
            As :func:`~stockade.web.render.render_part10`.
        DecodeFailure
            The worker crashed, ran out of time or memory.
        """
        from stockade.web import render

        render.check_size(part10, max_pixel_bytes)
        params = {"options": options_to_wire(options), "max_pixel_bytes": max_pixel_bytes}
        _, body = self.run("render", params, part10, max_result=_MAX_RENDERED)
        return bytes(body)

    def run(
        self,
        job: str,
        params: Mapping[str, Any],
        payload: bytes | bytearray | memoryview,
        *,
        max_result: int,
    ) -> tuple[Wire, bytearray]:
        """Run *job* in a worker: its result header and payload.

        Raises
        ------
        DecodeFailure
            The pool is closed, a worker could not start, or the job crashed, timed out, ran
            out of memory or answered with more than *max_result* bytes.
        StockadeError
            The error the job raised (see :data:`_ERRORS`).
        """
        with self._slots:
            worker = self._take()
            keep = False
            try:
                reply, body = self._exchange(worker, job, params, payload, max_result)
                keep = not reply.get("retire")
            finally:
                self._give_back(worker, keep=keep)
        if not reply.get("ok"):
            error = _ERRORS.get(str(reply.get("code")), DecodeFailure)
            raise error(str(reply.get("reason") or "the decoder failed"))
        return reply, body

    def _exchange(
        self,
        worker: _Worker,
        job: str,
        params: Mapping[str, Any],
        payload: bytes | bytearray | memoryview,
        max_result: int,
    ) -> tuple[Wire, bytearray]:
        deadline = time.monotonic() + self.timeout
        worker.jobs += 1
        try:
            worker.sock.settimeout(self.timeout)
            _send(worker.sock, {"job": job, "params": dict(params)}, payload)
            return _receive(worker.sock, deadline, max_result)
        except TimeoutError:
            raise DecodeFailure(
                f"decoding took longer than {self.timeout:g} s (decode_timeout) and was stopped"
            ) from None
        except (EOFError, OSError) as exc:
            raise DecodeFailure(f"the decoder process {self._ending(worker)}") from exc
        except ValueError as exc:
            raise DecodeFailure(f"the decoder process sent a malformed answer: {exc}") from exc

    @staticmethod
    def _ending(worker: _Worker) -> str:
        """How a worker whose socket closed ended (it is gone or going)."""
        try:
            code = worker.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code == _EXIT_NO_MEMORY:
            return "could not take the stored object within decode_memory_limit"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"crashed ({name})"
        return f"ended unexpectedly (exit status {code})"

    def _take(self) -> _Worker:
        """An idle live worker, or a new one (the caller holds a slot)."""
        with self._lock:
            if self._closed:
                raise DecodeFailure("the decoder processes are shut down")
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                self._discard(worker)  # died while idle (killed from outside)
        worker = self._start()
        with self._lock:
            if self._closed:
                self._discard(worker)
                raise DecodeFailure("the decoder processes are shut down")
            self._all.add(worker)
            self.started += 1
        return worker

    def _give_back(self, worker: _Worker, *, keep: bool) -> None:
        with self._lock:
            if keep and not self._closed:
                self._idle.append(worker)
                return
            self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        """Kill and reap *worker* (called with the lock held)."""
        self._all.discard(worker)
        self.discarded += 1
        _stop(worker, grace=0.0)

    def _start(self) -> _Worker:
        """Start a decoder process and wait until it is ready.

        Raises
        ------
        DecodeFailure
            It could not be started, or did not become ready.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [
            sys.executable,
            "-m",
            "stockade.dicom.sandbox",
            "--fd",
            str(theirs.fileno()),
            "--memory",
            str(self.memory_limit),
            "--timeout",
            str(self.timeout),
        ]
        if self.test_faults:
            args.append("--test-faults")
        env = dict(os.environ)
        # One thread per worker: thread pools of the numeric libraries would each reserve
        # address space counted by RLIMIT_AS, and the pool is the parallelism.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = "1"
        try:
            proc = subprocess.Popen(
                args,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise DecodeFailure(f"a decoder process could not be started: {exc}") from exc
        finally:
            theirs.close()
        worker = _Worker(proc, ours)
        try:
            reply, _ = _receive(ours, time.monotonic() + START_TIMEOUT, 0)
            if not reply.get("ready"):
                raise ValueError("no ready message")
        except (EOFError, OSError, ValueError) as exc:
            _stop(worker, grace=0.0)
            raise DecodeFailure(
                f"a decoder process did not start: it {self._ending(worker)}"
            ) from exc
        log.debug("decoder process %d started", proc.pid)
        return worker

    # -- life cycle

    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        with self._lock:
            return [w.proc.pid for w in self._all]

    def close(self) -> None:
        """Stop every worker: idle ones end when their socket closes, busy ones are
        killed (their job fails with :class:`DecodeFailure`)."""
        with self._lock:
            self._closed = True
            idle = list(self._idle)
            busy = [w for w in self._all if w not in idle]
            self._idle.clear()
            self._all.clear()
        for worker in busy:
            _stop(worker, grace=0.0)
        for worker in idle:
            worker.sock.close()  # the worker reads EOF and exits
        for worker in idle:
            _stop(worker, grace=5.0)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _stop(worker: _Worker, *, grace: float) -> None:
    """End *worker*: wait *grace* seconds for it to exit, then kill it; reap it."""
    worker.sock.close()
    if grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(grace)
    if worker.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
        worker.proc.wait()


# -- the worker side -------------------------------------------------------------------------


def _address_space() -> int:
    """This process's address space in bytes (VmSize, /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status")  # pragma: no cover


def _warm_up() -> None:
    """Import what the jobs use, so that it is part of the address space at rest."""
    from PIL import GifImagePlugin, JpegImagePlugin, PngImagePlugin  # noqa: F401

    from stockade.web import render  # noqa: F401


def _cpu_deadline(timeout: float) -> None:
    """Let this job use at most *timeout* more seconds of CPU (SIGXCPU ends the process).

    The server's wall-clock deadline normally comes first; this one holds when the server
    is gone and nobody else would stop a runaway codec.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used + timeout) + 2
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _test_fault(fault: str, memory_limit: int) -> None:  # pragma: no cover - kills itself
    """TEST ONLY (``--test-faults``): behave like a broken codec.

    ``segv`` dies of SIGSEGV, ``exit`` exits, ``spin`` loops on the CPU forever, ``hog``
    allocates until ``RLIMIT_AS`` refuses (``MemoryError``).
    """
    if fault == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif fault == "exit":
        os._exit(3)
    elif fault == "spin":
        while True:
            pass
    elif fault == "hog":
        hoard = []
        while True:
            hoard.append(bytearray(max(memory_limit // 8, 1 << 20)))


def _job(
    job: str, params: Mapping[str, Any], payload: bytearray, memory_limit: int, faults: bool
) -> bytes | bytearray | memoryview:
    """Run one job; its result payload."""
    if faults:  # TEST ONLY: a fault named by the job, or marked inside the stored object
        fault = params.get("fault") if job == "fault" else None
        at = payload.find(_FAULT_MARK) if fault is None else -1
        if at >= 0:
            end = at + len(_FAULT_MARK)
            fault = next((f for f in _FAULTS if payload.startswith(f.encode(), end)), None)
        if fault is not None:
            _test_fault(str(fault), memory_limit)
            return b""
    if job == "transcode":
        limit = int(params["max_pixel_bytes"])
        return tc.transcode(payload, str(params["target"]), max_pixel_bytes=limit)
    if job == "render":
        from stockade.web import render

        limit = int(params["max_pixel_bytes"])
        options = options_from_wire(params["options"])
        return render.render_part10(bytes(payload), options, max_pixel_bytes=limit)
    raise DecodeFailure(f"unknown decoder job {job[:32]!r}")


def _serve(sock: socket.socket, timeout: float, memory_limit: int, faults: bool) -> None:
    """Answer jobs until the server closes the socket."""
    while True:
        try:
            header, payload = _receive(sock, None, 1 << 62)
        except EOFError:
            return
        except MemoryError:  # the stored object alone is over the limit
            os._exit(_EXIT_NO_MEMORY)
        _cpu_deadline(timeout)
        retire = False
        try:
            job = str(header.get("job"))
            params = header.get("params")
            if not isinstance(params, dict):
                raise DecodeFailure("a decoder job without parameters")
            result = _job(job, params, payload, memory_limit, faults)
            reply: Wire = {"ok": True}
        except StockadeError as exc:
            result, reply = b"", {"ok": False, "code": exc.code, "reason": exc.reason}
        except MemoryError:
            result, retire = b"", True
            reply = {
                "ok": False,
                "code": DecodeFailure.code,
                "reason": "decoding needed more memory than decode_memory_limit allows "
                f"({memory_limit} bytes) and was stopped",
            }
        except Exception as exc:  # noqa: BLE001 - a codec raised: told to the server
            result, retire = b"", True
            detail = " ".join(str(exc).split())[:500] or type(exc).__name__
            reply = {
                "ok": False,
                "code": DecodeFailure.code,
                "reason": f"decoding failed: {detail}",
            }
        del payload
        reply["retire"] = retire
        _send(sock, reply, result)
        if retire:
            return


def _worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stockade-decoder")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--memory", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--test-faults", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us by closing the socket
    sock = socket.socket(fileno=args.fd)
    _warm_up()
    cap = _address_space() + args.memory
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    _send(sock, {"ready": True, "pid": os.getpid()}, b"")
    try:
        _serve(sock, args.timeout, args.memory, args.test_faults)
    except (BrokenPipeError, ConnectionResetError):  # the server went away mid-answer
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
