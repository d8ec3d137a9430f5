"""Does the suffix drafter's history of earlier requests (SuffixDecoding's global tree) pay?

Greedy chats on the default model, each workload from fresh drafters, for `suffix` and `auto`
without and with the history; prints the mean acceptance length (tokens per target forward,
plain decoding = 1.0) and tokens/s per workload:

* fresh: one first turn per built-in category, each asked once (nothing to reuse);
* repeated: a few prompts asked once, then all again (the second round is reported apart);
* agent: one instruction with a fixed output format over different inputs, as tools and agents
  send (the answers share their structure, not their content).

    .venv/bin/python scripts/suffix_history.py [--max-tokens 64] [--history-tokens 16384]
        [--workloads fresh,repeated,agent] [--methods suffix,auto]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from onepass import LLM, SamplingParams
from onepass.bench.questions import load_questions
from onepass.config import SpeculativeConfig
from onepass.drafters.suffix import SuffixDrafter
from onepass.outputs import SpecDecodeStats

AGENT = (
    "Extract the person's name, city and age from the text. Answer with JSON only, in the form "
    '{{"name": ..., "city": ..., "age": ...}}.\n\nText: {}'
)
PEOPLE = (
    "Maria Lopez, 34, moved to Valencia last spring to open a bakery.",
    "At 61, retired teacher Tom Becker still runs every morning in Leeds.",
    "The new librarian in Porto is Ana Sousa; she turned 29 in May.",
    "Kenji Watanabe (45) commutes from Yokohama to Tokyo every day.",
    "Twenty-year-old student Lea Martin lives in a shared flat in Lyon.",
)


def workloads() -> dict[str, list[str]]:
    questions = load_questions()
    first = {}
    for q in questions:
        first.setdefault(q.category, q.turns[0])
    repeated = [q.turns[0] for q in questions if q.question_id in (2, 7, 17, 27)]
    return {
        "fresh": list(first.values())[:5],
        "repeated": repeated + repeated,
        "agent": [AGENT.format(p) for p in PEOPLE],
    }


def use_history(llm: LLM, method: str, history_tokens: int) -> dict:
    """A fresh drafter for `method` whose suffix drafter keeps `history_tokens` (auto has no
    option for it: its suffix candidate is replaced)."""
    llm._drafters.clear()
    if method == "suffix":
        return {"method": "suffix", "history_tokens": history_tokens}
    spec = {"method": "auto"}
    candidate = llm._drafter(SpeculativeConfig.parse(spec)).candidates["suffix"]
    old = candidate.drafter
    options = replace(old.options, history_tokens=history_tokens)
    candidate.drafter = SuffixDrafter(options, old.budget, old.corpus)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--history-tokens", type=int, default=16384)
    parser.add_argument("--workloads", default="fresh,repeated,agent")
    parser.add_argument("--methods", default="suffix,auto")
    args = parser.parse_args()
    llm = LLM("default", max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.chat([{"role": "user", "content": "Hello!"}], params)  # warm-up
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    print(f"{'workload':<20} {'method':<7} {'history':>7} {'accept':>7} {'tok/s':>6}")
    chosen = args.workloads.split(",")
    for name, prompts in [(n, p) for n, p in workloads().items() if n in chosen]:
        for method in args.methods.split(","):
            for history in (0, args.history_tokens):
                spec = use_history(llm, method, history)
                rounds = [SpecDecodeStats(), SpecDecodeStats()]
                tokens, seconds, ids = 0, 0.0, []
                for i, prompt in enumerate(prompts):
                    out = llm.chat([{"role": "user", "content": prompt}], params,
                                   speculative_config=spec)[0]  # fmt: skip
                    second = name == "repeated" and i >= len(prompts) // 2
                    rounds[second].merge(out.metrics.spec)
                    tokens += len(out.outputs[0].token_ids)
                    seconds += out.metrics.total_seconds
                    ids.append(out.outputs[0].token_ids)
                outputs.setdefault((name, method), []).append(ids)
                labels = ["", " (2nd)"] if name == "repeated" else [""]
                for label, stats in zip(labels, rounds, strict=False):
                    print(
                        f"{name + label:<20} {method:<7} {history:>7} "
                        f"{stats.mean_acceptance_length:>7.2f} {tokens / seconds:>6.1f}"
                    )
    same = all(runs[0] == runs[1] for runs in outputs.values())
    print(f"greedy outputs identical with and without the history: {same}")


if __name__ == "__main__":
    main()
