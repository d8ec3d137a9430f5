"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"; reference: hao-ai-lab/LookaheadDecoding). No draft model: the target
itself runs Jacobi iterations on a small 2-D window of guesses, in the same forward that
verifies candidates, and the n-grams those iterations produce feed the candidates.

The window is a grid of (level - 1) levels x window_size columns. Cell (l, c) holds a guess
for the token at offset l + c from the root (the last emitted token); cell (0, 0) *is* the
root, so the aux rows are level 0's columns 1.. and then the full levels 1.. . Cell (l, c)
attends to the committed cache, to level 0's cells (0, 0..c) and to its own column's cells
(1..l, c): its context is the contiguous trajectory root, (0, 1), ..., (0, c), (1, c), ...,
(l, c), at consecutive positions. Window rows never see draft nodes and draft nodes never see
window rows (the engine gives the nodes only the tree mask), so verification is unaffected.

Each step, the argmax of the last level's rows is a new level. Every column then yields an
n-gram (0, c), (1, c), ..., (level - 2, c), new[c], stored in the pool under its first token
(keeps the `guess_set_size` most recent per key). The window then drops its first level and
appends the new one. Like the reference's default (ALWAYS_FWD_ONE), the window advances by one
position per step however many tokens were accepted, so nothing it has computed is lost (its
guesses simply sit further ahead); `align_on_accept` instead drops one column per accepted
token to keep every cell at its exact offset, refilling with prompt tokens.

The verification branch proposes the pool's n-grams keyed by the root, merged into a trie
(shared prefixes share nodes). The pool is seeded with the prompt's n-grams and takes every
n-gram of the output too, so copying tasks benefit from the first step. Drafts are
deterministic (draft_probs=None); the engine's verifiers keep decoding lossless.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.models.base import ModelOutput
from onepass.top_tokens import row_argmax
from onepass.tree import Tree

if TYPE_CHECKING:
    from onepass.drafters import DraftContext


@dataclass
class Options:
    """Defaults sized for a CPU whose forward cost is nearly flat up to 16 rows and steps up
    after (the MKL pack size, see models/llama.py): the root + 8 window rows + at most 7 trie
    nodes."""

    level: int = 4
    """N: n-gram length; the window has N - 1 levels and candidates have N - 1 tokens."""
    window_size: int = 3
    """W: columns of the Jacobi window (parallel trajectories advanced per step)."""
    guess_set_size: int = 4
    """G: n-grams kept per key in the pool (most recent), all proposed when the key matches."""
    align_on_accept: bool = False
    """Shift the window by the accepted length (exact offsets) instead of one level per step."""
    seed: int = 0
    """Seed for the prompt tokens that initialise and pad the window (drafts stay reproducible)."""
    max_rows: int = 16
    """Rows a step scores (root + window + trie) when num_speculative_tokens is not given."""

    def __post_init__(self) -> None:
        # Bounded above too: the window holds (level - 1) x window_size tokens, and a level of
        # 2**63 once took all the machine's memory.
        for name, low, high in (
            ("level", 2, 16),
            ("window_size", 1, 64),
            ("guess_set_size", 1, 64),
            ("max_rows", 2, 256),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


class NgramPool:
    """n-grams keyed by their first token; per key, at most `capacity` continuations, least
    recently added first (a re-added n-gram becomes the most recent)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.table: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        entries = self.table.setdefault(key, [])
        if continuation in entries:
            entries.remove(continuation)
        elif len(entries) == self.capacity:
            del entries[0]  # evict the least recent
        entries.append(continuation)

    def add_from(self, tokens: Sequence[int], n: int, first_end: int = 0) -> None:
        """Add the n-grams tokens[e - n : e] for every end e >= max(first_end, n)."""
        for end in range(max(first_end, n), len(tokens) + 1):
            self.add(tokens[end - n], tuple(tokens[end - n + 1 : end]))

    def get(self, key: int) -> list[tuple[int, ...]]:
        """Continuations of `key`, most recent first."""
        return self.table.get(key, [])[::-1]


def merge_trie(
    ngrams: Sequence[Sequence[int]], max_nodes: int, max_depth: int
) -> tuple[list[int], list[int]]:
    """Merge candidate continuations of the root into a trie: (tokens, parents), parents before
    children, -1 = child of the root. Candidates are taken in order, each cut to max_depth;
    insertion stops at max_nodes (an n-gram that does not fit keeps its prefix)."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for gram in ngrams:
        parent = -1
        for token in gram[:max_depth]:
            node = index.get((parent, token))
            if node is None:
                if len(tokens) >= max_nodes:
                    break
                node = index[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            parent = node
    return tokens, parents


def window_cells(level: int, window: int) -> list[tuple[int, int]]:
    """(l, c) of each aux row, in row order: level 0's columns 1.., then levels 1.. ."""
    return [(lv, c) for lv in range(level - 1) for c in range(window) if (lv, c) != (0, 0)]


def window_offsets(level: int, window: int) -> list[int]:
    """Position of each aux row relative to the root: cell (l, c) guesses offset l + c."""
    return [lv + c for lv, c in window_cells(level, window)]


def window_mask(level: int, window: int, num_nodes: int) -> Tensor:
    """[m, 1 + n + m] bool over (root, n draft nodes, m window rows): cell (l, c) sees the root,
    level 0's cells (0, 1..c) and its column's cells (1..l, c); never a draft node."""
    cells = window_cells(level, window)
    row = {cell: 1 + num_nodes + i for i, cell in enumerate(cells)}
    row[(0, 0)] = 0  # the root
    mask = torch.zeros(len(cells), 1 + num_nodes + len(cells), dtype=torch.bool)
    for i, (lv, c) in enumerate(cells):
        for seen in [(0, j) for j in range(c + 1)] + [(k, c) for k in range(1, lv + 1)]:
            mask[i, row[seen]] = True
    return mask


class LookaheadDrafter(Drafter):
    """Learns nothing across requests: its pool and window are the request's own."""

    def __init__(self, options: Options, max_nodes: int | None) -> None:
        self.options = options
        self.cells = window_cells(options.level, options.window_size)
        budget = max(1, options.max_rows - 1 - len(self.cells))
        self.max_nodes = max_nodes or min(options.guess_set_size * (options.level - 1), budget)
        self.offsets = window_offsets(options.level, options.window_size)
        self.masks: dict[int, Tensor] = {}  # num_nodes -> aux mask (a few sizes recur)
        self.start([0])  # usable before the first request; start() resets per request

    def fork(self) -> LookaheadDrafter:
        return LookaheadDrafter(self.options, self.max_nodes)

    def start(self, prompt_ids: Sequence[int]) -> None:
        o = self.options
        self.prompt = list(prompt_ids)
        self.rng = random.Random(o.seed)
        self.pool = NgramPool(o.guess_set_size)
        self.pool.add_from(self.prompt, o.level)
        self.synced = len(self.prompt)  # tokens whose n-grams are in the pool
        # grid[l][c]: guess for offset l + c; grid[0][0] stands for the root.
        self.grid = [self.filler(o.window_size) for _ in range(o.level - 1)]
        self.iterations = 0  # Jacobi steps run since start
        self.root = self.prompt[-1]

    def filler(self, k: int) -> list[int]:
        """k random prompt tokens (the reference's initialisation): plausible, not garbage."""
        return [self.rng.choice(self.prompt) for _ in range(k)]

    def propose(self, state: DecodeState) -> Draft:
        o = self.options
        tokens = state.tokens
        self.pool.add_from(tokens, o.level, self.synced + 1)  # n-grams ending in new tokens
        self.synced = len(tokens)
        self.root = tokens[-1]
        if state.max_depth <= 0:
            return Draft.empty()
        rows = state.max_draft_tokens
        with_window = rows > len(self.cells)  # near a full cache, verify only
        room = rows - len(self.cells) if with_window else rows
        guesses = self.pool.get(self.root)
        nodes, parents = merge_trie(guesses, min(self.max_nodes, room), state.max_depth)
        if not with_window:
            return Draft(nodes, Tree(tuple(parents)))
        self.grid[0][0] = self.root
        aux = [self.grid[lv][c] for lv, c in self.cells]
        if len(nodes) not in self.masks:
            self.masks[len(nodes)] = window_mask(o.level, o.window_size, len(nodes))
        return Draft(
            nodes,
            Tree(tuple(parents)),
            aux_tokens=aux,
            aux_offsets=self.offsets,
            aux_mask=self.masks[len(nodes)],
        )

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        if not draft.aux_tokens:
            return  # the window was not scored this step: keep it as it is
        o = self.options
        n, w, last = len(draft), o.window_size, o.level - 2
        if last == 0:  # the last level is level 0, whose cell (0, 0) is the root's row
            last_rows = torch.cat([out.logits[:1], out.logits[1 + n : n + w]])
        else:
            last_rows = out.logits[-w:]  # [W, vocab] the last level's rows
        new = row_argmax(last_rows)
        # Column n-grams, once every level above the new one holds model output (the reference
        # likewise waits for its fill phase).
        if self.iterations >= last:
            for c in range(w):
                self.pool.add(
                    self.grid[0][c], (*(self.grid[lv][c] for lv in range(1, 1 + last)), new[c])
                )
        shift = len(verdict.path) if o.align_on_accept else 0
        shift = min(shift, w)
        self.grid = [row[shift:] + self.filler(shift) for row in [*self.grid[1:], new]]
        self.iterations += 1


def build(options: Options, context: DraftContext) -> LookaheadDrafter:
    return LookaheadDrafter(options, context.num_speculative_tokens)
