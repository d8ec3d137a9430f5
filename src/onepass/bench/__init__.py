"""`onepass bench`: Spec-Bench-style benchmark of speculative methods against plain decoding
(questions.py: prompt sets; runners.py: methods and peers; run.py: interleaved runs, records
and summary; report.py: Markdown and plots; cli.py: the subcommand)."""

from onepass.bench.questions import BenchError, Question, load_questions
from onepass.bench.run import (
    BenchSettings,
    Record,
    geometric_mean,
    run_benchmark,
    run_questions,
    summarize,
)
from onepass.bench.runners import Sampling

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
