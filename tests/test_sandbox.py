"""Decoder processes (threat model SR-13): codecs that crash, run away or hog memory cost one
job, never the caller; a normal job works right after; what the worker decodes equals what
pydicom decodes in this process.

Crashes and runaways come from the test-only faults of a pool started with
``test_faults=True`` (a worker that kills itself with SIGSEGV, spins, or allocates without
end); running out of memory also from a real decode under a small ``decode_memory_limit``.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import utils as pixel_utils
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from stockade.dicom import sandbox
from stockade.dicom.part10 import file_header
from stockade.dicom.sandbox import DecodePool, InProcess, open_decoder
from stockade.errors import CannotTranscode, DecodeFailure, NotFound
from stockade.settings import Settings
from stockade.web.render import PNG, RenderOptions, Viewport, Window
from tests.dicomfactory import make_dataset, part10

MiB = 1024 * 1024
LIMIT = 1 << 30  # max_decoded_size of the jobs


def _testdata(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path)).read_bytes()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _pixels(dataset_bytes: bytes | memoryview, ts: str) -> np.ndarray:
    """Pixel data of a transcoded data set, decoded by pydicom in this process."""
    meta = file_header("1.2.840.10008.5.1.4.1.1.7", "1.2.3", ts, None)
    return np.asarray(pydicom.dcmread(io.BytesIO(meta + bytes(dataset_bytes))).pixel_array)


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    with DecodePool(workers=1, timeout=20, memory_limit=512 * MiB, test_faults=True) as p:
        yield p
    assert not p.pids()


MR_J2K = "MR_small_jp2klossless.dcm"


def _decodes_normally(pool: DecodePool) -> None:
    data = _testdata(MR_J2K)
    out = pool.transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert np.array_equal(_pixels(out, ExplicitVRLittleEndian), expected)


# -- a crash, a runaway, a memory hog: one job fails, the next one works --------------------


def test_a_crashing_codec_fails_its_job_and_the_next_job_works(pool: DecodePool) -> None:
    _decodes_normally(pool)
    [first] = pool.pids()
    with pytest.raises(DecodeFailure, match=r"crashed \(SIGSEGV\)") as caught:
        pool.run("fault", {"fault": "segv"}, b"", max_result=0)
    assert caught.value.http_status == 500
    assert not _alive(first)
    assert pool.pids() == []
    _decodes_normally(pool)
    assert pool.started == 2
    assert pool.discarded == 1


def _marked(name: str, fault: str) -> bytes:
    """A test file with a fault mark in Image Comments (what the test-only faults look for)."""
    ds = pydicom.dcmread(io.BytesIO(_testdata(name)))
    ds.ImageComments = f"STOCKADE-TEST-FAULT:{fault}"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_a_crash_marked_inside_a_stored_object_fails_that_transcode(pool: DecodePool) -> None:
    # What the integration test stores: an object whose decode makes the (test) codec crash.
    with pytest.raises(DecodeFailure, match="SIGSEGV"):
        pool.transcode(_marked(MR_J2K, "segv"), ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
    with pytest.raises(DecodeFailure, match="SIGSEGV"):
        pool.render(_marked(MR_J2K, "segv"), RenderOptions(), max_pixel_bytes=LIMIT)
    _decodes_normally(pool)


def test_a_runaway_codec_is_killed_at_the_deadline() -> None:
    with DecodePool(workers=1, timeout=1.0, memory_limit=256 * MiB, test_faults=True) as pool:
        _decodes_normally(pool)
        [first] = pool.pids()
        started = time.monotonic()
        with pytest.raises(DecodeFailure, match=r"longer than 1 s \(decode_timeout\)"):
            pool.run("fault", {"fault": "spin"}, b"", max_result=0)
        assert time.monotonic() - started < 10  # the deadline, not the CPU backstop
        assert not _alive(first)
        _decodes_normally(pool)


def test_a_memory_hog_gets_a_clean_error(pool: DecodePool) -> None:
    with pytest.raises(DecodeFailure, match="more memory than decode_memory_limit"):
        pool.run("fault", {"fault": "hog"}, b"", max_result=0)
    _decodes_normally(pool)


def test_a_worker_that_exits_is_replaced(pool: DecodePool) -> None:
    with pytest.raises(DecodeFailure, match=r"exit status 3"):
        pool.run("fault", {"fault": "exit"}, b"", max_result=0)
    _decodes_normally(pool)


def _large_rle() -> bytes:
    """A 2048 x 2048 16-bit RLE image: 8 MiB decoded."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 4096, (2048, 2048), dtype=np.uint16)
    ds = make_dataset(Rows=2048, Columns=2048, PixelData=arr.tobytes())
    pixel_utils.compress(ds, RLELossless, arr, generate_instance_uid=False)
    return part10(ds, ts=RLELossless)


def test_a_real_decode_over_the_memory_limit_fails_cleanly() -> None:
    large = _large_rle()
    with DecodePool(workers=1, timeout=20, memory_limit=16 * MiB) as pool:
        with pytest.raises(DecodeFailure, match="memory"):
            pool.transcode(large, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
        _decodes_normally(pool)  # a small image fits
    # Not even the stored object fits: the worker ends before decoding anything.
    with (
        DecodePool(workers=1, timeout=20, memory_limit=2 * MiB) as pool,
        pytest.raises(DecodeFailure, match="within decode_memory_limit"),
    ):
        pool.transcode(large, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
    with DecodePool(workers=1, timeout=20, memory_limit=128 * MiB) as pool:
        out = pool.transcode(large, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
        expected = pydicom.dcmread(io.BytesIO(large)).pixel_array
        assert np.array_equal(_pixels(out, ExplicitVRLittleEndian), expected)


def test_a_worker_killed_while_idle_is_replaced(pool: DecodePool) -> None:
    _decodes_normally(pool)
    [first] = pool.pids()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(first) and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the kernel to end it, bounded
    _decodes_normally(pool)
    assert pool.pids() != [first]


def test_faults_exist_only_for_tests() -> None:
    data = _testdata(MR_J2K)
    with DecodePool(workers=1, timeout=20, memory_limit=256 * MiB) as pool:
        with pytest.raises(DecodeFailure, match="unknown decoder job 'fault'"):
            pool.run("fault", {"fault": "segv"}, b"", max_result=0)
        [pid] = pool.pids()
        # A fault mark in a stored object means nothing outside tests.
        out = pool.transcode(_marked(MR_J2K, "segv"), ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
        expected = pydicom.dcmread(io.BytesIO(data)).pixel_array
        assert np.array_equal(_pixels(out, ExplicitVRLittleEndian), expected)
        assert pool.pids() == [pid]


# -- the same pixels as pydicom in this process --------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        MR_J2K,  # JPEG 2000 Lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
        "MR_small_RLE.dcm",  # RLE Lossless
        "SC_rgb_rle_2frame.dcm",  # RLE, colour, two frames
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL_422
        "SC_jpeg_no_color_transform.dcm",  # JPEG Baseline, RGB
        "JPEG-LL.dcm",  # JPEG Lossless, Process 14 SV1, 16 bits
    ],
)
def test_decoded_pixels_equal_pydicoms(pool: DecodePool, name: str) -> None:
    data = _testdata(name)
    out = pool.transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert np.array_equal(_pixels(out, ExplicitVRLittleEndian), expected)
    assert bytes(out) == InProcess().transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)


@pytest.mark.parametrize("target", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_encoded_in_a_worker_decodes_to_the_stored_pixels(pool: DecodePool, target: str) -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 4096, (64, 48), dtype=np.uint16)
    data = part10(make_dataset(Rows=64, Columns=48, PixelData=arr.tobytes()))
    out = pool.transcode(data, target, max_pixel_bytes=LIMIT)
    assert np.array_equal(_pixels(out, target), arr)


def test_uncompressed_conversions_need_no_worker(pool: DecodePool) -> None:
    data = part10(make_dataset())
    out = pool.transcode(data, "1.2.840.10008.1.2", max_pixel_bytes=LIMIT)
    assert bytes(out) == InProcess().transcode(data, "1.2.840.10008.1.2", max_pixel_bytes=LIMIT)
    assert pool.started == 0


@pytest.mark.parametrize("name", [MR_J2K, "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"])
def test_rendered_in_a_worker_as_in_this_process(pool: DecodePool, name: str) -> None:
    data = _testdata(name)
    options = RenderOptions(
        media_type=PNG,
        window=Window(600, 1200),
        viewport=Viewport(40, 40, (2, 2, 50, -40)),
    )
    image = pool.render(data, options, max_pixel_bytes=LIMIT)
    assert image == InProcess().render(data, options, max_pixel_bytes=LIMIT)
    assert Image.open(io.BytesIO(image)).size[0] <= 40


def test_errors_of_a_job_come_back_as_they_were_raised(pool: DecodePool) -> None:
    data = _testdata(MR_J2K)
    with pytest.raises(NotFound, match="frame 2 does not exist"):
        pool.render(data, RenderOptions(frame=2), max_pixel_bytes=LIMIT)
    [pid] = pool.pids()
    with pytest.raises(CannotTranscode, match="not one Stockade knows"):
        pool.transcode(data, "1.2.3.4", max_pixel_bytes=LIMIT)
    assert pool.pids() == [pid]  # an ordinary refusal keeps the worker


# -- sizes are refused from the header, before any worker runs (SR-13) ---------------------


def _huge(ts: str) -> bytes:
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"\x00\x00\xff\xff" * 2 + bytes(40)
    pixels = encapsulate([siz]) if ts == JPEG2000Lossless else bytes(64)
    ds = make_dataset(Rows=65535, Columns=65535, NumberOfFrames=10000, PixelData=pixels)
    return part10(ds, ts=ts)


@pytest.mark.parametrize("ts", [JPEG2000Lossless, ExplicitVRLittleEndian])
def test_a_huge_header_never_reaches_a_worker(pool: DecodePool, ts: str) -> None:
    data = _huge(ts)
    with pytest.raises(CannotTranscode, match="over the limit"):
        pool.render(data, RenderOptions(), max_pixel_bytes=LIMIT)
    target = RLELossless if ts == ExplicitVRLittleEndian else ExplicitVRLittleEndian
    with pytest.raises(CannotTranscode, match="over the limit"):
        pool.transcode(data, target, max_pixel_bytes=LIMIT)
    assert pool.started == 0


# -- concurrency, framing, life cycle -------------------------------------------------------


def test_concurrent_jobs_share_the_workers() -> None:
    data = _testdata(MR_J2K)
    expected = InProcess().transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
    results: list[bytes] = []
    with DecodePool(workers=2, timeout=30, memory_limit=256 * MiB) as pool:

        def work() -> None:
            for _ in range(5):
                out = pool.transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
                results.append(bytes(out))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pool.pids()) <= 2
        assert pool.started <= 2
    assert results == [expected] * 20


@pytest.mark.parametrize(
    ("frame", "max_payload", "message"),
    [
        (sandbox._HEAD.pack(sandbox.MAX_HEADER + 1, 0), 0, "a header of"),
        (sandbox._HEAD.pack(2, 10) + b"{}", 9, "payload of 10 bytes, over 9"),
        (sandbox._HEAD.pack(2, 0) + b"[]", 0, "not a JSON object"),
    ],
)
def test_a_malformed_frame_is_refused(frame: bytes, max_payload: int, message: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(frame)
        with pytest.raises(ValueError, match=message):
            sandbox._receive(ours, time.monotonic() + 5, max_payload)


def test_a_frame_cut_short_is_the_end_of_the_stream() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        theirs.sendall(sandbox._HEAD.pack(2, 100) + b"{}" + bytes(10))
        theirs.close()
        with pytest.raises(EOFError):
            sandbox._receive(ours, time.monotonic() + 5, 100)


def test_render_options_survive_the_wire() -> None:
    options = RenderOptions(
        media_type=PNG,
        frame=3,
        window=Window(40.5, 400, "SIGMOID"),
        viewport=Viewport(None, 64, (0.1, 0.2, 0.9, 1.0), relative=True, enlarge=False),
        quality=55,
    )
    assert sandbox.options_from_wire(sandbox.options_to_wire(options)) == options
    assert sandbox.options_from_wire(sandbox.options_to_wire(RenderOptions())) == RenderOptions()
    with pytest.raises(ValueError, match="not a int"):
        sandbox.options_from_wire({**sandbox.options_to_wire(RenderOptions()), "frame": "1"})


def test_close_stops_every_worker_and_refuses_more_jobs() -> None:
    pool = DecodePool(workers=2, timeout=20, memory_limit=256 * MiB)
    _decodes_normally(pool)
    pids = pool.pids()
    assert pids
    pool.close()
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(DecodeFailure, match="shut down"):
        _decodes_normally(pool)


def test_settings_choose_the_decoder(settings: Settings) -> None:
    from dataclasses import replace

    decoder = open_decoder(settings)
    assert isinstance(decoder, DecodePool)
    assert decoder.workers == 2
    assert decoder.timeout == 30.0
    assert decoder.memory_limit == 4 * settings.max_decoded_size + 1024 * MiB
    decoder.close()
    chosen = open_decoder(replace(settings, decode_memory_limit=64 * MiB, decode_workers=1))
    assert isinstance(chosen, DecodePool)
    assert (chosen.workers, chosen.memory_limit) == (1, 64 * MiB)
    chosen.close()
    assert isinstance(open_decoder(replace(settings, decode_in_process=True)), InProcess)


def test_an_archive_stops_its_workers_when_closed(settings: Settings) -> None:
    from stockade.app import build_archive

    archive = build_archive(settings)
    archive.prepare()
    data = _testdata(MR_J2K)
    archive.decoder.transcode(data, ExplicitVRLittleEndian, max_pixel_bytes=LIMIT)
    assert isinstance(archive.decoder, DecodePool)
    pids = archive.decoder.pids()
    assert len(pids) == 1
    archive.close()
    assert not any(_alive(pid) for pid in pids)
