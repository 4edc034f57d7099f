"""Which autocast precision a stage runs in: the one rule behind ``precision: auto`` for train, eval and the prep
CLIP scorer.

bf16 autocast pays only where the hardware computes in bf16. On a CPU without native bf16 (AVX2 only, or AVX-512
without AVX512_BF16/AMX) torch and oneDNN emulate it: the demo model's fwd+bwd ran 7-13x slower in bf16 than in fp32
on such a CPU. So auto picks bf16 on CUDA devices that support it natively and on CPUs that report
native bf16, and fp32 everywhere else.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps (DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA) at or above the first ISA with bf16 instructions.
_DNNL_BF16_ISAS = ("avx512_core_bf16", "avx512_core_fp16", "avx10_1_512", "avx512_core_amx", "avx10_1_512_amx",
                   "avx512_core_amx_fp16", "avx10_1_512_amx_fp16", "avx10_2_512", "avx10_2_512_amx_2", "all")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a stage runs in, what the config asked for, and why."""

    precision: str
    """fp32, bf16 or fp16: what autocast uses."""
    requested: str
    """What the config said: auto or the same as precision."""
    reason: str

    def line(self) -> str:
        """The line printed at the start of a stage, e.g. 'precision auto -> fp32 (CPU without native bf16: ...)'."""
        if self.requested == "auto":
            return f"precision auto -> {self.precision} ({self.reason})"
        return f"precision {self.precision} (set in the config{'; ' + self.reason if self.reason else ''})"

    def record(self) -> dict:
        return {"precision": self.precision, "requested": self.requested, "reason": self.reason}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """(True, why) when this CPU computes bf16 natively *and* torch is allowed to use it; (False, why) otherwise.

    Beside the CPU's flags, the kernel caps count. DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA below avx512_core_bf16
    makes oneDNN (convolutions, matmuls) emulate bf16 even on a CPU that has it: alone, it made the demo model's
    bf16 step about 9x slower than fp32. ATEN_CPU_CAPABILITY below AVX-512 caps torch's own kernels; it is how one
    imitates an AVX2-only CPU (with the oneDNN cap), so it counts as no native bf16 too."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"{platform.machine()} CPU: native bf16 autocast is only detected on x86"
    found = sorted(set(_CPU_BF16_FLAGS) & cpu_flags())
    if not found:
        return False, "CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False, f"torch's CPU kernels are capped at {capability} (ATEN_CPU_CAPABILITY): bf16 would be emulated"
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(var, "").strip().lower()
        if isa and isa not in _DNNL_BF16_ISAS:
            return False, f"oneDNN is capped at {isa.upper()} ({var}): bf16 would be emulated"
    return True, f"CPU with native bf16: {', '.join(found)}"


def cuda_bf16_supported(device: torch.device) -> bool:
    """Native bf16 on this CUDA device (Ampere or newer); emulated support does not count."""
    with torch.cuda.device(device):
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 counts native support only
            return torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device | str) -> PrecisionChoice:
    """The concrete precision for ``requested`` (auto, fp32, bf16 or fp16) on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda":
        native = cuda_bf16_supported(device)
        why = ("CUDA device with bf16" if native else "CUDA device without native bf16 (before Ampere)")
    elif device.type == "cpu":
        native, why = cpu_native_bf16()
    else:
        native, why = False, f"{device.type} device: auto picks bf16 only on CUDA and on CPUs with native bf16"
    if requested == "auto":
        return PrecisionChoice("bf16" if native else "fp32", "auto", why)
    note = f"{why}; expect it several times slower than fp32 here" if requested == "bf16" and not native else ""
    return PrecisionChoice(requested, requested, note)


def autocast(device: torch.device | str, precision: str):
    """torch.autocast for a concrete precision; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"autocast needs a concrete precision (fp32, bf16 or fp16), got {precision!r}: "
                         f"resolve 'auto' with resolve_precision first")
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])
