"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of
Large Language Models with Token Recycling", ACL 2025): a train-free drafter that reuses the
candidate tokens every target forward produces and plain decoding throws away.

* An adjacency matrix M [vocab, top_k] holds, for each token t, the top_k tokens of the most
  recent target logits whose input row was t. Every forward updates it from all its rows —
  the root and every draft node, accepted or not (that is the recycling): M[row_token] =
  topk(row_logits). A `filled` bit per row marks tokens seen at least once.
* A draft expands a static tree template breadth-first from the root token: a template node
  with path (r_1, ..., r_d) holds M[parent_token][r_d], its parent being the node (r_1, ...,
  r_{d-1}). Nodes whose parent's row was never filled are pruned (their token is unknown).
* Drafts are deterministic (draft_probs=None); the verifier is chosen centrally.
* M persists across requests by default: it is a model-wide bigram memory, the method's point.
  The memory (M and the table below) is the drafter's learned state, shared by its forks (one
  per request, see drafters/base.py) and updated by each after its steps; the root and the
  token before it are the request's own.
* Beyond the paper, a second memory keys the same top-k by the two-token context (previous
  token, token): a hash table with one entry per slot, the newest row winning. A node reads its
  candidates there when its context (parent and grandparent, or the root and the token before
  it) was seen, else from M. Two tokens of context predict better than one (standalone, 35
  built-in prompts, both variants on each prompt: mean acceptance length per prompt 1.59 ->
  1.66 at 8 rows a forward).
* Each node's class (Draft.classes) is its rank among its parent's candidates, plus
  RANK_CLASSES when it came from the two-token table, so `auto` can trust those apart.

Default template (DEFAULT_TREE, 10 nodes, depth 4): the top-4 candidates of the root, top-2
under the best one, the best child of candidates 1 and 2, and a top-1 chain to depth 4. On this
CPU a forward costs nearly the same from 1 to ~8-12 rows (design.md §6), so the template stays
within that range (the paper's has 80 nodes). Measured acceptance (greedy, 96 tokens, the four
tests/lossless.py prompts, matrix warmed on one Spec-Bench prompt per category): mean acceptance
length 1.56 at 7.3 rows per forward, against 1.48 / 6.2 rows for an 8-node tree, 1.53 / 8.7 rows
for a 12-node one and 1.28 / 4.3 rows for a 6-deep chain. Updating M only from rows not yet
filled (keeping rejected rows from overwriting) did worse on new text (1.40 vs 1.48).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from onepass.draft import NODE_CLASSES, DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.models.base import ModelOutput
from onepass.top_tokens import row_top_k
from onepass.tree import Tree

if TYPE_CHECKING:
    from onepass.drafters import DraftContext

RANK_CLASSES = NODE_CLASSES // 2  # node classes: rank (capped) + RANK_CLASSES if paired
PAIR_SLOTS_LOG2 = 18  # 262k two-token contexts: 8 MB of candidates at top_k = 8

# Medusa-style paths of child ranks (column indices into M's rows), parents before children.
DEFAULT_TREE: tuple[tuple[int, ...], ...] = (
    (0,),
    (1,),
    (2,),
    (3,),
    (0, 0),
    (0, 1),
    (1, 0),
    (2, 0),
    (0, 0, 0),
    (0, 0, 0, 0),
)


@dataclass
class Options:
    top_k: int = 8
    """Candidate next tokens stored per token (columns of the adjacency matrix)."""
    tree: list[list[int]] | None = None
    """Static tree template as Medusa-style paths of child ranks, e.g. [[0], [1], [0, 0]]
    (each rank is a column of M, so < top_k); None = DEFAULT_TREE's paths with ranks < top_k. With
    num_speculative_tokens set, at most that many nodes are proposed: the first ones in
    breadth-first order that survive pruning."""
    persist: bool = True
    """Keep the adjacency matrix across requests (False: every request starts empty)."""
    pair_context: bool = True
    """Also remember candidates by the two-token context (previous token, token) and prefer
    them when that context was seen (False: the paper's one-token matrix only)."""

    def __post_init__(self) -> None:
        for name in ("persist", "pair_context"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 64:
            raise ValueError(f"top_k must be an integer in 1..64, got {self.top_k!r}")
        if self.tree is not None:
            if not self.tree:
                raise ValueError("tree must list at least one path")
            _, paths = Tree.from_paths(self.tree)  # raises ValueError on malformed paths
            if any(r >= self.top_k for p in paths for r in p):
                raise ValueError(f"tree ranks must be < top_k ({self.top_k})")


class Template:
    """A parsed tree template: per node (breadth-first) its parent node (-1 = the root) and
    its rank among the parent's candidates."""

    def __init__(self, paths: Sequence[Sequence[int]]) -> None:
        tree, ordered = Tree.from_paths(paths)
        self.parents: list[int] = list(tree.parents)
        self.ranks: list[int] = [p[-1] for p in ordered]
        self.depths: tuple[int, ...] = tree.depths

    def __len__(self) -> int:
        return len(self.parents)


class PairTable:
    """Top-k candidates keyed by a two-token context, in a fixed-size direct-mapped hash table:
    a colliding newer context replaces the older one, so memory stays bounded across requests."""

    _MULTIPLIER = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads keys over the top bits

    def __init__(self, vocab_size: int, top_k: int, slots_log2: int = PAIR_SLOTS_LOG2) -> None:
        self.vocab_size = vocab_size
        self.shift = 64 - slots_log2
        self.keys = np.full(1 << slots_log2, -1, dtype=np.int64)  # -1 = empty
        self.rows = np.zeros((1 << slots_log2, top_k), dtype=np.int32)

    def clear(self) -> None:
        self.keys[:] = -1

    def slot(self, key: int) -> int:
        return ((key * self._MULTIPLIER) & 0xFFFFFFFFFFFFFFFF) >> self.shift

    def get(self, prev: int, token: int) -> np.ndarray | None:
        key = prev * self.vocab_size + token
        slot = self.slot(key)
        return self.rows[slot] if self.keys[slot] == key else None

    def put(self, prev: Sequence[int], tokens: Sequence[int], rows: np.ndarray) -> None:
        """Store rows[j] under (prev[j], tokens[j]) ([r], [r], [r, k]); a later j wins a slot."""
        keys = [int(p) * self.vocab_size + int(t) for p, t in zip(prev, tokens, strict=True)]
        last = {self.slot(key): j for j, key in enumerate(keys)}  # Python: a few keys a step
        slots = list(last)
        self.keys[slots] = [keys[j] for j in last.values()]
        self.rows[slots] = rows[list(last.values())]


class Memory:
    """What Token Recycling learns across requests (shared by a drafter's forks): the adjacency
    matrix and the two-token table."""

    def __init__(self, vocab_size: int, top_k: int, pair_context: bool) -> None:
        # int32: 49k tokens x 8 candidates = 1.5 MB, as in the paper.
        self.matrix = np.zeros((vocab_size, top_k), dtype=np.int32)  # [vocab, k]
        self.filled = np.zeros(vocab_size, dtype=bool)  # [vocab]
        self.pairs = PairTable(vocab_size, top_k) if pair_context else None

    def clear(self) -> None:
        self.filled[:] = False  # stale rows are never read while unfilled
        if self.pairs is not None:
            self.pairs.clear()

    def candidates(self, before: int, token: int) -> tuple[np.ndarray | None, bool]:
        """The candidates after `token` preceded by `before` (-1 = none), and whether they came
        from the two-token table; None if `token` was never seen."""
        if self.pairs is not None and before >= 0:
            row = self.pairs.get(before, token)
            if row is not None:
                return row, True
        return (self.matrix[token], False) if self.filled[token] else (None, False)

    def update(self, row_tokens: Sequence[int], top: np.ndarray) -> None:
        """M[row_tokens[j]] = top[j] ([r] and [r, k]); for repeated tokens the last row wins."""
        last = {int(t): j for j, t in enumerate(row_tokens)}  # Python: np.unique costs ~10x
        tokens = list(last)
        self.matrix[tokens] = top[list(last.values())]
        self.filled[tokens] = True


class RecyclingDrafter(Drafter):
    def __init__(
        self,
        options: Options,
        vocab_size: int,
        max_nodes: int | None = None,
        memory: Memory | None = None,
    ) -> None:
        self.options = options
        self.vocab_size = vocab_size
        # The default template, cut to the ranks top_k stores (top_k=1: a chain).
        default = [path for path in DEFAULT_TREE if max(path) < options.top_k]
        self.template = Template(options.tree or default)
        self.max_nodes = len(self.template) if max_nodes is None else max_nodes
        # Learned across requests (with persist), shared by reference with every fork.
        if memory is None:
            memory = Memory(vocab_size, options.top_k, options.pair_context)
        self.memory = memory
        # This request's: the root of the next forward and the token before it (-1 = none).
        self.root: int | None = None
        self.before_root = -1
        self.unread: tuple | None = None  # the latest observed forward, not yet learned from

    def fork(self) -> RecyclingDrafter:
        # Without persist the memory is the request's own: a fork starts with an empty one.
        memory = self.memory if self.options.persist else None
        return RecyclingDrafter(self.options, self.vocab_size, self.max_nodes, memory)

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.root, self.unread = None, None
        if not self.options.persist:
            self.memory.clear()

    def propose(self, state: DecodeState) -> Draft:
        self._learn()
        root = self.root = state.tokens[-1]
        self.before_root = state.tokens[-2] if len(state.tokens) > 1 else -1
        limit = min(self.max_nodes, state.max_draft_tokens)
        if limit <= 0 or state.max_depth <= 0:
            return Draft.empty()
        t = self.template
        tokens: list[int] = []
        parents: list[int] = []
        classes: list[int] = []
        node_of: list[int] = []  # template node -> draft node, -1 = pruned
        # Siblings read the same candidates: looked up once per parent (-1: the root).
        looked: dict[int, tuple[list[int] | None, bool]] = {}
        for parent, rank, depth in zip(t.parents, t.ranks, t.depths, strict=True):
            # Breadth-first order: a node's parent has been placed (or pruned) already.
            parent_node = -1 if parent < 0 else node_of[parent]
            if parent >= 0 and parent_node < 0:
                node_of.append(-1)  # the parent was pruned: its whole subtree goes too
                continue
            if depth > state.max_depth:
                node_of.append(-1)
                continue
            found = looked.get(parent_node)
            if found is None:
                if parent_node < 0:
                    parent_token, before = root, self.before_root
                else:
                    grandparent = parents[parent_node]
                    parent_token = tokens[parent_node]
                    before = root if grandparent < 0 else tokens[grandparent]
                row_array, paired = self.memory.candidates(before, parent_token)
                row = None if row_array is None else row_array.tolist()
                found = looked[parent_node] = (row, paired)
            row, paired = found
            if row is None:
                node_of.append(-1)
                continue
            node_of.append(len(tokens))
            tokens.append(row[rank])
            parents.append(parent_node)
            classes.append(min(rank, RANK_CLASSES - 1) + RANK_CLASSES * paired)
            if len(tokens) == limit:
                break
        return Draft(tokens, Tree(tuple(parents)), classes=classes)

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        if self.root is None:
            return
        # Learned from when the next proposal needs it: auto may skip proposing for a while,
        # and then only the latest forward is read (the logits are kept, not copied).
        self.unread = (self.root, self.before_root, draft, verdict.path, out.logits)
        # The next root and the token before it.
        emitted = [self.root, *verdict.tokens]
        self.root, self.before_root = emitted[-1], emitted[-2]

    def _learn(self) -> None:
        """Fold the latest observed forward's top-k into the memory."""
        if self.unread is None:
            return
        root, before_root, draft, path, logits = self.unread
        self.unread = None
        n = len(draft)
        top = row_top_k(logits[: n + 1], self.options.top_k).cpu().numpy()  # [n + 1, k]
        row_tokens = [root, *draft.tokens]
        rows = update_order(n, path)  # in increasing priority
        self.memory.update([row_tokens[r] for r in rows], top[rows])
        if self.memory.pairs is not None:
            # Each row's context: the token before the root, or the node's parent.
            before = [before_root, *(row_tokens[p + 1] for p in draft.tree.parents)]
            seen = [r for r in rows if before[r] >= 0]
            pairs = self.memory.pairs
            pairs.put([before[r] for r in seen], [row_tokens[r] for r in seen], top[seen])

    def finish(self) -> None:
        self._learn()


def update_order(n: int, path: Sequence[int]) -> list[int]:
    """Forward rows (0 = root, i + 1 = node i) from least to most trusted: rejected nodes (their
    context was wrong), then the root, then the accepted path root -> leaf (the latest true
    context). A token on several rows keeps the most trusted row's top-k."""
    accepted = [i + 1 for i in path]
    kept = set(accepted)
    return [*(r for r in range(1, n + 1) if r not in kept), 0, *accepted]


def build(options: Options, context: DraftContext) -> RecyclingDrafter:
    return RecyclingDrafter(options, context.vocab_size, context.num_speculative_tokens)
