"""The int8 arithmetic (weights="int8"; int8_formats.h, int8_dot.h, stored_gemm.cpp): Q4_0, Q4_1
and Q8_0 weights times activations quantized to 8 bits per block of 32, with integer dot
products. Its results equal a NumPy reference of the same steps bit for bit, on every ISA this
machine builds (and so the ISAs equal each other); each row of a multi-row product equals a
one-row product; and greedy speculation on the default model is token-identical to plain
decoding in this arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import each_isa
from lossless import PROMPTS, compare_greedy
from test_stored_weights import bits, random_blocks

from onepass.models import cpu_kernels
from onepass.models.stored import Q4_0, Q4_1, Q6_K, Q8_0, StoredTensor, pack

BLOCK = 32


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once: the product of two float32 is exact in float64; the sum
    rounds twice (to float64, then float32), which differs from one rounding only on exact ties
    of float64's last bit, never met by these fixed seeds' values."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def quantize(x: np.ndarray, g: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8_formats.h's activation quantization: per row and block of 32, xq [M, blocks, 32]
    (int64), xd and xs = xd * sum(xq) [M, blocks] (float32)."""
    v = (x * g if g is not None else x).astype(np.float32)
    v = v.reshape(x.shape[0], -1, BLOCK)
    d = np.abs(v).max(axis=2) / np.float32(127)
    inverse = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0))
    q = np.clip(np.rint(v * inverse[..., None]), -127, 127).astype(np.int64)
    s = (d * q.sum(axis=2).astype(np.float32)).astype(np.float32)
    return q, d.astype(np.float32), s


def weight_fields(t: StoredTensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, int]:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor's d, m (Q4_1) [N, blocks] float32, quants
    [N, blocks, 32] int64 and the quants' offset (Q4_0: 8)."""
    raw = t.raw[t.rows].reshape(len(t.rows), t.columns // BLOCK, -1)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if t.ggml_type == Q8_0:
        return d, None, raw[..., 2:34].copy().view(np.int8).astype(np.int64), 0
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = raw[..., 4:20] if t.ggml_type == Q4_1 else raw[..., 2:18]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2).astype(np.int64)
    return d, (m if t.ggml_type == Q4_1 else None), q, (8 if t.ggml_type == Q4_0 else 0)


def reference(x: torch.Tensor, t: StoredTensor, g: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] by int8_formats.h's steps, block by block in order of k."""
    xq, xd, xs = quantize(x.numpy(), None if g is None else g.numpy())
    d, m, q, offset = weight_fields(t)
    sums = np.einsum("mbk,nbk->mnb", xq, q) - offset * xq.sum(axis=2)[:, None, :]
    y = np.zeros((x.shape[0], len(t.rows)), np.float32)
    for b in range(xq.shape[1]):
        scale = (d[None, :, b] * xd[:, None, b]).astype(np.float32)
        y = fma32(scale, sums[:, :, b].astype(np.float32), y)
        if m is not None:
            y = fma32(np.broadcast_to(m[None, :, b], y.shape), xs[:, None, b], y)
    return torch.from_numpy(y)


# Rows of 1024 values span several of the kernel's chunks; 75 columns end in a partial tile.
FORMATS = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}


def sample(ggml_type: int) -> StoredTensor:
    return random_blocks(ggml_type, 75, 1024, ggml_type, small=True)


def inputs(K: int, M: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(K + M)
    x = torch.randn(M, K, generator=generator)
    x[1, 40:200] *= 50  # blocks of another scale
    x[2, 64:96] = 0  # a block of zeros: scale 0
    return x, 1 + 0.3 * torch.randn(K, generator=generator)


@each_isa
@pytest.mark.parametrize("name", list(FORMATS))
def test_int8_gemm_equals_its_reference_and_rows_are_independent(isa, name):
    ops = cpu_kernels.ops(isa)
    t = sample(FORMATS[name])
    packed = pack(ops, [t], int8=True)
    x, scale = inputs(t.columns)
    for g in (None, scale):
        expected = reference(x, t, g)
        y = ops.stored_gemm(x, packed, g, 75)
        assert torch.equal(bits(y), bits(expected))
        for M in range(1, len(x)):
            assert torch.equal(bits(ops.stored_gemm(x[:M], packed, g, 75)), bits(y[:M])), M
        one_row = torch.cat([ops.stored_gemm(x[i : i + 1], packed, g, 75) for i in range(len(x))])
        assert torch.equal(bits(one_row), bits(y))


def test_every_isa_computes_the_same_bits():
    isas = cpu_kernels.available_isas()
    assert isas, "no CPU kernels here"
    t = sample(Q4_1)
    x, scale = inputs(t.columns)
    results = [
        cpu_kernels.ops(isa).stored_gemm(x, pack(cpu_kernels.ops(isa), [t], int8=True), scale, 75)
        for isa in isas
    ]
    for isa, y in zip(isas[1:], results[1:], strict=True):
        assert torch.equal(bits(y), bits(results[0])), isa


# Run in a process whose builds leave out the optional extensions (VNNI): the paths of CPUs
# without them (vpmaddubsw, int16 pair sums, signed Q8_0 quants), which this CPU can also run.
WITHOUT_EXTENSIONS = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_int8 import FORMATS, inputs, sample
from onepass.models import cpu_kernels
from onepass.models.stored import pack
ops = cpu_kernels.ops({isa!r})
results = {{}}
for name, ggml_type in FORMATS.items():
    t = sample(ggml_type)
    x, scale = inputs(t.columns)
    results[name] = ops.stored_gemm(x, pack(ops, [t], int8=True), scale, 75)
torch.save(results, sys.argv[1])
"""


@pytest.mark.parametrize("isa", cpu_kernels.machine_isas())
def test_builds_without_the_optional_extensions_compute_the_same_bits(isa, tmp_path):
    """ONEPASS_CPU_EXTENSIONS=none: the reference's bits, as with the extensions."""
    out = tmp_path / "results.pt"
    script = WITHOUT_EXTENSIONS.format(tests=str(Path(__file__).parent), isa=isa)
    env = {**os.environ, "ONEPASS_CPU_EXTENSIONS": "none"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out)
    for name, ggml_type in FORMATS.items():
        t = sample(ggml_type)
        x, scale = inputs(t.columns)
        assert torch.equal(bits(results[name]), bits(reference(x, t, scale))), name


@each_isa
def test_int8_weights_widen_and_look_up_to_the_dequantized_values(isa):
    """stored_unpack and stored_rows (the embedding lookup) read the int8 layout back to gguf's
    dequantized values: a tied embedding stays exact."""
    ops = cpu_kernels.ops(isa)
    for ggml_type in FORMATS.values():
        t = sample(ggml_type)
        packed = pack(ops, [t], int8=True)
        expected = t.dequantize()
        assert torch.equal(bits(ops.stored_unpack(packed, None, 75)), bits(expected))
        ids = torch.tensor([0, 74, 3, 3, 40])
        assert torch.equal(bits(ops.stored_rows(packed, ids, 75)), bits(expected[ids]))


@each_isa
def test_a_weight_mixing_int8_and_widened_formats(isa):
    """Runs of int8 formats beside a format without an int8 layout (Q6_K, widened to float32
    as without int8) in one weight: each run's columns as if packed alone."""
    ops = cpu_kernels.ops(isa)
    parts = [
        random_blocks(Q4_1, 40, 512, 1, small=True),
        random_blocks(Q6_K, 24, 512, 2, small=True),
        random_blocks(Q8_0, 11, 512, 3, small=True),
    ]
    x, scale = inputs(512, M=5)
    y = ops.stored_gemm(x, pack(ops, parts, int8=True), scale, 75)
    assert torch.equal(bits(y[:, :40]), bits(reference(x, parts[0], scale)))
    alone = ops.stored_gemm(x, pack(ops, [parts[1]]), scale, 24)
    assert torch.equal(bits(y[:, 40:64]), bits(alone))
    assert torch.equal(bits(y[:, 64:]), bits(reference(x, parts[2], scale)))


@pytest.fixture(scope="module")
def int8_llm():
    from onepass import LLM

    return LLM("default", max_model_len=4096, weights="int8")


@pytest.mark.real_model
def test_default_model_in_int8_stays_close_to_the_float32_logits(int8_llm, llm):
    """Not equal (8-bit activations), but close: the same next token on most positions of a
    real prompt, and small logit differences."""
    ids = llm.chat_token_ids([{"role": "user", "content": next(iter(PROMPTS.values()))}])
    reference_logits = llm.backend.prefill(torch.tensor(ids)).logits[0]
    logits = int8_llm.backend.prefill(torch.tensor(ids)).logits[0]
    assert int8_llm.backend.int8 and not llm.backend.int8
    agree = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    print(f"int8 vs float32: argmax agreement {agree:.3f}, relative logit error {error:.4f}")
    assert agree > 0.9 and error < 0.05, (agree, error)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["auto", "eagle", "ngram"])
def test_greedy_speculation_in_int8_is_token_identical_to_plain_decoding(int8_llm, method):
    """Row-independent integer sums: no near-ties to excuse, every prompt identical."""
    for kind, text in PROMPTS.items():
        ids = int8_llm.chat_token_ids([{"role": "user", "content": text}])
        result = compare_greedy(int8_llm, ids, {"method": method}, 64)
        assert result.identical, f"{method} on the {kind} prompt: token {result.first_difference}"
