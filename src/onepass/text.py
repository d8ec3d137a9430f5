"""From emitted token ids to output text: incremental detokenization and stop conditions.

Detokenization follows the offsets technique of vLLM / TGI: decode a short window of recent
tokens twice (with and without the newest ones) and emit the difference, holding text back
while it ends in an incomplete UTF-8 sequence. Nothing is re-decoded from the start, and a
multi-byte character is never split across deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onepass.sampling import SamplingParams

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output tokens (leading spaces)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token: int) -> str:
        """Append one token; return the text that became final."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        kw = {"skip_special_tokens": self.skip_special_tokens}
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], **kw)
        full = decode(self.ids[self.prefix_offset :], **kw)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


class OutputAssembler:
    """Applies one request's stop conditions token by token and builds its text.

    Tokens arrive in steps of several (speculation), but every condition is checked after
    each token, so the output is exactly what plain decoding would have stopped at.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.stop_ids = set(params.stop_token_ids or [])
        self.hold = max((len(s) for s in params.stop_strings), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already handed out as deltas
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, tokens: Sequence[int]) -> int:
        """Take tokens until one finishes the output; return how many were taken."""
        for taken, token in enumerate(tokens):
            if self.finished:
                return taken
            self._add_one(token)
        return len(tokens)

    def _add_one(self, token: int) -> None:
        p = self.params
        self.token_ids.append(token)
        if token in self.stop_ids or token in self.eos:
            self.finish_reason = "stop"
            self.stop_reason = token if token in self.stop_ids else None
            if p.include_stop_str_in_output:
                self.text += self.detok.add(token)
            return
        before = len(self.text)
        self.text += self.detok.add(token)
        # Stop strings are held back until min_tokens, as EOS is (vLLM's rule).
        if p.stop_strings and len(self.text) > before and len(self.token_ids) >= p.min_tokens:
            self._check_stop_strings(before)
        if not self.finished and p.max_tokens is not None and len(self.token_ids) >= p.max_tokens:
            self.finish_reason = "length"

    def _check_stop_strings(self, before: int) -> None:
        start = max(0, before - self.hold)
        hits = [(self.text.find(s, start), s) for s in self.params.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return
        index, stop = min(hits)
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:end]
        self.sent = min(self.sent, end)
        self.finish_reason, self.stop_reason = "stop", stop

    def finish_length(self) -> None:
        """The context window is full."""
        if not self.finished:
            self.finish_reason = "length"

    def delta(self) -> str:
        """Text not yet handed out. While running, the last characters that could still start
        a stop string are held back."""
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
