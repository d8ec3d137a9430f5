"""Incremental detokenization and stop conditions, with the default model's real tokenizer."""

from __future__ import annotations

import pytest

from onepass.sampling import SamplingParams
from onepass.text import IncrementalDetokenizer, OutputAssembler


@pytest.fixture(scope="module")
def tokenizer():
    from onepass.models.loading import load_model

    return load_model("default").tokenizer


@pytest.mark.parametrize(
    ("text", "split_chars"),
    [("naïve café — 東京タワー 🚀🔥 done", True), ("a\n\n  b\tc", False), ("ü" * 7, False)],
)
def test_deltas_concatenate_to_the_text_and_never_split_a_character(tokenizer, text, split_chars):
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], skip_special_tokens=True)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    multibyte_tokens = sum(1 for t in ids if "\ufffd" in tokenizer.decode([t]))
    assert bool(multibyte_tokens) == split_chars  # the first sample must exercise splitting


def assemble(tokenizer, text, **kwargs):
    params = SamplingParams(temperature=0, **kwargs)
    a = OutputAssembler(tokenizer, [1], params, eos_token_ids=[2])
    deltas = []
    for t in tokenizer(text)["input_ids"] + [2]:
        a.add([t])
        deltas.append(a.delta())
        if a.finished:
            break
    return a, "".join(deltas)


def test_stop_string_across_tokens(tokenizer):
    a, streamed = assemble(tokenizer, "Hello world. The END is near", stop=["END is"])
    assert (a.text, a.finish_reason, a.stop_reason) == ("Hello world. The ", "stop", "END is")
    assert streamed == a.text  # nothing of the stop string leaked into the stream
    a, _ = assemble(
        tokenizer, "Hello world. The END is near", stop="END", include_stop_str_in_output=True
    )
    assert a.text == "Hello world. The END"


def test_eos_and_stop_tokens_and_length(tokenizer):
    a, _ = assemble(tokenizer, "one two three")
    assert (a.text, a.finish_reason, a.stop_reason) == ("one two three", "stop", None)
    assert a.token_ids[-1] == 2
    stop_id = tokenizer(" two")["input_ids"][0]
    a, _ = assemble(tokenizer, "one two three", stop_token_ids=[stop_id])
    assert (a.text, a.stop_reason) == ("one", stop_id)
    a, _ = assemble(tokenizer, "one two three four", max_tokens=2)
    assert (a.finish_reason, len(a.token_ids)) == ("length", 2)
    a, _ = assemble(tokenizer, "one two", ignore_eos=True)
    assert a.finish_reason is None
