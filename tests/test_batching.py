"""Continuous batching: several requests share each forward (NativeDecoder.run_batch, LLM.step),
and each one's output is exactly what it is alone."""

from __future__ import annotations

import pytest
import torch
from conftest import each_isa, each_kv_dtype, tiny_pair

from onepass import SamplingParams
from onepass.draft import BatchShare, DecodeState, Draft
from onepass.drafters import DraftContext
from onepass.drafters.auto import AutoDrafter, MergedTree, NodeStats, Options, build
from onepass.models import Rows
from onepass.tree import Tree

FUSED = {"head_dim": 64}


@each_isa
@each_kv_dtype
@pytest.mark.parametrize(("arch", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_a_shared_forward_gives_each_request_its_own_rows_bit_for_bit(
    isa, kv_dtype, arch, overrides
):
    """Three requests at different cache lengths in one forward (a prompt chunk, a draft tree
    and a single root): every row, and every KV cache, as when each runs alone."""
    native, _ = tiny_pair(arch, isa=isa, kv_dtype=kv_dtype, max_len=96, **{**FUSED, **overrides})
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=gen) for n in (5, 17, 30)]
    tree = Tree((-1, 0, 1, -1, 3))
    rows = [
        Rows(torch.randint(0, 97, (12,), generator=gen), torch.arange(5, 17), None, "last"),
        Rows(torch.randint(0, 97, (6,), generator=gen), tree.positions(17), tree.mask()),
        Rows(torch.randint(0, 97, (1,), generator=gen), torch.tensor([30]), None),
    ]

    def fresh_forks():
        forks = [native.fork(64) for _ in prompts]
        for fork, prompt in zip(forks, prompts, strict=True):
            fork.prefill(prompt)
        return forks

    alone_forks = fresh_forks()
    alone = [fork.run(r) for fork, r in zip(alone_forks, rows, strict=True)]
    shared_forks = fresh_forks()
    shared = native.run_batch(list(zip(shared_forks, rows, strict=True)))
    for a, b, fa, fb, r in zip(alone, shared, alone_forks, shared_forks, rows, strict=True):
        assert a.logits.shape == b.logits.shape
        assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
        end = fa.cache_len + r.ids.shape[0]  # the committed rows and the ones just written
        assert torch.equal(fa.cache.k[:, :, :end], fb.cache.k[:, :, :end])
        assert torch.equal(fa.cache.v[:, :, :end], fb.cache.v[:, :, :end])
    assert shared[0].logits.shape[0] == 1  # "last": the prompt's last row only


def test_run_batch_refuses_a_decoder_that_is_not_a_fork(tiny_llm):
    other, _ = tiny_pair(**FUSED)
    with pytest.raises(ValueError, match="fork"):
        tiny_llm.backend.run_batch([(other, Rows(torch.tensor([1]), torch.tensor([0])))])


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Repeat after me: one two three, one two three, one two",
    "List three colors:",
    "Write a short poem about the sea.",
]


def alone_and_together(llm, params, spec):
    alone = [llm.generate(p, params, speculative_config=spec)[0] for p in PROMPTS]
    together = llm.generate(PROMPTS, params, speculative_config=spec)
    return alone, together


@pytest.mark.parametrize("method", [None, "auto", "ngram"])
def test_generate_batches_its_prompts_and_each_output_is_the_one_alone(llm, method):
    spec = {"method": method} if method else None
    for params in (
        SamplingParams(max_tokens=48, temperature=0),
        SamplingParams(max_tokens=48, temperature=0.9, seed=11),
    ):
        alone, together = alone_and_together(llm, params, spec)
        for a, t in zip(alone, together, strict=True):
            assert t.outputs[0].token_ids == a.outputs[0].token_ids
            assert t.outputs[0].text == a.outputs[0].text
            assert t.outputs[0].finish_reason == a.outputs[0].finish_reason


@pytest.mark.parametrize(
    "method", ["recycling", "suffix", "lookahead", "draft_model", "medusa", "eagle"]
)
def test_every_drafter_batches_losslessly(tiny_llm, tmp_path, method):
    spec = {"method": method}
    if method == "draft_model":
        spec["model"] = str(tiny_llm.cache_dir.parent)
    if method in ("medusa", "eagle"):  # random heads, each request with its own head cache
        from test_eagle import write_head
        from test_medusa import write_heads

        write = write_heads if method == "medusa" else write_head
        spec["heads"] = write(tiny_llm, tmp_path)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone, together = alone_and_together(tiny_llm, params, spec)
    plain = tiny_llm.generate(PROMPTS, params)
    for a, t, p in zip(alone, together, plain, strict=True):
        assert t.outputs[0].token_ids == a.outputs[0].token_ids == p.outputs[0].token_ids


def test_requests_join_and_leave_between_steps(llm):
    """A request added while others run, and one with a stop string that leaves early: each
    output (streamed as deltas) equals its stream() alone."""
    jobs = [
        ("Count from one to twenty:", SamplingParams(max_tokens=40, temperature=0)),
        ("Name a fruit.", SamplingParams(max_tokens=30, temperature=0, stop=["."])),
        ("Write a haiku about rain.", SamplingParams(max_tokens=35, temperature=0.7, seed=5)),
    ]
    spec = {"method": "auto"}
    expected = []
    for prompt, params in jobs:
        outs = list(llm.stream(prompt, params, speculative_config=spec))
        expected.append(("".join(o.outputs[0].text for o in outs), outs[-1].outputs[0]))
    running = [llm.request(p, params, speculative_config=spec) for p, params in jobs[:2]]
    texts = {id(r): "" for r in running}
    finals = {}
    steps = 0
    while any(not r.finished for r in running) or steps < 3:
        if steps == 3:  # the third joins a running batch
            late = llm.request(jobs[2][0], jobs[2][1], speculative_config=spec)
            running.append(late)
            texts[id(late)] = ""
        for r, out in zip(running, llm.step(running), strict=True):
            if out is not None:
                texts[id(r)] += out.outputs[0].text
                if out.finished:
                    finals[id(r)] = out.outputs[0]
        steps += 1
    for r, (text, final) in zip(running, expected, strict=True):
        assert texts[id(r)] == text
        assert finals[id(r)].finish_reason == final.finish_reason
        assert finals[id(r)].stop_reason == final.stop_reason


def test_a_closed_request_is_left_out_of_the_next_step(llm):
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    a = llm.request("Tell me a story.", params)
    b = llm.request("Tell me a joke.", params)
    llm.step([a, b])
    a.close()
    outs = llm.step([a, b])
    assert outs[0] is None and outs[1] is not None


# -- auto prices its rows against the whole forward --------------------------------------------


def linear_cost(rows: int, context: int = 0) -> float:
    """A forward's time: the weights (10) plus a row's arithmetic (1 each)."""
    return 10.0 + rows


def merged_chain(probabilities: list[float]) -> MergedTree:
    stats = NodeStats.for_ranks(0.9, 0.5)
    merged = MergedTree()
    merged.add(Draft.chain(list(range(len(probabilities)))), stats, "ngram")
    merged.rates[:] = probabilities  # P(node | parent), as measured
    return merged


def test_auto_drafts_less_as_the_batch_grows():
    context = DraftContext(
        backend=None,
        vocab_size=100,
        num_speculative_tokens=8,
        tokenizer=None,
        cost_model=lambda: linear_cost,
    )
    auto = build(Options(methods=["ngram"]), context)
    merged = merged_chain([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    sizes = []
    for others in (0, 1, 3, 7, 15, 31):
        share = None if others == 0 else BatchShare(rows=others, tokens=float(others))
        state = DecodeState(list(range(20)), 10, 64, 16, batch=share)
        sizes.append(len(auto.best_draft(merged, state)[0]))
    assert sizes[0] > 0 and sizes[-1] < sizes[0]
    assert sizes == sorted(sizes, reverse=True), sizes


def test_auto_pausing_its_drafting_stays_lossless(llm):
    """Drafting that never pays its time (here: priced at a second a step) pauses for longer
    and longer stretches; the outputs stay plain decoding's, greedy and seeded sampling."""
    spec = {"method": "auto"}
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), speculative_config=spec)
    auto = next(d for d in llm._drafters.values() if isinstance(d, AutoDrafter))
    try:
        auto.learned.draft_time = 1000.0
        for params in (
            SamplingParams(max_tokens=40, temperature=0),
            SamplingParams(max_tokens=40, temperature=0.8, seed=4),
        ):
            plain = llm.generate(PROMPTS, params)
            paused = llm.generate(PROMPTS, params, speculative_config=spec)
            for p, a in zip(plain, paused, strict=True):
                assert a.outputs[0].token_ids == p.outputs[0].token_ids
        assert auto.learned.draft_time > 1.0  # it stayed priced out throughout
    finally:
        auto.learned.draft_time = 0.0
