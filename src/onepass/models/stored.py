"""Weights as stored: a GGUF file's Q8_0 and Q4_1 tensors left in their blocks (memory-mapped),
for the CPU kernels to widen in registers (stored_gemm.cpp) to exactly the values the `gguf`
package's dequantization gives. The logits then equal those of the weights dequantized at load
(the "float32" reference) bit for bit, from a fifth of the memory traffic for Q4_1.

`load_gguf_stored` reads a file without converting it: tensors in a supported format become
StoredTensor (raw blocks plus the order of their rows), the others are dequantized to float32
as models/gguf.py does. The decoder packs a StoredTensor for its ISA at load
(`StoredTensor.pack`) and can always fall back to `dequantize()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onepass.errors import ModelLoadError
from onepass.models.config import ModelConfig
from onepass.models.gguf import hf_name, open_gguf, undo_rope_permutation

# GGML type ids the kernels widen (gguf.GGMLQuantizationType).
Q4_1, Q8_0 = 3, 8
SUPPORTED_TYPES = (Q4_1, Q8_0)


@dataclass(frozen=True)
class StoredTensor:
    """A 2-D GGUF tensor in its blocks: `raw` [stored rows, bytes per row] (a memmap of the
    file), its GGML type, and `rows`, the stored row of each logical row (a row permutation
    applied without touching the blocks: a row holds whole blocks)."""

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


def pack(kernels: Any, parts: Sequence[StoredTensor]) -> torch.Tensor:
    """The rows of `parts` (one GGML type, one width), one after another, in the layout of the
    ISA's stored GEMM (kernels: cpu_kernels.ops())."""
    kinds = {(p.ggml_type, p.columns) for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"cannot pack tensors of different types or widths together: {kinds}")
    blocks = torch.cat([p.blocks() for p in parts]) if len(parts) > 1 else parts[0].blocks()
    return kernels.stored_pack(blocks, parts[0].ggml_type, None)


def packable(parts: Sequence[Any]) -> bool:
    """Whether `parts` can be packed together as stored weights."""
    return all(isinstance(p, StoredTensor) for p in parts) and (
        len({(p.ggml_type, p.columns) for p in parts}) == 1
    )


def dequantized(t: torch.Tensor | StoredTensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, StoredTensor) else t


def load_gguf_stored(
    path: Path,
) -> tuple[ModelConfig, dict[str, torch.Tensor | StoredTensor]]:
    """Config and weights (Hugging Face names) of a Llama-family GGUF file: Q8_0 / Q4_1 matrices
    as StoredTensor over the memory-mapped file, the others dequantized to float32. The q/k
    rows of `llama` models are put back in Hugging Face's order as models/gguf.py does, as a
    permutation of whole rows of blocks."""
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
                    tensor.data,
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
