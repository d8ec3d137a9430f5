"""Read Llama-family GGUF files (llama.cpp's format) into Hugging Face-named float tensors.

Tensors are read and dequantized with the `gguf` package (gguf-py from llama.cpp). llama.cpp's
converter permutes the rows of the q/k projections of `llama` models into its interleaved
rotary layout; we undo that so the weights match Hugging Face's half-split rotary layout.
"""

from __future__ import annotations

from collections.abc import Callable
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


def open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e})") from None


def read_metadata(reader: Any) -> dict[str, Any]:
    meta = {}
    for name, field in reader.fields.items():
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            meta[name] = field.data  # only their length is needed here
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # exotic field types we never read
            meta[name] = None
    return meta


def load_gguf(
    path: Path, progress: Callable[[int, int], None] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 weights (Hugging Face names) of a Llama-family GGUF file."""
    from gguf import quants

    reader = open_gguf(path)
    meta = read_metadata(reader)
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
