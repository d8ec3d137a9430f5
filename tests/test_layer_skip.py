"""layer_skip: the target drafts with a subset of its own layers (NativeDecoder.subset, the
weights shared). A subset of every layer is the model bit for bit, a smaller one is the model
without those layers; greedy output stays plain decoding's, sampling keeps the target's
distribution (with the power check), and the calibration measures, chooses and caches."""

from __future__ import annotations

import pytest
import torch
from conftest import each_isa, tiny_pair
from test_draft_model import (
    PROMPTS,
    WrongProbabilities,
    check_accepts_everything,
    check_target_distribution,
)

from onepass import SamplingParams
from onepass.cost import CostModel
from onepass.drafters import DraftContext, layer_skip
from onepass.drafters.draft_model import DraftModelDrafter
from onepass.drafters.layer_skip import Options, build, expected_speedup
from onepass.models import Rows

FUSED = {"head_dim": 64, "num_layers": 4}


def forward_all(decoder, ids):
    return decoder.fork(64).run(Rows(ids, torch.arange(len(ids)), None, "all"))


@each_isa
def test_a_subset_of_every_layer_is_the_model_bit_for_bit(isa):
    native, _ = tiny_pair(isa=isa, max_len=64, **FUSED)
    whole = native.subset([0, 1, 2, 3])
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(forward_all(native, ids).logits, forward_all(whole, ids).logits)
    assert whole.packed[0] is native.packed[0]  # shared, not copied


def test_a_subset_is_the_model_without_the_other_layers():
    native, reference = tiny_pair(max_len=64, **FUSED)
    keep = [0, 2]
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in keep])
    reference.config.num_hidden_layers = len(keep)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids[None], use_cache=False).logits[0]
    got = forward_all(native.subset(keep), ids).logits
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, forward_all(native, ids).logits, atol=1e-3)


@pytest.mark.parametrize("layers", [[], [2, 1], [0, 4], [1, 1]])
def test_a_subset_refuses_layers_that_are_not_ascending_indices(layers):
    native, _ = tiny_pair(max_len=64, **FUSED)
    with pytest.raises(ValueError, match="layers"):
        native.subset(layers)


def test_a_subset_of_a_subset_is_refused():
    native, _ = tiny_pair(max_len=64, **FUSED)
    with pytest.raises(ValueError, match="whole model"):
        native.subset([0, 1]).subset([0])


def test_options_are_validated():
    with pytest.raises(ValueError, match="layers"):
        Options(layers=[3, 1])
    with pytest.raises(ValueError, match="calibration_tokens"):
        Options(calibration_tokens=0)


def test_expected_speedup_weighs_acceptance_against_the_drafts_cost():
    flat = CostModel((1, 32), (1.0, 1.0))
    assert expected_speedup(1.0, 0.0, 3, flat) == 4.0  # free and always right: 4 tokens a step
    assert expected_speedup(0.5, 0.0, 1, flat) == 1.5
    assert expected_speedup(0.5, 0.5, 1, flat) == 1.0  # (1 + 0.5) / (0.5 + 1)
    assert expected_speedup(0.2, 0.7, 2, flat) < 1  # a weak, dear draft cannot pay


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 97 for c in text[:24]]


def test_the_calibration_chooses_measured_layers_and_caches_them(tmp_path, monkeypatch):
    native, _ = tiny_pair(max_len=160, **FUSED)
    context = DraftContext(
        backend=native,
        vocab_size=97,
        num_speculative_tokens=None,
        tokenizer=CharTokenizer(),
        cost_model=lambda: CostModel((1, 32), (1.0, 1.5)),
        cache_dir=tmp_path,
        model_key="tiny",
    )
    options = Options(calibration_prompts=2, calibration_tokens=16)
    drafter = build(options, context)
    assert isinstance(drafter, DraftModelDrafter)
    chosen = drafter.decoder.layers
    assert 0 < len(chosen) < 4 and list(chosen) == sorted(chosen)
    entry = layer_skip.cached_calibration(context, options)
    assert entry.layers == list(chosen) and entry.tried and 0 <= entry.agreement <= 1
    skipped = sorted(set(range(4)) - set(chosen))
    assert skipped in [t["skipped"] for t in entry.tried]

    def no_calibration(*args):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(layer_skip, "calibrate", no_calibration)
    assert build(options, context).decoder.layers == chosen  # from the cache
    (tmp_path / layer_skip.CALIBRATION_FILE).write_text("{not json")
    monkeypatch.undo()
    assert build(options, context).decoder.layers == chosen  # a damaged file: measured again


@pytest.mark.parametrize("drafter_class", [DraftModelDrafter, WrongProbabilities])
def test_sampling_with_a_layer_subset_has_the_target_distribution(drafter_class):
    torch.set_num_threads(1)
    target, reference = tiny_pair(max_len=64, seed=0, **FUSED)
    check_target_distribution(target, reference, target.subset([0, 1, 3]), drafter_class)


@pytest.mark.real_model
def test_every_layer_as_the_draft_accepts_every_drafted_token(llm):
    spec = {"method": "layer_skip", "layers": list(range(30)), "num_speculative_tokens": 4}
    check_accepts_everything(llm, spec)


@pytest.mark.real_model
def test_the_calibrated_draft_changes_nothing(llm):
    spec = {"method": "layer_skip"}
    for params in (
        SamplingParams(temperature=0, max_tokens=48),
        SamplingParams(temperature=0.8, seed=5, max_tokens=32),
    ):
        for messages in PROMPTS:
            plain = llm.chat(messages, params)[0].outputs[0].token_ids
            fast = llm.chat(messages, params, speculative_config=spec)[0]
            if params.temperature == 0:
                assert fast.outputs[0].token_ids == plain
            again = llm.chat(messages, params, speculative_config=spec)[0]
            assert again.outputs[0].token_ids == fast.outputs[0].token_ids  # seeded: reproducible
