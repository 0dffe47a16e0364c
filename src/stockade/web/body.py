"""Small JSON request bodies (the ``/auth`` and ``/api`` routes), read with a bound."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from stockade.errors import InvalidRequest


async def json_object(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, at most *limit* bytes (an empty body is ``{}``).

    The declared ``Content-Length`` is checked first, then the bytes as they arrive, so no
    more than *limit* bytes are ever held (threat model: bound every length).

    Raises
    ------
    InvalidRequest
        Larger than *limit*, not JSON, or not a JSON object (400).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise InvalidRequest(f"the request body is larger than {limit} bytes")
    try:
        data = json.loads(bytes(body) or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data
