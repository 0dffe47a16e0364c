"""WADO-URI (PS3.18 9, URI Service): one instance by ``GET /dicomweb/wado?requestType=WADO&...``.

Parameters (PS3.18 9, names case-sensitive): ``requestType`` (must be
``WADO``), ``studyUID``, ``seriesUID``, ``objectUID`` (all required, PS3.5 9.1 UIDs),
``contentType``, ``charset`` (ignored), ``transferSyntax``, ``frameNumber``, ``rows``,
``columns``, ``region``, ``windowCenter``, ``windowWidth``, ``imageQuality``, ``annotation``
(accepted, nothing is burned in). ``anonymize``, ``presentationUID`` and
``presentationSeriesUID`` are not supported (400). Unknown or repeated parameters are 400.

``contentType`` is a comma-separated list with optional ``q`` weights; ``image/jpeg`` (the
default), ``image/png``, ``image/gif`` and ``application/dicom`` are produced, anything else
is 406.

* ``application/dicom``: the Part 10 file with a zero preamble, ``Content-Disposition:
  attachment`` (threat model SR-21). ``transferSyntax`` names the transfer syntax; absent,
  Explicit VR Little Endian is sent (the default of PS3.18 9), ``*`` sends the stored one.
  Another one than the stored one is made by the one retrieve path
  (:meth:`Retrieval.dataset`: decoded size bounded, never a lossy encode) under a fresh File
  Meta (:func:`~stockade.dicom.part10.file_header`); one that cannot be made is 406. The
  image parameters may not be given with it (400).
* an image type: rendered by :mod:`stockade.web.render` (the same pipeline as the rendered
  resources): ``frameNumber`` (default 1), ``windowCenter`` and ``windowWidth`` (both or
  neither; linear VOI function), ``rows`` and ``columns`` (1 to 4096; one alone keeps the
  aspect ratio), ``region=x1,y1,x2,y2`` (fractions 0.0 to 1.0 of the image, cropped first),
  ``imageQuality`` (1 to 100). ``transferSyntax`` may not be given with it (400).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from stockade.dicom.attributes import Level
from stockade.dicom.part10 import ZERO_PREAMBLE, file_header
from stockade.dicom.tables import EXPLICIT_VR_LITTLE_ENDIAN
from stockade.dicom.uids import uid_problem
from stockade.errors import InvalidQuery, NotFound, StockadeError
from stockade.retrieve import Retrieval, StoredInstance
from stockade.web import render
from stockade.web.app import actor_of, archive_of, scope_of

__all__ = ["DICOM", "ROUTES", "wado_uri"]

DICOM = "application/dicom"
#: Media types WADO-URI produces, the default first (PS3.18 9).
MEDIA_TYPES = (*render.MEDIA_TYPES, DICOM)
_UIDS = (
    ("studyUID", "StudyInstanceUID"),
    ("seriesUID", "SeriesInstanceUID"),
    ("objectUID", "SOPInstanceUID"),
)
_IMAGE_ONLY = (
    "frameNumber",
    "rows",
    "columns",
    "region",
    "windowCenter",
    "windowWidth",
    "imageQuality",
    "annotation",
)
_UNSUPPORTED = ("anonymize", "presentationUID", "presentationSeriesUID")
_KNOWN = frozenset(
    {
        "requestType",
        "contentType",
        "charset",
        "transferSyntax",
        *(name for name, _ in _UIDS),
        *_IMAGE_ONLY,
        *_UNSUPPORTED,
    }
)


def _params(request: Request) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in _KNOWN:
            raise InvalidQuery(f"unknown WADO-URI parameter {name[:64]!r}")
        if name in params:
            raise InvalidQuery(f"{name} is given more than once")
        params[name] = value
    return params


def _uids(params: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, keyword in _UIDS:
        uid = params.get(name)
        if not uid:
            raise InvalidQuery(f"{name} is required (PS3.18 9)")
        problem = uid_problem(uid)
        if problem:
            raise InvalidQuery(f"{name} {problem}")
        values[keyword] = uid
    return values


def _region(text: str) -> render.Viewport:
    parts = text.split(",")
    if len(parts) != 4:
        raise InvalidQuery("region must be x1,y1,x2,y2")
    x1, y1, x2, y2 = (render.decimal(p, "a region value") for p in parts)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise InvalidQuery("region must be fractions 0.0 to 1.0 with x1 < x2 and y1 < y2")
    return render.Viewport(None, None, (x1, y1, x2, y2), relative=True)


def image_options(params: Mapping[str, str], media_type: str) -> render.RenderOptions:
    """The rendering options of an image request (PS3.18 9).

    Raises
    ------
    InvalidQuery
        A bad number, a window half given, a bad region, or ``transferSyntax``.
    """
    if "transferSyntax" in params:
        raise InvalidQuery("transferSyntax applies to contentType=application/dicom only")
    render.check_annotation(params.get("annotation"))
    frame = params.get("frameNumber")
    center, width = params.get("windowCenter"), params.get("windowWidth")
    if (center is None) != (width is None):
        raise InvalidQuery("windowCenter and windowWidth are given together or not at all")
    window = None
    if center is not None and width is not None:
        window = render.make_window(
            render.decimal(center, "windowCenter"), render.decimal(width, "windowWidth")
        )
    rows, columns = params.get("rows"), params.get("columns")
    region = params.get("region")
    viewport = None
    if rows is not None or columns is not None or region is not None:
        base = _region(region) if region is not None else render.Viewport(None, None)
        viewport = render.Viewport(
            render.integer(columns, "columns", 1, render.MAX_VIEWPORT) if columns else None,
            render.integer(rows, "rows", 1, render.MAX_VIEWPORT) if rows else None,
            base.region,
            relative=True,
        )
    quality = params.get("imageQuality")
    return render.RenderOptions(
        media_type=media_type,
        frame=render.integer(frame, "frameNumber", 1, render.MAX_FRAME) if frame else 1,
        window=window,
        viewport=viewport,
        quality=render.integer(quality, "imageQuality", 1, 100)
        if quality is not None
        else render.DEFAULT_QUALITY,
    )


def _target(params: Mapping[str, str]) -> str | None:
    """The transfer syntax asked for; ``None`` for the stored one (``*``).

    Raises
    ------
    InvalidQuery
        An image parameter, or a transfer syntax that is not a UID.
    """
    given = [name for name in _IMAGE_ONLY if name in params]
    if given:
        raise InvalidQuery(f"{', '.join(given)} cannot be given with application/dicom")
    ts = params.get("transferSyntax", EXPLICIT_VR_LITTLE_ENDIAN).strip()
    if ts == "*":
        return None
    problem = uid_problem(ts)
    if problem:
        raise InvalidQuery(f"transferSyntax {problem}")
    return ts


def part10_file(retrieval: Retrieval, inst: StoredInstance, target: str | None) -> bytes:
    """The Part 10 file of *inst* in *target* (``None``: as stored), zero preamble.

    Raises
    ------
    IntegrityError
        The stored bytes no longer match their SHA-256.
    CannotTranscode
        *target* cannot be produced (406).
    """
    try:
        if target is None or target == inst.transfer_syntax:
            data = retrieval.read(inst)
            if data[:128] != ZERO_PREAMBLE:  # stored copies have one; never send another
                data = ZERO_PREAMBLE + data[128:]
        else:
            ts, body = retrieval.dataset(inst, [target])
            meta = file_header(inst.sop_class_uid, inst.sop_instance_uid, ts, None)
            data = meta + bytes(body)
    except StockadeError as exc:
        retrieval.done(inst, "failed", exc.reason)
        raise
    retrieval.done(inst, "completed")
    return data


async def wado_uri(request: Request) -> Response:
    """``GET /dicomweb/wado``: WADO-URI (PS3.18 9)."""
    params = _params(request)
    if params.get("requestType") != "WADO":
        raise InvalidQuery("requestType must be WADO (PS3.18 9)")
    values = _uids(params)
    for name in _UNSUPPORTED:
        if name in params:
            raise InvalidQuery(f"{name} is not supported by this server")
    media = render.choose_media_type(params.get("contentType"), MEDIA_TYPES)
    if media != DICOM:
        options = image_options(params, media)
        response: Response = await render.render_located(
            request, values, options, lambda found: [*found][:1]
        )
        return response
    target = _target(params)
    retrieval = archive_of(request).retrieve(
        Level.IMAGE, values, service="wado", actor=actor_of(request), scope=scope_of(request)
    )
    try:
        if not retrieval.instances:
            raise NotFound("no such instance is stored")
        inst = retrieval.instances[0]
        data = await run_in_threadpool(part10_file, retrieval, inst, target)
    finally:
        retrieval.finish()
    disposition = f'attachment; filename="{inst.sop_instance_uid}.dcm"'
    return Response(data, media_type=DICOM, headers={"Content-Disposition": disposition})


ROUTES: list[BaseRoute] = [Route("/wado", wado_uri, methods=["GET"])]
