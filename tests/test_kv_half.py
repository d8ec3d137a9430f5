"""A float16 KV cache (kv_cache_dtype="float16"): each key and value rounded once, when written,
and widened exactly to read. The fused decoder's bit-for-bit row tests run with it too
(test_backend.py, test_batching.py: each_kv_dtype)."""

from __future__ import annotations

import pytest
import torch
from conftest import each_isa, tiny_pair
from lossless import PROMPTS, compare_greedy

from onepass import LLM
from onepass.cost import cached_cost_model
from onepass.errors import InputError

FUSED = {"head_dim": 64}


@each_isa
def test_the_cache_holds_the_float32_keys_and_values_rounded_to_float16(isa):
    """The first layer's keys and values come from the same inputs in both decoders: the
    float16 cache holds the float32 cache's values rounded to nearest (torch's rounding)."""
    prompt = torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(1))
    full, _ = tiny_pair(isa=isa, **FUSED)
    half, _ = tiny_pair(isa=isa, kv_dtype=torch.float16, **FUSED)
    full.prefill(prompt, chunk=10)
    half.prefill(prompt, chunk=10)
    assert half.cache.k.dtype == torch.float16
    assert torch.equal(half.cache.k[0, :, :37], full.cache.k[0, :, :37].half())
    assert torch.equal(half.cache.v[0, :, :37], full.cache.v[0, :, :37].half())


@each_isa
def test_logits_with_a_float16_cache_track_the_float32_ones(isa):
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(2))
    full, _ = tiny_pair(isa=isa, **FUSED)
    half, _ = tiny_pair(isa=isa, kv_dtype=torch.float16, **FUSED)
    expected = full.forward(ids, torch.arange(40), None).logits
    got = half.forward(ids, torch.arange(40), None).logits
    assert not torch.equal(got, expected)  # the cache is really in float16
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def half_llm():
    return LLM("default", max_model_len=4096, kv_cache_dtype="float16")


@pytest.mark.real_model
def test_default_model_with_a_float16_cache_stays_close_to_float32(half_llm, llm):
    ids = torch.tensor(llm.chat_token_ids([{"role": "user", "content": PROMPTS["code_edit"]}]))
    logits = []
    for backend in (llm.backend, half_llm.backend):  # shared fixtures: from an empty cache
        backend.reset()
        logits.append(backend.forward(ids, torch.arange(len(ids)), None).logits)
        backend.reset()
    expected, got = logits
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    error = ((got - expected).norm() / expected.norm()).item()
    print(f"float16 KV cache vs float32: argmax agreement {agree:.3f}, logit error {error:.5f}")
    assert agree > 0.98 and 0 < error < 2e-3, (agree, error)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["auto", "ngram"])
def test_greedy_speculation_with_a_float16_cache_is_token_identical(half_llm, method):
    """Rows are still computed as one-row forwards: no near-ties to excuse."""
    for kind, text in PROMPTS.items():
        ids = half_llm.chat_token_ids([{"role": "user", "content": text}])
        result = compare_greedy(half_llm, ids, {"method": method}, 48)
        assert result.identical, f"{method} on the {kind} prompt: token {result.first_difference}"


def test_auto_is_float16_with_int8_weights_else_the_models_dtype(llm):
    assert llm.backend.kv_dtype == torch.float32
    int8 = LLM("default", max_model_len=256, weights="int8")
    assert int8.backend.kv_dtype == torch.float16
    exact = LLM("default", max_model_len=256, weights="int8", kv_cache_dtype="float32")
    assert exact.backend.kv_dtype == torch.float32


def test_a_kv_cache_dtype_that_cannot_run_is_a_clear_error():
    with pytest.raises(InputError, match="kv_cache_dtype must be one of"):
        LLM("default", kv_cache_dtype="fp8")
    with pytest.raises(InputError, match="can only be float16"):
        tiny_pair(isa="none", kv_dtype=torch.float16)
    with pytest.raises(InputError, match="can only be float16"):
        LLM("default", max_model_len=256, dtype="bfloat16", kv_cache_dtype="float16")


def test_a_float16_cache_has_a_cost_curve_of_its_own(tmp_path):
    class Backend:
        max_len = 64
        kv_dtype = torch.float32

        def __init__(self) -> None:
            self.calls = 0

        def prefill(self, ids: torch.Tensor) -> None:
            pass

        def forward(self, ids, positions, mask) -> None:
            self.calls += 1

    backend = Backend()
    cached_cost_model(backend, "m", tmp_path)
    calls = backend.calls
    cached_cost_model(backend, "m", tmp_path)
    assert backend.calls == calls  # cached
    backend.kv_dtype = torch.float16
    cached_cost_model(backend, "m", tmp_path)
    assert backend.calls > calls
