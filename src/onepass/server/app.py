"""The FastAPI app: OpenAI's /v1/completions and /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics and the page at /.

A request is checked here (types by pydantic, values by SamplingParams / SpeculativeConfig,
the prompt against the context window) and then handed to the scheduler as a Job; the handler
only waits for the job's events and writes them out. Whatever happens (the client leaves, the
timeout passes, the server stops), the handler's exit cancels the job, and the scheduler stops
generating at the next step.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` bodies: 400 a bad value
or an unsupported option, 401 a missing or wrong API key, 404 an unknown model or route, 413 a
body over the limit, 422 malformed JSON or a wrong type, 429 the queue is full (with
Retry-After), 503 shutting down or no model, 504 the request timeout passed; anything else is
a 500 with a generic message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from onepass.config import SpeculativeConfig
from onepass.errors import InputError
from onepass.sampling import SamplingParams
from onepass.server.guards import RequestGuard, add_error_handlers
from onepass.server.metrics import ServerMetrics
from onepass.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    Reply,
    model_card,
    new_id,
    now,
)
from onepass.server.scheduler import Choice, Event, Job, QueueFull, Scheduler, Unavailable
from onepass.server.streams import JobStreamingResponse, JobWaiter, Output, sse

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerOptions:
    speculative_config: SpeculativeConfig | None = None
    """The default for requests that do not give one (None: plain decoding)."""
    max_queue: int = 32
    """Requests waiting (besides the running ones) before new ones get a 429."""
    max_batch: int = 8
    """Completions generated side by side, sharing each forward (continuous batching)."""
    api_key: str | None = None
    """If set, /v1/* requires `Authorization: Bearer <api_key>`."""
    request_timeout: float | None = 600.0
    """Seconds from arrival (queueing included) to the last token; None: no limit."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get a 413."""
    created: int = field(default_factory=now)


def create_app(llm: Any, options: ServerOptions | None = None) -> FastAPI:
    """The app serving `llm` (an onepass LLM built without a speculative_config: the server's
    default goes in options). Its scheduler thread starts and stops with the app's lifespan."""
    options = options or ServerOptions()
    if llm.speculative_config is not None:
        raise ValueError(
            "build the LLM without speculative_config and give the server's default as "
            "ServerOptions.speculative_config (plain decoding must stay reachable per request)"
        )
    metrics = ServerMetrics(llm.model_name)
    scheduler = Scheduler(llm, options.max_queue, metrics, options.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="onepass", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(RequestGuard, api_key=options.api_key, max_body=options.max_body_bytes)
    add_error_handlers(app)
    handler = Handler(llm, options, scheduler)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.alive:
            return JSONResponse({"status": "ok"})
        status = "shutting down" if scheduler.stopping else "unavailable"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        waiting, running = scheduler.counts()
        return PlainTextResponse(
            metrics.render(waiting, running), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = model_card(
            llm.model_name, options.created, llm.max_model_len, options.speculative_config
        )
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await handler.serve(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await handler.serve(body, request, chat=True)

    return app


# -- requests ------------------------------------------------------------------------------------


class Handler:
    """Checks a request, queues its job and writes out the job's events."""

    def __init__(self, llm: Any, options: ServerOptions, scheduler: Scheduler) -> None:
        self.llm = llm
        self.options = options
        self.scheduler = scheduler

    async def serve(self, body: Any, request: Request, chat: bool) -> Any:
        choices, spec, n = await self._choices(body, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # from the scheduler thread
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(choices, spec, on_event)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        timeout = self.options.request_timeout
        deadline = loop.time() + timeout if timeout else None
        waiter = JobWaiter(job, events, deadline, self.scheduler, timeout)
        kind = "text_completion"
        if chat:
            kind = "chat.completion.chunk" if body.stream else "chat.completion"
        reply = Reply(new_id("chatcmpl" if chat else "cmpl"), kind, now(), self.llm.model_name)
        output = Output(reply, chat, n)
        if body.stream:
            return JobStreamingResponse(
                sse(waiter, output, body.include_usage),
                on_close=lambda: self.scheduler.cancel(job, "cancelled"),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            await waiter.run_to_end(output, request)
        finally:
            self.scheduler.cancel(job, "cancelled")  # no-op unless the handler is leaving early
        return output.response()

    async def _choices(
        self, body: Any, chat: bool
    ) -> tuple[list[Choice], SpeculativeConfig | None, int]:
        """The request's choices to generate, its speculative config and n; ApiError if the
        server cannot serve it as asked."""
        if not self.scheduler.alive:
            raise ApiError(503, "the server is shutting down or has no model")
        if body.model is not None and body.model != self.llm.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.llm.model_name!r}",
                param="model",
            )
        body.check_supported()
        prompts = [body.chat_messages()] if chat else body.prompts()
        max_tokens = body.max_new_tokens() if chat else _or(body.max_tokens, 16)
        try:
            params = body.sampling_params(max_tokens)
            spec = body.speculative(self.options.speculative_config)
            # tokenizing a long prompt takes a while: off the event loop
            await run_in_threadpool(self._check_prompts, prompts, params)
        except InputError as e:
            raise ApiError(400, str(e), param=_param_of(e)) from None
        choices = [
            Choice(i * params.n + j, prompt, choice_params)
            for i, prompt in enumerate(prompts)
            for j, choice_params in enumerate(_per_choice(params))
        ]
        return choices, spec, params.n

    def _check_prompts(self, prompts: list[Any], params: SamplingParams) -> None:
        """The checks LLM.stream makes, before queueing: bad prompts get their 400 at once."""
        for prompt in prompts:
            ids = self._token_ids(prompt)
            limit = self.llm.max_model_len
            if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
                raise InputError(
                    f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                    f"together they exceed the context window of {limit} tokens"
                )

    def _token_ids(self, prompt: Any) -> list[int]:
        """The prompt's token ids as LLM.stream will see them (and check them again)."""
        if isinstance(prompt, list):
            return self.llm.chat_token_ids(prompt)
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            ids = self.llm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = prompt["prompt_token_ids"]
            vocab = self.llm.model_config.vocab_size
            if not ids or not all(0 <= t < vocab for t in ids):
                raise InputError(
                    f"prompt token ids must be a non-empty list of ids in [0, {vocab})"
                )
        if len(ids) >= self.llm.max_model_len:
            raise InputError(
                f"the prompt has {len(ids)} tokens; the context window is {self.llm.max_model_len}"
            )
        return ids


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _per_choice(params: SamplingParams) -> list[SamplingParams]:
    """n copies with n=1, seeded as LLM.generate seeds its n completions (so the server's n
    choices for a seed are LLM.generate's)."""
    if params.n == 1:
        return [params]
    seed = params.seed if params.seed is not None else random.randrange(2**63)
    return [
        params.replace(n=1, seed=seed if j == 0 else hash((seed, j)) & (2**63 - 1))
        for j in range(params.n)
    ]


def _param_of(error: InputError) -> str | None:
    """The option an InputError is about, when its message starts with the option's name."""
    first = str(error).split(" ", 1)[0]
    return first if first in SamplingParams.__dataclass_fields__ else None


# -- running it ----------------------------------------------------------------------------------


def uvicorn_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> Any:
    """A uvicorn.Server for the app that, when asked to stop, first stops the scheduler
    (queued and running requests end with a 503 / error event) instead of waiting for every
    stream to finish."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            await run_in_threadpool(app.state.scheduler.stop)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    return Server(config)
