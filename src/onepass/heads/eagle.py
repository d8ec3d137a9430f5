"""An EAGLE draft head (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking
Feature Uncertainty", arXiv 2401.15077; EAGLE-2, arXiv 2406.16858), with FR-Spec's reduced
draft vocabulary (Zhao et al. 2025, arXiv 2502.14856).

Row t of the head reads the target's final hidden state h_t and the embedding of the next
token x_{t+1} (the target's own, frozen): fc(concat(h_t, e(x_{t+1}))) -> H, then one Llama
decoder layer (causal attention with RoPE over the head's own KV cache, no input norm as in
EAGLE, a SwiGLU MLP) whose output g_t predicts h_{t+1}. The target's LM head restricted to the
draft vocabulary (the most frequent tokens of the training data) turns g_t into a guess of
x_{t+2}; during drafting g_t stands in for the unknown h_{t+1} at the next depth.

The head is small next to the target (one layer, a vocabulary of a few thousand rows instead of
49152 on the default model), so a draft step costs a small fraction of a target step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

METHOD = "eagle"
LINEARS = ("fc", "q", "k", "v", "o", "gate", "up", "down")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class EagleHead(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        rope_theta: float,
        rms_norm_eps: float,
        draft_vocab: Tensor,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.intermediate_size = head_dim, intermediate_size
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        self.fc = nn.Linear(2 * hidden_size, hidden_size)
        self.q = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        # Target ids of the draft vocabulary, most frequent first.
        self.register_buffer("draft_vocab", draft_vocab.long(), persistent=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """RoPE (rotate-half form) on [n, heads, head_dim] at positions [n]."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [n, head_dim / 2]
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        a, b = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def forward(
        self,
        hidden: Tensor,
        embedded: Tensor,
        positions: Tensor,
        cache: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        mask: Tensor | None = None,
        linears: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    ) -> Tensor:
        """hidden, embedded: [n, H] (h_t and e(x_{t+1})); positions: [n]. cache: (k, v)
        buffers [max_len, kv_heads, head_dim] whose rows before `start` are the past: the new
        rows' k, v are written at start..start+n-1 (None: no past, nothing kept). mask:
        [n, start + n] bool (None: all of the past, causal among the new rows). linears: the
        projections by name (LINEARS) as other callables of the same weights (the target's GEMM
        kernels when drafting); None: this module's.
        Returns g [n, H], the guesses of h_{t+1}."""
        lin = linears or self.projections()
        n, kv, hd = hidden.shape[0], self.num_kv_heads, self.head_dim
        x = lin["fc"](torch.cat([hidden, embedded], -1))  # [n, H]
        q = self.rotate(lin["q"](x).view(n, self.num_heads, hd), positions)
        k = self.rotate(lin["k"](x).view(n, kv, hd), positions)
        v = lin["v"](x).view(n, kv, hd)
        if cache is None:
            keys, values = k, v
        else:
            cache[0][start : start + n], cache[1][start : start + n] = k, v
            keys, values = cache[0][: start + n], cache[1][: start + n]
        if mask is None:
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        # Grouped-query attention without copying the keys: each KV head's query heads are
        # stacked as rows ([kv, group * n, hd]) against its keys [kv, length, hd].
        group = self.num_heads // kv
        q = q.view(n, kv, group, hd).permute(1, 2, 0, 3).reshape(kv, group * n, hd)
        attn = F.scaled_dot_product_attention(
            q, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask.repeat(group, 1)
        )  # [kv, group * n, hd]
        attn = attn.view(kv, group, n, hd).permute(2, 0, 1, 3).reshape(n, -1)
        x = x + lin["o"](attn)
        y = self.norm(x)
        return x + lin["down"](F.silu(lin["gate"](y)) * lin["up"](y))

    def projections(self) -> dict[str, nn.Linear]:
        return {name: getattr(self, name) for name in LINEARS}

    def config(self) -> dict[str, int | float]:
        return {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "draft_vocab_size": int(self.draft_vocab.shape[0]),
        }

    def tensors(self) -> dict[str, Tensor]:
        out = {k: v.detach() for k, v in self.state_dict().items()}
        return {**out, "draft_vocab": self.draft_vocab.to(torch.int32)}

    @classmethod
    def from_file(cls, shapes: dict, tensors: dict[str, Tensor]) -> EagleHead:
        keys = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
        head = cls(
            *(int(shapes[k]) for k in keys),
            float(shapes["rope_theta"]),
            float(shapes["rms_norm_eps"]),
            tensors["draft_vocab"].long(),
        )
        weights = {k: v for k, v in tensors.items() if k != "draft_vocab"}
        head.load_state_dict(weights)
        return head
