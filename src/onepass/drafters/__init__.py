"""Drafters: one module per method behind one protocol (drafters/base.py), chosen by
`speculative_config["method"]`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onepass.draft import DecodeState, Draft
from onepass.drafters.base import Drafter

__all__ = ["METHODS", "DecodeState", "Draft", "DraftContext", "Drafter", "build_drafter"]

# method -> module under onepass.drafters defining `Options` and `build(options, context)`.
METHODS: dict[str, str] = {
    "ngram": "ngram",
    "lookahead": "lookahead",
    "suffix": "suffix",
    "recycling": "recycling",
    "auto": "auto",
    "draft_model": "draft_model",
    "layer_skip": "layer_skip",
    "medusa": "medusa",
    "eagle": "eagle",
}


@dataclass
class DraftContext:
    """What a drafter may use besides the tokens: the target, its vocabulary, its costs."""

    backend: Any
    """The target (Backend protocol); drafters must not change its KV cache."""
    vocab_size: int
    num_speculative_tokens: int | None
    """The config's cap on draft tokens per step (None = the drafter's default)."""
    tokenizer: Any = None
    """The target's tokenizer (e.g. to tokenize a retrieval corpus)."""
    cost_model: Any = None
    """Measured forward cost of scoring k rows (see onepass.cost), when available."""
    cache_dir: Path | None = None
    """onepass's cache directory (e.g. for loading a draft model)."""
    model_name: str | None = None
    """The target's name (shown in errors)."""
    model_key: str | None = None
    """The target's content fingerprint: heads trained for another model are refused."""

    def cost_curve(self) -> Any:
        """The cost curve t(rows, context), or None: `cost_model` may be a function that
        measures it on first use."""
        return self.cost_model() if callable(self.cost_model) else self.cost_model


def _module(method: str) -> Any:
    return importlib.import_module(f"onepass.drafters.{METHODS[method]}")


def options_class(method: str) -> type:
    return _module(method).Options


def build_drafter(method: str, options: Any, context: DraftContext) -> Drafter:
    return _module(method).build(options, context)
