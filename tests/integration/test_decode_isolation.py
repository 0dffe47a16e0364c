"""Decoding is isolated (threat model SR-13) in a real ``stockade serve``.

The server runs with the test-only decoder faults on (``STOCKADE_TEST_DECODE_FAULTS=1``: a
stored object whose Image Comments say ``STOCKADE-TEST-FAULT:segv`` makes the decoder
process die of SIGSEGV when it decodes it, ``spin`` makes it loop), a decode deadline of a
few seconds and a decoder memory limit of 24 MiB. Each bad object gets an HTTP 500 problem
document (or a failed C-GET sub-operation), and the very next request is served normally by
the same HTTP process. An object whose header claims 65535 x 65535 x 10000 frames is refused
before anything is decoded: the server's peak memory does not move and no decoder process
starts.
"""

from __future__ import annotations

import copy
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import utils as pixel_utils
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from stockade.app import build_archive
from stockade.ingest import Origin
from stockade.settings import load
from tests.dicomfactory import make_dataset, part10

from .conftest import HOST, StockadeServer, require_dcmtk
from .test_dicomweb_wado import wait_http

pytestmark = pytest.mark.dcmtk  # StockadeServer.start waits for C-ECHO (echoscu)
TIMEOUT = 3.0
MEMORY = 24 * 1024 * 1024
PROBLEM = "application/problem+json"
OCTET = 'multipart/related; type="application/octet-stream"'
DICOM_EXPLICIT = (
    f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'
)


@dataclass
class Rig:
    server: StockadeServer
    objects: dict[str, pydicom.Dataset]  # name -> the stored object
    decoders_seen: set[int] = field(default_factory=set)


def _variant(name: str, source: pydicom.Dataset, fault: str | None) -> pydicom.Dataset:
    ds = copy.deepcopy(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"DECODE-{name}"
    if fault is not None:
        ds.ImageComments = f"STOCKADE-TEST-FAULT:{fault}"
    return ds


def _large_rle() -> pydicom.Dataset:
    """2048 x 2048 x 16 bits in RLE: 8 MiB decoded, several times that to transcode."""
    arr = np.random.default_rng(11).integers(0, 4096, (2048, 2048), dtype=np.uint16)
    ds = make_dataset(Rows=2048, Columns=2048, PixelData=arr.tobytes(), PatientID="DECODE-big")
    pixel_utils.compress(ds, RLELossless, arr, generate_instance_uid=False)
    return pydicom.dcmread(io.BytesIO(part10(ds, ts=RLELossless)))


def _huge() -> pydicom.Dataset:
    """A JPEG 2000 object whose header (and codestream) claim 65535 x 65535 x 10000 frames."""
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"\x00\x00\xff\xff" * 2 + bytes(40)
    ds = make_dataset(Rows=65535, Columns=65535, NumberOfFrames=10000, PixelData=encapsulate([siz]))
    return pydicom.dcmread(io.BytesIO(part10(ds, ts=JPEG2000Lossless)))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_dcmtk("echoscu")
    root = tmp_path_factory.mktemp("decode-isolation")
    server = StockadeServer(
        root,
        settings={
            "STOCKADE_TEST_DECODE_FAULTS": "1",
            "STOCKADE_DECODE_TIMEOUT": str(TIMEOUT),
            "STOCKADE_DECODE_MEMORY_LIMIT": str(MEMORY),
            "STOCKADE_DECODE_WORKERS": "1",
            "STOCKADE_HTTP_WORKERS": "1",
            "STOCKADE_METADATA_WARM_DELAY": "0",
        },
    )
    j2k = pydicom.dcmread(str(get_testdata_file("MR_small_jp2klossless.dcm")))
    objects = {
        "normal": _variant("normal", j2k, None),
        "segv": _variant("segv", j2k, "segv"),
        "spin": _variant("spin", j2k, "spin"),
        "big": _large_rle(),
        "huge": _huge(),
    }
    src = root / "src"
    src.mkdir()
    paths = []
    for name, ds in objects.items():
        path = src / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    # The huge object stands for one stored under a laxer max_decoded_size.
    overrides = {"data_dir": str(server.data_dir), "max_decoded_size": str(1 << 62)}
    archive = build_archive(load(environ={}, overrides=overrides))
    archive.prepare()
    try:
        for path in paths:
            archive.store_file(path.read_bytes(), Origin(via="import"))
    finally:
        archive.close()
    rig = Rig(server, objects)
    server.start()
    try:
        wait_http(server)
        yield rig
    finally:
        if server.proc is not None:
            server.stop()  # asserts that no process of the server's group outlives it
        # Every decoder process was reaped by the server process that started it (not even
        # a zombie is left for init).
        left = {pid for pid in rig.decoders_seen if Path(f"/proc/{pid}").exists()}
        assert not left, f"decoder processes {left} outlived the server"
        server.assert_no_secret_written()


def _processes(rig: Rig, module: str) -> set[int]:
    found = set()
    for pid in rig.server.group_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in cmdline:
            found.add(pid)
    return found


def _http_worker(rig: Rig) -> int:
    [pid] = _processes(rig, "stockade.web.server")
    return pid


def _decoders(rig: Rig) -> set[int]:
    pids = _processes(rig, "stockade.dicom.sandbox")
    rig.decoders_seen |= pids
    return pids


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _url(rig: Rig, name: str, tail: str = "") -> str:
    ds = rig.objects[name]
    return (
        f"{rig.server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}{tail}"
    )


def _get(rig: Rig, url: str, accept: str) -> httpx.Response:
    return rig.server.get(url, headers={"Accept": accept}, timeout=60)


def _problem(response: httpx.Response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = json.loads(response.content)
    assert body["status"] == status
    assert pattern in body["detail"], body


def _check_normal(rig: Rig, resource: str) -> None:
    """The normal object, asked for as *resource*, comes back right."""
    expected = rig.objects["normal"].pixel_array
    if resource == "rendered":
        response = _get(rig, _url(rig, "normal", "/rendered"), "image/png")
        assert response.status_code == 200, response.text
        image = np.asarray(Image.open(io.BytesIO(response.content)))
        assert image.shape == expected.shape
    elif resource == "frames":
        response = _get(rig, _url(rig, "normal", "/frames/1"), OCTET)
        assert response.status_code == 200, response.text
        assert expected.astype("<u2").tobytes() in response.content
    else:
        response = _get(rig, _url(rig, "normal"), DICOM_EXPLICIT)
        assert response.status_code == 200, response.text
        start = response.content.index(b"DICM") - 128
        got = pydicom.dcmread(io.BytesIO(response.content[start:]))
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, expected)


_RESOURCES = {
    "rendered": ("/rendered", "image/png"),
    "frames": ("/frames/1", OCTET),
    "instance": ("", DICOM_EXPLICIT),
}


@pytest.mark.parametrize("resource", sorted(_RESOURCES))
def test_a_crashing_decode_is_a_500_and_the_next_request_is_served(rig: Rig, resource: str) -> None:
    tail, accept = _RESOURCES[resource]
    _check_normal(rig, resource)
    server_pid = _http_worker(rig)
    before = _decoders(rig)
    _problem(_get(rig, _url(rig, "segv", tail), accept), 500, "crashed (SIGSEGV)")
    assert not before & _decoders(rig)  # the crashed decoder is gone
    _check_normal(rig, resource)  # a new decoder, the same server process
    assert _http_worker(rig) == server_pid


def test_a_runaway_decode_is_stopped_at_the_deadline(rig: Rig) -> None:
    server_pid = _http_worker(rig)
    started = time.monotonic()
    response = _get(rig, _url(rig, "spin", "/rendered"), "image/png")
    _problem(response, 500, f"longer than {TIMEOUT:g} s")
    assert time.monotonic() - started < TIMEOUT + 10
    _check_normal(rig, "rendered")
    assert _http_worker(rig) == server_pid


def test_a_decode_over_the_memory_limit_fails_cleanly(rig: Rig) -> None:
    server_pid = _http_worker(rig)
    for tail, accept in (("/frames/1", OCTET), ("/rendered", "image/png")):
        _problem(_get(rig, _url(rig, "big", tail), accept), 500, "memory")
        _check_normal(rig, "frames")
    assert _http_worker(rig) == server_pid


def test_a_huge_header_is_refused_before_any_decode(rig: Rig) -> None:
    _check_normal(rig, "rendered")  # a decoder runs, warm
    server_pid = _http_worker(rig)
    decoders = _decoders(rig)
    peak = _peak_rss(server_pid)
    for tail, accept in (
        ("/rendered", "image/png"),
        ("/frames/5000/rendered", "image/jpeg"),
        ("/thumbnail", "image/jpeg"),
        ("/frames/1", OCTET),
        ("", DICOM_EXPLICIT),
    ):
        _problem(_get(rig, _url(rig, "huge", tail), accept), 406, "limit")
    assert _decoders(rig) == decoders  # no job reached a decoder
    assert _peak_rss(server_pid) - peak < 32 * 1024 * 1024
    assert _http_worker(rig) == server_pid


def test_a_crashing_decode_fails_its_c_get_suboperation_only(rig: Rig, tmp_path: Path) -> None:
    require_dcmtk("getscu")
    import subprocess

    from .conftest import AE_TITLE, DCMTK_TIMEOUTS, clean_env

    def getscu(name: str) -> tuple[str, dict[str, pydicom.Dataset]]:
        out = tmp_path / name
        out.mkdir()
        ds = rig.objects[name]
        args = ["getscu", "-d", "-S", "-aet", "GETSCU", "-aec", AE_TITLE, *DCMTK_TIMEOUTS]
        args += ["-od", str(out), "-k", "QueryRetrieveLevel=STUDY"]
        args += ["-k", f"StudyInstanceUID={ds.StudyInstanceUID}", HOST, str(rig.server.port)]
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            errors="replace",
            env=clean_env(),
            timeout=120,
            check=False,
        )
        got = {p.name: pydicom.dcmread(p) for p in out.iterdir() if p.is_file()}
        return done.stdout + done.stderr, got

    # getscu proposes uncompressed transfer syntaxes only: the JPEG 2000 object is decoded.
    output, got = getscu("segv")
    assert not got
    assert "0xa702" in output.lower(), output[-2000:]  # every sub-operation failed
    output, got = getscu("normal")
    [received] = got.values()
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(received.pixel_array, rig.objects["normal"].pixel_array)
