"""Plain decoding through the public API on the embedded default model."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import default_reference

from onepass import SamplingParams

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def test_greedy_equals_transformers_greedy(llm):
    model = default_reference()
    ids = llm.chat_token_ids([{"role": "user", "content": "List the planets."}])
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            max_new_tokens=24,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    ours = llm.generate({"prompt_token_ids": ids}, GREEDY)[0].outputs[0].token_ids
    assert ours == ref[0, len(ids) :].tolist()[: len(ours)]


def test_generate_shapes_and_finish_reasons(llm):
    outs = llm.generate(["The capital of France is", {"prompt_token_ids": [504, 3575]}], GREEDY)
    assert len(outs) == 2
    first = outs[0]
    assert first.prompt == "The capital of France is" and first.finished
    c = first.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 24 and c.text
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [504, 3575]
    chat = llm.chat(
        [{"role": "user", "content": "Say OK."}], SamplingParams(temperature=0, max_tokens=64)
    )
    assert chat[0].outputs[0].finish_reason == "stop"  # the model ends its turn with EOS
    assert chat[0].outputs[0].token_ids[-1] in llm.eos_token_ids


def test_stream_concatenates_to_generate(llm):
    params = SamplingParams(temperature=0, max_tokens=40, stop=["\n\n"])
    messages = [{"role": "user", "content": "Write two short paragraphs about tea."}]
    whole = llm.chat(messages, params)[0].outputs[0]
    chunks = list(llm.stream(messages, params))
    assert "".join(c.outputs[0].text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.outputs[0].token_ids] == whole.token_ids
    assert [c.finished for c in chunks][-1] and not any(c.finished for c in chunks[:-1])
    assert chunks[-1].outputs[0].finish_reason == whole.finish_reason


def test_sampling_is_reproducible_for_a_seed(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    a = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    b = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    c = (
        llm.generate(
            "Once upon a time", SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20)
        )[0]
        .outputs[0]
        .token_ids
    )
    assert a == b and a != c


def test_n_completions(llm):
    out = llm.generate("Hi", SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=5))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [10**9]}, "token ids"),
        ({"tokens": [1]}, "prompt_token_ids"),
        (42, "string or a dict"),
    ],
)
def test_bad_prompts_raise_value_error(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY)


def test_prompt_longer_than_context_raises(llm):
    with pytest.raises(ValueError, match="context window"):
        llm.generate({"prompt_token_ids": [100] * 5000}, GREEDY)


def test_context_full_finishes_with_length():
    from onepass import LLM

    small = LLM("default", max_model_len=40)
    ids = small.chat_token_ids([{"role": "user", "content": "Count from one to one hundred."}])
    out = small.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=None))
    c = out[0].outputs[0]
    assert c.finish_reason == "length"
    assert len(ids) + len(c.token_ids) == 40  # prompt + output fill the window, never more


def test_restored_drafter_drafts_as_before_the_requests_it_learned_from(llm):
    # Recycling persists its memory across requests: a second run of the same prompt drafts
    # from the first run's answer. Restoring the snapshot must undo exactly that.
    config = {"method": "recycling", "tree": [[0], [0, 0], [0, 0, 0], [1]]}
    params = SamplingParams(temperature=0, max_tokens=48)
    warm = llm.generate("Name three rivers.", params, speculative_config=config)[0]
    snapshot = llm.snapshot_drafter(config)

    def accepted() -> tuple[int, int]:
        spec = llm.generate(PROMPT, params, speculative_config=config)[0].metrics.spec
        return spec.num_drafts, spec.num_accepted_tokens

    first = accepted()
    again = accepted()  # drafts from the first run's answer
    llm.restore_drafter(snapshot)
    assert accepted() == first != again
    assert llm.snapshot_drafter(None) is None  # plain decoding learns nothing
    assert warm.metrics.spec.num_drafts  # the drafter was built and used before the snapshot
    fresh = {"method": "recycling", "top_k": 4}
    llm.restore_drafter(llm.snapshot_drafter(fresh))  # not built yet: rebuilt fresh, no error
    assert llm.generate(PROMPT, params, speculative_config=fresh)[0].outputs[0].token_ids


PROMPT = "Summarize: the quick brown fox jumps over the lazy dog, and the dog sleeps on."


@pytest.mark.real_model
def test_metrics_report_the_drafting_time(llm):
    params = SamplingParams(temperature=0, max_tokens=24)
    prompt = "Repeat: one two three, one two three, one two three"
    out = llm.generate(prompt, params, speculative_config={"method": "auto"})[0]
    m = out.metrics
    assert 0 < m.drafting_seconds < m.total_seconds - m.prefill_seconds


def test_the_loaded_model_is_kept_out_of_the_cyclic_collectors_passes():
    """The model's and tokenizer's Python objects are frozen once loaded: a full collection
    traversing them stopped decoding for over 100 ms."""
    from onepass import LLM

    llm = LLM("default")
    assert gc.get_freeze_count() > 100_000
    assert len(gc.get_objects()) < gc.get_freeze_count() / 20
    # An LLM dropped inside a reference cycle (an application's objects often make one) is
    # collected when the next LLM freezes, not kept frozen for good.
    llm.cycle = [llm]
    dropped = weakref.ref(llm.backend)
    del llm
    LLM("default")
    assert dropped() is None
