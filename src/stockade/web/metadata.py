"""DICOM JSON metadata of stored instances (PS3.18 10.4.1.1.2 and Annex F) for WADO-RS.

Each instance becomes the DICOM JSON object of its data set (PS3.18 F.2) without its bulk
data: Pixel Data (7FE0,0010), Float Pixel Data (7FE0,0008) and Double Float Pixel Data
(7FE0,0009) always, and any other value of a binary VR (OB, OD, OF, OL, OV, OW, UN) longer
than :data:`BULK_THRESHOLD` bytes, are replaced by a ``BulkDataURI`` (PS3.18 F.2.6) naming the
instance's bulkdata resource and the attribute's tag path
(``.../instances/{uid}/bulkdata/{tag}[/{item}/{tag}...]``, item indexes from 0), served by
:mod:`stockade.web.wado`. Smaller binary values stay inline as ``InlineBinary``; every other
attribute is pydicom's own DICOM JSON form (``DataElement.to_json_dict``).

The URIs are written relative (``/studies/...``) so that what is cached does not depend on
the host name a client used: :func:`absolute` adds the base URL of the request. A JSON
string value can never contain the text ``"BulkDataURI":"`` with unescaped quotes, so that
replacement touches the keys only.

Series metadata is cached by :meth:`stockade.archive.Archive.metadata`
(:mod:`stockade.metacache`), which calls :func:`build` for the instances its cache lacks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from stockade.errors import StockadeError
from stockade.web import fastjson
from stockade.web.fastjson import BULK_THRESHOLD, BULK_VRS, PIXEL_TAGS

if TYPE_CHECKING:
    from stockade.retrieve import Retrieval, StoredInstance

log = logging.getLogger(__name__)

_MARKER = b'"BulkDataURI":"/studies/'


def is_bulk(elem: DataElement, *, top_level: bool) -> bool:
    """Whether *elem* is left out of the metadata and served as bulk data."""
    if elem.VR not in BULK_VRS:
        return False
    if top_level and elem.tag in PIXEL_TAGS:
        return True
    value = elem.value
    return isinstance(value, bytes | bytearray) and len(value) > BULK_THRESHOLD


def instance_prefix(inst: StoredInstance) -> str:
    """The instance resource of *inst*, relative to the DICOMweb base (PS3.18 10.4.1)."""
    return (
        f"/studies/{inst.study_instance_uid}/series/{inst.series_instance_uid}"
        f"/instances/{inst.sop_instance_uid}"
    )


def dataset_json(
    ds: Dataset, bulk_prefix: str, path: tuple[str, ...] = (), codec: str | None = None
) -> dict[str, Any]:
    """*ds* as a DICOM JSON object (PS3.18 F.2) with bulk data as ``BulkDataURI``s.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The data set, or a sequence item.
    bulk_prefix : str
        The instance's bulkdata resource, ending with ``/bulkdata/``.
    path : tuple of str
        Tag path of *ds* inside the instance (empty for the data set itself).
    codec : str, optional
        The Python codec of the data set's Specific Character Set when :mod:`fastjson`
        may convert its text (found from *ds* itself at the top level).
    """
    if not path:
        codec = fastjson.text_codec(ds)
    out: dict[str, Any] = {}
    for raw in ds.elements():
        key = f"{raw.tag:08X}"
        if codec is not None and isinstance(raw, RawDataElement):
            fast = fastjson.element(raw, codec, top_level=not path)
            if fast is not None:
                out[key] = fast
                if "BulkDataURI" in fast:
                    fast["BulkDataURI"] = bulk_prefix + "/".join((*path, key))
                continue
        elem = ds[raw.tag]
        here = (*path, key)
        if elem.VR == "SQ":
            items = [
                dataset_json(item, bulk_prefix, (*here, str(index)), codec)
                for index, item in enumerate(elem.value or ())
            ]
            out[key] = {"vr": "SQ", "Value": items}
        elif is_bulk(elem, top_level=not path):
            out[key] = {"vr": elem.VR, "BulkDataURI": bulk_prefix + "/".join(here)}
        else:
            try:
                out[key] = elem.to_json_dict(None, BULK_THRESHOLD)
            except Exception as exc:  # noqa: BLE001 - a value pydicom cannot convert
                log.info("attribute %s left without value in metadata: %s", key, exc)
                out[key] = {"vr": elem.VR}
            else:
                if elem.VR in _DECIMAL_VRS:
                    _without_non_finite(out[key], key)
    return out


#: VRs whose JSON values are numbers that may be NaN or infinite once decoded.
_DECIMAL_VRS = frozenset({"DS", "FL", "FD"})


def _without_non_finite(attribute: dict[str, Any], key: str) -> None:
    """Replace NaN and infinite values (a DS of "nan" or "1e999", an FD holding NaN) by
    null, the DICOM JSON empty value (PS3.18 F.2.5): JSON has no number for them, and
    ``NaN`` in an answer breaks strict parsers."""
    values = attribute.get("Value")
    if not isinstance(values, list):
        return
    for i, value in enumerate(values):
        if isinstance(value, float) and not math.isfinite(value):
            log.info("attribute %s: a value that is not a finite number is sent as null", key)
            values[i] = None


def instance_json(data: bytes | bytearray | memoryview, inst: StoredInstance) -> dict[str, Any]:
    """The DICOM JSON object of the stored Part 10 file *data* of *inst* (PS3.18 F.2).

    Raises
    ------
    StockadeError
        The file cannot be parsed (it was checked at ingest; this means damage).
    """
    try:
        ds = dcmread(BytesIO(data), force=False)
    except Exception as exc:  # pydicom raises anything on damaged input
        raise StockadeError(f"{inst.sop_instance_uid}: cannot be parsed: {exc}") from exc
    return dataset_json(ds, instance_prefix(inst) + "/bulkdata/")


def build(
    retrieval: Retrieval,
    instances: list[StoredInstance],
    pause: Callable[[], None] | None = None,
) -> list[bytes | None]:
    """Each instance's DICOM JSON object (compact UTF-8, relative BulkDataURIs), in order,
    reading each verified blob.

    An instance that cannot be read (integrity, parse) is None and counted as failed in
    *retrieval*; the others are counted as completed. *pause*, when given, is called before
    each instance (background work waits there while requests are served).
    """
    objects: list[bytes | None] = []
    for inst in instances:
        if pause is not None:
            pause()
        try:
            obj = instance_json(retrieval.read(inst), inst)
        except StockadeError as exc:
            retrieval.done(inst, "failed", exc.reason)
            objects.append(None)
            continue
        objects.append(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())
        retrieval.done(inst, "completed")
    return objects


def absolute(body: bytes, base: str) -> bytes:
    """*body* (DICOM JSON objects from :func:`build`, joined) with its BulkDataURIs made
    absolute under *base*.

    Parameters
    ----------
    body : bytes
        UTF-8 DICOM JSON whose BulkDataURIs start with ``/studies/``.
    base : str
        The DICOMweb base URL (``http://host:port/dicomweb``), without a trailing slash.
    """
    quoted = json.dumps(base, ensure_ascii=False)[1:-1].encode()
    return body.replace(_MARKER, b'"BulkDataURI":"' + quoted + b"/studies/")
