"""Type checks for user-given option values, driven by a dataclass's own annotations.

Options arrive from Python, JSON and the command line, so a wrong type (a float where an
integer is meant, a string for a number, NaN) must fail where the options are built, with the
option's name, and never later as a traceback deep inside a drafter or the sampler.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from functools import cache
from numbers import Integral, Real
from typing import Any


class OptionTypeError(ValueError):
    """A value whose type does not match its option's annotation."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check `values` (option name -> value) against the annotations of dataclass `cls`;
    return them normalised (integers given for float options become floats). Raises
    OptionTypeError naming the first bad option."""
    hints = _hints(cls)
    return {name: _check(name, value, hints[name]) for name, value in values.items()}


def _check(name: str, value: Any, annotation: Any) -> Any:
    ok, normalised = _matches(value, annotation)
    if not ok:
        raise OptionTypeError(f"{name} must be {describe(annotation)}, got {value!r}")
    return normalised


def _matches(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(whether value fits annotation, the value normalised)."""
    if annotation is Any:
        return True, value
    if annotation is type(None):
        return value is None, value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            ok, normalised = _matches(value, option)
            if ok:
                return True, normalised
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        items = [_matches(v, item) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        ok = isinstance(value, Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if annotation is float:
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    raise TypeError(f"no check for annotation {annotation!r}")  # a bug in onepass, not input


_NAMES = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
    dict: ("an object", "objects"),
}


def describe(annotation: Any, plural: bool = False) -> str:
    """'an integer', 'a finite number', 'a list of integers or None', ..."""
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a, plural) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return ("lists of " if plural else "a list of ") + describe(item, plural=True)
    single, many = _NAMES.get(origin or annotation, ("any value", "values"))
    return many if plural else single
