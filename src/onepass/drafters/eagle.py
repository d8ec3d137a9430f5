"""EAGLE-2 drafting (Li et al. 2024, arXiv 2406.16858) with an EAGLE head (heads/eagle.py) and
FR-Spec's reduced draft vocabulary.

After each verdict the head reads the verifying forward's hidden states of the accepted rows
(the root and the accepted nodes), each with the next token's embedding, and appends them to
its own KV cache: no extra target pass. Its output at the last accepted row guesses the hidden
state of the root, hence the root's children. The dynamic tree then grows level by level: the
`top_k` nodes of highest path probability (the product of the head's probabilities from the
root) are expanded in one head forward each level, with tree attention among the draft rows,
each into its `top_k` best children; after `depth` levels, all nodes are reranked by path
probability and the best `max_nodes` kept (a child never scores above its parent, so the kept
set is a tree). Draft rows written to the head's cache after its committed rows are
overwritten by the next verdict, which feeds the accepted tokens again with the target's own
hidden states.

The head sees the request from the prompt's last token on (the prefill's output holds only that
row's hidden state: Drafter.observe_prompt), and trains the same way. Drafts are deterministic
(draft_probs = None), so verification stays exact under greedy decoding and sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from onepass.cost import nodes_worth_sending
from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.drafters.medusa import target_of
from onepass.errors import InputError
from onepass.heads.eagle import METHOD, EagleHead
from onepass.heads.files import find_heads, load_heads
from onepass.models.base import ModelOutput
from onepass.tree import Tree

if TYPE_CHECKING:
    from onepass.drafters import DraftContext


@dataclass
class Options:
    heads: str | None = None
    """Directory of a trained head (onepass train eagle); None: the one shipped or trained for
    the target."""
    max_nodes: int = 8
    """Nodes kept after reranking (num_speculative_tokens, when set, replaces it)."""
    depth: int = 3
    """Levels of the tree (head forwards per proposal). With max_nodes 8 a fourth level's
    nodes rarely rank among the kept ones: on the built-in prompts depth 4 accepted no more
    than 3 and cost one more head forward a step."""
    top_k: int = 4
    """Nodes expanded per level, and children per expanded node."""

    def __post_init__(self) -> None:
        for name, high in (("max_nodes", 64), ("depth", 16), ("top_k", 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in 1..{high}, got {value!r}")


@dataclass
class Shared:
    """What every fork reads and none changes: the head, the target's embeddings and its LM
    head's rows for the draft vocabulary."""

    head: EagleHead
    linears: dict[str, Any]
    """The head's projections on the target's GEMM (NativeDecoder.linear)."""
    embed: Any  # [n] ids -> [n, H]
    lm_head: Any  # [n, H] -> [n, draft vocab]: the target's LM head rows
    max_len: int
    cost: Any = None
    """The target's cost curve t(rows, context): the tree is cut to the nodes whose chances
    pay for their rows (None: keep max_nodes; auto prices the nodes itself)."""


class EagleDrafter(Drafter):
    def __init__(self, options: Options, shared: Shared, max_nodes: int) -> None:
        self.options, self.shared, self.max_nodes = options, shared, max_nodes
        head = shared.head
        self.k_cache = torch.empty(shared.max_len, head.num_kv_heads, head.head_dim)
        self.v_cache = torch.empty_like(self.k_cache)
        self.length = 0  # committed rows of the head's cache
        self.last: Tensor | None = None  # [H]: the head's guess of the root's hidden state
        self.root_position = 0
        # Observed rows (h_t [n, H], the tokens after them, the first one's position) the head
        # has not read yet: it reads them all when a proposal needs them (auto may skip
        # proposing for a few steps, and then pays nothing for the head meanwhile).
        self.waiting: list[tuple[Tensor, list[int], int]] = []

    def fork(self) -> EagleDrafter:
        return EagleDrafter(self.options, self.shared, self.max_nodes)

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.length, self.last, self.waiting = 0, None, []
        self.root_position = len(prompt_ids) - 1  # observe_prompt's row: the last prompt token

    def observe_prompt(self, out: ModelOutput, first_token: int) -> None:
        # The prompt's last row, at the position just before the first root.
        self._keep(out, [out.logits.shape[0] - 1], [first_token])

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        rows = [0, *(i + 1 for i in verdict.path)]  # the root's row and the accepted nodes'
        self._keep(out, rows, verdict.tokens)
        self.root_position += len(verdict.tokens)  # the next root: the last emitted token

    def _keep(self, out: ModelOutput, rows: list[int], next_tokens: list[int]) -> None:
        if out.hidden is None:
            raise ValueError("eagle needs the target's hidden states (ModelOutput.hidden)")
        with torch.inference_mode():
            hidden = out.hidden[rows].float()  # a copy: the forward's buffers are reused
        self.waiting.append((hidden, list(next_tokens), self.root_position))

    def _feed(self) -> None:
        """Append the waiting rows (h_t, e(x_{t+1})) at their positions to the head's cache, in
        one pass of the head; the last one's output guesses the hidden state of the root."""
        if not self.waiting:
            return
        hidden = torch.cat([h for h, _, _ in self.waiting])  # [n, H]: h_t
        tokens = [t for _, ts, _ in self.waiting for t in ts]
        positions = torch.cat([torch.arange(at, at + len(ts)) for _, ts, at in self.waiting])
        self.waiting = []
        end = self.length + len(tokens)
        if end > self.shared.max_len:  # the request outgrew the cache: stop drafting
            self.last = None
            return
        with torch.inference_mode():
            embedded = self.shared.embed(torch.tensor(tokens)).float()  # e(x_{t+1})
            g = self._head(hidden, embedded, positions, self.length)
        self.length, self.last = end, g[-1]

    def propose(self, state: DecodeState) -> Draft:
        self._feed()
        limit = min(self.max_nodes, state.max_draft_tokens)
        if self.last is None or limit <= 0 or state.max_depth <= 0:
            return Draft.empty()
        with torch.inference_mode():
            return self._grow(limit, min(self.options.depth, state.max_depth), len(state.tokens))

    def _grow(self, limit: int, depth: int, context: int) -> Draft:
        top_k = self.options.top_k
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # log path probabilities
        depths: list[int] = []
        # Level 1: the root's children from the head's guess of the root's hidden state.
        level = self._children(self.last[None], [-1], [0.0], tokens, parents, scores, depths)
        features = {-1: self.last}  # node -> the head's output at its row (its own guess)
        drafted = 0  # draft rows written after the committed ones in the head's cache
        rows_of: dict[int, int] = {}  # expanded node -> its draft row
        for d in range(1, depth):
            expand = sorted(level, key=lambda i: -scores[i])[:top_k]
            hidden = torch.stack([features[parents[i]] for i in expand])  # [e, H]
            embedded = self.shared.embed(torch.tensor([tokens[i] for i in expand])).float()
            positions = torch.full((len(expand),), self.root_position + d - 1)
            if self.length + drafted + len(expand) > self.shared.max_len:
                break
            mask = self._tree_mask(expand, parents, rows_of, drafted)
            g = self._head(hidden, embedded, positions, self.length + drafted, mask)
            for j, node in enumerate(expand):
                rows_of[node] = drafted + j
                features[node] = g[j]
            drafted += len(expand)
            level = self._children(
                g, expand, [scores[i] for i in expand], tokens, parents, scores, depths
            )
        # Rerank: the best `limit` nodes by path probability (a parent scores at least as high
        # as its child and sorts first on ties, so the kept nodes form a tree).
        kept = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i]))[:limit]
        if self.shared.cost is not None:  # a path's probability: its chance of acceptance
            chances = [math.exp(scores[i]) for i in kept]
            kept = kept[: nodes_worth_sending(chances, self.shared.cost, context)]
            if not kept:
                return Draft.empty()
        kept.sort(key=lambda i: (depths[i], i))  # parents before children
        index = {old: new for new, old in enumerate(kept)}
        tree = Tree(tuple(-1 if parents[i] < 0 else index[parents[i]] for i in kept))
        return Draft([tokens[i] for i in kept], tree)

    def _children(
        self,
        g: Tensor,
        nodes: list[int],
        base: list[float],
        tokens: list[int],
        parents: list[int],
        scores: list[float],
        depths: list[int],
    ) -> list[int]:
        """Add the top_k children of each of `nodes` (-1: the root) from the head's outputs g
        [e, H]; returns the new nodes."""
        logp = torch.log_softmax(self.shared.lm_head(g), -1)  # [e, draft vocab]
        best, index = logp.topk(self.options.top_k, -1)
        ids = self.shared.head.draft_vocab[index]  # [e, top_k] target ids
        added = []
        for row, node in enumerate(nodes):
            depth = 1 if node < 0 else depths[node] + 1
            for lp, token in zip(best[row].tolist(), ids[row].tolist(), strict=True):
                added.append(len(tokens))
                tokens.append(token)
                parents.append(node)
                scores.append(base[row] + lp)
                depths.append(depth)
        return added

    def _tree_mask(
        self, expand: list[int], parents: list[int], rows_of: dict[int, int], drafted: int
    ) -> Tensor:
        """[e, committed + drafted + e] bool: every committed row, the draft rows of each
        expanded node's ancestors, and itself."""
        e = len(expand)
        mask = torch.zeros(e, self.length + drafted + e, dtype=torch.bool)
        mask[:, : self.length] = True
        for j, node in enumerate(expand):
            mask[j, self.length + drafted + j] = True
            ancestor = parents[node]
            while ancestor >= 0:
                mask[j, self.length + rows_of[ancestor]] = True
                ancestor = parents[ancestor]
        return mask

    def _head(
        self,
        hidden: Tensor,
        embedded: Tensor,
        positions: Tensor,
        start: int,
        mask: Tensor | None = None,
    ) -> Tensor:
        cache = (self.k_cache, self.v_cache)
        linears = self.shared.linears
        return self.shared.head(hidden, embedded, positions, cache, start, mask, linears)


def build(options: Options, context: DraftContext) -> EagleDrafter:
    target = target_of(context)
    path = Path(options.heads) if options.heads else find_heads(METHOD, target, context.cache_dir)
    loaded = load_heads(path, METHOD, target)
    try:
        head = EagleHead.from_file(loaded.shapes, loaded.tensors).eval()
    except (KeyError, ValueError, RuntimeError) as e:
        raise InputError(f"the eagle head in {path} is corrupt ({e})") from None
    if head.hidden_size != target.hidden_size or int(head.draft_vocab.max()) >= target.vocab_size:
        raise InputError(f"the eagle head in {path} does not fit the target's sizes")
    backend = context.backend
    lm_head = backend.lm_head_part(head.draft_vocab)
    linears = {name: backend.linear(m.weight, m.bias) for name, m in head.projections().items()}
    cost = context.cost_curve()
    shared = Shared(head, linears, backend.embeddings, lm_head, backend.max_len, cost)
    return EagleDrafter(options, shared, context.num_speculative_tokens or options.max_nodes)
