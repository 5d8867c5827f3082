"""A pure-ASGI front for the two generation endpoints.

`POST /v1/completions` and `POST /v1/chat/completions` carry nearly every request and every streamed chunk; under
FastAPI each request passes about ten middleware and routing layers on the way in (~0.5 ms of the router's CPU
on a 2-core VM), and each SSE chunk the same layers' `send` wrappers on the way out. This front answers those two
routes itself, with the same handler (`RouterService.generate`), the same API-key check and the same OpenAI error
bodies as the app's exception handlers, and passes everything else (other routes, other methods, lifespan) to
the FastAPI app, which still documents the two routes in its OpenAPI schema. What the front leaves out is
FastAPI's own middleware on those two routes: its built-in OpenTelemetry spans (the project's Prometheus metrics
cover them) and a body-size limit (none is configured).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from router.errors import APIError

if TYPE_CHECKING:
    from router.app import RouterService

log = logging.getLogger(__name__)

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class GenerationFront:
    """ASGI app: the generation endpoints answered directly, the rest by `app`."""

    def __init__(self, app: ASGIApp, service: RouterService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = ENDPOINTS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await self.service.check_api_key(request)
            response: Response = await self.service.generate(request, endpoint)
        except APIError as e:
            response = e.response()
        except Exception:  # as the app's catch-all handler: a 500 with an OpenAI body, the trace in the log
            log.exception("unhandled error on %s", scope["path"])
            response = APIError(500, "internal router error").response()
        await response(scope, receive, send)
