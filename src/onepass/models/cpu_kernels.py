"""onepass's CPU kernels: the GEMM for a few rows against a large weight (small_gemm.cpp), the
fused decoder layers (decoder.cpp) and each row's largest logits (top_k.cpp), written once over
a small vector type (simd.h) and built for one instruction set: AVX-512, AVX2 + FMA, or NEON.

Built from source once per machine, torch version and ISA with torch's C++ extension tooling
(about a minute), cached in onepass's cache directory (kernels/torch-<version>/<isa>/), then
loaded as ops in a namespace of their own per ISA (`torch.ops.onepass_avx2.decode_layers`, ...),
so that builds for several ISAs can be loaded in one process: the tests run every ISA this
machine can. `ops()` gives the ops the backend uses: those of the best ISA this CPU runs, or of
the one the environment variable ONEPASS_CPU_ISA names (avx512, avx2, neon; none: no kernels);
ONEPASS_CPU_KERNELS=0 disables them. A build uses the optional extensions of its ISA the CPU
has (AVX-512 VNNI, AVX-VNNI, ARM's dot product: int8_dot.h), in a directory of its own
(kernels/torch-<version>/<isa>-<extensions>/); ONEPASS_CPU_EXTENSIONS=none builds without.
Where they cannot be used (no supported ISA, not float32 on CPU, no compiler) the native
backend runs its TorchScript layer stack with MKL's GEMM: same model, slower steps, and rows of
a multi-row forward that may round differently from one row.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from onepass.errors import OnepassError
from onepass.models.loading import default_cache_dir

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("small_gemm.cpp", "stored_gemm.cpp", "decoder.cpp", "top_k.cpp")
]
ISAS = ("avx512", "avx2", "neon")  # best first
NAMES = {"avx512": "AVX-512", "avx2": "AVX2", "neon": "NEON"}
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mfma"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "neon": [],
}
# Optional extensions a build uses where the CPU has them (int8_dot.h): AVX-512 VNNI's vpdpbusd,
# ARM's sdot; named by their /proc/cpuinfo flag. Builds with and without are kept apart.
EXTENSIONS = {
    "avx512": {"avx512_vnni": "-mavx512vnni"},
    "avx2": {"avx_vnni": "-mavxvnni"},
    "neon": {"asimddp": "-march=armv8.2-a+dotprod"},
}
# OpenMP: at::parallel_for is inline. No floating-point contraction: the kernels' only FMAs are
# the explicit ones (simd.h). Hidden symbols: builds for two ISAs define the same C++ names.
COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden"]


def compile_flags(isa: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """The compiler flags of the build for `isa` (besides torch's own), with `extensions` (of
    EXTENSIONS[isa]; None: those this CPU has)."""
    chosen = machine_extensions(isa) if extensions is None else extensions
    extra = [EXTENSIONS[isa][name] for name in chosen]
    return [*COMMON_FLAGS, *ISA_FLAGS[isa], *extra, f"-DONEPASS_OPS={namespace(isa)}"]


def machine_extensions(isa: str) -> tuple[str, ...]:
    """The optional extensions of `isa` the build uses (EXTENSIONS): those this CPU has, none
    with ONEPASS_CPU_EXTENSIONS=none (how the tests run the paths of CPUs without them)."""
    if os.environ.get("ONEPASS_CPU_EXTENSIONS", "").strip().lower() == "none":
        return ()
    flags = _cpu_flags()
    return tuple(name for name in EXTENSIONS.get(isa, {}) if name in flags)


def namespace(isa: str) -> str:
    """The torch.ops namespace of the build for `isa`."""
    return f"onepass_{isa}"


@functools.cache
def build_id(isa: str) -> str:
    """The build for `isa` as it runs here: its extensions and a digest of the kernels'
    sources, so that what is measured on a build (cost curves) is measured again after any
    change to it."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.[ch]*")):
        if source.suffix in (".cpp", ".h"):
            digest.update(source.read_bytes())
    return "-".join((isa, *machine_extensions(isa), digest.hexdigest()[:12]))


def build_directory(isa: str) -> Path:
    name = "-".join((isa, *machine_extensions(isa)))
    return default_cache_dir() / "kernels" / f"torch-{torch.__version__}" / name


@functools.cache
def machine_isas() -> tuple[str, ...]:
    """The ISAs this CPU runs, best first: from torch's CPU capability, and on Linux from the
    kernel's CPU flags too (torch reports one level, which ATEN_CPU_CAPABILITY can lower)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ("neon",)
    if machine not in ("x86_64", "amd64"):
        return ()
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    isas = []
    if {"avx512f", "avx512bw", "fma"} <= flags or (capability == "AVX512" and not flags):
        isas.append("avx512")
    if capability in ("AVX2", "AVX512") or {"avx2", "fma"} <= flags:
        isas.append("avx2")
    return tuple(isas)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, aarch64
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def selected_isa() -> str | None:
    """The ISA whose kernels the backend uses: ONEPASS_CPU_ISA's if set (an error if this CPU
    cannot run it), else the best this CPU runs; None if there is none or the kernels are
    disabled (ONEPASS_CPU_KERNELS=0, ONEPASS_CPU_ISA=none)."""
    if os.environ.get("ONEPASS_CPU_KERNELS", "1") == "0":
        return None
    forced = os.environ.get("ONEPASS_CPU_ISA", "").strip().lower()
    if forced == "none":
        return None
    if forced and forced not in ISAS:
        raise OnepassError(f"ONEPASS_CPU_ISA={forced}: not one of {', '.join(ISAS)}, none")
    here = machine_isas()
    if forced and forced not in here:
        raise OnepassError(
            f"ONEPASS_CPU_ISA={forced}: this CPU cannot run {NAMES[forced]} "
            f"(it runs: {', '.join(here) or 'none of ' + ', '.join(ISAS)})"
        )
    return forced or (here[0] if here else None)


def ops(isa: str | None = None) -> Any | None:
    """The ops of the kernels for `isa` (one of machine_isas(); None: selected_isa()), built
    and loaded once; None where there are none (no ISA selected, or the build failed)."""
    isa = isa or selected_isa()
    if isa is None:
        return None
    if isa not in machine_isas():  # an ISA the CPU lacks would crash, not fail to load
        raise ValueError(f"this CPU cannot run {isa} kernels (it runs: {machine_isas()})")
    return getattr(torch.ops, namespace(isa)) if _loaded(isa) else None


def available_isas() -> list[str]:
    """The ISAs whose kernels run here (building each once): every ISA this CPU runs, unless
    ONEPASS_CPU_KERNELS=0."""
    if os.environ.get("ONEPASS_CPU_KERNELS", "1") == "0":
        return []
    return [isa for isa in machine_isas() if _loaded(isa)]


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this device and dtype run on the kernels (building them if need be)."""
    return device.type == "cpu" and dtype == torch.float32 and ops() is not None


@functools.cache
def _loaded(isa: str) -> bool:
    """Build (once) and load the kernels for `isa`; False, with a one-line warning, if not."""
    try:
        _build_and_load(isa)
    except Exception as error:  # any build or load failure: fall back, say why
        warnings.warn(
            f"onepass could not build its {NAMES[isa]} CPU kernels ({_reason(error)}); "
            "decoding falls back to TorchScript and MKL's GEMM (slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _reason(error: Exception) -> str:
    """The line of a build failure that says why: the compiler's first error, else the last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    why = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {why}"


def _build_and_load(isa: str) -> None:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # torch's builder calls `ninja`; the wheel ships one
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    directory = build_directory(isa)
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print(f"onepass: building the {NAMES[isa]} CPU kernels (once, ~1 min)...", file=sys.stderr)
    cpp_extension.load(
        name=f"onepass_cpu_kernels_{isa}",
        sources=[str(source) for source in SOURCES],
        extra_cflags=compile_flags(isa),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
    )
