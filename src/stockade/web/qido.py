"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

The query parameters become one :meth:`Archive.query` call: the same engine and matching
rules as C-FIND (PS3.4 C.2.2.2), evaluated in SQL. Attribute keys are keywords or tags
(``PatientName=DOE*`` or ``00100010=DOE*``); ``includefield`` names more attributes to return
(keywords or tags, comma-separated or repeated, or ``all``); ``limit`` and ``offset`` page the
results; ``fuzzymatching`` is accepted and changes nothing, as person names already match
case-insensitively (``query_case_sensitive_names``). Results are built from the index, never
by opening files. A ``limit`` over the maximum page (``query_max_results``) is lowered to it,
and a ``Warning: 299`` header says so; when more results exist beyond the page, another
``Warning: 299`` header says that too (PS3.18 8.3.4.2).

The answer is ``application/dicom+json`` (PS3.18 Annex F), the default and the answer to
``*/*``, or, when the ``Accept`` header asks for it first, ``multipart/related;
type="application/dicom+xml"`` (PS3.18 8.7.3.2, 10.6.3): one Native DICOM Model part per
match (PS3.19 A.1), converted from the same JSON by :mod:`stockade.web.dicomxml`, or 204
when nothing matches (a multipart body cannot be empty; the JSON answer stays ``[]`` with
200). An ``Accept`` header that allows neither is answered 406 before the query runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from stockade.dicom.attributes import Level
from stockade.dicom.uids import uid_problem
from stockade.errors import InvalidQuery
from stockade.query import KEYS, KEYS_BY_TAG, at_or_above
from stockade.web import dicomxml
from stockade.web.app import BASE, actor_of, archive_of, scope_of
from stockade.web.dicomjson import JSON_MEDIA_TYPE, RETRIEVE_URL, row_to_json, tag_hex
from stockade.web.wado import NotAcceptable, parse_accept

#: Attributes returned by default per level (PS3.18 Table 10.6.3-3 to 10.6.3-5), as far as
#: the index holds them.
DEFAULT_KEYS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "BodyPartExamined",
        "SeriesDate",
        "SeriesTime",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.IMAGE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
    ),
}
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching", "orderby"})
_TAG = re.compile(r"[0-9A-Fa-f]{8}")
#: Longest query string accepted (URLs are bounded by the server too).
MAX_PARAMETERS = 64


def keyword_of(name: str) -> str:
    """The indexed keyword a query parameter names (keyword or tag).

    Raises
    ------
    InvalidQuery
        Unknown, not searchable here, or a sequence path (``a.b``).
    """
    if "." in name:
        raise InvalidQuery(f"sequence matching ({name[:64]!r}) is not supported")
    if _TAG.fullmatch(name):
        key = KEYS_BY_TAG.get(int(name, 16))
        if key is None:
            raise InvalidQuery(f"attribute {name} cannot be searched or returned here")
        return key.keyword
    if name not in KEYS:
        raise InvalidQuery(f"unknown or unsupported attribute {name[:64]!r}")
    return name


def _number(params: Mapping[str, list[str]], name: str) -> int | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit() or len(values[0]) > 9:
        raise InvalidQuery(f"{name} must be one non-negative whole number")
    return int(values[0])


def parse(
    params: Mapping[str, list[str]], level: Level, fixed: Mapping[str, str]
) -> tuple[dict[str, str | None], list[str], int | None, int]:
    """Matching values, return keys, limit and offset of a QIDO-RS request.

    Raises
    ------
    InvalidQuery
        An unknown parameter or attribute, a repeated attribute, a bad number.
    """
    if sum(len(v) for v in params.values()) > MAX_PARAMETERS:
        raise InvalidQuery(f"more than {MAX_PARAMETERS} query parameters")
    values: dict[str, str | None] = dict(fixed)
    include: list[str] = []
    for name, given in params.items():
        if name in _CONTROL:
            if name == "includefield":
                for item in (part.strip() for v in given for part in v.split(",")):
                    if item == "all":
                        include += [k for k, key in KEYS.items() if key.level in at_or_above(level)]
                    elif item:
                        include.append(keyword_of(item))
            elif name == "fuzzymatching" and given[-1] not in ("true", "false"):
                raise InvalidQuery("fuzzymatching must be true or false")
            continue
        keyword = keyword_of(name)
        if len(given) > 1 or (keyword in values and keyword not in fixed):
            raise InvalidQuery(f"{keyword} is given more than once")
        if keyword in fixed:
            raise InvalidQuery(f"{keyword} is already fixed by the URL")
        values[keyword] = given[0]
    return values, include, _number(params, "limit"), _number(params, "offset") or 0


def order_of(params: Mapping[str, list[str]]) -> list[tuple[str, bool]]:
    """The sort keys of ``orderby`` (a Stockade extension: keywords or tags, comma
    separated, most significant first; ``-`` before one sorts it descending).

    Raises
    ------
    InvalidQuery
        An unknown attribute (which ones may sort is checked by the query model).
    """
    out = []
    for item in (part.strip() for v in params.get("orderby", []) for part in v.split(",")):
        if item:
            descending = item.startswith("-")
            out.append((keyword_of(item.lstrip("-+").strip()), descending))
    return out


def _retrieve_url(request: Request, row: dict[str, Any], level: Level) -> str | None:
    study = row.get("StudyInstanceUID")
    if not study:
        return None
    base = str(request.base_url).rstrip("/") + BASE
    url = f"{base}/studies/{study}"
    if level in (Level.SERIES, Level.IMAGE) and row.get("SeriesInstanceUID"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if level is Level.IMAGE and row.get("SOPInstanceUID"):
        url += f"/instances/{row['SOPInstanceUID']}"
    return url


def _search(level: Level, with_study_keys: bool = False) -> Any:
    async def endpoint(request: Request) -> Response:
        fixed: dict[str, str] = {}
        for name, keyword in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
            uid = request.path_params.get(name)
            if uid is not None:
                problem = uid_problem(uid)
                if problem:
                    raise InvalidQuery(f"{keyword} in the URL {problem}")
                fixed[keyword] = uid
        params: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            params.setdefault(name, []).append(value)
        values, include, limit, offset = parse(params, level, fixed)
        media = dicomxml.negotiate(parse_accept(request.headers.get("accept")))
        if media is None:
            raise NotAcceptable(
                f"search results are given as {JSON_MEDIA_TYPE} or as "
                f"{dicomxml.MULTIPART_XML} (PS3.18 8.7.3.2)"
            )
        archive = archive_of(request)
        cap = archive.settings.query_max_results
        warnings = []
        if limit is not None and limit > cap:
            warnings.append(f'299 stockade "limit {limit} lowered to the maximum page {cap}"')
        page = cap if limit is None else min(limit, cap)
        defaults = list(DEFAULT_KEYS[level])
        if with_study_keys or level is Level.SERIES:
            defaults = [*DEFAULT_KEYS[Level.STUDY], *defaults]
        if level is Level.IMAGE:
            defaults = [*DEFAULT_KEYS[Level.SERIES], *defaults]
        found = archive.query(
            level,
            values,
            actor=actor_of(request),
            scope=scope_of(request),
            return_keys=[*defaults, *include],
            limit=page,
            offset=offset,
            order=order_of(params),
        )
        body = []
        for row in found.rows:
            item = row_to_json(row)
            url = _retrieve_url(request, row, level)
            if url:
                item[tag_hex(RETRIEVE_URL)] = {"vr": "UR", "Value": [url]}
            body.append(dict(sorted(item.items())))
        if found.more:
            warnings.append('299 stockade "There are additional results that can be requested"')
        if media == JSON_MEDIA_TYPE:
            content_type, answer = JSON_MEDIA_TYPE, json.dumps(body).encode()
        else:
            documents = [dicomxml.to_xml(item) for item in body]
            replaced = sum(d.replaced for d in documents)
            if replaced:
                warnings.append(dicomxml.replaced_warning(replaced))
            if not documents:  # no part: 204 (PS3.18 10.6.3.1), a multipart needs one
                headers = {"Warning": ", ".join(warnings)} if warnings else None
                return Response(status_code=204, headers=headers)
            content_type, answer = dicomxml.multipart(d.body for d in documents)
        headers = {"Warning": ", ".join(warnings)} if warnings else None
        return Response(answer, media_type=content_type, headers=headers)

    return endpoint


ROUTES: list[BaseRoute] = [
    Route("/studies", _search(Level.STUDY), methods=["GET"]),
    Route("/series", _search(Level.SERIES, with_study_keys=True), methods=["GET"]),
    Route("/instances", _search(Level.IMAGE, with_study_keys=True), methods=["GET"]),
    Route("/studies/{study}/series", _search(Level.SERIES), methods=["GET"]),
    Route("/studies/{study}/instances", _search(Level.IMAGE), methods=["GET"]),
    Route("/studies/{study}/series/{series}/instances", _search(Level.IMAGE), methods=["GET"]),
]
