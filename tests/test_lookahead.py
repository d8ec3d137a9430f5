"""Lookahead decoding: the n-gram pool, the trie merge, the window's rows, positions and mask
(built by hand for small grids, then checked against separate forwards on a tiny model), the
window's Jacobi update, and greedy identity through the engine on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pair

from onepass.draft import DecodeState, Draft, Verdict
from onepass.drafters import DraftContext, build_drafter
from onepass.drafters.lookahead import (
    LookaheadDrafter,
    NgramPool,
    Options,
    merge_trie,
    window_cells,
    window_mask,
    window_offsets,
)
from onepass.engine import NoDrafter, decode, forward_rows
from onepass.models.base import ModelOutput
from onepass.outputs import SpecDecodeStats
from onepass.sampling import LogitsProcessor, RequestRandomness, SamplingParams

# -- pool ----------------------------------------------------------------------------------


def test_pool_keeps_the_most_recent_continuations_per_key():
    pool = NgramPool(capacity=2)
    pool.add(1, (2, 3))
    pool.add(1, (4, 5))
    assert pool.get(1) == [(4, 5), (2, 3)]  # most recent first
    pool.add(1, (2, 3))  # re-adding refreshes instead of duplicating
    assert pool.get(1) == [(2, 3), (4, 5)]
    pool.add(1, (6, 7))  # evicts the least recent, (4, 5)
    assert pool.get(1) == [(6, 7), (2, 3)]
    assert pool.get(9) == []


def test_pool_is_seeded_with_every_ngram_of_the_prompt():
    pool = NgramPool(capacity=4)
    pool.add_from([5, 6, 7, 5, 6, 8], n=3)
    assert pool.table == {5: [(6, 7), (6, 8)], 6: [(7, 5)], 7: [(5, 6)]}
    pool.add_from([5, 6, 7, 5, 6, 8, 9], n=3, first_end=7)  # only n-grams ending in new tokens
    assert pool.get(6) == [(8, 9), (7, 5)]
    assert pool.get(5) == [(6, 8), (6, 7)]


# -- trie ----------------------------------------------------------------------------------


def test_trie_shares_prefixes():
    tokens, parents = merge_trie([(1, 2, 3), (1, 2, 4), (1, 5, 3), (6, 2)], 99, 9)
    assert tokens == [1, 2, 3, 4, 5, 3, 6, 2]
    assert parents == [-1, 0, 1, 1, 0, 4, -1, 6]


def test_trie_merges_duplicates_and_respects_caps():
    tokens, parents = merge_trie([(1, 2, 3), (1, 2, 3), (1, 2, 4)], 99, 9)
    assert (tokens, parents) == ([1, 2, 3, 4], [-1, 0, 1, 1])
    # max_nodes: the first candidate whole, the second's new suffix only as far as it fits
    tokens, parents = merge_trie([(1, 2, 3), (1, 5, 6)], 4, 9)
    assert (tokens, parents) == ([1, 2, 3, 5], [-1, 0, 1, 0])
    # max_depth cuts every candidate, which may make them equal
    tokens, parents = merge_trie([(1, 2, 3), (1, 2, 4)], 99, 2)
    assert (tokens, parents) == ([1, 2], [-1, 0])


# -- window layout -------------------------------------------------------------------------


def test_window_cells_and_offsets():
    assert window_cells(3, 3) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert window_offsets(3, 3) == [1, 2, 1, 2, 3]
    assert window_offsets(4, 2) == [1, 1, 2, 2, 3]  # cells (0,1) (1,0) (1,1) (2,0) (2,1)
    assert len(window_cells(4, 5)) == 3 * 5 - 1


def rows_to_mask(rows: list[list[int]], width: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, cols in enumerate(rows):
        mask[i, cols] = True
    return mask


def test_window_mask_by_hand_level3_window3():
    # Columns: 0 root, 1-2 draft nodes, 3 (0,1), 4 (0,2), 5 (1,0), 6 (1,1), 7 (1,2).
    expected = rows_to_mask(
        [
            [0, 3],  # (0,1): root, itself
            [0, 3, 4],  # (0,2): root, (0,1), itself
            [0, 5],  # (1,0): root (= cell (0,0)), itself
            [0, 3, 6],  # (1,1): root, (0,1), itself
            [0, 3, 4, 7],  # (1,2): root, (0,1), (0,2), itself
        ],
        8,
    )
    assert torch.equal(window_mask(3, 3, num_nodes=2), expected)


def test_window_mask_by_hand_level4_window2():
    # Columns: 0 root, 1 (0,1), 2 (1,0), 3 (1,1), 4 (2,0), 5 (2,1); no draft nodes.
    expected = rows_to_mask(
        [
            [0, 1],  # (0,1)
            [0, 2],  # (1,0)
            [0, 1, 3],  # (1,1)
            [0, 2, 4],  # (2,0): root, its column (1,0), itself
            [0, 1, 3, 5],  # (2,1): root, (0,1), its column (1,1), itself
        ],
        6,
    )
    assert torch.equal(window_mask(4, 2, num_nodes=0), expected)


@pytest.mark.parametrize(("level", "window", "nodes"), [(3, 4, 5), (4, 5, 0), (2, 3, 2)])
def test_window_rows_never_see_draft_nodes_and_always_see_the_root(level, window, nodes):
    mask = window_mask(level, window, nodes)
    assert mask.shape == (level * window - window - 1, 1 + nodes + level * window - window - 1)
    assert not mask[:, 1 : 1 + nodes].any()
    assert mask[:, 0].all()
    assert mask[:, 1 + nodes :].diagonal().all()  # each row sees itself


# -- drafter -------------------------------------------------------------------------------


def drafter(max_nodes: int | None = None, **options) -> LookaheadDrafter:
    return LookaheadDrafter(Options(**options), max_nodes)


def state(tokens: list[int], rows: int = 64, depth: int = 64) -> DecodeState:
    return DecodeState(tokens, len(tokens), max_draft_tokens=rows, max_depth=depth)


def test_propose_merges_pool_ngrams_of_the_root_and_adds_the_window():
    d = drafter(level=3, window_size=3, guess_set_size=3)
    prompt = [7, 1, 2, 9, 7, 1, 3, 8, 7, 1, 2]
    d.start(prompt)
    draft = d.propose(state([*prompt, 7]))
    # Continuations of 7, most recent first: (1, 2), (1, 3); sharing the node for 1.
    assert draft.tokens == [1, 2, 3]
    assert draft.tree.parents == (-1, 0, 0)
    assert draft.draft_probs is None
    assert len(draft.aux_tokens) == 5 and draft.aux_offsets == [1, 2, 1, 2, 3]
    assert set(draft.aux_tokens) <= set(prompt)  # initialised from prompt tokens
    assert torch.equal(draft.aux_mask, window_mask(3, 3, num_nodes=3))


def test_propose_respects_rows_depth_and_the_node_cap():
    prompt = [7, 1, 2, 9, 7, 1, 3, 8, 7, 4, 5, 6]
    d = drafter(level=4, window_size=2, guess_set_size=3)
    d.start(prompt)
    full = d.propose(state([*prompt, 7]))
    assert full.tokens == [4, 5, 6, 1, 3, 8, 2, 9]
    assert d.propose(state([*prompt, 7], depth=1)).tokens == [4, 1]
    few = d.propose(state([*prompt, 7], rows=5 + 3))  # 5 window rows + 3 nodes
    assert few.tokens == [4, 5, 6] and len(few.aux_tokens) == 5
    tight = d.propose(state([*prompt, 7], rows=4))  # no room for the window: verify only
    assert tight.tokens == [4, 5, 6, 1] and tight.aux_tokens == []
    assert d.propose(state([*prompt, 7], depth=0)) == Draft.empty()
    capped = drafter(max_nodes=2, level=4, window_size=2, guess_set_size=3)
    capped.start(prompt)
    assert capped.propose(state([*prompt, 7])).tokens == [4, 5]


def test_build_uses_num_speculative_tokens_as_the_node_cap():
    context = DraftContext(backend=None, vocab_size=97, num_speculative_tokens=3)
    d = build_drafter("lookahead", Options(guess_set_size=5, level=5), context)
    assert d.max_nodes == 3
    context.num_speculative_tokens = None
    # Else the rows budget caps it: 16 rows - root - 11 window rows (4 levels x 3 columns - 1).
    assert build_drafter("lookahead", Options(guess_set_size=5, level=5), context).max_nodes == 4
    roomy = Options(guess_set_size=5, level=5, max_rows=40)
    assert build_drafter("lookahead", roomy, context).max_nodes == 20  # G x (N - 1)


def fake_output(draft: Draft, root: int, aux: list[int], vocab: int = 50) -> ModelOutput:
    """Logits [1 + n + m, vocab] whose root row and aux rows have the given argmax."""
    n = len(draft)
    logits = torch.zeros(1 + n + len(draft.aux_tokens), vocab)
    logits[0, root] = 1.0
    logits[1 + n + torch.arange(len(aux)), torch.tensor(aux)] = 1.0
    return ModelOutput(logits)


@pytest.mark.parametrize("align", [False, True])
def test_observe_collects_column_ngrams_and_shifts_the_window(align):
    d = drafter(level=3, window_size=3, guess_set_size=2, align_on_accept=align)
    d.start([40, 41, 42])
    d.grid = [[0, 11, 12], [20, 21, 22]]
    d.iterations = 1  # level 1 already holds model output
    draft = d.propose(state([40, 41, 42, 30]))
    assert draft.aux_tokens == [11, 12, 20, 21, 22]
    # Rows: root, then aux (0,1) (0,2) (1,0) (1,1) (1,2); the last level predicts 31, 32, 33.
    d.observe(draft, Verdict([], [5]), fake_output(draft, 5, [0, 0, 31, 32, 33]))
    assert d.pool.get(30) == [(20, 31)]  # column 0 is keyed by the root
    assert d.pool.get(11) == [(21, 32)]
    assert d.pool.get(12) == [(22, 33)]
    assert d.grid == [[20, 21, 22], [31, 32, 33]]  # first level dropped, new one appended
    # A step accepting one token (two emitted).
    draft = d.propose(state([40, 41, 42, 30, 5]))
    d.observe(draft, Verdict([0], [8, 9]), fake_output(draft, 8, [0, 0, 41, 42, 43]))
    if align:  # one column dropped per accepted token, refilled with prompt tokens
        assert d.grid[0][:2] == [32, 33] and d.grid[1][:2] == [42, 43]
        assert d.grid[0][2] in (40, 41, 42) and d.grid[1][2] in (40, 41, 42)
    else:
        assert d.grid == [[31, 32, 33], [41, 42, 43]]


def test_observe_waits_for_model_made_levels_before_collecting():
    d = drafter(level=4, window_size=2, guess_set_size=2)
    d.start([40, 41, 42])
    for step in range(4):
        draft = d.propose(state([40, 41, 42, *range(step + 1)]))
        before = {k: v[:] for k, v in d.pool.table.items()}
        d.observe(draft, Verdict([], [0]), fake_output(draft, 0, [0] * 5))
        assert (d.pool.table != before) == (step >= 2), step  # levels 1, 2 are model-made


# -- on a tiny model -----------------------------------------------------------------------


def test_window_rows_score_their_trajectories_and_leave_the_nodes_alone():
    backend, _ = tiny_pair(max_len=128)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (24,), generator=gen).tolist()
    prompt = prompt + prompt[:10]  # repeats, so the pool has candidates for the root
    d = drafter(level=4, window_size=3, guess_set_size=3)
    d.start(prompt)
    d.grid = [torch.randint(0, 97, (3,), generator=gen).tolist() for _ in range(3)]
    tokens = [*prompt, prompt[9]]
    draft = d.propose(state(tokens))
    assert len(draft) > 1 and len(draft.aux_tokens) == 8
    backend.prefill(torch.tensor(prompt))
    start = backend.cache_len
    ids, positions, mask = forward_rows(draft, tokens[-1], start, torch.device("cpu"))
    out = backend.forward(ids, positions, mask)
    n = len(draft)
    grid = [row[:] for row in d.grid]
    grid[0][0] = tokens[-1]
    for i, (lv, c) in enumerate(d.cells):
        # The cell's trajectory: root, level 0 up to column c, then down column c.
        context = [grid[0][j] for j in range(c + 1)] + [grid[k][c] for k in range(1, lv + 1)]
        alone = backend.forward(
            torch.tensor(context), torch.arange(start, start + len(context)), None
        )
        torch.testing.assert_close(out.logits[1 + n + i], alone.logits[-1], atol=1e-4, rtol=0)
    bare = Draft(draft.tokens, draft.tree)
    ids, positions, mask = forward_rows(bare, tokens[-1], start, torch.device("cpu"))
    without = backend.forward(ids, positions, mask)
    torch.testing.assert_close(out.logits[: n + 1], without.logits, atol=1e-4, rtol=0)


def run(backend, prompt: list[int], drafter, max_tokens: int) -> tuple[list[int], SpecDecodeStats]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    processor = LogitsProcessor(params, prompt, 97, [], torch.device("cpu"))
    stats = SpecDecodeStats()
    out = []
    for step in decode(backend, prompt, params, processor, drafter, RequestRandomness(0)):
        out += step.tokens
        if step.verified:
            stats.observe(step.num_draft_tokens, step.num_accepted)
    return out[:max_tokens], stats


@pytest.mark.parametrize(("level", "window", "align"), [(3, 4, False), (4, 3, True), (2, 3, False)])
def test_greedy_identity_through_the_engine_on_a_tiny_model(level, window, align):
    backend, _ = tiny_pair(max_len=20 + 120 + 1)  # the last steps have no room for the window
    prompt = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    plain, _ = run(backend, prompt, NoDrafter(), 120)
    d = drafter(level=level, window_size=window, guess_set_size=3, align_on_accept=align)
    fast, stats = run(backend, prompt, d, 120)
    assert fast == plain
    assert stats.num_accepted_tokens > 0  # random tiny models loop: the pool must catch it


def test_drafter_is_reset_per_request():
    d = drafter()
    d.start([1, 2, 3, 4])
    first = d.propose(state([1, 2, 3, 4, 1]))
    d.observe(first, Verdict([], [0]), fake_output(first, 0, [9] * len(first.aux_tokens)))
    d.start([1, 2, 3, 4])
    assert d.iterations == 0 and 9 not in d.pool.table
    again = d.propose(state([1, 2, 3, 4, 1]))
    assert (again.tokens, again.aux_tokens) == (first.tokens, first.aux_tokens)


@pytest.mark.parametrize("field", ["level", "window_size", "guess_set_size", "max_rows"])
def test_sizes_are_bounded(field):
    """A window of 2**63 levels once took all the machine's memory: sizes are bounded."""
    with pytest.raises(ValueError, match=field):
        Options(**{field: 2**63})
    with pytest.raises(ValueError, match=field):
        Options(**{field: True})
