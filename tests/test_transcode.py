"""Transcoding on retrieve (stockade.dicom.transcode): PS3.5 section 10 and Annex A.

Every conversion is checked on content: the output is parsed back by pydicom under the target
transfer syntax, its pixels are compared with the source's (and, where pydicom's test data
holds the same image uncompressed, with that twin), and the attributes that must not change
are compared. Stored objects are built as Stockade stores them: a zero preamble, Stockade's
own File Meta Information, then the data set bytes as received.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import utils as pixel_utils
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.encoders.base import Encoder
from pydicom.tag import Tag

from stockade.dicom import transcode as tc
from stockade.dicom.parse import Limits, scan
from stockade.dicom.part10 import file_header, read_part10
from stockade.dicom.tables import TRANSFER_SYNTAX_BY_UID, TRANSFER_SYNTAXES
from stockade.errors import CannotTranscode
from tests.dicomfactory import make_dataset

ILE = "1.2.840.10008.1.2"
ELE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JLS = "1.2.840.10008.1.2.4.80"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE = "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"
UNCOMPRESSED = (ELE, ILE, DEFLATED)
LOSSLESS_TARGETS = (RLE, J2K_LOSSLESS, JLS)
BIG = 1 << 30
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

GPL_DECODERS = get_decoder(JPEG_LOSSLESS_SV1).is_available
needs_gpl_codecs = pytest.mark.skipif(
    not GPL_DECODERS, reason="pylibjpeg-libjpeg (gpl-codecs extra, in dev) is not installed"
)


# -- helpers ---------------------------------------------------------------------------------


def _path(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, f"{name} is not in pydicom's test data (is pydicom-data installed?)"
    return Path(str(found))


def _stored(name: str) -> bytes:
    """A pydicom test file as Stockade stores it: its data set bytes behind our File Meta."""
    raw = _path(name).read_bytes()
    info = read_part10(raw)
    assert info.media_sop_class_uid and info.media_sop_instance_uid
    header = file_header(
        info.media_sop_class_uid, info.media_sop_instance_uid, info.transfer_syntax, None
    )
    return header + raw[info.dataset_offset :]


def _encode(ds: Dataset, ts: str) -> bytes:
    """The data set alone encoded in *ts* (encapsulated pixel data must already be)."""
    syntax = TRANSFER_SYNTAX_BY_UID[ts]
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = syntax.implicit_vr
    write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax.deflated:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
        data += b"\x00" * (len(data) % 2)
    return data


def _stored_dataset(ds: Dataset, ts: str) -> bytes:
    return file_header(ds.SOPClassUID, ds.SOPInstanceUID, ts, None) + _encode(ds, ts)


def _parse(dataset: bytes, ts: str) -> FileDataset:
    """Read a transcoded data set back, behind a File Meta naming the target syntax."""
    return dcmread(io.BytesIO(file_header(SC_CLASS, "1.2.3.4", ts, None) + dataset))


def _pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    """The decoded pixels exactly as encoded (no colour conversion)."""
    options: dict[str, Any] = {"as_rgb": False}
    array, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, **options)
    return array


def _original(name: str) -> FileDataset:
    return dcmread(_path(name))


def _assert_same_identity(out: Dataset, source: Dataset) -> None:
    assert out.SOPInstanceUID == source.SOPInstanceUID
    assert out.SOPClassUID == source.SOPClassUID
    assert out.get("PatientName") == source.get("PatientName")
    assert out.get("PatientID") == source.get("PatientID")
    assert out.get("StudyInstanceUID") == source.get("StudyInstanceUID")
    assert out.get("LossyImageCompression") == source.get("LossyImageCompression")


def _assert_structure(dataset: bytes, ts: str) -> None:
    """Stockade's own bounded parser accepts the output as a data set in *ts*."""
    syntax = TRANSFER_SYNTAX_BY_UID[ts]
    if syntax.deflated:
        dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
    scan(
        dataset,
        implicit_vr=syntax.implicit_vr,
        little_endian=True,
        wanted=frozenset(),
        limits=Limits(max_depth=16, max_elements=100_000),
    )


class PixelsTouched(BaseException):
    """Raised by the no_decoding fixture; a BaseException so that no ``except`` swallows it."""


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any pixel decode or encode by pydicom fails the test."""
    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., None]:
        def call(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise PixelsTouched(name)

        return call

    for name in ("as_array", "iter_array", "as_buffer", "iter_buffer"):
        monkeypatch.setattr(Decoder, name, forbidden(f"Decoder.{name}"))
    for name in ("iter_encode", "encode"):
        monkeypatch.setattr(Encoder, name, forbidden(f"Encoder.{name}"))
    monkeypatch.setattr(pixel_utils, "decompress", forbidden("decompress"))
    monkeypatch.setattr(pixel_utils, "compress", forbidden("compress"))
    yield
    assert not calls, f"pixel data was decoded or encoded: {calls}"


# -- producible and choose -------------------------------------------------------------------


def test_producible_from_uncompressed_is_stored_first_then_the_documented_order() -> None:
    assert tc.producible(ELE) == (ELE, ILE, DEFLATED, RLE, J2K_LOSSLESS, JLS)
    assert tc.producible(ILE) == (ILE, ELE, DEFLATED, RLE, J2K_LOSSLESS, JLS)
    assert tc.producible(DEFLATED) == (DEFLATED, ELE, ILE, RLE, J2K_LOSSLESS, JLS)
    assert tc.producible(BIG_ENDIAN) == (BIG_ENDIAN, ELE, ILE, DEFLATED, RLE, J2K_LOSSLESS, JLS)


def test_producible_from_a_lossless_codestream_includes_lossless_recompression() -> None:
    assert tc.producible(RLE) == (RLE, ELE, ILE, DEFLATED, J2K_LOSSLESS, JLS)
    assert tc.producible(J2K_LOSSLESS) == (J2K_LOSSLESS, ELE, ILE, DEFLATED, RLE, JLS)
    assert tc.producible(JLS) == (JLS, ELE, ILE, DEFLATED, RLE, J2K_LOSSLESS)


@needs_gpl_codecs
def test_producible_from_jpeg_lossless_with_the_gpl_decoder() -> None:
    for ts in (JPEG_LOSSLESS, JPEG_LOSSLESS_SV1):
        assert tc.producible(ts) == (ts, ELE, ILE, DEFLATED, RLE, J2K_LOSSLESS, JLS)


@pytest.mark.parametrize("lossy", [JPEG_BASELINE, JPEG_EXTENDED, JLS_NEAR, J2K, HTJ2K])
def test_a_lossy_codestream_is_only_ever_decoded(lossy: str) -> None:
    produced = tc.producible(lossy)
    assert produced[0] == lossy
    assert set(produced[1:]) <= set(UNCOMPRESSED)
    assert (ELE in produced) == get_decoder(lossy).is_available


def test_no_lossy_or_big_endian_target_is_ever_produced() -> None:
    for ts in TRANSFER_SYNTAXES:
        for target in tc.producible(ts.uid)[1:]:
            assert target in UNCOMPRESSED + LOSSLESS_TARGETS, (ts.name, target)


def test_producible_follows_pydicoms_decoder_availability() -> None:
    for ts in TRANSFER_SYNTAXES:
        if not ts.encapsulated:
            continue
        try:
            available = get_decoder(ts.uid).is_available
        except NotImplementedError:
            available = False
        assert (ELE in tc.producible(ts.uid)) == available, ts.name


def test_unknown_or_undecodable_syntaxes_are_only_sent_as_stored() -> None:
    assert tc.producible(MPEG2) == (MPEG2,)
    assert tc.producible("1.2.3.4.5") == ("1.2.3.4.5",)


def test_choose_takes_the_best_accepted_in_producible_order() -> None:
    assert tc.choose(RLE, [ELE, RLE, ILE]) == RLE  # the stored one first
    assert tc.choose(RLE, [JLS, ILE, ELE]) == ELE
    assert tc.choose(ELE, [JLS, J2K_LOSSLESS, ILE]) == ILE
    assert tc.choose(ELE, [JLS, J2K_LOSSLESS]) == J2K_LOSSLESS
    assert tc.choose(ELE, iter([JLS])) == JLS
    assert tc.choose(ELE, ["1.2.840.10008.1.2.1\x00"]) == ELE  # UID padding from the wire
    assert tc.choose(J2K, [RLE, J2K_LOSSLESS, JLS]) is None  # lossy: never recompressed
    assert tc.choose(ELE, [JPEG_BASELINE, BIG_ENDIAN]) is None
    assert tc.choose(ELE, []) is None
    assert tc.choose(MPEG2, [ELE, ILE]) is None


def test_conversions_table_lists_every_producible_pair_with_its_codec() -> None:
    rows = tc.conversions()
    names = {ts.uid: ts.name for ts in TRANSFER_SYNTAXES}
    expected = {
        (names[ts.uid], names[target])
        for ts in TRANSFER_SYNTAXES
        for target in tc.producible(ts.uid)[1:]
    }
    assert {(src, dst) for src, dst, _ in rows} == expected
    assert len(rows) == len(expected)
    codecs = {(src, dst): codec for src, dst, codec in rows}
    assert codecs[(names[ELE], names[ILE])] == "pydicom"
    assert "zlib (deflate)" in codecs[(names[ELE], names[DEFLATED])]
    assert "zlib (inflate)" in codecs[(names[DEFLATED], names[ELE])]
    assert codecs[(names[ELE], names[J2K_LOSSLESS])] == "pylibjpeg-openjpeg (encode)"
    assert codecs[(names[ELE], names[JLS])] == "pyjpegls (encode)"
    assert "pylibjpeg-openjpeg (decode)" in codecs[(names[J2K_LOSSLESS], names[RLE])]
    assert "pylibjpeg-rle" in codecs[(names[J2K_LOSSLESS], names[RLE])]
    for src, dst, codec in rows:
        assert codec, (src, dst)
        assert "Big Endian" not in dst


# -- identity --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "image_dfl.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
    ],
)
def test_the_stored_syntax_returns_the_stored_data_set_bytes_unparsed(
    name: str, no_decoding: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = _stored(name)
    info = read_part10(stored)

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("pydicom parsed the stored object")

    monkeypatch.setattr(tc, "dcmread", no_parsing)
    expected = stored[info.dataset_offset :]
    for given in (stored, bytearray(stored), memoryview(stored)):
        out = tc.transcode(given, info.transfer_syntax, max_pixel_bytes=0)
        assert type(out) is bytes
        assert out == expected


# -- between uncompressed syntaxes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("CT_small.dcm", ILE),
        ("CT_small.dcm", DEFLATED),
        ("MR_small_implicit.dcm", ELE),
        ("MR_small_implicit.dcm", DEFLATED),
        ("image_dfl.dcm", ELE),
        ("image_dfl.dcm", ILE),
        ("SC_rgb.dcm", ILE),
        ("emri_small.dcm", ILE),
        ("rtdose.dcm", ELE),
    ],
)
def test_uncompressed_reencoding_keeps_every_element(name: str, target: str) -> None:
    source = _original(name)
    out = tc.transcode(_stored(name), target, max_pixel_bytes=BIG)
    _assert_structure(out, target)
    back = _parse(out, target)
    assert back.file_meta.TransferSyntaxUID == target
    _assert_same_identity(back, source)
    assert back["PixelData"].value == source["PixelData"].value  # not decoded: same bytes
    assert np.array_equal(back.pixel_array, source.pixel_array)
    assert set(back.keys()) == {elem.tag for elem in source if elem.tag.element != 0}
    for elem in source:
        if elem.tag.element == 0 or elem.VR in ("SQ", "UN") or elem.tag.is_private:
            continue  # group lengths are dropped; VRs of private elements are not known
        assert back[elem.tag].value == elem.value, elem.keyword


def test_deflated_output_is_the_explicit_little_endian_data_set_deflated() -> None:
    stored = _stored("CT_small.dcm")
    deflated = tc.transcode(stored, DEFLATED, max_pixel_bytes=BIG)
    explicit = tc.transcode(stored, ELE, max_pixel_bytes=BIG)
    assert len(deflated) % 2 == 0
    assert len(deflated) < len(explicit)
    inflated = zlib.decompressobj(-zlib.MAX_WBITS)
    assert inflated.decompress(deflated) == explicit
    assert inflated.eof
    assert inflated.unused_data in (b"", b"\x00")


@pytest.mark.parametrize(
    ("big", "little"),
    [
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # signed 16-bit OW
        ("emri_small_big_endian.dcm", "emri_small.dcm"),  # 10 frames, 12 of 16 bits
        ("rtdose_expb.dcm", "rtdose.dcm"),  # 32-bit samples in OW: swapped per 4 bytes
        ("OBXXXX1A_expb.dcm", "OBXXXX1A.dcm"),  # 8-bit in OW + palette LUT Data (OW)
        ("gdcm-US-ALOKA-16_big.dcm", "gdcm-US-ALOKA-16.dcm"),  # segmented palette LUTs
        ("SC_rgb_expb.dcm", "SC_rgb.dcm"),
        ("liver_expb.dcm", "liver.dcm"),  # 1 bit allocated
    ],
)
@pytest.mark.parametrize("target", [ELE, ILE])
def test_big_endian_becomes_its_little_endian_twin(big: str, little: str, target: str) -> None:
    twin = _original(little)
    out = tc.transcode(_stored(big), target, max_pixel_bytes=BIG)
    _assert_structure(out, target)
    back = _parse(out, target)
    _assert_same_identity(back, _original(big))
    assert back.PixelData == twin.PixelData
    assert np.array_equal(back.pixel_array, twin.pixel_array)
    for elem in twin:
        if elem.VR in ("OW", "OB", "US", "SS", "UL", "FL", "FD", "AT") and elem.tag in back:
            assert back[elem.tag].value == elem.value, elem.keyword


@pytest.mark.parametrize(
    ("name", "target"),
    [("test-SR.dcm", ILE), ("test-SR.dcm", DEFLATED), ("rtplan.dcm", ELE), ("rtplan.dcm", RLE)],
)
def test_objects_without_pixel_data_reencode(name: str, target: str, no_decoding: None) -> None:
    source = _original(name)
    assert "PixelData" not in source
    out = tc.transcode(_stored(name), target, max_pixel_bytes=0)
    _assert_structure(out, target)
    back = _parse(out, target)
    assert back.file_meta.TransferSyntaxUID == target
    _assert_same_identity(back, source)
    for keyword in ("ContentSequence", "BeamSequence", "FractionGroupSequence"):
        if keyword in source:
            assert back[keyword].value == source[keyword].value
    if target == RLE:  # PS3.5 A.4: everything but Pixel Data is Explicit VR Little Endian
        assert out == tc.transcode(_stored(name), ELE, max_pixel_bytes=0)


def test_an_image_without_rows_still_reencodes_uncompressed() -> None:
    ds = make_dataset()
    del ds.Rows
    out = tc.transcode(_stored_dataset(ds, ELE), ILE, max_pixel_bytes=0)
    back = _parse(out, ILE)
    assert back.PixelData == ds.PixelData
    assert "Rows" not in back


# -- decoding to uncompressed ----------------------------------------------------------------


LOSSLESS_TWINS = [
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
    ("SC_rgb_rle_16bit_2frame.dcm", "SC_rgb_16bit_2frame.dcm"),
    ("SC_rgb_rle_32bit.dcm", "SC_rgb_32bit.dcm"),
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),
    ("rtdose_rle.dcm", "rtdose.dcm"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # YBR_RCT codestream: decoded to RGB
    ("693_J2KR.dcm", "693_UNCR.dcm"),
]


@pytest.mark.parametrize(("name", "twin_name"), LOSSLESS_TWINS)
@pytest.mark.parametrize("target", UNCOMPRESSED)
def test_lossless_decode_gives_the_uncompressed_twin(
    name: str, twin_name: str, target: str
) -> None:
    source, twin = _original(name), _original(twin_name)
    out = tc.transcode(_stored(name), target, max_pixel_bytes=BIG)
    _assert_structure(out, target)
    back = _parse(out, target)
    assert back.file_meta.TransferSyntaxUID == target
    _assert_same_identity(back, source)
    assert not back["PixelData"].is_undefined_length
    assert back.PhotometricInterpretation == twin.PhotometricInterpretation
    assert back.get("NumberOfFrames", 1) == twin.get("NumberOfFrames", 1)
    assert np.array_equal(_pixels(back), _pixels(twin))
    assert len(back.PixelData) == len(twin.PixelData) + len(twin.PixelData) % 2


@needs_gpl_codecs
@pytest.mark.parametrize("name", ["JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_jpeg_lossless_decodes_to_what_pydicom_decodes(name: str) -> None:
    source = _original(name)
    out = tc.transcode(_stored(name), ELE, max_pixel_bytes=BIG)
    back = _parse(out, ELE)
    _assert_same_identity(back, source)
    assert back.PhotometricInterpretation == source.PhotometricInterpretation
    assert np.array_equal(_pixels(back), _pixels(source))


@needs_gpl_codecs
@pytest.mark.parametrize(
    ("name", "frames"),
    [("SC_rgb_dcmtk_+eb+cy+np.dcm", 1), ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 1)],
)
def test_lossy_ybr_full_422_jpeg_is_decoded_to_rgb_and_stays_marked_lossy(
    name: str, frames: int
) -> None:
    source = _original(name)
    assert source.PhotometricInterpretation == "YBR_FULL_422"
    out = tc.transcode(_stored(name), ELE, max_pixel_bytes=BIG)
    back = _parse(out, ELE)
    _assert_same_identity(back, source)
    assert back.LossyImageCompression == "01"
    assert back.PhotometricInterpretation == "RGB"  # what the written pixels are
    assert back.PlanarConfiguration == 0
    assert len(back.PixelData) == back.Rows * back.Columns * 3 * frames
    # The same pixels pydicom shows for the stored object (converted to RGB) ...
    assert np.array_equal(back.pixel_array, source.pixel_array)
    # ... and they are the picture: close to the uncompressed original of this JPEG.
    reference = _original("SC_rgb.dcm").pixel_array.astype(int)
    assert np.abs(back.pixel_array.astype(int) - reference).mean() < 4


def test_lossy_jpeg_2000_decodes_and_keeps_lossy_image_compression() -> None:
    source = _original("JPEG2000.dcm")
    out = tc.transcode(_stored("JPEG2000.dcm"), ILE, max_pixel_bytes=BIG)
    back = _parse(out, ILE)
    _assert_same_identity(back, source)
    assert back.LossyImageCompression == "01"
    assert np.array_equal(back.pixel_array, source.pixel_array)


def test_the_extended_offset_table_goes_with_the_encapsulation() -> None:
    ds = _original("MR_small.dcm")
    pixels = ds.pixel_array.copy()
    pixel_utils.compress(ds, RLE, encapsulate_ext=True, generate_instance_uid=False)
    assert "ExtendedOffsetTable" in ds
    out = tc.transcode(_stored_dataset(ds, RLE), ELE, max_pixel_bytes=BIG)
    back = _parse(out, ELE)
    assert "ExtendedOffsetTable" not in back
    assert "ExtendedOffsetTableLengths" not in back
    assert np.array_equal(back.pixel_array, pixels)


# -- encoding to lossless compressed syntaxes ------------------------------------------------


ENCODE_SOURCES = [
    "CT_small.dcm",  # signed 16-bit, Explicit VR LE
    "MR_small_implicit.dcm",  # Implicit VR LE
    "image_dfl.dcm",  # Deflated
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "emri_small.dcm",  # 10 frames, 12 bits stored
    "SC_rgb.dcm",  # RGB
    "color-pl.dcm",  # RGB stored colour-by-plane (Planar Configuration 1)
    "OBXXXX1A.dcm",  # PALETTE COLOR
    "SC_ybr_full_uncompressed.dcm",  # YBR_FULL
]


@pytest.mark.parametrize("name", ENCODE_SOURCES)
@pytest.mark.parametrize("target", LOSSLESS_TARGETS)
def test_lossless_encode_round_trips_the_pixels(name: str, target: str) -> None:
    source = _original(name)
    out = tc.transcode(_stored(name), target, max_pixel_bytes=BIG)
    _assert_structure(out, target)
    back = _parse(out, target)
    assert back.file_meta.TransferSyntaxUID == target
    _assert_same_identity(back, source)
    assert back["PixelData"].is_undefined_length
    frames = int(source.get("NumberOfFrames", 1))
    assert len(list(generate_frames(back.PixelData, number_of_frames=frames))) == frames
    assert len(back.PixelData) < len(source.PixelData)  # really compressed
    assert back.PhotometricInterpretation == source.PhotometricInterpretation
    assert np.array_equal(_pixels(back), _pixels(source))
    if source.get("SamplesPerPixel", 1) > 1:
        assert back.PlanarConfiguration == 0


@pytest.mark.parametrize(
    ("name", "twin_name", "target"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm", J2K_LOSSLESS),
        ("MR_small_RLE.dcm", "MR_small.dcm", JLS),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", RLE),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", JLS),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", J2K_LOSSLESS),
        ("US1_J2KR.dcm", "US1_UNCR.dcm", RLE),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm", JLS),
    ],
)
def test_lossless_codestream_to_another_lossless_one(
    name: str, twin_name: str, target: str
) -> None:
    source, twin = _original(name), _original(twin_name)
    out = tc.transcode(_stored(name), target, max_pixel_bytes=BIG)
    back = _parse(out, target)
    assert back.file_meta.TransferSyntaxUID == target
    _assert_same_identity(back, source)
    assert back.PhotometricInterpretation == twin.PhotometricInterpretation
    assert np.array_equal(_pixels(back), _pixels(twin))


@needs_gpl_codecs
def test_jpeg_lossless_process_14_to_jpeg_2000_lossless() -> None:
    name = "JPGLosslessP14SV1_1s_1f_8b.dcm"
    source = _original(name)
    out = tc.transcode(_stored(name), J2K_LOSSLESS, max_pixel_bytes=BIG)
    back = _parse(out, J2K_LOSSLESS)
    _assert_same_identity(back, source)
    assert np.array_equal(_pixels(back), _pixels(source))


def test_synthetic_multiframe_image_round_trips_through_every_target() -> None:
    rng = np.random.default_rng(7)
    # 32 x 32 at least: openjpeg's encoder uses 6 resolution levels (ISO/IEC 15444-1 B.5).
    frames = rng.integers(0, 4096, size=(3, 40, 48), dtype=np.uint16)
    ds = make_dataset(
        Rows=40, Columns=48, NumberOfFrames=3, PixelData=frames.tobytes(), SOPClassUID=SC_CLASS
    )
    stored = _stored_dataset(ds, ELE)
    for target in tc.producible(ELE)[1:]:
        back = _parse(tc.transcode(stored, target, max_pixel_bytes=BIG), target)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert np.array_equal(_pixels(back), frames), target


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target", "why"),
    [
        ("JPEG2000.dcm", RLE, "never recompressed"),
        ("JPEG2000.dcm", J2K_LOSSLESS, "never recompressed"),
        ("JPEGLSNearLossless_08.dcm", JLS, "never recompressed"),
        ("CT_small.dcm", JPEG_BASELINE, "only lossless"),
        ("CT_small.dcm", J2K, "only lossless"),
        ("CT_small.dcm", BIG_ENDIAN, "never produced"),
        ("CT_small.dcm", "1.2.3.4", "not one Stockade knows"),
    ],
)
def test_targets_that_are_not_producible_are_refused_before_any_work(
    name: str, target: str, why: str, no_decoding: None
) -> None:
    with pytest.raises(CannotTranscode, match=why):
        tc.transcode(_stored(name), target, max_pixel_bytes=BIG)


def test_a_missing_encoder_makes_its_target_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(tc._ENCODERS, JLS)
    assert JLS not in tc.producible(ELE)
    assert tc.choose(ELE, [JLS]) is None
    with pytest.raises(CannotTranscode, match="no encoder for JPEG-LS Lossless"):
        tc.transcode(_stored("CT_small.dcm"), JLS, max_pixel_bytes=BIG)


def test_a_missing_decoder_leaves_only_the_stored_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(tc._DECODERS, RLE)
    assert tc.producible(RLE) == (RLE,)
    with pytest.raises(CannotTranscode, match="no decoder for RLE Lossless"):
        tc.transcode(_stored("MR_small_RLE.dcm"), ELE, max_pixel_bytes=BIG)


def test_without_the_gpl_codec_jpeg_is_sent_as_stored_and_the_rest_still_works() -> None:
    """pylibjpeg-libjpeg (GPL-3) is optional: hidden, the availability API says so, and
    lossless JPEG goes as stored (8-bit JPEG Baseline still decodes with Pillow)."""
    script = textwrap.dedent(
        """
        import sys
        from importlib import metadata

        # As if pylibjpeg-libjpeg were not installed: no module, no pylibjpeg plugin entry.
        entry_points = metadata.entry_points

        def without_libjpeg(**selection):
            found = entry_points(**selection)
            return metadata.EntryPoints(e for e in found if not e.value.startswith("libjpeg"))

        metadata.entry_points = without_libjpeg
        sys.modules["libjpeg"] = None
        from stockade.dicom.transcode import producible, conversions
        # JPEG Baseline still decodes with Pillow (permissive licence); lossless JPEG does not
        assert producible("1.2.840.10008.1.2.4.50")[:2] == (
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"
        )
        assert producible("1.2.840.10008.1.2.4.70") == ("1.2.840.10008.1.2.4.70",)
        assert "1.2.840.10008.1.2.1" in producible("1.2.840.10008.1.2.4.80")  # pyjpegls
        assert producible("1.2.840.10008.1.2.4.90")[-2:] == (
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"
        )
        assert not any("pylibjpeg-libjpeg" in codec for _, _, codec in conversions())
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- the decode bound (threat model SR-13) ---------------------------------------------------


def _bomb(ts: str, fragment: bytes) -> bytes:
    """A tiny encapsulated object whose header claims 65535 x 65535 x 10000 frames."""
    ds = make_dataset(
        Rows=65535,
        Columns=65535,
        NumberOfFrames=10000,
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        SOPClassUID=SC_CLASS,
    )
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _stored_dataset(ds, ts)


@pytest.mark.parametrize(
    ("ts", "fragment"),
    [
        (J2K_LOSSLESS, b"\xff\x4f\xff\x51" + bytes(60)),
        (RLE, bytes(64)),
        (JLS, b"\xff\xd8\xff\xf7" + bytes(20)),
    ],
)
def test_the_pixel_bound_is_checked_from_the_header_before_decoding(
    ts: str, fragment: bytes, no_decoding: None
) -> None:
    stored = _bomb(ts, fragment)
    assert len(stored) < 1024
    with pytest.raises(CannotTranscode, match="over the limit") as caught:
        tc.transcode(stored, ELE, max_pixel_bytes=1 << 30)
    assert str(65535 * 65535 * 2 * 10000) in str(caught.value)


def test_the_pixel_bound_applies_to_encoding_too(no_decoding: None) -> None:
    stored = _stored("CT_small.dcm")  # 128 x 128 x 2 bytes = 32768
    with pytest.raises(CannotTranscode, match="32768 bytes"):
        tc.transcode(stored, RLE, max_pixel_bytes=32767)


def test_the_pixel_bound_is_inclusive() -> None:
    back = _parse(tc.transcode(_stored("CT_small.dcm"), RLE, max_pixel_bytes=32768), RLE)
    assert np.array_equal(back.pixel_array, _original("CT_small.dcm").pixel_array)
    out = tc.transcode(_stored("MR_small_RLE.dcm"), ELE, max_pixel_bytes=64 * 64 * 2)
    assert np.array_equal(_parse(out, ELE).pixel_array, _original("MR_small.dcm").pixel_array)


def test_uncompressed_reencoding_decodes_nothing_and_needs_no_bound(no_decoding: None) -> None:
    out = tc.transcode(_stored("CT_small.dcm"), ILE, max_pixel_bytes=0)
    assert _parse(out, ILE).PixelData == _original("CT_small.dcm").PixelData


def _shrunk(name: str, rows: int, columns: int) -> bytes:
    """A stored object whose header promises a smaller image than its codestream holds."""
    ds = _original(name)
    ds.Rows, ds.Columns = rows, columns
    return _stored_dataset(ds, ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_a_codestream_larger_than_the_header_is_refused_before_decoding(
    name: str, no_decoding: None
) -> None:
    with pytest.raises(CannotTranscode, match="codestream announces 64 x 64"):
        tc.transcode(_shrunk(name, 16, 16), ELE, max_pixel_bytes=BIG)


@needs_gpl_codecs
def test_a_jpeg_codestream_larger_than_the_header_is_refused(no_decoding: None) -> None:
    stored = _shrunk("SC_rgb_dcmtk_+eb+cy+np.dcm", 10, 10)
    with pytest.raises(CannotTranscode, match="codestream announces 100 x 100 x 3"):
        tc.transcode(stored, ELE, max_pixel_bytes=BIG)


def test_a_corrupt_codestream_header_is_refused(no_decoding: None) -> None:
    # pydicom's test file whose SIZ marker holds a stray sequence delimiter.
    stored = _stored("JPEG2000-embedded-sequence-delimiter.dcm")
    with pytest.raises(CannotTranscode, match="codestream announces"):
        tc.transcode(stored, ELE, max_pixel_bytes=BIG)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"Rows": None}, "Rows is missing"),
        ({"Columns": None}, "Columns is missing"),
        ({"BitsAllocated": None}, "BitsAllocated is missing"),
        ({"NumberOfFrames": "x1"}, "NumberOfFrames .*is not a number"),
        ({"NumberOfFrames": "-3"}, "NumberOfFrames -3 is not a positive number"),
    ],
)
def test_image_attributes_needed_to_size_a_decode_must_be_valid(
    overrides: dict[str, object], why: str, no_decoding: None
) -> None:
    ds = _original("MR_small_RLE.dcm")
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:  # as received: pydicom would refuse to set an invalid IS value
            tag = Tag(keyword)
            raw = str(value).encode()
            ds[tag] = RawDataElement(tag, "IS", len(raw), raw, 0, False, True)
    with pytest.raises(CannotTranscode, match=why):
        tc.transcode(_stored_dataset(ds, RLE), ELE, max_pixel_bytes=BIG)


# -- codec failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cut"), [("MR_small_jp2klossless.dcm", 200), ("MR_small_RLE.dcm", 100)]
)
def test_a_codec_failure_is_wrapped(name: str, cut: int) -> None:
    ds = _original(name)
    frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:cut] for frame in frames])
    ds["PixelData"].is_undefined_length = True
    stored = _stored_dataset(ds, ds.file_meta.TransferSyntaxUID)
    with pytest.raises(CannotTranscode, match=r"decoding the .* pixel data failed") as caught:
        tc.transcode(stored, ELE, max_pixel_bytes=BIG)
    assert "\n" not in str(caught.value)


def test_an_image_a_codec_cannot_take_is_refused_with_the_codecs_reason() -> None:
    # RLE Lossless holds at most 16 bits per sample (PS3.5 Table 8.2.2-1).
    with pytest.raises(CannotTranscode, match="encoding the pixel data as RLE Lossless failed"):
        tc.transcode(_stored("SC_rgb_32bit.dcm"), RLE, max_pixel_bytes=BIG)


def test_float_pixel_data_is_never_encapsulated() -> None:
    ds = make_dataset(SOPClassUID=SC_CLASS)
    del ds.PixelData
    ds.FloatPixelData = np.arange(16, dtype="<f4").tobytes()
    ds.BitsAllocated = 32
    with pytest.raises(CannotTranscode, match="float pixel data"):
        tc.transcode(_stored_dataset(ds, ELE), RLE, max_pixel_bytes=BIG)
    back = _parse(tc.transcode(_stored_dataset(ds, ELE), ILE, max_pixel_bytes=BIG), ILE)
    assert back.FloatPixelData == ds.FloatPixelData
