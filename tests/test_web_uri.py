"""WADO-URI (PS3.18 9), on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
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
from pydicom.uid import generate_uid

from stockade.archive import Archive
from stockade.audit.events import InstancesRetrieved
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.inspect import Kind
from stockade.dicom.part10 import read_part10
from stockade.ingest import Origin
from stockade.security.policy import Action, Policy
from stockade.web.app import create_app
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10
from tests.test_web_render import _store_huge

with warnings.catch_warnings():  # starlette warns at import that httpx2 is preferred
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
RLE = "1.2.840.10008.1.2.5"


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def _store_file(archive: Archive, name: str) -> tuple[Dataset, bytes]:
    path = get_testdata_file(name)
    assert path is not None, name
    data = Path(str(path)).read_bytes()
    archive.store_file(data, Origin(via="import"))
    return pydicom.dcmread(io.BytesIO(data)), data


def _query(ds: Dataset, **extra: str) -> dict[str, str]:
    return {
        "requestType": "WADO",
        "studyUID": str(ds.StudyInstanceUID),
        "seriesUID": str(ds.SeriesInstanceUID),
        "objectUID": str(ds.SOPInstanceUID),
        **extra,
    }


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = json.loads(response.content)
    assert body["status"] == status
    return dict(body)


def _image(response: httpx.Response, media: str) -> npt.NDArray[np.int32]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media
    return np.asarray(Image.open(io.BytesIO(response.content))).astype(np.int32)


def test_dicom_as_stored_has_a_zero_preamble(
    archive: Archive, client: TestClient, audit: MemoryAuditSink
) -> None:
    # a Part 10 file whose preamble is HTML, stored under the policy "strip" (the default
    # quarantines it): stored and served with zeros (SR-20, SR-21)
    archive.ingest.policy = Policy({Kind.MARKUP_PREAMBLE: Action.STRIP})
    ds = make_dataset()
    sent = part10(ds, preamble=b"<html><script>alert(1)</script>".ljust(128, b" "))
    archive.store_file(sent, Origin(via="import"))
    response = client.get(
        "/dicomweb/wado", params=_query(ds, contentType="application/dicom", transferSyntax="*")
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{ds.SOPInstanceUID}.dcm"'
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    body = response.content
    assert body[:128] == bytes(128)
    assert body[128:132] == b"DICM"
    sent_info, got_info = read_part10(sent), read_part10(body)
    assert body[got_info.dataset_offset :] == sent[sent_info.dataset_offset :]
    retrieved = [e for e in audit.events if isinstance(e, InstancesRetrieved)]
    assert retrieved[-1].service == "wado"
    assert retrieved[-1].completed == 1


def test_dicom_default_is_explicit_vr_little_endian(archive: Archive, client: TestClient) -> None:
    ds, data = _store_file(archive, "SC_rgb_rle.dcm")  # stored as RLE Lossless
    response = client.get("/dicomweb/wado", params=_query(ds, contentType="application/dicom"))
    assert response.status_code == 200, response.text
    got = pydicom.dcmread(io.BytesIO(response.content))
    assert response.content[:128] == bytes(128)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert got.SOPInstanceUID == ds.SOPInstanceUID
    assert got.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, ds.pixel_array)

    stored = client.get(
        "/dicomweb/wado", params=_query(ds, contentType="application/dicom", transferSyntax="*")
    )
    assert read_part10(stored.content).transfer_syntax == RLE
    assert stored.content[:128] == bytes(128)
    assert stored.content.endswith(data[read_part10(data).dataset_offset :])


def test_dicom_in_a_named_transfer_syntax(archive: Archive, client: TestClient) -> None:
    ds, _ = _store_file(archive, "CT_small.dcm")  # Explicit VR Little Endian
    for ts in (IMPLICIT, RLE):
        response = client.get(
            "/dicomweb/wado",
            params=_query(ds, contentType="application/dicom", transferSyntax=ts),
        )
        assert response.status_code == 200, response.text
        got = pydicom.dcmread(io.BytesIO(response.content))
        assert got.file_meta.TransferSyntaxUID == ts
        assert np.array_equal(got.pixel_array, ds.pixel_array)
    # lossy targets are never produced
    _problem(
        client.get(
            "/dicomweb/wado",
            params=_query(
                ds, contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.50"
            ),
        ),
        406,
    )


def test_image_rendering_shares_the_pipeline(archive: Archive, client: TestClient) -> None:
    ds, _ = _store_file(archive, "CT_small.dcm")
    default = client.get("/dicomweb/wado", params=_query(ds))
    assert default.headers["content-type"] == "image/jpeg"
    assert default.content.startswith(b"\xff\xd8\xff")

    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = 40.0, 400.0
    expected = np.clip(((hu - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255)
    png = _image(
        client.get(
            "/dicomweb/wado",
            params=_query(ds, contentType="image/png", windowCenter="40", windowWidth="400"),
        ),
        "image/png",
    )
    assert int(np.abs(png - np.rint(expected)).max()) <= 1
    # the same as the rendered resource
    rendered = client.get(
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/rendered?window=40,400,linear",
        headers={"Accept": "image/png"},
    )
    assert np.array_equal(png, np.asarray(Image.open(io.BytesIO(rendered.content))))

    small = _image(
        client.get("/dicomweb/wado", params=_query(ds, contentType="image/png", rows="32")),
        "image/png",
    )
    assert small.shape == (32, 32)
    region = _image(
        client.get(
            "/dicomweb/wado",
            params=_query(ds, contentType="image/png", region="0.25,0.5,0.75,1.0"),
        ),
        "image/png",
    )
    full = _image(
        client.get("/dicomweb/wado", params=_query(ds, contentType="image/png")), "image/png"
    )
    assert np.array_equal(region, full[64:128, 32:96])
    listed = client.get(
        "/dicomweb/wado", params=_query(ds, contentType="application/pdf, image/png;q=0.5")
    )
    assert listed.headers["content-type"] == "image/png"


def test_frame_number_and_quality(archive: Archive, client: TestClient) -> None:
    ds, _ = _store_file(archive, "emri_small.dcm")
    frame = ds.pixel_array[4].astype(np.float64)
    expected = (frame - frame.min()) / (frame.max() - frame.min()) * 255
    png = _image(
        client.get("/dicomweb/wado", params=_query(ds, contentType="image/png", frameNumber="5")),
        "image/png",
    )
    assert int(np.abs(png - np.rint(expected)).max()) <= 1
    _problem(client.get("/dicomweb/wado", params=_query(ds, frameNumber="11")), 404)
    low = client.get("/dicomweb/wado", params=_query(ds, imageQuality="5"))
    high = client.get("/dicomweb/wado", params=_query(ds, imageQuality="100"))
    assert len(low.content) < len(high.content)


@pytest.mark.parametrize(
    "change",
    [
        {"requestType": "WADO-RS"},
        {"requestType": ""},
        {"objectUID": ""},
        {"seriesUID": "1.2.abc"},
        {"studyUID": "1." + "2" * 80},
        {"windowCenter": "40"},
        {"windowWidth": "400"},
        {"windowCenter": "x", "windowWidth": "400"},
        {"windowCenter": "40", "windowWidth": "0"},
        {"rows": "0"},
        {"columns": "4097"},
        {"region": "0.5,0.5,0.2,0.8"},
        {"region": "0,0,1"},
        {"region": "0,0,1.5,1"},
        {"frameNumber": "0"},
        {"frameNumber": "-1"},
        {"imageQuality": "101"},
        {"annotation": "everything"},
        {"anonymize": "yes"},
        {"presentationUID": "1.2.3"},
        {"transferSyntax": EXPLICIT},
        {"contentType": "application/dicom", "rows": "10"},
        {"contentType": "application/dicom", "transferSyntax": "not-a-uid"},
        {"bogus": "1"},
    ],
)
def test_bad_parameters_are_400(
    archive: Archive, client: TestClient, change: dict[str, str]
) -> None:
    ds, _ = _store_file(archive, "MR_small.dcm")
    _problem(client.get("/dicomweb/wado", params=_query(ds, **change)), 400)


def test_missing_parameters_and_objects(archive: Archive, client: TestClient) -> None:
    ds, _ = _store_file(archive, "MR_small.dcm")
    _problem(client.get("/dicomweb/wado"), 400)
    query = _query(ds)
    del query["studyUID"]
    _problem(client.get("/dicomweb/wado", params=query), 400)
    _problem(client.get("/dicomweb/wado?requestType=WADO&requestType=WADO"), 400)
    _problem(client.get("/dicomweb/wado", params=_query(ds, objectUID=generate_uid())), 404)
    _problem(
        client.get(
            "/dicomweb/wado",
            params=_query(ds, objectUID=generate_uid(), contentType="application/dicom"),
        ),
        404,
    )
    _problem(client.get("/dicomweb/wado", params=_query(ds, contentType="text/html")), 406)
    report = make_dataset()
    del report.PixelData
    archive.store_file(part10(report), Origin(via="import"))
    _problem(client.get("/dicomweb/wado", params=_query(report)), 406)
    assert (
        client.get("/dicomweb/wado", params=_query(report, contentType="application/dicom"))
    ).status_code == 200
    assert client.get("/wado", params=_query(ds)).status_code == 404  # only under /dicomweb


def test_huge_header_is_refused_before_decoding(archive: Archive, client: TestClient) -> None:
    ds = _store_huge(archive)
    body = _problem(client.get("/dicomweb/wado", params=_query(ds)), 406)
    assert "limit" in str(body["detail"])
    body = _problem(
        client.get(
            "/dicomweb/wado", params=_query(ds, contentType="application/dicom", transferSyntax=RLE)
        ),
        406,
    )
