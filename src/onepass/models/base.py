"""The Backend contract: what the engine needs from a target model (design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class ModelOutput:
    logits: Tensor  # [n, vocab] float32
    hidden: Tensor | None = None  # [n, hidden] final hidden states, for feature-based drafters


class Backend(Protocol):
    max_len: int

    @property
    def cache_len(self) -> int:
        """Committed KV rows (= the position of the next token)."""
        ...

    def prefill(self, ids: Tensor) -> ModelOutput:
        """Reset the cache and commit the prompt ids: [n]; returns the last row only."""
        ...

    def forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None) -> ModelOutput:
        """Score new tokens ids, positions: [n] under mask: [n, n] (None = causal)."""
        ...

    def commit(self, keep: Tensor) -> None:
        """Keep the KV rows `keep` of the last forward, in order, after the committed cache."""
        ...
