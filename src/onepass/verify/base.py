"""The verifier's result (vLLM's words: accepted, recovered, bonus)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    path: list[int]
    """Accepted draft nodes, root -> leaf (indices into Draft.tokens)."""
    tokens: list[int]
    """The accepted tokens, then one recovered token (the target's own choice where the draft
    was rejected) or bonus token (after a fully accepted path): len(path) + 1 tokens."""
