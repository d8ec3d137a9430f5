"""The currency of speculation, below both drafters and verifiers (design.md §3): the Draft a
drafter proposes, the DecodeState it proposes from, and the verifier's Verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from onepass.tree import Tree

NODE_CLASSES = 12  # room for Draft.classes (and for sibling ranks, which share the slots)

if TYPE_CHECKING:
    from onepass.sampling import RequestRandomness, SamplingParams


@dataclass(frozen=True)
class Draft:
    tokens: list[int]
    """Draft token ids, parents before children."""
    tree: Tree
    """tree.parents[i]: index of node i's parent in `tokens`; -1 = child of the root."""
    draft_probs: Tensor | None = None
    """[n, vocab]: the distribution each token was drawn from; None = deterministic drafter."""
    aux_tokens: list[int] = field(default_factory=list)
    """Extra rows scored in the same forward that are not candidates (Lookahead's window)."""
    aux_offsets: list[int] = field(default_factory=list)
    """Position of each aux row relative to the root."""
    aux_mask: Tensor | None = None
    """[m, 1 + n + m] bool: which rows (root, nodes, aux) each aux row attends to."""
    classes: list[int] | None = None
    """The drafter's own category of each node's evidence (< NODE_CLASSES), which the adaptive
    drafter keys its acceptance estimates by; None = the node's rank among its siblings."""
    sources: list[str] | None = None
    """The method that proposed each node, where a drafter combines several (auto); None = the
    configured method. Shown to users (which drafter produced each token), never verified."""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.tree):
            raise ValueError("a draft needs one parent per token")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.tokens):
            raise ValueError("draft_probs needs one row per token")
        if self.sources is not None and len(self.sources) != len(self.tokens):
            raise ValueError("sources needs one method name per token")
        if self.classes is not None and (
            len(self.classes) != len(self.tokens)
            or not all(0 <= c < NODE_CLASSES for c in self.classes)
        ):
            raise ValueError(f"classes needs one value in 0..{NODE_CLASSES - 1} per token")

    @classmethod
    def empty(cls) -> Draft:
        return cls([], Tree(()))

    @classmethod
    def chain(cls, tokens: Sequence[int], draft_probs: Tensor | None = None) -> Draft:
        return cls(list(tokens), Tree.chain(len(tokens)), draft_probs)

    def __len__(self) -> int:
        return len(self.tokens)

    def truncated(self, max_depth: int, max_nodes: int) -> Draft:
        """Keep nodes no deeper than max_depth, and at most max_nodes of them (parents come
        first, so every kept node keeps its parent). Aux rows are dropped if anything is cut."""
        depths = self.tree.depths
        keep = [i for i in range(len(self)) if depths[i] <= max_depth][:max_nodes]
        if len(keep) == len(self):
            return self
        new_index = {old: new for new, old in enumerate(keep)}
        parents = tuple(
            -1 if self.tree.parents[i] < 0 else new_index[self.tree.parents[i]] for i in keep
        )
        probs = self.draft_probs[keep] if self.draft_probs is not None else None
        classes = [self.classes[i] for i in keep] if self.classes is not None else None
        sources = [self.sources[i] for i in keep] if self.sources is not None else None
        return Draft(
            [self.tokens[i] for i in keep], Tree(parents), probs, classes=classes, sources=sources
        )


@dataclass
class DecodeState:
    """What a drafter may look at when proposing."""

    tokens: list[int]
    """Prompt + generated tokens; the last one is the root (emitted, not yet in the KV cache)."""
    num_prompt_tokens: int
    max_draft_tokens: int
    """Rows left for draft nodes plus aux rows in the next forward (KV cache room)."""
    max_depth: int
    """Deepest useful node (tokens still allowed to be generated minus the root's successor)."""
    params: SamplingParams | None = None
    """The request's sampling parameters: a drafter that samples warps as the target does."""
    rng: RequestRandomness | None = None
    """The request's randomness (seeded): a drafter that samples draws from it reproducibly."""
    batch: BatchShare | None = None
    """The other requests' share of the forward, when several requests share it (continuous
    batching); None: this request runs alone."""


@dataclass(frozen=True)
class BatchShare:
    """What the other requests put into a shared forward: a drafter that prices its rows
    (auto) weighs the forward's tokens per second, all requests' together."""

    rows: int
    """Their decoding rows: roots (one per request, a request still prefilling included) and
    the drafts planned so far."""
    tokens: float
    """The tokens they are expected to emit (one per request still prefilling)."""
    prompt_rows: int = 0
    """The other rows of prompt chunks in the forward (they emit no token)."""


@dataclass(frozen=True)
class Verdict:
    path: list[int]
    """Accepted draft nodes, root -> leaf (indices into Draft.tokens)."""
    tokens: list[int]
    """The accepted tokens, then one recovered token (the target's own choice where the draft
    was rejected) or bonus token (after a fully accepted path): len(path) + 1 tokens."""
