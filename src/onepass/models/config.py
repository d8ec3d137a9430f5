"""Architecture hyper-parameters of the Llama family (Llama, Qwen2, Mistral), read from a
Hugging Face `config.json` or from GGUF metadata, in one normalised dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from onepass.errors import ModelLoadError

# Hugging Face `model_type` -> our architecture name. GGUF uses the same names.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    """One of SUPPORTED_ARCHITECTURES."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    sliding_window: int | None = None
    """Keys further back than this many positions are not attended (Mistral)."""
    rope_scaling: dict[str, Any] | None = None
    """Hugging Face's `rope_scaling` dict; types None/"default", "linear" and "llama3"."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; onepass supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError("num_heads must be a multiple of num_kv_heads")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in (None, "default", "linear", "llama3"):
            raise ModelLoadError(f"unsupported rope_scaling type {kind!r}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From the contents of a Hugging Face `config.json`."""
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported model_type {arch!r} in config.json; onepass supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            heads = cfg["num_attention_heads"]
            window = cfg.get("sliding_window")
            if arch == "qwen2" and not cfg.get("use_sliding_window", False):
                window = None
            return cls(
                architecture=arch,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                sliding_window=window,
                rope_scaling=cfg.get("rope_scaling"),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks the key {e.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_weight: bool) -> ModelConfig:
        """From GGUF key/value metadata (`general.architecture` and its `<arch>.*` keys)."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r}; onepass supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{name}")
            return value

        heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face config dict (for reference implementations in tests)."""
        d = asdict(self)
        return {
            "model_type": self.architecture,
            "vocab_size": d["vocab_size"],
            "hidden_size": d["hidden_size"],
            "intermediate_size": d["intermediate_size"],
            "num_hidden_layers": d["num_layers"],
            "num_attention_heads": d["num_heads"],
            "num_key_value_heads": d["num_kv_heads"],
            "head_dim": d["head_dim"],
            "rope_theta": d["rope_theta"],
            "rms_norm_eps": d["rms_norm_eps"],
            "max_position_embeddings": d["max_position_embeddings"],
            "tie_word_embeddings": d["tie_word_embeddings"],
            "attention_bias": d["attention_bias"],
            "sliding_window": d["sliding_window"],
            "use_sliding_window": d["sliding_window"] is not None,
            "rope_scaling": d["rope_scaling"],
        }
