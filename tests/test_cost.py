"""The cost curve t(k): measured, cached per backend revision, never decreasing."""

from __future__ import annotations

import time

import torch

from onepass.cost import cached_cost_model, measure


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


def test_curve_is_cached_per_backend_revision(tmp_path):
    backend = SleepyBackend()
    first = cached_cost_model(backend, "m", tmp_path)
    calls = backend.calls
    assert cached_cost_model(backend, "m", tmp_path) == first and backend.calls == calls
    backend.revision = 2  # a backend change: measured anew
    cached_cost_model(backend, "m", tmp_path)
    assert backend.calls > calls
