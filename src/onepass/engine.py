"""The one decoding loop: prefill, then propose -> score -> verify -> commit until the caller
stops iterating. Plain decoding is the same loop with an empty draft (one row per forward).

The token emitted last (recovered or bonus) is not yet in the KV cache: it is the root of the
next forward, whose row 0 scores it together with the next draft (design.md §3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.models.base import Backend, ModelOutput
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


def decode(
    backend: Backend,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    processor: LogitsProcessor,
    drafter: Drafter,
    rng: RequestRandomness,
    typical: tuple[float, float] | None = None,
) -> Iterator[Step]:
    """Yield each step's tokens. Stops when max_tokens are emitted or prompt + output fill the
    context window (backend.max_len); the caller applies EOS and stop conditions and simply
    stops iterating."""
    device = getattr(backend, "device", torch.device("cpu"))
    tokens = list(prompt_ids)  # prompt + emitted; the last one is the root
    drafter.start(tokens)
    out = backend.prefill(torch.tensor(tokens, device=device))
    first = processor.process(out.logits[-1:])
    step = Step(verify(Draft.empty(), first, processor, rng, typical).tokens, 0, verified=False)
    generated = 0
    while True:
        tokens.extend(step.tokens)
        processor.observe(step.tokens)
        generated += len(step.tokens)
        yield step
        root = step.tokens[-1]
        # The root is not in the KV cache yet: both it and `room` draft rows fit, and a step
        # emits at most depth + 1 tokens, so prompt + output never exceed max_len.
        room = backend.max_len - len(tokens)
        remaining = room if params.max_tokens is None else min(room, params.max_tokens - generated)
        if remaining <= 0:
            return
        state = DecodeState(tokens, len(prompt_ids), room, remaining - 1, params, rng)
        draft = drafter.propose(state).truncated(max_depth=state.max_depth, max_nodes=room)
        if len(draft) + len(draft.aux_tokens) > room:
            raise RuntimeError("a drafter proposed more rows than max_draft_tokens allows")
        ids, positions, mask = forward_rows(draft, root, backend.cache_len, device)
        out = backend.forward(ids, positions, mask)
        n = len(draft)
        row_drafts = None
        if params.has_penalties or params.min_tokens:
            row_drafts = [[]] + [
                [draft.tokens[a] for a in draft.tree.ancestors(i)] for i in range(n)
            ]
        logits = processor.process(out.logits[: n + 1], row_drafts)
        verdict = verify(draft, logits, processor, rng, typical)
        backend.commit(torch.tensor([0, *(i + 1 for i in verdict.path)]))
        drafter.observe(draft, verdict, out)
        sources = None
        if verdict.path:
            named = draft.sources or [None] * len(draft)
            sources = [named[i] for i in verdict.path] + [None]
        step = Step(verdict.tokens, len(draft), sources=sources)
