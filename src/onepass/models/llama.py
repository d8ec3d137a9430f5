"""Native decoder for the Llama family (Llama, Qwen2, Mistral), in the style of gpt-fast.

One forward scores any set of new tokens against a static, preallocated KV cache: the new
tokens carry explicit positions and an arbitrary attention mask among themselves (a draft
tree), and always see the whole committed cache. `commit(keep)` then compacts the KV rows of
the accepted tokens into place. See design.md §3 and the Backend protocol in `models/__init__.py`.

On CPU with MKL, linear layers use MKL's packed GEMM (weights packed once at load): its cost
is nearly flat from 1 to 16 rows, and row i of its result does not depend on the other rows,
so scoring a draft uses the same arithmetic per token as plain decoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from onepass.kv_cache import KVCache
from onepass.models.base import ModelOutput
from onepass.models.config import ModelConfig

PACK_ROWS_HINT = 16  # MKL packs for this many rows; measured flat cost for 1..16 rows


def mkl_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available()


class Linear:
    """y = x @ weight.T + bias for 2-D x, with MKL weight packing where available."""

    def __init__(self, weight: Tensor, bias: Tensor | None, pack: bool) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias
        self.packed = (
            torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS_HINT) if pack else None
        )

    def __call__(self, x: Tensor) -> Tensor:  # [n, in] -> [n, out]
        if self.packed is not None:
            # The last argument must equal the row count, or MKL falls back to unpacked GEMM.
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])
        return F.linear(x, self.weight, self.bias)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary inverse frequencies, with Hugging Face's "linear" and "llama3" scalings."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, smoothed, inv_freq)
    return inv_freq.float()


def interleave_rope_rows(w: Tensor, heads: int) -> Tensor:
    """Reorder q/k projection rows per head from Hugging Face's half-split rotary layout to
    adjacent pairs (as llama.cpp stores them), so rotary embedding is a complex multiply.
    Attention scores are unchanged: q and k are permuted alike."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """x: [n, heads, head_dim] (adjacent pairs); rotation: [n, 1, head_dim / 2] complex.
    The path for dtypes without a complex counterpart (bf16, fp16): compute in fp32."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class Layer:
    def __init__(self, w: Mapping[str, Tensor], prefix: str, config: ModelConfig, pack: bool):
        def get(name: str) -> Tensor | None:
            return w.get(f"{prefix}.{name}")

        heads = {"q": config.num_heads, "k": config.num_kv_heads, "v": None}

        def projection(kind: str, p: str) -> Tensor | None:
            t = get(f"self_attn.{p}_proj.{kind}")
            return t if t is None or heads[p] is None else interleave_rope_rows(t, heads[p])

        qkv = torch.cat([projection("weight", p) for p in "qkv"])
        bias = torch.cat([projection("bias", p) for p in "qkv"]) if config.attention_bias else None
        # RMSNorm weights scale the input columns of the next projection: fold them in.
        self.qkv = Linear(qkv * get("input_layernorm.weight"), bias, pack)
        self.o = Linear(get("self_attn.o_proj.weight"), None, pack)
        gate_up = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
        self.gate_up = Linear(gate_up * get("post_attention_layernorm.weight"), None, pack)
        self.down = Linear(get("mlp.down_proj.weight"), None, pack)


class NativeDecoder:
    """Implements the Backend protocol for Llama-family weights in Hugging Face naming."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, Tensor],
        *,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_len = max_len
        pack = mkl_packing_available(self.device, dtype)
        w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # [vocab, hidden]
        lm_head = self.embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.lm_head = Linear(lm_head, None, pack)
        self.norm = w["model.norm.weight"]
        self.layers = [
            Layer(w, f"model.layers.{i}", config, pack) for i in range(config.num_layers)
        ]
        positions = torch.arange(max_len, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(config))  # [max_len, head_dim / 2]
        self.rotation = torch.polar(torch.ones_like(angles), angles).to(self.device)
        self.cache = KVCache(
            config.num_layers, config.num_kv_heads, max_len, config.head_dim, dtype, self.device
        )
        self._pending = 0  # rows written by the last forward, not yet committed

    # -- Backend protocol -------------------------------------------------------------------

    @property
    def cache_len(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.length = 0
        self._pending = 0

    @torch.inference_mode()
    def prefill(self, ids: Tensor, chunk: int = 512) -> ModelOutput:
        """Reset the cache, then run and commit the prompt; returns the last row's output."""
        self.reset()
        n = ids.shape[0]
        if n == 0 or n > self.max_len:
            raise ValueError(f"prompt length {n} is outside 1..{self.max_len}")
        out = None
        for start in range(0, n, chunk):
            part = ids[start : start + chunk].to(self.device)
            positions = torch.arange(start, start + part.shape[0], device=self.device)
            out = self._run(part, positions, None, last_only=True)
            self.cache.length += part.shape[0]
        self._pending = 0
        return out

    @torch.inference_mode()
    def forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None) -> ModelOutput:
        """Score new tokens after the committed cache.

        ids, positions: [n]; mask: [n, n] bool, True where row i may attend to new token j
        (None = causal). Every row also sees the whole committed cache.
        """
        n = ids.shape[0]
        if self.cache.length + n > self.max_len:
            raise ValueError("KV cache is full")
        out = self._run(ids.to(self.device), positions.to(self.device), mask, last_only=False)
        self._pending = n
        return out

    def commit(self, keep: Tensor | list[int]) -> None:
        """Keep the KV of these rows of the last forward (ascending), in order, after the cache."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        if keep.numel() and int(keep.max()) >= self._pending:
            raise ValueError("commit() names a row the last forward did not write")
        self.cache.commit(keep)
        self._pending = 0

    # -- the model --------------------------------------------------------------------------

    def _attention_mask(self, positions: Tensor, mask: Tensor | None) -> Tensor | None:
        """[group * n, past + n] bool, rows ordered (query head in group, new token): the
        whole cache, then `mask` (or causal) among the new rows. None when all is visible."""
        n, past = positions.shape[0], self.cache.length
        window = self.config.sliding_window
        needs_window = window is not None and past + n > window
        if mask is None and n == 1 and not needs_window:
            return None
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        full = torch.cat([torch.ones(n, past, dtype=torch.bool, device=self.device), mask], 1)
        if needs_window:
            key_pos = torch.cat([torch.arange(past, device=self.device), positions])
            full &= key_pos[None, :] > positions[:, None] - window
        return full.repeat(self.config.num_heads // self.config.num_kv_heads, 1)

    def _run(self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool):
        # Few, large ops: on CPU each eager op costs microseconds of dispatch, and the weights
        # streaming through the caches make every op after a GEMM slower still.
        cfg = self.config
        n = ids.shape[0]
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        group = nh // nkv
        attn_mask = self._attention_mask(positions, mask)
        rotation = self.rotation[positions][:, None, :]  # [n, 1, hd / 2] complex
        k_rotation = rotation.transpose(0, 1)  # [1, n, hd / 2]
        eps = cfg.rms_norm_eps
        start, end = self.cache.length, self.cache.length + n
        x = self.embed[ids]  # [n, hidden]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(normalize(x, eps))  # RMSNorm weight folded into qkv
            if self.cache.k_pairs is not None:
                # Rotary embedding of k, written straight into the cache.
                pairs = torch.view_as_complex(qkv.view(n, nh + 2 * nkv, hd // 2, 2))
                torch.mul(
                    pairs[:, nh : nh + nkv].transpose(0, 1),
                    k_rotation,
                    out=self.cache.k_pairs[i, :, start:end],
                )
                q = torch.view_as_real(pairs[:, :nh] * rotation)  # [n, nh, hd / 2, 2]
            else:
                qk = apply_rope(qkv.view(n, -1, hd)[:, : nh + nkv], rotation)
                self.cache.k[i, :, start:end] = qk[:, nh:].transpose(0, 1)
                q = qk[:, :nh]
            self.cache.v[i, :, start:end] = qkv.view(n, -1, hd)[:, nh + nkv :].transpose(0, 1)
            # Grouped-query attention: each kv head serves `group` query heads x n tokens.
            if n > 1:
                q = q.reshape(n, nkv, group, hd).permute(1, 2, 0, 3)
            a = F.scaled_dot_product_attention(
                q.reshape(1, nkv, group * n, hd),
                self.cache.k4[i, :, :, :end],
                self.cache.v4[i, :, :, :end],
                attn_mask=attn_mask,
            )  # [1, nkv, group * n, hd]
            if n > 1:
                a = a.view(nkv, group, n, hd).permute(2, 0, 1, 3)
            x = x + layer.o(a.reshape(n, nh * hd))
            gate, up = layer.gate_up(normalize(x, eps)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if last_only:
            x = x[-1:]
        hidden = normalize(x, eps) * self.norm  # [rows, hidden]
        return ModelOutput(logits=self.lm_head(hidden).float(), hidden=hidden)


def normalize(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without its weight: x / sqrt(mean(x^2) + eps), rows [n, hidden]. Written with
    vector_norm, the cheapest reduction here: op count dominates the cost of small ops."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.rsqrt(
        torch.addcmul(torch.full_like(norm, eps), norm, norm, value=1 / x.shape[-1])
    )
