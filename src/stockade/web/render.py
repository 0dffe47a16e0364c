"""Placeholder: routes are added by the module's implementation."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
