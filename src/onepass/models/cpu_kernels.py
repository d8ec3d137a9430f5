"""onepass's AVX-512 CPU kernels: the GEMM for a few rows against a large weight
(small_gemm.cpp), the fused decoder layers of a decoding step (decoder.cpp) and each row's
largest logits (top_k.cpp).

Built from source once per machine and torch version with torch's C++ extension tooling (about
20-40 s), cached in onepass's cache directory (~/.cache/onepass), then loaded as the ops
`torch.ops.onepass.small_gemm`, `small_gemm_pack`, `decode_layers` and `row_top_k`. Where they
cannot be used (no AVX-512, not float32 on CPU, no compiler, ONEPASS_CPU_KERNELS=0) the native
backend runs its TorchScript layer stack with MKL's packed GEMM: same model, slower steps.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from onepass.models.loading import default_cache_dir

SOURCES = [
    Path(__file__).with_name(name) for name in ("small_gemm.cpp", "decoder.cpp", "top_k.cpp")
]
FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for is inline


def build_directory() -> Path:
    return default_cache_dir() / "kernels" / f"torch-{torch.__version__}"


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this device and dtype run on the kernels (building them if need be)."""
    return device.type == "cpu" and dtype == torch.float32 and loaded()


@functools.cache
def loaded() -> bool:
    """Build (once) and load the kernels; False, with a warning when it is a surprise, if not."""
    if os.environ.get("ONEPASS_CPU_KERNELS", "1") == "0":
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    if _placeholder_library is not None:
        return False  # the names are taken by stand-ins: this process decided without it
    try:
        _build_and_load()
    except Exception as error:  # any build or load failure: keep MKL's GEMM, say why
        warnings.warn(
            f"onepass could not build its AVX-512 CPU kernels ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); "
            "using TorchScript and MKL's GEMM, decoding will be slower",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # torch's builder calls `ninja`; the wheel ships one
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print("onepass: building the AVX-512 CPU kernels (once, ~1 min)...", file=sys.stderr)
    cpp_extension.load(
        name="onepass_cpu_kernels",
        sources=[str(source) for source in SOURCES],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
    )


_placeholder_library = None


def ensure_ops() -> None:
    """Make the GEMM kernel's op names exist, as stand-ins never called if it is not loaded:
    TorchScript compiles the layer stack's branch that names them even where it is not taken."""
    global _placeholder_library
    try:
        torch.ops.onepass.small_gemm  # noqa: B018 (the lookup is the check)
    except (AttributeError, RuntimeError):
        library = torch.library.Library("onepass", "DEF")
        library.define("small_gemm_pack(Tensor weight) -> Tensor")
        library.define("small_gemm(Tensor x, Tensor packed, int n) -> Tensor")

        def unavailable(*args: object) -> torch.Tensor:
            raise RuntimeError("onepass's small-GEMM kernel is not available on this machine")

        for name in ("small_gemm_pack", "small_gemm"):
            library.impl(name, unavailable, "CompositeExplicitAutograd")
        _placeholder_library = library
