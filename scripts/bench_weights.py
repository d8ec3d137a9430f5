"""Weight modes side by side: plain decoding and `auto` for each of --weights (default: stored,
int8), one LLM per mode in one process, every prompt of the built-in set run by each (mode,
method) in turn, after a warm-up.

    .venv/bin/python scripts/bench_weights.py [--weights stored,int8] [--repeats 2]

`onepass bench` compares methods on one weight mode; this compares the modes themselves (their
plain decoding against each other, and `auto` against each mode's plain decoding), interleaved so
that the machine's drift between runs does not enter the ratios. Greedy, chat template, prefill
included. Prints a Markdown table per category (geometric means of per-prompt ratios) and a JSON
line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict

from onepass import LLM, SamplingParams
from onepass.bench.questions import load_questions
from onepass.models.loading import WEIGHTS

METHODS = {"plain": None, "auto": {"method": "auto"}}


def tokens_per_second(llm: LLM, ids: list[int], spec: dict | None, max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    out = llm.generate({"prompt_token_ids": ids}, params, speculative_config=spec)[0]
    return len(out.outputs[0].token_ids) / out.metrics.total_seconds


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="stored,int8")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    modes = args.weights.split(",")
    if unknown := [m for m in modes if m not in WEIGHTS]:
        parser.error(f"unknown weights {unknown}: choose from {', '.join(WEIGHTS)}")

    llms = {mode: LLM("default", max_model_len=4096, weights=mode) for mode in modes}
    questions = load_questions(None)
    prompts = [
        (q.category, llms[modes[0]].chat_token_ids([{"role": "user", "content": q.turns[0]}]))
        for q in questions
    ]
    for llm in llms.values():  # warm-up, and each mode's cost curve measured before timing
        for spec in METHODS.values():
            tokens_per_second(llm, prompts[0][1], spec, 16)

    rates: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
    for category, ids in prompts:
        samples = defaultdict(list)
        # Each repeat starts from the drafters' state before this prompt, as `onepass bench`
        # does: a repeat must not draft from the answer the previous repeat just gave.
        before = {mode: llm.snapshot_drafter(METHODS["auto"]) for mode, llm in llms.items()}
        for _ in range(args.repeats):
            for mode, llm in llms.items():
                llm.restore_drafter(before[mode])
                for method, spec in METHODS.items():
                    samples[mode, method].append(tokens_per_second(llm, ids, spec, args.max_tokens))
        for key, values in samples.items():
            rates[key].append((category, statistics.median(values)))

    categories = list(dict.fromkeys(c for c, _ in prompts))
    base = (modes[0], "plain")
    header = f"| mode, method | tokens/s | vs {base[0]} plain | vs its plain | "
    print(header + " | ".join(categories) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(categories))
    summary = {}
    for (mode, method), values in rates.items():
        own = rates[mode, "plain"]
        ratio_base = geomean([v / b for (_, v), (_, b) in zip(values, rates[base], strict=True)])
        ratio_own = geomean([v / b for (_, v), (_, b) in zip(values, own, strict=True)])
        per_category = [
            geomean([v / b for (c, v), (_, b) in zip(values, own, strict=True) if c == category])
            for category in categories
        ]
        mean_rate = statistics.mean(v for _, v in values)
        summary[f"{mode} {method}"] = {
            "tokens_per_second": mean_rate,
            "vs_base_plain": ratio_base,
            "vs_own_plain": ratio_own,
            "categories": dict(zip(categories, per_category, strict=True)),
        }
        cells = " | ".join(f"{r:.2f}x" for r in per_category)
        ratios = f"{ratio_base:.2f}x | {ratio_own:.2f}x"
        print(f"| {mode} {method} | {mean_rate:.1f} | {ratios} | {cells} |")
    print(json.dumps({"max_tokens": args.max_tokens, "repeats": args.repeats, "summary": summary}))


if __name__ == "__main__":
    main()
