"""Property-based sweeps (hypothesis) over SamplingParams fields, speculative_config values and
the command line: wrong types, NaN, infinities, huge and negative numbers. Every case either
generates normally (and, for greedy speculation, exactly what plain decoding generates) or
raises onepass's own error with a one-line message; the CLI exits 2 with that line and no
traceback."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import fields

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onepass import SamplingParams
from onepass.cli import main
from onepass.config import SpeculativeConfig
from onepass.drafters import METHODS, options_class
from onepass.errors import OnepassError

sweep = settings(
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ODD_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-40, 1e300, -1.0, 0.0, 0.5, 2.0]),
)
ODD_INTS = st.one_of(
    st.integers(-3, 40), st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, -(10**9)])
)
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    ODD_INTS,
    ODD_FLOATS,
    st.text(max_size=3),
    st.lists(st.integers(-2, 60), max_size=3),
    st.lists(st.text(max_size=2), max_size=2),
    st.lists(st.lists(st.integers(-1, 3), max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
SAMPLING_FIELDS = [f.name for f in fields(SamplingParams) if f.init]
PROBABILITIES = st.floats(0.01, 1.0)
VALID_SAMPLING = {
    "n": st.integers(1, 3),
    "temperature": st.one_of(st.just(0.0), st.floats(0.0, 2.0)),
    "top_p": PROBABILITIES,
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0.0, 1.0),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "max_tokens": st.integers(1, 12),
    "min_tokens": st.integers(0, 1),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=2), st.lists(st.text(min_size=1))),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "ignore_eos": st.booleans(),
    "repetition_penalty": st.floats(0.5, 2.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
}


def fields_of(valid: dict, odd_keys: list[str]) -> st.SearchStrategy[dict]:
    """Some valid values, and half the time one odd value (any type) among them."""
    good = st.fixed_dictionaries({}, optional=valid)
    odd = st.one_of(st.just({}), st.dictionaries(st.sampled_from(odd_keys), ODD_VALUES, max_size=1))
    return st.tuples(good, odd).map(lambda pair: {**pair[0], **pair[1]})


TINY = "<the tiny test model>"


def one_line(error: BaseException) -> None:
    assert isinstance(error, OnepassError), f"{type(error).__name__}: {error}"
    assert str(error) and "\n" not in str(error)


def accepted_values_are_sane(params: SamplingParams) -> None:
    for f in fields(params):
        value = getattr(params, f.name)
        if isinstance(value, float):
            assert math.isfinite(value), f.name
        if f.name in ("n", "top_k", "min_tokens", "max_tokens", "seed") and value is not None:
            assert type(value) is int, f.name


def generate(llm, params, spec=None):
    return llm.generate("Once upon a time", params, speculative_config=spec)


@sweep
@given(kwargs=fields_of(VALID_SAMPLING, SAMPLING_FIELDS))
def test_any_sampling_params_generate_or_fail_in_one_line(tiny_llm, kwargs):
    kwargs = {"max_tokens": 8, **kwargs}  # keep the valid cases short
    try:
        params = SamplingParams(**kwargs)
        accepted_values_are_sane(params)
        outputs = generate(tiny_llm, params)
    except Exception as e:  # anything but onepass's own one-line error fails the test
        one_line(e)
        event("rejected")
        return
    event("generated")
    completions = outputs[0].outputs
    assert len(completions) == params.n
    for c in completions:
        assert c.finish_reason in ("stop", "length")
        assert params.max_tokens is None or len(c.token_ids) <= params.max_tokens
        assert len(c.token_ids) >= min(params.min_tokens, params.max_tokens or 256)


def plausible(annotation) -> st.SearchStrategy:
    """Values of the right type and a sensible size for an option annotated `annotation`."""
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(1, 16)
    if annotation is float:
        return st.floats(0.05, 0.99)
    if annotation == list[str]:
        return st.lists(st.sampled_from(["ngram", "suffix", "recycling"]), min_size=1, max_size=3)
    if annotation == list[list[int]] | None:
        path = st.lists(st.integers(0, 3), min_size=1, max_size=3)
        return st.one_of(st.none(), st.lists(path, min_size=1, max_size=4))
    return st.none()  # str | None: the suffix corpus, a file path


def method_configs() -> st.SearchStrategy[dict]:
    def for_method(method: str) -> st.SearchStrategy[dict]:
        hints = typing.get_type_hints(options_class(method))
        valid = {name: plausible(annotation) for name, annotation in hints.items()}
        valid["num_speculative_tokens"] = st.integers(1, 64)
        if method == "draft_model":  # the tiny model drafts for itself: no second real model
            valid["model"] = st.just(TINY)
        odd_keys = [*hints, "num_speculative_tokens", "acceptance_method", "colour"]
        return fields_of(valid, odd_keys).map(lambda o: {**o, "method": method})

    return st.sampled_from(sorted(METHODS)).flatmap(for_method)


@sweep
@given(config=method_configs())
def test_any_speculative_config_is_lossless_or_fails_in_one_line(tiny_llm, config):
    params = SamplingParams(temperature=0, max_tokens=12)
    if config["method"] == "draft_model" and config.get("model", TINY) == TINY:
        config = {**config, "model": str(tiny_llm.cache_dir.parent)}
    try:
        spec = SpeculativeConfig.parse(config)
        outputs = generate(tiny_llm, params, spec)
    except Exception as e:
        one_line(e)
        event("rejected")
        return
    event(f"generated with {spec.method}")
    if spec.lossless:
        plain = generate(tiny_llm, params)
        assert outputs[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


FLAGS = {
    "--temperature": ODD_FLOATS,
    "--top-p": ODD_FLOATS,
    "--top-k": ODD_INTS,
    "--min-p": ODD_FLOATS,
    "--seed": ODD_INTS,
    "--max-tokens": ODD_INTS,
    "--repetition-penalty": ODD_FLOATS,
    "--presence-penalty": ODD_FLOATS,
    "-k": ODD_INTS,
}
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.text(max_size=3))


@sweep
@given(
    flags=st.dictionaries(
        st.sampled_from(sorted(FLAGS)), st.one_of(st.text(max_size=4), ODD_VALUES), max_size=3
    ),
    method=st.one_of(st.none(), st.sampled_from([*sorted(METHODS), "magic"])),
    json_config=st.one_of(
        st.none(), st.dictionaries(st.sampled_from(["level", "top_k", "x"]), JSON_VALUES)
    ),
)
def test_cli_exits_0_or_2_with_one_line(tiny_llm, monkeypatch, capsys, flags, method, json_config):
    import onepass.cli as cli_module

    monkeypatch.setattr(cli_module, "load_llm", lambda args: tiny_llm)
    argv = ["generate", "Once upon a time", "--max-tokens", "6"]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    if method is not None:
        argv += ["--method", method]
    if json_config is not None:
        argv += ["--speculative-config", json.dumps(json_config)]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (an int flag given "abc") exit this way
        code = e.code
    err = capsys.readouterr().err.strip()
    event(f"exit {code}")
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("onepass: error:") and len(err.splitlines()) == 1, err
