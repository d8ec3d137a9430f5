"""Medusa drafting (Cai et al. 2024, arXiv 2401.10774): K heads on the target's last hidden
state propose the K tokens after the next one; a tree combines each head's top candidates.

The heads read the hidden state the verifying forward already produced: after a verdict, the
row of the last accepted token (the root's row when nothing was accepted) holds h_t, from
which the target drew the next root t + 1; head k guesses token t + 1 + k, so head 1 gives the
root's children, head 2 their children, and so on. Medusa-1 heads do not see the tokens
chosen above them, so a node's token depends only on its depth and its rank among siblings.
The first proposal reads the prompt's last row, from the prefill (Drafter.observe_prompt).

Trees: a static template of Medusa-style rank paths (vLLM's `speculative_token_tree`), or,
by default, dynamic: the `max_nodes` paths of highest estimated probability (the product of
the heads' probabilities along the path), found best first, so the tree follows the heads'
confidence at each step. Drafts are deterministic (draft_probs = None): verification, greedy or
sampled, is the verifier's and stays exact.
"""

from __future__ import annotations

import ast
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from onepass.cost import nodes_worth_sending
from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.errors import InputError
from onepass.heads.files import Target, find_heads, load_heads
from onepass.heads.medusa import METHOD, MedusaHeads
from onepass.models.base import ModelOutput
from onepass.tree import Tree

if TYPE_CHECKING:
    from onepass.drafters import DraftContext


@dataclass
class Options:
    heads: str | None = None
    """Directory of trained heads (onepass train medusa); None: the heads shipped or trained
    for the target."""
    speculative_token_tree: list[list[int]] | str | None = None
    """Static tree: rank paths such as [[0], [1], [0, 0]] or vLLM's string "[(0,), (1,),
    (0, 0)]" (depth d reads head d); None: a dynamic tree by the heads' confidence."""
    max_nodes: int = 8
    """Dynamic tree size (num_speculative_tokens, when set, caps either tree)."""
    top_k: int = 4
    """Candidates per head a dynamic tree considers."""
    min_probability: float = 0.0
    """Dynamic tree: leave out paths whose estimated probability is below this."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_nodes, int) or not 1 <= self.max_nodes <= 64:
            raise ValueError(f"max_nodes must be an integer in 1..64, got {self.max_nodes!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 32:
            raise ValueError(f"top_k must be an integer in 1..32, got {self.top_k!r}")
        if not 0 <= self.min_probability < 1:
            raise ValueError(f"min_probability must be in [0, 1), got {self.min_probability}")
        tree = self.speculative_token_tree
        if isinstance(tree, str):
            try:
                tree = ast.literal_eval(tree)
            except (ValueError, SyntaxError):
                raise ValueError(
                    f"speculative_token_tree is not a list of paths: {tree!r}"
                ) from None
        if tree is not None:
            if not isinstance(tree, (list, tuple)) or not tree:
                raise ValueError("speculative_token_tree must list at least one path")
            paths = [list(p) for p in tree]
            if not all(isinstance(r, int) for p in paths for r in p):
                raise ValueError("speculative_token_tree paths must hold integer ranks")
            Tree.from_paths(paths)  # raises ValueError on malformed paths
            self.speculative_token_tree = paths


class MedusaDrafter(Drafter):
    def __init__(
        self, options: Options, heads: MedusaHeads, lm_head: Any, max_nodes: int, cost: Any = None
    ) -> None:
        self.options = options
        # The target's cost curve: the best paths are cut to those whose chances pay for their
        # rows (None: max_nodes of them; auto prices the nodes itself).
        self.cost = cost
        self.heads = heads  # shared by every fork, never changed
        # The target's LM head (shared, frozen): [n, H] -> [n, vocab], or [n, V] restricted to
        # the heads' draft vocabulary.
        self.lm_head = lm_head
        self.max_nodes = max_nodes
        self.template: tuple[Tree, list[tuple[int, ...]]] | None = None
        if options.speculative_token_tree is not None:
            tree, paths = Tree.from_paths(options.speculative_token_tree)
            if max(len(p) for p in paths) > heads.num_heads:
                raise InputError(
                    f"speculative_token_tree is deeper than the {heads.num_heads} heads"
                )
            self.template = tree, paths
        ranks = [r for p in self.template[1] for r in p] if self.template else [options.top_k - 1]
        self.top_k = max(ranks) + 1
        # This request's: the hidden state the next draft reads (None: nothing observed), kept
        # until a proposal asks for it (auto may skip proposing: then the heads never run),
        # and each head's candidates from it.
        self.feature: Any = None  # [1, H]
        self.candidates: list[list[int]] | None = None  # [K][top_k] tokens
        self.probs: list[list[float]] | None = None  # [K][top_k] their probabilities

    def fork(self) -> MedusaDrafter:
        return MedusaDrafter(self.options, self.heads, self.lm_head, self.max_nodes, self.cost)

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.feature = self.candidates = self.probs = None

    def propose(self, state: DecodeState) -> Draft:
        limit = min(self.max_nodes, state.max_draft_tokens)
        if self.feature is None or limit <= 0 or state.max_depth <= 0:
            return Draft.empty()
        self._guess()
        paths = self.template[1] if self.template else self._best_paths(limit)  # parents first
        paths = [p for p in paths if len(p) <= state.max_depth][:limit]
        if self.cost is not None and not self.template:  # best first: a prefix is a tree
            chances = [math.prod(self.probs[d][r] for d, r in enumerate(p)) for p in paths]
            paths = paths[: nodes_worth_sending(chances, self.cost, len(state.tokens))]
            if not paths:
                return Draft.empty()
        index = {p: i for i, p in enumerate(paths)}
        parents = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in paths)
        tokens = [self.candidates[len(p) - 1][p[-1]] for p in paths]
        return Draft(tokens, Tree(parents))

    def observe_prompt(self, out: ModelOutput, first_token: int) -> None:
        self._keep(out, out.logits.shape[0] - 1)  # the prompt's last row

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        self._keep(out, verdict.path[-1] + 1 if verdict.path else 0)

    def _keep(self, out: ModelOutput, row: int) -> None:
        """The hidden state of the forward's row `row` (the last accepted token, whose
        successor is the next root), for the next proposal."""
        if out.hidden is None:
            raise ValueError("medusa needs the target's hidden states (ModelOutput.hidden)")
        self.feature = out.hidden[row : row + 1].clone()

    def _guess(self) -> None:
        """Each head's candidates from the kept hidden state."""
        with torch.inference_mode():
            features = self.heads(self.feature.float())[0]  # [K, H]
            logits = self.lm_head(features.to(self.feature.dtype)).float()  # [K, (draft) vocab]
            probs, tokens = torch.softmax(logits, -1).topk(self.top_k, -1)  # [K, top_k]
            if self.heads.draft_vocab is not None:
                tokens = self.heads.draft_vocab[tokens]  # target ids
        self.candidates, self.probs = tokens.tolist(), probs.tolist()

    def _best_paths(self, limit: int) -> list[tuple[int, ...]]:
        """The `limit` rank paths of highest product probability, best first: a path's
        children and its next sibling enter the frontier when it is taken, so every taken
        path's parent was taken before it."""
        probs, depth = self.probs, len(self.probs)
        frontier = [(-probs[0][0], (0,))]
        taken: list[tuple[int, ...]] = []
        while frontier and len(taken) < limit:
            negative, path = heapq.heappop(frontier)
            score = -negative
            if score < self.options.min_probability:
                break
            taken.append(path)
            d, r = len(path), path[-1]
            if d < depth:
                heapq.heappush(frontier, (-score * probs[d][0], (*path, 0)))
            if r + 1 < self.top_k:
                sibling = score / max(probs[d - 1][r], 1e-30) * probs[d - 1][r + 1]
                heapq.heappush(frontier, (-sibling, (*path[:-1], r + 1)))
        return taken


def target_of(context: DraftContext) -> Target:
    config = context.backend.config
    return Target(
        name=context.model_name or "the target",
        fingerprint=context.model_key or "",
        vocab_size=context.vocab_size,
        hidden_size=config.hidden_size,
    )


def build(options: Options, context: DraftContext) -> MedusaDrafter:
    target = target_of(context)
    path = Path(options.heads) if options.heads else find_heads(METHOD, target, context.cache_dir)
    loaded = load_heads(path, METHOD, target)
    try:
        heads = MedusaHeads.from_tensors(loaded.tensors)
    except (KeyError, ValueError) as e:
        raise InputError(f"the medusa heads in {path} are corrupt ({e})") from None
    if heads.hidden_size != target.hidden_size:
        raise InputError(
            f"the heads in {path} have hidden size {heads.hidden_size}, the target "
            f"{target.hidden_size}"
        )
    max_nodes = context.num_speculative_tokens or options.max_nodes
    if options.speculative_token_tree is not None and context.num_speculative_tokens is None:
        max_nodes = len(options.speculative_token_tree)
    lm_head = context.backend.lm_head
    if heads.draft_vocab is not None:
        if int(heads.draft_vocab.max()) >= target.vocab_size:
            raise InputError(f"the medusa heads in {path} name tokens past the vocabulary")
        lm_head = context.backend.lm_head_part(heads.draft_vocab)
    cost = context.cost_curve()
    return MedusaDrafter(options, heads.eval(), lm_head, max_nodes, cost)
