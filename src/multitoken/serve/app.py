"""The HTTP layer: OpenAI-style `POST /v1/completions` and `GET /v1/models`, plus `GET /health` and
`GET /metrics` (Prometheus), on Starlette. Handlers validate, tokenize and queue; the engine thread
decodes and hands each request's outputs to an asyncio queue. Handlers never touch the model.

Every error is an OpenAI-style body, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
for bad input (400), a missing or wrong API key (401), an unknown model (404), a body over the size
limit (413) and a full queue (429).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from multitoken.serve.engine import (ContextLengthError, Engine, Output, QueueFull, Request, SamplingParams,
                                     TokenLogprob)
from multitoken.serve.metrics import Metrics
from multitoken.tokenizer import StreamDecoder, Tokenizer

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI allows


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False  # a last chunk with the token counts and no choices


class CompletionRequest(BaseModel):
    # strict: "5" is not a number; extra fields (user, stream_options, ...) are accepted and ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream_options: StreamOptions | None = None
    # OpenAI fields that would change the output and that this server does not implement: refused
    # when set, rather than silently ignored.
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def unsupported(self) -> list[str]:
        given = {"echo": self.echo, "suffix": self.suffix, "best_of": self.best_of not in (None, 1),
                 "logit_bias": self.logit_bias, "presence_penalty": self.presence_penalty,
                 "frequency_penalty": self.frequency_penalty}
        return [name for name, value in given.items() if value]


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_n: int = 8  # completions per prompt


class _StopText:
    """One completion's text, cut at the first stop string. Text that may be the start of a stop
    string is held back until the next tokens tell, so a stream never sends what it must take back."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.pending = ""
        self.stopped = False

    def feed(self, tokens: list[int], final: bool) -> str:
        for t in tokens:
            self.pending += self.decoder.push(t)
        if final:
            self.pending += self.decoder.flush()
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[: min(hits)], ""
            return text
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if self.pending.endswith(s[:n])),
                                   default=0)
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text


@dataclass
class _Event:
    index: int  # the choice: prompt i, completion j is choice i * n + j
    text: str
    output: Output
    finish_reason: str | None


class _Job:
    """One HTTP completion request: an engine request per choice, their outputs on one asyncio queue."""

    def __init__(self, prompts: list[list[int]], body: CompletionRequest, tokenizer: Tokenizer):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output] | None] = asyncio.Queue()
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.n_tokens = 0
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])

        def sink(i: int):
            def on_output(out: Output) -> None:  # on the engine thread
                with contextlib.suppress(RuntimeError):  # the loop is gone: the server is exiting
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))
            return on_output

        self.requests: list[Request] = []
        for prompt in prompts:
            for _ in range(body.n):
                i = len(self.requests)
                # Choice i of a seeded request gets seed + i: reproducible, and the choices differ.
                seed = None if body.seed is None else body.seed + i
                params = SamplingParams(body.max_tokens, body.temperature, body.top_p, seed, body.logprobs)
                self.requests.append(Request(prompt, params, sink(i)))
        self.texts = [_StopText(tokenizer, stop) for _ in self.requests]

    def cancel(self) -> None:
        """Free the engine rows now (the client is gone) and wake whoever awaits the queue."""
        for r in self.requests:
            r.cancel()
        self.queue.put_nowait(None)

    async def events(self) -> AsyncIterator[_Event]:
        running = set(range(len(self.requests)))
        while running:
            item = await self.queue.get()
            if item is None:
                return
            i, out = item
            if i not in running:  # already ended at a stop string
                continue
            now = time.perf_counter()
            if out.tokens:
                self.first_token = self.first_token or now
                self.n_tokens += len(out.tokens)
            text = self.texts[i].feed(out.tokens, final=out.finish_reason is not None)
            reason = out.finish_reason
            if self.texts[i].stopped:
                reason = "stop"
                self.requests[i].cancel()
            if reason is not None:
                running.discard(i)
            yield _Event(i, text, out, reason)


def _logprobs_json(tokenizer: Tokenizer, out: Output) -> dict | None:
    if out.logprobs is None:
        return None

    def top(lp: TokenLogprob) -> dict[str, float]:
        # Keys are token texts, as OpenAI's format has it; tokens with the same text (byte pieces of
        # one character, say) keep the likelier one's logprob.
        texts: dict[str, float] = {}
        for t, v in lp.top:
            texts.setdefault(tokenizer.decode([t]), v)
        return texts

    return {
        "tokens": [tokenizer.decode([t]) for t in out.tokens],
        "token_logprobs": [lp.logprob for lp in out.logprobs],
        "top_logprobs": [top(lp) for lp in out.logprobs],
    }


def create_app(engine: Engine, tokenizer: Tokenizer, config: ServerConfig) -> Starlette:
    metrics = Metrics(engine)
    created = int(time.time())

    def parse(raw: bytes) -> tuple[CompletionRequest, list[list[int]]]:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = CompletionRequest.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"][:1]) or None
            raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
        if body.model is not None and body.model != config.model_name:
            raise APIError(404, f"model {body.model!r} does not exist: this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        if unsupported := body.unsupported():
            raise APIError(400, f"{unsupported[0]} is not supported by this server", param=unsupported[0])
        if body.n > config.max_n:
            raise APIError(400, f"n must be at most {config.max_n}, got {body.n}", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if len(stop) > MAX_STOP or not all(stop):
            raise APIError(400, f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
        p = body.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts = [tokenizer.encode(x, bos=True, eos=False) if isinstance(x, str) else x for x in p]
        if len(prompts) * body.n > engine.max_queue:
            raise APIError(400, f"{len(prompts) * body.n} completions in one request: at most {engine.max_queue}",
                           param="n")
        params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed, body.logprobs)
        for prompt in prompts:
            try:
                engine.check(prompt, params)
            except ContextLengthError as e:
                raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
            except ValueError as e:
                raise APIError(400, str(e), param=None if prompt else "prompt") from None
        return body, prompts

    async def read_body(request: HTTPRequest) -> bytes:
        limit = config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked bodies have no length to check up front
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def completions(request: HTTPRequest) -> Response:
        body, prompts = parse(await read_body(request))
        job = _Job(prompts, body, tokenizer)
        try:
            engine.submit(job.requests)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": config.model_name}
        usage_prompt = sum(map(len, prompts))
        if body.stream:
            usage = usage_prompt if body.stream_options and body.stream_options.include_usage else None
            return StreamingResponse(_stream(job, head, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        # Not streaming: a client that hangs up while it waits frees its rows all the same.
        watcher = asyncio.create_task(_until_disconnect(request))
        watcher.add_done_callback(lambda _: job.cancel())
        texts = [""] * len(job.requests)
        logprobs: list[dict | None] = [None] * len(job.requests)
        reasons: list[str | None] = [None] * len(job.requests)
        try:
            async for ev in job.events():
                texts[ev.index] += ev.text
                if (lp := _logprobs_json(tokenizer, ev.output)) is not None:
                    acc = logprobs[ev.index] = logprobs[ev.index] or {k: [] for k in lp}
                    for k, v in lp.items():
                        acc[k] += v
                reasons[ev.index] = ev.finish_reason
        finally:
            watcher.cancel()
        _observe(job)
        _raise_for_abort(reasons)
        choices = [{"text": t, "index": i, "logprobs": lp, "finish_reason": r}
                   for i, (t, lp, r) in enumerate(zip(texts, logprobs, reasons))]
        return JSONResponse({**head, "choices": choices, "usage": _usage(usage_prompt, job)})

    async def _stream(job: _Job, head: dict, usage_prompt: int | None) -> AsyncIterator[str]:
        try:
            async for ev in job.events():
                if ev.finish_reason in ("error", "shutdown"):
                    yield f"data: {json.dumps(_abort_error(ev.finish_reason).body())}\n\n"
                    return
                if ev.text or ev.finish_reason or ev.output.logprobs:
                    choice = {"text": ev.text, "index": ev.index, "logprobs": _logprobs_json(tokenizer, ev.output),
                              "finish_reason": ev.finish_reason}
                    yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
            if usage_prompt is not None:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(usage_prompt, job)})}\n\n"
            yield "data: [DONE]\n\n"
            _observe(job)
        finally:
            job.cancel()  # a client gone mid-stream frees its rows at once (no-op when finished)

    def _observe(job: _Job) -> None:
        if job.first_token is None:
            return
        end = time.perf_counter()
        metrics.time_to_first_token.observe(job.first_token - job.start)
        metrics.request_latency.observe(end - job.start)
        if job.n_tokens > 1:
            metrics.time_per_token.observe((end - job.first_token) / (job.n_tokens - 1))

    async def models(request: HTTPRequest) -> Response:
        card = {"id": config.model_name, "object": "model", "created": created, "owned_by": "multitoken"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "running": len(engine.running), "waiting": engine.queue_length})

    async def prometheus(request: HTTPRequest) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def api_error(request: HTTPRequest, exc: Exception) -> Response:
        return exc.response()

    async def http_error(request: HTTPRequest, exc: Exception) -> Response:  # 404, 405 from the router
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

    async def server_error(request: HTTPRequest, exc: Exception) -> Response:
        return APIError(500, "internal server error", type="server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        thread = engine.start()
        yield
        # Graceful shutdown has already let in-flight requests finish (or timed out on them).
        engine.stop()
        await asyncio.to_thread(thread.join)

    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health), Route("/metrics", prometheus)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: api_error, HTTPException: http_error, Exception: server_error})
    if config.api_key:
        app.add_middleware(_RequireAPIKey, key=config.api_key)
    app.add_middleware(_CountRequests, metrics=metrics, paths={r.path for r in routes})  # outermost: counts 401s
    app.state.metrics = metrics
    return app


def _usage(prompt_tokens: int, job: _Job) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": job.n_tokens,
            "total_tokens": prompt_tokens + job.n_tokens}


def _abort_error(reason: str) -> APIError:
    if reason == "shutdown":
        return APIError(503, "the server shut down before the completion finished", type="server_error",
                        code="shutdown")
    return APIError(500, "decoding failed on the server", type="server_error")


def _raise_for_abort(reasons: list[str | None]) -> None:
    for r in reasons:
        if r in ("error", "shutdown"):
            raise _abort_error(r)


async def _until_disconnect(request: HTTPRequest) -> None:
    # The body is read: the next message is the disconnect (also sent once the response is complete).
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _RequireAPIKey:
    """Every request needs `Authorization: Bearer KEY`; compared in constant time."""

    def __init__(self, app: ASGIApp, key: str):
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class _CountRequests:
    def __init__(self, app: ASGIApp, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in self.paths else "other"  # bounded label values
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
