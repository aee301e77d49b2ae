"""What this CPU does with bfloat16: native, or emulated at many times float32's cost.

x86 CPUs compute bfloat16 natively only with AVX-512 BF16 or AMX; elsewhere oneDNN (torch's
matmuls, vLLM's CPU GEMMs) converts and computes in float32 on slower paths. Flags say what the CPU
has; what torch and vLLM actually dispatch can differ (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), so
the verdict here is a measurement: one GEMM of SmolLM2-135M's MLP shape in both dtypes, one thread.
Measured (256×576 @ 576×1536): 0.2× float32's time on an AVX-512 BF16 Xeon, 1.6× with oneDNN held
to AVX-512 without BF16, 36× on its AVX2 path (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`),
as on an AMD EPYC with AVX2 only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# bfloat16 counts as native when its GEMM takes at most this many times float32's.
NATIVE_AT_MOST = 1.2


@dataclass(frozen=True)
class Bfloat16Support:
    slowdown: float  # bfloat16 GEMM time ÷ float32 GEMM time, measured
    cpu_flags: str  # what the CPU reports (torch's view), for the message
    dispatch: str  # torch's CPU capability in use

    @property
    def native(self) -> bool:
        return self.slowdown <= NATIVE_AT_MOST


def cpu_bfloat16(reps: int = 3) -> Bfloat16Support:
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 576, generator=gen), torch.randn(576, 1536, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y  # first call: kernel selection, packing
            start = time.perf_counter()
            for _ in range(reps):
                x @ y
            seconds[dtype] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    flags = [name for name, has in (("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported()),
                                     ("AMX", torch.cpu._is_amx_tile_supported()))
             if has] if hasattr(torch.cpu, "_is_avx512_bf16_supported") else []
    return Bfloat16Support(seconds[torch.bfloat16] / seconds[torch.float32],
                           ", ".join(flags) or "no AVX-512 BF16 or AMX",
                           torch.backends.cpu.get_cpu_capability())


def bfloat16_warning(dtype: str) -> str | None:
    """One line for a bfloat16 run on a CPU that emulates bfloat16; None where it is native (or
    the run is not bfloat16, or has a GPU)."""
    import torch

    if dtype != "bfloat16" or torch.cuda.is_available():
        return None
    support = cpu_bfloat16()
    if support.native:
        return None
    return (f"warning: bfloat16 is emulated on this CPU ({support.cpu_flags}; torch dispatches "
            f"{support.dispatch}): a bfloat16 matmul took {support.slowdown:.0f}× as long as "
            "float32 here. dtype=float32 (--dtype float32 for the doctor) runs faster on this "
            "machine and is parityrl's most exact mode.")
