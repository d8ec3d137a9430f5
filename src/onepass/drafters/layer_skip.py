"""Self-speculation by layer skipping (Draft & Verify, Zhang et al. 2023, arXiv 2309.08168;
SWIFT, Xia et al. 2024, arXiv 2410.06916; LayerSkip's early exit, Elhoushi et al. 2024).

The target drafts for itself with a subset of its own layers, then its final norm and LM head:
no training, no second copy of the weights. The draft decoder shares the target's packed
weights (NativeDecoder.subset) and keeps its own KV cache, and drafts, samples and rolls back
exactly as a draft model does (drafters/draft_model.py): chains sampled from its warped
distribution carry their probabilities, so verification keeps the target's distribution.

Which layers are skipped is measured, not hand-set (unless `layers` is given). A calibration
decodes a few built-in prompts greedily with the target, then teacher-forces that text through
candidate subsets and measures
- how often a subset's argmax is the target's (α: a proxy for its draft tokens' acceptance),
- how long a one-row forward of the subset takes against the target's (c).
Layers are dropped in the order in which dropping each one alone costs least agreement (the
middle layers are the most redundant, as SWIFT observes); each prefix of that order is a
candidate skip set, and the pair (set, chain length γ) with the most expected tokens per unit
of time, E / (γ c + t(γ + 1) / t(1)) with E = (1 - α^(γ + 1)) / (1 - α), wins. The result is
cached per model and machine (layer_skip.json in the cache directory): the calibration takes
about 12 s on the default model, once.
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import suppress
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from onepass.cache import read_entries, store_entry
from onepass.drafters.draft_model import DraftModelDrafter
from onepass.errors import InputError
from onepass.models.base import Rows

CALIBRATION_FILE = "layer_skip.json"
MAX_CHAIN = 8  # longest chain the calibration considers
LEAST_AGREEMENT = 0.2  # stop dropping layers once the draft agrees with the target less often


@dataclass
class Options:
    layers: list[int] | None = None
    """The layers the draft runs (ascending indices); None: chosen by the calibration."""
    min_confidence: float = 0.0
    """Stop the chain after a token the draft gave less than this probability (0: never)."""
    calibration_prompts: int = 3
    """Built-in prompts the calibration decodes (greedy) and teacher-forces."""
    calibration_tokens: int = 64
    """Tokens decoded per calibration prompt."""

    def __post_init__(self) -> None:
        if self.layers is not None and (
            not isinstance(self.layers, list)
            or not self.layers
            or not all(isinstance(x, int) for x in self.layers)
            or self.layers != sorted(set(self.layers))
            or self.layers[0] < 0
        ):
            raise ValueError("layers must be a non-empty ascending list of layer indices")
        if not 0 <= self.min_confidence < 1:
            raise ValueError(f"min_confidence must be in [0, 1), got {self.min_confidence}")
        for name, high in (("calibration_prompts", 16), ("calibration_tokens", 256)):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in 1..{high}, got {value!r}")


@dataclass
class Calibration:
    """The chosen draft, and what was measured of it."""

    layers: list[int]
    chain: int
    """Draft tokens per step (γ)."""
    agreement: float
    """α: how often the draft's argmax was the target's, teacher-forced on the target's text."""
    step_cost: float
    """c: a one-row forward of the draft / of the target."""
    speedup: float
    """The expected tokens per unit of time against plain decoding (below 1: it cannot pay)."""
    tried: list[dict[str, Any]]
    """Every skip set measured: skipped layers, the one dropped last, α, c."""


def expected_speedup(agreement: float, step_cost: float, chain: int, cost: Any) -> float:
    """E / (γ c + t(γ + 1) / t(1)), E the expected tokens of a γ-token chain at agreement α."""
    full = agreement >= 1.0
    tokens = chain + 1.0 if full else (1 - agreement ** (chain + 1)) / (1 - agreement)
    return tokens / (chain * step_cost + cost(chain + 1) / cost(1))


def calibration_ids(backend: Any, tokenizer: Any, prompts: int, tokens: int) -> list[list[int]]:
    """Built-in prompts, each followed by the target's greedy continuation of it."""
    text = resources.files("onepass").joinpath("data/prompts.jsonl").read_text()
    texts = [json.loads(line)["turns"][0] for line in text.splitlines()[:prompts]]
    out = []
    for prompt in texts:
        ids = list(tokenizer.encode(prompt))
        decoder = backend.fork(len(ids) + tokens + 1)
        logits = decoder.prefill(torch.tensor(ids)).logits[-1]
        for _ in range(tokens):
            ids.append(int(torch.argmax(logits)))
            position = torch.tensor([len(ids) - 1])
            logits = decoder.forward(torch.tensor(ids[-1:]), position, None).logits[-1]
            decoder.commit([0])
        out.append(ids)
    return out


def argmaxes(decoder: Any, ids: list[int]) -> torch.Tensor:
    """The decoder's argmax after each position of ids, teacher-forced in one forward."""
    fork = decoder.fork(len(ids))
    rows = Rows(torch.tensor(ids), torch.arange(len(ids)), None, "all")
    return fork.run(rows).logits.argmax(-1)


def step_time(decoder: Any, reps: int = 7) -> float:
    """The fastest of `reps` one-row forwards after a 64-token context."""
    fork = decoder.fork(80)
    fork.prefill(torch.arange(64) % decoder.vocab_rows)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fork.forward(torch.tensor([7]), torch.tensor([64]), None)
        times.append(time.perf_counter() - start)
    return min(times)


def calibrate(backend: Any, tokenizer: Any, cost: Any, options: Options) -> Calibration:
    """Measure skip sets and choose the best (see the module docstring)."""
    texts = calibration_ids(
        backend, tokenizer, options.calibration_prompts, options.calibration_tokens
    )
    # Agreement is counted where the target predicts its own continuation.
    answer = [slice(len(ids) - options.calibration_tokens - 1, len(ids) - 1) for ids in texts]
    target = [argmaxes(backend, ids)[s] for ids, s in zip(texts, answer, strict=True)]
    total = backend.config.num_layers
    full = step_time(backend)

    def agreement(layers: list[int]) -> float:
        draft = backend.subset(layers, max(len(ids) for ids in texts))
        hits = sum(
            int((argmaxes(draft, ids)[s] == t).sum())
            for ids, s, t in zip(texts, answer, target, strict=True)
        )
        return hits / sum(len(t) for t in target)

    with tqdm(
        total=2 * total, desc="onepass: calibrating layer_skip (once per model)", leave=False
    ) as bar:
        alone = {}
        for layer in range(total):
            alone[layer] = agreement([x for x in range(total) if x != layer])
            bar.update()
        order = sorted(range(total), key=lambda x: -alone[x])  # least harmful to drop first
        tried, best = [], None
        for k in range(1, total):
            layers = sorted(order[k:])
            a, c = agreement(layers), step_time(backend.subset(layers, 80)) / full
            tried.append(
                {
                    "skipped": sorted(order[:k]),
                    "dropped": order[k - 1],
                    "agreement": a,
                    "step_cost": c,
                }
            )
            for chain in range(1, MAX_CHAIN + 1):
                speed = expected_speedup(a, c, chain, cost)
                if best is None or speed > best.speedup:
                    best = Calibration(layers, chain, a, c, speed, tried)
            bar.update()
            if a < LEAST_AGREEMENT:
                break
    assert best is not None
    return best


def calibration_key(backend: Any, model_key: str | None, options: Options) -> str:
    threads = torch.get_num_threads()
    prompts, tokens = options.calibration_prompts, options.calibration_tokens
    return f"{model_key}|{backend.isa}|{threads} threads|{prompts}x{tokens}"


def cached_calibration(context: Any, options: Options) -> Calibration:
    """The calibration for this model and machine: from the cache directory, or run now."""
    backend = context.backend
    if context.tokenizer is None:
        raise InputError("layer_skip's calibration needs the target's tokenizer (or pass layers)")
    cost = context.cost_curve()
    if cost is None:
        raise InputError("layer_skip's calibration needs the backend's cost curve (or pass layers)")
    key = calibration_key(backend, context.model_key, options)
    path = Path(context.cache_dir) / CALIBRATION_FILE if context.cache_dir else None
    entry = read_entries(path)[0].get(key) if path is not None else None
    if isinstance(entry, dict):
        with suppress(TypeError):  # a damaged entry: calibrate again and rewrite it
            return Calibration(**entry)
    result = calibrate(backend, context.tokenizer, cost, options)
    if path is not None:
        store_entry(path, key, asdict(result))
    return result


def build(options: Options, context: Any) -> DraftModelDrafter:
    backend = context.backend
    if getattr(backend, "kernels", None) is None:
        raise InputError("layer_skip needs the fused CPU decoder (float32 on a CPU)")
    total = backend.config.num_layers
    if options.layers is not None:
        if options.layers[-1] >= total:
            raise InputError(f"layers must be indices in 0..{total - 1} (the model has {total})")
        layers, chain = options.layers, 4
    else:
        calibration = cached_calibration(context, options)
        layers, chain = calibration.layers, calibration.chain
        if calibration.speedup < 1:
            warnings.warn(
                f"onepass: layer_skip cannot pay on this model: its best draft ({len(layers)} "
                f"of {total} layers) agrees with the target {calibration.agreement:.0%} of the "
                f"time at {calibration.step_cost:.0%} of its step cost, an expected "
                f"{calibration.speedup:.2f}x plain decoding",
                RuntimeWarning,
                stacklevel=2,
            )
    return DraftModelDrafter(
        backend.subset(layers),
        context.num_speculative_tokens or chain,
        min_confidence=options.min_confidence,
    )
