"""SpeculativeConfig: vLLM's `speculative_config` keys, plus our methods and "auto".

Common keys are fields here; every other key belongs to the chosen method and is validated by
that drafter's own options dataclass, so a wrong key or value fails with a message that lists
the valid ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from onepass.errors import InputError
from onepass.validation import OptionTypeError, check_values

ACCEPTANCE_METHODS = ("rejection_sampler", "typical_acceptance_sampler")


class ConfigError(InputError):
    """An invalid speculative_config."""


@dataclass
class SpeculativeConfig:
    method: str
    """Drafter name: see onepass.drafters.METHODS."""
    num_speculative_tokens: int | None = None
    """Most draft tokens scored per step; None = the method's own default."""
    acceptance_method: str = "rejection_sampler"
    """"rejection_sampler" is lossless; "typical_acceptance_sampler" (Medusa) is NOT."""
    posterior_threshold: float = 0.09
    """Typical acceptance: probability above which a draft token is always acceptable."""
    posterior_alpha: float = 0.3
    """Typical acceptance: scales exp(-entropy) into the entropy-adaptive threshold."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's own keys (e.g. prompt_lookup_max for ngram)."""

    def __post_init__(self) -> None:
        from onepass.drafters import METHODS, options_class

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            values = check_values(SpeculativeConfig, values)
        except OptionTypeError as e:
            raise ConfigError(str(e)) from None
        for name, value in values.items():
            setattr(self, name, value)
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown speculative method {self.method!r}; valid: {', '.join(METHODS)}"
            )
        n = self.num_speculative_tokens
        if n is not None and (not isinstance(n, int) or not 1 <= n <= 64):
            raise ConfigError(f"num_speculative_tokens must be an integer in 1..64, got {n!r}")
        if self.acceptance_method not in ACCEPTANCE_METHODS:
            raise ConfigError(
                f"acceptance_method must be one of {', '.join(ACCEPTANCE_METHODS)}, "
                f"got {self.acceptance_method!r}"
            )
        if not 0 < self.posterior_threshold <= 1 or not 0 < self.posterior_alpha <= 1:
            raise ConfigError("posterior_threshold and posterior_alpha must be in (0, 1]")
        self.method_options = build_options(options_class(self.method), self.method, self.options)

    @property
    def lossless(self) -> bool:
        return self.acceptance_method == "rejection_sampler"

    @property
    def typical(self) -> tuple[float, float] | None:
        return None if self.lossless else (self.posterior_threshold, self.posterior_alpha)

    @classmethod
    def parse(
        cls, value: SpeculativeConfig | dict[str, Any] | str | None
    ) -> SpeculativeConfig | None:
        """From a dict (vLLM style, flat keys), a JSON string, or None (plain decoding)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative config is not valid JSON ({e})") from None
        if not isinstance(value, dict) or "method" not in value:
            raise ConfigError('speculative config must be an object with a "method" key')
        common = {f.name for f in fields(cls)} - {"options"}
        known = {k: v for k, v in value.items() if k in common}
        return cls(**known, options={k: v for k, v in value.items() if k not in common})

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**out, **self.options}


def build_options(cls: type, method: str, values: dict[str, Any]) -> Any:
    """Instantiate a method's options dataclass, with errors that list the valid keys."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} for method {method!r}; its keys: {listed}"
        )
    try:
        return cls(**check_values(cls, values))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{method}: {e}") from None
