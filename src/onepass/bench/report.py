"""Benchmark output for people and machines: a Markdown report (methods x categories tables),
two PNG plots (matplotlib, Agg: speedup by method and category as grouped bars; acceptance
rate by draft position per method), and the JSON results.

Every file is rendered to a temporary file beside its destination and renamed into place only
once all of them rendered, so a failed run or render leaves no half-written output behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onepass.errors import OnepassError

MISSING = "–"


class ReportError(OnepassError):
    """An output path that cannot be written, or plotting without matplotlib."""


# -- Markdown -----------------------------------------------------------------------------------


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return MISSING
    if kind == "speedup":
        return f"{value:.2f}x"
    if kind == "percent":
        return f"{100 * value:.0f}%"
    return f"{value:.2f}" if kind == "float" else f"{value:.1f}"


def _columns(results: dict[str, Any]) -> list[str]:
    return ["overall", *results["settings"]["categories"]]


def metric_table(results: dict[str, Any], key: str, kind: str) -> str:
    """A methods x (overall, categories) Markdown table of one summary metric."""
    columns = _columns(results)
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method, groups in results["summary"].items():
        cells = [_fmt(groups.get(c, {}).get(key), kind) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance_table(results: dict[str, Any]) -> str:
    """Per-position acceptance rate (vLLM: accepted_per_pos[d] / num_drafts) per method."""
    rows = {
        method: groups["overall"]["acceptance_per_position"]
        for method, groups in results["summary"].items()
        if groups["overall"]["acceptance_per_position"]
    }
    if not rows:
        return "No method proposed draft tokens."
    depth = max(len(r) for r in rows.values())
    lines = [
        "| method | " + " | ".join(str(d + 1) for d in range(depth)) + " |",
        "|---|" + "---:|" * depth,
    ]
    for method, rates in rows.items():
        cells = [_fmt(rates[d] if d < len(rates) else None, "percent") for d in range(depth)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_tables(results: dict[str, Any]) -> str:
    """The tables the CLI prints when it is done, also the heart of the report."""
    parts = [
        "## Speedup over plain decoding",
        "Geometric mean over prompts of (method tokens/s / vanilla tokens/s on the same prompt).",
        metric_table(results, "speedup", "speedup"),
        "## Speedup excluding prefill",
        "The same ratio for the decoding loop alone: tokens after the first / seconds after "
        "the first token. The prompt's prefill is the same work for every method; "
        f"{MISSING} = not reported (peers).",
        metric_table(results, "decode_speedup", "speedup"),
        "## Speedup if verification were free",
        "The speedup each method's acceptance allows if a forward scoring its draft cost no "
        "more than one plain decoding step and drafting took no time: vanilla's seconds / (its "
        "prefill + its decoding seconds x the method's forwards / vanilla's forwards). The gap "
        "to the measured speedup is what verification and drafting cost; "
        f"{MISSING} = not reported (peers).",
        metric_table(results, "free_verification_speedup", "speedup"),
        "## Tokens per second",
        "Total new tokens / total decoding seconds (prefill included).",
        metric_table(results, "tokens_per_s", "rate"),
        "## Mean acceptance length",
        "Tokens emitted per target forward, bonus token included (plain decoding = 1.00; "
        f"{MISSING} = not reported, as for the peers).",
        metric_table(results, "mean_acceptance_length", "float"),
        "## Share of decoding time spent drafting",
        "Mean over prompts of the drafter's proposing and observing time / the seconds after "
        "the first token: the Python between forwards that a method adds to every step "
        f"(vanilla's is its empty drafter's; {MISSING} = not reported, as for the peers).",
        metric_table(results, "drafting_share", "percent"),
    ]
    if results["settings"]["sampling"]["temperature"] == 0:
        parts += [
            "## Greedy output identical to vanilla",
            "Share of prompts whose token ids equal plain decoding's.",
            metric_table(results, "identical_fraction", "percent"),
        ]
    return "\n\n".join(parts)


def render_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    sampling = s["sampling"]
    head = [
        f"# onepass bench: {results['model']}",
        f"{s['num_questions']} prompts ({s['dataset'] or 'built-in prompt set'}; "
        f"{len(s['categories'])} categories), max_tokens {sampling['max_tokens']}, "
        f"temperature {sampling['temperature']}, repeats {s['repeats']}, "
        f"{'multi-turn' if s['multi_turn'] else 'first turn only'}, "
        f"{'chat template' if s['chat_template'] else 'no chat template'}.",
        "Command:",
        f"```\n{results.get('command', MISSING)}\n```",
    ]
    tail = [
        "## Acceptance rate by draft position",
        "Share of verification steps whose accepted path reached draft position d.",
        acceptance_table(results),
        "## Environment",
        "| key | value |\n|---|---|",
    ]
    env = "\n".join(f"| {k} | {MISSING if v is None else v} |" for k, v in results["env"].items())
    return "\n\n".join([*head, summary_tables(results), *tail]) + "\n" + env + "\n"


# -- plots --------------------------------------------------------------------------------------


def plot_paths(plot: Path) -> tuple[Path, Path]:
    """--plot X.png writes the speedup plot to X.png and the acceptance plot to
    X_acceptance.png."""
    return plot, plot.with_name(f"{plot.stem}_acceptance{plot.suffix or '.png'}")


def speedup_figure(results: dict[str, Any]) -> Any:
    """Grouped bars: one group per category (and overall), one bar per method."""
    from matplotlib.figure import Figure

    columns = _columns(results)
    methods = [m for m in results["summary"] if m != "vanilla"] or ["vanilla"]
    bars = len(columns) * len(methods)
    fig = Figure(figsize=(min(20.0, max(6.0, 0.22 * bars + 3)), 4.8))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        groups = results["summary"][method]
        values = [groups.get(c, {}).get("speedup") for c in columns]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(columns))]
        heights = [float("nan") if v is None else v for v in values]
        drawn = ax.bar(xs, heights, width, label=method)
        labels = [_fmt(v, "float") for v in values]
        ax.bar_label(drawn, labels=labels, fontsize=6.5, padding=2, rotation=90)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="vanilla = 1")
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_ylabel("speedup over plain decoding (x)")
    ax.set_title(f"{results['model']}: speedup by method and category")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # clear of the bars
    ax.margins(y=0.2)
    fig.tight_layout()
    return fig


def acceptance_figure(results: dict[str, Any]) -> Any:
    """Acceptance rate by draft position (1-based), one line per method that drafts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot()
    top, drawn = 0.0, False
    for method, groups in results["summary"].items():
        rates = groups["overall"]["acceptance_per_position"]
        if rates:
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=method)
            top, drawn = max(top, *rates), True
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no method proposed draft tokens", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, min(1.05, max(0.1, 1.15 * top)))  # rates are small: use the height
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate (accepted_per_pos / num_drafts)")
    ax.set_title(f"{results['model']}: acceptance rate by draft position")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def check_matplotlib() -> None:
    from importlib.util import find_spec

    if find_spec("matplotlib") is None:
        raise ReportError("--plot needs matplotlib: pip install 'onepass[bench]'")


# -- writing ------------------------------------------------------------------------------------


def check_output_paths(*paths: Path | None) -> None:
    """Fail before a long run, not after it: each parent must be an existing directory."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            raise ReportError(f"{path} is a directory; give a file name")
        if not path.parent.is_dir():
            raise ReportError(f"cannot write {path}: directory {path.parent} does not exist")


def write_outputs(
    results: dict[str, Any],
    output: Path | None = None,
    report: Path | None = None,
    plot: Path | None = None,
) -> list[Path]:
    """Render every requested file to a temporary file, then rename them all into place."""
    writers: list[tuple[Path, Callable[[Path], None]]] = []
    if output:
        text = json.dumps(results, indent=2) + "\n"
        writers.append((output, lambda p: p.write_text(text, encoding="utf-8")))
    if report:
        markdown = render_markdown(results)
        writers.append((report, lambda p: p.write_text(markdown, encoding="utf-8")))
    if plot:
        check_matplotlib()
        speedup_path, acceptance_path = plot_paths(plot)
        for path, make in ((speedup_path, speedup_figure), (acceptance_path, acceptance_figure)):
            writers.append((path, lambda p, make=make: make(results).savefig(p, format="png")))
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writers:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            os.close(fd)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results private to the user
            staged.append((Path(tmp), path))
            write(Path(tmp))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [path for _, path in staged]
