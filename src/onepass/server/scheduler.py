"""The scheduler: one thread owns the LLM and advances every running request together.

HTTP handlers never touch the model. They submit a Job (its choices to generate, its
speculative config, a callback that receives its events) to a bounded queue. The scheduler
thread admits waiting jobs into the running batch between steps while it holds fewer than
max_batch choices, runs one shared forward for all running choices (LLM.step: continuous
batching, each choice with its own KV cache, its output exactly what it would be alone), and
hands every choice's new output to its job's callback as a Delta. A job ends with exactly one
terminal event (Done or Failed). A job carries its own cancel flag: a client that leaves or
times out sets it, and the scheduler drops the job's choices, and their KV caches, before the
next step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from onepass.config import SpeculativeConfig
from onepass.errors import InputError
from onepass.outputs import RequestMetrics, SpecDecodeStats
from onepass.sampling import SamplingParams
from onepass.server.metrics import ServerMetrics
from onepass.server.protocol import ChoiceStats
from onepass.server.sources import SourceTracker

log = logging.getLogger("onepass.server")

T = TypeVar("T")

STOP_TIMEOUT_SECONDS = 30.0
"""How long stop() waits for the scheduler thread (a step takes milliseconds; a long
prefill, under a second)."""


def build_off_thread(build: Callable[[], T]) -> T:
    """build() run in a thread that ends before this returns (its error raised here). Load
    the model and measure its cost curve this way before serving, so that the scheduler thread
    is the only live thread that has run parallel torch work: with libgomp (PyTorch's OpenMP on
    Linux) every such thread keeps a team of worker threads, and once the teams' threads
    outnumber the cores libgomp stops spinning between parallel regions. A forward has hundreds
    of them: the scheduler's forwards took 2.5-3x as long as the same forwards run in the
    thread that had loaded the model (2 cores, 1-row forwards of the default model)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(build())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="onepass-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


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


@dataclass(eq=False)
class Running:
    """A running choice: its request and what its deltas need."""

    job: Job
    choice: Choice
    request: Any
    """An onepass.request.Request."""
    seen: SpecDecodeStats = field(default_factory=SpecDecodeStats)
    """The counts already added to the server's metrics."""
    tracker: SourceTracker | None = None
    num_tokens: int = 0


class Scheduler:
    def __init__(
        self, llm: Any, max_queue: int, metrics: ServerMetrics, max_batch: int = 8
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.llm = llm
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: dict[Job, tuple[int, float]] = {}
        """Running jobs: (choices not finished yet, admission time)."""
        self._choices: list[Running] = []  # the scheduler thread's own
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
        """(waiting, running) jobs."""
        with self._cond:
            return len(self._waiting), len(self._jobs)

    def submit(self, job: Job) -> None:
        """Queue the job, or raise QueueFull / Unavailable."""
        with self._cond:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if not self._thread.is_alive():
                raise Unavailable("the model is not available (the scheduler stopped)")
            if len(self._waiting) >= self.max_queue:
                ahead = len(self._waiting) + 1
                seconds = self._seconds_per_job * ahead / self.max_batch
                retry = min(60, max(1, math.ceil(seconds)))
                self.metrics.request_done("rejected")
                raise QueueFull(retry)
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop the job (reason: cancelled, timeout or shutdown): a queued job leaves the
        queue now, a running one before the next step. No-op for an ended job."""
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
            running = list(self._jobs)
            self._cond.notify_all()
        for job in queued + running:
            self.cancel(job, "shutdown")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_SECONDS)

    # -- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._next_batch():
                self._drop_cancelled()
                if self._choices:
                    self._step()
        finally:
            for job in list(self._jobs):  # stopping: end what still runs
                self._finish(job, job.cancel_reason or "shutdown", Failed("shutdown"))

    def _next_batch(self) -> bool:
        """Wait for work, admit waiting jobs while the batch has room; False when stopping."""
        with self._cond:
            while not self._waiting and not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            admitted = []
            while self._waiting:
                size = len(self._waiting[0].choices)
                if self._jobs and len(self._choices) + size > self.max_batch:
                    break  # a job larger than max_batch runs when it has the model alone
                job = self._waiting.popleft()
                self._jobs[job] = (size, time.monotonic())
                admitted.append(job)
        for job in admitted:
            self._admit(job)
        return True

    def _admit(self, job: Job) -> None:
        """Start the job's choices (tokenized and checked by the LLM)."""
        started = []
        try:
            for choice in job.choices:
                request = self.llm.request(
                    choice.prompt, choice.params, speculative_config=job.spec
                )
                started.append(Running(job, choice, request))
        except InputError as e:  # the handler's checks should have caught it; the LLM did
            self._finish(job, "error", Failed("invalid", str(e)))
        except Exception:  # a bug: log it, fail this request, keep serving the others
            log.exception("request failed")
            self._finish(job, "error", Failed("internal"))
        else:
            self._choices += started

    def _drop_cancelled(self) -> None:
        for job in {r.job for r in self._choices if r.job.cancel_reason is not None}:
            self._finish(job, job.cancel_reason, Failed(job.cancel_reason))

    def _step(self) -> None:
        try:
            outputs = self.llm.step([r.request for r in self._choices])
        except Exception:  # a bug: fail the running requests, keep serving
            log.exception("a step failed")
            for job in {r.job for r in self._choices}:
                self._finish(job, "error", Failed("internal"))
            return
        for running, out in zip(list(self._choices), outputs, strict=True):
            if out is not None and running.job in self._jobs:
                self._deliver(running, out)

    def _deliver(self, running: Running, out: Any) -> None:
        if running.tracker is None:  # first output: the prompt is tokenized and prefilled
            self.metrics.prompt(len(out.prompt_token_ids))
            running.tracker = SourceTracker(
                self.llm.tokenizer, out.prompt_token_ids, running.choice.params.skip_special_tokens
            )
        c = out.outputs[0]
        sources = c.token_sources or ["target"] * len(c.token_ids)
        self.metrics.step(len(c.token_ids), out.metrics.spec, running.seen)
        running.num_tokens += len(c.token_ids)
        delta = Delta(
            index=running.choice.index,
            text=c.text,
            token_ids=list(c.token_ids),
            token_sources=list(sources),
            text_sources=running.tracker.split(c.token_ids, sources, c.text),
            prompt_tokens=len(out.prompt_token_ids),
        )
        if out.finished:
            delta.finish_reason, delta.stop_reason = c.finish_reason, c.stop_reason
            delta.stats = _stats(out.metrics, running.num_tokens)
        job = running.job
        job.on_event(delta)
        if out.finished:
            self._choices.remove(running)
            left, admitted = self._jobs[job]
            if left > 1:
                self._jobs[job] = (left - 1, admitted)
            else:  # even if a cancel came after the last step
                self._finish(job, "finished", Done())

    def _finish(self, job: Job, status: str, event: Done | Failed) -> None:
        """End a running job: close its choices' requests (their KV caches go with them)."""
        for running in [r for r in self._choices if r.job is job]:
            running.request.close()
            self._choices.remove(running)
        with self._cond:
            _, admitted = self._jobs.pop(job, (0, time.monotonic()))
            elapsed = time.monotonic() - admitted
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed
        self._end(job, status, event)

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
