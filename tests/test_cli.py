"""The command line: help, one-line errors with exit code 2, and real runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from onepass.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onepass.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: onepass" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "hi", "--method", "magic"], "unknown speculative method 'magic'; valid:"),
        (["generate", "hi", "--speculative-config", "{bad"], "not valid JSON"),
        (
            ["generate", "hi", "--method", "ngram", "--speculative-config", '{"colour": 1}'],
            "unknown key(s) colour for method 'ngram'; its keys: prompt_lookup_min",
        ),
        (["generate", "hi", "--prompt-lookup-max", "3"], "need --method"),
        (["generate", "hi", "--model", "/no/such/model.gguf"], "not found"),
        (["generate", "", "--no-chat-template"], "prompt is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onepass: error:") and message in err
    assert len(err.splitlines()) == 1


@pytest.mark.real_model
def test_generate_prints_text_and_summary():
    r = run("generate", "What is 2 + 2?", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "new tokens (prompt" in r.stderr and "tokens/s" in r.stderr


@pytest.mark.real_model
def test_chat_repl_keeps_the_conversation():
    import re

    r = subprocess.run(
        [sys.executable, "-m", "onepass.cli", "chat", "-v", "--max-tokens", "24"],
        input="My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 3
    prompts = [int(n) for n in re.findall(r"\(prompt (\d+)\)", r.stderr)]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0] + 10  # the second turn carries the first exchange
    assert prompts[2] < prompts[1]  # /reset forgot it


@pytest.mark.parametrize(
    ("flags", "label"),
    [([], "auto:"), (["--method", "none"], "vanilla:"), (["--method", "ngram"], "ngram:")],
)
def test_generate_speculates_with_auto_unless_told_otherwise(
    flags, label, tiny_llm, monkeypatch, capsys
):
    import onepass.cli as cli_module

    monkeypatch.setattr(cli_module, "load_llm", lambda args: tiny_llm)
    assert main(["generate", "Once upon a time", "--max-tokens", "8", *flags]) == 0
    assert capsys.readouterr().err.startswith(label)


def test_method_none_takes_no_speculative_options(capsys):
    assert main(["generate", "hi", "--method", "none", "-k", "4"]) == 2
    assert "takes no speculative options" in capsys.readouterr().err
