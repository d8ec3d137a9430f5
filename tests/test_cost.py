"""The cost curve t(k): measured, cached per backend revision, never decreasing."""

from __future__ import annotations

import time

import pytest
import torch

from onepass.cost import (
    SIZES,
    CostModel,
    LiveCost,
    cached_cost_model,
    measure,
    nodes_worth_sending,
)


class SleepyBackend:
    """Forward of k rows sleeps a scripted time; 4 rows is 'faster' than 2 (noise)."""

    max_len = 64
    revision = 1

    def __init__(self) -> None:
        self.calls = 0
        self.delays = {1: 0.004, 2: 0.012, 4: 0.006}

    def prefill(self, ids: torch.Tensor) -> None:
        pass

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> None:
        self.calls += 1
        time.sleep(self.delays.get(ids.shape[0], 0.0005 * ids.shape[0]))


def test_measured_curve_never_decreases():
    curve = measure(SleepyBackend(), sizes=(1, 2, 4), context=8, reps=3)
    assert curve.seconds[0] < curve.seconds[1]
    assert curve.seconds[2] == curve.seconds[1]  # the dip at 4 rows is lifted to t(2)


class HangoverBackend:
    """On a fake clock: a forward of k rows takes k ms, plus a hangover of 10 ms from a
    preceding forward at least 8 rows larger (a CPU slowed by heavy arithmetic, recovering)."""

    max_len = 100

    def __init__(self) -> None:
        self.now, self.last = 0.0, 1

    def clock(self) -> float:
        return self.now

    def prefill(self, ids: torch.Tensor) -> None:
        pass

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> None:
        k = ids.shape[0]
        self.now += 0.001 * k + (0.010 if self.last >= k + 8 else 0.0)
        self.last = k


def test_a_size_is_measured_after_its_neighbours_not_after_the_largest(monkeypatch):
    """Repetitions alternate up and down the sizes: measured in one direction only, every
    repetition but the first would time 1 row right after 64, and price it 11 ms."""
    backend = HangoverBackend()
    monkeypatch.setattr("onepass.cost.time.perf_counter", backend.clock)
    curve = measure(backend, sizes=SIZES, context=8, reps=5, long_context=8)
    assert curve.seconds == pytest.approx([0.001 * k for k in SIZES])


class AttentionBackend:
    """A forward of k rows after c cached tokens sleeps 1 ms + k * c * 5 us."""

    max_len = 200

    def prefill(self, ids: torch.Tensor) -> None:
        self.context = ids.shape[0]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> None:
        time.sleep(0.001 + ids.shape[0] * self.context * 5e-6)


def test_curve_is_measured_after_a_short_and_a_long_context():
    curve = measure(AttentionBackend(), sizes=(1, 4), context=20, reps=3, long_context=1000)
    assert (curve.context, curve.long_context) == (20, 195)  # clamped to the backend's room
    assert curve.long_seconds[1] - curve.long_seconds[0] > 2 * (curve.seconds[1] - curve.seconds[0])
    assert curve(4, 195) > curve(4, 20) == curve(4)
    small = measure(AttentionBackend(), sizes=(1, 4), context=20, reps=1, long_context=10)
    assert small.long_seconds is None and small(4, 500) == small(4)


def test_cost_is_linear_in_rows_and_context():
    curve = CostModel((1, 5), (1.0, 2.0), 100, (2.0, 6.0), 300)
    assert curve(3) == 1.5
    assert curve(3, 100) == 1.5 and curve(3, 300) == 4.0
    assert curve(3, 200) == 2.75  # halfway between the contexts
    assert curve(3, 500) == 6.5  # extrapolated: attention is linear in the context
    assert curve(9, 300) == 10.0  # and past the largest size
    assert CostModel.from_dict(curve.as_dict()) == curve
    old = {"sizes": [1, 5], "seconds": [1.0, 2.0]}  # a cache entry without a long curve
    assert CostModel.from_dict(old)(3, 1000) == 1.5


def test_a_context_below_the_short_one_costs_the_short_curve():
    """Extrapolating down a long curve much steeper than the short one (a noisy measurement)
    once priced rows below zero, and drafts looked free."""
    curve = CostModel((1, 64), (0.003, 0.05), 256, (0.012, 0.14), 1024)
    assert curve(300, 0) == curve(300, 100) == curve(300) > 0


def test_prompt_forwards_do_not_rescale_the_live_curve(llm):
    """A prompt chunk's rows skip the LM head: they cost less than the curve's forwards, and
    must not teach it that rows are cheap."""
    from onepass import SamplingParams

    live = llm._live_cost_model()
    before = list(live.ratios)
    request = llm.request("Count: one, two, three,", SamplingParams(max_tokens=2))
    llm.step([request])  # the prompt, in one chunk
    assert live.ratios == before
    llm.step([request])  # a decoding step
    assert live.ratios != before


def test_curve_is_cached_per_backend_revision(tmp_path):
    backend = SleepyBackend()
    first = cached_cost_model(backend, "m", tmp_path)
    calls = backend.calls
    assert cached_cost_model(backend, "m", tmp_path) == first and backend.calls == calls
    backend.revision = 2  # a backend change: measured anew
    cached_cost_model(backend, "m", tmp_path)
    assert backend.calls > calls


def test_a_curve_measured_in_a_small_cache_is_not_reused_by_a_larger_one(tmp_path):
    class InstantBackend(AttentionBackend):
        def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> None:
            pass

    small, large = InstantBackend(), InstantBackend()
    room = max(SIZES) + 1  # rows the measurement needs past its context
    small.max_len, large.max_len = 300 + room, 400 + room  # long context clamped to 300, 400
    first = cached_cost_model(small, "m", tmp_path)
    second = cached_cost_model(large, "m", tmp_path)
    assert (first.long_context, second.long_context) == (300, 400)
    assert cached_cost_model(small, "m", tmp_path) == first  # each keeps its own entry


def test_a_curve_measured_on_float32_weights_does_not_serve_stored_ones(tmp_path):
    backend = SleepyBackend()
    cached_cost_model(backend, "m", tmp_path)
    calls = backend.calls
    backend.stored = True  # the same model, its weights widened from their GGUF blocks
    cached_cost_model(backend, "m", tmp_path)
    assert backend.calls > calls


def test_the_live_curve_learns_each_size_from_the_forwards_run_there():
    curve = CostModel((1, 8, 16), (1.0, 1.2, 1.6))
    live = LiveCost(curve)
    assert [live(k) for k in (1, 8, 12, 40)] == [curve(k) for k in (1, 8, 12, 40)]
    for _ in range(100):
        live.observe(12, None, 2 * curve(12))  # between 8 and 16: both learn
    assert live(1) == curve(1)  # a size never run keeps its measurement
    assert live(8) == pytest.approx(2 * curve(8), rel=0.01)
    assert live(16) == pytest.approx(2 * curve(16), rel=0.01)
    assert live(12) == pytest.approx(2 * curve(12), rel=0.01)
    for _ in range(100):
        live.observe(400, None, 0.5 * curve(400))  # past the largest size: that size learns
    assert live(16) == pytest.approx(0.5 * curve(16), rel=0.01)
    assert live(8) == pytest.approx(2 * curve(8), rel=0.01)


def test_nodes_are_sent_while_their_chances_pay_for_their_rows():
    chances = [0.9, 0.5, 0.05]
    # t(1 + k) = 1 + 0.2 k: 1, 1.9 / 1.2, 2.4 / 1.4 (best), 2.45 / 1.6 tokens per second
    assert nodes_worth_sending(chances, lambda rows, context: 1 + 0.2 * (rows - 1), 0) == 2
    assert nodes_worth_sending(chances, lambda rows, context: 1.0, 0) == 3  # free rows
    assert nodes_worth_sending(chances, lambda rows, context: float(rows), 0) == 0
    assert nodes_worth_sending([], lambda rows, context: 1.0, 0) == 0
