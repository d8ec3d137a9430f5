"""Weights as stored: a GGUF file's quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the
K-quants Q4_K, Q5_K, Q6_K) and half-precision ones (F16, BF16; also a Hugging Face model's
bf16 / fp16 safetensors) left in their blocks (memory-mapped), for the CPU kernels to widen in
registers (stored_gemm.cpp, stored_formats.h) to exactly the values the `gguf` package's
dequantization gives. The logits then equal those of the weights dequantized at load (the
"float32" reference) bit for bit, from a fifth of the memory traffic for Q4_1.

`load_gguf_stored` reads a file without converting it, `load_safetensors_stored` a Hugging Face
model's weight files: tensors in a supported format become StoredTensor (raw blocks plus the
order of their rows), the others are read as float tensors (a GGUF's dequantized to float32 as
models/gguf.py does). The decoder packs StoredTensors for its ISA at load (`pack`) and can
always fall back to `dequantize()`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onepass.errors import ModelLoadError
from onepass.models.config import ModelConfig
from onepass.models.gguf import hf_name, open_gguf, undo_rope_permutation

# GGML type ids the kernels widen (gguf.GGMLQuantizationType).
F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
SUPPORTED_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16)
# Those the int8 arithmetic multiplies with integer dot products (the others widen to float32).
INT8_TYPES = (Q4_0, Q4_1, Q8_0)


@dataclass(frozen=True)
class StoredTensor:
    """A 2-D tensor in its stored format: `raw` uint8 [stored rows, bytes per row] (a memmap of
    the file: GGUF blocks, or 16-bit values), its GGML type, and `rows`, the stored row of each
    logical row (a row permutation applied without touching the blocks: a row holds whole
    blocks)."""

    raw: np.ndarray
    ggml_type: int
    columns: int  # K: values per row
    rows: np.ndarray  # int64 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.columns)

    def permute_rows(self, reorder: Callable[[np.ndarray], np.ndarray]) -> StoredTensor:
        """The tensor whose rows are reorder(rows): `reorder` is any function that permutes the
        rows of an array (e.g. models/gguf.undo_rope_permutation)."""
        return StoredTensor(self.raw, self.ggml_type, self.columns, reorder(self.rows))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], by the `gguf` package: the reference the kernels are tested against."""
        from gguf import quants

        values = quants.dequantize(self.raw[self.rows], self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def blocks(self) -> torch.Tensor:
        """The raw blocks of the logical rows, uint8 [N, bytes per row] (a copy)."""
        return torch.from_numpy(np.ascontiguousarray(self.raw[self.rows]))


# Runs of one format a packed weight holds at most (stored_gemm.cpp's kMaxParts).
MAX_RUNS = 6


def pack(kernels: Any, parts: Sequence[StoredTensor], int8: bool = False) -> torch.Tensor:
    """The rows of `parts` (one width, any supported types: e.g. a Q4_K q and k and a Q6_K v),
    one after another, in the layout of the ISA's stored GEMM (kernels: cpu_kernels.ops()).
    int8: parts in INT8_TYPES are multiplied in the int8 arithmetic (int8_formats.h)."""
    if not packable(parts):
        kinds = [(p.ggml_type, p.shape) if isinstance(p, StoredTensor) else p for p in parts]
        raise ValueError(f"not one stored weight (one width, at most {MAX_RUNS} runs): {kinds}")
    return kernels.stored_pack([p.blocks() for p in parts], [p.ggml_type for p in parts], int8)


def packable(parts: Sequence[Any]) -> bool:
    """Whether `parts` can be packed together as one stored weight."""
    if not parts or not all(isinstance(p, StoredTensor) for p in parts):
        return False
    runs = 1 + sum(a.ggml_type != b.ggml_type for a, b in pairwise(parts))
    return len({p.columns for p in parts}) == 1 and runs <= MAX_RUNS


def dequantized(t: torch.Tensor | StoredTensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, StoredTensor) else t


def load_gguf_stored(
    path: Path,
) -> tuple[ModelConfig, dict[str, torch.Tensor | StoredTensor]]:
    """Config and weights (Hugging Face names) of a Llama-family GGUF file: matrices in one of
    SUPPORTED_TYPES as StoredTensor over the memory-mapped file, the others dequantized to
    float32. The q/k rows of `llama` models are put back in Hugging Face's order as
    models/gguf.py does, as a permutation of whole rows of blocks."""
    from gguf import quants

    reader = open_gguf(path)
    meta = reader.meta
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf(meta, has_output_weight="output.weight" in names)
    weights: dict[str, torch.Tensor | StoredTensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        heads = None
        if config.architecture == "llama" and tensor.name.endswith(
            ("attn_q.weight", "attn_q.bias")
        ):
            heads = config.num_heads
        elif config.architecture == "llama" and tensor.name.endswith(
            ("attn_k.weight", "attn_k.bias")
        ):
            heads = config.num_kv_heads
        try:
            kind = int(tensor.tensor_type)
            if kind in SUPPORTED_TYPES and tensor.data.ndim == 2:
                rows = tensor.data.shape[0]
                stored = StoredTensor(
                    tensor.data.view(np.uint8),  # F16 tensors are read as values
                    kind,
                    int(tensor.shape[0]),
                    np.arange(rows, dtype=np.int64),
                )
                if heads is not None:
                    stored = stored.permute_rows(lambda r, h=heads: undo_rope_permutation(r, h))
                weights[name] = stored
                continue
            array = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {tensor.name} ({e})") from None
        if heads is not None:
            array = undo_rope_permutation(array, heads)
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    expected = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ModelLoadError(f"{path}: missing tensors {missing}")
    return config, weights


# safetensors dtypes kept as stored, as the GGML type of the same 16-bit values.
_HALF_DTYPES = {"BF16": BF16, "F16": F16}


def load_safetensors_stored(files: Sequence[Path]) -> dict[str, torch.Tensor | StoredTensor]:
    """A Hugging Face model's weights from its .safetensors files: bf16 / fp16 matrices as
    StoredTensor over the memory-mapped file (F16 / BF16, whose widening to float32 is exact),
    the other tensors as safetensors reads them (the decoder converts them to its dtype)."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor | StoredTensor] = {}
    for file in files:
        try:
            data = np.memmap(file, mode="r")
            size = int(np.frombuffer(data[:8], "<u8")[0])
            header = json.loads(data[8 : 8 + size].tobytes())
            with safe_open(file, framework="pt") as reader:
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    kind, shape = _HALF_DTYPES.get(info["dtype"]), info["shape"]
                    if kind is None or len(shape) != 2:
                        weights[name] = reader.get_tensor(name)
                        continue
                    begin, end = (8 + size + int(o) for o in info["data_offsets"])
                    rows, columns = int(shape[0]), int(shape[1])
                    raw = data[begin:end].reshape(rows, 2 * columns)
                    weights[name] = StoredTensor(
                        raw, kind, columns, np.arange(rows, dtype=np.int64)
                    )
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise ModelLoadError(f"{file} is not a readable safetensors file ({e})") from None
    return weights
