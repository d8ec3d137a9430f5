"""Prompt lookup (`ngram`): the documented rule for which match wins, as a table, and the
drafter's limits."""

from __future__ import annotations

import numpy as np
import pytest

from onepass.draft import DecodeState
from onepass.drafters import DraftContext
from onepass.drafters.ngram import NgramDrafter, Options, build, find_match

# name: (tokens, min_n, max_n, k, expected n, expected continuation)
CASES = {
    "no earlier occurrence": ([1, 2, 3, 4], 1, 4, 5, 0, []),
    "the suffix itself is no match": ([7, 7], 2, 2, 5, 0, []),
    "one-token match": ([5, 6, 9, 5], 1, 4, 2, 1, [6, 9]),
    # [2, 3] occurs at 1..2 (followed by 8) and 3 occurs later at 5 (followed by 9): the longer
    # suffix wins over the more recent shorter one.
    "longest suffix wins": ([1, 2, 3, 8, 0, 3, 9, 2, 3], 1, 4, 3, 2, [8, 0, 3]),
    # [4, 5] occurs twice: the latest occurrence gives the continuation.
    "most recent occurrence wins": ([4, 5, 1, 4, 5, 2, 4, 5], 1, 4, 1, 2, [2]),
    "continuation capped at k": ([1, 2, 3, 4, 5, 6, 1], 1, 4, 3, 1, [2, 3, 4]),
    "continuation stops at the end": ([1, 2, 3, 1, 2], 1, 4, 9, 2, [3, 1, 2]),
    # The 3-token match [1, 2, 3] is longer than max_n = 2: only [2, 3] is looked up.
    "max_n bounds the suffix": ([1, 2, 3, 7, 1, 2, 3], 1, 2, 1, 2, [7]),
    "min_n rejects short matches": ([5, 6, 9, 5], 2, 4, 2, 0, []),
    "a loop is followed": ([3, 4, 3, 4, 3, 4], 1, 4, 4, 4, [3, 4]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_which_match_wins(case):
    tokens, min_n, max_n, k, n, continuation = CASES[case]
    found_n, found = find_match(np.array(tokens), min_n, max_n, k)
    assert (found_n, found.tolist()) == (n, continuation)


def reference_match(tokens, min_n, max_n, k):
    """The docstring's rule, by brute force: longest n first, then the latest start."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
        if starts:
            return n, tokens[starts[-1] + n : starts[-1] + n + k]
    return 0, []


def test_which_match_wins_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(500):
        tokens = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(0, 40))).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = int(rng.integers(min_n, 6))
        k = int(rng.integers(1, 6))
        found_n, found = find_match(np.array(tokens, dtype=np.int64), min_n, max_n, k)
        assert (found_n, found.tolist()) == reference_match(tokens, min_n, max_n, k), tokens


def state(tokens, max_draft_tokens=32, max_depth=32) -> DecodeState:
    return DecodeState(list(tokens), 1, max_draft_tokens=max_draft_tokens, max_depth=max_depth)


def test_drafter_proposes_the_winning_continuation_as_a_chain():
    drafter = NgramDrafter(Options(), k=8)
    draft = drafter.propose(state([1, 2, 3, 8, 0, 3, 9, 2, 3]))
    assert draft.tokens == [8, 0, 3, 9, 2, 3]
    assert draft.tree.parents == (-1, 0, 1, 2, 3, 4)
    assert drafter.propose(state([1, 2, 3])).tokens == []


def test_drafter_respects_k_depth_and_room():
    tokens = [1, 2, 3, 4, 5, 6, 7, 1]
    assert len(NgramDrafter(Options(), k=3).propose(state(tokens))) == 3
    assert len(NgramDrafter(Options(), k=8).propose(state(tokens, max_depth=2))) == 2
    assert len(NgramDrafter(Options(), k=8).propose(state(tokens, max_draft_tokens=4))) == 4
    assert len(NgramDrafter(Options(), k=8).propose(state(tokens, max_depth=0))) == 0


def test_drafter_follows_a_growing_sequence_and_a_new_request():
    drafter = NgramDrafter(Options(), k=4)
    tokens = [9, 1, 2, 9]
    assert drafter.propose(state(tokens)).tokens == [1, 2, 9]
    tokens += [1, 5, 9]  # grows within the request: the latest occurrence of 9 is followed by 1, 5
    assert drafter.propose(state(tokens)).tokens == [1, 5, 9]
    drafter.start([4, 4])
    assert drafter.propose(state([4, 4])).tokens == [4]


def test_num_speculative_tokens_sets_k_and_options_are_checked():
    context = DraftContext(backend=None, vocab_size=10, num_speculative_tokens=2)
    assert build(Options(), context).k == 2
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        Options(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        Options(prompt_lookup_min=0)
