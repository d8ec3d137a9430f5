"""Issue 19: shared use, odd values and ordinary mistakes never give wrong output or a
traceback. Each test names the item it covers; the property-based sweeps are in
test_hardening_properties.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest

from onepass import SamplingParams
from onepass.cli import main
from onepass.config import ConfigError, SpeculativeConfig
from onepass.errors import BusyError, InputError, OnepassError
from onepass.text import OutputAssembler

GREEDY = SamplingParams(temperature=0, max_tokens=24)
CHAT = [{"role": "user", "content": "Name three rivers and one fact about each."}]
OTHER = [{"role": "user", "content": "Write a haiku about the sea."}]


def texts(outputs):
    return [o.outputs[0].token_ids for o in outputs]


# -- 1. one LLM, two requests at once ----------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("spec", [None, {"method": "auto"}])
def test_two_threads_on_one_llm_get_their_single_request_outputs(llm, spec):
    alone = {
        "a": llm.chat(CHAT, GREEDY, speculative_config=spec)[0].outputs[0].token_ids,
        "b": llm.chat(OTHER, GREEDY, speculative_config=spec)[0].outputs[0].token_ids,
    }
    results: dict[str, list[list[int]]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(key, messages):
        try:
            start.wait()
            for _ in range(3):
                out = llm.chat(messages, GREEDY, speculative_config=spec)
                results[key].append(out[0].outputs[0].token_ids)
        except BaseException as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=a) for a in (("a", CHAT), ("b", OTHER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert results == {"a": [alone["a"]] * 3, "b": [alone["b"]] * 3}


@pytest.mark.real_model
def test_threads_streaming_at_once_get_their_single_request_outputs(llm):
    alone = [llm.chat(m, GREEDY)[0].outputs[0].token_ids for m in (CHAT, OTHER)]
    got: list[list[int]] = [[], []]

    def work(i, messages):
        for chunk in llm.stream(messages, GREEDY):
            got[i] += chunk.outputs[0].token_ids

    threads = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate((CHAT, OTHER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == alone


@pytest.mark.real_model
@pytest.mark.parametrize("second", ["stream", "generate", "chat"])
def test_a_second_request_while_a_stream_is_live_is_refused_not_corrupted(llm, second):
    alone = llm.chat(CHAT, GREEDY)[0].outputs[0].token_ids
    first = llm.stream(CHAT, GREEDY)
    tokens = list(next(first).outputs[0].token_ids)
    with pytest.raises(BusyError, match="still being iterated"):
        if second == "stream":
            next(llm.stream(OTHER, GREEDY))
        elif second == "generate":
            llm.generate("Hello", GREEDY)
        else:
            llm.chat(OTHER, GREEDY)
    for chunk in first:  # the first request is unharmed
        tokens += chunk.outputs[0].token_ids
    assert tokens == alone
    assert texts(llm.chat(CHAT, GREEDY)) == [alone]  # and the LLM is free again


@pytest.mark.real_model
def test_a_closed_stream_frees_the_llm(llm):
    first = llm.stream(CHAT, GREEDY)
    next(first)
    first.close()
    assert llm.chat(CHAT, GREEDY)[0].outputs[0].token_ids


# -- 2. non-finite and degenerate values -------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": float("nan")},
        {"min_p": float("nan")},
        {"repetition_penalty": float("nan")},
        {"repetition_penalty": float("inf")},
        {"presence_penalty": float("nan")},
        {"frequency_penalty": float("-inf")},
    ],
)
def test_non_finite_floats_are_rejected(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(InputError, match=f"{name} must be a finite number"):
        SamplingParams(**kwargs)


def test_tiny_temperatures_are_greedy(tiny_llm):
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    greedy = tiny_llm.chat(CHAT, GREEDY)
    tiny = tiny_llm.chat(CHAT, SamplingParams(temperature=1e-40, max_tokens=24, seed=1))
    assert texts(tiny) == texts(greedy)
    assert len(set(texts(greedy)[0])) > 1  # not one token repeated


def test_cli_rejects_nan_temperature(capsys):
    assert main(["generate", "hi", "--temperature", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onepass: error: temperature must be a finite number, got nan"


# -- 7. types are checked where the options are built ------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "lookahead", "level": 2.5}, "level must be an integer, got 2.5"),
        ({"method": "ngram", "prompt_lookup_max": "4"}, "prompt_lookup_max must be an integer"),
        ({"method": "auto", "methods": "ngram"}, "methods must be a list of strings"),
        ({"method": "recycling", "persist": 1}, "persist must be true or false"),
        ({"method": "suffix", "backoff": float("nan")}, "backoff must be a finite number"),
        ({"method": "ngram", "num_speculative_tokens": 4.0}, "num_speculative_tokens must be"),
        ({"method": ["ngram"]}, "method must be a string"),
    ],
)
def test_speculative_options_are_type_checked_when_built(config, message):
    with pytest.raises(ConfigError, match=message):
        SpeculativeConfig.parse(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": "0"}, "temperature must be a finite number, got '0'"),
        ({"max_tokens": 16.0}, "max_tokens must be an integer or None"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"stop": 3}, "stop must be a string or a list of strings or None"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids must be a list of integers"),
        ({"seed": 2**64}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        ({"seed": -(2**63) - 1}, "seed must be an integer in"),
        ({"seed": "7"}, "seed must be an integer or None"),
        ({"n": 1000}, "n must be an integer in 1..128"),
    ],
)
def test_sampling_params_are_type_checked_when_built(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)


def test_extreme_seeds_generate(tiny_llm):
    for seed in (0, 2**64 - 1, -(2**63)):
        out = tiny_llm.generate("Once", SamplingParams(seed=seed, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 3}],
        [{"role": None, "content": "hi"}],
        [{"role": "user"}],
        ["hi"],
        [],
    ],
)
def test_bad_chat_messages_are_one_clear_error(tiny_llm, messages):
    with pytest.raises(InputError) as e:
        tiny_llm.chat(messages, GREEDY)
    assert "\n" not in str(e.value)


def test_a_bad_prompt_in_a_batch_fails_before_any_runs(tiny_llm, monkeypatch):
    ran = []
    monkeypatch.setattr(tiny_llm, "_run_all", lambda *a: ran.append(a))
    with pytest.raises(InputError):
        tiny_llm.generate(["fine", ""], GREEDY)
    assert not ran


# -- 8. the CLI: broken pipes, closed stdin, a conversation that outgrows the window -----------


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "onepass.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


@pytest.mark.real_model
def test_generate_into_a_closed_pipe_ends_quietly():
    proc = cli("generate", "Tell me a long story about a fox.", "--max-tokens", "64")
    assert proc.stdout.read(5)
    proc.stdout.close()  # as `| head -c 5` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_chat_with_stdin_closed_is_one_line():
    proc = cli("chat", preexec_fn=lambda: os.close(0))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.decode().strip() == (
        "onepass: error: chat reads the conversation from standard input, which is closed"
    )


def typed(lines):
    """input() replaced: the lines, then Ctrl-D."""
    pending = iter(lines)

    def read(prompt=""):
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_drops_the_oldest_turns_when_the_window_is_full(tiny_llm, monkeypatch, capsys):
    import onepass.cli as cli_module

    lines = [f"message {i}: " + "tell me more about rivers " * 4 for i in range(8)]
    monkeypatch.setattr("builtins.input", typed(lines))
    monkeypatch.setattr(cli_module, "load_llm", lambda args: tiny_llm)
    asked = []
    real_stream = tiny_llm.stream

    def stream(messages, *args, **kwargs):
        asked.append([m["content"] for m in messages])
        return real_stream(messages, *args, **kwargs)

    monkeypatch.setattr(tiny_llm, "stream", stream)
    assert main(["chat", "--max-tokens", "40", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "the conversation outgrew the context window (256 tokens); dropped the oldest" in err
    assert len(asked) == 8  # every message was answered
    assert asked[-1][-1].startswith("message 7") and not asked[-1][0].startswith("message 0")


def test_chat_message_too_long_for_the_window_is_refused_and_the_chat_goes_on(
    tiny_llm, monkeypatch, capsys
):
    import onepass.cli as cli_module

    monkeypatch.setattr("builtins.input", typed(["hello", "word " * 400, "again"]))
    monkeypatch.setattr(cli_module, "load_llm", lambda args: tiny_llm)
    assert main(["chat", "--max-tokens", "20", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "this message does not fit in the context window" in captured.err
    assert captured.out.count("assistant> ") == 2


# -- 9. empty prompts in every mode --------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--no-chat-template"]])
def test_cli_empty_prompt_is_an_error_in_every_mode(extra, capsys, monkeypatch, tiny_llm):
    import onepass.cli as cli_module

    monkeypatch.setattr(cli_module, "load_llm", lambda args: tiny_llm)
    assert main(["generate", "", *extra]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    ],
)
def test_api_empty_conversation_is_an_error(tiny_llm, messages):
    with pytest.raises(InputError, match="the prompt is empty"):
        tiny_llm.chat(messages)
    with pytest.raises(InputError, match="the prompt is empty"):
        next(tiny_llm.stream(messages))
    with pytest.raises(InputError, match="the prompt is empty"):
        tiny_llm.generate("")


# -- 10. min_tokens holds back stop strings ------------------------------------------------------


def test_min_tokens_holds_back_stop_strings_in_the_assembler(tiny_llm):
    tok = tiny_llm.tokenizer
    ids = tok("a\nb\nc d e f g h i j k l m", add_special_tokens=False)["input_ids"]
    params = SamplingParams(min_tokens=6, max_tokens=40, stop=["\n"])
    assembler = OutputAssembler(tok, [1], params, [])
    assembler.add(ids)
    assert assembler.finish_reason is None  # both newlines came before min_tokens
    early = SamplingParams(max_tokens=40, stop=["\n"])
    assembler = OutputAssembler(tok, [1], early, [])
    assembler.add(ids)
    assert assembler.text == "a" and assembler.finish_reason == "stop"


@pytest.mark.real_model
def test_min_tokens_holds_back_stop_strings_end_to_end(llm):
    messages = [{"role": "user", "content": "List five fruits, one per line."}]
    early = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64, stop=["\n"]))
    assert len(early[0].outputs[0].token_ids) < 10  # the model's first newline comes early
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=10, stop=["\n"])
    for spec in (None, {"method": "auto"}):
        out = llm.chat(messages, params, speculative_config=spec)[0].outputs[0]
        assert len(out.token_ids) >= 10 and out.finish_reason == "stop"


# -- 11. the context window --------------------------------------------------------------------


def test_max_model_len_is_validated(tiny_llm):
    from onepass import LLM

    path = str(tiny_llm.cache_dir.parent)
    for bad, message in (
        (0, "max_model_len must be in 2..512"),
        (1, "max_model_len must be in 2..512"),
        (10_000, "max_model_len must be in 2..512"),
        (64.0, "max_model_len must be an integer"),
    ):
        with pytest.raises(InputError, match=message):
            LLM(path, max_model_len=bad, cache_dir=tiny_llm.cache_dir)


def test_max_tokens_that_cannot_fit_is_an_error_that_says_why(tiny_llm):
    ids = list(range(100, 200))
    with pytest.raises(InputError, match="the prompt has 100 tokens and max_tokens is 157"):
        tiny_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=157))
    with pytest.raises(InputError, match="exceed the context window of 256"):
        next(tiny_llm.stream({"prompt_token_ids": ids}, SamplingParams(max_tokens=157)))
    fits = tiny_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=156))[0]
    assert len(ids) + len(fits.outputs[0].token_ids) <= 256


@pytest.mark.parametrize("spec", [None, {"method": "ngram"}, {"method": "auto"}])
def test_prompt_plus_output_never_exceed_the_window(tiny_llm, spec):
    ids = [7, 8, 9] * 30  # repetitive: copy drafters propose long drafts up to the end
    out = tiny_llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
        speculative_config=spec,
    )[0].outputs[0]
    assert len(ids) + len(out.token_ids) == 256 and out.finish_reason == "length"


# -- 12. metrics count only what was emitted ---------------------------------------------------


@pytest.mark.parametrize("max_tokens", [2, 3, 5, 9])
def test_metrics_count_only_emitted_tokens(tiny_llm, max_tokens):
    ids = [7, 8, 9, 10] * 20  # ngram drafts long chains here
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = tiny_llm.generate(
        {"prompt_token_ids": ids}, params, speculative_config={"method": "ngram"}
    )
    spec, tokens = out[0].metrics.spec, out[0].outputs[0].token_ids
    # the prefill emits one token, each verification step its accepted tokens plus one
    assert 1 + spec.num_drafts + spec.num_accepted_tokens == len(tokens) == max_tokens
    assert spec.mean_acceptance_length <= max_tokens
    assert sum(spec.accepted_per_pos) == spec.num_accepted_tokens


@pytest.mark.parametrize("how", ["stop_token_ids", "stop"])
def test_metrics_do_not_count_tokens_drafted_past_a_stop(tiny_llm, how):
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    # The tiny random model falls into a cycle; a prompt that holds one round of it makes
    # ngram draft (and the target accept) long chains from the first step on.
    first = tiny_llm.generate({"prompt_token_ids": [7, 8, 9, 10] * 20}, greedy)[0]
    prompt = [7, 8, 9, 10] * 20 + first.outputs[0].token_ids[:41]  # ends one round in
    plain = tiny_llm.generate({"prompt_token_ids": prompt}, greedy.replace(max_tokens=12))[0]
    tokens = plain.outputs[0].token_ids
    cut = next(i for i in range(4, 12) if tokens[i] not in tokens[:i])  # its first occurrence
    stop = {"stop_token_ids": [tokens[cut]]} if how == "stop_token_ids" else {}
    if how == "stop":
        stop = {"stop": [tiny_llm.tokenizer.decode(tokens[cut : cut + 1])]}
    params = greedy.replace(max_tokens=30, **stop)
    out = tiny_llm.generate(
        {"prompt_token_ids": prompt}, params, speculative_config={"method": "ngram"}
    )
    spec, emitted = out[0].metrics.spec, out[0].outputs[0].token_ids
    assert out[0].outputs[0].finish_reason == "stop"
    assert emitted[:cut] == tokens[:cut] and len(emitted) <= cut + 1
    assert spec.num_drafts <= 2  # precondition: a long accepted chain crossed the stop
    assert 1 + spec.num_drafts + spec.num_accepted_tokens == len(emitted)


# -- 13. SamplingParams cannot be changed behind validation's back -----------------------------


def test_sampling_params_are_immutable_and_replace_validates():
    p = SamplingParams(stop=["x"], stop_token_ids=[5])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = float("nan")
    with pytest.raises(AttributeError):
        p.stop.append("y")  # a tuple: the stop list cannot change behind the assembler's back
    q = p.replace(stop=["y"], max_tokens=3)
    assert q.stop_strings == ("y",) and q.max_tokens == 3 and p.stop_strings == ("x",)
    with pytest.raises(InputError, match="temperature"):
        p.replace(temperature=float("nan"))
    assert SamplingParams(top_k=3) == SamplingParams(top_k=3)
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


def test_errors_are_onepass_errors_and_value_errors():
    for error in (InputError, ConfigError):
        assert issubclass(error, OnepassError) and issubclass(error, ValueError)
    assert issubclass(BusyError, OnepassError)


def test_recycling_with_top_k_1_drafts_a_chain_and_stays_lossless(tiny_llm):
    ids = [7, 8, 9, 10] * 20
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = {"method": "recycling", "top_k": 1}
    for _ in range(2):  # the first run fills the candidate table the second drafts from
        fast = tiny_llm.generate({"prompt_token_ids": ids}, params, speculative_config=spec)[0]
    plain = tiny_llm.generate({"prompt_token_ids": ids}, params)[0]
    assert fast.outputs[0].token_ids == plain.outputs[0].token_ids
    assert fast.metrics.spec.num_draft_tokens > 0
