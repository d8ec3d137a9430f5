"""The cache directory: converted models keyed by content, checked and rebuilt when damaged,
converted once under concurrency; cost curves that survive damage and concurrent writers;
`onepass cache list / clear`. Every test uses its own temporary cache directory."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from onepass import ModelLoadError
from onepass.cache import add_cache_parser, lock_path, locked, write_atomically
from onepass.cost import CostModel, cached_cost_model
from onepass.models import loading

CURVE = CostModel((1, 2), (0.01, 0.02), 16, (0.02, 0.04), 48)


# -- a tiny Llama GGUF --------------------------------------------------------------------------


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2-layer Llama GGUF with float32 tensors and a small GPT-2 style tokenizer; returns
    its weights in Hugging Face's layout (what loading it must give back)."""
    from conftest import hf_model, tiny_config
    from gguf import GGUFWriter

    from onepass.models.gguf import _GLOBAL_NAMES, _LAYER_NAMES
    from onepass.models.llama import interleave_rope_rows

    config = tiny_config(vocab_size=64)
    weights = {k: v.detach().clone() for k, v in hf_model(config, seed).state_dict().items()}
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ġt", "he", "Ġthe"]
    tokens += [f"<extra_{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    gguf_names = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    gguf_names |= {hf: g for g, hf in _LAYER_NAMES.items()}
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    for name, tensor in weights.items():
        stem, kind = name.rsplit(".", 1)
        if stem in gguf_names:
            gguf_name = gguf_names[stem]
        else:  # model.layers.<i>.<part>
            _, _, i, part = stem.split(".", 3)
            gguf_name = f"blk.{i}.{gguf_names[part]}"
        if gguf_name.split(".")[-1] in heads:  # llama.cpp's rotary row order
            tensor = interleave_rope_rows(tensor, heads[gguf_name.split(".")[-1]])
        writer.add_tensor(f"{gguf_name}.{kind}", tensor.float().numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The GGUF files converted during the test."""
    from onepass.models import gguf

    done, real = [], gguf.load_gguf

    def counting(path: Path, progress=None):
        done.append(path)
        return real(path, progress)

    monkeypatch.setattr(gguf, "load_gguf", counting)
    return done


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "gguf").iterdir() if p.is_dir())


def assert_same_weights(loaded: loading.LoadedModel, weights: dict[str, torch.Tensor]) -> None:
    assert loaded.weights.keys() == weights.keys()
    assert all(torch.equal(loaded.weights[k], weights[k]) for k in weights)


# -- converted models ---------------------------------------------------------------------------


def test_gguf_converts_once_and_loads_from_the_cache(tmp_path, tiny_gguf, conversions):
    path, weights = tiny_gguf
    first = loading.load_model(str(path), tmp_path)
    second = loading.load_model(str(path), tmp_path)
    assert len(conversions) == 1
    assert_same_weights(second, weights)
    assert first.fingerprint == second.fingerprint == loading.file_fingerprint(path)
    assert second.tokenizer.decode(second.tokenizer("the cat")["input_ids"]) == "the cat"
    (entry,) = entries(tmp_path)
    assert json.loads((entry / "complete").read_text())["source"] == str(path.resolve())


def _same_size_garbage(file: Path) -> None:
    file.write_bytes(b"\x07" * file.stat().st_size)  # passes the marker's size check


def _resave_weights(entry: Path, change) -> None:
    """Rewrite model.safetensors changed, with the marker's sizes updated to match: only the
    check against the config can tell."""
    from safetensors.torch import load_file, save_file

    weights = load_file(entry / "model.safetensors")
    change(weights)
    save_file(weights, entry / "model.safetensors")
    marker = json.loads((entry / "complete").read_text())
    marker["files"]["model.safetensors"] = (entry / "model.safetensors").stat().st_size
    (entry / "complete").write_text(json.dumps(marker))


DAMAGES = {
    "truncated weights": lambda e: os.truncate(e / "model.safetensors", 1000),
    "garbled weights": lambda e: _same_size_garbage(e / "model.safetensors"),
    "missing config": lambda e: (e / "onepass_config.json").unlink(),
    "garbled config": lambda e: _same_size_garbage(e / "onepass_config.json"),
    "config of another shape": lambda e: (e / "onepass_config.json").write_text(
        (e / "onepass_config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    ),
    "garbled tokenizer": lambda e: _same_size_garbage(e / "tokenizer.json"),
    "missing tokenizer": lambda e: (e / "tokenizer.json").unlink(),
    "missing tensor": lambda e: _resave_weights(e, lambda w: w.pop("model.norm.weight")),
    "wrong shape": lambda e: _resave_weights(
        e, lambda w: w.update({"lm_head.weight": w["lm_head.weight"][:-1].clone()})
    ),
    "garbled marker": lambda e: (e / "complete").write_text("{"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_converted_again_with_a_one_line_warning(
    tmp_path, tiny_gguf, conversions, damage
):
    path, weights = tiny_gguf
    loading.load_model(str(path), tmp_path)
    (entry,) = entries(tmp_path)
    DAMAGES[damage](entry)
    with pytest.warns(RuntimeWarning, match=re.escape(f"converted model {entry} is damaged")) as w:
        loaded = loading.load_model(str(path), tmp_path)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    assert len(conversions) == 2 and entries(tmp_path) == [entry]
    assert_same_weights(loaded, weights)
    loading.load_model(str(path), tmp_path)  # repaired: no more warnings, no conversion
    assert len(conversions) == 2


def test_conversion_fsyncs_every_file_and_directory_before_the_rename(
    tmp_path, tiny_gguf, monkeypatch
):
    synced, real = [], os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    loading.load_model(str(tiny_gguf[0]), tmp_path)
    (entry,) = entries(tmp_path)
    tmp = f"{entry.parent}/.{entry.name}.tmp-"
    for file in entry.iterdir():
        assert any(s.startswith(tmp) and s.endswith(f"/{file.name}") for s in synced), file
    assert any(s.startswith(tmp) and "/" not in s[len(tmp) :] for s in synced)  # the directory
    assert synced[-1] == str(entry.parent)  # the rename itself


def test_an_interrupted_conversion_leaves_no_entry(tmp_path, tiny_gguf, monkeypatch):
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.load_model(str(tiny_gguf[0]), tmp_path)
    assert entries(tmp_path) == [] and not any((tmp_path / "gguf").glob(".*"))


def _load_in_child(gguf: str, cache: str, barrier, log: str) -> None:
    """One of two processes loading one model into an empty cache at the same moment; the
    conversion is slowed down so that both are inside load_model together."""
    from onepass.models import gguf as gguf_module

    real = gguf_module.load_gguf

    def slow(path: Path, progress=None):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(2.5)
        return real(path, progress)

    gguf_module.load_gguf = slow
    barrier.wait(timeout=120)
    loaded = loading.load_model(gguf, Path(cache))
    assert loaded.weights["model.norm.weight"].shape == (32,)


def test_two_processes_on_an_empty_cache_convert_once_and_both_load(tmp_path, tiny_gguf, capfd):
    context = multiprocessing.get_context("spawn")
    barrier, log = context.Barrier(2), tmp_path / "conversions.log"
    args = (str(tiny_gguf[0]), str(tmp_path / "cache"), barrier, str(log))
    children = [context.Process(target=_load_in_child, args=args) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    assert [child.exitcode for child in children] == [0, 0]
    assert len(log.read_text().split()) == 1
    assert len(entries(tmp_path / "cache")) == 1
    assert "onepass: waiting for another process converting" in capfd.readouterr().err


def test_copies_of_a_model_share_one_entry_keyed_by_content(tmp_path, tiny_gguf, conversions):
    path, weights = tiny_gguf
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    a = loading.load_model(str(path), tmp_path / "cache")
    b = loading.load_model(str(copy), tmp_path / "cache")
    assert len(conversions) == 1 and len(entries(tmp_path / "cache")) == 1
    assert a.fingerprint == b.fingerprint
    assert_same_weights(b, weights)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, seed=1)
    assert loading.load_model(str(other), tmp_path / "cache").fingerprint != a.fingerprint
    assert len(conversions) == 2 and len(entries(tmp_path / "cache")) == 2


def test_old_entries_keyed_by_path_are_ignored(tmp_path, tiny_gguf, conversions):
    path, weights = tiny_gguf
    stat = path.stat()
    old_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|1"
    old = tmp_path / "gguf" / hashlib.sha256(old_key.encode()).hexdigest()[:20]
    old.mkdir(parents=True)
    (old / "onepass_config.json").write_text("{")  # would fail if it were read
    (old / "complete").write_text(str(path))
    assert_same_weights(loading.load_model(str(path), tmp_path), weights)
    assert len(conversions) == 1 and old.exists()


def test_hf_directory_fingerprint_follows_its_files(tmp_path, tiny_gguf):
    converted = loading.load_model(str(tiny_gguf[0]), tmp_path / "cache")
    hf = tmp_path / "hf"
    shutil.copytree(entries(tmp_path / "cache")[0], hf)
    (hf / "config.json").write_text(json.dumps(converted.config.to_hf()))
    first = loading.load_model(str(hf)).fingerprint
    assert loading.load_model(str(hf)).fingerprint == first
    (hf / "config.json").write_text(json.dumps({**converted.config.to_hf(), "note": 1}))
    assert loading.load_model(str(hf)).fingerprint != first


def test_a_model_whose_conversion_does_not_load_is_an_error_not_a_loop(
    tmp_path, tiny_gguf, monkeypatch, conversions
):
    monkeypatch.setattr(loading, "expected_shapes", lambda config: {"extra.weight": (1,)})
    with pytest.raises(ModelLoadError, match="converts into an unusable model"):
        loading.load_model(str(tiny_gguf[0]), tmp_path)
    assert len(conversions) == 1


# -- cost curves --------------------------------------------------------------------------------


class FakeBackend:
    max_len = 64
    revision = 1


@pytest.fixture
def measured(monkeypatch) -> list[object]:
    """The backends measured during the test (each measurement returns CURVE at once)."""
    done: list[object] = []

    def fake_measure(backend: object, progress: bool = False) -> CostModel:
        done.append(backend)
        return CURVE

    monkeypatch.setattr("onepass.cost.measure", fake_measure)
    return done


@pytest.mark.parametrize(
    "content",
    [b'{"m|FakeBackend-1": {"sizes": [1, 2], "sec', b"[1, 2]", b"\xff\xfe not text"],
    ids=["truncated", "not an object", "not UTF-8"],
)
def test_a_damaged_curve_file_is_measured_again_with_a_warning(tmp_path, measured, content):
    path = tmp_path / "cost_curves.json"
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match=re.escape(f"cost-curve file {path}")) as w:
        assert cached_cost_model(FakeBackend(), "m", tmp_path) == CURVE
    assert len(w) == 1 and "\n" not in str(w[0].message) and len(measured) == 1
    assert [CostModel.from_dict(c) for c in json.loads(path.read_text()).values()] == [CURVE]
    assert cached_cost_model(FakeBackend(), "m", tmp_path) == CURVE and len(measured) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"seconds": None},
        {"sizes": "1, 2"},
        {"seconds": [0.01]},
        {"seconds": [0.01, float("nan")]},
        {"seconds": [0.01, float("inf")]},
        {"seconds": [0.0, 0.02]},
        {"long_seconds": [-1.0, 0.04]},
        {"sizes": [2, 1]},
        {"context": "16"},
        {"long_context": 8},
    ],
)
def test_a_damaged_curve_entry_is_measured_again_with_a_warning(tmp_path, measured, change):
    cached_cost_model(FakeBackend(), "m", tmp_path)
    path = tmp_path / "cost_curves.json"
    curves = json.loads(path.read_text())
    (ident,) = curves
    curves[ident] = {key: value for key, value in {**curves[ident], **change}.items() if value}
    path.write_text(json.dumps(curves))
    with pytest.warns(RuntimeWarning, match=re.escape(f"damaged cost curve in {path}")):
        assert cached_cost_model(FakeBackend(), "m", tmp_path) == CURVE
    assert len(measured) == 2
    assert CostModel.from_dict(json.loads(path.read_text())[ident]) == CURVE


def _measure_in_child(cache: str, key: str, barrier) -> None:
    """Measure a curve with a fake measurement that waits for the other process, so that both
    read the file before either writes it."""
    from onepass import cost

    def fake_measure(backend: object, progress: bool = False) -> CostModel:
        barrier.wait(timeout=120)
        return CURVE

    cost.measure = fake_measure
    cost.cached_cost_model(FakeBackend(), key, Path(cache))


def test_two_processes_measuring_at_once_both_keep_their_curve(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    children = [
        context.Process(target=_measure_in_child, args=(str(tmp_path), key, barrier))
        for key in ("first", "second")
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=300)
    assert [child.exitcode for child in children] == [0, 0]
    curves = json.loads((tmp_path / "cost_curves.json").read_text())
    assert sorted(ident.split("|")[0] for ident in curves) == ["first", "second"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# -- onepass cache list / clear -----------------------------------------------------------------


def run_cache(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="onepass")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)
    return capsys.readouterr().out


@pytest.fixture
def full_cache(tmp_path, tiny_gguf) -> Path:
    """A cache with a converted model, an old-format entry, curves and a kernel build."""
    cache = tmp_path / "cache"
    loading.load_model(str(tiny_gguf[0]), cache)
    old = cache / "gguf" / "0123456789abcdef0123"
    old.mkdir()
    (old / "complete").write_text("/old/place/model.gguf")
    (old / "model.safetensors").write_bytes(b"\0" * 300_000)
    write_atomically(cache / "cost_curves.json", json.dumps({"m": CURVE.as_dict()}))
    (cache / "kernels" / "torch-0.0").mkdir(parents=True)
    (cache / "kernels" / "torch-0.0" / "ops.so").write_bytes(b"\0" * 200_000)
    return cache


def test_cache_list_shows_each_item_with_its_source(full_cache, tiny_gguf, capsys):
    out = run_cache(["cache", "list", "--cache-dir", str(full_cache)], capsys)
    rows = out.splitlines()
    (model,) = [r for r in rows if r.startswith("converted model  ")]
    assert str(entries(full_cache)[1]) in model and str(tiny_gguf[0].resolve()) in model
    (old,) = [r for r in rows if r.startswith("converted model (old format)")]
    assert "0.3" in old and "/old/place/model.gguf" in old
    assert any(r.startswith("cost curves") and "1 curve)" in r for r in rows)
    assert any(r.startswith("kernels") and "torch-0.0" in r and "0.2" in r for r in rows)
    assert rows[-1].startswith("total ")


def test_cache_clear_by_kind_then_everything(full_cache, capsys):
    out = run_cache(["cache", "clear", "--curves", "--cache-dir", str(full_cache)], capsys)
    assert "removed cost curves" in out and "freed" in out
    assert not (full_cache / "cost_curves.json").exists()
    assert len(entries(full_cache)) == 2 and (full_cache / "kernels" / "torch-0.0").exists()
    out = run_cache(["cache", "clear", "--cache-dir", str(full_cache)], capsys)
    assert out.count("removed converted model") == 2 and "removed kernels" in out
    assert [p for p in full_cache.rglob("*") if p.is_file()] == []  # lock files too
    out = run_cache(["cache", "list", "--cache-dir", str(full_cache)], capsys)
    assert "is empty" in out


def test_cache_clear_skips_an_entry_another_process_is_converting(full_cache, capsys):
    entry = entries(full_cache)[1]
    with locked(lock_path(entry)):  # as a converting process holds it
        out = run_cache(["cache", "clear", "--models", "--cache-dir", str(full_cache)], capsys)
    assert f"skipped {entry}" in out and entry.exists()
    assert not entries(full_cache)[0].name.startswith("0123")  # the old one went


def test_cache_clear_skips_kernels_while_a_build_holds_its_lock(tmp_path, capsys):
    build = tmp_path / "kernels" / "torch-x" / "avx2"  # one directory per ISA
    build.mkdir(parents=True)
    (build / "lock").write_text("")  # torch's extension builder holds this while compiling
    out = run_cache(["cache", "clear", "--kernels", "--cache-dir", str(tmp_path)], capsys)
    assert "a kernel build is running" in out and build.exists()
    (build / "lock").unlink()
    run_cache(["cache", "clear", "--kernels", "--cache-dir", str(tmp_path)], capsys)
    assert not build.exists()


def test_cache_lists_and_clears_what_training_keeps(tmp_path, capsys):
    features = tmp_path / "train" / "features" / "abc-123"
    features.mkdir(parents=True)
    (features / "000000.safetensors").write_bytes(b"\0" * 100_000)
    (tmp_path / "train" / "runs" / "medusa-abc").mkdir(parents=True)
    (tmp_path / "train" / "runs" / "medusa-abc" / "checkpoint.pt").write_bytes(b"\0" * 10)
    (tmp_path / "heads" / "medusa-abc").mkdir(parents=True)
    (tmp_path / "heads" / "medusa-abc" / "config.json").write_text("{}")
    out = run_cache(["cache", "list", "--cache-dir", str(tmp_path)], capsys)
    assert "training hidden states" in out and "training checkpoint" in out
    assert "trained heads" in out and "medusa-abc" in out
    out = run_cache(["cache", "clear", "--training", "--cache-dir", str(tmp_path)], capsys)
    assert not features.exists() and not (tmp_path / "train" / "runs" / "medusa-abc").exists()
    assert (tmp_path / "heads" / "medusa-abc" / "config.json").exists()
    run_cache(["cache", "clear", "--heads", "--cache-dir", str(tmp_path)], capsys)
    assert not (tmp_path / "heads" / "medusa-abc").exists()
