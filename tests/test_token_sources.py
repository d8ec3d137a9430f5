"""Each emitted token says how it was produced: the target's own token, or accepted from which
drafter's draft (what the server's page colours)."""

from __future__ import annotations

import pytest

from onepass import SamplingParams

PROMPT = {"prompt_token_ids": [7, 8, 9, 10] * 20}
GREEDY = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


@pytest.mark.parametrize(
    ("model", "spec", "names"),
    [
        ("tiny_llm", None, {"target"}),
        ("tiny_llm", {"method": "ngram"}, {"target", "ngram"}),
        # auto drafts where drafting pays for its time: on the tiny model a forward costs
        # about as much as the drafters' Python, so whether it drafts depends on the machine.
        pytest.param(
            "llm",
            {"method": "auto"},
            {"target", "ngram", "suffix", "recycling"},
            marks=pytest.mark.real_model,
        ),
    ],
)
def test_sources_name_the_producer_of_every_token(request, model, spec, names):
    llm = request.getfixturevalue(model)
    llm.generate(PROMPT, GREEDY, speculative_config=spec)  # recycling learns from it
    learned = llm.snapshot_drafter(spec)
    out = llm.generate(PROMPT, GREEDY, speculative_config=spec)[0]
    completion, stats = out.outputs[0], out.metrics.spec
    assert len(completion.token_sources) == len(completion.token_ids)
    assert set(completion.token_sources) <= names
    drafted = sum(source != "target" for source in completion.token_sources)
    assert drafted == stats.num_accepted_tokens  # exactly the accepted draft tokens
    if spec is not None:
        assert drafted > 0
    llm.restore_drafter(learned)  # the stream drafts from what generate drafted from
    chunks = list(llm.stream(PROMPT, GREEDY, speculative_config=spec))
    streamed = [s for c in chunks for s in c.outputs[0].token_sources]
    assert len(streamed) == len(completion.token_sources)
    if spec is None or spec["method"] != "auto":  # auto's choices depend on measured times
        assert streamed == completion.token_sources
