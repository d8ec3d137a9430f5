"""Recursive rejection sampling over a draft tree (SpecInfer, arXiv 2305.09781; the
multi-draft case of SpecTr, arXiv 2310.15141), for sampled and deterministic drafts.

At each accepted node, its children are tried in order. Child c (token t, drawn from q_c, or a
point mass on t for a deterministic drafter) is accepted with probability
min(1, r(t) / q_c(t)), where r starts as the target's distribution at that node; each rejection
replaces r with norm(max(0, r - q_c)). If every child is rejected, the recovered token is drawn
from the final r; a leaf adds a bonus token drawn from the target. Every emitted token has the
target's distribution, provided sampled siblings were drawn independently from their q_c.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onepass.drafters.base import Draft
from onepass.sampling import sample
from onepass.verify.base import Verdict
from onepass.verify.rejection import residual


def verify_tree(draft: Draft, target_probs: Tensor, generator: torch.Generator | None) -> Verdict:
    """target_probs: [n + 1, vocab]; row 0 = root, row i + 1 = node i."""
    children = draft.tree.children()
    path: list[int] = []
    row = 0
    while True:
        r = target_probs[row]  # [vocab], the residual distribution at this node
        accepted = None
        for c in children[row]:
            t = draft.tokens[c]
            q = draft.draft_probs[c].to(r) if draft.draft_probs is not None else None
            q_t = float(q[t]) if q is not None else 1.0
            u = float(torch.rand(1, generator=generator))
            if u * q_t < float(r[t]):  # u < r(t) / q(t), without dividing by zero
                accepted = c
                break
            if q is None:
                q = torch.zeros_like(r)
                q[t] = 1.0
            r = residual(r, q)
        if accepted is None:
            return Verdict(path, [draft.tokens[i] for i in path] + [sample(r, generator)])
        path.append(accepted)
        row = accepted + 1
