"""How far copying can go: the mean acceptance length of a perfect copy drafter.

    .venv/bin/python scripts/copy_oracle.py [--dataset FILE.jsonl] [--max-tokens 128]
        [--max-depth 15]

Runs plain greedy decoding on a prompt set (the built-in one by default; chat template, first
turn, as `onepass bench`), then replays each answer with an oracle that knows it: every step
drafts the continuation of whichever earlier occurrence in prompt + answer so far matches the
most upcoming tokens among those that follow the current last token (at most --max-depth), and
the step emits those plus one. No drafter that copies from the context keyed on at least the
last token (prompt lookup, suffix trees) accepts more per step; a method
whose mean acceptance length exceeds it is predicting text that was never there. Prints a
Markdown table per category (tokens per step pooled over its prompts, as the bench pools
mean acceptance length).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from onepass import LLM, SamplingParams
from onepass.bench.questions import load_questions


def longest_copy(seq: list[int], i: int, limit: int) -> int:
    """The most tokens from seq[i] on that an earlier start j < i repeats where seq[j - 1] is
    seq[i - 1] (a copy drafter keys on at least the last token; overlap allowed: a periodic
    stretch copies itself), at most `limit`."""
    best = 0
    for j in range(1, i):
        if seq[j - 1] != seq[i - 1]:
            continue
        length = 0
        while length < limit and i + length < len(seq) and seq[j + length] == seq[i + length]:
            length += 1
        best = max(best, length)
    return best


def oracle_steps(prompt: list[int], answer: list[int], max_depth: int) -> int:
    """Steps the oracle takes to emit the answer after its first token (the prefill's)."""
    seq = prompt + answer
    i, steps = len(prompt) + 1, 0
    while i < len(seq):
        i += longest_copy(seq, i, max_depth) + 1
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None, help="Spec-Bench JSONL (default: built-in)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-depth", type=int, default=15, help="auto's max_nodes")
    args = parser.parse_args()

    llm = LLM("default")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    # category -> [tokens after the first, steps], pooled as vLLM pools mean acceptance length
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for question in load_questions(args.dataset):
        prompt = llm.chat_token_ids([{"role": "user", "content": question.turns[0]}])
        answer = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
        steps = oracle_steps(prompt, list(answer), args.max_depth)
        for key in ("overall", question.category):
            by_category[key][0] += max(len(answer) - 1, 0)
            by_category[key][1] += steps
    print("| category | copy-oracle mean acceptance length |\n|---|---:|")
    for category, (tokens, steps) in by_category.items():
        print(f"| {category} | {tokens / steps if steps else 1.0:.2f} |")


if __name__ == "__main__":
    main()
