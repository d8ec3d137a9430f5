"""auto with the drafters that run models: the heads trained for the target join its candidates,
a draft model joins them when configured, and each stays in step with the request while auto
pauses and resumes its proposals (greedy output stays plain decoding's)."""

from __future__ import annotations

import pytest

from onepass import SamplingParams
from onepass.drafters.auto import AutoDrafter
from onepass.drafters.draft_model import DraftModelDrafter

MESSAGES = [
    [{"role": "user", "content": "Explain how a hash map works, briefly."}],
    [{"role": "user", "content": "Write a Python function that reverses a list."}],
]


def auto_of(llm, spec: dict) -> AutoDrafter:
    llm.generate("Hi", SamplingParams(max_tokens=1), speculative_config=spec)
    key = llm._drafter_key(llm._spec(spec))
    return llm._drafters[key]


@pytest.mark.real_model
def test_the_heads_trained_for_the_target_join_auto_when_asked(llm, tiny_llm):
    model_free = {"ngram", "suffix", "recycling"}
    assert set(auto_of(llm, {"method": "auto"}).candidates) == model_free
    with_heads = auto_of(llm, {"method": "auto", "heads": True}).candidates
    assert set(with_heads) == model_free | {"medusa", "eagle"}
    assert set(auto_of(tiny_llm, {"method": "auto", "heads": True}).candidates) == model_free
    with_model = auto_of(tiny_llm, {"method": "auto", "model": str(tiny_llm.cache_dir.parent)})
    assert set(with_model.candidates) == model_free | {"draft_model"}


def test_a_model_without_draft_model_among_the_methods_is_refused(tiny_llm):
    spec = {"method": "auto", "methods": ["ngram"], "model": "default"}
    with pytest.raises(ValueError, match="draft_model"):
        tiny_llm.generate("Hi", SamplingParams(max_tokens=1), speculative_config=spec)


@pytest.mark.real_model
def test_the_target_as_autos_draft_model_is_right_at_every_proposal(llm, monkeypatch):
    """The target drafting for itself proposes the target's own continuation, so every chain
    it proposes is what is then emitted: unless its cache fell out of step with the request
    (after merged trees whose other nodes were accepted, or proposals auto skipped: the target
    as a draft never pays its time, so auto pauses it)."""
    proposals = []
    propose = DraftModelDrafter.propose

    def recorded(self, state):
        draft = propose(self, state)
        proposals.append((list(state.tokens), draft.tokens))
        return draft

    monkeypatch.setattr(DraftModelDrafter, "propose", recorded)
    spec = {"method": "auto", "methods": ["ngram", "suffix", "draft_model"], "model": "default"}
    params = SamplingParams(temperature=0, max_tokens=48)
    for messages in MESSAGES:
        proposals.clear()
        plain = llm.chat(messages, params)[0].outputs[0].token_ids
        fast = llm.chat(messages, params, speculative_config=spec)[0]
        assert fast.outputs[0].token_ids == plain
        prompt = fast.prompt_token_ids
        emitted = [*prompt, *plain]
        assert len(proposals) > 2
        for tokens, chain in proposals:
            assert tokens == emitted[: len(tokens)]
            n = min(len(chain), len(emitted) - len(tokens))
            assert chain[:n] == emitted[len(tokens) : len(tokens) + n]


@pytest.mark.real_model
@pytest.mark.parametrize("temperature", [0, 0.8])
def test_auto_with_heads_changes_nothing(llm, temperature):
    """With medusa and eagle among the candidates (paused and resumed as they pay or not).
    Greedy: plain decoding's tokens; seeded sampling: plain sampling's (every draft here is
    deterministic, so the verifier draws as plain decoding does)."""
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=64)
    for messages in MESSAGES:
        plain = llm.chat(messages, params)[0].outputs[0].token_ids
        fast = llm.chat(messages, params, speculative_config={"method": "auto", "heads": True})[0]
        assert fast.outputs[0].token_ids == plain
