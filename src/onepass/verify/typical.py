"""Medusa's typical acceptance (Cai et al. 2024, arXiv 2401.10774). NOT LOSSLESS: an opt-in
that trades the target's exact distribution for longer accepted paths.

A draft token is accepted when the target gives it probability above
min(posterior_threshold, posterior_alpha * exp(-entropy of the target's distribution)); the
first acceptable child is taken at each node, and the token after the path is sampled from the
target (its argmax when the request is greedy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from onepass.draft import Draft, Verdict
from onepass.sampling import sample


def verify_typical(
    draft: Draft,
    target_probs: Tensor,
    generator: torch.Generator | None,
    posterior_threshold: float,
    posterior_alpha: float,
    greedy: bool,
) -> Verdict:
    """target_probs: [n + 1, vocab]; row 0 = root, row i + 1 = node i."""
    entropy = -(target_probs * target_probs.clamp_min(1e-30).log()).sum(-1)  # [n + 1]
    cutoff = torch.minimum(
        torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy)
    ).tolist()
    children = draft.tree.children()
    path: list[int] = []
    row = 0
    while True:
        probs = target_probs[row]
        match = next(
            (c for c in children[row] if float(probs[draft.tokens[c]]) > cutoff[row]), None
        )
        if match is None:
            last = int(probs.argmax()) if greedy else sample(probs, generator)
            return Verdict(path, [draft.tokens[i] for i in path] + [last])
        path.append(match)
        row = match + 1
