"""Verification of draft trees under sampling: recursive rejection sampling for sampled
drafts (SpecInfer, arXiv 2305.09781; the multi-draft case of SpecTr, arXiv 2310.15141), and
sample-then-match for deterministic drafts.

Sampled drafts: at each accepted node its children are tried in order. Child c (token t drawn
from q_c) is accepted with probability min(1, r(t) / q_c(t)), where r starts as the target's
distribution at that node; each rejection replaces r with norm(max(0, r - q_c)). If every child
is rejected, the recovered token is drawn from the final r; a leaf adds a bonus token drawn from
the target. Each emitted token has the target's distribution, provided sampled siblings were
drawn independently from their q_c.

Deterministic drafts (draft_probs None): the target's token at each node is drawn first, by the
request's position-keyed exponential race (sampling.RequestRandomness), and the child holding
that token, if any, is accepted. This is the point-mass case of the rule above (a sibling is
accepted with the same probability), and it emits exactly the tokens plain sampling emits for
the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onepass.draft import Draft, Verdict
from onepass.sampling import RequestRandomness, sample
from onepass.verify.rejection import residual


def verify_tree(
    draft: Draft, target_probs: Tensor, rng: RequestRandomness, first_index: int
) -> Verdict:
    """target_probs: [n + 1, vocab]; row 0 = root, row i + 1 = node i. first_index: output
    index of the token that follows the root."""
    if draft.draft_probs is None:
        return _match_sampled(draft, target_probs, rng, first_index)
    return _recursive_rejection(draft, target_probs, rng.generator)


def _match_sampled(
    draft: Draft, target_probs: Tensor, rng: RequestRandomness, first_index: int
) -> Verdict:
    children = draft.tree.children()
    path: list[int] = []
    row = 0
    while True:
        token = rng.choose(target_probs[row], first_index + len(path))
        match = next((c for c in children[row] if draft.tokens[c] == token), None)
        if match is None:
            return Verdict(path, [draft.tokens[i] for i in path] + [token])
        path.append(match)
        row = match + 1


def _recursive_rejection(draft: Draft, target_probs: Tensor, generator: torch.Generator) -> Verdict:
    assert draft.draft_probs is not None
    children = draft.tree.children()
    path: list[int] = []
    row = 0
    while True:
        r = target_probs[row]  # [vocab], the residual distribution at this node
        accepted = None
        for c in children[row]:
            t = draft.tokens[c]
            q = draft.draft_probs[c].to(r)  # [vocab]
            u = float(torch.rand(1, generator=generator))
            if u * float(q[t]) < float(r[t]):  # u < r(t) / q(t), without dividing by zero
                accepted = c
                break
            r = residual(r, q)
        if accepted is None:
            return Verdict(path, [draft.tokens[i] for i in path] + [sample(r, generator)])
        path.append(accepted)
        row = accepted + 1
