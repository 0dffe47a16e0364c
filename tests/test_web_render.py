"""Rendered resources and thumbnails (PS3.18 10.4.1.1.3, 10.4.1.1.4), on SQLite and PostgreSQL.

Pixels are checked against a VOI window computed here with numpy from PS3.3 C.11.2.1.2.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import JPEG2000Lossless, generate_uid

from stockade.archive import Archive
from stockade.audit.events import InstancesRetrieved
from stockade.audit.sink import MemoryAuditSink
from stockade.ingest import Origin
from stockade.web.app import create_app
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10

with warnings.catch_warnings():  # starlette warns at import that httpx2 is preferred
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

Array = npt.NDArray[np.float64]


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path))


def _store_file(archive: Archive, name: str) -> Dataset:
    path = _testdata(name)
    archive.store_file(path.read_bytes(), Origin(via="import"))
    return pydicom.dcmread(path)


def _store(archive: Archive, ds: Dataset, ts: str | None = None) -> Dataset:
    data = part10(ds) if ts is None else part10(ds, ts=ts)
    archive.store_file(data, Origin(via="import"))
    return ds


def _url(ds: Dataset, tail: str = "/rendered") -> str:
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}{tail}"
    )


def _png(client: TestClient, url: str) -> npt.NDArray[np.int32]:
    response = client.get(url, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(response.content))).astype(np.int32)


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = json.loads(response.content)
    assert body["status"] == status
    return dict(body)


# -- an independent reference of the VOI LUT functions (PS3.3 C.11.2.1.2, C.11.2.1.3.1) ----


def _linear(x: Array, c: float, w: float) -> Array:
    low = c - 0.5 - (w - 1) / 2
    high = c - 0.5 + (w - 1) / 2
    mid = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, mid))


def _linear_exact(x: Array, c: float, w: float) -> Array:
    mid = ((x - c) / w + 0.5) * 255
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, mid))


def _sigmoid(x: Array, c: float, w: float) -> Array:
    return 255 / (1 + np.exp(-4 * (x - c) / w))


def _close(actual: npt.NDArray[np.int32], expected: Array) -> None:
    assert actual.shape == expected.shape
    assert int(np.abs(actual - np.rint(expected)).max()) <= 1


def _modality(ds: Dataset) -> Array:
    slope = float(ds.get("RescaleSlope", 1))
    intercept = float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.astype(np.float64) * slope + intercept


# -- grey images -----------------------------------------------------------------------------


def test_window_from_the_request_on_ct_values(archive: Archive, client: TestClient) -> None:
    ds = _store_file(archive, "CT_small.dcm")
    hu = _modality(ds)
    _close(_png(client, _url(ds) + "?window=40,400,linear"), _linear(hu, 40, 400))
    _close(_png(client, _url(ds) + "?window=40,400"), _linear(hu, 40, 400))
    _close(_png(client, _url(ds) + "?window=100,250,linear-exact"), _linear_exact(hu, 100, 250))
    _close(_png(client, _url(ds) + "?window=0,300,sigmoid"), _sigmoid(hu, 0, 300))


def test_window_from_the_file_then_min_max(archive: Archive, client: TestClient) -> None:
    mr = _store_file(archive, "MR_small.dcm")  # Window Center 600, Width 1600
    values = mr.pixel_array.astype(np.float64)
    _close(_png(client, _url(mr)), _linear(values, 600, 1600))

    ct = _store_file(archive, "CT_small.dcm")  # no window: minimum to maximum
    hu = _modality(ct)
    expected = (hu - hu.min()) / (hu.max() - hu.min()) * 255
    rendered = _png(client, _url(ct))
    _close(rendered, expected)
    assert rendered.min() == 0
    assert rendered.max() == 255


def test_monochrome1_is_inverted(archive: Archive, client: TestClient) -> None:
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 10
    common = {"Rows": 8, "Columns": 8, "PixelData": pixels.tobytes()}
    mono1 = _store(archive, make_dataset(PhotometricInterpretation="MONOCHROME1", **common))
    mono2 = _store(archive, make_dataset(PhotometricInterpretation="MONOCHROME2", **common))
    expected = pixels / pixels.max() * 255
    _close(_png(client, _url(mono2)), expected)
    _close(_png(client, _url(mono1)), 255 - expected)
    _close(
        _png(client, _url(mono1) + "?window=300,200,linear"),
        255 - _linear(pixels.astype(np.float64), 300, 200),
    )


def test_multiframe_first_frame_by_default_and_named_frames(
    archive: Archive, client: TestClient
) -> None:
    ds = _store_file(archive, "emri_small.dcm")  # 10 frames of 64 x 64
    frames = ds.pixel_array.astype(np.float64)

    def min_max(frame: Array) -> Array:
        scaled: Array = (frame - frame.min()) / (frame.max() - frame.min()) * 255
        return scaled

    _close(_png(client, _url(ds)), min_max(frames[0]))
    _close(_png(client, _url(ds, "/frames/1/rendered")), min_max(frames[0]))
    _close(_png(client, _url(ds, "/frames/7/rendered")), min_max(frames[6]))
    assert not np.array_equal(frames[0], frames[6])
    _problem(client.get(_url(ds, "/frames/11/rendered")), 404)
    _problem(client.get(_url(ds, "/frames/0/rendered")), 400)
    _problem(client.get(_url(ds, "/frames/x/rendered")), 400)
    _problem(client.get(_url(ds, "/frames/99999999999999/rendered")), 400)
    _problem(client.get(_url(ds, "/frames/1,2/rendered")), 406)


# -- colour images ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "US1_J2KR.dcm", "US1_UNCR.dcm"])
def test_rgb_keeps_its_colours(archive: Archive, client: TestClient, name: str) -> None:
    ds = _store_file(archive, name)
    rendered = _png(client, _url(ds))
    assert rendered.shape == (ds.Rows, ds.Columns, 3)
    assert np.array_equal(rendered, ds.pixel_array.astype(np.int32))


@pytest.mark.parametrize(
    "name",
    ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
)
def test_ybr_is_rendered_as_rgb(archive: Archive, client: TestClient, name: str) -> None:
    ds = _store_file(archive, name)
    rendered = _png(client, _url(ds))
    expected = ds.pixel_array.astype(np.float64)  # pydicom converts YBR to RGB by default
    assert rendered.shape == (ds.Rows, ds.Columns, 3)
    assert int(np.abs(rendered - expected).max()) <= 2


def test_palette_colour_goes_through_its_lookup_tables(
    archive: Archive, client: TestClient
) -> None:
    ds = _store_file(archive, "OBXXXX1A.dcm")  # PALETTE COLOR, 16-bit LUT entries
    red = np.asarray(ds.RedPaletteColorLookupTableData)
    assert red.size  # the tables are in the file
    expected = apply_color_lut(ds.pixel_array, ds).astype(np.float64) * 255 / 65535
    _close(_png(client, _url(ds)), expected)


# -- media types, viewport, quality, parameters ---------------------------------------------


def test_media_type_follows_accept(archive: Archive, client: TestClient) -> None:
    ds = _store_file(archive, "MR_small.dcm")
    default = client.get(_url(ds))
    assert default.status_code == 200
    assert default.headers["content-type"] == "image/jpeg"
    assert default.content.startswith(b"\xff\xd8\xff")
    assert Image.open(io.BytesIO(default.content)).size == (64, 64)
    for accept, media, magic in [
        ("image/png", "image/png", b"\x89PNG"),
        ("image/jpeg", "image/jpeg", b"\xff\xd8\xff"),
        ("image/gif", "image/gif", b"GIF8"),
        ("image/*", "image/jpeg", b"\xff\xd8\xff"),
        ("*/*", "image/jpeg", b"\xff\xd8\xff"),
        ("image/jpeg;q=0.5, image/png", "image/png", b"\x89PNG"),
        ("application/dicom, image/png;q=0.2", "image/png", b"\x89PNG"),
    ]:
        response = client.get(_url(ds), headers={"Accept": accept})
        assert response.status_code == 200, accept
        assert response.headers["content-type"] == media, accept
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content.startswith(magic), accept
    by_parameter = client.get(_url(ds) + "?accept=image/png", headers={"Accept": "image/jpeg"})
    assert by_parameter.headers["content-type"] == "image/png"
    _problem(client.get(_url(ds), headers={"Accept": "application/pdf"}), 406)
    _problem(client.get(_url(ds), headers={"Accept": "image/png;q=0"}), 406)


def test_viewport_scales_to_fit_and_crops(archive: Archive, client: TestClient) -> None:
    ds = _store_file(archive, "US1_UNCR.dcm")  # 640 x 480 RGB
    assert _png(client, _url(ds) + "?viewport=320,320").shape == (240, 320, 3)
    assert _png(client, _url(ds) + "?viewport=1000,120").shape == (120, 160, 3)
    assert _png(client, _url(ds) + "?viewport=1280,960").shape == (960, 1280, 3)
    pixels = ds.pixel_array.astype(np.int32)
    crop = _png(client, _url(ds) + "?viewport=30,20,100,50,30,20")
    assert np.array_equal(crop, pixels[50:70, 100:130])
    flipped = _png(client, _url(ds) + "?viewport=30,20,130,70,-30,-20")
    assert np.array_equal(flipped, pixels[50:70, 100:130][::-1, ::-1])
    _problem(client.get(_url(ds) + "?viewport=30,20,5000,5000,30,20"), 400)


def test_quality_changes_the_jpeg(archive: Archive, client: TestClient) -> None:
    ds = _store_file(archive, "US1_UNCR.dcm")
    low = client.get(_url(ds) + "?quality=5")
    high = client.get(_url(ds) + "?quality=100")
    assert low.status_code == high.status_code == 200
    assert len(low.content) < len(high.content)
    assert client.get(_url(ds) + "?annotation=patient,technique").status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "window=abc,400,linear",
        "window=40",
        "window=40,0,linear",
        "window=40,0.5,linear",
        "window=40,0,sigmoid",
        "window=40,400,cubic",
        "window=nan,400",
        "window=1e999,400",
        "viewport=0,10",
        "viewport=4097,10",
        "viewport=10",
        "viewport=10,10,0,0,0,10",
        "quality=0",
        "quality=101",
        "quality=high",
        "annotation=everything",
        "frame=1",
        "quality=50&quality=60",
    ],
)
def test_bad_parameters_are_400(archive: Archive, client: TestClient, query: str) -> None:
    ds = _store_file(archive, "MR_small.dcm")
    _problem(client.get(_url(ds) + "?" + query), 400)


def test_bad_and_unknown_uids(archive: Archive, client: TestClient) -> None:
    ds = _store_file(archive, "MR_small.dcm")
    bad = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/1.2.abc/instances/1.2/rendered"
    _problem(client.get(bad), 400)
    missing = ds.copy()
    missing.SOPInstanceUID = generate_uid()
    _problem(client.get(_url(missing)), 404)
    _problem(client.get(_url(missing, "/thumbnail")), 404)


def _parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer: (headers, body)."""
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
    chunks = response.content.split(f"--{boundary}".encode())
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    out = []
    for chunk in chunks[1:-1]:
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert body.endswith(b"\r\n")
        out.append(({k.lower(): v for k, v in fields.items()}, body[:-2]))
    return out


def test_study_and_series_rendered_as_multipart(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    made = []
    for n, (s, rows) in enumerate([(0, 8), (0, 16), (1, 12)]):
        ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series[s], Rows=rows)
        ds.Columns = rows
        ds.InstanceNumber = n + 1
        ds.PixelData = (np.arange(rows * rows, dtype=np.uint16) * (n + 1)).tobytes()
        made.append(_store(archive, ds))
    report = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series[0])
    del report.PixelData  # nothing to render: left out, counted as failed
    _store(archive, report)
    audit.events.clear()

    answer = client.get(
        f"/dicomweb/studies/{study}/rendered",
        headers={"Accept": 'multipart/related; type="image/png"'},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith('multipart/related; type="image/png"')
    parts = _parts(answer)
    by_location = {h["content-location"]: body for h, body in parts}
    assert len(parts) == 3 and all(h["content-type"] == "image/png" for h, _ in parts)
    for ds in made:  # each part is the instance's own rendered image, byte for byte
        single = client.get(_url(ds), headers={"Accept": "image/png"})
        assert by_location[_url(ds)] == single.content
    record = next(e for e in audit.events if isinstance(e, InstancesRetrieved))
    assert (record.completed, record.failed) == (3, 1)

    one = client.get(f"/dicomweb/studies/{study}/series/{series[1]}/rendered?quality=90")
    jpegs = _parts(one)
    assert [h["content-location"] for h, _ in jpegs] == [_url(made[2])]
    assert jpegs[0][0]["content-type"] == "image/jpeg" and jpegs[0][1][:2] == b"\xff\xd8"

    alone = make_dataset()
    del alone.PixelData
    _store(archive, alone)
    body = _problem(client.get(f"/dicomweb/studies/{alone.StudyInstanceUID}/rendered"), 406)
    assert "can be rendered" in str(body["detail"])
    _problem(client.get(f"/dicomweb/studies/{generate_uid()}/rendered"), 404)
    _problem(
        client.get(f"/dicomweb/studies/{study}/rendered", headers={"Accept": "text/html"}), 406
    )


def test_an_object_without_pixel_data_is_406(archive: Archive, client: TestClient) -> None:
    ds = make_dataset()
    del ds.PixelData
    _store(archive, ds)
    body = _problem(client.get(_url(ds)), 406)
    assert "Pixel Data" in str(body["detail"])


# -- hostile headers (threat model SR-13) ----------------------------------------------------


def _huge(**extra: object) -> Dataset:
    return make_dataset(Rows=65535, Columns=65535, NumberOfFrames=10000, **extra)


def _store_huge(archive: Archive) -> Dataset:
    """Store an object whose header claims 65535 x 65535 x 10000 frames. Ingest refuses such
    headers (tests/test_screening.py); one stored before, or under a larger limit, must
    still never be decoded, so this stores it under a raised ingest limit."""
    # A JPEG 2000 codestream start (SOC, SIZ) that claims a 65535 x 65535 image.
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"\x00\x00\xff\xff" * 2 + bytes(40)
    limit = archive.ingest.settings
    archive.ingest.settings = dataclasses.replace(limit, max_decoded_size=2**62)
    try:
        return _store(
            archive,
            _huge(PixelData=encapsulate([siz]), BitsAllocated=8, BitsStored=8, HighBit=7),
            ts=JPEG2000Lossless,
        )
    finally:
        archive.ingest.settings = limit


def test_huge_header_is_refused_before_decoding(archive: Archive, client: TestClient) -> None:
    ds = _store_huge(archive)
    tracemalloc.start()
    try:
        for tail in ("/rendered", "/frames/5000/rendered", "/thumbnail"):
            body = _problem(client.get(_url(ds, tail)), 406)
            assert "limit" in str(body["detail"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20


# -- thumbnails -------------------------------------------------------------------------------


def _flat(value: int, study: str, series: str, number: int) -> Dataset:
    return make_dataset(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        InstanceNumber=number,
        Rows=16,
        Columns=16,
        WindowCenter=200,
        WindowWidth=401,
        PixelData=np.full((16, 16), value, dtype=np.uint16).tobytes(),
    )


def test_thumbnails_are_small(archive: Archive, client: TestClient) -> None:
    us = _store_file(archive, "US1_UNCR.dcm")  # 640 x 480
    response = client.get(_url(us, "/thumbnail"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (128, 96)
    png = _png(client, _url(us, "/thumbnail"))
    assert png.shape == (96, 128, 3)
    assert _png(client, _url(us, "/thumbnail?viewport=64,64")).shape == (48, 64, 3)
    mr = _store_file(archive, "MR_small.dcm")  # 64 x 64: not enlarged
    assert _png(client, _url(mr, "/thumbnail")).shape == (64, 64)
    _problem(client.get(_url(mr, "/thumbnail?window=1,2")), 400)


def test_series_and_study_thumbnails_show_the_middle_instance(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    study = generate_uid()
    report_series, image_series = generate_uid(), generate_uid()
    report = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=report_series)
    del report.PixelData
    _store(archive, report)  # the first series holds no image
    for number, value in [(3, 300), (1, 100), (2, 200), (4, 400), (5, 500)]:
        _store(archive, _flat(value, study, image_series, number))
    # middle of 5 ordered by Instance Number: number 3, value 300
    expected = float(_linear(np.array([300.0]), 200, 401)[0])
    series_url = f"/dicomweb/studies/{study}/series/{image_series}/thumbnail"
    for url in (series_url, f"/dicomweb/studies/{study}/thumbnail"):
        thumb = _png(client, url)
        assert thumb.shape == (16, 16)
        assert int(np.abs(thumb - round(expected)).max()) <= 1
    retrieved = [e for e in audit.events if isinstance(e, InstancesRetrieved)]
    assert retrieved[-1].service == "wado"
    assert retrieved[-1].completed == 1
