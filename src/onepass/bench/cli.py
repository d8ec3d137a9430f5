"""The `onepass bench` subcommand: parse options into BenchSettings, run the benchmark
(onepass.bench.run), print the summary tables and write JSON / Markdown / PNG outputs
(onepass.bench.report)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from onepass.bench.questions import BenchError
from onepass.bench.run import BenchSettings
from onepass.bench.runners import PEERS, Sampling

# Namespace entries that are not bench options (set by the top-level parser or by us).
_NOT_OPTIONS = ("func", "command")


def _names(value: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c'] (order kept, duplicates dropped); None stays None."""
    if value is None:
        return None
    return list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))


def _variants(values: list[str]) -> dict[str, Any]:
    """['name={"method": ...}', ...] -> {name: config dict}."""
    out: dict[str, Any] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            raise BenchError(f"--variant takes NAME=JSON, got {value!r}")
        try:
            out[name.strip()] = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchError(f"--variant {name.strip()}: not valid JSON ({e})") from None
    return out


def add_bench_parser(
    subparsers: argparse._SubParsersAction,
    add_model_args: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="benchmark speculative methods against plain decoding",
        description="Run plain decoding and each method interleaved on every prompt (after a "
        "warm-up); report per category and overall: speedup (geometric mean of per-prompt "
        "tokens/s ratios), tokens/s, mean acceptance length, per-position acceptance, and "
        "whether greedy output was identical.",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--dataset",
        metavar="FILE.jsonl",
        help="Spec-Bench JSONL (question_id, category, turns) (default: the built-in prompt set)",
    )
    g.add_argument("--categories", metavar="A,B", help="categories to run (default: all)")
    g.add_argument("--limit-per-category", type=int, metavar="N", help="first N per category")
    g.add_argument(
        "--multi-turn",
        action="store_true",
        help="answer every turn, feeding the model's own answers back (default: first turn)",
    )
    g.add_argument(
        "--no-chat-template",
        action="store_true",
        help="complete raw text even if the model has a chat template",
    )
    g = p.add_argument_group("methods")
    g.add_argument(
        "--methods",
        metavar="A,B",
        help="methods to compare; vanilla (plain decoding) always runs first "
        "(default: vanilla and every registered method that loads)",
    )
    g.add_argument(
        "--variant",
        action="append",
        metavar="NAME=JSON",
        help="a method with its own speculative config, reported as NAME, e.g. "
        """'auto+heads={"method": "auto", "heads": true}' (repeatable)""",
    )
    g.add_argument(
        "--peers",
        metavar="A,B",
        help=f"other implementations on the same prompts: {', '.join(PEERS)} "
        "(hf adds transformers' greedy generate 'hf' and its prompt lookup 'hf_pld'; "
        "llamacpp needs llama-cpp-python)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="time each (prompt, method) N times, interleaved; keep the median (default: 1)",
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="per turn (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="0 disables (default: 0)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="FILE.json", help="results as JSON (records + summary)")
    g.add_argument("--report", metavar="FILE.md", help="Markdown report with tables")
    g.add_argument(
        "--plot",
        metavar="FILE.png",
        help="speedup plot to FILE.png and acceptance-by-position plot to FILE_acceptance.png",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=partial(cmd_bench, parser=p))
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        dataset=args.dataset,
        categories=_names(args.categories),
        limit_per_category=args.limit_per_category,
        methods=_names(args.methods),
        variants=_variants(args.variant or []),
        peers=_names(args.peers) or [],
        sampling=Sampling(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        ),
        repeats=args.repeats,
        multi_turn=args.multi_turn,
        chat_template=not args.no_chat_template,
    )


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces this run: every option that differs from its default."""
    parts = ["onepass", "bench"]
    for dest, value in vars(args).items():
        if dest in _NOT_OPTIONS or value == parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            parts += [flag] if item is True else [flag, str(item)]
    return shlex.join(parts)


def cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from onepass.bench.report import (
        check_matplotlib,
        check_output_paths,
        plot_paths,
        summary_tables,
        write_outputs,
    )
    from onepass.bench.run import prepare, run_benchmark

    settings = settings_from_args(args)
    output, report, plot = (Path(p) if p else None for p in (args.output, args.report, args.plot))
    check_output_paths(output, report, *(plot_paths(plot) if plot else ()))
    if plot:
        check_matplotlib()
    _, _, skipped = prepare(settings)  # cheap; reports bad input before the model loads
    if skipped:
        print(
            f"onepass bench: skipping methods that do not load: {', '.join(skipped)}",
            file=sys.stderr,
        )
    results = run_benchmark(
        settings,
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        weights=args.weights,
        kv_cache_dtype=args.kv_cache_dtype,
        progress=not args.no_progress,
    )
    results["command"] = command_line(parser, args)
    written = write_outputs(results, output, report, plot)
    print(summary_tables(results))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
