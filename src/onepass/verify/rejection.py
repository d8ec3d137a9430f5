"""Speculative sampling for a chain drawn from a draft distribution (Leviathan et al. 2023,
arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).

Token i of the chain, drawn from draft_probs[i], is accepted with probability
min(1, target_probs[i][t] / draft_probs[i][t]). At the first rejection the recovered token is
drawn from norm(max(0, target_probs[i] - draft_probs[i])); if all are accepted, a bonus token
is drawn from the target's distribution after the chain. Each emitted token then has exactly
the target's distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onepass.draft import Draft, Verdict
from onepass.sampling import sample


def residual(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """norm(max(0, target - draft)): [vocab]. Falls back to the target if nothing is left
    (only reachable through rounding, since then acceptance was certain)."""
    rest = (target_probs - draft_probs).clamp_min(0)
    total = rest.sum()
    return rest / total if total > 0 else target_probs


def verify_rejection(
    draft: Draft, target_probs: Tensor, generator: torch.Generator | None
) -> Verdict:
    """target_probs: [n + 1, vocab], row i predicts chain token i; draft_probs: [n, vocab]."""
    assert draft.draft_probs is not None, "rejection sampling needs draft_probs"
    n = len(draft)
    tokens = torch.tensor(draft.tokens, dtype=torch.long, device=target_probs.device)
    rows = torch.arange(n, device=target_probs.device)
    p = target_probs[rows, tokens]  # [n] target probability of each draft token
    q = draft.draft_probs[rows, tokens].to(p)  # [n] draft probability of each draft token
    accept = torch.rand(n, generator=generator, device=p.device) < (p / q).clamp(max=1.0)
    rejected = (~accept).nonzero()
    a = int(rejected[0]) if rejected.numel() else n
    if a < n:
        last = sample(residual(target_probs[a], draft.draft_probs[a].to(p)), generator)
    else:
        last = sample(target_probs[n], generator)
    return Verdict(list(range(a)), [*draft.tokens[:a], last])
