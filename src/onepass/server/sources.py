"""Which part of the streamed text each token produced, for the page's colours.

The LLM streams text deltas (held back while a stop string or a multi-byte character may be
incomplete) and, separately, one source per token ("target" or a drafter's name). To colour
the text token by token, a second incremental detokenizer (the same one the LLM uses, so the
same pieces) turns the tokens into pieces; every delta's text is a continuation of their
concatenation, and is split along the piece boundaries into [text, source] runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from onepass.text import IncrementalDetokenizer


class SourceTracker:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.pieces: list[tuple[int, str]] = []  # (end, source): where each piece ends
        self.length = 0  # characters of text the tokens so far decode to
        self.sent = 0  # characters of text already split
        self.first = 0  # first piece not yet wholly sent

    def split(self, token_ids: Sequence[int], sources: Sequence[str], text: str) -> list[list[str]]:
        """Take a step's tokens and sources; return its text delta as [text, source] runs
        (one per token, in order; their texts concatenate to `text`)."""
        for token, source in zip(token_ids, sources, strict=True):
            piece = self.detok.add(token)
            if piece:  # a token that completes no character is coloured with the next one
                self.pieces.append((self.length + len(piece), source))
                self.length += len(piece)
        runs: list[list[str]] = []
        start, end = self.sent, self.sent + len(text)
        pos = start
        while pos < end and self.first < len(self.pieces):
            p_end, source = self.pieces[self.first]
            cut = min(p_end, end)
            if cut > pos:
                runs.append([text[pos - start : cut - start], source])
                pos = cut
            if p_end <= end:
                self.first += 1
            else:
                break
        if pos < end:  # text past what the tokens decode to: should not happen; keep it all
            runs.append([text[pos - start :], "target"])
        self.sent = end
        return runs
