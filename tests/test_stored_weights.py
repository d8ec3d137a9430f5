"""Weights as stored (models/stored.py, stored_formats.h, stored_gemm.cpp): GGUF blocks (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and 16-bit values (F16, BF16; bf16 / fp16
safetensors) widened in registers to exactly gguf's dequantization, multiplied with exactly
small_gemm's FMAs, so the logits equal the float32 path's bit for bit, on every ISA this
machine builds."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import each_isa, hf_model, tiny_config

from onepass.models import cpu_kernels
from onepass.models.config import ModelConfig
from onepass.models.gguf import load_gguf
from onepass.models.llama import NativeDecoder, StoredLinear
from onepass.models.loading import default_model_path, load_hf_weights
from onepass.models.stored import (
    BF16,
    F16,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    SUPPORTED_TYPES,
    StoredTensor,
    dequantized,
    load_gguf_stored,
    pack,
)
from onepass.tree import Tree

NAMES = {t: gguf.GGMLQuantizationType(t).name for t in SUPPORTED_TYPES}
# Byte offsets of the fp16 scales in each format's GGUF block.
HALF_FIELDS = {
    Q4_0: (0,),
    Q4_1: (0, 2),
    Q5_0: (0,),
    Q5_1: (0, 2),
    Q8_0: (0,),
    Q4_K: (0, 2),
    Q5_K: (0, 2),
    Q6_K: (208,),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: equality of these is bit-for-bit equality (-0.0 included)."""
    return t.contiguous().view(torch.int32)


def finite(halves: np.ndarray, exponent: int) -> np.ndarray:
    """16-bit floats with NaN / inf patterns (all exponent bits set) made finite by clearing the
    exponent's top bit: NaN payloads are not the point."""
    return np.where(halves & exponent == exponent, halves & np.uint16(0xBFFF), halves)


def random_blocks(
    ggml_type: int, rows: int, columns: int, seed: int, small: bool = False
) -> StoredTensor:
    """Random bytes as a tensor in `ggml_type`: any quants and 6-bit / int8 scales, finite fp16
    scales (subnormals included), rows in a shuffled order. small: fp16 scales in [1e-4, 1e-3]
    and 16-bit values of about 0.05, as a model's (whose logits must stay finite)."""
    rng = np.random.default_rng(seed)
    if ggml_type in (F16, BF16):
        if small:
            values = torch.from_numpy(0.05 * rng.standard_normal((rows, columns)))
            halves = values.to(torch.float16 if ggml_type == F16 else torch.bfloat16)
            raw = halves.view(torch.uint8).numpy()
        else:
            halves = rng.integers(0, 1 << 16, (rows, columns), dtype=np.uint16)
            raw = finite(halves, 0x7C00 if ggml_type == F16 else 0x7F80).view(np.uint8)
    else:
        values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        raw = rng.integers(0, 256, (rows, columns // values, size), dtype=np.uint8)
        for offset in HALF_FIELDS[ggml_type]:
            field = raw[..., offset : offset + 2].view(np.uint16)
            if small:
                field[...] = rng.uniform(1e-4, 1e-3, field.shape).astype(np.float16).view(np.uint16)
            else:
                field[...] = finite(field, 0x7C00)
    return StoredTensor(
        np.ascontiguousarray(raw).reshape(rows, -1),
        ggml_type,
        columns,
        rng.permutation(rows).astype(np.int64),
    )


@functools.cache
def model_tensors() -> dict[str, StoredTensor | torch.Tensor]:
    return load_gguf_stored(default_model_path())[1]


# Row lengths: two blocks and a half for legacy blocks, two super-blocks for K-quants, and for
# 16-bit values a length that is not a multiple of the packed block of 32.
COLUMNS = {t: 80 if t in (F16, BF16) else 512 if t in (Q4_K, Q5_K, Q6_K) else 96 for t in NAMES}
SAMPLES: dict[str, Callable[[], list[StoredTensor]]] = {
    NAMES[t]: functools.partial(lambda t: [random_blocks(t, 75, COLUMNS[t], t)], t)
    for t in SUPPORTED_TYPES
}
# Runs of several formats in one weight, as a Q4_K_M file's attention (Q4_K q, k; Q6_K v), at
# row counts that are not multiples of the tile.
SAMPLES["mixed"] = lambda: [
    random_blocks(Q4_K, 40, 256, 101),
    random_blocks(Q6_K, 24, 256, 102),
    random_blocks(BF16, 11, 256, 103),
    random_blocks(Q4_K, 10, 256, 104),
    random_blocks(Q4_K, 7, 256, 105),
]
SAMPLES["default q_proj"] = lambda: [model_tensors()["model.layers.0.self_attn.q_proj.weight"]]
SAMPLES["default down_proj"] = lambda: [model_tensors()["model.layers.0.mlp.down_proj.weight"]]
SAMPLES["default embedding"] = lambda: [
    model_tensors()["model.embed_tokens.weight"].permute_rows(lambda r: r[::97])
]


def reference(parts: list[StoredTensor]) -> torch.Tensor:
    return torch.cat([p.dequantize() for p in parts])


def test_every_product_of_the_widening_is_exact_in_float32():
    """Why the widening may use fmadd where gguf adds after a product (Q4_1, Q5_1, K-quants):
    every product it forms rounds to itself. d * sc is exact for every finite fp16 d and int8
    scale sc (which covers the 6-bit ones); d times any int8 quant (which covers Q4_0 .. Q8_0's)
    is exact, and so is d * sc times any quant of the K-quants (-32..31). Exactness depends
    only on the significands (fp16 magnitudes times these integers stay in fp32's normal
    range), so the products are checked over the distinct significands of d and d * sc."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    d = halves[np.isfinite(halves)].astype(np.float32)[:, None]
    int8 = np.arange(-128, 128, dtype=np.float32)
    d_sc = d * int8
    assert np.array_equal(d_sc.astype(np.float64), d.astype(np.float64) * int8)
    for factors, quants in ((d, int8), (d_sc, np.arange(-32, 32, dtype=np.float32))):
        significands = np.unique(np.abs(np.frexp(factors.ravel())[0]))
        for q in quants:
            assert np.array_equal((significands * q).astype(np.float64), significands * q.item())


@each_isa
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_widened_weights_equal_gguf_dequantization(isa, sample):
    """The kernel's widening (stored_unpack) and the embedding lookup (stored_rows) give gguf's
    dequantized values bit for bit, also times a folded column scale."""
    ops = cpu_kernels.ops(isa)
    parts = SAMPLES[sample]()
    expected = reference(parts)
    N, K = expected.shape
    packed = pack(ops, parts)
    assert torch.equal(bits(ops.stored_unpack(packed, None, N)), bits(expected))
    scale = 1 + 0.3 * torch.randn(K, generator=torch.Generator().manual_seed(N))
    assert torch.equal(bits(ops.stored_unpack(packed, scale, N)), bits(expected * scale))
    ids = torch.randint(0, N, (40,), generator=torch.Generator().manual_seed(K))
    assert torch.equal(bits(ops.stored_rows(packed, ids, N)), bits(expected[ids]))


@each_isa
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_stored_gemm_equals_small_gemm_on_dequantized_weights(isa, sample):
    """For 1..20 rows, with and without a column scale: the same FMAs on the same values. Each
    row also equals a one-row product (rows do not depend on the row count)."""
    ops = cpu_kernels.ops(isa)
    parts = SAMPLES[sample]()
    dequantized_weight = reference(parts)
    N, K = dequantized_weight.shape
    packed = pack(ops, parts)
    generator = torch.Generator().manual_seed(N + K)
    scale = 1 + 0.3 * torch.randn(K, generator=generator)
    x = torch.randn(20, K, generator=generator)
    for g in (None, scale):
        weight = dequantized_weight if g is None else dequantized_weight * g
        fp32 = ops.small_gemm_pack(weight)
        one_row = torch.cat([ops.stored_gemm(x[i : i + 1], packed, g, N) for i in range(20)])
        assert torch.equal(bits(one_row), bits(ops.small_gemm(x, fp32, N)))
        for M in range(1, 21):
            y = ops.stored_gemm(x[:M], packed, g, N)
            assert torch.equal(bits(y), bits(one_row[:M])), M


def test_a_weight_of_another_isa_or_shape_is_refused():
    ops = cpu_kernels.ops()
    if ops is None:
        pytest.skip("no CPU kernels here")
    packed = pack(ops, [random_blocks(Q4_K, 10, 256, 3)])
    with pytest.raises(RuntimeError, match="output columns"):
        ops.stored_gemm(torch.randn(1, 256), packed, None, 11)
    with pytest.raises(RuntimeError, match="values"):
        ops.stored_gemm(torch.randn(1, 512), packed, None, 10)
    with pytest.raises(RuntimeError, match="not a stored weight"):
        ops.stored_gemm(torch.randn(1, 256), packed[1:].clone(), None, 10)
    with pytest.raises(RuntimeError, match="not supported"):
        ops.stored_pack([torch.zeros(2, 36, dtype=torch.uint8)], [10])  # Q2_K


# -- whole models ---------------------------------------------------------------------------------

# A Llama with the fused decoder's head size and K-quant-sized rows.
MODEL = dict(
    vocab_size=97,
    hidden_size=256,
    intermediate_size=512,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    num_layers=2,
)
# Every format, and projections mixing them (as Q4_K_M files do), by GGUF tensor name.
GGUF_TYPES = {
    "token_embd": Q4_K,
    "output": Q6_K,
    "blk.0.attn_q": Q4_K,
    "blk.0.attn_k": Q4_K,
    "blk.0.attn_v": Q6_K,
    "blk.0.attn_output": Q5_K,
    "blk.0.ffn_gate": Q4_0,
    "blk.0.ffn_up": Q5_0,
    "blk.0.ffn_down": Q5_1,
    "blk.1.attn_q": BF16,
    "blk.1.attn_k": F16,
    "blk.1.attn_v": Q8_0,
    "blk.1.attn_output": Q4_1,
    "blk.1.ffn_gate": Q6_K,
    "blk.1.ffn_up": Q5_K,
    "blk.1.ffn_down": F16,
}


def write_gguf(path: Path, config: ModelConfig) -> None:
    """A random Llama as a GGUF file with the tensor types of GGUF_TYPES: random valid blocks
    written as raw bytes (gguf cannot quantize K-quants), float32 norms."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    hidden, inner = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"token_embd": (config.vocab_size, hidden), "output": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        shapes |= {
            f"blk.{i}.attn_q": (q, hidden),
            f"blk.{i}.attn_k": (kv, hidden),
            f"blk.{i}.attn_v": (kv, hidden),
            f"blk.{i}.attn_output": (hidden, q),
            f"blk.{i}.ffn_gate": (inner, hidden),
            f"blk.{i}.ffn_up": (inner, hidden),
            f"blk.{i}.ffn_down": (hidden, inner),
        }
    rng = np.random.default_rng(0)
    for seed, (name, (rows, columns)) in enumerate(shapes.items()):
        kind = GGUF_TYPES[name]
        tensor = random_blocks(kind, rows, columns, seed, small=True)
        raw = tensor.raw  # rows in file order (the shuffle is only the view's)
        writer.add_tensor(f"{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType(kind))
    norms = ["output_norm"] + [
        f"blk.{i}.{n}" for i in range(config.num_layers) for n in ("attn_norm", "ffn_norm")
    ]
    for name in norms:
        norm = 1 + 0.3 * rng.standard_normal(hidden)
        writer.add_tensor(f"{name}.weight", norm.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stored_gguf") / "mixed.gguf"
    write_gguf(path, tiny_config(**MODEL))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random Llama as a Hugging Face directory, its matrices alternately bf16 and fp16 (so
    the q, k, v projections mix them), norms float32."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("stored_hf")
    config = tiny_config(**MODEL)
    dtypes = [torch.bfloat16, torch.float16]
    weights = {}
    for i, (name, t) in enumerate(hf_model(config).state_dict().items()):
        weights[name] = t.to(dtypes[i % 2]) if t.dim() == 2 else t.clone()
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    return folder


def same_logits(config: ModelConfig, stored: dict, reference: dict, isa: str) -> None:
    """Prefill in chunks, a multi-row tree forward, commit, then plain steps: the stored
    weights' logits equal the reference weights' bit for bit."""
    decoders = [NativeDecoder(config, w, max_len=128, isa=isa) for w in (stored, reference)]
    assert decoders[0].stored and not decoders[1].stored
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (40,), generator=generator)
    tree = Tree((-1, 0, 1, 0, 3, -1, 5, 6))
    ids = torch.randint(0, config.vocab_size, (9,), generator=generator)  # root + tree
    outputs = []
    for decoder in decoders:
        logits = [decoder.prefill(prompt, chunk=16).logits]
        positions = tree.positions(decoder.cache_len)
        logits.append(decoder.forward(ids, positions, tree.mask()).logits)
        decoder.commit([0, 1, 2])
        for step in range(3):
            position = torch.tensor([decoder.cache_len])
            logits.append(decoder.forward(ids[step : step + 1], position, None).logits)
            decoder.commit([0])
        outputs.append(logits)
    for got, want in zip(*outputs, strict=True):
        assert torch.isfinite(want).all()
        assert torch.equal(bits(got), bits(want))


@each_isa
def test_gguf_model_of_every_format_equals_the_float32_path(isa, gguf_path):
    """A Llama whose tensors use every supported GGUF type, some projections mixing them: loaded
    as stored (every matrix kept in its format) and as float32 (models/gguf.load_gguf, the
    conversion `weights="float32"` caches), the logits agree bit for bit."""
    config, stored = load_gguf_stored(gguf_path)
    kinds = {v.ggml_type for v in stored.values() if isinstance(v, StoredTensor)}
    assert kinds == set(SUPPORTED_TYPES)
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 2 for v in stored.values())
    _, reference = load_gguf(gguf_path)
    same_logits(config, stored, reference, isa)


@each_isa
def test_half_precision_safetensors_equal_the_float32_path(isa, hf_dir):
    """A Hugging Face directory of bf16 and fp16 matrices loaded as stored (the 16-bit values
    kept, memory-mapped) and as loaded today (converted to float32 by the decoder)."""
    config, stored = load_hf_weights(hf_dir, stored=True)
    kinds = {v.ggml_type for v in stored.values() if isinstance(v, StoredTensor)}
    assert kinds == {BF16, F16}
    _, reference = load_hf_weights(hf_dir, stored=False)
    same_logits(config, stored, reference, isa)


@each_isa
def test_the_lm_heads_rows_for_a_draft_vocabulary_give_its_columns(isa, gguf_path):
    """A draft head's vocabulary reads the LM head's rows for those tokens (kept in their
    blocks when stored): the logits of those tokens, bit for bit, stored or not."""
    config, stored = load_gguf_stored(gguf_path)
    reference = {name: dequantized(t) for name, t in stored.items()}
    ids = torch.tensor([5, 96, 0, 41, 7])
    x = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(3))
    columns = []
    for weights in (stored, reference):
        decoder = NativeDecoder(config, weights, max_len=16, isa=isa)
        part = decoder.lm_head_part(ids)
        assert isinstance(part, StoredLinear) == decoder.stored
        assert torch.equal(bits(part(x)), bits(decoder.lm_head(x)[:, ids]))
        columns.append(part(x))
    assert torch.equal(bits(columns[0]), bits(columns[1]))


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
