"""The study page's actions: download a study as a ZIP, send it to a node, delete it."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
