"""How a job's events become an HTTP answer: one JSON response (chat.completion /
text_completion), or server-sent events (chunks, then `data: [DONE]`), with the job's deadline
and the client's departure watched on the way. Whatever way the answer ends, the job is
cancelled on the way out (a no-op once it has ended), so the scheduler frees the model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from onepass.server.protocol import ApiError, ChoiceStats, Reply, usage
from onepass.server.scheduler import Delta, Done, Event, Failed, Job, Scheduler

PING_SECONDS = 15.0
"""A stream idle this long (queued behind other requests) gets an SSE comment, so that
proxies and clients do not take it for dead."""


class JobWaiter:
    """The HTTP side of a job: its events, its deadline."""

    def __init__(
        self,
        job: Job,
        events: asyncio.Queue[Event],
        deadline: float | None,
        scheduler: Scheduler,
        timeout: float | None,
    ) -> None:
        self.job, self.events, self.deadline = job, events, deadline
        self.scheduler, self.timeout = scheduler, timeout

    def timed_out(self) -> ApiError:
        self.scheduler.cancel(self.job, "timeout")
        return ApiError(504, f"the request did not finish within the {self.timeout:g} s timeout")

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    async def next(self, idle: float) -> Event | None:
        """The next event; None if `idle` seconds pass first. Raises ApiError(504) at the
        deadline (and cancels the job)."""
        if not self.events.empty():  # what has arrived counts, even past the deadline
            return self.events.get_nowait()
        wait, remaining = idle, self.remaining()
        if remaining is not None:
            if remaining <= 0:
                raise self.timed_out()
            wait = min(wait, remaining)
        try:
            return await asyncio.wait_for(self.events.get(), wait)
        except asyncio.TimeoutError:
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                raise self.timed_out() from None
            return None

    async def run_to_end(self, output: Output, request: Request) -> None:
        """Collect every event into `output`, watching for the client leaving."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(self.next(PING_SECONDS))
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():  # the client left: nobody to answer
                    event.cancel()
                    self.scheduler.cancel(self.job, "cancelled")
                    raise ApiError(499, "the client closed the connection")
                got = event.result()
                if got is None:
                    continue
                if isinstance(got, Failed):
                    raise failure(got)
                if isinstance(got, Done):
                    return
                output.add(got)
        finally:
            gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def failure(event: Failed) -> ApiError:
    if event.reason == "invalid":
        return ApiError(400, event.message)
    if event.reason == "shutdown":
        return ApiError(503, "the server is shutting down")
    if event.reason == "timeout":
        return ApiError(504, "the request timed out")
    if event.reason == "cancelled":
        return ApiError(499, "the request was cancelled")
    return ApiError(500, "internal error while generating (see the server log)")


class Output:
    """A job's choices as they arrive, and their OpenAI shapes (chat or text completion)."""

    def __init__(self, reply: Reply, chat: bool, n: int) -> None:
        self.reply, self.chat, self.n = reply, chat, n
        self.texts: dict[int, list[str]] = {}
        self.sources: dict[int, list[str]] = {}
        self.finish: dict[int, tuple[str | None, Any]] = {}
        self.stats: dict[int, ChoiceStats] = {}
        self.prompt_tokens: dict[int, int] = {}  # by prompt

    def add(self, d: Delta) -> None:
        self.texts.setdefault(d.index, []).append(d.text)
        self.sources.setdefault(d.index, []).extend(d.token_sources)
        self.prompt_tokens[d.index // self.n] = d.prompt_tokens
        if d.finish_reason is not None:
            self.finish[d.index] = (d.finish_reason, d.stop_reason)
        if d.stats is not None:
            self.stats[d.index] = d.stats

    def usage(self) -> dict[str, int]:
        completion = sum(len(s) for s in self.sources.values())
        return usage(sum(self.prompt_tokens.values()), completion)

    def onepass(self) -> dict[str, Any] | None:
        stats = [self.stats[i] for i in sorted(self.stats)]
        return ChoiceStats.merge(stats).as_dict() if stats else None

    def response(self) -> dict[str, Any]:
        choices = []
        for i in sorted(self.texts):
            text = "".join(self.texts[i])
            finish_reason, stop_reason = self.finish.get(i, (None, None))
            body: dict[str, Any] = {"index": i}
            if self.chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["text"] = text
            body |= {
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "token_sources": self.sources[i],
            }
            choices.append(body)
        return self.reply.envelope(choices, usage=self.usage(), onepass=self.onepass())

    def chunks(self, d: Delta) -> list[dict[str, Any]]:
        """The stream chunks for a delta (chat: a role chunk opens each choice)."""
        first = d.index not in self.texts
        self.add(d)
        out = []
        if self.chat and first:
            out.append(self._chunk(d.index, {"role": "assistant", "content": ""}))
        if d.token_ids or d.text:
            out.append(
                self._chunk(
                    d.index,
                    {"content": d.text} if self.chat else d.text,
                    token_sources=d.token_sources,
                    text_sources=d.text_sources,
                )
            )
        if d.finish_reason is not None:
            last = self._chunk(
                d.index,
                {} if self.chat else "",
                finish_reason=d.finish_reason,
                stop_reason=d.stop_reason,
            )
            if d.stats is not None:
                last["onepass"] = d.stats.as_dict()
            out.append(last)
        return out

    def _chunk(self, index: int, delta: Any, **fields: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        choice |= {"delta": delta} if self.chat else {"text": delta}
        choice |= {"logprobs": None, "finish_reason": None} | fields
        return self.reply.envelope([choice])

    def usage_chunk(self) -> dict[str, Any]:
        return self.reply.envelope([], usage=self.usage(), onepass=self.onepass())


def sse_event(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse(waiter: JobWaiter, output: Output, include_usage: bool) -> AsyncIterator[str]:
    """The job as server-sent events, ending in `data: [DONE]`. Once the stream has started,
    an error (timeout, shutdown, a failure) is an `{"error": ...}` event before [DONE]."""
    try:
        while True:
            try:
                event = await waiter.next(PING_SECONDS)
            except ApiError as e:
                yield sse_event(e.body())
                break
            if event is None:
                yield ": ping\n\n"
            elif isinstance(event, Delta):
                for chunk in output.chunks(event):
                    yield sse_event(chunk)
            elif isinstance(event, Done):
                if include_usage:
                    yield sse_event(output.usage_chunk())
                break
            else:
                yield sse_event(failure(event).body())
                break
        yield "data: [DONE]\n\n"
    finally:
        waiter.scheduler.cancel(waiter.job, "cancelled")  # no-op once the job has ended


class JobStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls on_close however it ends: a client that leaves cancels
    the task writing the stream, which may leave the generator suspended and unclosed."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
