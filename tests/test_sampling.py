"""SamplingParams validation and the logits -> probabilities pipeline."""

from __future__ import annotations

import pytest
import torch

from onepass.sampling import LogitsProcessor, SamplingParams, warp


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 1.5},
        {"max_tokens": 0},
        {"n": 0},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"frequency_penalty": -2.5},
        {"stop": [""]},
        {"stop_token_ids": [-1]},
        {"min_tokens": 20, "max_tokens": 10},
        {"logprobs": 1},
    ],
)
def test_invalid_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 16)
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="x").stop_strings == ("x",)


def test_top_k_and_top_p_and_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    probs = warp(logits, SamplingParams(top_k=2))
    torch.testing.assert_close(probs, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top_p keeps the smallest prefix reaching 0.8: 0.5 + 0.2 + 0.15 = 0.85
    probs = warp(logits, SamplingParams(top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    probs = warp(logits, SamplingParams(min_p=0.3))  # drops below 0.3 * 0.5 = 0.15
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    for k in (0, -1):
        torch.testing.assert_close(warp(logits, SamplingParams(top_k=k)), logits.exp())


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    hot, cold = (
        warp(logits, SamplingParams(temperature=2.0)),
        warp(logits, SamplingParams(temperature=0.5)),
    )
    assert cold[0, 0] > hot[0, 0]
    torch.testing.assert_close(cold[0, 0], torch.sigmoid(torch.tensor(2.0)))


def test_penalties_count_output_and_draft_rows():
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=2.0)
    proc = LogitsProcessor(
        params, prompt_ids=[0], vocab_size=4, eos_token_ids=[3], device=torch.device("cpu")
    )
    proc.observe([1, 1])
    logits = torch.tensor([[2.0, 2.0, 2.0, -2.0], [2.0, 2.0, 2.0, -2.0]])
    out = proc.process(logits, row_drafts=[[], [2]])
    # token 0: only in the prompt -> repetition penalty only; token 1: twice in the output
    assert out[0, 0] == 1.0
    assert out[0, 1] == pytest.approx(1.0 - 1.0 - 0.5 * 2)
    assert out[0, 2] == 2.0  # unseen in row 0
    assert out[1, 2] == pytest.approx(1.0 - 1.0 - 0.5)  # row 1 follows draft token 2


def test_min_tokens_blocks_eos_by_row_depth():
    params = SamplingParams(min_tokens=2, max_tokens=8)
    proc = LogitsProcessor(params, [5], vocab_size=4, eos_token_ids=[3], device=torch.device("cpu"))
    proc.observe([1])  # one generated: the next token is the second
    out = proc.process(torch.zeros(2, 4), row_drafts=[[], [2]])
    assert out[0, 3] == float("-inf")  # would be token #2: blocked
    assert out[1, 3] == 0.0  # would be token #3: allowed
