"""One completion in progress, as the LLM facade sees it: the engine's Decoding plus what turns
its steps into RequestOutputs (text, stop conditions, metrics, token provenance). It advances a
forward at a time, so a caller can run one request to its end (LLM.stream) or several side by
side, each forward shared (LLM.step)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from onepass.draft import BatchShare
from onepass.drafters.base import Drafter
from onepass.engine import Decoding, Step
from onepass.models.base import Backend, ModelOutput, Rows
from onepass.outputs import CompletionOutput, RequestMetrics, RequestOutput, SpecDecodeStats
from onepass.sampling import LogitsProcessor, RequestRandomness, SamplingParams
from onepass.text import OutputAssembler

_request_ids = itertools.count()


class Request:
    """Ask `next_rows()` for the rows of its next forward, run them, hand the output to
    `advance()`, until `finished`. advance() returns the step's RequestOutput: with delta=True
    each holds the step's new text and token ids; else only the last one is returned, with the
    whole text. The last one has finish_reason set and the full metrics."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Any,
        eos_token_ids: list[int],
        vocab_size: int,
        ids: list[int],
        text: str | None,
        params: SamplingParams,
        method: str | None,
        lossless: bool,
        typical: tuple[float, float] | None,
        drafter: Drafter,
        rng: RequestRandomness,
        delta: bool = True,
    ) -> None:
        """method: the speculative method's name (None: plain decoding)."""
        self.request_id = str(next(_request_ids))
        self.backend = backend
        self.prompt_ids, self.text, self.params, self.delta = ids, text, params, delta
        self.drafter = drafter
        device = getattr(backend, "device", None)
        processor = LogitsProcessor(params, ids, vocab_size, eos_token_ids, device)
        self.assembler = OutputAssembler(tokenizer, ids, params, eos_token_ids)
        self.metrics = RequestMetrics(
            prompt_tokens=len(ids),
            method=method or "vanilla",
            lossless=lossless,
            spec=SpecDecodeStats(),
        )
        self.decoding = Decoding(backend, ids, params, processor, drafter, rng, typical)
        self.sources: list[str] = []  # per emitted token: "target" or the drafter that drafted it
        self.finished = False
        self._sent = 0
        self._start: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.decoding.prefilling

    def next_rows(self, batch: BatchShare | None = None) -> Rows:
        if self._start is None:
            self._start = time.perf_counter()
        return self.decoding.next_rows(batch)

    def advance(self, out: ModelOutput) -> RequestOutput | None:
        step = self.decoding.advance(out)
        if step is None:
            return None
        metrics, assembler = self.metrics, self.assembler
        if not metrics.prefill_seconds:
            metrics.prefill_seconds = time.perf_counter() - self._start
        taken = assembler.add(step.tokens)
        self.sources += self._step_sources(step)[:taken]
        if step.verified:  # count only the accepted tokens that were emitted
            metrics.spec.observe(step.num_draft_tokens, min(step.num_accepted, taken - 1))
        if not assembler.finished and self.decoding.exhausted:
            assembler.finish_length()  # max_tokens emitted or the context window full
        if assembler.finished:
            self._end()
            metrics.total_seconds = time.perf_counter() - self._start
            metrics.drafting_seconds = self.decoding.drafting_seconds
            return self._output(assembler.delta() if self.delta else assembler.text)
        return self._output(assembler.delta()) if self.delta else None

    def close(self) -> None:
        """The request ends here, finished or not."""
        self._end()

    def _end(self) -> None:
        if not self.finished:
            self.finished = True
            self.drafter.finish()  # what the request showed may now serve later ones

    def _step_sources(self, step: Step) -> list[str]:
        if step.sources is None:
            return ["target"] * len(step.tokens)
        method = self.metrics.method
        return [source or method for source in step.sources[:-1]] + ["target"]

    def _output(self, text: str) -> RequestOutput:
        """The tokens emitted since the last output (all of them without delta), with text."""
        new = slice(self._sent if self.delta else 0, len(self.sources))
        self._sent = new.stop
        assembler, finished = self.assembler, self.finished
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=assembler.token_ids[new],
            finish_reason=assembler.finish_reason if finished else None,
            stop_reason=assembler.stop_reason if finished else None,
            token_sources=self.sources[new],
        )
        return RequestOutput(
            self.request_id, self.text, self.prompt_ids, [completion], finished, self.metrics
        )
