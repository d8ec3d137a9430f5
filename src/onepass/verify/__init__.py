"""Verifiers: chosen centrally from the sampling mode, never by the drafter.

- greedy request -> exact match against the target's argmax (chains and trees);
- sampling, a chain with draft_probs -> speculative (rejection) sampling;
- sampling, a tree or a deterministic draft -> multi-draft verification (recursive rejection
  for sampled drafts; for deterministic ones, the target's own position-keyed sample matched
  against the children, which reproduces plain sampling token for token);
- `acceptance="typical"` -> Medusa's typical acceptance, an opt-in that is NOT lossless.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onepass.draft import Draft, Verdict
from onepass.sampling import LogitsProcessor, RequestRandomness
from onepass.verify.greedy import verify_greedy
from onepass.verify.multi_draft import verify_tree
from onepass.verify.rejection import verify_rejection
from onepass.verify.typical import verify_typical

__all__ = ["Verdict", "verify"]


def verify(
    draft: Draft,
    logits: Tensor,
    processor: LogitsProcessor,
    rng: RequestRandomness,
    typical: tuple[float, float] | None = None,
) -> Verdict:
    """logits: [n + 1, vocab] penalised target logits (row 0 = root, row i + 1 = node i).
    typical: (posterior_threshold, posterior_alpha) to use typical acceptance (lossy)."""
    params = processor.params
    if typical is not None:
        probs = torch.softmax(logits.float(), -1) if params.greedy else processor.probs(logits)
        return verify_typical(draft, probs, rng.generator, *typical, greedy=params.greedy)
    if params.greedy:
        return verify_greedy(draft, logits)
    is_chain = all(p == i - 1 for i, p in enumerate(draft.tree.parents))
    if draft.draft_probs is not None and is_chain and len(draft):
        return verify_rejection(draft, processor.probs(logits), rng.generator)
    return verify_tree(draft, LazyRows(logits, processor), rng, processor.num_generated)


class LazyRows:
    """processor.probs(logits) row by row, computed when first indexed: a tree walk visits
    only the rows on its accepted path, and warping (top-p sorts the vocabulary) is not free."""

    def __init__(self, logits: Tensor, processor: LogitsProcessor) -> None:
        self.logits, self.processor = logits, processor
        self.rows: dict[int, Tensor] = {}

    def __getitem__(self, row: int) -> Tensor:
        if row not in self.rows:
            self.rows[row] = self.processor.probs(self.logits[row : row + 1])[0]
        return self.rows[row]
