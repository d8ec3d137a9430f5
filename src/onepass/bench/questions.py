"""Benchmark prompts: Spec-Bench's JSONL format (`question_id`, `category`, `turns`) and the
built-in prompt set."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from onepass.errors import OnepassError


class BenchError(OnepassError):
    """A bad benchmark input (dataset, category, method, peer) or a failed run."""


# -- dataset ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path | None = None) -> list[Question]:
    """Read a Spec-Bench JSONL file; None reads the small prompt set shipped with onepass."""
    if path is None:
        source = resources.files("onepass") / "data" / "prompts.jsonl"
        return _parse_lines(source.read_text(encoding="utf-8").splitlines(), "built-in prompts")
    file = Path(path).expanduser()
    if not file.is_file():
        raise BenchError(f"dataset {str(file)!r} not found (expected a Spec-Bench .jsonl file)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read dataset {file} ({e})") from None
    return _parse_lines(text.splitlines(), str(file))


def distinct_prompts(questions: Sequence[Question]) -> list[str]:
    """Every turn as a prompt of its own, first turns first: a load of distinct requests (a
    repeated prompt would be drafted whole from the suffix history of its earlier answer)."""
    return [q.turns[0] for q in questions] + [t for q in questions for t in q.turns[1:]]


def answer_lengths(spec: str, n: int, seed: int = 0) -> list[int]:
    """n answer lengths (max_tokens) from "N" (all N) or "LO-HI" (uniform, seeded: the same
    for every method). Real traffic's answers differ in length; all alike, a batch of requests
    admitted together finishes together, which a closed-loop load test then rewards."""
    low, _, high = spec.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise BenchError(f"answer lengths must be N or LO-HI, got {spec!r}") from None
    if not 1 <= lo <= hi:
        raise BenchError(f"answer lengths must be positive and LO <= HI, got {spec!r}")
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def _parse_lines(lines: Iterable[str], source: str) -> list[Question]:
    questions, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        question = _parse_question(line, f"{source}, line {number}")
        if question.question_id in seen:
            raise BenchError(
                f"{source}, line {number}: duplicate question_id {question.question_id}"
            )
        seen.add(question.question_id)
        questions.append(question)
    if not questions:
        raise BenchError(f"{source} holds no questions")
    return questions


def _parse_question(line: str, where: str) -> Question:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise BenchError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise BenchError(f"{where}: expected a JSON object")
    missing = [key for key in ("question_id", "category", "turns") if key not in item]
    if missing:
        raise BenchError(f"{where}: missing key(s) {', '.join(missing)}")
    qid, category, turns = item["question_id"], item["category"], item["turns"]
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise BenchError(f"{where}: question_id must be an integer or a string")
    if not isinstance(category, str) or not category:
        raise BenchError(f"{where}: category must be a non-empty string")
    if not isinstance(turns, list) or not turns:
        raise BenchError(f"{where}: turns must be a non-empty list of strings")
    if not all(isinstance(t, str) and t.strip() for t in turns):
        raise BenchError(f"{where}: every turn must be a non-empty string")
    return Question(qid, category, tuple(turns))


def select(
    questions: Sequence[Question], categories: Sequence[str] | None, limit: int | None
) -> list[Question]:
    """Keep the given categories (all if None) and at most `limit` questions of each, in file
    order."""
    available = list(dict.fromkeys(q.category for q in questions))
    unknown = [c for c in categories or () if c not in available]
    if unknown:
        raise BenchError(
            f"unknown category {unknown[0]!r}; the dataset has: {', '.join(available)}"
        )
    wanted = set(categories or available)
    taken: dict[str, int] = {}
    chosen = []
    for q in questions:
        if q.category in wanted and (limit is None or taken.get(q.category, 0) < limit):
            taken[q.category] = taken.get(q.category, 0) + 1
            chosen.append(q)
    return chosen
