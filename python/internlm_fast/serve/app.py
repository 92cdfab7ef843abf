"""The OpenAI-compatible HTTP API over an Engine: `create_app(engine, model_name, api_key)`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics (Prometheus text), GET / (the chat page) and /static/* (its files).

With an api_key, every /v1/* route needs `Authorization: Bearer <key>`; /health, /metrics and the
page stay open, so that load balancers and Prometheus need no secret and the page can load before
the user types the key. Every error is OpenAI's {"error": {"message", "type", "param", "code"}}:
bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batch import Batch, GenerationError
from .metrics import CONTENT_TYPE, Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest, error_body, parse_body
from .responses import DONE, ResponseBuilder, TokenText, sse

STATIC_DIR = Path(__file__).parent / "static"
# a body larger than this is refused before it is read whole: far more than any context holds
MAX_BODY_BYTES = 16 * 1024 * 1024
_ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def create_app(engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`. The caller starts and shuts down the
    engine (it outlives the app's event loop in tests that build several apps)."""
    app = FastAPI(title="internlm_fast", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine.stats)
    tokenizer = engine.tokenizer
    token_text = TokenText(tokenizer)
    # the engine's own chat_prompt spells earlier answers with the ids it generated them as, so a
    # chat's next turn hits its prefix cache; the tokenizer's is the plain template
    chat_prompt = getattr(engine, "chat_prompt", None) or tokenizer.chat_prompt
    created = int(time.time())
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name
    _install_error_handlers(app)
    app.add_middleware(_Gate, api_key=api_key or None, metrics=metrics)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "internlm_fast",
            "max_model_len": engine.max_model_len,
        }

    async def run(request: Request, body: SamplingRequest, prompts: list[list[int]], chat: bool) -> Response:
        batch = Batch(engine, metrics, prompts, body, "messages" if chat else "prompt")
        batch.submit()
        builder = ResponseBuilder(batch, model_name, chat, token_text, body.logprobs_k() is not None)
        if body.stream:
            return _BatchStream(batch, _stream(builder, batch, request.is_disconnected))
        try:
            async for _ in batch.events(request.is_disconnected):
                pass
        except GenerationError as e:
            raise APIError(str(e), 500, code="generation_failed") from e
        if batch.client_gone:
            raise APIError("the client closed the connection", 499, code="client_closed_request")
        return JSONResponse(builder.response())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await _read_body(request), ChatCompletionRequest)
        check_model(body.model)
        try:
            prompt = chat_prompt(body.template_messages())
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        return await run(request, body, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await _read_body(request), CompletionRequest)
        check_model(body.model)
        return await run(request, body, _completion_prompts(body.prompt, tokenizer), chat=False)

    @app.get("/")
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError("the chat page is not installed (static/index.html is missing)", 404)
        return FileResponse(page)

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _completion_prompts(prompt: str | list, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: strings are encoded with <s> first, as InternLM was trained; token
    id lists are taken as they are, after a range check."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, bos=True)]
    if isinstance(prompt[0], str):
        return [tokenizer.encode(p, bos=True) for p in prompt]
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    vocab = tokenizer.vocab_size
    for i, ids in enumerate(lists):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    return [list(ids) for ids in lists]


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(f"the request body is larger than {MAX_BODY_BYTES} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream(
    builder: ResponseBuilder, batch: Batch, disconnected: Callable[[], Awaitable[bool]]
) -> AsyncIterator[str]:
    for chunk in builder.role_chunks():
        yield chunk
    try:
        async for choice, out in batch.events(disconnected):
            chunk = builder.token_chunk(choice, out)
            if chunk is not None:
                yield chunk
    except Exception as e:
        # the status line is long sent: the error travels as an event, as OpenAI's streams do
        code = "generation_failed" if isinstance(e, GenerationError) else "internal_error"
        yield sse(error_body(str(e) or type(e).__name__, "server_error", None, code))
        yield DONE
        return
    if batch.client_gone:
        return
    if batch.body.include_usage:
        yield builder.usage_chunk()
    yield DONE


class _BatchStream(StreamingResponse):
    """An SSE response that cancels its engine requests however it ends: finished, the client gone
    (the send fails or the disconnect is noticed), or the server shutting down."""

    def __init__(self, batch: Batch, content: AsyncIterator[str]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.batch = batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.batch.cancel()
            try:
                await self.body_iterator.aclose()
            except Exception:
                pass


# errors ----------------------------------------------------------------------------------------------


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
    err = APIError(message, status, param=param, code=code, headers=headers)
    return JSONResponse(err.body(), status_code=status, headers=err.headers or None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            return _error_response(404, f"Unknown request URL: {where}", code="unknown_url")
        if e.status_code == 405:
            return _error_response(405, f"Method not allowed: {where}", code="method_not_allowed", headers=e.headers)
        return _error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        loc = [str(p) for p in errors[0].get("loc", ())] if errors else []
        msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return _error_response(400, f"{'.'.join(loc)}: {msg}", param=loc[-1] if loc else None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return _error_response(500, f"internal server error: {type(e).__name__}", code="internal_error")


class _Gate:
    """ASGI middleware: the API key check on /v1/*, and the request counter by endpoint and status
    (a pure ASGI middleware, because BaseHTTPMiddleware would buffer the event streams' disconnects)."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = 500  # what an exception escaping the app becomes

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
                response = _error_response(
                    401,
                    "Incorrect API key provided: pass it as `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, counted_send)
                return
            await self.app(scope, receive, counted_send)
        finally:
            self.metrics.count_request(_endpoint_label(path), status)


def _endpoint_label(path: str) -> str:
    """A bounded label set: a scan of random URLs must not grow the metrics without bound."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/static/"):
        return "/static"
    return "other"
