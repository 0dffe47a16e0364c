"""DICOM XML (PS3.19 A.1 Native DICOM Model) answers of QIDO-RS and WADO-RS metadata."""

from __future__ import annotations

import email.parser
import email.policy
import io
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from typing import Any

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.uid import generate_uid
from starlette.exceptions import StarletteDeprecationWarning

from stockade.archive import Archive
from stockade.ingest import Origin
from stockade.web import dicomxml, metadata
from stockade.web.app import MEDIA_TYPES, create_app
from stockade.web.dicomxml import MULTIPART_XML, VRS, negotiate, to_xml
from stockade.web.wado import parse_accept
from tests.conftest import authed
from tests.dicomfactory import make_dataset, part10

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

XML_ACCEPT = 'multipart/related; type="application/dicom+xml"'
#: Values an attacker would choose: markup, entities, CDATA ends, line ends, quotes.
HOSTILE = [
    "<script>alert(1)</script>",
    "a & b &amp; c &#0; &lt;",
    "]]> <![CDATA[ x ]]>",
    "<!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>&e;",
    "<?xml version='1.0'?> <!-- -->",
    "line 1\r\nline 2\rline 3\nline 4\ttab",
    "  leading and trailing  ",
    "\"double\" 'single' `back`",
    "山田^太郎 𝄞 \u00e9\u0301 \u2028 \ufeff",
]
COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


# -- reading the documents back --------------------------------------------------------------


def parse(body: bytes) -> ET.Element:
    """Parse one document, checking the declaration and the encoding."""
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    body.decode("utf-8")
    return ET.fromstring(body)  # noqa: S314 - our own output, checked in a test


def person_name_of(node: ET.Element) -> dict[str, str]:
    out = {}
    for group in node:
        found = {c.tag: c.text or "" for c in group}
        out[group.tag] = "^".join(found.get(c, "") for c in COMPONENTS).rstrip("^")
    return out


def json_of(dataset: ET.Element) -> dict[str, Any]:
    """A data set (root or Item) read back as DICOM JSON, every Value as text."""
    out: dict[str, Any] = {}
    for attr in dataset:
        assert attr.tag == "DicomAttribute"
        entry: dict[str, Any] = {"vr": attr.get("vr")}
        children = list(attr)
        kinds = {c.tag for c in children}
        if kinds == {"BulkData"}:
            entry["BulkDataURI"] = children[0].get("uri")
        elif kinds == {"InlineBinary"}:
            entry["InlineBinary"] = children[0].text or ""
        elif kinds == {"Item"}:
            entry["Value"] = [json_of(item) for item in children]
        elif kinds == {"PersonName"}:
            entry["Value"] = [person_name_of(c) if len(c) else None for c in children]
        elif kinds == {"Value"}:
            entry["Value"] = [c.text if c.text is not None else None for c in children]
        else:
            assert not children, kinds
        out[attr.get("tag", "")] = entry
    return out


def as_text(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """*dataset* (DICOM JSON) as :func:`json_of` reads it back: numbers as text, no Group
    Length, empty PN groups and trailing empty components left out."""
    out: dict[str, Any] = {}
    for key, attr in dataset.items():
        if key.endswith("0000"):
            continue
        entry = {k: v for k, v in attr.items() if k != "Value"}
        values = attr.get("Value")
        if values:
            if attr["vr"] == "SQ":
                entry["Value"] = [as_text(item or {}) for item in values]
            elif attr["vr"] == "PN":
                entry["Value"] = [
                    {g: n.rstrip("^") for g, n in v.items() if n} if v else None for v in values
                ]
                entry["Value"] = [v or None for v in entry["Value"]]
            else:
                entry["Value"] = [
                    None if v is None else v if isinstance(v, str) else repr(v) for v in values
                ]
        out[key.upper()] = entry
    return out


def check_native_model(root: ET.Element) -> None:
    """What the PS3.19 A.1.6 schema asks of a document, checked by hand."""
    assert root.tag == "NativeDicomModel"
    assert root.attrib == {"{http://www.w3.org/XML/1998/namespace}space": "preserve"}
    assert root.text is None or not root.text.strip()

    def numbered(nodes: list[ET.Element]) -> None:
        assert [n.get("number") for n in nodes] == [str(i) for i in range(1, len(nodes) + 1)]

    def dataset(node: ET.Element) -> None:
        tags = []
        for attr in node:
            assert attr.tag == "DicomAttribute"
            assert set(attr.attrib) <= {"tag", "vr", "keyword", "privateCreator"}
            tag = attr.get("tag", "")
            assert re.fullmatch(r"[0-9A-F]{8}", tag)
            assert not tag.endswith("0000")  # no Group Length (A.1.1)
            assert attr.get("vr") in VRS
            tags.append(int(tag, 16))
            keyword = attr.get("keyword")
            if keyword is not None:
                assert keyword == keyword_for_tag(int(tag, 16))
            children = list(attr)
            kinds = [c.tag for c in children]
            assert len(set(kinds)) <= 1, kinds
            if not kinds:
                continue
            kind = kinds[0]
            assert kind in ("BulkData", "Value", "Item", "PersonName", "InlineBinary")
            if kind in ("BulkData", "InlineBinary"):
                assert len(children) == 1
                assert set(children[0].attrib) <= {"uri", "uuid"}
                continue
            numbered(children)
            for child in children:
                if kind == "Item":
                    dataset(child)
                elif kind == "PersonName":
                    groups = [g.tag for g in child]
                    assert groups == [g for g in GROUPS if g in groups]
                    for group in child:
                        names = [c.tag for c in group]
                        assert names == [c for c in COMPONENTS if c in names]
                        assert all(len(c) == 0 and c.text for c in group)
                else:
                    assert len(child) == 0
        assert tags == sorted(tags) and len(tags) == len(set(tags))

    dataset(root)


# -- conversion ------------------------------------------------------------------------------


def every_vr() -> dict[str, Any]:
    bulk = "http://host:8080/dicomweb/studies/1/series/2/instances/3/bulkdata/7FE00010"
    return {
        "00080000": {"vr": "UL", "Value": [120]},  # Group Length: left out
        "00080005": {"vr": "CS", "Value": ["ISO_IR 192"]},
        "00080020": {"vr": "DA", "Value": ["20240131"]},
        "00080030": {"vr": "TM", "Value": ["101500.25"]},
        "0008002A": {"vr": "DT", "Value": ["20240131101500+0100"]},
        "00080054": {"vr": "AE", "Value": ["STOCKADE", "OTHER"]},
        "00080060": {"vr": "CS", "Value": ["CT", None, "MR"]},
        "00080090": {"vr": "PN"},
        "00081190": {"vr": "UR", "Value": ["http://host/dicomweb/studies/1?a=1&b=<2>"]},
        "00082218": {
            "vr": "SQ",
            "Value": [
                {
                    "00080100": {"vr": "SH", "Value": ["T-D0050"]},
                    "00080104": {"vr": "LO", "Value": ["Tissue"]},
                    "0040A730": {
                        "vr": "SQ",
                        "Value": [
                            {"0040A160": {"vr": "UT", "Value": [HOSTILE[0]]}},
                            {},
                        ],
                    },
                },
                {},
            ],
        },
        "00091010": {"vr": "LO", "Value": ["no creator in this data set"]},
        "00100010": {
            "vr": "PN",
            "Value": [
                {
                    "Alphabetic": "Yamada^Tarou^^Dr^Jr",
                    "Ideographic": "山田^太郎",
                    "Phonetic": "やまだ^たろう",
                },
                {"Alphabetic": "Doe^Jane"},
                None,
            ],
        },
        "00100020": {"vr": "LO", "Value": HOSTILE[:5]},
        "00101010": {"vr": "AS", "Value": ["042Y"]},
        "00101030": {"vr": "DS", "Value": [72.5, 80, 1e-05]},
        "00181050": {"vr": "DS"},
        "00200013": {"vr": "IS", "Value": [7]},
        "0020000D": {"vr": "UI", "Value": ["1.2.840.10008.1.2.3"]},
        "00209165": {"vr": "AT", "Value": ["00100010", "7FE00010"]},
        "00280010": {"vr": "US", "Value": [512]},
        "00280106": {"vr": "SS", "Value": [-1024]},
        "00286120": {"vr": "SS", "Value": [-2]},
        "00189219": {"vr": "FD", "Value": [0.1, -2.5e300]},
        "00189218": {"vr": "FL", "Value": [1.5]},
        "00189327": {"vr": "FD", "Value": []},
        "00211010": {"vr": "SL", "Value": [-2147483648]},
        "00211011": {"vr": "UL", "Value": [4294967295]},
        "00211012": {"vr": "SV", "Value": [-(2**63)]},
        "00211013": {"vr": "UV", "Value": [2**64 - 1]},
        "00210010": {"vr": "LO", "Value": ["ACME <&> 1.0"]},
        "00211014": {"vr": "OB", "InlineBinary": "AAECAw=="},
        "00211015": {"vr": "UN", "InlineBinary": ""},
        "00211016": {"vr": "OB or OW", "BulkDataURI": bulk + '/x?a="1"&b=<2>\t\n\r'},
        "00204000": {"vr": "LT", "Value": [HOSTILE[5]]},
        "00321060": {"vr": "LO", "Value": [HOSTILE[8]]},
        "00400254": {"vr": "ST", "Value": [HOSTILE[6]]},
        "00400280": {"vr": "ST", "Value": [HOSTILE[7]]},
        "00081030": {"vr": "LO", "Value": ["Knee"]},
        "00080119": {"vr": "UC", "Value": ["long code value"]},
        "0010ABCD": {"vr": "UN"},
        "7FE00010": {"vr": "OW", "BulkDataURI": bulk},
    }


def test_every_vr_round_trips_through_an_xml_parser() -> None:
    source = every_vr()
    document = to_xml(source)
    assert document.replaced == 0
    root = parse(document.body)
    check_native_model(root)
    expected = as_text(source)
    expected["00211016"]["vr"] = "UN"  # pydicom's undecided VR is written UN
    got = json_of(root)
    assert got == expected
    assert list(got) == sorted(got, key=lambda t: int(t, 16))
    assert "00080000" not in got


def test_attributes_keywords_and_private_creators() -> None:
    assert keyword_for_tag(0x0010ABCD) == ""  # the precondition of this test
    root = parse(to_xml(every_vr()).body)
    by_tag = {a.get("tag"): a for a in root}
    assert by_tag["00100010"].attrib == {"tag": "00100010", "vr": "PN", "keyword": "PatientName"}
    assert by_tag["7FE00010"].get("keyword") == "PixelData"
    assert by_tag["0010ABCD"].attrib == {"tag": "0010ABCD", "vr": "UN"}
    # private: no keyword; the creator of block 10 of group 0021 is in the data set
    assert by_tag["00211014"].attrib == {
        "tag": "00211014",
        "vr": "OB",
        "privateCreator": "ACME <&> 1.0",
    }
    assert by_tag["00210010"].attrib == {"tag": "00210010", "vr": "LO"}  # the creator itself
    assert by_tag["00091010"].attrib == {"tag": "00091010", "vr": "LO"}  # no creator known
    # inside a sequence item, the creator is looked up in that item
    item = {"00290010": {"vr": "LO", "Value": ["VENDOR"]}, "00291001": {"vr": "US"}}
    nested = parse(to_xml({"00082218": {"vr": "SQ", "Value": [item]}}).body)
    attr = nested.find("DicomAttribute/Item/DicomAttribute[@tag='00291001']")
    assert attr is not None and attr.attrib == {
        "tag": "00291001",
        "vr": "US",
        "privateCreator": "VENDOR",
    }


def test_person_names_three_groups_and_components() -> None:
    root = parse(to_xml(every_vr()).body)
    [pn] = [a for a in root if a.get("tag") == "00100010"]
    first, second, empty = list(pn)
    assert [g.tag for g in first] == ["Alphabetic", "Ideographic", "Phonetic"]
    alphabetic = {c.tag: c.text for c in first.find("Alphabetic") or ()}
    assert alphabetic == {
        "FamilyName": "Yamada",
        "GivenName": "Tarou",
        "NamePrefix": "Dr",
        "NameSuffix": "Jr",
    }
    ideographic = first.find("Ideographic")
    assert ideographic is not None
    assert [(c.tag, c.text) for c in ideographic] == [
        ("FamilyName", "山田"),
        ("GivenName", "太郎"),
    ]
    assert [g.tag for g in second] == ["Alphabetic"]
    assert (empty.get("number"), len(empty)) == ("3", 0)
    # more than five components (not valid PN) are kept in NameSuffix
    many = parse(to_xml({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "a^b^c^d^e^f"}]}}).body)
    suffix = many.find("DicomAttribute/PersonName/Alphabetic/NameSuffix")
    assert suffix is not None and suffix.text == "e^f"


def test_empty_values_sequences_and_bulk_data() -> None:
    root = parse(to_xml(every_vr()).body)
    by_tag = {a.get("tag"): a for a in root}
    for tag in ("00080090", "00181050", "00189327", "0010ABCD"):
        assert len(by_tag[tag]) == 0, tag
    values = by_tag["00080060"].findall("Value")
    assert [(v.get("number"), v.text) for v in values] == [("1", "CT"), ("2", None), ("3", "MR")]
    items = by_tag["00082218"].findall("Item")
    assert [i.get("number") for i in items] == ["1", "2"] and len(items[1]) == 0
    inner = items[0].find("DicomAttribute[@tag='0040A730']")
    assert inner is not None and [len(i) for i in inner.findall("Item")] == [1, 0]
    text = inner.find("Item/DicomAttribute/Value")
    assert text is not None and text.text == HOSTILE[0]
    bulk = by_tag["7FE00010"].find("BulkData")
    assert bulk is not None and bulk.get("uri", "").endswith("/bulkdata/7FE00010")
    inline = by_tag["00211014"].find("InlineBinary")
    assert inline is not None and inline.text == "AAECAw=="


def test_hostile_text_is_escaped_never_markup() -> None:
    body = to_xml({"00100020": {"vr": "LO", "Value": HOSTILE}}).body
    assert b"<script>" not in body and b"]]>" not in body and b"<!DOCTYPE" not in body
    assert b"\r" not in body  # written as &#13;, which a parser keeps
    values = [v.text for v in parse(body).iter("Value")]
    assert values == HOSTILE


def test_characters_xml_cannot_carry_are_replaced_and_counted() -> None:
    value = "form\x0cfeed esc\x1b$B nul\x00 surrogate\ud800 \ufffe\uffff end"
    source = {
        "00204000": {"vr": "LT", "Value": [value]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe\x01^Jane"}]},
        "00090010": {"vr": "LO", "Value": ["CREATOR\x02"]},
        "00091001": {"vr": "OB", "BulkDataURI": "http://h/x\x7f\x08"},
    }
    document = to_xml(source)
    assert document.replaced == 6 + 1 + 2 + 1  # the creator twice: Value, privateCreator
    root = parse(document.body)
    check_native_model(root)
    comments = root.find("DicomAttribute[@tag='00204000']/Value")
    assert comments is not None
    assert comments.text == re.sub("[\x00\x0c\x1b\ud800\ufffe\uffff]", "\ufffd", value)
    family = root.find("DicomAttribute/PersonName/Alphabetic/FamilyName")
    assert family is not None and family.text == "Doe\ufffd"
    private = root.find("DicomAttribute[@tag='00091001']")
    assert private is not None and private.get("privateCreator") == "CREATOR\ufffd"
    bulk = private.find("BulkData")
    assert bulk is not None and bulk.get("uri") == "http://h/x\x7f\ufffd"  # DEL is allowed
    assert "U+FFFD" in dicomxml.replaced_warning(3)


def test_what_is_not_dicom_json_is_refused() -> None:
    for bad in (
        {"0010001": {"vr": "LO"}},
        {"patient": {"vr": "LO"}},
        {"00100010": "Doe"},
        {"00100020": {"vr": "LO", "Value": "P1"}},
        {"00082218": {"vr": "SQ", "Value": ["not an item"]}},
    ):
        with pytest.raises(ValueError, match=r"DICOM JSON|array|item"):
            to_xml(bad)


def test_negotiation() -> None:
    json_type = "application/dicom+json"
    for accept, expected in (
        (None, json_type),
        ("*/*", json_type),
        ("application/json", json_type),
        ("application/*", json_type),
        ("application/dicom+json", json_type),
        ("text/html,application/xhtml+xml,*/*;q=0.8", json_type),
        (XML_ACCEPT, MULTIPART_XML),
        ("multipart/related; type=application/dicom+xml", MULTIPART_XML),
        ("multipart/related", MULTIPART_XML),
        ("multipart/*", MULTIPART_XML),
        ("application/dicom+xml", MULTIPART_XML),
        (f"application/dicom+json; q=0.5, {XML_ACCEPT}", MULTIPART_XML),
        (f"{XML_ACCEPT}; q=0.5, application/dicom+json", json_type),
        ('multipart/related; type="application/dicom", */*;q=0.1', json_type),
        ('multipart/related; type="application/dicom"', None),
        ("application/dicom", None),
        ("text/html", None),
        (f"{XML_ACCEPT}; q=0", None),
    ):
        assert negotiate(parse_accept(accept)) == expected, accept
    assert MULTIPART_XML in MEDIA_TYPES["QIDO-RS"] and MULTIPART_XML in MEDIA_TYPES["WADO-RS"]


def test_multipart_body_is_well_formed() -> None:
    documents = [to_xml({"00100020": {"vr": "LO", "Value": [h]}}).body for h in HOSTILE[:3]]
    content_type, body = dicomxml.multipart(documents)
    assert content_type.startswith(MULTIPART_XML + "; boundary=")
    assert [p for _, p in split_parts(content_type, body)] == documents
    with pytest.raises(ValueError, match="at least one part"):
        dicomxml.multipart([])


# -- through the application -----------------------------------------------------------------


def split_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Type, body) of each part, by the standard library's MIME parser."""
    raw = f"Content-Type: {content_type}\r\n\r\n".encode() + body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart()
    out = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert int(part["Content-Length"]) == len(payload)
        out.append((part["Content-Type"], payload))
    return out


def xml_parts(response: Any) -> list[ET.Element]:
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    assert content_type.startswith(MULTIPART_XML + "; boundary=")
    roots = []
    for part_type, payload in split_parts(content_type, response.content):
        assert part_type == "application/dicom+xml"
        root = parse(payload)
        check_native_model(root)
        roots.append(root)
    return roots


@pytest.fixture
def client(archive: Archive) -> Iterator[TestClient]:
    with authed(TestClient(create_app(archive)), archive) as c:
        yield c


def store(archive: Archive, **overrides: Any) -> pydicom.Dataset:
    ds = make_dataset(**overrides)
    archive.store_file(part10(ds), Origin(via="import"))
    return ds


def test_qido_answers_one_native_model_per_match(client: TestClient, archive: Archive) -> None:
    study = generate_uid()
    for number in range(1, 4):
        store(
            archive,
            StudyInstanceUID=study,
            InstanceNumber=number,
            PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
            SpecificCharacterSet="ISO_IR 192",
            PatientID="A&B<C>]]>",
            StudyDescription='Study <1> & "all" ]]> O\'Brien',
        )
    path = f"/dicomweb/studies/{study}/instances"
    as_json = client.get(path, params={"includefield": "all"})
    assert as_json.headers["content-type"] == "application/dicom+json"
    for accept in (XML_ACCEPT, "multipart/related", "application/dicom+xml"):
        as_xml = client.get(path, params={"includefield": "all"}, headers={"Accept": accept})
        roots = xml_parts(as_xml)
        assert len(roots) == 3
        assert [json_of(r) for r in roots] == [as_text(o) for o in as_json.json()]
        assert "warning" not in as_xml.headers
    name = roots[2].find("DicomAttribute[@tag='00100010']/PersonName")
    assert name is not None and [g.tag for g in name] == ["Alphabetic", "Ideographic", "Phonetic"]

    # paging and its warning are unchanged
    page = client.get(path, params={"limit": "2"}, headers={"Accept": XML_ACCEPT})
    assert len(xml_parts(page)) == 2
    assert "additional results" in page.headers["warning"]
    # nothing matches: no part
    none = client.get(
        "/dicomweb/studies", params={"PatientID": "nobody"}, headers={"Accept": XML_ACCEPT}
    )
    assert (none.status_code, none.content) == (204, b"")
    # JSON stays the default, and what allows neither is 406
    assert client.get(path, headers={"Accept": "*/*"}).json() == client.get(path).json()
    refused = client.get(path, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert refused.status_code == 406
    assert refused.headers["content-type"] == "application/problem+json"
    assert "application/dicom+xml" in refused.json()["detail"]


def test_series_metadata_as_xml_from_the_cached_json(
    client: TestClient, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    item = pydicom.Dataset()
    item.CodeValue = "T-D0050"
    item.CodeMeaning = "Tissue <&>"
    item.add_new(0x00290010, "LO", "VENDOR 1")
    item.add_new(0x00291010, "OB", bytes(range(256)) * 8)  # bulk data inside an item
    first = store(
        archive,
        PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
        SpecificCharacterSet="ISO_IR 192",
        AnatomicRegionSequence=pydicom.Sequence([item]),
        ImageComments="line 1\r\nline 2 ]]> & <tag>",
    )
    second = store(
        archive,
        StudyInstanceUID=first.StudyInstanceUID,
        SeriesInstanceUID=first.SeriesInstanceUID,
        InstanceNumber=2,
    )
    calls: list[int] = []
    real = metadata.build

    def counting(retrieval: Any, instances: list[Any]) -> list[bytes | None]:
        calls.append(len(instances))
        return real(retrieval, instances)

    monkeypatch.setattr(metadata, "build", counting)
    series = f"/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/metadata"
    as_json = client.get(series).json()
    assert calls == [2]
    as_xml = client.get(series, headers={"Accept": XML_ACCEPT})
    assert calls == [2]  # converted from the cache: no file opened again
    roots = xml_parts(as_xml)
    assert "warning" not in as_xml.headers
    assert len(roots) == 2
    assert [json_of(r) for r in roots] == [as_text(o) for o in as_json]
    uids = [r.find("DicomAttribute[@tag='00080018']/Value") for r in roots]
    assert [u.text for u in uids if u is not None] == [first.SOPInstanceUID, second.SOPInstanceUID]
    # BulkDataURIs stay the absolute ones of the JSON answer, and answer
    pixel = roots[0].find("DicomAttribute[@tag='7FE00010']/BulkData")
    assert pixel is not None and pixel.get("uri") == as_json[0]["7FE00010"]["BulkDataURI"]
    assert pixel.get("uri", "").startswith("http://testserver/dicomweb/studies/")
    nested = roots[0].find("DicomAttribute[@tag='00082218']/Item/DicomAttribute[@tag='00291010']")
    assert nested is not None and nested.get("privateCreator") == "VENDOR 1"
    bulk = nested.find("BulkData")
    assert bulk is not None
    fetched = client.get(bulk.get("uri", ""))
    assert fetched.status_code == 200 and bytes(range(256)) * 8 in fetched.content
    comments = roots[0].find("DicomAttribute[@tag='00204000']/Value")
    assert comments is not None and comments.text == "line 1\r\nline 2 ]]> & <tag>"
    # the study and instance levels answer too; other media types are still 406
    study = series.split("/series/", maxsplit=1)[0] + "/metadata"
    assert len(xml_parts(client.get(study, headers={"Accept": XML_ACCEPT}))) == 2
    assert calls == [2]
    instance = series.removesuffix("/metadata") + f"/instances/{second.SOPInstanceUID}/metadata"
    assert len(xml_parts(client.get(instance, headers={"Accept": "multipart/*"}))) == 1
    assert client.get(series, headers={"Accept": "application/dicom"}).status_code == 406


def test_metadata_with_a_form_feed_is_replaced_with_a_warning(
    client: TestClient, archive: Archive
) -> None:
    ds = store(archive, ImageComments="page 1\x0cpage 2")
    path = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/metadata"
    )
    assert client.get(path).json()[0]["00204000"]["Value"] == ["page 1\x0cpage 2"]
    response = client.get(path, headers={"Accept": XML_ACCEPT})
    [root] = xml_parts(response)
    comments = root.find("DicomAttribute[@tag='00204000']/Value")
    assert comments is not None and comments.text == "page 1\ufffdpage 2"
    assert response.headers["warning"] == dicomxml.replaced_warning(1)
    assert '"1 character(s)' in response.headers["warning"]


def test_stored_file_round_trips_to_xml_values() -> None:
    """A data set pydicom writes as JSON converts with every value intact."""
    ds = make_dataset(PatientName="Doe^Jane^Q^Dr^III", ImageComments=HOSTILE[5])
    source = pydicom.dcmread(io.BytesIO(part10(ds))).to_json_dict(1024, 1024)
    root = parse(to_xml(source).body)
    check_native_model(root)
    assert json_of(root) == as_text(source)
