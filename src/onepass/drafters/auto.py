"""Adaptive drafting: pick a drafter and a draft size every step by expected tokens per second.

Every step each model-free drafter (ngram, suffix, recycling by default) proposes a tree. Their
past proposals are scored counterfactually against the tokens that were actually emitted: with
deterministic drafts the verifier accepts exactly the longest draft path that matches the
emitted tokens (greedy, and sampling too, see verify/multi_draft.py), so "would have been
accepted" is known for every drafter, not only the one whose draft was scored. From these we
keep, per drafter and depth d, a decaying estimate a(d) of P(depth d accepted | depth d - 1
accepted).

For a proposal cut at depth D (using r(D) rows), the expected tokens per step are
E(D) = 1 + sum_{j<=D} prod_{i<=j} a(i), and the step costs t(1 + r(D)) from the backend's cost
curve (onepass.cost), rescaled online by the step times we observe. The step scores the
(drafter, D) maximising E(D) / t(1 + r(D)); if nothing beats plain decoding's 1 / t(1), the
draft is empty. So auto is never meaningfully slower than plain decoding (its only overhead is
drafting) and uses long drafts exactly where they pay.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from onepass.drafters import DraftContext, build_drafter, options_class
from onepass.drafters.base import DecodeState, Draft, Drafter
from onepass.models.base import ModelOutput
from onepass.verify.base import Verdict

MAX_PENDING = 64  # proposals awaiting enough emitted tokens to be scored, per drafter


@dataclass
class Options:
    methods: list[str] = field(default_factory=lambda: ["ngram", "suffix", "recycling"])
    """Candidate drafters (each with its default options)."""
    max_nodes: int = 15
    """Largest draft considered per step (15 + the root = 16 rows, where the CPU backend's cost
    steps up; the cost curve would price larger drafts, but they rarely pay)."""
    decay: float = 0.97
    """Weight of the past in the acceptance estimates (closer to 1 = slower to adapt)."""
    prior_acceptance: float = 0.5
    """Acceptance assumed before any evidence, worth two observations."""

    def __post_init__(self) -> None:
        from onepass.drafters import METHODS

        bad = [m for m in self.methods if m not in METHODS or m == "auto"]
        if not self.methods or bad:
            raise ValueError(f"methods must be drafters among {sorted(set(METHODS) - {'auto'})}")
        if not 1 <= self.max_nodes <= 64:
            raise ValueError("max_nodes must be in 1..64")
        if not 0 < self.decay < 1 or not 0 < self.prior_acceptance < 1:
            raise ValueError("decay and prior_acceptance must be in (0, 1)")


class DepthStats:
    """Decaying counts of 'reached depth d' and 'accepted at depth d'."""

    def __init__(self, depth: int, decay: float, prior: float) -> None:
        self.decay = decay
        self.tried = [2.0] * (depth + 1)
        self.accepted = [2.0 * prior] * (depth + 1)

    def update(self, matched: int, deepest_tried: int) -> None:
        """The matched path reached `matched` levels; level matched + 1 was tried and failed
        when the tree went deeper than `matched` along that path (deepest_tried)."""
        for d in range(1, min(deepest_tried, len(self.tried) - 1) + 1):
            self.tried[d] = self.decay * self.tried[d] + 1
            self.accepted[d] = self.decay * self.accepted[d] + (d <= matched)

    def rate(self, depth: int) -> float:
        d = min(depth, len(self.tried) - 1)
        return self.accepted[d] / self.tried[d]


def match_length(draft: Draft, actual: Sequence[int]) -> tuple[int, int, bool]:
    """Walk the draft tree along `actual` (the tokens emitted after the root). Returns
    (levels matched, deepest level tried on the matched path, whether `actual` ran out before
    the walk could end)."""
    children = draft.tree.children()
    row, depth = 0, 0
    while children[row]:
        if depth >= len(actual):
            return depth, depth, True
        match = next((c for c in children[row] if draft.tokens[c] == actual[depth]), None)
        if match is None:
            return depth, depth + 1, False
        row, depth = match + 1, depth + 1
    return depth, depth, False


@dataclass
class Candidate:
    drafter: Drafter
    stats: DepthStats
    pending: deque = field(default_factory=lambda: deque(maxlen=MAX_PENDING))
    """(index of the first token after the root, draft) awaiting scoring."""


class AutoDrafter:
    def __init__(self, options: Options, context: DraftContext) -> None:
        self.options = options
        self.max_nodes = min(options.max_nodes, context.num_speculative_tokens or 64)
        sub_context = DraftContext(
            backend=context.backend,
            vocab_size=context.vocab_size,
            num_speculative_tokens=self.max_nodes,
            tokenizer=context.tokenizer,
        )
        self.candidates = {
            m: Candidate(
                build_drafter(m, options_class(m)(), sub_context),
                DepthStats(self.max_nodes, options.decay, options.prior_acceptance),
            )
            for m in options.methods
        }
        self.cost = context.cost_model() if callable(context.cost_model) else context.cost_model
        self.time_scale = 1.0  # observed step time / cost model's prediction (decaying)
        self.tokens: Sequence[int] = []
        self.step_started = 0.0
        self.rows = 1
        self.chosen: str | None = None

    def start(self, prompt_ids: Sequence[int]) -> None:
        for c in self.candidates.values():
            c.drafter.start(prompt_ids)
            c.pending.clear()

    def propose(self, state: DecodeState) -> Draft:
        self.tokens = state.tokens
        first_index = len(state.tokens)
        best, best_value = Draft.empty(), 1.0 / self._time(1)
        self.chosen = None
        for name, c in self.candidates.items():
            draft = c.drafter.propose(state)
            if not len(draft):
                continue
            c.pending.append((first_index, draft))
            cut, value = self._best_cut(draft, c.stats, state)
            if value > best_value:
                best, best_value, self.chosen = cut, value, name
        self.rows = 1 + len(best)
        self.step_started = time.perf_counter()
        return best

    def _best_cut(self, draft: Draft, stats: DepthStats, state: DecodeState) -> tuple[Draft, float]:
        """The depth cut of `draft` with the best expected tokens per second."""
        depths = draft.tree.depths
        best, best_value = Draft.empty(), 0.0
        reach, expected = 1.0, 1.0
        for depth in range(1, min(max(depths), state.max_depth) + 1):
            reach *= stats.rate(depth)
            expected += reach
            rows = sum(1 for d in depths if d <= depth)
            if rows > min(self.max_nodes, state.max_draft_tokens):
                break
            value = expected / self._time(1 + rows)
            if value > best_value:
                best_value = value
                best = draft.truncated(max_depth=depth, max_nodes=rows)
        return best, best_value

    def _time(self, rows: int) -> float:
        return self.cost(rows) * self.time_scale if self.cost is not None else float(rows)

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        if self.cost is not None:
            elapsed = time.perf_counter() - self.step_started
            ratio = elapsed / self.cost(self.rows)
            self.time_scale = 0.9 * self.time_scale + 0.1 * ratio
        for c in self.candidates.values():
            c.drafter.observe(draft, verdict, out)
        oldest = min((p[0] for c in self.candidates.values() for p in c.pending), default=0)
        # The emitted tokens from the oldest pending proposal on (the engine's list ends at the
        # root; this step's tokens are not in it yet).
        recent = [*self.tokens[oldest:], *verdict.tokens]
        for c in self.candidates.values():
            self._score_pending(c, recent, oldest)

    @staticmethod
    def _score_pending(c: Candidate, recent: Sequence[int], offset: int) -> None:
        still: deque = deque(maxlen=MAX_PENDING)
        for first_index, draft in c.pending:
            actual = recent[first_index - offset :]
            matched, tried, open_ended = match_length(draft, actual)
            if open_ended:
                still.append((first_index, draft))
            else:
                c.stats.update(matched, tried)
        c.pending = still


def build(options: Options, context: DraftContext) -> AutoDrafter:
    return AutoDrafter(options, context)
