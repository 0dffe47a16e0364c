"""The OHIF viewer served by Stockade behind its login."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
