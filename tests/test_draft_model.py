"""The draft-model drafter: greedy identity with plain decoding, the target as its own draft
accepting everything, the exact target distribution under sampling (with a power check), and a
clear error for a draft with another vocabulary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_pair
from test_verify_sampling import ALPHA, POWER_ALPHA, gof_pvalue

from onepass import SamplingParams
from onepass.drafters.draft_model import DraftModelDrafter, Options
from onepass.engine import decode
from onepass.errors import ModelLoadError
from onepass.models.llama import NativeDecoder
from onepass.sampling import LogitsProcessor, RequestRandomness, warp

PROMPTS = [
    [{"role": "user", "content": "Explain how a hash map works, briefly."}],
    [{"role": "user", "content": "Fix the bug: def add(a, b): return a - b"}],
]


@pytest.mark.real_model
def test_the_target_as_its_own_draft_accepts_every_drafted_token(llm):
    check_accepts_everything(
        llm, {"method": "draft_model", "model": "default", "num_speculative_tokens": 4}
    )


def check_accepts_everything(llm, spec: dict) -> None:
    """A draft that is the target: greedy output unchanged, every drafted token accepted."""
    params = SamplingParams(temperature=0, max_tokens=40)
    for messages in PROMPTS:
        plain = llm.chat(messages, params)[0]
        fast = llm.chat(messages, params, speculative_config=spec)[0]
        assert fast.outputs[0].token_ids == plain.outputs[0].token_ids
        stats = fast.metrics.spec
        assert stats.num_draft_tokens > 0
        # Everything drafted was accepted, except what a stop (EOS) cut off.
        assert stats.num_accepted_tokens >= stats.num_draft_tokens - 4
        assert set(fast.outputs[0].token_sources) <= {spec["method"], "target"}


@pytest.mark.real_model
@pytest.mark.parametrize("width", [1, 3])
def test_a_weak_draft_model_changes_nothing_under_greedy(llm, tiny_llm, width):
    spec = {"method": "draft_model", "model": str(tiny_llm.cache_dir.parent), "width": width}
    params = SamplingParams(temperature=0, max_tokens=32)
    for messages in PROMPTS:
        plain = llm.chat(messages, params)[0].outputs[0].token_ids
        assert llm.chat(messages, params, speculative_config=spec)[0].outputs[0].token_ids == plain


@pytest.mark.real_model
def test_seeded_sampling_with_a_draft_model_is_reproducible(llm):
    spec = {"method": "draft_model", "model": "default", "min_confidence": 0.3}
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24)
    runs = [llm.chat(PROMPTS[0], params, speculative_config=spec)[0] for _ in range(2)]
    assert runs[0].outputs[0].token_ids == runs[1].outputs[0].token_ids


def test_a_draft_with_another_vocabulary_is_refused(llm, tiny_llm, tmp_path):
    from onepass.drafters.draft_model import check_vocabularies

    other = type(llm.tokenizer).from_pretrained(str(tiny_llm.cache_dir.parent))
    other.add_tokens([f"<extra{i}>" for i in range(200)])
    with pytest.raises(ModelLoadError, match=r"'small' does not use the target's tokenizer"):
        check_vocabularies(llm.tokenizer, other, "small")
    check_vocabularies(llm.tokenizer, llm.tokenizer, "same")  # no error


def test_min_confidence_and_width_are_validated():
    with pytest.raises(ValueError, match="min_confidence"):
        Options(min_confidence=1.5)
    with pytest.raises(ValueError, match="width"):
        Options(width=0)


class SecondChoice(DraftModelDrafter):
    """Greedy, the chain takes the draft's second-best token: the best is among the siblings."""

    def _choose(self, logits, state):
        second = int(torch.topk(logits, 2).indices[1])
        return second, None, 1.0


@pytest.mark.real_model
def test_siblings_are_verified_where_the_chain_token_is_rejected(llm):
    """The target as a draft whose chain token is always its second choice: the chain's first
    token is always rejected and the sibling holding the target's own token accepted, so every
    step emits two tokens, and the output is plain decoding's."""
    from onepass.engine import NoDrafter

    params = SamplingParams(temperature=0, max_tokens=24)
    prompt = llm.chat_token_ids(PROMPTS[0])
    drafter = SecondChoice(llm.backend.fork(), max_tokens=3, width=2)
    drafter.start(prompt)
    outputs = []
    for chosen in (drafter, NoDrafter()):
        processor = LogitsProcessor(params, prompt, len(llm.tokenizer), [], llm.device)
        steps = list(decode(llm.backend, prompt, params, processor, chosen, RequestRandomness(0)))
        outputs.append([t for s in steps for t in s.tokens][:24])
        if chosen is drafter:
            drafted = [s for s in steps if s.num_accepted]
            assert len(drafted) >= len(steps) - 2  # all but the prompt step and the last
            assert all(s.num_accepted == 1 for s in drafted)
    assert outputs[0] == outputs[1]


# -- sampling: the engine with a draft model emits exactly the target's distribution ------------

SUPPORT_K = 3  # top-k: three tokens per position, 27 joint outcomes over three positions
SAMPLES = 2400
TEMPERATURE = 0.05  # the tiny random model's logits are close together: sharpen them
PROMPT = [5, 17, 33, 2, 61]


class WrongProbabilities(DraftModelDrafter):
    """Samples from the draft's distribution but reports a uniform one: rejection sampling then
    divides by the wrong q and keeps too many draft tokens (the power check)."""

    def _choose(self, logits, state):
        token, dist, confidence = super()._choose(logits, state)
        return token, torch.full_like(dist, 1 / dist.numel()), confidence


def joint_counts(target, draft_decoder, drafter_class, params, width=1) -> np.ndarray:
    drafter = drafter_class(draft_decoder, max_tokens=2, width=width)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(SAMPLES):
        processor = LogitsProcessor(params, PROMPT, 97, [], torch.device("cpu"))
        steps = decode(target, PROMPT, params, processor, drafter, RequestRandomness(seed))
        out = list(itertools.islice(itertools.chain.from_iterable(s.tokens for s in steps), 3))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


def exact_joint(reference, params) -> dict[tuple[int, ...], float]:
    """P(t0, t1, t2) of plain sampling, from the transformers model's logits."""

    def probs(tokens):
        with torch.no_grad():
            logits = reference(torch.tensor([PROMPT + list(tokens)])).logits[0, -1]
        return warp(logits[None].float(), params)[0]

    joint = {}
    p0 = probs([])
    for t0 in torch.nonzero(p0).flatten().tolist():
        p1 = probs([t0])
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = probs([t0, t1])
            for t2 in torch.nonzero(p2).flatten().tolist():
                joint[(t0, t1, t2)] = float(p0[t0] * p1[t1] * p2[t2])
    return joint


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("drafter_class", [DraftModelDrafter, WrongProbabilities])
def test_sampling_with_a_draft_model_has_the_target_distribution(drafter_class, width):
    torch.set_num_threads(1)
    target, reference = tiny_pair(max_len=64, seed=0)
    # The draft: the target's weights, perturbed: it agrees often, not always.
    noise = torch.Generator().manual_seed(1)
    weights = {
        k: v.detach() * (1 + 0.5 * torch.randn(v.shape, generator=noise))
        for k, v in reference.state_dict().items()
    }
    draft_decoder = NativeDecoder(tiny_config(), weights, max_len=64)
    check_target_distribution(target, reference, draft_decoder, drafter_class, width)


def check_target_distribution(target, reference, draft_decoder, drafter_class, width=1) -> None:
    """Sampling with this draft emits the target's joint distribution of three tokens; with
    WrongProbabilities the test detects the bias (the power check)."""
    params = SamplingParams(temperature=TEMPERATURE, top_k=SUPPORT_K, max_tokens=3)
    expected = exact_joint(reference, params)
    counts = joint_counts(target, draft_decoder, drafter_class, params, width)
    assert set(counts) <= set(expected)
    cells = sorted(expected)
    p = gof_pvalue(
        np.array([counts.get(c, 0) for c in cells]), np.array([expected[c] for c in cells])
    )
    if drafter_class is DraftModelDrafter:
        assert p > ALPHA
    else:
        assert p < POWER_ALPHA


def test_a_chain_stops_where_its_next_token_would_not_pay():
    """The priced stop: with a target step far dearer than a draft forward and rows that cost
    nothing, the chain runs to max_tokens; where a row costs as much as a whole step, no
    token after the first can pay for its row."""
    from onepass.draft import DecodeState

    torch.set_num_threads(1)
    target, _ = tiny_pair(max_len=64, seed=0)
    prompt = PROMPT

    def chain_length(cost) -> int:
        drafter = DraftModelDrafter(target.fork(), max_tokens=6, cost=cost)
        drafter.start(prompt)
        return len(drafter.propose(DecodeState(list(prompt), len(prompt), 32, 32)))

    assert chain_length(None) == 6
    # (The tiny random draft is unsure of every token: a step must be very dear indeed.)
    assert chain_length(lambda rows, context=None: 1e30) == 6  # rows free, a step dear
    assert chain_length(lambda rows, context=None: 1e30 * rows) == 1  # a row costs a step
