"""The backend's cost curve t(k): seconds to score k new rows in one forward.

Speculation pays only when the expected tokens per step grow faster than t(k). On a CPU t(k)
is far from flat (design.md §6), so drafters are sized by it instead of by a fixed k. The curve
is measured once per model and machine (after a short and a long context: attention makes
extra rows dearer as the context grows; ~20 s) and cached on disk, in one JSON file that
concurrent processes update under a lock.
"""

from __future__ import annotations

import math
import platform
import time
import warnings
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from onepass.cache import CURVES_FILE, read_entries, store_entry
from onepass.models import cpu_kernels
from onepass.models.base import Backend

SIZES = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 17, 20, 24, 32, 48, 64)
# 16 -> 17: MKL's pack size; 48 and 64: the forwards a batch of requests shares
CONTEXTS = (256, 1024)  # committed tokens before the short and the long measurement


@dataclass(frozen=True)
class CostModel:
    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    """Forward time for each size (lower quartile), measured after a short committed context."""
    context: int = 0
    """That short context's length."""
    long_seconds: tuple[float, ...] | None = None
    """The same sizes after a long context (None: not measured). Attention's cost grows with
    the context, and the more so the more rows: on this CPU t(16) / t(1) is ~1.6 after 256
    tokens and ~2.0 after 1024."""
    long_context: int = 0

    def __call__(self, rows: int, context: int | None = None) -> float:
        """Seconds for `rows` after `context` committed tokens (None = the short context):
        linear in rows between measured sizes and in the context between the two contexts
        (extrapolated past the largest size and the long context, as attention is linear;
        a context below the short one costs the short curve: extrapolating down a long curve
        steeper than the short one, as a noisy measurement can make it, went below zero)."""
        short = _interpolate(self.sizes, self.seconds, rows)
        if context is None or self.long_seconds is None or context <= self.context:
            return short
        long = _interpolate(self.sizes, self.long_seconds, rows)
        return short + (long - short) * (context - self.context) / (
            self.long_context - self.context
        )

    def relative(self, rows: int) -> float:
        """t(rows) / t(1), after the short context."""
        return self(rows) / self.seconds[0]

    def as_dict(self) -> dict:
        return {
            "sizes": list(self.sizes),
            "seconds": list(self.seconds),
            "context": self.context,
            "long_seconds": None if self.long_seconds is None else list(self.long_seconds),
            "long_context": self.long_context,
        }

    @classmethod
    def from_dict(cls, entry: Any) -> CostModel:
        """The inverse of as_dict; ValueError saying what is wrong with a damaged entry."""
        if not isinstance(entry, dict):
            raise ValueError("not a JSON object")
        sizes, seconds = entry.get("sizes"), entry.get("seconds")
        context, long_context = entry.get("context", 0), entry.get("long_context", 0)
        long_seconds = entry.get("long_seconds")
        if not (isinstance(sizes, list) and sizes and all(_is_int(k, 1) for k in sizes)):
            raise ValueError("'sizes' is not a list of positive integers")
        if sorted(set(sizes)) != sizes:
            raise ValueError("'sizes' is not increasing")
        durations = {"seconds": seconds}
        if long_seconds is not None:
            durations["long_seconds"] = long_seconds
        for key, value in durations.items():
            if not (isinstance(value, list) and len(value) == len(sizes)):
                raise ValueError(f"{key!r} is not a list as long as 'sizes'")
            if not all(_is_number(t) and math.isfinite(t) and t > 0 for t in value):
                raise ValueError(f"{key!r} holds a value that is not a positive duration")
        if not (_is_int(context, 0) and _is_int(long_context, 0)):
            raise ValueError("'context' or 'long_context' is not a non-negative integer")
        if long_seconds is not None and long_context <= context:
            raise ValueError("'long_context' is not longer than 'context'")
        return cls(
            tuple(sizes),
            tuple(seconds),
            context,
            None if long_seconds is None else tuple(long_seconds),
            long_context,
        )


class LiveCost:
    """The measured curve, rescaled by the forwards decoding actually runs. The curve is
    measured once, on a machine whose speed drifts: on a shared host another tenant's memory
    traffic moved t(1) between 9 and 13 ms from one second to the next while t(16) moved far
    less, so the curve's shape, which prices every draft row, drifts too. Each observed forward
    pulls the ratio observed / measured at its size (shared between the two measured sizes
    around it) toward what it took; a size is read with its ratio."""

    def __init__(self, curve: CostModel, decay: float = 0.9) -> None:
        self.curve = curve
        self.decay = decay
        self.ratios = [1.0] * len(curve.sizes)

    def __call__(self, rows: int, context: int | None = None) -> float:
        ratio = sum(w * self.ratios[i] for i, w in self._weights(rows))
        return self.curve(rows, context) * ratio

    def observe(self, rows: int, context: int | None, seconds: float) -> None:
        """A forward of `rows` rows after `context` committed tokens took `seconds`."""
        ratio = seconds / self.curve(rows, context)
        for i, w in self._weights(rows):
            self.ratios[i] += (1 - self.decay) * w * (ratio - self.ratios[i])

    def _weights(self, rows: int) -> list[tuple[int, float]]:
        """The measured sizes around `rows`, each with its share (past the ends: the end)."""
        sizes = self.curve.sizes
        i = bisect_left(sizes, rows)
        if i == 0:
            return [(0, 1.0)]
        if i == len(sizes):
            return [(i - 1, 1.0)]
        share = (rows - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return [(i - 1, 1.0 - share), (i, share)]


def nodes_worth_sending(
    probabilities: Sequence[float], cost: Callable[..., float], context: int
) -> int:
    """How many draft nodes to send, given each node's chance of acceptance, best first (a
    prefix must be a tree): the count with the most expected tokens per second of the verifying
    forward, which holds the root and the nodes (a node adds its chance to the tokens a step
    emits). 0: none pays for its row."""
    best_rate, best, expected = 1.0 / cost(1, context), 0, 1.0
    for count, p in enumerate(probabilities, 1):
        expected += p
        rate = expected / cost(1 + count, context)
        if rate > best_rate:
            best_rate, best = rate, count
    return best


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interpolate(sizes: tuple[int, ...], secs: tuple[float, ...], rows: int) -> float:
    if rows <= sizes[0]:
        return secs[0]
    i = bisect_left(sizes, rows)
    if i == len(sizes):
        i -= 1
    k0, k1, t0, t1 = sizes[i - 1], sizes[i], secs[i - 1], secs[i]
    return t0 + (t1 - t0) * (rows - k0) / (k1 - k0)


def measure(
    backend: Backend,
    sizes: tuple[int, ...] = SIZES,
    context: int = CONTEXTS[0],
    reps: int = 11,
    long_context: int = CONTEXTS[1],
    progress: bool = False,
) -> CostModel:
    """Time forwards of k rows (tree-shaped: a chain, as any mask costs the same) after a
    `context`-token prefill, then after a `long_context` one (skipped if the backend has no
    room for it). Clobbers the backend's KV cache: call between requests. progress: a progress
    bar on stderr when it is a terminal."""
    context, long_context = measured_contexts(backend, sizes, context, long_context)
    passes = 1 if long_context <= context else 2
    with tqdm(
        total=passes * reps * len(sizes),
        desc="onepass: measuring forward cost (once per machine)",
        unit="forward",
        leave=False,
        disable=None if progress else True,  # None: only on a terminal
    ) as bar:
        short = _measure_at(backend, sizes, context, reps, bar.update)
        if passes == 1:
            return CostModel(tuple(sizes), short, context)
        measured = _measure_at(backend, sizes, long_context, reps, bar.update)
    # A long context never costs less than a short one: a dip is noise.
    long = tuple(max(a, b) for a, b in zip(short, measured, strict=True))
    return CostModel(tuple(sizes), short, context, long, long_context)


def measured_contexts(
    backend: Backend,
    sizes: tuple[int, ...] = SIZES,
    context: int = CONTEXTS[0],
    long_context: int = CONTEXTS[1],
) -> tuple[int, int]:
    """The short and long contexts `measure` can use: both clamped to the backend's room."""
    room = backend.max_len - max(sizes) - 1
    return max(1, min(context, room)), min(long_context, room)


def _measure_at(
    backend: Backend, sizes: tuple[int, ...], context: int, reps: int, tick: Callable[[], object]
) -> tuple[float, ...]:
    device = getattr(backend, "device", torch.device("cpu"))
    backend.prefill(torch.arange(context, device=device) % 1000 + 100)
    for _ in range(2):  # warm-up: first calls pay for allocation and thread start
        backend.forward(torch.full((1,), 5, device=device), torch.tensor([context]), None)
    times: dict[int, list[float]] = {k: [] for k in sizes}
    # Sizes interleaved within each repetition: a transient slowdown of a shared machine then
    # hits every size alike instead of bending the curve's shape. Up the sizes, then down: on
    # some CPUs a heavy forward slows the next ones for a while (docs/results/intel_xeon), so
    # each size follows its neighbours, as it would in decoding, not t(64).
    for rep in range(reps):
        for k in sizes if rep % 2 == 0 else sizes[::-1]:
            ids = torch.full((k,), 7, device=device)
            positions = torch.arange(context, context + k, device=device)
            start = time.perf_counter()
            backend.forward(ids, positions, None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
            tick()
    # The lower quartile, not the median: on a shared machine noise only ever slows a forward,
    # and a median taken while a neighbour is busy bends the curve (seen: t(2) / t(1) of 1.13
    # where quiet runs give 1.05).
    seconds = [sorted(times[k])[reps // 4] for k in sizes]
    # More rows never cost less: a dip is noise, and would lure drafters into larger trees.
    return tuple(accumulate(seconds, max))


def cached_cost_model(backend: Backend, key: str, cache_dir: Path) -> CostModel:
    """The measured curve for this model + machine, from `cache_dir` or measured now. A
    damaged file or entry is measured again (with a warning); concurrent processes each add
    their own entry."""
    backend_id = f"{type(backend).__name__}-{getattr(backend, 'revision', 0)}"
    ident = f"{key}|{backend_id}|{platform.processor() or platform.machine()}|{torch.__version__}"
    ident += f"|{torch.get_num_threads()}|{getattr(backend, 'dtype', '')}"
    # The CPU kernels' build: a build forced to AVX2 on an AVX-512 CPU, one with or without an
    # extension (VNNI), and every change to the kernels' sources have curves of their own.
    isa = getattr(backend, "isa", None)
    ident += f"|kernels {cpu_kernels.build_id(isa) if isa else None}"
    # Weights widened from their stored blocks make extra rows far dearer than float32 ones.
    ident += "|weights stored" if getattr(backend, "stored", False) else ""
    ident += "|int8" if getattr(backend, "int8", False) else ""
    # A half-precision KV cache reads half the bytes per cached token.
    ident += "|kv float16" if getattr(backend, "kv_dtype", None) == torch.float16 else ""
    # A small KV cache clamps the long context: such a curve must not serve a larger cache.
    ident += "|contexts {} {}".format(*measured_contexts(backend))
    path = cache_dir / CURVES_FILE
    curves, problem = read_entries(path)
    if problem:
        _warn(f"ignoring the damaged cost-curve file {path} ({problem}); measuring again")
    if ident in curves:
        try:
            return CostModel.from_dict(curves[ident])
        except ValueError as e:
            _warn(f"ignoring this model's damaged cost curve in {path} ({e}); measuring it again")
    model = measure(backend, progress=True)
    store_entry(path, ident, model.as_dict())
    return model


def _warn(message: str) -> None:
    warnings.warn(f"onepass: {message}", RuntimeWarning, stacklevel=3)
