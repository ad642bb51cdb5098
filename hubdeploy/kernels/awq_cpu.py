"""Our AVX2 CPU kernels (`csrc/awq_cpu_avx2.cpp`): AWQ with the weights kept 4-bit, and 16-bit
(bf16/fp16) weights for CPUs whose BLAS has no fast 16-bit GEMM.

torch's own int4 CPU kernel (tinygemm, `CpuInt4Weight` in `awq.py`) is compute-bound on CPUs
without AVX-512: it unpacks nibbles with byte shuffles. Our layout puts the 8 nibbles of one
int32 lane at the same position of 8 consecutive k-slices, so unpacking is a shift and a mask
per 8 weights and batch-1 decode runs near the memory's pace. The extension is compiled on
first use (torch's cpp_extension, cached under `TORCH_EXTENSIONS_DIR`); where it cannot be
(no compiler, no AVX2), `avx2_kernels()` says why and callers keep tinygemm.

Numerics: fp32 accumulation of `s·Σ q·x − z·s·Σx` per group, output rounded once to x's dtype;
more exact than tinygemm (which rounds scale and zero to bf16).

16-bit weights: on a CPU without AVX-512-BF16/AMX, torch's bf16/fp16 matmul takes a slow generic
path on AVX2 and an emulated oneDNN one on AVX-512 (benchmarks/RESULTS.md, "16-bit GEMMs on an
AVX2 CPU" and "... on an AVX-512 Xeon without native bf16"); `Avx2Dense16Weight` reads
the checkpoint's `[out, in]` tensor as it is (no copy), widens 8 weights per instruction and
sums in fp32, rounding the output once. Used where no oneDNN-blocked copy was made
(`kernels.cpu_gemm`); `HUBDEPLOY_CPU_GEMM16=torch` turns it off, for comparisons.
"""
from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from hubdeploy.kernels.cpu_step import kernel_switch

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 32  # up to this many rows of x the kernel reads the 4-bit weights directly;
# above it (prefill) one expert's weights are dequantized to fp32 once and multiplied by sgemm
_SOURCE = Path(__file__).parent / "csrc" / "awq_cpu_avx2.cpp"


@functools.lru_cache(maxsize=1)
def _build() -> tuple[ModuleType | None, str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"not x86-64 ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX2)"
    try:
        from torch.utils.cpp_extension import load

        log.info("AWQ CPU: compiling the AVX2 kernel (once; cached under TORCH_EXTENSIONS_DIR)")
        mod = load(name="hubdeploy_awq_cpu_avx2", sources=[str(_SOURCE)],
                   extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"])
        return mod, "built"
    except Exception as e:  # no compiler, no ninja, headers missing: tinygemm serves instead
        lines = str(e).strip().splitlines() or [repr(e)]
        first_error = next((l for l in lines if "error" in l.lower()), lines[-1])
        return None, f"compiling {_SOURCE.name} failed: {first_error.strip()}"


def avx2_kernels() -> ModuleType | None:
    """The compiled extension, or None (logged once with the reason)."""
    mod, why = _build()
    if mod is None and not getattr(avx2_kernels, "_warned", False):
        avx2_kernels._warned = True  # type: ignore[attr-defined]
        log.warning("AWQ CPU: AVX2 kernel unavailable (%s); using torch's int4 kernel", why)
    return mod


def avx2_unavailable_reason() -> str | None:
    """None when the kernel is available, else why not."""
    mod, why = _build()
    return None if mod is not None else why


def to_lane_layout(q: torch.Tensor) -> torch.Tensor:
    """Unpacked weights `[.., N, K]` (values 0..15) -> the kernel's int32 `[.., N, K/8]`: word j of
    64-block b holds the weight for k = 64b + 8t + j in nibble t (see the C++ file)."""
    *lead, N, K = q.shape
    if K % 64:
        raise ValueError(f"AVX2 AWQ layout needs in_features % 64 == 0, got {K}")
    v = q.to(torch.int64).reshape(*lead, N, K // 64, 8, 8).transpose(-1, -2)  # [.., b, j, t]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (v << shifts).sum(-1)  # < 2**32
    return (words - ((words >> 31) << 32)).to(torch.int32).reshape(*lead, N, K // 8)


@dataclass
class Avx2Int4Weight:
    """AWQ weights (one linear or stacked experts) in the AVX2 kernel's layout: 4 bits per weight
    plus fp32 `scale` and `zero·scale` per group and output row."""

    weight: torch.Tensor  # int32 [.., out, in/8], lane-interleaved
    scales: torch.Tensor  # fp32 [.., out, in/g]
    zero_scales: torch.Tensor  # fp32 [.., out, in/g]
    group_size: int
    dtypes = (torch.bfloat16, torch.float16)  # activations it serves (fp32 keeps the dense reference)

    @property
    def num_experts(self) -> int | None:
        return self.weight.shape[0] if self.weight.dim() == 3 else None

    def mm(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """`x [M, in]` @ W.T -> `[M, out]` in x's dtype; `expert` picks one of stacked experts."""
        w, s, zs = self.weight, self.scales, self.zero_scales
        if expert is not None:
            w, s, zs = w[expert], s[expert], zs[expert]
        ext = avx2_kernels()
        xf = x.to(torch.float32).contiguous()
        if x.shape[0] <= GEMV_MAX_ROWS:
            y = ext.awq_gemm(xf, w, s, zs, self.group_size)
        else:
            y = ext.awq_gemm_tiled(xf, w, s, zs, self.group_size)
        return y if y.dtype == x.dtype else y.to(x.dtype)


GEMM16_GEMV_ROWS = 16  # up to this many rows of x the 16-bit weights are read directly (8 rows a
# pass); above it they are widened to fp32 per tile of rows and multiplied by sgemm


@dataclass
class Avx2Dense16Weight:
    """bf16/fp16 weights `[out, in]` (or stacked experts `[E, out, in]`), contiguous, through our
    AVX2 kernel; the same `.mm(x, expert)` as the 4-bit forms."""

    weight: torch.Tensor

    def mm(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """`x [M, in]` @ W.T -> `[M, out]` in x's dtype (fp32 sums, rounded once)."""
        w = self.weight if expert is None else self.weight[expert]
        y = avx2_kernels().gemm_16bit(x.to(torch.float32).contiguous(), w, GEMM16_GEMV_ROWS)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def dense16_supported(*weights: torch.Tensor) -> bool:
    """Whether our 16-bit kernel serves these CPU weights (contiguous bf16/fp16, kernel built,
    not turned off by `HUBDEPLOY_CPU_GEMM16=torch`)."""
    if kernel_switch("HUBDEPLOY_CPU_GEMM16", "auto") == "torch":
        return False
    return all(w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu" and w.is_contiguous()
               for w in weights) and avx2_kernels() is not None


def avx2_supported(in_features: int, group_size: int) -> bool:
    """Whether the kernel takes this shape and is available here (`HUBDEPLOY_CPU_INT4=tinygemm`
    turns it off, for comparisons)."""
    if kernel_switch("HUBDEPLOY_CPU_INT4", "auto") == "tinygemm":
        return False
    return in_features % 64 == 0 and group_size % 32 == 0 and in_features % group_size == 0 \
        and avx2_kernels() is not None


def to_avx2_int4(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group_size: int) -> Avx2Int4Weight:
    """Unpacked weights `q [.., out, in]`, zeros `z [.., in/g, out]` and scales `s [.., in/g, out]`
    -> `Avx2Int4Weight` (integers lossless; `z·s` computed in fp32)."""
    s32 = s.to(torch.float32)
    zs = z.to(torch.float32) * s32
    return Avx2Int4Weight(to_lane_layout(q), s32.transpose(-1, -2).contiguous(),
                          zs.transpose(-1, -2).contiguous(), group_size)


if __name__ == "__main__":  # `python -m hubdeploy.kernels.awq_cpu`: build now (scripts/setup.sh does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    why = avx2_unavailable_reason()
    print("AWQ CPU kernel: " + ("AVX2 kernel built" if why is None else f"torch's int4 kernel ({why})"))
