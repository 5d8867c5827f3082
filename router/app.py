"""The router's HTTP app: OpenAI endpoints, vLLM's utility endpoints, health, readiness, metrics, OpenAPI docs."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.errors import APIError, from_validation_error, install_error_handlers
from router.fast_path import GenerationFront
from router.generation import Generation
from router.job import JobBuilder, RequestPlan
from router.logprobs import TokenText
from router.metrics import RouterMetrics
from router.openapi import body_docs, install_openapi
from router.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    GenerationRequest,
    ModelCard,
    ModelList,
    ignored_fields,
)
from router.registry import WorkerRegistry
from router.responder import CLIENT_GONE, ChatResponder, CompletionResponder, Responder
from router.utility import utility_routes

log = logging.getLogger(__name__)
GC_REPORT_S = 1.0  # how often a router process moves its long garbage-collection pauses into /metrics
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RouterService:
    """What the endpoints share: config, tokenizer, workers, metrics and the request flow."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, workers: WorkerRegistry) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.workers = workers
        self.metrics = RouterMetrics(workers)
        self.jobs = JobBuilder(config, tokenizer, workers)
        self.generation = Generation(config, tokenizer, workers, self.metrics)
        self.texts = TokenText(tokenizer)

    async def check_api_key(self, request: Request) -> None:
        # async although it awaits nothing: FastAPI runs a plain `def` dependency in a worker thread, a thread
        # hand-off per request (2% of a loaded router's event loop, plus the thread's own CPU)
        if not self.config.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                           code="invalid_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in self.config.api_keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def model_card(self) -> ModelCard:
        name = self.config.model_name
        return ModelCard(id=name, root=name, max_model_len=self.config.max_model_len or self.workers.max_model_len())

    async def generate(self, request: Request, endpoint: str) -> Response:
        """Parse, tokenize, check, then stream or collect; counts the request by its outcome."""
        arrival = time.monotonic()
        try:
            plan, responder = await self._prepare(request, endpoint, arrival)
        except APIError as e:
            self.metrics.count_request(endpoint, e.status)
            raise
        run = self.generation.stream
        if plan.stream:
            events = responder.sse(run, on_end=lambda status: self.metrics.count_request(endpoint, status))
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            body = await _unless_disconnected(request, responder.collect(run))
        except APIError as e:
            self.metrics.count_request(endpoint, e.status)
            raise
        self.metrics.count_request(endpoint, 200)
        return JSONResponse(body)

    async def _prepare(self, request: Request, endpoint: str, arrival: float) -> tuple[RequestPlan, Responder]:
        model_cls: type[GenerationRequest] = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
        try:
            req = model_cls.model_validate_json(await request.body())
        except pydantic.ValidationError as e:
            raise from_validation_error(e) from None
        if ignored := ignored_fields(req):
            log.warning("The following fields were present in the request but ignored: %s", sorted(ignored))
        if isinstance(req, ChatCompletionRequest):
            plan, responder_cls = self.jobs.chat(req, arrival), ChatResponder
        else:
            assert isinstance(req, CompletionRequest)
            plan, responder_cls = self.jobs.completion(req, arrival), CompletionResponder
        await self.generation.require_decode_worker()
        responder: Responder = responder_cls(plan, self.config.model_name, self.texts)
        return plan, responder


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Await `work`, cancelling it (and so aborting the request on the workers) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(CLIENT_GONE, "client closed the connection")
    finally:
        watcher.cancel()
        task.cancel()


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _take_gc_pauses(metrics: RouterMetrics) -> None:
    while True:
        await asyncio.sleep(GC_REPORT_S)
        metrics.take_gc_pauses()


def create_app(config: RouterConfig, tokenizer: Tokenizer, registry: WorkerRegistry) -> GenerationFront:
    """The router app (the FastAPI app behind a front that answers the generation endpoints directly,
    router/fast_path.py); the FastAPI app's lifespan starts and stops the registry's health polling."""
    service = RouterService(config, tokenizer, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        service.metrics.gc_pauses.start()
        gc_task = asyncio.create_task(_take_gc_pauses(service.metrics), name="gc-pauses")
        try:
            yield
        finally:
            gc_task.cancel()
            service.metrics.gc_pauses.stop()
            await service.generation.streams.aclose()
            await registry.stop()

    app = FastAPI(title="disagg router", summary="OpenAI-compatible API of a disaggregated prefill/decode cluster",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.service = service
    install_error_handlers(app)
    auth = [Depends(service.check_api_key)]
    app.include_router(_openai_routes(service), dependencies=auth)
    app.include_router(utility_routes(service.tokenizer, service.model_card, config.model_name), dependencies=auth)
    app.include_router(_ops_routes(service))
    install_openapi(app)
    return GenerationFront(app, service)


def _openai_routes(service: RouterService) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI"])

    @api.post("/completions", **body_docs(CompletionRequest, "A completion (or, with stream, its chunks)",
                                              CompletionResponse))
    async def completions(request: Request) -> Response:
        return await service.generate(request, "completions")

    @api.post("/chat/completions", **body_docs(ChatCompletionRequest, "A chat completion (or its chunks)",
                                                   ChatCompletionResponse))
    async def chat_completions(request: Request) -> Response:
        return await service.generate(request, "chat")

    @api.get("/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return ModelList(data=[service.model_card()]).model_dump(mode="json")

    @api.get("/models/{model}", response_model=ModelCard)
    async def model(model: str) -> dict[str, Any]:
        if model != service.config.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return service.model_card().model_dump(mode="json")

    return api


def _ops_routes(service: RouterService) -> APIRouter:
    ops = APIRouter(tags=["operations"])

    @ops.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @ops.get("/ready")
    async def ready() -> JSONResponse:
        workers = [{"address": w.address, "worker_id": w.worker_id, "role": w.role, "healthy": w.healthy,
                    "draining": w.draining or w.remote_draining, "error": w.error} for w in service.workers.workers()]
        ok = bool(service.workers.candidates("decode"))
        return JSONResponse({"ready": ok, "workers": workers}, status_code=200 if ok else 503)

    @ops.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return ops
