"""Drafter.fork(): each request's drafter shares what the config's drafter learns across
requests and keeps its own view of the request (drafters/base.py), so requests decoding at the
same time neither see each other's partial state nor change each other's output."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from conftest import tiny_pair

from onepass import SamplingParams
from onepass.cost import CostModel
from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters import DraftContext, build_drafter, options_class
from onepass.drafters.auto import AutoDrafter, sub_drafter_config
from onepass.drafters.base import Drafter
from onepass.drafters.draft_model import DraftModelDrafter
from onepass.engine import NoDrafter, decode
from onepass.models.base import ModelOutput
from onepass.models.llama import NativeDecoder
from onepass.sampling import LogitsProcessor, RequestRandomness

VOCAB = 97
MAX_TOKENS = 40
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Two prompts with repeats inside, so that the copying drafters find matches from the start.
PROMPTS = (
    [5, 17, 33, 2, 61, 5, 17, 33, 8, 9, 40, 5, 17, 33, 2],
    [70, 71, 72, 73, 11, 70, 71, 72, 12, 13, 70, 71],
)
FLAT = CostModel((1, 32), (1.0, 1.0))  # rows priced alike: auto drafts whatever may be accepted


class Recorder(Drafter):
    """Passes everything through to a drafter and records what it proposed, and where."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.drafts: list[tuple[int, list[int], tuple[int, ...], list[int]]] = []

    def fork(self) -> Recorder:
        return Recorder(self.inner.fork())

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.inner.start(prompt_ids)

    def propose(self, state: DecodeState) -> Draft:
        draft = self.inner.propose(state)
        self.drafts.append((len(state.tokens), draft.tokens, draft.tree.parents, draft.aux_tokens))
        return draft

    def observe(self, draft: Draft, verdict: Verdict, out: ModelOutput) -> None:
        self.inner.observe(draft, verdict, out)

    def finish(self) -> None:
        self.inner.finish()


@pytest.fixture(scope="module")
def target() -> NativeDecoder:
    """A tiny target on the fused decoder (head_dim 64), whose rows are independent bit for bit:
    greedy output is the same whatever is drafted."""
    return tiny_pair(max_len=96, head_dim=64)[0]


def context(backend: NativeDecoder) -> DraftContext:
    return DraftContext(backend=backend, vocab_size=VOCAB, num_speculative_tokens=None)


def sub(method: str, backend: NativeDecoder, **options: Any) -> Drafter:
    return build_drafter(method, options_class(method)(**options), context(backend))


def auto(backend: NativeDecoder) -> AutoDrafter:
    """auto over recorded ngram, suffix and recycling drafters."""
    ctx = DraftContext(backend, VOCAB, None, cost_model=FLAT)
    drafters = {
        m: Recorder(build_drafter(m, *sub_drafter_config(m, 15, ctx)))
        for m in ("ngram", "suffix", "recycling")
    }
    return AutoDrafter(options_class("auto")(), drafters, FLAT, max_nodes=15)


def draft_model(backend: NativeDecoder) -> DraftModelDrafter:
    draft = tiny_pair(max_len=96, head_dim=64, seed=1)[0]  # another model: drafts get rejected
    return DraftModelDrafter(draft, max_tokens=4)


# name -> (a fresh root drafter for a target, whether it learns from requests still running:
# then the drafts of requests decoding together differ from their drafts alone)
DRAFTERS: dict[str, tuple[Callable[[NativeDecoder], Drafter], bool]] = {
    "none": (lambda b: NoDrafter(), False),
    "ngram": (lambda b: sub("ngram", b), False),
    "suffix": (lambda b: sub("suffix", b, history_tokens=0), False),
    "suffix_history": (lambda b: sub("suffix", b), False),  # learns once a request ended
    "recycling": (lambda b: sub("recycling", b), True),
    "recycling_per_request": (lambda b: sub("recycling", b, persist=False), False),
    "lookahead": (lambda b: sub("lookahead", b), False),
    "draft_model": (draft_model, False),
    "auto": (auto, True),
}


def steps(target: NativeDecoder, drafter: Drafter, prompt: list[int]) -> Iterator[list[int]]:
    processor = LogitsProcessor(GREEDY, prompt, VOCAB, [], torch.device("cpu"))
    rng = RequestRandomness(0)
    for step in decode(target.fork(), prompt, GREEDY, processor, drafter, rng):
        yield step.tokens


def interleaved(runs: list[Iterator[list[int]]]) -> list[list[int]]:
    """Drive the runs a step each in turn (A, B, A, B, ...) to their ends."""
    outputs: list[list[int]] = [[] for _ in runs]
    live = dict(enumerate(runs))
    while live:
        for i, run in list(live.items()):
            tokens = next(run, None)
            if tokens is None:
                del live[i]
            else:
                outputs[i] += tokens
    return outputs


@pytest.fixture(scope="module")
def plain(target: NativeDecoder) -> list[list[int]]:
    return [[t for s in steps(target, NoDrafter(), p) for t in s] for p in PROMPTS]


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_interleaved_forks_decode_as_each_alone(target, plain, name):
    make, learns = DRAFTERS[name]
    alone = []
    for prompt in PROMPTS:  # each request alone, with a fresh root: nothing learned before
        fork = Recorder(make(target)).fork()
        alone.append(([t for s in steps(target, fork, prompt) for t in s], fork))
    root = Recorder(make(target))
    forks = [root.fork() for _ in PROMPTS]  # two requests at once, forks of one root
    together = interleaved([steps(target, f, p) for f, p in zip(forks, PROMPTS, strict=True)])
    for (tokens, fork_alone), out, fork, expected in zip(
        alone, together, forks, plain, strict=True
    ):
        assert tokens == out == expected  # greedy: plain decoding's tokens, alone or not
        assert len(fork.drafts) > 1
        if not learns:  # nothing shared while running: the very same drafts, step by step
            assert fork.drafts == fork_alone.drafts
        elif name == "auto":
            # Shared estimates choose other drafts, so steps end elsewhere; but wherever both
            # runs proposed, the candidates that learn nothing mid-request proposed the same.
            for m in ("ngram", "suffix"):
                mine = {d[0]: d for d in fork.inner.candidates[m].drafter.drafts}
                theirs = {d[0]: d for d in fork_alone.inner.candidates[m].drafter.drafts}
                common = mine.keys() & theirs.keys()
                assert common and all(mine[k] == theirs[k] for k in common)
    if name != "none":
        assert any(d[1] for fork in forks for d in fork.drafts)  # it did draft
    for fork in forks:
        fork.finish()
    if name == "suffix_history":  # each request's own tokens, once it ended
        history = root.inner.history.documents
        assert list(history) == [p + out for p, out in zip(PROMPTS, together, strict=True)]


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_a_fork_is_another_drafter_of_the_same_kind(target, name):
    root = DRAFTERS[name][0](target)
    fork = root.fork()
    assert fork is not root and type(fork) is type(root)
    assert type(fork.fork()) is type(root)  # a fork forks too


def test_forks_share_learned_state_and_own_the_request(target):
    suffix = sub("suffix", target, history_tokens=100)
    fork = suffix.fork()
    assert fork.history is suffix.history is not None and fork.corpus is suffix.corpus
    assert fork.index is not suffix.index

    recycling = sub("recycling", target)
    assert recycling.fork().memory is recycling.memory
    assert sub("recycling", target, persist=False).fork().memory is not recycling.memory

    ngram, lookahead = sub("ngram", target), sub("lookahead", target)
    assert ngram.fork().buffer is not ngram.buffer
    assert lookahead.fork().pool is not lookahead.pool

    root = draft_model(target)
    fork = root.fork()
    assert fork.decoder.cache is not root.decoder.cache  # its own KV cache
    assert fork.decoder.packed is root.decoder.packed  # the draft model's weights, not copied
    assert fork.decoder.cache_len == 0

    root = auto(target)
    fork = root.fork()
    assert fork.learned is root.learned
    for m, c in fork.candidates.items():
        assert c.estimates is root.learned.estimates[m]
        assert c.drafter is not root.candidates[m].drafter
        assert c.pending is not root.candidates[m].pending
    assert fork.candidates["recycling"].drafter.inner.memory is (
        root.candidates["recycling"].drafter.inner.memory
    )
    assert fork.candidates["suffix"].drafter.inner.history is (
        root.candidates["suffix"].drafter.inner.history
    )


def test_a_repeated_request_drafts_from_the_history_and_decodes_the_same(target, plain):
    root = sub("suffix", target, history_tokens=1000)
    forwards = []
    for _ in range(3):
        fork = root.fork()
        run = list(steps(target, fork, PROMPTS[0]))
        fork.finish()
        assert [t for s in run for t in s] == plain[0]  # greedy: plain decoding's tokens
        forwards.append(len(run))
    # The answer is drafted from the first run's: a forward accepts up to 12 tokens.
    assert forwards[1] == forwards[2] <= 1 + MAX_TOKENS // 12 + 1 < forwards[0]


def test_what_one_fork_learns_the_others_use(target):
    root = sub("recycling", target)
    first, second = root.fork(), root.fork()
    list(steps(target, first, PROMPTS[0]))
    assert second.memory.filled.any()  # learned by the first request, shared
    assert root.memory.filled.sum() == second.memory.filled.sum()


# -- the LLM: one root drafter per config, a fork per request --------------------------------

SUFFIX = {"method": "suffix", "history_tokens": 2048}
PROMPT = {"prompt_token_ids": [7, 8, 9, 10, 11, 12, 40, 41, 42]}


def test_llm_decodes_each_request_with_a_fork_and_finishes_it(tiny_llm, monkeypatch):
    root = tiny_llm._drafter(tiny_llm._spec(SUFFIX))
    forks: list[Drafter] = []

    def fork() -> Drafter:
        forks.append(type(root).fork(root))
        return forks[-1]

    monkeypatch.setattr(root, "fork", fork)
    tiny_llm.generate(PROMPT, GREEDY, speculative_config=SUFFIX)
    assert len(forks) == 1 and not root.index.tokens  # the root itself never decoded
    assert root.history.size == len(PROMPT["prompt_token_ids"]) + MAX_TOKENS  # finished: kept
    stream = tiny_llm.stream(PROMPT, GREEDY, speculative_config=SUFFIX)
    next(stream)
    stream.close()  # a request abandoned early is finished too
    assert len(forks) == 2 and len(root.history.documents) == 2
    assert (
        root.history.documents[1][: len(PROMPT["prompt_token_ids"])] == (PROMPT["prompt_token_ids"])
    )


def test_llm_restores_a_snapshot_of_the_suffix_history(tiny_llm):
    spec = {**SUFFIX, "history_tokens": 4096}
    tiny_llm.generate({"prompt_token_ids": [3, 4, 5]}, GREEDY, speculative_config=spec)
    snapshot = tiny_llm.snapshot_drafter(spec)

    def accepted() -> int:
        out = tiny_llm.generate(PROMPT, GREEDY, speculative_config=spec)[0]
        return out.metrics.spec.num_accepted_tokens

    first = accepted()
    again = accepted()  # drafts the whole answer from the first one's, in the history
    assert again > first
    tiny_llm.restore_drafter(snapshot)
    assert accepted() == first
