"""Medusa-1 heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads", arXiv 2401.10774).

Head k (k = 1..K) maps the target's last hidden state h_t (final norm applied, the row the
target's LM head reads) to a guess of token t + 1 + k through one residual block,
SiLU(W_k h + b_k) + h, and then the target's own LM head, shared and frozen. With W_k = 0 a
head starts as the target's next-token prediction, as in the paper.

The LM head may be restricted to a draft vocabulary (FR-Spec, arXiv 2502.14856: the most
frequent tokens of the training data), so that training and drafting read a few thousand of its
rows instead of all of them (49152 rows, 113 MB in fp32, on the default model)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

METHOD = "medusa"


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, hidden_size: int, draft_vocab: Tensor | None = None) -> None:
        """draft_vocab: [V] target ids the heads guess among (None: the whole vocabulary)."""
        super().__init__()
        self.draft_vocab = None if draft_vocab is None else draft_vocab.long()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}")
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.zeros(num_heads, hidden_size, hidden_size))  # [K, H, H]
        self.bias = nn.Parameter(torch.zeros(num_heads, hidden_size))  # [K, H]

    def forward(self, hidden: Tensor) -> Tensor:
        """[n, H] -> [n, K, H]: each head's input to the LM head."""
        z = torch.einsum("nh,kgh->nkg", hidden, self.weight) + self.bias
        return nn.functional.silu(z) + hidden[:, None, :]

    def tensors(self) -> dict[str, Tensor]:
        out = {"weight": self.weight.detach(), "bias": self.bias.detach()}
        if self.draft_vocab is not None:
            out["draft_vocab"] = self.draft_vocab.to(torch.int32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> MedusaHeads:
        weight, bias = tensors["weight"], tensors["bias"]
        if (
            weight.dim() != 3
            or weight.shape[1] != weight.shape[2]
            or bias.shape != weight.shape[:2]
        ):
            raise ValueError(f"bad Medusa head shapes {tuple(weight.shape)}, {tuple(bias.shape)}")
        heads = cls(weight.shape[0], weight.shape[1], tensors.get("draft_vocab"))
        with torch.no_grad():
            heads.weight.copy_(weight)
            heads.bias.copy_(bias)
        return heads

    def shapes(self) -> dict[str, int | None]:
        size = None if self.draft_vocab is None else int(self.draft_vocab.shape[0])
        return {"num_heads": self.num_heads, "hidden_size": self.hidden_size, "draft_vocab": size}
