"""The one decoding loop: prefill, then propose -> score -> verify -> commit until the caller
stops iterating. Plain decoding is the same loop with an empty draft (one row per forward).
A request's loop is a Decoding, advanced one forward at a time, so that several requests can
share each forward (continuous batching, LLM.step).

The token emitted last (recovered or bonus) is not yet in the KV cache: it is the root of the
next forward, whose row 0 scores it together with the next draft (design.md §3).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from onepass.draft import BatchShare, DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.models.base import Backend, ModelOutput, Rows
from onepass.sampling import LogitsProcessor, RequestRandomness, SamplingParams
from onepass.verify import verify


class NoDrafter(Drafter):
    """Plain decoding: never proposes anything."""

    def fork(self) -> NoDrafter:
        return NoDrafter()

    def start(self, prompt_ids: Sequence[int]) -> None:
        pass

    def propose(self, state: DecodeState) -> Draft:
        return Draft.empty()

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        pass


def forward_rows(draft: Draft, root: int, start: int, device: torch.device):
    """ids, positions [rows] and mask [rows, rows] (or None = causal) for root + draft (+ aux)."""
    tree, n, m = draft.tree, len(draft), len(draft.aux_tokens)
    ids = torch.tensor([root, *draft.tokens, *draft.aux_tokens], device=device)
    offsets = [0, *tree.depths, *draft.aux_offsets]
    positions = torch.tensor([start + o for o in offsets], device=device)
    is_chain = all(p == i - 1 for i, p in enumerate(tree.parents))
    if is_chain and m == 0:
        return ids, positions, None
    if m == 0:
        return ids, positions, tree.mask(device)
    mask = torch.zeros(n + 1 + m, n + 1 + m, dtype=torch.bool)
    mask[: n + 1, : n + 1] = tree.mask()
    mask[n + 1 :] = draft.aux_mask
    return ids, positions, mask.to(device)


@dataclass(frozen=True)
class Step:
    """What one target forward emitted."""

    tokens: list[int]
    """Accepted draft tokens, then the recovered-or-bonus token."""
    num_draft_tokens: int
    """Draft nodes the forward scored besides the root."""
    verified: bool = True
    """False for the prefill's first token (no draft was verified)."""
    sources: list[str | None] | None = None
    """Per accepted token, the method that drafted it (None = the configured method); the last
    token, the target's own, has none. None: no token was drafted."""

    @property
    def num_accepted(self) -> int:
        return len(self.tokens) - 1


class Decoding:
    """One request's decoding, a forward at a time: `next_rows()` gives the rows its next
    forward must score (a prompt chunk, or the root and the draft), `advance(out)` takes their
    output, verifies and commits, and returns what the step emitted (None after a prompt chunk
    that is not the last). The caller runs the forward: alone (decode()), or together with
    other requests' rows (LLM.step). Runs until `exhausted` (max_tokens emitted or the context
    window full); the caller applies EOS and stop conditions and simply stops asking."""

    def __init__(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        processor: LogitsProcessor,
        drafter: Drafter,
        rng: RequestRandomness,
        typical: tuple[float, float] | None = None,
    ) -> None:
        self.backend = backend
        self.device = getattr(backend, "device", torch.device("cpu"))
        self.tokens = list(prompt_ids)  # prompt + emitted; the last one is the root
        self.num_prompt_tokens = len(self.tokens)
        self.params, self.processor, self.drafter = params, processor, drafter
        self.rng, self.typical = rng, typical
        self.generated = 0
        self.accepted_per_step = 0.0
        """Decaying mean of the draft tokens a step accepts (for the batch's pricing)."""
        self.drafting_seconds = 0.0
        """Time spent in the drafter's propose and observe (the bench reports its share)."""
        self._chunks = deque(backend.prefill_chunks(len(self.tokens)))
        self._prefilled = 0
        self._draft = Draft.empty()
        backend.reset()
        drafter.start(self.tokens)

    @property
    def prefilling(self) -> bool:
        return bool(self._chunks)

    @property
    def exhausted(self) -> bool:
        """Nothing more may be generated: max_tokens emitted, or the context window full."""
        return not self._chunks and self._remaining() <= 0

    def _room(self) -> int:
        # The root is not in the KV cache yet: both it and `room` draft rows fit, and a step
        # emits at most depth + 1 tokens, so prompt + output never exceed max_len.
        return self.backend.max_len - len(self.tokens)

    def _remaining(self) -> int:
        room, max_tokens = self._room(), self.params.max_tokens
        return room if max_tokens is None else min(room, max_tokens - self.generated)

    def next_rows(self, batch: BatchShare | None = None) -> Rows:
        """The rows of this request's next forward. batch: the other requests' share of it."""
        if self._chunks:
            start, size = self._prefilled, self._chunks[0]
            ids = torch.tensor(self.tokens[start : start + size], device=self.device)
            positions = torch.arange(start, start + size, device=self.device)
            return Rows(ids, positions, None, "last" if len(self._chunks) == 1 else "none")
        if self.exhausted:
            raise RuntimeError("the request is exhausted: nothing more may be generated")
        room = self._room()
        state = DecodeState(
            self.tokens,
            self.num_prompt_tokens,
            room,
            self._remaining() - 1,
            self.params,
            self.rng,
            batch,
        )
        began = time.perf_counter()
        draft = self.drafter.propose(state).truncated(max_depth=state.max_depth, max_nodes=room)
        self.drafting_seconds += time.perf_counter() - began
        if len(draft) + len(draft.aux_tokens) > room:
            raise RuntimeError("a drafter proposed more rows than max_draft_tokens allows")
        self._draft = draft
        ids, positions, mask = forward_rows(
            draft, self.tokens[-1], self.backend.cache_len, self.device
        )
        return Rows(ids, positions, mask)

    def advance(self, out: ModelOutput) -> Step | None:
        """Verify and commit the last rows' output; the step's emitted tokens."""
        if self._chunks:
            size = self._chunks.popleft()
            self.backend.commit(list(range(size)))
            self._prefilled += size
            if self._chunks:
                return None
            first = self.processor.process(out.logits[-1:])
            tokens = verify(Draft.empty(), first, self.processor, self.rng, self.typical).tokens
            self.drafter.observe_prompt(out, tokens[0])
            step = Step(tokens, 0, verified=False)
        else:
            step = self._verify(self._draft, out)
        self.tokens.extend(step.tokens)
        self.processor.observe(step.tokens)
        self.generated += len(step.tokens)
        return step

    def _verify(self, draft: Draft, out: ModelOutput) -> Step:
        n, params = len(draft), self.params
        row_drafts = None
        if params.has_penalties or params.min_tokens:
            row_drafts = [[]] + [
                [draft.tokens[a] for a in draft.tree.ancestors(i)] for i in range(n)
            ]
        logits = self.processor.process(out.logits[: n + 1], row_drafts)
        verdict = verify(draft, logits, self.processor, self.rng, self.typical)
        self.backend.commit(torch.tensor([0, *(i + 1 for i in verdict.path)]))
        began = time.perf_counter()
        self.drafter.observe(draft, verdict, out)
        self.drafting_seconds += time.perf_counter() - began
        if n:
            self.accepted_per_step = 0.8 * self.accepted_per_step + 0.2 * len(verdict.path)
        sources = None
        if verdict.path:
            named = draft.sources or [None] * n
            sources = [named[i] for i in verdict.path] + [None]
        return Step(verdict.tokens, n, sources=sources)


def decode(
    backend: Backend,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    processor: LogitsProcessor,
    drafter: Drafter,
    rng: RequestRandomness,
    typical: tuple[float, float] | None = None,
) -> Iterator[Step]:
    """One request alone: yield each step's tokens until max_tokens are emitted or prompt +
    output fill the context window (backend.max_len)."""
    decoding = Decoding(backend, prompt_ids, params, processor, drafter, rng, typical)
    while not decoding.exhausted:
        step = decoding.advance(backend.run(decoding.next_rows()))
        if step is not None:
            yield step
