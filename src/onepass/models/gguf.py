"""Read Llama-family GGUF files (llama.cpp's format) into Hugging Face-named float tensors.

Tensors are read and dequantized with the `gguf` package (gguf-py from llama.cpp). llama.cpp's
converter permutes the rows of the q/k projections of `llama` models into its interleaved
rotary layout; we undo that so the weights match Hugging Face's half-split rotary layout.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onepass.errors import ModelLoadError
from onepass.models.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def undo_rope_permutation(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, rows were reordered from
    [first half, second half] to interleaved pairs; put them back."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    """ggml's dimensions, innermost first (columns, then rows)."""
    data: np.ndarray
    """A view of the mapped file: [rows, bytes per row] of blocks for quantized types, the
    values [rows, columns] for float types (as gguf's own reader gives them)."""


@dataclass(frozen=True)
class GGUFFile:
    meta: dict[str, Any]
    tensors: list[GGUFTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_FLOAT_TYPES = {0: np.float32, 1: np.float16}  # GGML types F32, F16: read as values


class _Cursor:
    """Reads GGUF's little-endian header fields from the mapped file."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.offset = data, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        text = self.data[self.offset : self.offset + n].tobytes().decode("utf-8", "replace")
        self.offset += n
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in (_STRING, _ARRAY):
                return [self.value(item) for _ in range(count)]
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self.data, dtype, count, self.offset)
            self.offset += count * dtype.itemsize
            return values
        return self.scalar(_SCALARS[kind])


def read_gguf(path: Path) -> GGUFFile:
    """A GGUF file's metadata and tensors (views of the memory-mapped file). gguf's own reader
    wraps every token of the vocabulary in numpy views (3.4 s for the default model); this walks
    the header once (≈ 0.1 s)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    data = np.memmap(path, mode="r")
    cursor = _Cursor(data)
    if data[:4].tobytes() != b"GGUF":
        raise ValueError("no GGUF magic number")
    version = cursor.scalar("<4xI")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    meta = {}
    for _ in range(kv_count):
        key = cursor.string()
        meta[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
        infos.append((name, dims, cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cursor.offset // alignment) * alignment
    tensors = []
    for name, dims, kind, offset in infos:
        ggml_type = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[ggml_type]
        rows = tuple(reversed(dims))  # numpy order: outermost first
        if kind in _FLOAT_TYPES:
            dtype, shape = np.dtype(_FLOAT_TYPES[kind]), rows
        else:  # blocks of bytes, one row of them per output row
            dtype, shape = np.dtype(np.uint8), (*rows[:-1], rows[-1] // block * size)
        count = int(np.prod(shape))
        array = np.frombuffer(data, dtype, count, start + offset).reshape(shape)
        tensors.append(GGUFTensor(name, ggml_type, dims, array))
    return GGUFFile(meta, tensors)


def open_gguf(path: Path) -> GGUFFile:
    try:
        return read_gguf(path)
    except Exception as e:  # truncated or foreign files fail in assorted ways
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e})") from None


def load_gguf(
    path: Path, progress: Callable[[int, int], None] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 weights (Hugging Face names) of a Llama-family GGUF file."""
    from gguf import quants

    reader = open_gguf(path)
    meta = reader.meta
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf(meta, has_output_weight="output.weight" in names)
    weights: dict[str, torch.Tensor] = {}
    for i, tensor in enumerate(reader.tensors):
        name = hf_name(tensor.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        try:
            array = quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {tensor.name} ({e})") from None
        array = np.asarray(array, dtype=np.float32)
        if config.architecture == "llama" and tensor.name.endswith(
            ("attn_q.weight", "attn_q.bias")
        ):
            array = undo_rope_permutation(array, config.num_heads)
        elif config.architecture == "llama" and tensor.name.endswith(
            ("attn_k.weight", "attn_k.bias")
        ):
            array = undo_rope_permutation(array, config.num_kv_heads)
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
        if progress:
            progress(i + 1, len(reader.tensors))
    expected = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {missing}")
    return config, weights
