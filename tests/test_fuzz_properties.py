"""Property-based tests (hypothesis) of the ingest parser and the multipart reader.

(a) Data sets generated with pydicom (random elements and VRs, private blocks, nested
    sequences of defined and undefined length, encapsulated pixel data) scan without error in
    every transfer syntax, and :func:`~stockade.dicom.parse.scan` finds the top-level tags and
    value offsets that pydicom's own reader finds.
(b) Mutations of valid files (bit flips, truncation, length fields set to 0xFFFFFFF0 or
    0xFFFFFFFF, insertions, deletions) make the parser and the whole ingest pipeline either
    succeed or raise a :class:`~stockade.errors.StockadeError`, with bounded memory.
(c) Multipart bodies with random boundaries, parts, padding and chunkings parse to the parts
    they were built from whatever the chunk sizes; mutated bodies fail only with the reader's
    declared errors, the same way for every chunking.

Runs are reproducible (``derandomize=True``, no example database) and short.
"""

from __future__ import annotations

import io
import itertools
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary  # type: ignore[attr-defined]
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from stockade.archive import Archive
from stockade.audit.sink import MemoryAuditSink
from stockade.dicom.attributes import WANTED_TAGS, extract
from stockade.dicom.parse import Limits, scan
from stockade.dicom.part10 import classify_preamble, read_part10
from stockade.dicom.tables import TRANSFER_SYNTAX_BY_UID
from stockade.errors import ObjectTooLarge, StockadeError
from stockade.index.sql import SqlIndex
from stockade.ingest import Origin
from stockade.settings import load
from stockade.storage.filesystem import FilesystemBlobStore
from stockade.web.multipart import MalformedMultipart, MultipartParser, Part
from tests.dicomfactory import make_dataset, part10

SEEDS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "ingest"
QUICK = settings(
    database=None,
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
IMPORT = Origin(via="import")

# -- (a) generated data sets -------------------------------------------------------------

#: VRs generated, with a few standard tags of each (single VR, not retired, not group 0002).
_VRS = tuple(
    vr.decode()
    for vr in b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)


def _tags_by_vr() -> dict[str, list[int]]:
    out: dict[str, list[int]] = {vr: [] for vr in _VRS}
    for tag, (vr, _vm, _name, retired, keyword) in sorted(DicomDictionary.items()):
        group = tag >> 16
        usable = vr in out and not retired and keyword and group not in (2, 0xFFFE, 0x7FE0)
        if usable and len(out[vr]) < 4 and tag != 0x00080005:  # not Specific Character Set
            out[vr].append(tag)
    return {vr: tags for vr, tags in out.items() if tags}


TAGS_BY_VR = _tags_by_vr()
_LONG_VRS = frozenset(
    ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_TEXT = st.text(alphabet="ABCXYZabc0123 ^=-._", max_size=24)
_DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=8)


def _value(vr: str) -> st.SearchStrategy[object]:
    """A strategy for values pydicom can write for *vr* (content is not what is tested)."""
    if vr in ("OB", "UN"):
        return st.binary(max_size=300)
    if vr in ("OW", "OF", "OL", "OD", "OV"):
        width = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}[vr]
        return st.binary(max_size=40).map(lambda b: b[: len(b) - len(b) % width])
    if vr in ("US", "SS", "UL", "SL", "SV", "UV"):
        lo, hi = {
            "US": (0, 0xFFFF),
            "SS": (-0x8000, 0x7FFF),
            "UL": (0, 0xFFFFFFFF),
            "SL": (-(2**31), 2**31 - 1),
            "SV": (-(2**63), 2**63 - 1),
            "UV": (0, 2**64 - 1),
        }[vr]
        return st.lists(st.integers(lo, hi), min_size=1, max_size=4)
    if vr in ("FL", "FD"):
        return st.lists(st.floats(-1e6, 1e6, width=32 if vr == "FL" else 64), max_size=3)
    if vr == "AT":
        return st.integers(0, 0xFFFFFFFF)
    if vr == "UI":
        return st.lists(_DIGITS, min_size=2, max_size=6).map(lambda p: "1." + ".".join(p))
    if vr in ("IS", "DS"):
        return st.integers(-99999, 99999).map(str)
    if vr == "DA":
        return st.just("20240131")
    if vr == "TM":
        return st.just("120000.5")
    if vr in {"LT", "UT", "ST", "UC"}:
        return st.text(alphabet="ABCXYZ abc\r\n\\0123", max_size=600)
    return _TEXT


@st.composite
def datasets(draw: st.DrawFn, depth: int = 0) -> Dataset:
    """A pydicom data set of random elements, maybe private ones and nested sequences."""
    vrs = [vr for vr in TAGS_BY_VR if vr != "SQ" or depth < 3]
    kinds = st.sampled_from(vrs) | st.just("SQ") if depth < 3 else st.sampled_from(vrs)
    chosen = draw(st.lists(kinds, max_size=8 if depth == 0 else 4))
    ds = Dataset()
    for vr in chosen:
        tag = draw(st.sampled_from(TAGS_BY_VR[vr]))
        if vr == "SQ":
            items = draw(st.lists(datasets(depth + 1), max_size=3))
            for item in items:
                item.is_undefined_length_sequence_item = draw(st.booleans())
            elem = DataElement(tag, "SQ", Sequence(items))
            elem.is_undefined_length = draw(st.booleans())
            ds[tag] = elem
        else:
            ds[tag] = DataElement(tag, vr, draw(_value(vr)))
    if draw(st.booleans()):
        block = ds.private_block(0x0009 + 2 * depth, "STOCKADE TEST", create=True)
        for offset, vr in enumerate(
            draw(st.lists(st.sampled_from(["OB", "LO", "UL"]), max_size=3))
        ):
            block.add_new(offset, vr, draw(_value(vr)))
    return ds


def _encode(ds: Dataset, *, implicit: bool, little: bool) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR = implicit
    out.is_little_endian = little
    write_dataset(out, ds)
    return bytes(out.getvalue())


ENCODINGS = {
    ImplicitVRLittleEndian: (True, True),
    ExplicitVRLittleEndian: (False, True),
    ExplicitVRBigEndian: (False, False),
    DeflatedExplicitVRLittleEndian: (False, True),
}


@QUICK
@given(ds=datasets(), pixels=st.lists(st.binary(min_size=2, max_size=20), max_size=3))
def test_scan_agrees_with_pydicom_in_every_transfer_syntax(
    ds: Dataset, pixels: list[bytes]
) -> None:
    for ts_uid, (implicit, little) in ENCODINGS.items():
        copy = deepcopy(ds)
        if pixels and little and not implicit:  # encapsulated: explicit VR LE (PS3.5 A.4)
            copy[0x7FE00010] = DataElement(
                0x7FE00010, "OB", encapsulate(pixels), is_undefined_length=True
            )
        raw = _encode(copy, implicit=implicit, little=little)
        if ts_uid == DeflatedExplicitVRLittleEndian:
            deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            wire = deflater.compress(raw) + deflater.flush()
            raw = zlib.decompress(wire, -zlib.MAX_WBITS)  # scan sees the inflated data set
        if not raw:
            continue
        expected = list(data_element_generator(io.BytesIO(raw), implicit, little))
        tags = frozenset(elem.tag for elem in expected)
        found = scan(raw, implicit_vr=implicit, little_endian=little, wanted=tags, limits=Limits())
        assert found.end == len(raw)
        assert set(found.values) == tags
        assert found.last_tag == max(tags)
        for elem in expected:
            vr, start, end = found.values[elem.tag]
            if not isinstance(elem, RawDataElement):  # a sequence pydicom read whole
                assert vr == "SQ"
                continue
            assert start == elem.value_tell, (ts_uid, hex(elem.tag))
            if elem.length != 0xFFFFFFFF:
                assert end == start + elem.length, (ts_uid, hex(elem.tag))
        # Elements tile the buffer: each value ends where the next element's header starts.
        ordered = sorted(found.values.items())
        for (_tag, (_vr, _start, end)), (_next, (nvr, nstart, _nend)) in itertools.pairwise(
            ordered
        ):
            long_header = not implicit and nvr in _LONG_VRS  # PS3.5 Table 7.1-1
            assert nstart - end == (12 if long_header else 8)


# -- (b) mutated files ---------------------------------------------------------------------

_VR_BYTES = frozenset(v.encode() for v in _VRS)


def _length_fields(data: bytes) -> list[int]:
    """Offsets that are probably length fields (after an explicit VR, or implicit)."""
    out = []
    for i in range(132, len(data) - 6):
        if data[i : i + 2] in _VR_BYTES:
            out += [i + 2, i + 4]
    return out or [0]


@st.composite
def mutated(draw: st.DrawFn, base: list[bytes]) -> bytes:
    """One of *base*, with 1 to 4 mutations."""
    data = bytearray(draw(st.sampled_from(base)))
    fields = _length_fields(bytes(data))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "length", "truncate", "insert", "delete", "set"]))
        size = len(data)
        if size == 0:
            break
        pos = draw(st.integers(0, size - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "length":
            at = min(draw(st.sampled_from(fields)), max(size - 4, 0))
            value = draw(st.sampled_from([0xFFFFFFF0, 0xFFFFFFFF, 0xFFFF, 0, 0x7FFFFFF0]))
            width = draw(st.sampled_from([2, 4]))
            data[at : at + width] = value.to_bytes(4, "little")[:width]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            data[pos : pos + 4] = draw(st.sampled_from([b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"]))
    return bytes(data)


def _base_files() -> list[bytes]:
    files = [p.read_bytes() for p in sorted(SEEDS.glob("*.dcm")) if p.stat().st_size < 3000]
    ds = make_dataset()
    files += [part10(ds, ts=ts) for ts in ENCODINGS]
    return files


BASE_FILES = _base_files()


@pytest.fixture(scope="module")
def fuzz_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """One SQLite archive shared by every example of a property."""
    folder = tmp_path_factory.mktemp("fuzz-archive")
    cfg = load(
        environ={},
        overrides={
            "data_dir": str(folder / "data"),
            "database_url": f"sqlite:///{folder / 'index.sqlite3'}",
        },
    )
    arch = Archive(
        cfg, FilesystemBlobStore(cfg.data_dir), SqlIndex(cfg.index_url), MemoryAuditSink()
    )
    arch.prepare()
    try:
        yield arch
    finally:
        arch.close()


def _allowed(call: Callable[[], object]) -> None:
    """Run *call*; a StockadeError is an allowed answer, anything else fails the test."""
    try:
        call()
    except StockadeError:
        pass


def _parse_layers(data: bytes) -> None:
    classify_preamble(data[:128])
    meta = read_part10(data)
    ts = TRANSFER_SYNTAX_BY_UID.get(meta.transfer_syntax)
    if ts is None or ts.deflated:
        return
    found = scan(
        data,
        implicit_vr=ts.implicit_vr,
        little_endian=ts.little_endian,
        wanted=WANTED_TAGS,
        limits=Limits(),
        start=meta.dataset_offset,
    )
    assert meta.dataset_offset <= found.end <= len(data)
    extract(data, found.values, little_endian=ts.little_endian)


@settings(QUICK, max_examples=300)
@given(data=mutated(BASE_FILES))
def test_mutated_files_succeed_or_raise_stockade_errors(fuzz_archive: Archive, data: bytes) -> None:
    tracemalloc.start()
    try:
        _allowed(lambda: _parse_layers(data))
        _allowed(lambda: fuzz_archive.store_file(data, IMPORT))
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes traced for a {len(data)}-byte file"


def test_the_mutation_strategy_reaches_length_fields() -> None:
    data = BASE_FILES[0]
    assert len(_length_fields(data)) > 10


# -- (c) multipart bodies ------------------------------------------------------------------

BOUNDARIES = st.from_regex(
    r"[0-9A-Za-z'()+_,\-./:=? ]{0,20}[0-9A-Za-z'()+_,\-./:=?]", fullmatch=True
)
_HEADERS = st.sampled_from(
    [
        b"",
        b"Content-Type: application/dicom\r\n",
        b"content-type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n",
        b"Content-Type: application/json\r\nContent-Location: x\r\n",
        b"Content-Type: application/dicom;\r\n\tfolded=yes\r\n",
    ]
)
_PIECES = st.sampled_from([b"\r\n", b"--", b"\r", b"\n", b"-", b"x", b"\x00", b"\r\n--"])
MAX_HEADER = 96


def _header_map(block: bytes) -> dict[str, str]:
    text = block.decode("latin-1").replace("\r\n\t", " ")
    out = {}
    for line in text.split("\r\n"):
        if line:
            name, _colon, value = line.partition(":")
            out[name.strip().lower()] = value.strip()
    return out


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[dict[str, str], bytes]], int]:
    """(boundary, body, expected parts, padding length) of a well-formed multipart body."""
    boundary = draw(BOUNDARIES).encode()
    delimiter = b"\r\n--" + boundary
    parts = []
    body = bytearray()
    if draw(st.booleans()):
        body += draw(st.binary(max_size=20)).replace(b"--", b"") + b"\r\n"
    widest_padding = 0
    for _ in range(draw(st.integers(1, 4))):
        headers = draw(_HEADERS)
        content = b"".join(draw(st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=12)))
        content += boundary[: draw(st.integers(0, len(boundary)))]
        if (b"\r\n" + content + delimiter).find(delimiter) != len(content) + 2:
            # It holds the delimiter: without CR and "-" no part of it can start one.
            content = content.replace(b"-", b"_").replace(b"\r", b"_")
        padding = draw(st.sampled_from([b"", b" ", b"\t \t", b" " * (MAX_HEADER + 3)]))
        widest_padding = max(widest_padding, len(padding))
        body += b"--" + boundary + padding + b"\r\n" + headers + b"\r\n" + content + b"\r\n"
        parts.append((_header_map(headers), content))
    body += b"--" + boundary + b"--" + draw(st.sampled_from([b"", b"\r\n", b"epilogue\r\n--"]))
    return boundary, bytes(body), parts, widest_padding


def _feed(boundary: bytes, chunks: list[bytes], **limits: int) -> list[Part] | str:
    parser = MultipartParser(
        boundary,
        max_part_size=limits.get("max_part_size", 1 << 20),
        max_header_size=limits.get("max_header_size", MAX_HEADER),
        max_parts=limits.get("max_parts", 100),
    )
    out: list[Part] = []
    try:
        for chunk in chunks:
            out += parser.feed(chunk)
            # Memory: between chunks the parser holds at most one header block or delimiter.
            assert len(parser._buf) <= MAX_HEADER + len(boundary) + 8 + len(chunk)
        parser.close()
    except (MalformedMultipart, ObjectTooLarge) as exc:
        return type(exc).__name__
    return out


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({min(p, len(data)) for p in points})
    return [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]


@settings(QUICK, max_examples=300)
@given(case=bodies(), points=st.lists(st.integers(0, 2000), max_size=12))
def test_multipart_parts_do_not_depend_on_chunking(
    case: tuple[bytes, bytes, list[tuple[dict[str, str], bytes]], int], points: list[int]
) -> None:
    boundary, body, parts, padding = case
    whole = _feed(boundary, [body])
    assert _same(whole, _feed(boundary, _cut(body, points)))
    assert _same(whole, _feed(boundary, [body[i : i + 1] for i in range(len(body))]))
    if padding > MAX_HEADER:  # transport padding is bounded like a header block
        assert whole == "MalformedMultipart"
        return
    assert isinstance(whole, list)
    assert [(p.headers, bytes(p.body)) for p in whole] == parts


def _same(a: list[Part] | str, b: list[Part] | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return [(p.headers, bytes(p.body), p.size, p.too_large) for p in a] == [
        (p.headers, bytes(p.body), p.size, p.too_large) for p in b
    ]


@settings(QUICK, max_examples=300)
@given(
    case=bodies(),
    edits=st.lists(
        st.tuples(st.integers(0, 4000), st.binary(max_size=6), st.integers(0, 6)),
        min_size=1,
        max_size=4,
    ),
    points=st.lists(st.integers(0, 2000), max_size=8),
    small=st.booleans(),
)
def test_mutated_multipart_fails_only_with_declared_errors(
    case: tuple[bytes, bytes, list[tuple[dict[str, str], bytes]], int],
    edits: list[tuple[int, bytes, int]],
    points: list[int],
    small: bool,
) -> None:
    boundary, body, _parts, _padding = case
    data = bytearray(body)
    for pos, insert, drop in edits:
        at = pos % (len(data) + 1)
        data[at : at + drop] = insert
    limits = {"max_part_size": 16, "max_parts": 2} if small else {}
    whole = _feed(boundary, [bytes(data)], **limits)
    chunked = _feed(boundary, _cut(bytes(data), points), **limits)
    assert _same(whole, chunked)
    if isinstance(whole, list):
        for part in whole:
            assert len(part.body) <= limits.get("max_part_size", 1 << 20)
