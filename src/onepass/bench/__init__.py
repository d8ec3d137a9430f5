"""`onepass bench`: Spec-Bench-style benchmark of speculative methods against plain decoding
(run.py: prompts, runners, interleaved runs, records and summary; report.py: Markdown and
plots; cli.py: the subcommand)."""

from onepass.bench.run import (
    BenchError,
    BenchSettings,
    Question,
    Record,
    Sampling,
    geometric_mean,
    load_questions,
    run_benchmark,
    run_questions,
    summarize,
)

__all__ = [
    "BenchError",
    "BenchSettings",
    "Question",
    "Record",
    "Sampling",
    "geometric_mean",
    "load_questions",
    "run_benchmark",
    "run_questions",
    "summarize",
]
