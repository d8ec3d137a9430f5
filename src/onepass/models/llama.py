"""Native decoder for the Llama family (Llama, Qwen2, Mistral), in the style of gpt-fast.

One forward scores any set of new tokens against a static, preallocated KV cache: the new
tokens carry explicit positions and an arbitrary attention mask among themselves (a draft
tree), and always see the whole committed cache. `commit(keep)` then compacts the KV rows of
the accepted tokens into place. See design.md §3 and the Backend protocol in `models/__init__.py`.

On CPU in float32 (x86 with AVX-512 or AVX2, ARM with NEON) every forward, prefill chunks
included, runs as one C++ op, onepass's fused decoder (decoder.cpp): its linear layers multiply
by onepass's small-GEMM kernel (small_gemm.cpp) and its attention walks each row's visible keys
in position order. Row i of a forward is computed exactly as plain decoding computes it,
whatever the other rows are, by construction: scoring a draft uses plain decoding's arithmetic
per token, a forward of 12 rows costs about 1.15-1.4 forwards of one, and a prompt leaves the
same KV cache in every process, however it is chunked. Elsewhere (GPU, half precision, no
supported ISA or compiler) the layers run as one TorchScript function (layer_stack.py) with
MKL's packed GEMM where available, whose rounding can depend on the row count (not for the
default model's shapes on Intel CPUs, but on AMD's, tests/test_backend.py): there a draft's
scores can differ from plain decoding's in the last bits, so greedy output can only diverge at
a near-tie (design.md §2).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from onepass.errors import InputError
from onepass.kv_cache import KVCache
from onepass.models import cpu_kernels
from onepass.models.base import ModelOutput, Rows
from onepass.models.config import ModelConfig
from onepass.models.layer_stack import (
    GEMM_MKL,
    GEMM_PLAIN,
    MKL_PACK_ROWS,
    linear,
    normalize,
    scripted_decoder_layers,
)
from onepass.models.stored import StoredTensor, dequantized, packable
from onepass.models.stored import pack as pack_parts

# Rows of a prompt the fused decoder prefills per call, each chunk causal after the cache the
# chunks before it wrote. The size changes no result (rows are independent), only the speed:
# attention scores a chunk's cached keys for all its rows at once, but the keys within the chunk
# row by row, so long chunks are slower (default model, 2 AVX-512 cores, 1000 tokens: 0.65 s in
# chunks of 96-192 rows, 0.67 s of 256, 0.76 s of 512), and short ones stream the weights more
# often (0.68 s in chunks of 64).
FUSED_PREFILL_CHUNK = 128
# Head sizes the fused decoder takes.
FUSED_HEAD_DIMS = (64, 128)


def mkl_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available()


def choose_gemm(device: torch.device, dtype: torch.dtype) -> int:
    """The layer stack's GEMM for a few rows on this device and dtype (layer_stack.GEMM_*)."""
    return GEMM_MKL if mkl_packing_available(device, dtype) else GEMM_PLAIN


def pack(weight: Tensor, gemm: int) -> Tensor:
    """The weight in the layout the layer stack's GEMM reads (an empty tensor for F.linear)."""
    if gemm == GEMM_MKL:
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, MKL_PACK_ROWS)
    return weight.new_empty(0)


class Linear:
    """y = x @ weight.T + bias for 2-D x: by onepass's GEMM kernel where `kernels` (the
    cpu_kernels.ops() of an ISA) is given, else by the layer stack's GEMM `gemm`."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, gemm: int, kernels: Any | None = None
    ) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self.kernels = kernels
        self.gemm = gemm
        # The kernel reads only its packed copy; the layer stack's GEMMs read both.
        self.weights = [] if kernels is not None else [weight]  # [out, in]
        self.packed = [
            kernels.small_gemm_pack(weight) if kernels is not None else pack(weight, gemm)
        ]

    def __call__(self, x: Tensor) -> Tensor:  # [n, in] -> [n, out]
        if self.kernels is not None:
            y = self.kernels.small_gemm(x, self.packed[0], self.out_features)
            return y if self.bias is None else y + self.bias
        return linear(x, 0, self.weights, self.packed, [self.bias], self.gemm)


class StoredLinear:
    """y = x @ W.T for a weight kept in its GGUF format (stored_gemm.cpp): the same result as
    Linear on its dequantization, bit for bit."""

    def __init__(self, packed: Tensor, out_features: int, kernels: Any) -> None:
        self.packed, self.out_features, self.kernels = packed, out_features, kernels

    def __call__(self, x: Tensor) -> Tensor:
        return self.kernels.stored_gemm(x, self.packed, None, self.out_features)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Rotary inverse frequencies, with Hugging Face's "linear" and "llama3" scalings."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = (
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
        )
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, smoothed, inv_freq)
    return inv_freq.float()


def interleave_rope_rows(w: Tensor, heads: int) -> Tensor:
    """Reorder q/k projection rows per head from Hugging Face's half-split rotary layout to
    adjacent pairs (as llama.cpp stores them), so rotary embedding is a complex multiply.
    Attention scores are unchanged: q and k are permuted alike."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def layer_linears(
    w: Mapping[str, Tensor], prefix: str, config: ModelConfig
) -> list[tuple[Tensor, Tensor | None]]:
    """(weight, bias) of a layer's qkv, o, gate_up and down projections, RMSNorm weights folded
    into the columns of the projection that follows each norm."""

    def get(name: str) -> Tensor | None:
        return w.get(f"{prefix}.{name}")

    heads = {"q": config.num_heads, "k": config.num_kv_heads, "v": None}

    def projection(kind: str, p: str) -> Tensor | None:
        t = get(f"self_attn.{p}_proj.{kind}")
        return t if t is None or heads[p] is None else interleave_rope_rows(t, heads[p])

    qkv = torch.cat([projection("weight", p) for p in "qkv"])
    bias = torch.cat([projection("bias", p) for p in "qkv"]) if config.attention_bias else None
    gate_up = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
    return [
        (qkv * get("input_layernorm.weight"), bias),
        (get("self_attn.o_proj.weight"), None),
        (gate_up * get("post_attention_layernorm.weight"), None),
        (get("mlp.down_proj.weight"), None),
    ]


def stored_layer_linears(
    w: Mapping[str, Tensor | StoredTensor],
    prefix: str,
    config: ModelConfig,
    kernels: Any,
    int8: bool = False,
) -> list[tuple[Tensor, Tensor | None, Tensor | None, int]]:
    """(packed weight, bias, column scale, output features) of a layer's four projections for
    the fused decoder, as layer_linears builds them, from weights of which some are
    StoredTensor. A projection whose parts are all stored in one format keeps its blocks
    (stored_pack), the RMSNorm weight before it as its column scale; any other is dequantized,
    folded and packed as fp32 tiles. int8: packed for the int8 arithmetic where it applies."""

    def get(name: str) -> Tensor | StoredTensor | None:
        return w.get(f"{prefix}.{name}")

    def rope_rows(t: Tensor | StoredTensor, heads: int | None) -> Tensor | StoredTensor:
        if heads is None:
            return t
        if isinstance(t, StoredTensor):  # the same permutation, of whole rows of blocks
            return t.permute_rows(
                lambda r: interleave_rope_rows(torch.from_numpy(r), heads).numpy()
            )
        return interleave_rope_rows(t, heads)

    heads = {"q": config.num_heads, "k": config.num_kv_heads, "v": None}
    qkv = [rope_rows(get(f"self_attn.{p}_proj.weight"), heads[p]) for p in "qkv"]
    bias = None
    if config.attention_bias:
        bias = torch.cat([rope_rows(get(f"self_attn.{p}_proj.bias"), heads[p]) for p in "qkv"])
    groups = [
        (qkv, bias, get("input_layernorm.weight")),
        ([get("self_attn.o_proj.weight")], None, None),
        (
            [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")],
            None,
            get("post_attention_layernorm.weight"),
        ),
        ([get("mlp.down_proj.weight")], None, None),
    ]
    out = []
    for parts, b, scale in groups:
        rows = sum(p.shape[0] for p in parts)
        if packable(parts):
            out.append((pack_parts(kernels, parts, int8), b, scale, rows))
        else:
            weight = torch.cat([dequantized(p) for p in parts])
            weight = weight if scale is None else weight * scale
            out.append((kernels.small_gemm_pack(weight), b, None, rows))
    return out


class NativeDecoder:
    """Implements the Backend protocol for Llama-family weights in Hugging Face naming."""

    revision = 13  # bump when a change alters the cost curve: cached curves are keyed by it

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, Tensor],
        *,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        isa: str | None = None,
        int8: bool = False,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """isa: the CPU kernels' instruction set (cpu_kernels.ISAS, or "none" for the layer
        stack); None: cpu_kernels.selected_isa(). Used on CPU in float32 only. weights may hold
        models.stored.StoredTensor values: the fused decoder keeps those in their blocks
        (`self.stored`); without it they are dequantized, to the same values. int8: stored
        Q4_0 / Q4_1 / Q8_0 weights are multiplied in the int8 arithmetic (int8_formats.h).
        kv_dtype: the KV cache's (None: float16 with int8, else dtype); torch.float16 needs the
        fused decoder, which rounds each key and value to it once, when written, and widens
        them exactly to read (InputError where it does not run)."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_len = max_len
        fused = (
            self.device.type == "cpu"
            and dtype == torch.float32
            and config.head_dim in FUSED_HEAD_DIMS
            and isa != "none"
        )
        # The fused C++ decoder's ops (decoder.cpp) where they are available, else None.
        self.kernels = cpu_kernels.ops(isa) if fused else None
        self.isa = (isa or cpu_kernels.selected_isa()) if self.kernels is not None else None
        self.gemm = choose_gemm(self.device, dtype)
        # Weights as stored (models/stored.py) where the fused decoder runs, else dequantized.
        self.stored = self.kernels is not None and any(
            isinstance(v, StoredTensor) for v in weights.values()
        )
        self.int8 = int8 and self.stored
        if kv_dtype is None:
            kv_dtype = torch.float16 if self.int8 else dtype
        self.kv_dtype = kv_dtype
        if kv_dtype != dtype and (self.kernels is None or kv_dtype != torch.float16):
            raise InputError(
                "a KV cache in another dtype than the model's can only be float16, and needs "
                "onepass's CPU kernels (a float32 model on CPU)"
            )
        w = {
            k: v if self.stored and isinstance(v, StoredTensor) else dequantized(v)
            for k, v in weights.items()
        }
        w = {
            k: v if isinstance(v, StoredTensor) else v.to(self.device, dtype) for k, v in w.items()
        }
        embed = w["model.embed_tokens.weight"]  # [vocab, hidden]
        self.vocab_rows = embed.shape[0]
        # A stored embedding is looked up by widening its rows (stored_rows): embed is None.
        stored_embed = isinstance(embed, StoredTensor)
        self.embed_packed = self._pack([embed]) if stored_embed else None
        self.embed = None if stored_embed else embed
        lm_head = embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.lm_head_stored = lm_head if isinstance(lm_head, StoredTensor) else None
        if isinstance(lm_head, StoredTensor):
            packed = self.embed_packed if lm_head is embed else self._pack([lm_head])
            self.lm_head = StoredLinear(packed, lm_head.shape[0], self.kernels)
        else:
            self.lm_head = Linear(lm_head, None, self.gemm, self.kernels)
        self.norm = w["model.norm.weight"]
        layers = [f"model.layers.{i}" for i in range(config.num_layers)]
        if self.stored:  # the fused decoder reads only the packed weights
            stored = [
                t
                for layer in layers
                for t in stored_layer_linears(w, layer, config, self.kernels, self.int8)
            ]
            self.packed, self.biases, self.scales, self.out_features = map(
                list, zip(*stored, strict=True)
            )
            self.weights = []
        else:
            linears = [pair for layer in layers for pair in layer_linears(w, layer, config)]
            self.biases = [bias for _, bias in linears]
            self.scales = [None] * len(linears)  # RMSNorm weights are folded into the weights
            self.out_features = [weight.shape[0] for weight, _ in linears]
            if self.kernels is not None:  # the fused decoder reads only the packed weights
                self.weights = []
                self.packed = [self.kernels.small_gemm_pack(weight) for weight, _ in linears]
            else:
                self.weights = [weight for weight, _ in linears]
                self.packed = [pack(t, self.gemm) for t in self.weights]
                self.layer_stack = scripted_decoder_layers()
        self.layers = tuple(range(config.num_layers))  # the layers it runs (see subset())
        self.eps = torch.full((1, 1), config.rms_norm_eps, dtype=dtype, device=self.device)
        positions = torch.arange(max_len, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(config))  # [max_len, head_dim / 2]
        self.rotation = torch.polar(torch.ones_like(angles), angles).to(self.device)
        self.cache = KVCache(
            config.num_layers,
            config.num_kv_heads,
            max_len,
            config.head_dim,
            self.kv_dtype,
            self.device,
        )
        self._pending = 0  # rows written by the last forward, not yet committed

    def fork(self, max_len: int | None = None) -> NativeDecoder:
        """A decoder for another request: the same weights (shared, not copied) with its own
        empty KV cache of max_len rows (default: this one's; at most this one's)."""
        max_len = max_len or self.max_len
        if not 1 <= max_len <= self.max_len:
            raise ValueError(f"max_len must be in 1..{self.max_len}, got {max_len}")
        other = copy.copy(self)
        other.max_len = max_len
        cfg = self.config
        layers = len(self.out_features) // 4  # a subset() runs fewer than the model's
        other.cache = KVCache(
            layers, cfg.num_kv_heads, max_len, cfg.head_dim, self.kv_dtype, self.device
        )
        other._pending = 0
        return other

    def subset(self, layers: Sequence[int], max_len: int | None = None) -> NativeDecoder:
        """A decoder that runs only these of this one's layers (their weights shared, not
        copied), then its final norm and LM head, with its own KV cache: a draft for
        self-speculation. Needs the fused decoder (the layer stack runs every layer)."""
        if self.kernels is None:
            raise ValueError("running a subset of the layers needs the fused CPU decoder")
        total = self.config.num_layers
        if (
            not layers
            or list(layers) != sorted(set(layers))
            or not 0 <= layers[0] <= layers[-1] < total
        ):
            raise ValueError(f"layers must be distinct ascending indices in 0..{total - 1}")
        if len(self.out_features) != 4 * total:
            raise ValueError("subset() takes the whole model's decoder, not a subset")
        picked = [4 * layer + j for layer in layers for j in range(4)]
        other = copy.copy(self)
        other.packed = [self.packed[i] for i in picked]
        other.biases = [self.biases[i] for i in picked]
        other.scales = [self.scales[i] for i in picked]
        other.out_features = [self.out_features[i] for i in picked]
        other.layers = tuple(layers)
        return other.fork(max_len)

    # -- Backend protocol -------------------------------------------------------------------

    @property
    def cache_len(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.length = 0
        self._pending = 0

    def truncate(self, length: int) -> None:
        """Forget the committed rows from `length` on (a draft model's rollback)."""
        if not 0 <= length <= self.cache.length:
            raise ValueError(f"cannot truncate a cache of {self.cache.length} rows to {length}")
        self.cache.length = length
        self._pending = 0

    def prefill_chunks(
        self, n: int, chunk: int | None = None, first_chunk: int = 2048
    ) -> list[int]:
        """The chunk sizes a prompt of n tokens is prefilled in, each chunk causal after the
        ones before it. The fused decoder runs chunks of `chunk` rows (default
        FUSED_PREFILL_CHUNK), each with the same arithmetic per row as decoding one token at a
        time. The layer stack runs a first chunk of up to `first_chunk` rows, which needs no
        attention mask, then chunks of `chunk` (default 512), each with a mask of
        [chunk x heads per kv head, tokens so far]."""
        if self.kernels is not None:
            chunk = first_chunk = chunk or FUSED_PREFILL_CHUNK
        chunk = chunk or 512
        sizes = [min(n, first_chunk)]
        while sum(sizes) < n:
            sizes.append(min(chunk, n - sum(sizes)))
        return sizes

    @torch.inference_mode()
    def prefill(
        self, ids: Tensor, chunk: int | None = None, first_chunk: int = 2048
    ) -> ModelOutput:
        """Reset the cache, then run and commit the prompt in prefill_chunks; returns the last
        row's output. Every method prefills alike, so the prompt's KV cache is the same
        whichever decodes after it."""
        self.reset()
        n = ids.shape[0]
        if n == 0 or n > self.max_len:
            raise ValueError(f"prompt length {n} is outside 1..{self.max_len}")
        out, start = None, 0
        for size in self.prefill_chunks(n, chunk, first_chunk):
            part = ids[start : start + size].to(self.device)
            positions = torch.arange(start, start + size, device=self.device)
            out = self.run(Rows(part, positions, None, logits="last"))
            self.cache.length += size
            start += size
        self._pending = 0
        return out

    def forward(self, ids: Tensor, positions: Tensor, mask: Tensor | None) -> ModelOutput:
        """Score new tokens after the committed cache.

        ids, positions: [n]; mask: [n, n] bool, True where row i may attend to new token j
        (None = causal). Every row also sees the whole committed cache.
        """
        return self.run(Rows(ids, positions, mask))

    def run(self, rows: Rows) -> ModelOutput:
        """forward() with the rows' choice of logits."""
        return self.run_batch([(self, rows)])[0]

    @torch.inference_mode()
    def run_batch(self, batch: Sequence[tuple[NativeDecoder, Rows]]) -> list[ModelOutput]:
        """Score several requests' new rows in one forward: each (decoder, rows) pair is a
        request's fork of this decoder (fork(): the same weights, its own KV cache) and its rows
        after that cache. Each output is what decoder.run(rows) alone computes: on the fused
        decoder bit for bit, by construction, and the weights stream once for all of them. Each
        decoder then expects its commit()."""
        for decoder, rows in batch:
            if decoder.packed is not self.packed:
                raise ValueError("run_batch takes forks of this decoder (NativeDecoder.fork)")
            if decoder.cache.length + rows.ids.shape[0] > decoder.max_len:
                raise ValueError("KV cache is full")
        if self.kernels is None:  # the layer stack scores one request at a time
            outs = [
                d._run(r.ids.to(self.device), r.positions.to(self.device), r.mask, r.logits)
                for d, r in batch
            ]
        else:
            outs = self._run_fused(batch)
        for decoder, rows in batch:
            decoder._pending = rows.ids.shape[0]
        return outs

    def commit(self, keep: Tensor | list[int]) -> None:
        """Keep the KV of these rows of the last forward (ascending), in order, after the cache."""
        rows = keep.tolist() if isinstance(keep, Tensor) else list(keep)
        if rows and max(rows) >= self._pending:
            raise ValueError("commit() names a row the last forward did not write")
        self.cache.commit(rows)
        self._pending = 0

    # -- the model --------------------------------------------------------------------------

    def _attention_mask(self, positions: Tensor, mask: Tensor | None) -> Tensor | None:
        """[group * n, past + n] additive mask (0 or -inf), rows ordered (query head in group,
        new token): the whole cache, then `mask` (or causal) among the new rows. None when a
        single row sees everything, or rows at the start of the cache are causal."""
        n, past = positions.shape[0], self.cache.length
        window = self.config.sliding_window
        needs_window = window is not None and past + n > window
        if mask is None and (n == 1 or past == 0) and not needs_window:
            return None
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        full = torch.cat([torch.ones(n, past, dtype=torch.bool, device=self.device), mask], 1)
        if needs_window:
            key_pos = torch.cat([torch.arange(past, device=self.device), positions])
            full &= key_pos[None, :] > positions[:, None] - window
        # Additive, in the model's dtype: attention would convert a bool mask in every layer.
        additive = torch.zeros(full.shape, dtype=self.dtype, device=self.device)
        additive.masked_fill_(~full, float("-inf"))
        return additive.repeat(self.config.num_heads // self.config.num_kv_heads, 1)

    def _run_fused(self, batch: Sequence[tuple[NativeDecoder, Rows]]) -> list[ModelOutput]:
        cfg = self.config
        ids = torch.cat([rows.ids for _, rows in batch]).to(self.device)
        positions = torch.cat([rows.positions for _, rows in batch]).to(self.device)
        x = self.kernels.decode_layers(
            self._embed(ids),
            cfg.rms_norm_eps,
            self.packed,
            self.out_features,
            self.biases,
            self.scales,
            [decoder.cache.k for decoder, _ in batch],
            [decoder.cache.v for decoder, _ in batch],
            torch.view_as_real(self.rotation[positions]),  # [n, head_dim / 2, 2]
            positions,
            [decoder.cache.length for decoder, _ in batch],
            [rows.ids.shape[0] for _, rows in batch],
            [rows.mask for _, rows in batch],
            [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim],
            cfg.sliding_window or 0,
        )
        # One LM head product for the rows whose logits are wanted, then split per request.
        wanted, counts, end = [], [], 0
        for _, rows in batch:
            n = rows.ids.shape[0]
            chosen = {"all": range(end, end + n), "last": [end + n - 1], "none": []}[rows.logits]
            wanted += chosen
            counts.append(len(chosen))
            end += n
        head = self._head(x[wanted])
        logits, hidden = head.logits.split(counts), head.hidden.split(counts)
        return [ModelOutput(lg, h) for lg, h in zip(logits, hidden, strict=True)]

    def _run(self, ids: Tensor, positions: Tensor, mask: Tensor | None, logits: str):
        """The layer stack's forward of one request's rows."""
        cfg = self.config
        heads = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]
        # Graph optimization off: TorchScript would re-profile and re-specialize for every new
        # row count; its plain interpreter is what saves the time (see layer_stack.py).
        with torch.jit.optimized_execution(False):
            x = self.layer_stack(
                self.embed[ids],
                self.eps,
                self.weights,
                self.packed,
                self.biases,
                self.gemm,
                self.cache.k,
                self.cache.v,
                self.cache.k_pairs,
                self.rotation[positions][:, None, :],
                self.cache.length,
                heads,
                self._attention_mask(positions, mask),
            )
        return self._head({"all": x, "last": x[-1:], "none": x[:0]}[logits])

    def linear(self, weight: Tensor, bias: Tensor | None = None) -> Linear:
        """x -> x @ weight.T + bias on this decoder's GEMM (its CPU kernels where it has them):
        a small draft head's matrices then run a few rows as fast as the target's do."""
        weight = weight.detach().to(self.device, self.dtype).contiguous()
        bias = None if bias is None else bias.detach().to(self.device, self.dtype)
        return Linear(weight, bias, self.gemm, self.kernels)

    def lm_head_part(self, ids: Tensor) -> Linear | StoredLinear:
        """x -> x @ W[ids].T: the LM head restricted to these rows (a draft vocabulary), for the
        heads' drafting. Stored rows stay in their blocks (a draft step then reads a quarter or
        less of the bytes of float32 rows), with the same values either way."""
        if self.lm_head_stored is not None:
            source = self.lm_head_stored
            rows = source.rows[ids.cpu().numpy()]
            part = StoredTensor(source.raw, source.ggml_type, source.columns, rows)
            return StoredLinear(self._pack([part]), len(ids), self.kernels)
        with torch.inference_mode():  # x = I gives W^T exactly, however the head is kept
            eye = torch.eye(self.config.hidden_size, dtype=self.dtype, device=self.device)
            rows = self.lm_head(eye).T[ids.to(self.device)]
        return self.linear(rows)

    def _pack(self, parts: list[StoredTensor]) -> Tensor:
        return pack_parts(self.kernels, parts, self.int8)

    def embeddings(self, ids: Tensor) -> Tensor:
        """[n] -> [n, hidden]: the input embeddings of token ids (an EAGLE head reads them)."""
        return self._embed(ids.to(self.device))

    def _embed(self, ids: Tensor) -> Tensor:
        if self.embed_packed is not None:
            return self.kernels.stored_rows(self.embed_packed, ids, self.vocab_rows)
        return self.embed[ids]

    def _head(self, x: Tensor) -> ModelOutput:
        hidden = normalize(x, self.eps) * self.norm  # [rows, hidden]
        return ModelOutput(logits=self.lm_head(hidden).float(), hidden=hidden)
