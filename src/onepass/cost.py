"""The backend's cost curve t(k): seconds to score k new rows in one forward.

Speculation pays only when the expected tokens per step grow faster than t(k). On a CPU t(k)
is far from flat (design.md §6), so drafters are sized by it instead of by a fixed k. The curve
is measured once per model and machine (after a short and a long context: attention makes
extra rows dearer as the context grows; ~20 s) and cached on disk.
"""

from __future__ import annotations

import json
import platform
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
from tqdm import tqdm

from onepass.models.base import Backend

SIZES = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 17, 20, 24, 32)  # 16 -> 17: MKL's pack size
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
        (extrapolated past the largest size and the long context, as attention is linear)."""
        short = _interpolate(self.sizes, self.seconds, rows)
        if context is None or self.long_seconds is None:
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
    def from_dict(cls, entry: dict) -> CostModel:
        long_seconds = entry.get("long_seconds")
        return cls(
            tuple(entry["sizes"]),
            tuple(entry["seconds"]),
            entry.get("context", 0),
            None if long_seconds is None else tuple(long_seconds),
            entry.get("long_context", 0),
        )


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
    # hits every size alike instead of bending the curve's shape.
    for _ in range(reps):
        for k in sizes:
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
    """The measured curve for this model + machine, from `cache_dir` or measured now."""
    backend_id = f"{type(backend).__name__}-{getattr(backend, 'revision', 0)}"
    ident = f"{key}|{backend_id}|{platform.processor() or platform.machine()}|{torch.__version__}"
    ident += f"|{torch.get_num_threads()}|{getattr(backend, 'dtype', '')}"
    # A small KV cache clamps the long context: such a curve must not serve a larger cache.
    ident += "|contexts {} {}".format(*measured_contexts(backend))
    path = cache_dir / "cost_curves.json"
    curves = json.loads(path.read_text()) if path.exists() else {}
    if ident in curves:
        return CostModel.from_dict(curves[ident])
    model = measure(backend, progress=True)
    curves[ident] = model.as_dict()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(curves, indent=1))
    tmp.replace(path)
    return model
