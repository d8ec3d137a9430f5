"""The same weights in transformers' own implementation: the reference our native backend is
tested against, and the `hf` peer of the benchmark."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from onepass.errors import ModelLoadError
from onepass.models.config import ModelConfig


def transformers_classes(architecture: str) -> tuple[type, type]:
    """(config class, causal-LM class) of transformers for one of our architectures."""
    import transformers

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[architecture]


def transformers_model(
    config: ModelConfig, weights: Mapping[str, torch.Tensor] | None = None, **config_kwargs: Any
) -> Any:
    """A transformers model for `config`, holding `weights` (None: random initialisation).
    Refuses to return a half-loaded model."""
    config_cls, model_cls = transformers_classes(config.architecture)
    model = model_cls(config_cls(**config.to_hf(), **config_kwargs))
    if weights is not None:
        result = model.load_state_dict(dict(weights), strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            names = [*result.unexpected_keys, *result.missing_keys][:3]
            raise ModelLoadError(f"weights do not fit the transformers model (e.g. {names})")
        model.tie_weights()
    return model.eval()
