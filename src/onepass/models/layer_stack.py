"""The decoder layers of the Llama family as one TorchScript function.

At batch size 1 on CPU the GEMMs stream the weights and everything else is small ops whose cost
is dispatch: about 35 ops a layer. Run from Python, each costs a few microseconds of
interpreter and binding overhead; TorchScript's interpreter runs the same ops without it, which
makes plain decoding of the default model about 20% faster (scripts/bench_backend.py).
Graph optimization stays off when calling it (models/llama.py): the profiling executor would
re-specialize for every new row count. torch.compile was measured too and rejected: minutes of
compilation, and slower calls with the changing row counts of speculative decoding.

It runs where onepass's C++ decoder (decoder.cpp: the same layers with fused elementwise ops,
onepass's GEMM and a row-independent attention) does not: GPU, half precision, head sizes other
than 64 and 128, CPUs without a supported ISA or without a compiler, ONEPASS_CPU_KERNELS=0.

The function is plain PyTorch and stays valid Python: if scripting is unavailable (a future
PyTorch without TorchScript), it runs eagerly with identical results.
"""

# No `from __future__ import annotations`: TorchScript reads these annotations at runtime.

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(x: Tensor, eps: Tensor) -> Tensor:
    """RMSNorm without its weight: x / sqrt(mean(x^2) + eps), rows [n, hidden]; eps is a
    [1, 1] tensor. Written with vector_norm: the fewest ops of the forms measured."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.rsqrt(torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]))


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """x: [n, heads, head_dim] (adjacent pairs); rotation: [n, 1, head_dim / 2] complex.
    For dtypes without a complex counterpart (bf16, fp16): computed in fp32."""
    n, heads, head_dim = x.shape[0], x.shape[1], x.shape[2]
    pairs = torch.view_as_complex(x.float().reshape(n, heads, head_dim // 2, 2))
    return torch.view_as_real(pairs * rotation).reshape(n, heads, head_dim).to(x.dtype)


# How linear layers multiply (an argument of the layer stack): which packed weights it is given.
# `linear` spells the values out: TorchScript cannot read module-level ints.
GEMM_PLAIN = 0  # F.linear, no packed weights (GPU, half precision, torch without MKL)
GEMM_MKL = 1  # MKL's packed GEMM
MKL_PACK_ROWS = 16  # MKL packs weights for this many rows: its cost is flat up to it


def linear(
    x: Tensor,
    j: int,
    weights: list[Tensor],
    packed: list[Tensor],
    biases: list[Tensor | None],
    gemm: int,
) -> Tensor:
    """x @ weights[j].T + biases[j], by the GEMM `gemm` names."""
    if gemm == 1:  # GEMM_MKL
        # The last argument must equal the row count, or MKL falls back to unpacked GEMM.
        return torch.ops.mkl._mkl_linear(x, packed[j], weights[j], biases[j], x.shape[0])
    return F.linear(x, weights[j], biases[j])


def decoder_layers(
    x: Tensor,
    eps: Tensor,
    weights: list[Tensor],
    packed: list[Tensor],
    biases: list[Tensor | None],
    gemm: int,
    cache_k: Tensor,
    cache_v: Tensor,
    k_pairs: Tensor | None,
    rotation: Tensor,
    start: int,
    heads: list[int],
    attn_mask: Tensor | None,
) -> Tensor:
    """Run every layer on rows x: [n, hidden] at cache rows start..start + n, writing their K/V.

    weights/packed/biases: 4 linears a layer (qkv, o, gate_up, down; RMSNorm weights folded
    in), multiplied by the GEMM `gemm` names (GEMM_*). cache_k, cache_v: [layers, kv_heads,
    max_len, head_dim]; k_pairs: cache_k viewed as complex pairs (None for half precision).
    rotation: [n, 1, head_dim / 2] complex.
    heads: [query heads, kv heads, head_dim]. attn_mask: [group * n, start + n], or None:
    everything visible for one row, causal for several (which must then start at 0).
    """
    n = x.shape[0]
    nh, nkv, hd = heads[0], heads[1], heads[2]
    group = nh // nkv
    end = start + n
    k_rotation = rotation.transpose(0, 1)  # [1, n, hd / 2]
    for i in range(len(weights) // 4):
        qkv = linear(normalize(x, eps), 4 * i, weights, packed, biases, gemm)
        if k_pairs is not None:
            # Rotary embedding of k, written straight into the cache.
            pairs = torch.view_as_complex(qkv.view(n, nh + 2 * nkv, hd // 2, 2))
            torch.mul(
                pairs[:, nh : nh + nkv].transpose(0, 1), k_rotation, out=k_pairs[i, :, start:end]
            )
            q = torch.view_as_real(pairs[:, :nh] * rotation)  # [n, nh, hd / 2, 2]
        else:
            qk = apply_rope(qkv.view(n, nh + 2 * nkv, hd)[:, : nh + nkv], rotation)
            cache_k[i, :, start:end] = qk[:, nh:].transpose(0, 1)
            q = qk[:, :nh]
        cache_v[i, :, start:end] = qkv.view(n, nh + 2 * nkv, hd)[:, nh + nkv :].transpose(0, 1)
        if n > 1 and attn_mask is None:
            # The start of a prompt: plain causal attention, without a mask to read (faster).
            a = F.scaled_dot_product_attention(
                q.reshape(n, nh, hd).transpose(0, 1).unsqueeze(0),
                cache_k[i, :, :end].unsqueeze(0),
                cache_v[i, :, :end].unsqueeze(0),
                is_causal=True,
                enable_gqa=True,
            )[0].transpose(0, 1)  # [n, nh, hd]
        else:
            # Grouped-query attention: each kv head serves `group` query heads x n tokens.
            if n > 1:
                q = q.reshape(n, nkv, group, hd).permute(1, 2, 0, 3)
            a = F.scaled_dot_product_attention(
                q.reshape(1, nkv, group * n, hd),
                cache_k[i, :, :end].unsqueeze(0),
                cache_v[i, :, :end].unsqueeze(0),
                attn_mask=attn_mask,
            )  # [1, nkv, group * n, hd]
            if n > 1:
                a = a.view(nkv, group, n, hd).permute(2, 0, 1, 3)
        x = x + linear(a.reshape(n, nh * hd), 4 * i + 1, weights, packed, biases, gemm)
        gate_up = linear(normalize(x, eps), 4 * i + 2, weights, packed, biases, gemm)
        gate, up = gate_up.chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, 4 * i + 3, weights, packed, biases, gemm)
    return x


def scripted_decoder_layers() -> Callable[..., Tensor]:
    """decoder_layers compiled by TorchScript, or the eager function if that is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript announces its deprecation
            return torch.jit.script(decoder_layers)
    except Exception:  # any failure to script means: run eagerly, with the same results
        return decoder_layers
