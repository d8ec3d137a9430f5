"""`onepass bench`: dataset loading, interleaved runs, summary arithmetic, report and plots,
one-line errors and atomic outputs. Logic runs on fake runners and a tiny random-weight model;
speed is reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from onepass.bench import report
from onepass.bench.questions import BenchError, Question, load_questions, select
from onepass.bench.run import WARMUP_PROMPT, geometric_mean, run_questions, summarize
from onepass.bench.runners import Stateless, Turn
from onepass.cli import build_parser, main
from onepass.errors import OnepassError
from onepass.outputs import SpecDecodeStats

RECORD_KEYS = {
    "question_id",
    "category",
    "method",
    "new_tokens",
    "seconds",
    "tokens_per_s",
    "mean_acceptance_length",
    "identical_to_vanilla",
}
GROUP_KEYS = {"speedup", "tokens_per_s", "mean_acceptance_length", "identical_fraction"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def two_questions(path: Path) -> Path:
    return write_jsonl(
        path,
        [
            {"question_id": 1, "category": "chat", "turns": ["Say hello to the team.", "Again."]},
            {"question_id": 2, "category": "code_edit", "turns": ["Fix: def f(x): return x +"]},
        ],
    )


class FakeRunner(Stateless):
    """Returns fixed tokens; seconds[i] is the time of its i-th call (call 0 = warm-up)."""

    def __init__(
        self,
        name,
        log,
        tokens=(1, 2, 3, 4),
        seconds=(1.0,),
        stats=None,
        prefill=None,
        drafting=None,
    ):
        self.name, self.log, self.tokens = name, log, list(tokens)
        self.seconds, self.stats, self.calls = list(seconds), stats, 0
        self.prefill = prefill  # seconds to the first token, reported by every call (or None)
        self.drafting = drafting  # seconds of drafting, reported by every call (or None)

    def run(self, prompt_ids, max_tokens):
        self.log.append((self.name, tuple(prompt_ids), max_tokens))
        seconds = self.seconds[min(self.calls, len(self.seconds) - 1)]
        self.calls += 1
        stats = self.stats.pop(0) if self.stats else None
        text = f"answer of {self.name}"
        return Turn(list(self.tokens), text, seconds, stats, self.prefill, self.drafting)


def encode_by_length(messages):
    """Prompt ids that identify the conversation: one id per message, its content's length."""
    return [len(m["content"]) for m in messages]


QUESTIONS = [
    Question(1, "a", ("first",)),
    Question(2, "b", ("second question",)),
]


# -- dataset ------------------------------------------------------------------------------------


def test_builtin_prompt_set():
    questions = load_questions()
    per_category: dict[str, list[Question]] = {}
    for q in questions:
        per_category.setdefault(q.category, []).append(q)
    assert len(per_category) >= 6
    assert all(len(qs) >= 5 for qs in per_category.values())
    assert {"code_edit", "long_document"} <= set(per_category)
    assert all("```" in q.turns[0] for q in per_category["code_edit"])
    assert all(len(q.turns[0].split()) >= 300 for q in per_category["long_document"])
    assert len({q.question_id for q in questions}) == len(questions)


def test_spec_bench_format_selection_and_limit(tmp_path):
    rows = [
        {"question_id": i, "category": c, "turns": [f"question {i}"]}
        for i, c in enumerate(["x", "y", "x", "y", "x"], start=81)
    ]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are fine
    questions = load_questions(path)
    assert [q.question_id for q in questions] == [81, 82, 83, 84, 85]
    assert questions[0] == Question(81, "x", ("question 81",))
    chosen = select(questions, ["x"], 2)
    assert [q.question_id for q in chosen] == [81, 83]
    assert [q.question_id for q in select(questions, None, 1)] == [81, 82]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"question_id": 2, "turns": ["hi"]}', "line 2: missing key(s) category"),
        ('{"question_id": 2, "category": "c", "turns": []}', "line 2: turns must be"),
        ('{"question_id": 1, "category": "c", "turns": ["hi"]}', "line 2: duplicate question_id"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_malformed_line_names_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "c", "turns": ["hi"]}\n' + line + "\n")
    with pytest.raises(
        BenchError, match="q.jsonl, " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        load_questions(path)


def test_unknown_category_lists_the_dataset_categories():
    with pytest.raises(BenchError, match="unknown category 'poetry'; the dataset has: a, b"):
        select(QUESTIONS, ["a", "poetry"], None)


# -- interleaving, repeats, multi-turn ----------------------------------------------------------


def test_methods_of_a_prompt_run_back_to_back_vanilla_first():
    log: list = []
    runners = [FakeRunner(n, log) for n in ("vanilla", "ngram", "other")]
    records = run_questions(QUESTIONS, runners, encode_by_length, max_tokens=20, repeats=2)
    first, second = (len("first"),), (len("second question"),)
    warm_up = [(n, (len(WARMUP_PROMPT),), 8) for n in ("vanilla", "ngram", "other")]
    round_ = ["vanilla", "ngram", "other"]
    expected = (
        warm_up + [(n, first, 20) for n in round_ * 2] + [(n, second, 20) for n in round_ * 2]
    )
    assert log == expected
    assert [(r.question_id, r.method) for r in records] == [(q, m) for q in (1, 2) for m in round_]


def test_repeats_keep_the_median_run():
    log: list = []
    vanilla = FakeRunner("vanilla", log, seconds=[9.0, 2.0, 2.0, 2.0])
    method = FakeRunner("ngram", log, seconds=[9.0, 4.0, 1.0, 2.0])  # warm-up, then 3 repeats
    records = run_questions(
        QUESTIONS[:1], [vanilla, method], encode_by_length, max_tokens=4, repeats=3
    )
    ngram = records[1]
    assert ngram.repeat_seconds == [4.0, 1.0, 2.0]
    assert ngram.seconds == 2.0 and ngram.tokens_per_s == 2.0
    assert ngram.speedup == pytest.approx(1.0)


class LearningRunner(FakeRunner):
    """Twice as fast on a prompt it has seen: a drafter that remembers answers."""

    def __init__(self, name, log):
        super().__init__(name, log)
        self.seen: set = set()

    def checkpoint(self):
        return set(self.seen)

    def rewind(self, state):
        self.seen = set(state)

    def run(self, prompt_ids, max_tokens):
        turn = super().run(prompt_ids, max_tokens)
        turn.seconds = 0.5 if tuple(prompt_ids) in self.seen else 1.0
        self.seen.add(tuple(prompt_ids))
        return turn


def test_every_repeat_starts_from_what_the_runner_knew_before_the_prompt():
    log: list = []
    vanilla, learner = FakeRunner("vanilla", log), LearningRunner("ngram", log)
    records = run_questions(
        QUESTIONS, [vanilla, learner], encode_by_length, max_tokens=4, repeats=3
    )
    assert [r.repeat_seconds for r in records if r.method == "ngram"] == [[1.0] * 3, [1.0] * 3]
    assert learner.seen == {(len(WARMUP_PROMPT),), (len("first"),), (len("second question"),)}


def test_multi_turn_feeds_the_runners_own_answer_back():
    seen: list = []

    def encode(messages):
        seen.append([(m["role"], m["content"]) for m in messages])
        return [1]

    question = Question(7, "chat", ("turn one", "turn two"))
    records = run_questions(
        [question], [FakeRunner("vanilla", [])], encode, max_tokens=4, multi_turn=True
    )
    assert seen[-1] == [
        ("user", "turn one"),
        ("assistant", "answer of vanilla"),
        ("user", "turn two"),
    ]
    assert records[0].turns == 2 and records[0].new_tokens == 8
    single = run_questions([question], [FakeRunner("vanilla", [])], encode, max_tokens=4)
    assert single[0].turns == 1 and single[0].new_tokens == 4


def test_identical_to_vanilla_only_for_greedy():
    runners = [FakeRunner("vanilla", []), FakeRunner("same", []), FakeRunner("diff", [], (9,))]
    greedy = run_questions(QUESTIONS[:1], runners, encode_by_length, max_tokens=4)
    assert [r.identical_to_vanilla for r in greedy] == [True, True, False]
    sampled = run_questions(QUESTIONS[:1], runners, encode_by_length, max_tokens=4, greedy=False)
    assert [r.identical_to_vanilla for r in sampled] == [None, None, None]


def test_runner_error_names_question_and_method():
    class Broken(FakeRunner):
        def run(self, prompt_ids, max_tokens):
            if self.calls:
                raise ValueError("the prompt has 900 tokens")
            return super().run(prompt_ids, max_tokens)

    runners = [FakeRunner("vanilla", []), Broken("ngram", [])]
    with pytest.raises(BenchError, match=r"question 1 \(ngram\): the prompt has 900 tokens"):
        run_questions(QUESTIONS, runners, encode_by_length, max_tokens=4)


# -- summary arithmetic -------------------------------------------------------------------------


def test_geometric_mean():
    assert geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert geometric_mean([2.0, 8.0, 4.0]) == pytest.approx(4.0)
    assert geometric_mean([3.0]) == pytest.approx(3.0)
    for bad in ([], [1.0, 0.0], [-1.0]):
        with pytest.raises(ValueError):
            geometric_mean(bad)


def stats(drafts: int, accepted_per_pos: list[int]) -> SpecDecodeStats:
    return SpecDecodeStats(
        num_drafts=drafts,
        num_draft_tokens=drafts * len(accepted_per_pos),
        num_accepted_tokens=sum(accepted_per_pos),
        accepted_per_pos=accepted_per_pos,
    )


def test_summary_speedup_is_geometric_mean_of_per_prompt_ratios():
    """vanilla: 10 and 20 tokens/s; method: 20 and 80 tokens/s -> ratios 2 and 4."""
    ten = (1,) * 10
    vanilla = FakeRunner("vanilla", [], ten, seconds=[1.0, 1.0, 0.5])
    method = FakeRunner(
        "m", [], ten, seconds=[1.0, 0.5, 0.125], stats=[None, stats(10, [6, 4]), stats(30, [10, 5])]
    )
    records = run_questions(QUESTIONS, [vanilla, method], encode_by_length, max_tokens=10)
    assert [r.speedup for r in records] == pytest.approx([1.0, 2.0, 1.0, 4.0])
    summary = summarize(records)
    overall = summary["m"]["overall"]
    assert overall["speedup"] == pytest.approx(math.sqrt(8))
    assert summary["m"]["a"]["speedup"] == pytest.approx(2.0)
    assert summary["m"]["b"]["speedup"] == pytest.approx(4.0)
    assert overall["tokens_per_s"] == pytest.approx(20 / 0.625)  # pooled tokens / seconds
    assert overall["mean_acceptance_length"] == pytest.approx(1 + 25 / 40)
    assert overall["acceptance_per_position"] == pytest.approx([16 / 40, 9 / 40])
    assert overall["identical_fraction"] == 1.0
    assert summary["vanilla"]["overall"]["speedup"] == pytest.approx(1.0)
    assert summary["vanilla"]["overall"]["mean_acceptance_length"] is None  # no stats reported
    assert list(summary["m"]) == ["overall", "a", "b"]


def test_decode_speedup_leaves_the_prefill_out():
    """11 tokens, prefill 0.5 s: vanilla 10 tokens in 1.0 s after it, the method 10 in 0.25 s
    -> 4x without prefill, 1.5 / 0.75 = 2x with it. Runners that do not report their prefill
    (peers) get no decode speedup."""
    eleven = (1,) * 11
    vanilla = FakeRunner("vanilla", [], eleven, seconds=[1.5], prefill=0.5)
    method = FakeRunner("m", [], eleven, seconds=[0.75], prefill=0.5)
    peer = FakeRunner("peer", [], eleven, seconds=[0.75])
    records = run_questions(QUESTIONS[:1], [vanilla, method, peer], encode_by_length, max_tokens=11)
    by_method = {r.method: r for r in records}
    assert by_method["m"].speedup == pytest.approx(2.0)
    assert by_method["m"].decode_speedup == pytest.approx(4.0)
    assert by_method["m"].prefill_seconds == pytest.approx(0.5)
    assert by_method["peer"].prefill_seconds is None
    assert by_method["peer"].speedup == pytest.approx(2.0)
    assert by_method["peer"].decode_speedup is None
    summary = summarize(records)
    assert summary["m"]["overall"]["decode_speedup"] == pytest.approx(4.0)
    assert summary["peer"]["overall"]["decode_speedup"] is None


def test_free_verification_speedup_prices_every_forward_as_a_plain_step():
    """vanilla: 11 tokens, prefill 0.5 s, then 10 forwards in 1.0 s (0.1 s each). The method:
    4 forwards -> 0.5 + 4 x 0.1 = 0.9 s if its forwards were free -> 1.5 / 0.9; its measured
    1.0 s gives 1.5x, the gap is what its verification cost. Peers and runners without stats
    get none."""
    eleven = (1,) * 11
    vanilla = FakeRunner(
        "vanilla", [], eleven, seconds=[1.5], prefill=0.5, stats=[stats(10, [])] * 2
    )
    method = FakeRunner("m", [], eleven, seconds=[1.0], prefill=0.5, stats=[None, stats(4, [4, 2])])
    peer = FakeRunner("peer", [], eleven, seconds=[0.75])
    records = run_questions(QUESTIONS[:1], [vanilla, method, peer], encode_by_length, max_tokens=11)
    by_method = {r.method: r for r in records}
    assert by_method["m"].speedup == pytest.approx(1.5)
    assert by_method["m"].free_verification_speedup == pytest.approx(1.5 / 0.9)
    assert by_method["vanilla"].free_verification_speedup == pytest.approx(1.0)
    assert by_method["peer"].free_verification_speedup is None
    summary = summarize(records)
    assert summary["m"]["overall"]["free_verification_speedup"] == pytest.approx(1.5 / 0.9)
    assert summary["peer"]["overall"]["free_verification_speedup"] is None


def test_drafting_share_is_of_the_seconds_after_the_first_token():
    """1.5 s, 0.5 s of them prefill, 0.25 s drafting: a quarter of the decoding time. Runners
    that do not report drafting (peers) get none."""
    vanilla = FakeRunner("vanilla", [], seconds=[1.5], prefill=0.5, drafting=0.0)
    method = FakeRunner("m", [], seconds=[1.5], prefill=0.5, drafting=0.25)
    peer = FakeRunner("peer", [], seconds=[1.0])
    records = run_questions(QUESTIONS, [vanilla, method, peer], encode_by_length, max_tokens=4)
    summary = summarize(records)
    assert summary["m"]["overall"]["drafting_share"] == pytest.approx(0.25)
    assert summary["vanilla"]["overall"]["drafting_share"] == 0.0
    assert summary["peer"]["overall"]["drafting_share"] is None


# -- report, plots, atomic writes ---------------------------------------------------------------


def fake_results() -> dict:
    runners = [
        FakeRunner("vanilla", [], seconds=[1.0]),
        FakeRunner("ngram", [], seconds=[0.5], stats=[None, stats(2, [2, 1]), stats(2, [1])]),
    ]
    records = run_questions(QUESTIONS, runners, encode_by_length, max_tokens=4)
    return {
        "env": {"onepass": "0.1.0", "cpu": "test cpu"},
        "model": "fake",
        "command": "onepass bench --max-tokens 4",
        "settings": {
            "dataset": None,
            "categories": ["a", "b"],
            "num_questions": 2,
            "repeats": 1,
            "multi_turn": False,
            "chat_template": True,
            "sampling": {"max_tokens": 4, "temperature": 0.0},
        },
        "records": [vars(r) for r in records],
        "summary": summarize(records),
    }


def test_markdown_report_has_the_tables():
    text = report.render_markdown(fake_results())
    for heading in (
        "Speedup over plain decoding",
        "Speedup excluding prefill",
        "Speedup if verification were free",
        "Tokens per second",
        "Mean acceptance length",
        "Share of decoding time spent drafting",
        "Greedy output identical to vanilla",
        "Acceptance rate by draft position",
        "Environment",
    ):
        assert f"\n## {heading}\n" in text
    assert text.count("| method | overall | a | b |") == 7
    assert "| ngram | 2.00x | 2.00x | 2.00x |" in text
    assert "| ngram | 75% | 25% |" in text  # by position, pooled: (2 + 1) / 4, (1 + 0) / 4
    assert "onepass bench --max-tokens 4" in text and "| cpu | test cpu |" in text


def test_plots_and_files_are_written(tmp_path):
    paths = (tmp_path / "r.json", tmp_path / "r.md", tmp_path / "p.png")
    written = report.write_outputs(fake_results(), *paths)
    assert set(written) == {*paths[:2], paths[2], tmp_path / "p_acceptance.png"}
    for png in (tmp_path / "p.png", tmp_path / "p_acceptance.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert json.loads(paths[0].read_text())["model"] == "fake"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_a_failing_render_writes_nothing(tmp_path, monkeypatch):
    def broken(results):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "acceptance_figure", broken)
    paths = (tmp_path / "r.json", tmp_path / "r.md", tmp_path / "p.png")
    with pytest.raises(RuntimeError):
        report.write_outputs(fake_results(), *paths)
    assert list(tmp_path.iterdir()) == []


# -- the command on a tiny random model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face directory: tiny random Llama + the default model's tokenizer."""
    from conftest import hf_model, tiny_config
    from safetensors.torch import save_file

    from onepass.models.loading import load_model

    path = tmp_path_factory.mktemp("tiny")
    model = hf_model(tiny_config("llama", vocab_size=49152))
    model.config.save_pretrained(path)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, path / "model.safetensors")
    load_model("default").tokenizer.save_pretrained(path)
    return path


def bench(model: Path, *extra: str) -> int:
    return main(["bench", "--model", str(model), "--no-progress", "--max-tokens", "6", *extra])


def test_bench_command_end_to_end(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dataset = two_questions(tmp_path / "q.jsonl")
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "p.png"
    args = ["--dataset", str(dataset), "--methods", "ngram", "--peers", "hf"]
    args += ["--variant", 'short={"method": "ngram", "prompt_lookup_max": 2}']
    args += ["--multi-turn", "--repeats", "2"]
    args += ["--output", str(out), "--report", str(md), "--plot", str(png)]
    assert bench(tiny_model_dir, *args) == 0, capsys.readouterr().err

    results = json.loads(out.read_text())
    assert {"env", "model", "settings", "records", "summary", "command"} <= set(results)
    assert {"onepass", "torch", "transformers", "python", "cpu", "torch_threads"} <= set(
        results["env"]
    )
    methods = ["vanilla", "ngram", "short", "hf", "hf_pld"]
    assert [(r["question_id"], r["method"]) for r in results["records"]] == [
        (q, m) for q in (1, 2) for m in methods
    ]
    for r in results["records"]:
        assert set(r) >= RECORD_KEYS and 0 < r["new_tokens"] <= 12 and r["seconds"] > 0
        assert isinstance(r["identical_to_vanilla"], bool)
        assert r["turns"] == (2 if r["question_id"] == 1 else 1)  # multi-turn: both turns
        assert len(r["repeat_seconds"]) == 2
    ngram = [r for r in results["records"] if r["method"] in ("ngram", "short")]
    assert all(r["identical_to_vanilla"] for r in ngram)  # lossless on the same backend
    assert all(r["mean_acceptance_length"] >= 1.0 for r in ngram)
    assert list(results["summary"]) == methods
    for groups in results["summary"].values():
        assert list(groups) == ["overall", "chat", "code_edit"]
        assert all(set(g) >= GROUP_KEYS for g in groups.values())

    assert "| method | overall | chat | code_edit |" in md.read_text()
    assert png.stat().st_size > 5000 and (tmp_path / "p_acceptance.png").stat().st_size > 5000
    assert "## Speedup over plain decoding" in capsys.readouterr().out

    # The recorded command reproduces the settings.
    command = shlex.split(results["command"])
    assert command[:2] == ["onepass", "bench"]
    again = build_parser().parse_args(command[1:])
    assert again.methods == "ngram" and again.peers == "hf" and again.max_tokens == 6
    assert again.multi_turn and again.repeats == 2
    assert again.variant == ['short={"method": "ngram", "prompt_lookup_max": 2}']
    assert again.dataset == str(dataset) and again.output == str(out)


def test_failed_run_leaves_no_output(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The second question is longer than the tiny model's context: the run fails after the
    first question, with a one-line error and no file written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dataset = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question_id": 1, "category": "chat", "turns": ["Hello there."]},
            {"question_id": 2, "category": "chat", "turns": ["word " * 400]},
        ],
    )
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "p.png"
    args = ["--dataset", str(dataset), "--methods", "ngram", "--output", str(out)]
    assert bench(tiny_model_dir, *args, "--report", str(md), "--plot", str(png)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onepass: error: question 2 (vanilla): the prompt has")
    assert len(err.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == ["q.jsonl"]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--dataset", str(d / "missing.jsonl")], "missing.jsonl' not found"),
        (lambda d: ["--dataset", str(d / "bad.jsonl")], "bad.jsonl, line 3: not valid JSON"),
        (lambda d: ["--categories", "chat,poetry"], "unknown category 'poetry'; the dataset has:"),
        (lambda d: ["--methods", "ngram,magic"], "unknown method 'magic'; valid: vanilla, ngram"),
        (lambda d: ["--peers", "vllm"], "unknown peer 'vllm'; valid: hf"),
        (lambda d: ["--variant", "auto"], "--variant takes NAME=JSON, got 'auto'"),
        (lambda d: ["--variant", "x={oops"], "--variant x: not valid JSON"),
        (lambda d: ["--variant", 'ngram={"method": "ngram"}'], "variant name 'ngram' is taken"),
        (lambda d: ["--variant", 'x={"method": "magic"}'], "variant 'x': "),
        (lambda d: ["--repeats", "0"], "repeats must be at least 1"),
        (lambda d: ["--plot", str(d / "no" / "p.png")], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, make_args, message):
    good = '{"question_id": 1, "category": "chat", "turns": ["hi"]}\n'
    (tmp_path / "bad.jsonl").write_text(good + "\n" + '{"question_id": 2,\n')
    out = tmp_path / "r.json"
    # The model is never loaded: every input is checked first.
    code = main(["bench", "--model", "/no/such/model", "--output", str(out), *make_args(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onepass: error:") and message in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_llama_cpp_is_a_clear_error(monkeypatch):
    from onepass.bench import runners

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(OnepassError, match="needs llama-cpp-python, which is not installed"):
        runners.check_peers(["llamacpp"])
