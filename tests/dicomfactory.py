"""Builds small DICOM objects for tests (pydicom), as Part 10 bytes or bare data sets."""

from __future__ import annotations

import io

from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# Tests build hostile objects on purpose: pydicom must not refuse or warn while writing them.
config.settings.writing_validation_mode = config.IGNORE
config.settings.reading_validation_mode = config.IGNORE


def make_dataset(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-1"
    ds.StudyDate = "20240131"
    ds.Modality = "CT"
    ds.InstanceNumber = 1
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def part10(ds: Dataset, preamble: bytes = bytes(128), ts: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    ds.preamble = preamble
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bare(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The data set alone, as carried by C-STORE."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = implicit
    write_dataset(out, ds)
    return bytes(out.getvalue())
