"""The Drafter contract (design.md §3); its currency lives in onepass.draft."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from onepass.draft import DecodeState, Draft, Verdict

if TYPE_CHECKING:
    from onepass.models.base import ModelOutput


class Drafter(Protocol):
    """Proposes future tokens; never decides how they are verified."""

    def start(self, prompt_ids: Sequence[int]) -> None:
        """A new request begins (reset per-request state; keep what is learned across)."""
        ...

    def propose(self, state: DecodeState) -> Draft: ...

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        """The target's verdict and outputs on the last draft: learn, adapt, roll back."""
        ...
