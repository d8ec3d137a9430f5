"""The adaptive drafter's bookkeeping: counterfactual scoring, acceptance estimates and the
cost-aware choice of drafter and depth."""

from __future__ import annotations

from onepass.cost import CostModel
from onepass.drafters.auto import DepthStats, match_length
from onepass.drafters.base import DecodeState, Draft
from onepass.tree import Tree


def test_match_length_walks_the_tree_along_emitted_tokens():
    draft = Draft([5, 6, 7, 8], Tree((-1, 0, 0, 2)))  # 5 -> {6, 7 -> 8}
    assert match_length(draft, [5, 7, 8]) == (3, 3, False)  # whole branch matched
    assert match_length(draft, [5, 7, 9]) == (2, 3, False)  # level 3 tried and failed
    assert match_length(draft, [4]) == (0, 1, False)
    assert match_length(draft, [5]) == (1, 1, True)  # not enough emitted tokens yet
    assert match_length(Draft.empty(), [1, 2]) == (0, 0, False)


def test_depth_stats_decay_towards_evidence():
    stats = DepthStats(depth=4, decay=0.5, prior=0.5)
    assert stats.rate(1) == 0.5
    for _ in range(20):
        stats.update(matched=1, deepest_tried=2)  # depth 1 always accepted, depth 2 never
    assert stats.rate(1) > 0.99 and stats.rate(2) < 0.01
    assert stats.rate(3) == 0.5  # never tried: still the prior


class FakeAuto:
    """AutoDrafter's depth-cut search without building real drafters."""

    from onepass.drafters.auto import AutoDrafter

    _best_cut = AutoDrafter._best_cut
    _time = AutoDrafter._time

    def __init__(self, cost: CostModel) -> None:
        self.cost, self.time_scale, self.max_nodes = cost, 1.0, 16


def state(max_depth: int = 10) -> DecodeState:
    return DecodeState([1, 2, 3], 2, max_draft_tokens=32, max_depth=max_depth)


def test_cut_is_deep_when_rows_are_cheap_and_acceptance_high():
    flat = CostModel((1, 32), (1.0, 1.0))
    stats = DepthStats(8, 0.9, 0.9)
    chain = Draft.chain([1, 2, 3, 4, 5, 6])
    cut, value = FakeAuto(flat)._best_cut(chain, stats, state())
    assert len(cut) == 6 and value > 1.0


def test_cut_is_empty_when_speculation_cannot_pay():
    steep = CostModel((1, 2, 32), (1.0, 2.0, 32.0))  # each row costs as much as a step
    stats = DepthStats(8, 0.9, 0.3)
    _, value = FakeAuto(steep)._best_cut(Draft.chain([1, 2, 3]), stats, state())
    assert value < 1.0  # below plain decoding's 1 token / t(1): the caller keeps plain


def test_cut_respects_max_depth():
    flat = CostModel((1, 32), (1.0, 1.0))
    cut, _ = FakeAuto(flat)._best_cut(Draft.chain([1, 2, 3, 4]), DepthStats(8, 0.9, 0.9), state(2))
    assert len(cut) == 2
