"""Benchmark prompts: Spec-Bench's JSONL format (`question_id`, `category`, `turns`) and the
built-in prompt set."""

from __future__ import annotations

import json
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
