"""The scheduler: one thread owns the LLM and serves queued jobs, one at a time.

HTTP handlers never touch the model. They submit a Job (its choices to generate, its
speculative config, a callback that receives its events) to a bounded queue; the scheduler
thread takes the oldest job, iterates `LLM.stream` for each of its choices and hands every
step to the callback as a Delta, then ends the job with exactly one terminal event (Done or
Failed). A job carries its own cancel flag: a client that leaves or times out sets it, and the
scheduler stops at the next step and closes the stream, which frees the model.

This loop is the part that continuous batching replaces: jobs, their events and their cancel
flags stay as they are, and the loop then advances every running job's choice by one step of
a shared forward instead of one job's stream to its end.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onepass.config import SpeculativeConfig
from onepass.errors import InputError
from onepass.outputs import RequestMetrics, SpecDecodeStats
from onepass.sampling import SamplingParams
from onepass.server.metrics import ServerMetrics
from onepass.server.protocol import ChoiceStats
from onepass.server.sources import SourceTracker

log = logging.getLogger("onepass.server")

STOP_TIMEOUT_SECONDS = 30.0
"""How long stop() waits for the scheduler thread (a step takes milliseconds; a long
prefill, under a second)."""


@dataclass
class Choice:
    """One completion to generate: an OpenAI choice."""

    index: int
    prompt: Any
    """What LLM.stream takes: a string, {"prompt_token_ids": [...]} or chat messages."""
    params: SamplingParams
    """n == 1; its seed (if any) is this choice's own."""


@dataclass
class Delta:
    """A step's new output for one choice."""

    index: int
    text: str
    token_ids: list[int]
    token_sources: list[str]
    """Per token: "target" or the drafter whose accepted draft produced it."""
    text_sources: list[list[str]]
    """`text` as [text, source] runs, one per token (see sources.py)."""
    prompt_tokens: int
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stats: ChoiceStats | None = None
    """On the choice's last delta."""


@dataclass
class Done:
    """The job's choices are all finished."""


@dataclass
class Failed:
    """The job ended early. reason: invalid (the LLM refused the input: message says why),
    internal (a bug, logged), shutdown, cancelled or timeout."""

    reason: str
    message: str = ""


Event = Delta | Done | Failed


@dataclass(eq=False)
class Job:
    choices: list[Choice]
    spec: SpeculativeConfig | None
    """None: plain decoding."""
    on_event: Callable[[Event], None]
    """Called from the scheduler thread (or from cancel's caller); must not block."""
    cancel_reason: str | None = field(default=None, init=False)
    """Set once by cancel(); the scheduler checks it before every step."""
    ended: bool = field(default=False, init=False)


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The server is shutting down, or the scheduler thread is gone."""


class Scheduler:
    def __init__(self, llm: Any, max_queue: int, metrics: ServerMetrics) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.llm = llm
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._seconds_per_job = 1.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="onepass-scheduler", daemon=True)

    # -- called from the HTTP side -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._cond:
            return len(self._waiting), int(self._running is not None)

    def submit(self, job: Job) -> None:
        """Queue the job, or raise QueueFull / Unavailable."""
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if not self._thread.is_alive():
                raise Unavailable("the model is not available (the scheduler stopped)")
            if len(self._waiting) >= self.max_queue:
                ahead = len(self._waiting) + 1
                retry = min(60, max(1, math.ceil(self._seconds_per_job * ahead)))
                self.metrics.request_done("rejected")
                raise QueueFull(retry)
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop the job (reason: cancelled, timeout or shutdown): a queued job leaves the
        queue now, a running one stops before its next step. No-op for an ended job."""
        with self._cond:
            if job.ended or job.cancel_reason is not None:
                return
            job.cancel_reason = reason
            if job not in self._waiting:
                return  # running: the scheduler thread ends it
            self._waiting.remove(job)
        self._end(job, reason, Failed(reason))

    def stop(self) -> None:
        """Refuse new jobs, cancel every queued and running one (they end as "shutdown") and
        wait for the thread. Idempotent."""
        with self._cond:
            self._stopping = True
            queued = list(self._waiting)
            running = self._running
            self._cond.notify_all()
        for job in queued:
            self.cancel(job, "shutdown")
        if running is not None:
            self.cancel(running, "shutdown")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_SECONDS)

    # -- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._waiting.popleft()
            start = time.monotonic()
            try:
                self._serve(job)
            finally:
                with self._cond:
                    self._running = None
                elapsed = time.monotonic() - start
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed

    def _serve(self, job: Job) -> None:
        try:
            completed = all(self._generate(job, choice) for choice in job.choices)
        except InputError as e:  # the handler's checks should have caught it; the LLM did
            self._end(job, "error", Failed("invalid", str(e)))
        except Exception:  # a bug: log it, fail this request, keep serving the others
            log.exception("request failed")
            self._end(job, "error", Failed("internal"))
        else:
            if completed:  # even if a cancel came after the last step
                self._end(job, "finished", Done())
            else:
                self._end(job, job.cancel_reason, Failed(job.cancel_reason))

    def _generate(self, job: Job, choice: Choice) -> bool:
        """Stream one choice to its end (True) or until the job is cancelled (False)."""
        stream = self.llm.stream(choice.prompt, choice.params, speculative_config=job.spec)
        seen = SpecDecodeStats()  # the counts already added to the server's metrics
        tracker = None
        num_tokens = 0
        try:
            while job.cancel_reason is None:
                out = next(stream, None)
                if out is None:
                    return True
                if tracker is None:  # first step: the prompt is tokenized and prefilled
                    self.metrics.prompt(len(out.prompt_token_ids))
                    tracker = SourceTracker(
                        self.llm.tokenizer, out.prompt_token_ids, choice.params.skip_special_tokens
                    )
                c = out.outputs[0]
                sources = c.token_sources or ["target"] * len(c.token_ids)
                self.metrics.step(len(c.token_ids), out.metrics.spec, seen)
                num_tokens += len(c.token_ids)
                delta = Delta(
                    index=choice.index,
                    text=c.text,
                    token_ids=list(c.token_ids),
                    token_sources=list(sources),
                    text_sources=tracker.split(c.token_ids, sources, c.text),
                    prompt_tokens=len(out.prompt_token_ids),
                )
                if out.finished:
                    delta.finish_reason, delta.stop_reason = c.finish_reason, c.stop_reason
                    delta.stats = _stats(out.metrics, num_tokens)
                job.on_event(delta)
                if out.finished:
                    return True
            return False
        finally:
            stream.close()  # releases the model at once, mid-request or not

    def _end(self, job: Job, status: str, event: Done | Failed) -> None:
        job.ended = True
        self.metrics.request_done(status)
        job.on_event(event)


def _stats(metrics: RequestMetrics, num_tokens: int) -> ChoiceStats:
    return ChoiceStats(
        method=metrics.method,
        lossless=metrics.lossless,
        completion_tokens=num_tokens,
        prefill_seconds=metrics.prefill_seconds,
        seconds=metrics.total_seconds,
        spec=metrics.spec,
    )
