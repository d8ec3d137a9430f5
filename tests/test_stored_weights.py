"""Weights as stored (models/stored.py, stored_gemm.cpp): GGUF Q8_0 and Q4_1 blocks widened in
registers to exactly gguf's dequantization, multiplied with exactly small_gemm's FMAs, so the
logits equal the float32 path's bit for bit, on every ISA this machine builds."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import each_isa

from onepass.models import cpu_kernels
from onepass.models.llama import NativeDecoder
from onepass.models.loading import default_model_path
from onepass.models.stored import (
    Q4_1,
    Q8_0,
    StoredTensor,
    dequantized,
    load_gguf_stored,
    pack,
)
from onepass.tree import Tree


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equality of these is bit-for-bit equality (-0.0 included)."""
    return t.contiguous().view(torch.int32)


def random_blocks(ggml_type: int, rows: int, columns: int, seed: int) -> StoredTensor:
    """Random bytes as blocks, with finite fp16 scales (subnormals included, NaN / inf not: their
    payloads are not the point), rows in a shuffled order."""
    rng = np.random.default_rng(seed)
    block = {Q8_0: 34, Q4_1: 20}[ggml_type]
    raw = rng.integers(0, 256, (rows, columns // 32, block), dtype=np.uint8)
    halves = raw[..., : 2 if ggml_type == Q8_0 else 4].view(np.uint16)
    halves &= np.uint16(0xBFFF)  # exponent below 0x1F: finite
    return StoredTensor(
        raw.reshape(rows, -1), ggml_type, columns, rng.permutation(rows).astype(np.int64)
    )


@functools.cache
def model_tensors() -> dict[str, StoredTensor | torch.Tensor]:
    return load_gguf_stored(default_model_path())[1]


def samples() -> list[StoredTensor]:
    """Synthetic tensors (N not a multiple of any tile) and the default model's own."""
    weights = model_tensors()
    embed = weights["model.embed_tokens.weight"]
    return [
        random_blocks(Q4_1, 75, 96, 0),
        random_blocks(Q8_0, 75, 96, 1),
        weights["model.layers.0.self_attn.q_proj.weight"],  # Q4_1, rows unpermuted from llama.cpp
        weights["model.layers.0.mlp.down_proj.weight"],  # Q4_1, K = 1536
        embed.permute_rows(lambda r: r[::97]),  # Q8_0, a slice of the vocabulary
    ]


def test_q4_1_product_d_times_q_is_exact_in_float32():
    """Why fmadd(d, q, m) equals numpy's (d * q) + m: d * q rounds to itself for every finite
    fp16 d and 4-bit q (and for 8-bit q: Q8_0's single product)."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    d = halves[np.isfinite(halves)].astype(np.float32)[:, None]
    for q in (np.arange(16, dtype=np.float32), np.arange(-128, 128, dtype=np.float32)):
        assert np.array_equal((d * q).astype(np.float64), d.astype(np.float64) * q)


@each_isa
@pytest.mark.parametrize("sample", range(5))
def test_widened_weights_equal_gguf_dequantization(isa, sample):
    """The kernel's widening (stored_unpack) and the embedding lookup (stored_rows) give gguf's
    dequantized values bit for bit, also times a folded column scale."""
    ops = cpu_kernels.ops(isa)
    tensor = samples()[sample]
    N, K = tensor.shape
    reference = tensor.dequantize()
    packed = pack(ops, [tensor])
    assert torch.equal(bits(ops.stored_unpack(packed, None, N)), bits(reference))
    scale = 1 + 0.3 * torch.randn(K, generator=torch.Generator().manual_seed(sample))
    assert torch.equal(bits(ops.stored_unpack(packed, scale, N)), bits(reference * scale))
    ids = torch.randint(0, N, (40,), generator=torch.Generator().manual_seed(sample))
    assert torch.equal(bits(ops.stored_rows(packed, ids, N)), bits(reference[ids]))


@each_isa
@pytest.mark.parametrize("sample", range(5))
def test_stored_gemm_equals_small_gemm_on_dequantized_weights(isa, sample):
    """For 1..32 rows, with and without a column scale: the same FMAs on the same values. Each
    row also equals a one-row product (rows do not depend on the row count)."""
    ops = cpu_kernels.ops(isa)
    tensor = samples()[sample]
    N, K = tensor.shape
    packed = pack(ops, [tensor])
    generator = torch.Generator().manual_seed(10 + sample)
    scale = 1 + 0.3 * torch.randn(K, generator=generator)
    x = torch.randn(32, K, generator=generator)
    for g in (None, scale):
        weight = tensor.dequantize() if g is None else tensor.dequantize() * g
        fp32 = ops.small_gemm_pack(weight)
        one_row = torch.cat([ops.stored_gemm(x[i : i + 1], packed, g, N) for i in range(32)])
        assert torch.equal(bits(one_row), bits(ops.small_gemm(x, fp32, N)))
        for M in range(1, 33):
            y = ops.stored_gemm(x[:M], packed, g, N)
            assert torch.equal(bits(y), bits(one_row[:M])), M


def test_stored_tensors_concatenate_rows_in_order():
    ops = cpu_kernels.ops()
    if ops is None:
        pytest.skip("no CPU kernels here")
    a, b = random_blocks(Q4_1, 10, 64, 3), random_blocks(Q4_1, 7, 64, 4)
    packed = pack(ops, [a, b])
    expected = torch.cat([a.dequantize(), b.dequantize()])
    assert torch.equal(bits(ops.stored_unpack(packed, None, 17)), bits(expected))


@functools.cache
def default_decoders(isa: str) -> tuple[NativeDecoder, NativeDecoder]:
    """The default model through the stored weights and through their float32 dequantization."""
    config, weights = load_gguf_stored(default_model_path())
    stored = NativeDecoder(config, weights, max_len=512, isa=isa)
    reference = {name: dequantized(t) for name, t in weights.items()}
    return stored, NativeDecoder(config, reference, max_len=512, isa=isa)


@pytest.mark.real_model
@each_isa
def test_default_model_logits_equal_the_float32_path_bit_for_bit(isa):
    """Prefill (in chunks), a multi-row tree forward and a committed step: the stored path's
    logits equal the float32 path's bit for bit."""
    stored, reference = default_decoders(isa)
    assert stored.stored and not reference.stored
    prompt = torch.randint(0, 49152, (150,), generator=torch.Generator().manual_seed(1))
    tree = Tree((-1, 0, 1, 0, 3, -1, 5, 6, 2, 8, 9, 4))
    ids = torch.randint(0, 49152, (13,), generator=torch.Generator().manual_seed(2))  # root + tree
    outputs = []
    for decoder in (stored, reference):
        first = decoder.prefill(prompt, chunk=64).logits
        rows = decoder.forward(ids, tree.positions(decoder.cache_len), tree.mask()).logits
        decoder.commit([0, 1, 2])
        step = decoder.forward(ids[:1], torch.tensor([decoder.cache_len]), None).logits
        outputs.append((first, rows, step))
    for got, want in zip(*outputs, strict=True):
        assert torch.equal(bits(got), bits(want))
