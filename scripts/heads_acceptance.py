"""Mean acceptance length, speed and drafting time of the trained-head methods (medusa, eagle)
against plain decoding on the built-in prompts (first turns), greedy.

    python scripts/heads_acceptance.py --prompts 8 --max-tokens 96 [--methods medusa,eagle]

A method is a drafter's name or one of VARIANTS (auto with and without the heads among its
candidates), e.g. --methods auto-model-free,auto+medusa,auto+eagle,auto.

Drafting time is the time spent in the drafter's propose / observe / observe_prompt, measured
by timing wrappers installed on the drafter classes for this script only.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from importlib import resources

from onepass import LLM, SamplingParams
from onepass.models.loading import DEFAULT_WEIGHTS, WEIGHTS

SPENT = {"drafting": 0.0}
MODEL_FREE = ["ngram", "suffix", "recycling"]
VARIANTS = {
    "auto-model-free": {"method": "auto", "methods": MODEL_FREE},
    "auto+medusa": {"method": "auto", "methods": [*MODEL_FREE, "medusa"]},
    "auto+eagle": {"method": "auto", "methods": [*MODEL_FREE, "eagle"]},
}


def timed(cls: type) -> None:
    for name in ("propose", "observe", "observe_prompt"):
        inner = getattr(cls, name)

        @functools.wraps(inner)
        def wrapper(self, *args, _inner=inner, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(self, *args, **kwargs)
            finally:
                SPENT["drafting"] += time.perf_counter() - start

        setattr(cls, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, choices=WEIGHTS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--methods", default="medusa,eagle")
    args = parser.parse_args()
    from onepass.drafters.eagle import EagleDrafter
    from onepass.drafters.medusa import MedusaDrafter

    timed(MedusaDrafter)
    timed(EagleDrafter)
    text = resources.files("onepass").joinpath("data/prompts.jsonl").read_text()
    prompts = [json.loads(line)["turns"][0] for line in text.splitlines()[: args.prompts]]
    llm = LLM(args.model, weights=args.weights)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    methods = [None, *args.methods.split(",")]
    llm.chat([{"role": "user", "content": "Hello"}], params)  # warm-up
    rows = {
        m or "vanilla": {"tokens": 0, "seconds": 0.0, "draft": 0.0, "drafts": 0, "acc": 0}
        for m in methods
    }
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        for method in methods:
            spec = VARIANTS.get(method, {"method": method}) if method else None
            SPENT["drafting"] = 0.0
            start = time.perf_counter()
            out = llm.chat(messages, params, speculative_config=spec)[0]
            row = rows[method or "vanilla"]
            row["seconds"] += time.perf_counter() - start
            row["draft"] += SPENT["drafting"]
            row["tokens"] += len(out.outputs[0].token_ids)
            row["drafts"] += out.metrics.spec.num_drafts
            row["acc"] += out.metrics.spec.num_accepted_tokens
    base = rows["vanilla"]["tokens"] / rows["vanilla"]["seconds"]
    print("| method | tokens/s | speedup | mean acceptance length | drafting share |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        speed = r["tokens"] / r["seconds"]
        mal = 1 + r["acc"] / r["drafts"] if r["drafts"] else 1.0
        share = r["draft"] / r["seconds"]
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {mal:.2f} | {share:.0%} |")


if __name__ == "__main__":
    main()
