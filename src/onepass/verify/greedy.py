"""Greedy verification: accept the longest draft path that matches the target's argmax at
every step, then add the target's argmax after it (bonus or recovered token). Output is the
plain greedy decode, token for token."""

from __future__ import annotations

from torch import Tensor

from onepass.draft import Draft, Verdict
from onepass.top_tokens import row_argmax


def verify_greedy(draft: Draft, logits: Tensor) -> Verdict:
    """logits: [n + 1, vocab] penalised target logits; row 0 = root, row i + 1 = node i."""
    targets = row_argmax(logits)  # [n + 1]
    children = draft.tree.children()
    path: list[int] = []
    row = 0
    while True:
        want = targets[row]
        match = next((c for c in children[row] if draft.tokens[c] == want), None)
        if match is None:
            return Verdict(path, [draft.tokens[i] for i in path] + [want])
        path.append(match)
        row = match + 1
