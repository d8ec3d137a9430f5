"""Continuous batching in-process (no HTTP): where the time of a batch goes, plain vs `auto`.

Runs distinct built-in prompts (greedy, chat template) through LLM.request / LLM.step,
at most B at a time, admitting the next prompt as soon as one finishes, and splits the forwards
into prompt steps (a prompt chunk in the forward), full-batch decoding steps and the tail. Each
run starts with fresh drafters, so that what `auto` learned in one run (the suffix history
holds the answers) does not help the next.

    .venv/bin/python scripts/bench_batching.py --batch 1,8,16 --requests 16
"""

from __future__ import annotations

import argparse
import time
from collections import deque

from onepass import LLM, SamplingParams
from onepass.bench.questions import answer_lengths, distinct_prompts, load_questions
from onepass.models.loading import DEFAULT_WEIGHTS, KV_CACHE_DTYPES, WEIGHTS


def run(llm: LLM, prompts: list[str], spec: dict | None, batch: int, lengths: list[int]) -> dict:
    llm._drafters.clear()  # fresh drafters: nothing learned from an earlier run
    waiting, running, steps = deque(zip(prompts, lengths, strict=True)), [], []
    inner = llm.backend.run_batch
    shape: dict = {}

    def timed(pairs):
        start = time.perf_counter()
        outs = inner(pairs)
        shape.update(
            seconds=time.perf_counter() - start,
            rows=sum(rows.ids.shape[0] for _, rows in pairs),
            requests=len(pairs),
            prompt=any(rows.logits != "all" for _, rows in pairs),
        )
        return outs

    llm.backend.run_batch = timed
    start = time.perf_counter()
    try:
        while waiting or running:
            while waiting and len(running) < batch:
                prompt, length = waiting.popleft()
                messages = [{"role": "user", "content": prompt}]
                params = SamplingParams(max_tokens=length, temperature=0)
                running.append(llm.request(messages, params, speculative_config=spec))
            outs = llm.step(running)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs if o is not None)
            full = shape["requests"] == batch
            phase = "prompt" if shape["prompt"] else "full" if full else "tail"
            steps.append((phase, shape["seconds"], shape["rows"], tokens))
            running = [r for r in running if not r.finished]
    finally:
        llm.backend.run_batch = inner
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": sum(s[3] for s in steps) / seconds, "seconds": seconds}
    for phase in ("prompt", "full", "tail"):
        part = [s for s in steps if s[0] == phase]
        if part:
            result[phase] = {
                "steps": len(part),
                "seconds": sum(s[1] for s in part),
                "rows_per_step": sum(s[2] for s in part) / len(part),
                "tokens_per_step": sum(s[3] for s in part) / len(part),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,16", help="requests side by side")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, choices=WEIGHTS)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    parser.add_argument(
        "--max-tokens", default="64", help="each answer's max_tokens: N, or LO-HI (seeded)"
    )
    args = parser.parse_args()
    questions = load_questions()
    distinct = distinct_prompts(questions)
    if not 1 <= args.requests <= len(distinct):
        parser.error(f"--requests must be in 1..{len(distinct)} (the distinct prompts)")
    prompts = distinct[: args.requests]
    lengths = answer_lengths(args.max_tokens, len(prompts))
    llm = LLM("default", weights=args.weights, kv_cache_dtype=args.kv_cache_dtype)
    run(llm, prompts[:2], None, 2, [8, 8])  # warm-up
    for batch in (int(b) for b in args.batch.split(",")):
        for spec in (None, {"method": "auto"}):
            r = run(llm, prompts, spec, batch, lengths)
            parts = " | ".join(
                f"{phase}: {p['steps']} steps {p['seconds']:.2f} s, {p['rows_per_step']:.1f} "
                f"rows and {p['tokens_per_step']:.1f} tokens per step"
                for phase, p in r.items()
                if isinstance(p, dict)
            )
            name = spec["method"] if spec else "plain"
            print(f"B={batch} {name}: {r['tokens_per_s']:.0f} tokens/s | {parts}", flush=True)


if __name__ == "__main__":
    main()
