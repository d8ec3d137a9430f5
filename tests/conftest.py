"""Shared fixtures: tiny random-weight models for logic, the embedded default model for
end-to-end tests (loaded once per session)."""

from __future__ import annotations

import pytest
import torch

from onepass.models.config import ModelConfig
from onepass.models.hf import transformers_model
from onepass.models.llama import NativeDecoder

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def kernel_isas() -> list[str]:
    """The ISAs whose CPU kernels run here, each built once if need be (avx512 and avx2 on an
    AVX-512 machine): every kernel test runs for each."""
    from onepass.models import cpu_kernels

    return cpu_kernels.available_isas()


# Parametrizes a test over kernel_isas() as `isa`; skipped where there is none.
each_isa = pytest.mark.parametrize("isa", kernel_isas())
# The fused decoder's KV cache: float32, or float16 (rounded once when written).
each_kv_dtype = pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])


def tiny_config(architecture: str = "llama", **overrides) -> ModelConfig:
    return ModelConfig(architecture=architecture, **{**TINY, **overrides})


def hf_model(config: ModelConfig, seed: int = 0):
    """A transformers model with random weights for `config` (the reference implementation)."""
    torch.manual_seed(seed)
    model = transformers_model(config, attn_implementation="eager")
    with torch.no_grad():  # random norms and biases too, so that folding them is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def tiny_pair(
    architecture: str = "llama",
    max_len: int = 128,
    seed: int = 0,
    isa: str | None = None,
    kv_dtype: torch.dtype | None = None,
    **overrides,
):
    """(native decoder, transformers model) sharing the same random weights. isa: the CPU
    kernels' (NativeDecoder's argument; the fused decoder needs head_dim 64 or 128); kv_dtype:
    its KV cache's."""
    config = tiny_config(architecture, **overrides)
    model = hf_model(config, seed)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return NativeDecoder(config, weights, max_len=max_len, isa=isa, kv_dtype=kv_dtype), model


def default_reference():
    """transformers' implementation holding the default model's weights."""
    from onepass.models.loading import load_model

    loaded = load_model("default")
    return transformers_model(loaded.config, loaded.weights)


@pytest.fixture(scope="session")
def llm():
    from onepass import LLM

    return LLM("default", max_model_len=4096)


@pytest.fixture(scope="session")
def tiny_llm(llm, tmp_path_factory):
    """An LLM over a tiny random Llama that uses the default model's tokenizer: the whole API
    (chat template, stop strings, drafters) at a fraction of the real model's cost."""
    from onepass import LLM

    folder = tmp_path_factory.mktemp("tiny_model")
    config = tiny_config(vocab_size=len(llm.tokenizer), max_position_embeddings=512)
    hf_model(config).save_pretrained(folder, safe_serialization=True)
    llm.tokenizer.save_pretrained(folder)
    return LLM(str(folder), max_model_len=256, cache_dir=folder / "cache")
