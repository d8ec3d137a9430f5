"""Training Medusa-1 heads (heads/medusa.py) on cached hidden states: head k at row t learns
token t + 1 + k as the target would write it (its greedy token after the sample's first
t + k tokens), by cross-entropy through the target's frozen LM head
restricted to the draft vocabulary (tokens outside it are left out of the loss and count as
misses), head k's loss weighted 0.8^(k-1) as in the Medusa paper."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from onepass.heads.medusa import METHOD, MedusaHeads
from onepass.train.features import DEFAULT_DRAFT_VOCAB, Sample, draft_vocabulary

DEFAULT_HEADS = 3
HEAD_DECAY = 0.8


class MedusaTrainer:
    method = METHOD

    def __init__(self, heads: MedusaHeads, lm_weight: Tensor, positions: int):
        self.module = heads
        self.num_outputs = heads.num_heads
        self.positions = positions
        vocab = heads.draft_vocab
        if vocab is None:
            vocab = torch.arange(lm_weight.shape[0])
        self.lm_rows = lm_weight[vocab]  # [V, H], frozen
        # target id -> draft index (-1: outside the draft vocabulary)
        self.index = torch.full((lm_weight.shape[0],), -1, dtype=torch.long)
        self.index[vocab] = torch.arange(vocab.shape[0])

    def loss(
        self, samples: Sequence[Sample], generator: torch.Generator, all_positions: bool = False
    ) -> tuple[Tensor, Tensor]:
        hidden, labels = self._rows(samples, generator, all_positions)  # [n, H], [n, K]
        features = self.module(hidden)  # [n, K, H]
        total = hidden.new_zeros(())
        counts = torch.zeros(self.num_outputs, 2)
        for k in range(self.num_outputs):
            valid = labels[:, k] >= 0
            target = self.index[labels[valid, k]]  # draft indices, -1 outside the vocabulary
            known = target >= 0
            if not known.any():
                continue
            logits = F.linear(features[valid, k], self.lm_rows)  # [m, V]
            total = total + HEAD_DECAY**k * F.cross_entropy(logits[known], target[known])
            counts[k, 0] += float((logits.argmax(-1) == target).sum())
            counts[k, 1] += int(valid.sum())
        return total, counts

    def _rows(
        self, samples: Sequence[Sample], generator: torch.Generator, all_positions: bool
    ) -> tuple[Tensor, Tensor]:
        """Hidden rows t from the last prompt token on, and their labels: token t + 1 + k
        for head k, -1 past the sample's end."""
        hiddens, labels = [], []
        for s in samples:
            end = len(s.ids) - 2  # the last row with a label for head 1
            rows = torch.arange(s.start - 1, end)
            if len(rows) == 0:
                continue
            if not all_positions and 0 < self.positions < len(rows):
                rows = rows[torch.randperm(len(rows), generator=generator)[: self.positions]]
            # Head k guesses token t + 1 + k: the target's greedy token at row t + k.
            offsets = torch.arange(1, self.num_outputs + 1)
            index = rows[:, None] + offsets[None, :] - s.first  # [r, K] rows of s.greedy
            valid = index < len(s.greedy)
            labels.append(torch.where(valid, s.greedy[index.clamp(max=len(s.greedy) - 1)], -1))
            hiddens.append(s.hidden[rows - s.first])
        return torch.cat(hiddens), torch.cat(labels)

    def shapes(self) -> dict[str, Any]:
        return self.module.shapes()

    def tensors(self) -> dict[str, Tensor]:
        return self.module.tensors()


def make_trainer(llm: Any, lm_weight: Tensor, config: Any, samples: Any) -> MedusaTrainer:
    num_heads = int(config.extra.get("num_heads", DEFAULT_HEADS))
    size = int(config.extra.get("draft_vocab", DEFAULT_DRAFT_VOCAB))
    vocab = None
    if size:  # 0: the whole vocabulary
        vocab = draft_vocabulary(samples(), lm_weight.shape[0], size, list(llm.eos_token_ids))
    heads = MedusaHeads(num_heads, llm.model_config.hidden_size, vocab)
    return MedusaTrainer(heads, lm_weight, config.positions)
