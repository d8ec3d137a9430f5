"""Training an EAGLE head (heads/eagle.py) on cached hidden states, as EAGLE does: row t reads
(h_t, e(x_{t+1})) and its output g_t is pulled towards h_{t+1} (smooth L1) and, through the
target's frozen LM head restricted to the draft vocabulary, towards the target's own next-token
distribution at h_{t+1} (cross-entropy, weight 0.1); small uniform noise on the input features
makes the head robust to reading its own guesses.

Drafting reads those guesses: the node at depth d reads g from depth d - 1 in place of the
hidden state it has not got. With `unroll` > 1 the loss also unrolls the head (EAGLE-3's
"training-time test"): pass d feeds row t the previous pass's g_{t-1} and attends, as a draft
row does, to the true rows up to t - d and to its chain's rows of the earlier passes. On the
default model it gained little for twice the training time (docs/results/heads): not the
default.

The draft vocabulary (FR-Spec) is the tokens the target most often predicts over the answers,
plus the end-of-turn tokens."""

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
DEFAULT_UNROLL = 1  # passes of the training-time test (1: plain EAGLE training)
PASS_DECAY = 0.5  # a later pass's loss weight: the first depth decides most of the acceptance


class EagleTrainer:
    method = METHOD

    def __init__(
        self,
        head: EagleHead,
        embed: Callable[[Tensor], Tensor],
        lm_weight: Tensor,
        unroll: int = DEFAULT_UNROLL,
    ):
        self.module = head
        self.embed = embed
        self.unroll = unroll
        self.num_outputs = unroll  # accuracy per depth
        self.lm_rows = lm_weight[head.draft_vocab]  # [draft vocab, H], frozen
        # target id -> draft index (-1: outside the draft vocabulary)
        self.index = torch.full((lm_weight.shape[0],), -1, dtype=torch.long)
        self.index[head.draft_vocab] = torch.arange(head.draft_vocab.shape[0])

    def loss(
        self, samples: Sequence[Sample], generator: torch.Generator, all_positions: bool = False
    ) -> tuple[Tensor, Tensor]:
        total, rows = torch.zeros(()), 0
        counts = torch.zeros(self.unroll, 2)
        for s in samples:
            # Rows t = start-1..T-2, as the drafter feeds them: from the prompt's last token on
            # (the prefill gives the drafter only that row's hidden state).
            t = torch.arange(s.start - 1, len(s.ids) - 1)
            n = len(t)
            if n < 2 or s.first > s.start:
                continue
            hidden = s.hidden[t - s.first]  # [n, H] h_t
            inputs = hidden
            if not all_positions:  # training (evaluation reads the features as they are)
                noise = torch.rand(inputs.shape, generator=generator) * 2 - 1
                inputs = inputs + NOISE * noise
            with torch.no_grad():
                embedded = self.embed(s.ids[t + 1]).float()  # e(x_{t+1})
                # Row j's targets: h_{t+1} and the target's distribution there.
                wanted = torch.softmax(hidden[1:] @ self.lm_rows.T, -1)  # [n - 1, V]
                greedy = self.index[s.greedy[t[:-1] + 1 - s.first]]  # -1: outside the vocab
            guesses = unrolled(self.module, inputs, hidden[:1], embedded, t, self.unroll)
            for d, g in enumerate(guesses):
                valid = slice(d, n - 1)  # rows with a whole chain and a next row
                if valid.start >= valid.stop:
                    break
                guess = g[valid]
                feature_loss = F.smooth_l1_loss(guess, hidden[1:][valid], reduction="sum")
                logits = guess @ self.lm_rows.T
                token_loss = -(wanted[valid] * torch.log_softmax(logits, -1)).sum()
                loss = feature_loss / g.shape[1] + TOKEN_WEIGHT * token_loss
                total = total + PASS_DECAY**d * loss
                rows += valid.stop - valid.start
                counts[d, 0] += float((logits.argmax(-1) == greedy[valid]).sum())
                counts[d, 1] += valid.stop - valid.start
        return total / max(rows, 1), counts

    def shapes(self) -> dict[str, Any]:
        return self.module.config()

    def tensors(self) -> dict[str, Tensor]:
        return self.module.tensors()


def unrolled(
    head: EagleHead, inputs: Tensor, first: Tensor, embedded: Tensor, t: Tensor, passes: int
) -> list[Tensor]:
    """The head's guesses [n, H] of h_{t+1} at each row in each pass: pass 0 reads `inputs`
    (h_t), pass d row j reads pass d - 1's g_{j-1} (row 0, which has no chain, reads `first`),
    as drafting at depth d + 1 from the true row j - d does."""
    n = len(t)
    keys = torch.zeros(0, head.num_kv_heads, head.head_dim)
    values = torch.zeros_like(keys)
    guesses: list[Tensor] = []
    for d in range(passes):
        if d > 0:
            inputs = torch.cat([first, guesses[-1][:-1]])
        # Fresh buffers each pass: the earlier passes' keys stay as autograd saw them.
        pad = torch.zeros(n, head.num_kv_heads, head.head_dim)
        keys, values = torch.cat([keys, pad]), torch.cat([values, pad])
        guesses.append(head(inputs, embedded, t, (keys, values), d * n, chain_mask(n, d)))
    return guesses


def chain_mask(n: int, depth: int) -> Tensor:
    """[n, (depth + 1) n] bool for pass `depth` (0: the true rows) of n rows: row j sees the
    true rows up to j - depth and, in pass k = 1..depth, row j - depth + k (its chain's row of
    that pass; k = depth is itself)."""
    eye = torch.eye(n, dtype=torch.bool)
    blocks = [torch.ones(n, n, dtype=torch.bool).tril(-depth)]
    blocks += [eye.roll(k - depth, 1).tril() for k in range(1, depth + 1)]  # tril: no wrap
    return torch.cat(blocks, 1)


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
    unroll = int(config.extra.get("unroll", DEFAULT_UNROLL))
    return EagleTrainer(head, llm.backend.embeddings, lm_weight, unroll)
