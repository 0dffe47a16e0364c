"""STOW-RS of DICOM JSON metadata and bulk data (PS3.18 10.5.1.2, 8.7.3; Annex F)."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid
from starlette.exceptions import StarletteDeprecationWarning

from stockade.archive import Archive
from stockade.audit.events import InstanceRejected
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.part10 import read_part10
from stockade.web import stow
from stockade.web.app import create_app
from tests.conftest import authed
from tests.dicomfactory import make_dataset
from tests.test_web_stow import (
    FAILED,
    FAILURE_REASON,
    PRIVATE_REASON,
    REFERENCED,
    SOP_INSTANCE,
    values,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

BOUNDARY = "stow-json-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
J2K = "1.2.840.10008.1.2.4.90"

Part = tuple[dict[str, str], bytes]


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def body_of(parts: list[Part]) -> bytes:
    out = b""
    for headers, data in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out += f"--{BOUNDARY}\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def metadata_part(objects: Any) -> Part:
    return {"Content-Type": "application/dicom+json"}, json.dumps(objects).encode()


def as_json(ds: pydicom.Dataset, prefix: str, bulk: list[Part]) -> dict[str, Any]:
    """*ds* as DICOM JSON with every binary value over 16 bytes sent as an octet-stream
    part (appended to *bulk*)."""

    def handler(elem: Any) -> str:
        uri = f"{prefix}/bulk/{elem.tag:08X}"
        bulk.append(
            ({"Content-Type": "application/octet-stream", "Content-Location": uri}, elem.value)
        )
        return uri

    return ds.to_json_dict(bulk_data_threshold=16, bulk_data_element_handler=handler)


def post(client: TestClient, parts: list[Part], path: str = "/dicomweb/studies") -> Any:
    return client.post(path, content=body_of(parts), headers={"Content-Type": CONTENT_TYPE})


def stored(archive: Archive, sop_instance_uid: str) -> tuple[bytes, pydicom.Dataset]:
    inst = archive.find_instance(sop_instance_uid)
    assert inst is not None
    with archive.store.open(inst.blob_key) as fh:
        data = fh.read()
    return data, pydicom.dcmread(io.BytesIO(data))


def test_native_instance_with_bulk_parts_is_stored_with_its_pixels(
    client: TestClient, archive: Archive
) -> None:
    source = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    del source[0xFFFCFFFC]  # trailing padding: stored, but with a warning (202)
    bulk: list[Part] = []
    obj = as_json(source, "http://client/x", bulk)
    assert obj["7FE00010"]["BulkDataURI"]  # the pixels travel as a bulk part
    # bulk data before and after the metadata: both are found
    response = post(client, [bulk[0], metadata_part([obj]), *bulk[1:]])
    assert response.status_code == 200, response.text
    (item,) = response.json()[REFERENCED]["Value"]
    assert values(item, SOP_INSTANCE) == [source.SOPInstanceUID]

    data, ds = stored(archive, source.SOPInstanceUID)
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    assert read_part10(data).transfer_syntax == "1.2.840.10008.1.2.1"
    assert ds.PatientName == source.PatientName
    assert ds.ImagePositionPatient == source.ImagePositionPatient
    assert np.array_equal(ds.pixel_array, source.pixel_array)


def test_jpeg2000_frames_are_encapsulated_and_decode_as_the_source(
    client: TestClient, archive: Archive
) -> None:
    source = pydicom.dcmread(str(get_testdata_file("emri_small_jpeg_2k_lossless.dcm")))
    count = int(source.NumberOfFrames)
    frames = list(generate_frames(source.PixelData, number_of_frames=count))
    uri = "studies/x/pixels"
    obj = source.to_json_dict(
        bulk_data_threshold=1 << 30,
        bulk_data_element_handler=lambda elem: uri,
    )
    obj["7FE00010"] = {"vr": "OB", "BulkDataURI": uri}
    parts = [metadata_part([obj])] + [
        (
            {
                "Content-Type": f"image/jp2; transfer-syntax={J2K}",
                "Content-Location": f"{uri}/frames/{n}",
            },
            frame,
        )
        for n, frame in enumerate(frames, 1)
    ]
    response = post(client, parts)
    assert response.status_code == 200, response.text
    data, ds = stored(archive, source.SOPInstanceUID)
    assert read_part10(data).transfer_syntax == J2K
    assert list(generate_frames(ds.PixelData, number_of_frames=count)) == frames
    assert np.array_equal(ds.pixel_array, source.pixel_array)


def test_each_instance_that_cannot_be_made_fails_alone_with_its_reason(
    client: TestClient, archive: Archive, audit: MemoryAuditSink
) -> None:
    good = make_dataset()
    bulk: list[Part] = []
    missing_bulk = as_json(make_dataset(), "u1", [])  # its pixels are not sent
    no_uid = make_dataset()
    del no_uid.SOPInstanceUID
    bad_uid = make_dataset(SOPInstanceUID="../../x")
    compressed_other = as_json(make_dataset(), "u2", bulk)
    compressed_other["00420011"] = {"vr": "OB", "BulkDataURI": "u2/document"}
    jp2_without_syntax = as_json(make_dataset(), "u3", [])
    jp2_without_syntax["7FE00010"] = {"vr": "OB", "BulkDataURI": "u3/pixels"}
    parts = [
        metadata_part(
            [
                as_json(good, "u0", bulk),
                missing_bulk,
                as_json(no_uid, "u4", bulk),
                as_json(bad_uid, "u5", bulk),
                compressed_other,
                jp2_without_syntax,
                "not an object",
            ]
        ),
        (
            {"Content-Type": "application/dicom+json"},
            b'[{"00100010": {"vr": "PN", "Value": [NaN]}}]',
        ),
        ({"Content-Type": "image/jpeg", "Content-Location": "u2/document"}, b"\xff\xd8"),
        ({"Content-Type": "image/jp2", "Content-Location": "u3/pixels"}, b"\x00\x00"),
        *bulk,
    ]
    response = post(client, parts)
    assert response.status_code == 202, response.text
    body = response.json()
    assert [values(i, SOP_INSTANCE) for i in body[REFERENCED]["Value"]] == [[good.SOPInstanceUID]]
    assert archive.counts()["instances"] == 1
    failed = body[FAILED]["Value"]
    reasons = [values(i, PRIVATE_REASON)[0] for i in failed]
    assert len(failed) == 7
    assert "u1/bulk/7FE00010" in reasons[0] and "not in the request" in reasons[0]
    assert "SOP Instance UID" in reasons[1]
    assert values(failed[2], SOP_INSTANCE) == []  # an invalid UID is never sent back
    assert "only the data set's Pixel Data may be compressed" in reasons[3]
    assert "transfer syntax of Pixel Data in image/jp2 is not given" in reasons[4]
    assert "not a JSON object" in reasons[5]
    assert "not DICOM JSON" in reasons[6] and "NaN" in reasons[6]
    assert all(values(i, FAILURE_REASON)[0] >> 12 == 0xC for i in failed)
    rejected = [e for e in audit.events if isinstance(e, InstanceRejected)]
    assert len(rejected) == 7
    assert {e.sop_instance_uid for e in rejected} >= {values(failed[0], SOP_INSTANCE)[0]}


def test_every_instance_failing_is_409_and_another_study_of_the_url_is_a900(
    client: TestClient, archive: Archive
) -> None:
    bulk: list[Part] = []
    ds = make_dataset()
    other = generate_uid()
    response = post(
        client, [metadata_part([as_json(ds, "u", bulk)]), *bulk], f"/dicomweb/studies/{other}"
    )
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert values(failed, FAILURE_REASON) == [0xA900]
    assert archive.counts()["instances"] == 0
    # to its own study it is stored
    response = post(
        client,
        [metadata_part([as_json(ds, "u", [])]), *bulk],
        f"/dicomweb/studies/{ds.StudyInstanceUID}",
    )
    assert response.status_code == 200, response.text


def test_parts_over_max_object_size_together_are_413_and_nothing_is_stored(
    client: TestClient, archive: Archive
) -> None:
    bulk: list[Part] = []
    obj = as_json(make_dataset(PixelData=bytes(4000)), "u", bulk)
    meta = metadata_part([obj])
    limit = max(len(meta[1]), 4000) + 100  # each part fits, both together do not
    archive.settings = dataclasses.replace(archive.settings, max_object_size=limit)
    response = post(client, [meta, *bulk])
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "max_object_size" in response.json()["detail"]
    assert archive.counts()["instances"] == 0


def test_more_instances_than_a_request_may_hold_are_400_before_any_is_stored(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stow, "MAX_PARTS", 2)
    bulk: list[Part] = []
    objects = [as_json(make_dataset(), f"u{n}", bulk) for n in range(3)]
    response = post(client, [metadata_part(objects), *bulk])
    assert response.status_code == 400, response.text
    assert "more than 2 instances" in response.json()["detail"]
    assert archive.counts()["instances"] == 0
    assert post(client, [metadata_part(objects[:2]), *bulk[:2]]).status_code == 200
    assert archive.counts()["instances"] == 2


def test_two_bulk_parts_with_one_location_are_400(client: TestClient, archive: Archive) -> None:
    bulk: list[Part] = []
    obj = as_json(make_dataset(PixelData=bytes(200)), "u", bulk)
    response = post(client, [metadata_part([obj]), *bulk, *bulk])
    assert response.status_code == 400, response.text
    assert "Content-Location" in response.json()["detail"]
    assert archive.counts()["instances"] == 0


def test_xml_metadata_is_still_415(client: TestClient) -> None:
    response = client.post(
        "/dicomweb/studies",
        content=body_of([({"Content-Type": "application/dicom+xml"}, b"<x/>")]),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom+xml"; boundary={BOUNDARY}'
        },
    )
    assert response.status_code == 415
    assert "application/dicom+json" in response.json()["detail"]


def test_compressed_pixels_only_at_the_top_and_as_many_frames_as_declared(
    client: TestClient, archive: Archive
) -> None:
    source = pydicom.dcmread(str(get_testdata_file("emri_small_jpeg_2k_lossless.dcm")))
    frames = list(generate_frames(source.PixelData, number_of_frames=int(source.NumberOfFrames)))
    obj = source.to_json_dict(bulk_data_threshold=1 << 30)
    obj["7FE00010"] = {"vr": "OB", "BulkDataURI": "px"}
    jp2 = {"Content-Type": f"image/jp2; transfer-syntax={J2K}"}
    all_frames = [
        ({**jp2, "Content-Location": f"px/frames/{n}"}, f) for n, f in enumerate(frames, 1)
    ]
    # one frame short of Number of Frames
    response = post(client, [metadata_part([obj]), *all_frames[:-1]])
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert f"holds {len(frames) - 1} frame(s)" in values(failed, PRIVATE_REASON)[0]
    # compressed pixels inside a sequence (an icon) would make the whole file compressed
    icon = {"00280010": {"vr": "US", "Value": [8]}, "7FE00010": {"vr": "OB", "BulkDataURI": "icon"}}
    with_icon = {**obj, "00880200": {"vr": "SQ", "Value": [icon]}}
    response = post(
        client,
        [metadata_part([with_icon]), *all_frames, ({**jp2, "Content-Location": "icon"}, frames[0])],
    )
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert "only the data set's Pixel Data may be compressed" in values(failed, PRIVATE_REASON)[0]
    assert archive.counts()["instances"] == 0
    assert post(client, [metadata_part([obj]), *all_frames]).status_code == 200


def test_a_long_uid_is_not_shortened_into_a_valid_one(client: TestClient) -> None:
    long_uid = "1.2." + "3" * 70  # its first 64 characters would be a valid UID
    obj = as_json(make_dataset(SOPInstanceUID=long_uid), "u", [])
    response = post(client, [metadata_part([obj])])
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert values(failed, SOP_INSTANCE) == []


@pytest.mark.parametrize(
    ("depth", "reason"),
    [(50, "nested deeper than"), (3000, "not DICOM JSON")],
)
def test_deeply_nested_sequences_fail_with_a_reason(
    client: TestClient, archive: Archive, depth: int, reason: str
) -> None:
    """Ingest's nesting limit refuses what pydicom can build; JSON nested beyond what the
    parser can follow is refused as such; either way the server answers."""
    bulk: list[Part] = []
    head = json.dumps(as_json(make_dataset(), "u", bulk))[:-1]
    leaf = '{"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A"}]}}'
    nested = (
        '{"vr": "SQ", "Value": [{"00081115": ' * (depth - 1)
        + '{"vr": "SQ", "Value": ['
        + leaf
        + "]}"
        + "}]}" * (depth - 1)
    )
    text = f'[{head}, "00081115": {nested}}}]'
    response = post(client, [({"Content-Type": "application/dicom+json"}, text.encode()), *bulk])
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert reason in values(failed, PRIVATE_REASON)[0]
    assert archive.counts()["instances"] == 0


@pytest.mark.parametrize(
    "attribute",
    [
        ("00100010", {"vr": "PN", "Value": "not a list"}),
        ("00100010", {"vr": "PN", "Value": [{"Alphabetic": 5}]}),
        ("00091010", {"vr": "OB", "InlineBinary": "not base64 ==="}),
        ("00420011", {"vr": "OB", "BulkDataURI": 7}),
        ("00100020", {"vr": "XX", "Value": ["1"]}),
        ("zz", {"vr": "LO", "Value": ["1"]}),
        ("00100010", "not an attribute"),
    ],
)
def test_hostile_attribute_fails_the_instance_not_the_server(
    client: TestClient, archive: Archive, attribute: tuple[str, Any]
) -> None:
    bulk: list[Part] = []
    obj = as_json(make_dataset(), "u", bulk)
    obj[attribute[0]] = attribute[1]
    response = post(client, [metadata_part([obj]), *bulk])
    assert response.status_code == 409, response.text
    (failed,) = response.json()[FAILED]["Value"]
    assert values(failed, FAILURE_REASON)[0] >> 12 in (0xA, 0xC)
    assert values(failed, PRIVATE_REASON)[0]
    assert archive.counts()["instances"] == 0
    # the server goes on: the same instance without the attribute is stored
    del obj[attribute[0]]
    assert post(client, [metadata_part([obj]), *bulk]).status_code == 200
