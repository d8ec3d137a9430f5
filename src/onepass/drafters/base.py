"""The Drafter contract (design.md §3); its currency lives in onepass.draft.

A drafter holds two kinds of state (design.md §9): what it learns across requests (Token
Recycling's table, auto's acceptance estimates, the suffix history, a draft model's weights),
and its view of one request (the prompt and answer so far, a draft model's KV cache). The LLM
keeps one drafter per speculative config and gives every request `fork()` of it: the learned
state is shared by reference, the per-request state is the fork's own, so requests decoding at
the same time never see each other's partial state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from onepass.draft import DecodeState, Draft, Verdict

if TYPE_CHECKING:
    from onepass.models.base import ModelOutput


class Drafter(Protocol):
    """Proposes future tokens; never decides how they are verified. Drafters subclass this
    protocol to inherit the default `finish`."""

    def fork(self) -> Drafter:
        """A drafter for another (possibly concurrent) request: it shares by reference what
        this drafter learns across requests, and has its own per-request state."""
        ...

    def start(self, prompt_ids: Sequence[int]) -> None:
        """A new request begins (reset per-request state; keep what is learned across)."""
        ...

    def observe_prompt(self, out: ModelOutput, first_token: int) -> None:
        """The prefill's output on the prompt's last row (its logits and hidden state) and the
        first token drawn from it, before the first proposal: heads that read the target's
        hidden states (medusa, eagle) can draft from the first step. Default: nothing."""
        return None

    def propose(self, state: DecodeState) -> Draft: ...

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        """The target's verdict and outputs on the last draft: learn, adapt, roll back."""
        ...

    def finish(self) -> None:
        """The request ended (finished, stopped or abandoned): what it showed may now join the
        learned state, for later requests only. Default: nothing to learn."""
        return None
