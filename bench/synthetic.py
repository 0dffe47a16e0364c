"""Synthetic CT data set for the ingest benchmark, generated once and cached.

``count`` single-frame CT Image Storage instances, 512 x 512, 16 bits signed, Explicit VR
Little Endian, about 0.5 MB each. They are spread over four patients with one study each; a
study is split into series of at most :data:`SERIES_SIZE` slices. Study *q* lives in folder
``q<q>`` so that four concurrent senders each get their own quarter::

    bench/.work/data/ct-2000/q1/*.dcm ... q4/*.dcm
    bench/.work/data/ct-2000.json        manifest: files, sizes, total bytes

UIDs are derived deterministically from the slice's coordinates, so a regenerated set is the
same set. The manifest is written last: a set without one (an interrupted generation) is
generated again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian
from pydicom.uid import generate_uid as _generate_uid

from bench.common import WORK

#: Bump when the generated content changes, to invalidate cached sets.
GENERATOR_VERSION = 1
#: Slices per series.
SERIES_SIZE = 100
#: Senders (and studies): each gets its own folder.
QUARTERS = 4
ROWS = COLUMNS = 512
SLICE_THICKNESS = 1.25
PIXEL_SPACING = 0.703125  # 360 mm field of view over 512 pixels


@dataclass(frozen=True)
class DataSet:
    """A generated data set: its root, one folder per quarter, and its size."""

    root: Path
    quarters: tuple[Path, ...]
    files: tuple[Path, ...]
    total_bytes: int
    quarter_files: tuple[int, ...]
    quarter_bytes: tuple[int, ...]

    @property
    def count(self) -> int:
        """Number of instances."""
        return len(self.files)


def _uid(*parts: object) -> UID:
    """A UID derived from *parts*: the same parts always give the same UID."""
    return _generate_uid(entropy_srcs=["stockade-bench", *map(str, parts)])


def _quarter_sizes(count: int) -> list[int]:
    base, extra = divmod(count, QUARTERS)
    return [base + (1 if q < extra else 0) for q in range(QUARTERS)]


def _phantom(rng: np.random.Generator, z: float) -> np.ndarray:
    """A CT-like slice in Hounsfield units: air, a body ellipse, a spine, lungs, noise."""
    y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float32)
    cx, cy = COLUMNS / 2, ROWS / 2
    scale = 1.0 + 0.08 * np.sin(z / 40.0)
    image = np.full((ROWS, COLUMNS), -1000.0, dtype=np.float32)  # air
    body = ((x - cx) / (210 * scale)) ** 2 + ((y - cy) / (150 * scale)) ** 2 <= 1
    image[body] = 40.0  # soft tissue
    for side in (-1, 1):
        lung = ((x - cx - side * 95) / 70) ** 2 + ((y - cy + 10) / (95 * scale)) ** 2 <= 1
        image[lung & body] = -850.0
    spine = ((x - cx) / 28) ** 2 + ((y - cy - 100) / 24) ** 2 <= 1
    image[spine] = 700.0
    image += rng.normal(0.0, 12.0, size=image.shape).astype(np.float32)
    return np.clip(image, -1024, 3071).astype("<i2")


def _instance(patient: int, series: int, number: int, z: float, pixels: np.ndarray) -> Dataset:
    study_uid = _uid("study", patient)
    series_uid = _uid("series", patient, series)
    sop_uid = _uid("instance", patient, series, number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "STOCKADE_BENCH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = f"202401{patient:02d}"
    ds.StudyTime = "081500"
    ds.SeriesTime = f"08{15 + series:02d}00"
    ds.AcquisitionTime = ds.ContentTime = f"08{15 + series:02d}{number % 60:02d}"
    ds.AccessionNumber = f"BENCH{patient:05d}"
    ds.Modality = "CT"
    ds.Manufacturer = "Stockade Bench"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.StudyDescription = "CT CHEST (synthetic)"
    ds.SeriesDescription = f"Axial {SLICE_THICKNESS} mm part {series}"
    ds.ManufacturerModelName = "Synthetic CT"
    ds.PatientName = f"BENCH^PATIENT{patient}"
    ds.PatientID = f"BENCH-{patient:04d}"
    ds.PatientBirthDate = f"19{50 + 7 * patient:02d}0101"
    ds.PatientSex = "F" if patient % 2 else "M"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = SLICE_THICKNESS
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(patient)
    ds.SeriesNumber = series
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-180.0, -180.0, -z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid("frame", patient)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = -z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _manifest_path(count: int) -> Path:
    return WORK / "data" / f"ct-{count}.json"


def _load(count: int) -> DataSet | None:
    """The cached set of *count* instances if it is complete and unchanged, else None."""
    manifest = _manifest_path(count)
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("version") != GENERATOR_VERSION or info.get("count") != count:
        return None
    root = manifest.with_suffix("")
    files: list[Path] = []
    q_files = [0] * QUARTERS
    q_bytes = [0] * QUARTERS
    for rel, size in info["files"]:
        path = root / rel
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
        q = int(Path(rel).parts[0][1:]) - 1
        q_files[q] += 1
        q_bytes[q] += size
        files.append(path)
    return DataSet(
        root,
        tuple(root / f"q{q + 1}" for q in range(QUARTERS)),
        tuple(files),
        sum(q_bytes),
        tuple(q_files),
        tuple(q_bytes),
    )


def generate(count: int, *, log: bool = True) -> DataSet:
    """Return the cached set of *count* instances, generating it first if needed."""
    cached = _load(count)
    if cached is not None:
        return cached
    if count < QUARTERS:
        raise ValueError(f"count must be at least {QUARTERS}")
    manifest = _manifest_path(count)
    root = manifest.with_suffix("")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    if log:
        print(f"generating {count} synthetic CT instances in {root} ...", flush=True)
    rng = np.random.default_rng(20240101)
    entries: list[tuple[str, int]] = []
    for q, size in enumerate(_quarter_sizes(count)):
        patient = q + 1
        folder = staging / f"q{patient}"
        folder.mkdir(parents=True)
        for i in range(size):
            series, number = divmod(i, SERIES_SIZE)
            z = i * SLICE_THICKNESS
            ds = _instance(patient, series + 1, number + 1, z, _phantom(rng, z))
            rel = f"q{patient}/CT_{series + 1:02d}_{number + 1:04d}.dcm"
            path = staging / rel
            ds.save_as(path, enforce_file_format=True)
            entries.append((rel, path.stat().st_size))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    manifest.write_text(
        json.dumps({"version": GENERATOR_VERSION, "count": count, "files": entries}),
        encoding="utf-8",
    )
    loaded = _load(count)
    assert loaded is not None
    if log:
        print(f"generated {count} instances, {loaded.total_bytes / 1e6:.1f} MB", flush=True)
    return loaded


def warm_cache(data: DataSet) -> None:
    """Read every file once so that the first measured run does not read from disk."""
    for path in data.files:
        with path.open("rb") as fh:
            while fh.read(1 << 20):
                pass
