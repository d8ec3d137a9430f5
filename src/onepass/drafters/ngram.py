"""Prompt lookup decoding (Saxena 2023; vLLM's `ngram` method): find the last few tokens
earlier in the prompt + output and propose what followed them there. No model, no weights.

Which match wins (table-tested in tests/test_ngram.py):
1. the longest suffix length n, from prompt_lookup_max down to prompt_lookup_min, that occurs
   earlier in the sequence;
2. among occurrences of that n-gram, the most recent one (the latest start position) — recent
   text predicts the continuation best, and in repetitive output it is the loop being followed;
3. the proposal is the up to num_speculative_tokens tokens that followed it (fewer if the
   sequence ends first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters.base import Drafter
from onepass.models.base import ModelOutput


@dataclass
class Options:
    prompt_lookup_min: int = 1
    """Shortest suffix to match."""
    prompt_lookup_max: int = 4
    """Longest suffix to match."""

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")


def find_match(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[int, np.ndarray]:
    """(n, continuation) of the winning match (see module docstring); (0, empty) if none."""
    length = len(tokens)
    if length < 2:
        return 0, tokens[:0]
    # Where an earlier occurrence of the last n tokens ends: the occurrences of the last token
    # (one comparison over the sequence), narrowed token by token to those of longer suffixes.
    # A longer suffix's occurrences are a subset of a shorter one's, so narrowing stops at the
    # first n without any.
    ends = np.flatnonzero(tokens[: length - 1] == tokens[-1])
    best_n, best_ends = 0, ends
    for n in range(1, min(max_n, length - 1) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[tokens[ends - (n - 1)] == tokens[length - n]]
        if not ends.size:
            break
        best_n, best_ends = n, ends
    if best_n < min_n:
        return 0, tokens[:0]
    begin = int(best_ends[-1]) + 1  # the latest occurrence; what followed it
    return best_n, tokens[begin : begin + k]


class TokenBuffer:
    """The request's tokens as a growing numpy array (appends are amortised O(1))."""

    def __init__(self) -> None:
        self.data = np.zeros(1024, dtype=np.int64)
        self.length = 0

    def sync(self, tokens: Sequence[int]) -> np.ndarray:
        """Bring the buffer up to `tokens` (which only grows) and return a view of it."""
        if len(tokens) > len(self.data):
            self.data = np.resize(self.data, max(len(tokens), 2 * len(self.data)))
        if len(tokens) > self.length:
            self.data[self.length : len(tokens)] = tokens[self.length :]
        self.length = len(tokens)
        return self.data[: self.length]


class NgramDrafter(Drafter):
    """Learns nothing across requests: all its state is the request's tokens."""

    def __init__(self, options: Options, k: int) -> None:
        self.options = options
        self.k = k
        self.buffer = TokenBuffer()

    def fork(self) -> NgramDrafter:
        return NgramDrafter(self.options, self.k)

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.buffer = TokenBuffer()

    def propose(self, state: DecodeState) -> Draft:
        k = min(self.k, state.max_depth, state.max_draft_tokens)
        if k <= 0:
            return Draft.empty()
        tokens = self.buffer.sync(state.tokens)
        o = self.options
        _, continuation = find_match(tokens, o.prompt_lookup_min, o.prompt_lookup_max, k)
        return Draft.chain(continuation.tolist())

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        pass


def build(options: Options, context) -> NgramDrafter:
    return NgramDrafter(options, context.num_speculative_tokens or 8)
