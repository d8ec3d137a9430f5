"""The suffix drafter: match rule, continuation counting, tree shape, incremental index,
corpus loading (drafters/suffix.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters import DraftContext
from onepass.drafters.suffix import (
    CorpusIndex,
    Options,
    RequestIndex,
    SuffixDrafter,
    best_nodes,
    build,
    evidence_class,
)
from onepass.models.base import ModelOutput


def propose(tokens, budget=12, max_depth=64, corpus=None, **options) -> Draft:
    drafter = SuffixDrafter(Options(**options), budget, corpus)
    drafter.start(tokens)
    return drafter.propose(DecodeState(list(tokens), 1, max_draft_tokens=64, max_depth=max_depth))


class WordTokenizer:
    """Whitespace words -> ids, assigned on first sight (a stand-in for the target's)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


def context(tokenizer=None, k=None) -> DraftContext:
    return DraftContext(
        backend=None, vocab_size=1000, num_speculative_tokens=k, tokenizer=tokenizer
    )


# --- match rule ----------------------------------------------------------------------------


def test_nothing_matches_gives_an_empty_draft():
    assert len(propose([1, 2, 3, 4])) == 0
    assert len(propose([5])) == 0
    assert len(propose([1, 2, 1], min_match=2)) == 0  # only a 1-token match exists


def test_longest_match_wins_over_frequent_short_ones():
    # After "1": 9 three times, but the 3-token context "7 8 1" was followed by 2.
    tokens = [5, 1, 9, 5, 1, 9, 5, 1, 9, 7, 8, 1, 2, 6, 7, 8, 1]
    assert propose(tokens).tokens[0] == 2
    assert propose(tokens, min_occurrences=1).tokens == [2, 6, 7, 8, 1, 2, 6, 7, 8, 1, 2, 6]
    # Backing off to "1" adds 9 (weight 3 * 0.25**2) as a less likely sibling of 2.
    draft = propose(tokens, max_depth=1)
    assert draft.tokens == [2, 9] and draft.tree.parents == (-1, -1)


def test_most_recent_occurrences_fill_the_cap():
    tokens = [3, 1, 3, 2, 3, 4, 3]  # "3" was followed by 1, 2, 4 (oldest to newest)
    assert propose(tokens, max_depth=2, min_occurrences=1, max_occurrences=1).tokens == [4, 3]
    two = propose(tokens, max_depth=1, min_occurrences=2, max_occurrences=2, min_probability=0)
    assert two.tokens == [4, 2]


# --- counting and tree shape ---------------------------------------------------------------

# The context "100 101" was followed by "1 2 7" three times, "1 3 8" twice and "4 9" once
# (20..25 are one-off separators, so nothing longer than "100 101" matches the end).
COUNTED = [100, 101, 1, 2, 7, 20, 100, 101, 1, 3, 8, 21, 100, 101, 1, 2, 7, 22, 100, 101, 4, 9]
COUNTED += [23, 100, 101, 1, 3, 8, 24, 100, 101, 1, 2, 7, 25, 100, 101]


def test_continuations_are_counted_into_a_frequency_tree():
    draft = propose(COUNTED, max_depth=3, min_probability=0.0)
    # Scores: 1 5/6, 2 and 7 3/6, 3 and 8 2/6, 4, 9 and 23 1/6.
    assert draft.tokens == [1, 2, 7, 3, 8, 4, 9, 23]
    assert draft.tree.parents == (-1, 0, 1, 0, 3, -1, 5, 6)
    assert draft.draft_probs is None


def test_identical_continuations_count_once_with_their_weights_summed():
    found = [([5, 6, 7], 1.0), ([5, 8], 0.5), ([5, 6, 7], 1.0), ([9], 0.25), ([5], 1.0)]
    merged = [([5, 6, 7], 2.0), ([5, 8], 0.5), ([9], 0.25), ([5], 1.0)]
    draft, same = best_nodes(found, 8, 0.0, 3), best_nodes(merged, 8, 0.0, 3)
    assert (draft.tokens, draft.tree.parents, draft.classes) == (
        same.tokens,
        same.tree.parents,
        same.classes,
    )
    # 5: 3.5 of 3.75; 6 under it: 2 of the 2.5 that go on past 5 (the path [5] stops there).
    assert draft.tokens == [5, 6, 7, 8, 9]
    assert draft.tree.parents == (-1, 0, 1, 0, -1)
    assert draft.classes == [evidence_class(3, s) for s in (3.5 / 3.75, 0.8, 1.0, 0.2, 0.25 / 3.75)]


def test_nodes_are_classed_by_match_length_and_share_of_their_siblings():
    assert [evidence_class(n, 1.0) for n in (1, 2, 3, 4, 7, 8, 12)] == [2, 5, 5, 8, 8, 11, 11]
    assert [evidence_class(1, s) for s in (0.1, 0.49, 0.5, 0.89, 0.9)] == [0, 0, 1, 1, 2]
    draft = propose(COUNTED, max_depth=3, min_probability=0.0)
    # The context ends in "100 101" (a 2-token match); shares 5/6, 3/5, 1, 2/5, 1, 1/6, 1, 1.
    assert draft.classes == [4, 4, 5, 3, 5, 3, 5, 5]
    assert draft.truncated(max_depth=1, max_nodes=8).classes == [4, 3]


def test_budget_depth_and_probability_floor_cut_the_tree():
    assert propose(COUNTED, budget=4, max_depth=3).tokens == [1, 2, 7, 3]
    assert propose(COUNTED, max_depth=3, min_probability=0.2).tokens == [1, 2, 7, 3, 8]
    assert max(propose(COUNTED, max_depth=2).tree.depths) == 2
    shallow = propose(COUNTED, budget=12, max_depth=64)
    assert len(shallow) == 12 and shallow.tokens[:3] == [1, 2, 7]


def test_no_room_gives_an_empty_draft():
    drafter = SuffixDrafter(Options(), 12, None)
    drafter.start(COUNTED)
    assert len(drafter.propose(DecodeState(COUNTED, 1, max_draft_tokens=0, max_depth=5))) == 0
    assert len(drafter.propose(DecodeState(COUNTED, 1, max_draft_tokens=5, max_depth=0))) == 0


sequences = st.lists(st.integers(0, 4), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(sequences, st.integers(1, 12), st.integers(1, 6))
def test_draft_tree_invariants(tokens, budget, max_depth):
    draft = propose(tokens, budget=budget, max_depth=max_depth, min_probability=0.0)
    assert len(draft) <= budget
    assert not draft or max(draft.tree.depths) <= max_depth
    siblings = [draft.tokens[c] for kids in draft.tree.children() for c in kids]
    assert len(siblings) == len(draft)
    for kids in draft.tree.children():  # siblings are distinct tokens
        assert len({draft.tokens[c] for c in kids}) == len(kids)
    for node in range(len(draft)):  # every path continued an earlier occurrence of the root
        path = [draft.tokens[i] for i in draft.tree.ancestors(node)]
        assert any(
            tokens[p - 1] == tokens[-1] and periodic(tokens, p, len(path)) == path
            for p in range(1, len(tokens))
        )


def periodic(tokens, p, depth):
    """What followed position p, repeating tokens[p:] past the end."""
    return [tokens[p + i % (len(tokens) - p)] for i in range(depth)]


def test_a_continuation_reaching_the_end_repeats_the_loop():
    tokens = [9, 1, 2, 3, 1, 2, 3, 1]
    assert propose(tokens, min_occurrences=1).tokens == [2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1]


# --- incremental index ---------------------------------------------------------------------


def naive_levels(tokens, max_match):
    """For n = 1.. the positions p after each earlier occurrence of the last n tokens, oldest
    first, up to the first n without one."""
    out = []
    for n in range(1, min(max_match, len(tokens) - 1) + 1):
        suffix = tokens[len(tokens) - n :]
        found = [p for p in range(n, len(tokens)) if tokens[p - n : p] == suffix]
        if not found:
            break
        out.append(found)
    return out


@settings(max_examples=200, deadline=None)
@given(sequences, st.lists(st.integers(1, 10), max_size=20), st.integers(1, 6))
def test_incremental_updates_equal_a_rebuild(tokens, chunks, max_match):
    incremental, end = RequestIndex(max_match), 0
    for size in chunks:
        end = min(len(tokens), end + size)
        incremental.sync(tokens[:end])
        assert incremental.levels(max_match) == naive_levels(tokens[:end], max_match)
    incremental.sync(tokens)
    rebuilt = RequestIndex(max_match)
    rebuilt.sync(tokens)
    assert incremental.tokens == rebuilt.tokens == tokens
    assert incremental.positions == rebuilt.positions
    assert incremental.levels(max_match) == naive_levels(tokens, max_match)


@settings(max_examples=100, deadline=None)
@given(sequences, st.integers(1, 79))
def test_incremental_drafting_equals_drafting_from_scratch(tokens, cut):
    drafter = SuffixDrafter(Options(), 8, None)
    drafter.start(tokens[:1])
    for end in range(1, len(tokens) + 1, max(1, cut // 8)):
        drafter.propose(DecodeState(tokens[:end], 1, 64, 64))
    late = drafter.propose(DecodeState(tokens, 1, 64, 64))
    fresh = propose(tokens, budget=8)
    assert (late.tokens, late.tree) == (fresh.tokens, fresh.tree)


def test_a_different_token_list_rebuilds_the_index():
    index = RequestIndex(4)
    index.sync([1, 2, 3, 1, 2])
    index.sync([7, 7, 7])  # a new request without start(): shorter, so rebuilt
    assert index.tokens == [7, 7, 7] and index.levels(4) == naive_levels([7, 7, 7], 4)
    index.sync([7, 7, 8, 9])  # same length + 1 but a different last token: rebuilt
    assert index.tokens == [7, 7, 8, 9] and index.levels(4) == naive_levels([7, 7, 8, 9], 4)


# --- corpus --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=15), max_size=4), sequences)
def test_corpus_suffix_array_finds_every_occurrence(documents, query):
    max_match = 4
    index = CorpusIndex(documents, max_match)
    levels = index.levels(query[: -max_match - 1 : -1])
    for n in range(1, max_match + 1):
        suffix = query[-n:]
        expected = sorted(  # (document, continuation) for each occurrence followed by a token
            (tuple(doc[s + n : s + n + 3]))
            for doc in documents
            for s in range(len(doc) - n)
            if len(query) >= n and doc[s : s + n] == suffix
        )
        found = []
        if n <= len(levels):
            lo, hi = levels[n - 1]
            found = sorted(tuple(index.continuation(r, 3)) for r in index.sa[lo:hi].tolist())
        assert found == expected


def test_corpus_txt_drafts_and_stays_inside_documents(tmp_path):
    tokenizer = WordTokenizer()
    path = tmp_path / "notes.txt"
    path.write_text("the cat sat on the mat", encoding="utf-8")
    drafter = build(Options(corpus=str(path)), context(tokenizer, k=6))
    ids = tokenizer.encode("yesterday the cat")
    drafter.start(ids)
    draft = drafter.propose(DecodeState(ids, len(ids), 64, 64))
    assert draft.tokens == tokenizer.encode("sat on the mat")  # the document ends there


def test_corpus_jsonl_reads_text_and_turns(tmp_path):
    tokenizer = WordTokenizer()
    path = tmp_path / "bench.jsonl"
    records = [{"text": "alpha beta gamma"}, {"turns": ["one two three", "delta epsilon"]}, {}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    drafter = build(Options(corpus=str(path)), context(tokenizer))
    for prefix, expected in [("x alpha", "beta gamma"), ("y one", "two three")]:
        ids = tokenizer.encode(prefix)
        drafter.start(ids)
        assert drafter.propose(DecodeState(ids, 2, 64, 64)).tokens == tokenizer.encode(expected)


def test_the_request_text_takes_priority_over_the_corpus(tmp_path):
    tokenizer = WordTokenizer()
    path = tmp_path / "c.txt"
    path.write_text("red green blue", encoding="utf-8")
    drafter = build(Options(corpus=str(path), min_probability=0.0), context(tokenizer))
    ids = tokenizer.encode("red yellow and red")
    drafter.start(ids)
    draft = drafter.propose(DecodeState(ids, 2, 64, max_depth=1))
    yellow, green = tokenizer.encode("yellow green")
    # Same match length: both continuations, the request's first and likelier (1 vs 0.5).
    assert draft.tokens == [yellow, green] and draft.tree.parents == (-1, -1)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "corpus file not found"),
        ("corpus.csv", "a,b", "must be a .txt or .jsonl"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2 is not valid JSON"),
        ("empty.jsonl", '{"title": "no text"}\n', "no string 'text' or 'turns'"),
        ("binary.txt", b"\xff\xfe\xfa", "cannot read corpus"),
    ],
)
def test_bad_corpus_is_a_one_line_value_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        build(Options(corpus=str(path)), context(WordTokenizer()))
    assert "\n" not in str(error.value)


def test_corpus_needs_a_tokenizer(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b c", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer"):
        build(Options(corpus=str(path)), context(None))


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"min_match": 0},
        {"min_match": 5, "max_match": 4},
        {"max_match": 65},
        {"min_occurrences": 0},
        {"min_occurrences": 40, "max_occurrences": 32},
        {"max_nodes": 0},
        {"backoff": 0.0},
        {"corpus_weight": 1.5},
        {"min_probability": 1.0},
    ],
)
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        Options(**bad)


def test_budget_comes_from_the_config_else_the_options():
    assert build(Options(), context(k=5)).budget == 5
    assert build(Options(max_nodes=9), context()).budget == 9


# --- history of earlier requests -------------------------------------------------------------

QUESTION = [50, 51, 52, 53, 54]  # nothing repeats inside: only a history can draft after it
ANSWER = [60, 61, 62, 63, 64, 65]


def answer(drafter: SuffixDrafter, prompt: list[int], tokens: list[int]) -> list[Draft]:
    """Drive a drafter as the engine would, the target emitting `tokens` one per step; returns
    its proposals."""
    drafter.start(prompt)
    context, drafts = list(prompt), []
    for token in tokens:
        draft = drafter.propose(DecodeState(context, len(prompt), 64, 64))
        drafts.append(draft)
        drafter.observe(draft, Verdict([], [token]), ModelOutput(torch.zeros(1, 1)))
        context.append(token)
    return drafts


def test_a_repeated_prompt_drafts_from_the_history_once_the_first_request_ended():
    root = SuffixDrafter(Options(history_tokens=100), 12, None)
    first, second = root.fork(), root.fork()
    answer(first, QUESTION, ANSWER)  # answered, not finished: still running
    second.start(QUESTION)
    assert len(second.propose(DecodeState(QUESTION, 5, 64, 64))) == 0  # nothing seen yet
    first.finish()
    later = root.fork()
    later.start(QUESTION)
    assert later.propose(DecodeState(QUESTION, 5, 64, 64)).tokens == ANSWER
    assert root.history.documents[0] == QUESTION + ANSWER


def test_a_concurrent_requests_partial_answer_is_never_drafted_from():
    root = SuffixDrafter(Options(history_tokens=100), 12, None)
    running = root.fork()
    answer(running, QUESTION, ANSWER[:3])
    other = root.fork()
    drafts = answer(other, [1, *QUESTION], ANSWER[:3])  # the same text, in another request
    assert all(len(d) == 0 for d in drafts)
    assert root.history.index is None  # empty until a request ends


def test_the_history_is_bounded_and_drops_the_oldest_requests_first():
    root = SuffixDrafter(Options(history_tokens=20), 12, None)
    for i in range(6):
        fork = root.fork()
        answer(fork, [100 + i, *QUESTION], ANSWER)  # 12 tokens each
        fork.finish()
        fork.finish()  # a second finish adds nothing
        assert root.history.size <= 20
    assert [d[0] for d in root.history.documents] == [105]  # two would be 24 tokens
    fork = root.fork()
    answer(fork, list(range(200, 230)), [])
    fork.finish()
    assert list(root.history.documents) == [list(range(210, 230))]  # its last 20 tokens


def test_history_option_is_checked():
    with pytest.raises(ValueError, match="history_tokens"):
        Options(history_tokens=-1)
    assert SuffixDrafter(Options(history_tokens=0), 12, None).history is None
