"""The adaptive drafter's bookkeeping: counterfactual scoring, acceptance estimates, the merged
tree and the cost-aware choice of how much of it to score."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onepass.cost import CostModel, LiveCost
from onepass.draft import NODE_CLASSES, BatchShare, DecodeState, Draft, Verdict
from onepass.drafters.auto import (
    GATE_MAX_PAUSE,
    GATE_PLAIN_STEPS,
    GATE_PROBE,
    GATE_REMEASURE,
    GATE_SETTLE,
    GATE_WARMUP,
    MAX_SKIP,
    RUN_BOUNDS,
    RUN_PRIORS,
    AutoDrafter,
    Candidate,
    Estimates,
    MergedTree,
    NodeStats,
    Options,
    Pace,
    RateGate,
    predicted,
    run_state,
    slots,
    walk,
)
from onepass.drafters.base import Drafter
from onepass.tree import Tree


def test_walk_reports_every_child_tried_along_the_emitted_tokens():
    draft = Draft([5, 6, 7, 8], Tree((-1, 0, 0, 2)))  # 5 -> {6, 7 -> 8}
    assert walk(draft, [5, 7, 8]) == [(1, 0, True), (2, 0, False), (2, 1, True), (3, 0, True)]
    assert walk(draft, [5, 7, 9]) == [(1, 0, True), (2, 0, False), (2, 1, True), (3, 0, False)]
    assert walk(draft, [4]) == [(1, 0, False)]
    assert walk(draft, [5]) is None  # not enough emitted tokens yet
    assert walk(Draft.empty(), [1, 2]) == []


def test_slots_are_sibling_ranks_unless_the_drafter_classes_its_nodes():
    tree = Tree((-1, -1, 0, 0, -1, 2))
    assert slots(Draft([1] * 6, tree)) == [0, 1, 0, 1, 2, 0]
    assert slots(Draft([1] * 6, tree, classes=[5, 4, 3, 2, 1, 0])) == [5, 4, 3, 2, 1, 0]
    assert walk(Draft([7, 8], Tree((-1, -1)), classes=[9, 2]), [8]) == [(1, 9, False), (1, 2, True)]


def test_node_stats_decay_towards_evidence_per_depth_and_slot():
    stats = NodeStats.for_ranks(decay=0.5, prior=0.5)
    assert stats.rate(1, 0) == 0.5 and stats.rate(1, 1) == 0.25  # prior halves per rank
    classed = NodeStats.for_classes(decay=0.5, prior=0.5)
    assert {classed.rate(1, c) for c in range(NODE_CLASSES)} == {0.5}  # one prior per class
    for _ in range(20):
        stats.update(1, 0, True)
        stats.update(1, 1, False)
        stats.update(2, 0, False)
    assert stats.rate(1, 0) > 0.99 and stats.rate(1, 1) < 0.01 and stats.rate(2, 0) < 0.01
    assert stats.rate(3, 0) == 0.5  # never tried: still the prior
    assert stats.rate(99, 0) == stats.rate(8, 0)  # deeper nodes share the last estimate


def stats_with(rates: dict[tuple[int, int], float]) -> NodeStats:
    stats = NodeStats.for_ranks(decay=0.5, prior=0.5)
    for (d, r), rate in rates.items():
        stats.tried[d][r], stats.accepted[d][r] = 1.0, rate
    return stats


def test_merged_tree_shares_common_paths_and_keeps_the_best_estimate():
    merged = MergedTree()
    merged.add(Draft.chain([5, 6, 7]), stats_with({(1, 0): 0.5, (2, 0): 0.5, (3, 0): 0.5}), "a")
    merged.add(Draft([5, 9, 6], Tree((-1, -1, 0))), stats_with({(1, 0): 0.8, (1, 1): 0.1}), "b")
    assert merged.tokens == [5, 6, 7, 9] and merged.parents == [-1, 0, 1, -1]
    assert merged.rates[0] == 0.8  # token 5 at depth 1: the better of 0.5 and 0.8
    assert merged.sources == ["b", "a", "a", "b"]  # and who gave that estimate
    assert merged.probabilities() == [0.8, 0.8 * 0.5, 0.8 * 0.5 * 0.5, 0.1]
    order = [node for node, _ in merged.best_first(max_depth=8)]
    assert order == [0, 1, 2, 3]
    assert [node for node, _ in merged.best_first(max_depth=1)] == [0, 3]
    draft = merged.draft([0, 1, 3])
    assert draft.tokens == [5, 6, 9] and draft.tree.parents == (-1, 0, -1)
    assert draft.sources == ["b", "a", "b"]


@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 3), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=30,
    )
)
def test_every_best_first_prefix_is_a_tree(spec):
    """Random trees with random estimates: any prefix of the ranking keeps every parent."""
    parents = tuple(p % (i + 1) - 1 for i, (p, _, _) in enumerate(spec))
    tokens = [t for _, t, _ in spec]
    stats = NodeStats.for_ranks(decay=0.5, prior=0.5)
    for i, (_, _, rate) in enumerate(spec):
        d, r = min(i, 8), i % 8
        stats.tried[d][r], stats.accepted[d][r] = 1.0, rate
    merged = MergedTree()
    merged.add(Draft(tokens, Tree(parents)), stats, "a")
    ranked = [node for node, _ in merged.best_first(max_depth=99)]
    assert sorted(ranked) == list(range(len(merged.tokens)))
    for n in range(len(ranked) + 1):
        merged.draft(ranked[:n])  # raises if a kept node's parent is missing


def bare_auto(cost: CostModel) -> AutoDrafter:
    """AutoDrafter's cut search without candidate drafters."""
    return AutoDrafter(Options(), {}, cost, max_nodes=16)


def state(max_depth: int = 10, context: int = 3) -> DecodeState:
    return DecodeState([1] * context, 2, max_draft_tokens=32, max_depth=max_depth)


def chain_tree(n: int, rate: float) -> MergedTree:
    merged = MergedTree()
    chain = Draft.chain(list(range(10, 10 + n)))
    merged.add(chain, stats_with({(d, 0): rate for d in range(9)}), "a")
    return merged


def test_draft_is_deep_when_rows_are_cheap_and_acceptance_high():
    flat = CostModel((1, 32), (1.0, 1.0))
    assert len(bare_auto(flat).best_draft(chain_tree(6, 0.9), state())[0]) == 6


def test_draft_is_empty_when_speculation_cannot_pay():
    steep = CostModel((1, 2, 32), (1.0, 2.0, 32.0))  # each row costs as much as a step
    assert len(bare_auto(steep).best_draft(chain_tree(3, 0.3), state())[0]) == 0


def test_draft_stops_where_the_next_node_costs_more_than_it_brings():
    # t(k) = 1 + 0.1 (k - 1); node probabilities 0.5, 0.25, 0.125, ...: E(N) / t(1 + N) is
    # 1, 1.36, 1.46, 1.44 for N = 0..3, so two nodes.
    linear = CostModel((1, 32), (1.0, 4.1))
    assert len(bare_auto(linear).best_draft(chain_tree(8, 0.5), state())[0]) == 2


def test_draft_is_shorter_after_a_long_context():
    # Flat after 100 tokens; after 1100, t(k) = 1 + 0.1 (k - 1) as above: two nodes.
    curve = CostModel((1, 32), (1.0, 1.0), 100, (1.0, 4.1), 1100)
    assert len(bare_auto(curve).best_draft(chain_tree(8, 0.5), state(context=100))[0]) == 8
    assert len(bare_auto(curve).best_draft(chain_tree(8, 0.5), state(context=1100))[0]) == 2


def test_drafts_follow_the_curve_as_the_forwards_rescale_it():
    # The curve says t(k) = 1 + 0.05 (k - 1); in the loop, multi-row forwards take 1.3x that.
    curve = CostModel((1, 2, 3, 4, 32), (1.0, 1.05, 1.1, 1.15, 2.55))
    live = LiveCost(curve)
    auto = bare_auto(live)
    assert len(auto.best_draft(chain_tree(8, 0.3), state())[0]) == 2  # E / t: 1.24, 1.26, 1.23
    for _ in range(60):
        live.observe(1, 3, curve(1))  # one-row forwards: as the curve says
        for rows in (2, 3, 4):
            live.observe(rows, 3, 1.3 * curve(rows))
    assert live(1) == pytest.approx(1.0) and live(3) == pytest.approx(1.3 * 1.1, rel=1e-3)
    # 0.3-likely nodes no longer pay for rows 30% dearer than the curve's.
    assert len(auto.best_draft(chain_tree(8, 0.3), state())[0]) == 0


def test_draft_respects_max_depth_and_the_row_limit():
    flat = CostModel((1, 32), (1.0, 1.0))
    assert len(bare_auto(flat).best_draft(chain_tree(4, 0.9), state(2))[0]) == 2
    auto = bare_auto(flat)
    auto.max_nodes = 3
    assert len(auto.best_draft(chain_tree(6, 0.9), state())[0]) == 3


def test_draft_classes_are_checked():
    with pytest.raises(ValueError, match="classes"):
        Draft([1, 2], Tree.chain(2), classes=[0])
    with pytest.raises(ValueError, match="classes"):
        Draft([1], Tree.chain(1), classes=[NODE_CLASSES])


def test_options_reject_drafters_that_cannot_be_merged():
    with pytest.raises(ValueError, match="methods must be drafters among"):
        Options(methods=["suffix", "lookahead"])  # its window rows are not tree nodes
    with pytest.raises(ValueError, match="methods must be drafters among"):
        Options(methods=[])
    assert Options(methods=["recycling"]).methods == ["recycling"]


def test_predicted_counts_the_emitted_tokens_a_draft_foresaw():
    draft = Draft([5, 6, 7, 8], Tree((-1, 0, 0, 2)))  # 5 -> {6, 7 -> 8}
    assert predicted(draft, [5, 7, 8, 1]) == 3  # the path ended: everything it proposed was right
    assert predicted(draft, [5, 7]) == 2  # the path outlasts the emitted tokens
    assert predicted(draft, [5, 9]) is None  # a wrong token before the path ended
    assert predicted(draft, [4]) is None
    assert predicted(draft, []) == 0


def test_a_drafter_run_grows_while_it_predicts_and_restarts_on_a_miss():
    c = Candidate(drafter=None, estimates=Estimates(Options()))  # type: ignore[arg-type]
    c.latest = Draft.chain([1, 2, 3])
    c.record([1, 2, 3, 4])
    assert c.run == 3 and run_state(c.run) == run_state(3)
    c.latest = Draft.chain([5, 6])
    c.record([5, 6])
    assert c.run == 5
    c.latest = Draft.chain([7, 9])
    c.record([7, 8])  # 9 was wrong
    assert c.run == 0 and run_state(0) == 0
    c.latest = Draft.empty()
    c.record([1])
    assert c.run == 0
    assert run_state(RUN_BOUNDS[-1]) == len(RUN_BOUNDS)  # the longest runs: the last set


def test_estimates_are_kept_apart_per_run_state():
    """A drafter that is right while copying and wrong otherwise: the two states learn
    different rates from the same drafter's proposals."""
    c = Candidate(drafter=None, estimates=Estimates(Options()))  # type: ignore[arg-type]
    copying, fresh = len(RUN_BOUNDS), 0
    emitted = [1, 2, 3, 4, 5, 6] * 20
    for i in range(0, 100, 3):
        c.pending.append((i, Draft.chain(emitted[i : i + 3]), copying))  # right
        c.pending.append((i, Draft.chain([99, 98, 97]), fresh))  # wrong
    AutoDrafter._score_pending(c, emitted, 0)
    draft = Draft.chain([1])
    right, wrong = c.estimates.stats(draft, copying), c.estimates.stats(draft, fresh)
    assert right.rate(1, 0) > 0.9 and right.rate(3, 0) > 0.9
    assert wrong.rate(1, 0) < 0.1
    assert wrong.rate(2, 0) == 0.5  # never reached: still the prior
    assert not c.pending  # every proposal could be scored


def test_a_drafter_on_a_run_is_presumed_right_until_evidence_says_otherwise():
    estimates = Estimates(Options(prior_acceptance=0.5))
    chain, classed = Draft.chain([1]), Draft([1], Tree((-1,)), classes=[3])
    priors = [estimates.stats(chain, s).rate(1, 0) for s in range(len(RUN_BOUNDS) + 1)]
    assert priors == [max(0.5, p) for p in RUN_PRIORS] and priors[0] == 0.5 < priors[-1]
    assert estimates.stats(chain, len(RUN_BOUNDS)).rate(1, 1) == priors[-1] / 2  # halved per rank
    confident = Estimates(Options(prior_acceptance=0.95))
    assert {confident.stats(classed, s).rate(4, 3) for s in range(len(RUN_BOUNDS) + 1)} == {0.95}


def test_a_draft_reports_the_rate_it_must_beat_and_the_time_its_rows_add():
    # t(k) = 1 + 0.1 (k - 1), nodes 0.5, 0.25: two nodes, against plain decoding's one token
    # per second; their rows add 0.2 seconds.
    linear = CostModel((1, 32), (1.0, 4.1))
    draft, rate, added = bare_auto(linear).best_draft(chain_tree(8, 0.5), state())
    assert len(draft) == 2
    assert rate == pytest.approx(1.0) and added == pytest.approx(0.2)
    merged = chain_tree(2, 0.9)
    merged.add(Draft([20], Tree((-1,))), stats_with({(1, 0): 0.3}), "b")  # a sibling of 10
    flat = CostModel((1, 32), (1.0, 1.0))
    draft, rate, added = bare_auto(flat).best_draft(merged, state())
    assert draft.sources == ["a", "a", "b"] and added == 0.0


def test_a_pause_doubles_while_proposing_does_not_pay_and_ends_when_it_does():
    pace = Pace()
    pauses = []
    for _ in range(6):
        pace.update(-1.0)
        pauses.append(pace.skip)
        while pace.paused():
            pass
    assert pauses == [1, 2, 4, 8, MAX_SKIP, MAX_SKIP]
    pace.update(30.0)  # the mean turns positive: no pause
    assert pace.worth > 0 and not pace.paused()
    pace.update(-1.0)
    assert pace.worth > 0 and not pace.paused()  # one poor step does not outweigh a good run


class CountingDrafter(Drafter):
    """Proposes the same chain every step and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def start(self, prompt_ids):
        pass

    def propose(self, state):
        self.calls += 1
        return Draft.chain([5, 6, 7])

    def observe(self, draft, verdict, out):
        pass


SHARED = BatchShare(rows=1, tokens=1.0)  # one other request in the forward


def proposals(auto, drafter, steps: int, accept: int = 0, batch=SHARED) -> list[int]:
    """The steps at which `drafter` was asked to propose, each step's draft verified with its
    first `accept` nodes accepted (a chain's), in a forward shared with another request."""
    out = []
    for step in range(steps):
        before = drafter.calls
        draft = auto.propose(DecodeState([1] * 3, 2, 32, 10, batch=batch))
        if drafter.calls > before:
            out.append(step)
        path = list(range(min(accept, len(draft))))
        auto.observe(draft, Verdict(path, [*(draft.tokens[i] for i in path), 99]), None)
    return out


def test_a_request_whose_drafting_does_not_pay_its_time_pauses_it():
    counting = CountingDrafter()
    auto = AutoDrafter(Options(), {"ngram": counting}, CostModel((1, 32), (1.0, 1.0)), 16)
    auto.start([1, 2, 3])
    auto.learned.draft_time = 100.0  # far more than any draft can save
    assert proposals(auto, counting, 20, accept=3) == [0, 2, 5, 10, 10 + MAX_SKIP + 1]
    auto.start([1, 2, 3])  # a new request starts without a pause of its own ...
    auto.learned.batch_pace = Pace()  # ... (what the batch learned is shared: see below)
    assert proposals(auto, counting, 1) == [0]
    auto.start([1, 2, 3])  # alone, Pace does not pause it (its wins are bursty): the clock
    # does (RateGate), and here no token is ever emitted, so plain decoding's rate stays
    # unmeasured after the warm-up
    assert proposals(auto, counting, 12, accept=3, batch=None) == list(range(GATE_WARMUP))


def gate_steps(
    gate: RateGate, steps: int, draft_ms: float, plain_ms: float, after_ms: float = 0.0
) -> list[bool]:
    """Each step's choice, one token per plain step and two per drafting step, each taking
    the given milliseconds per token, and any step after_ms more while one of the
    GATE_SETTLE steps before it drafted (the after-effect of a forward of several rows)."""
    now, emitted, chosen = 0.0, 0, []
    for _ in range(steps):
        drafting = gate.drafts(now, emitted)
        tokens = 2 if drafting else 1
        emitted += tokens
        now += tokens * (draft_ms if drafting else plain_ms) / 1000
        now += after_ms / 1000 if any(chosen[-GATE_SETTLE:]) else 0.0
        chosen.append(drafting)
    return chosen


def test_the_rate_gate_pauses_drafting_that_is_slower_by_the_clock():
    """Drafting at 3 ms a token against plain decoding's 2: after the warm-up and a sample of
    plain decoding, drafting pauses for 1, 2, 4, ... steps (up to GATE_MAX_PAUSE), with
    GATE_PROBE drafting steps between pauses to measure it again."""
    chosen = gate_steps(RateGate(), 400, draft_ms=3.0, plain_ms=2.0)
    sample = GATE_SETTLE + GATE_PLAIN_STEPS
    first = GATE_WARMUP + sample
    assert chosen[:first] == [True] * GATE_WARMUP + [False] * sample
    assert sum(chosen[200:]) < 0.25 * 200  # mostly plain decoding
    pauses, run = [], 0
    for c in chosen[first:]:
        if not c:
            run += 1
        elif run:
            pauses.append(run)
            run = 0
    assert max(pauses) <= GATE_MAX_PAUSE + sample
    assert pauses[:3] == sorted(pauses[:3])


def test_the_rate_gate_charges_drafting_for_the_steps_it_slows():
    """Drafting steps at 1.8 ms a token against plain decoding's 2, but each step within
    GATE_SETTLE of a drafting step 1 ms slower: drafting every step costs 2.3 ms a token.
    Plain steps measured while still slowed (3 ms) would make drafting look the faster."""
    chosen = gate_steps(RateGate(), 400, draft_ms=1.8, plain_ms=2.0, after_ms=1.0)
    assert sum(chosen[200:]) < 0.25 * 200
    assert sum(gate_steps(RateGate(), 400, draft_ms=1.8, plain_ms=2.0)[200:]) > 0.8 * 200


def test_the_rate_gate_keeps_drafting_that_pays():
    """Drafting at 1 ms a token against 2: it drafts every step except plain decoding's
    samples (GATE_SETTLE + GATE_PLAIN_STEPS every GATE_REMEASURE steps)."""
    steps = 4 * GATE_REMEASURE
    chosen = gate_steps(RateGate(), steps, draft_ms=1.0, plain_ms=2.0)
    sample = GATE_SETTLE + GATE_PLAIN_STEPS
    assert steps - sum(chosen) <= sample * (steps // GATE_REMEASURE + 1)
    assert all(chosen[:GATE_WARMUP]) and GATE_PROBE <= GATE_WARMUP


def test_what_the_batch_learned_pauses_a_new_request_in_a_shared_forward():
    """Drafting that did not pay in shared forwards keeps the next request's drafts there out
    of the forward at once (Learned.batch_pace), though its own record is clean; not alone."""
    counting = CountingDrafter()
    flat = CostModel((1, 32), (1.0, 1.0))
    auto = AutoDrafter(Options(), {"ngram": counting}, flat, 16)

    def first_draft(learned, batch):
        request = AutoDrafter(Options(), {"ngram": counting}, flat, 16, learned)
        request.start([1, 2, 3])
        return request.propose(DecodeState([1] * 3, 2, 32, 10, batch=batch))

    assert len(first_draft(auto.learned, SHARED)) == 3  # nothing learned yet: drafts sent
    auto.start([1, 2, 3])
    auto.learned.draft_time = 100.0
    proposals(auto, counting, 12, accept=3)
    assert not auto.learned.batch_pace.active
    assert len(first_draft(auto.learned, SHARED)) == 0  # paused, or a probe
    assert len(first_draft(auto.learned, None)) == 3


def test_drafting_that_delivers_nothing_turns_to_probes_until_a_probe_would_have_paid():
    """Drafts that are never accepted stop reaching the forward: later proposals are probes,
    scored against the emitted tokens only. Once the output follows a probe's draft, drafting
    resumes."""

    class Cycling(CountingDrafter):
        """Proposes the next three tokens of the cycle 5, 6, 7, 8 after the root."""

        def propose(self, state):
            self.calls += 1
            last = state.tokens[-1]
            start = (last - 4) % 4 if last in (5, 6, 7, 8) else 0
            return Draft.chain([5 + (start + i) % 4 for i in range(3)])

    counting = Cycling()
    linear = CostModel((1, 32), (1.0, 4.1))  # a row costs a tenth of a step
    auto = AutoDrafter(Options(), {"ngram": counting}, linear, 16)
    tokens = [1, 2, 3]
    auto.start(tokens)

    def step(emitted: int) -> bool:
        draft = auto.propose(DecodeState(list(tokens), 2, 32, 10, batch=SHARED))
        auto.observe(draft, Verdict([], [emitted]), None)  # nothing accepted
        tokens.append(emitted)
        return len(draft) > 0

    sent = [step(99) for _ in range(40)]
    assert sent[0] and sum(sent) <= 12 and not any(sent[-20:])
    assert counting.calls < 25  # then probes, at growing intervals
    resumed = False
    for emitted in [5, 6, 7, 8] * 10:  # the output now runs along the drafter's chain
        if step(emitted):
            resumed = True
            break
    assert resumed


def test_a_drafter_whose_nodes_are_not_worth_its_time_pauses_alone():
    """Two drafters propose the same chain; the second's nodes add nothing (the first's
    estimate wins each merged node, and with it the accepted tokens) and it is slow: it
    pauses, the first goes on."""
    fast, slow = CountingDrafter(), CountingDrafter()
    flat = CostModel((1, 32), (1.0, 1.0))
    auto = AutoDrafter(Options(), {"ngram": fast, "suffix": slow}, flat, 16)
    auto.start([1, 2, 3])
    auto.learned.estimates["suffix"].propose_time = 100.0
    before = fast.calls
    assert proposals(auto, slow, 20, accept=3) == [0, 2, 5, 10, 10 + MAX_SKIP + 1]
    assert fast.calls - before == 20
