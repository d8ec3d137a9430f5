"""Head files: a directory holding `heads.safetensors` (the weights, half precision) and
`config.json` (the method, its shapes and the target it was trained on). A head only makes
sense on the hidden states of the model it was trained for, so loading checks the target's
content fingerprint (models/loading.py) and refuses a head trained for another model."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from onepass.cache import HEADS_DIR
from onepass.errors import InputError

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "heads"
"""Heads shipped in the package: SHIPPED_DIR / <method>-<fingerprint[:16]>."""


@dataclass(frozen=True)
class Target:
    """The model a head belongs to."""

    name: str
    fingerprint: str
    """The model's content fingerprint (LoadedModel.fingerprint)."""
    vocab_size: int
    hidden_size: int

    def describe(self) -> str:
        return f"{self.name} (fingerprint {self.fingerprint[:12]}, vocab {self.vocab_size})"


@dataclass(frozen=True)
class HeadFile:
    method: str
    target: Target
    shapes: dict[str, Any]
    """The method's own sizes (e.g. num_heads)."""
    tensors: dict[str, torch.Tensor]
    training: dict[str, Any]
    """How the head was trained (command, data, steps, final metrics)."""


def head_dir_name(method: str, fingerprint: str) -> str:
    return f"{method}-{fingerprint[:16]}"


def find_heads(method: str, target: Target, cache_dir: Path | None) -> Path:
    """Heads for the target: shipped in the package, else trained into the cache dir."""
    name = head_dir_name(method, target.fingerprint)
    places = [SHIPPED_DIR / name]
    if cache_dir is not None:
        places.append(cache_dir / HEADS_DIR / name)
    for place in places:
        if (place / CONFIG_FILE).exists():
            return place
    raise InputError(
        f"no {method} heads for {target.describe()}: train them with "
        f"`onepass train {method} --model MODEL`, or pass heads=DIRECTORY"
    )


def save_heads(
    path: Path,
    method: str,
    target: Target,
    shapes: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    training: dict[str, Any],
) -> None:
    """Write the directory (half-precision weights); files appear complete or not at all."""
    path.mkdir(parents=True, exist_ok=True)
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(half, str(tmp))
    os.replace(tmp, path / WEIGHTS_FILE)
    config = {
        "format": FORMAT,
        "method": method,
        "target": asdict(target),
        **shapes,
        "training": training,
    }
    tmp = path / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_FILE)


def load_heads(path: Path, method: str, target: Target | None) -> HeadFile:
    """Read a head directory; InputError if it is missing, corrupt, of another method, or
    trained for another model than `target` (None: no check)."""
    path = Path(path).expanduser()
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        tensors = load_file(str(path / WEIGHTS_FILE))
    except FileNotFoundError as e:
        raise InputError(
            f"{path} is not a head directory (missing {Path(e.filename).name})"
        ) from None
    except (json.JSONDecodeError, OSError, SafetensorError, UnicodeDecodeError) as e:
        raise InputError(f"the head files in {path} cannot be read ({e})") from None
    try:
        theirs = Target(**config["target"])
        found = config["method"]
        shapes = {k: v for k, v in config.items() if k not in ("format", "method", "target")}
        training = shapes.pop("training", {})
    except (KeyError, TypeError) as e:
        raise InputError(f"{path / CONFIG_FILE} is not a onepass head config ({e})") from None
    if found != method:
        raise InputError(f"{path} holds {found} heads, not {method} heads")
    if target is not None and theirs.fingerprint != target.fingerprint:
        raise InputError(
            f"the {method} heads in {path} were trained for {theirs.describe()}, not for the "
            f"target {target.describe()}: train heads for this model with "
            f"`onepass train {method} --model MODEL`"
        )
    floats = {k: v.float() for k, v in tensors.items()}
    return HeadFile(method, theirs, shapes, floats, training)


def llm_target(llm: Any) -> Target:
    """The Target of an onepass LLM (its name, fingerprint and sizes)."""
    config = llm.model_config
    return Target(llm.model_name, llm._model_key, config.vocab_size, config.hidden_size)
