"""Training an EAGLE head (heads/eagle.py) on cached hidden states, as EAGLE does: row t reads
(h_t, e(x_{t+1})) and its output g_t is pulled towards h_{t+1} (smooth L1) and, through the
target's frozen LM head restricted to the draft vocabulary, towards token x_{t+2}
(cross-entropy, weight 0.1); small uniform noise on the input features makes the head robust
to reading its own guesses at deeper levels. The draft vocabulary (FR-Spec) is the training
data's most frequent answer tokens, plus the end-of-turn tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from onepass.heads.eagle import METHOD, EagleHead
from onepass.train.features import DEFAULT_DRAFT_VOCAB, Sample, draft_vocabulary

TOKEN_WEIGHT = 0.1  # EAGLE's weight of the token loss next to the feature loss
NOISE = 0.1  # half-width of the uniform noise on input features (EAGLE: U(-0.1, 0.1))


class EagleTrainer:
    method = METHOD
    num_outputs = 1

    def __init__(self, head: EagleHead, embed: Callable[[Tensor], Tensor], lm_weight: Tensor):
        self.module = head
        self.embed = embed
        self.lm_rows = lm_weight[head.draft_vocab]  # [draft vocab, H], frozen
        # target id -> draft index (-1: outside the draft vocabulary)
        self.index = torch.full((lm_weight.shape[0],), -1, dtype=torch.long)
        self.index[head.draft_vocab] = torch.arange(head.draft_vocab.shape[0])

    def loss(
        self, samples: Sequence[Sample], generator: torch.Generator, all_positions: bool = False
    ) -> tuple[Tensor, Tensor]:
        total, rows = torch.zeros(()), 0
        counts = torch.zeros(1, 2)
        for s in samples:
            # Rows t = start-1..T-2, as the drafter feeds them: from the prompt's last token on
            # (the prefill gives the drafter only that row's hidden state).
            t = torch.arange(s.start - 1, len(s.ids) - 1)
            if len(t) < 2 or s.first > s.start:
                continue
            hidden = s.hidden[t - s.first]  # [n, H] h_t
            inputs = hidden
            if not all_positions:  # training (evaluation reads the features as they are)
                noise = torch.rand(inputs.shape, generator=generator) * 2 - 1
                inputs = inputs + NOISE * noise
            with torch.no_grad():
                embedded = self.embed(s.ids[t + 1]).float()  # e(x_{t+1})
            g = self.module(inputs, embedded, t)  # [n, H], guesses of h_{t+1}
            feature_loss = F.smooth_l1_loss(g[:-1], hidden[1:], reduction="sum") / g.shape[1]
            logits = g[:-1] @ self.lm_rows.T  # [n - 1, draft vocab]
            target = self.index[s.ids[t[:-1] + 2]]  # x_{t+2} in the draft vocabulary, or -1
            known = target >= 0
            token_loss = F.cross_entropy(logits[known], target[known], reduction="sum")
            total = total + feature_loss + TOKEN_WEIGHT * token_loss
            rows += len(t) - 1
            counts[0, 0] += float((logits.argmax(-1) == target).sum())
            counts[0, 1] += len(target)
        return total / max(rows, 1), counts

    def shapes(self) -> dict[str, Any]:
        return self.module.config()

    def tensors(self) -> dict[str, Tensor]:
        return self.module.tensors()


def make_trainer(llm: Any, lm_weight: Tensor, config: Any, samples: Any) -> EagleTrainer:
    c = llm.model_config
    size = int(config.extra.get("draft_vocab", DEFAULT_DRAFT_VOCAB)) or lm_weight.shape[0]
    vocab = draft_vocabulary(samples(), lm_weight.shape[0], size, list(llm.eos_token_ids))
    torch.manual_seed(config.seed)
    head = EagleHead(
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        # The MLP dominates the layer's weights, read once per draft level: at the hidden size
        # (not the target's 1536 on the default model) the layer reads 10 MB, not 17 MB.
        int(config.extra.get("intermediate_size", c.hidden_size)),
        c.rope_theta,
        c.rms_norm_eps,
        vocab,
    )
    return EagleTrainer(head, llm.backend.embeddings, lm_weight)
