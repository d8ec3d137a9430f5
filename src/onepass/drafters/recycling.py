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
import torch

from onepass.drafters.base import DecodeState, Draft
from onepass.models.base import ModelOutput
from onepass.tree import Tree
from onepass.verify.base import Verdict

if TYPE_CHECKING:
    from onepass.drafters import DraftContext

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
    (each rank is a column of M, so < top_k); None = DEFAULT_TREE. With
    num_speculative_tokens set, at most that many nodes are proposed: the first ones in
    breadth-first order that survive pruning."""
    persist: bool = True
    """Keep the adjacency matrix across requests (False: every request starts empty)."""

    def __post_init__(self) -> None:
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
        self.depths: list[int] = tree.depths

    def __len__(self) -> int:
        return len(self.parents)


class RecyclingDrafter:
    def __init__(self, options: Options, vocab_size: int, max_nodes: int | None = None) -> None:
        self.options = options
        self.template = Template(options.tree or DEFAULT_TREE)
        self.max_nodes = len(self.template) if max_nodes is None else max_nodes
        # int32: 49k tokens x 8 candidates = 1.5 MB, as in the paper.
        self.matrix = np.zeros((vocab_size, options.top_k), dtype=np.int32)  # [vocab, k]
        self.filled = np.zeros(vocab_size, dtype=bool)  # [vocab]
        self.root: int | None = None

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.root = None
        if not self.options.persist:
            self.filled[:] = False  # stale rows are never read while unfilled

    def propose(self, state: DecodeState) -> Draft:
        root = self.root = state.tokens[-1]
        limit = min(self.max_nodes, state.max_draft_tokens)
        if limit <= 0 or state.max_depth <= 0:
            return Draft.empty()
        t = self.template
        tokens: list[int] = []
        parents: list[int] = []
        node_of: list[int] = []  # template node -> draft node, -1 = pruned
        for parent, rank, depth in zip(t.parents, t.ranks, t.depths, strict=True):
            # Breadth-first order: a node's parent has been placed (or pruned) already.
            parent_node = -1 if parent < 0 else node_of[parent]
            if parent >= 0 and parent_node < 0:
                node_of.append(-1)  # the parent was pruned: its whole subtree goes too
                continue
            parent_token = root if parent < 0 else tokens[parent_node]
            if depth > state.max_depth or not self.filled[parent_token]:
                node_of.append(-1)
                continue
            node_of.append(len(tokens))
            tokens.append(int(self.matrix[parent_token, rank]))
            parents.append(parent_node)
            if len(tokens) == limit:
                break
        return Draft(tokens, Tree(tuple(parents)))

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        if self.root is None:
            return
        n = len(draft)
        row_tokens = np.array([self.root, *draft.tokens], dtype=np.int64)  # [n + 1]
        rows = update_order(n, verdict.path)  # in increasing priority
        top = torch.topk(out.logits[: n + 1], self.options.top_k, dim=-1).indices  # [n + 1, k]
        self.update(row_tokens[rows], top.cpu().numpy()[rows])

    def update(self, row_tokens: np.ndarray, top: np.ndarray) -> None:
        """M[row_tokens[j]] = top[j] ([r] and [r, k]); for repeated tokens the last row wins."""
        _, first_from_end = np.unique(row_tokens[::-1], return_index=True)
        last = len(row_tokens) - 1 - first_from_end
        self.matrix[row_tokens[last]] = top[last]
        self.filled[row_tokens[last]] = True


def update_order(n: int, path: Sequence[int]) -> list[int]:
    """Forward rows (0 = root, i + 1 = node i) from least to most trusted: rejected nodes (their
    context was wrong), then the root, then the accepted path root -> leaf (the latest true
    context). A token on several rows keeps the most trusted row's top-k."""
    accepted = [i + 1 for i in path]
    kept = set(accepted)
    return [*(r for r in range(1, n + 1) if r not in kept), 0, *accepted]


def build(options: Options, context: DraftContext) -> RecyclingDrafter:
    return RecyclingDrafter(options, context.vocab_size, context.num_speculative_tokens)
