"""The Backend contract: what the engine needs from a target model (design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class ModelOutput:
    logits: Tensor  # [n, vocab] float32
    hidden: Tensor | None = None  # [n, hidden] final hidden states, for feature-based drafters


@dataclass(frozen=True)
class Rows:
    """One request's new rows in a forward."""

    ids: Tensor  # [n]
    positions: Tensor  # [n]
    mask: Tensor | None = None  # [n, n] bool: row i may attend to new row j (None = causal)
    logits: str = "all"
    """Rows whose logits are wanted: "all", "last" (a prompt's last chunk) or "none"."""


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

    def run(self, rows: Rows) -> ModelOutput:
        """forward() with the rows' choice of logits."""
        ...

    def prefill_chunks(self, n: int) -> list[int]:
        """The chunk sizes a prompt of n tokens is prefilled in (each chunk causal)."""
        ...

    def commit(self, keep: Tensor) -> None:
        """Keep the KV rows `keep` of the last forward, in order, after the committed cache."""
        ...
