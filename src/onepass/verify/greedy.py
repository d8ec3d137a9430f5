"""Greedy verification: accept the longest draft path that matches the target's argmax at
every step, then add the target's argmax after it (bonus or recovered token). Output is the
plain greedy decode, token for token."""

from __future__ import annotations

import torch
from torch import Tensor

from onepass.drafters.base import Draft
from onepass.verify.base import Verdict


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


def row_argmax(logits: Tensor) -> list[int]:
    """The first index of each row's maximum. On CPU through NumPy: torch's argmax over a 49k
    vocabulary costs ~0.4 ms a call there, NumPy's ~0.07 ms (same ties: first index wins)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()
