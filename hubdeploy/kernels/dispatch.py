"""Choosing between a Triton kernel and its plain-torch reference.

Triton runs when the tensor lives on CUDA, or when `HUBDEPLOY_FORCE_TRITON=1` asks for it
on the CPU (then `TRITON_INTERPRET=1` must be set before triton is imported: Triton fixes
compiled-vs-interpreted at its first import). This is how tests prove the Triton path on a
machine with no GPU.

The convention every kernel family follows: `<family>.py` holds the layout, the torch
reference and CPU paths and the dispatcher, and never imports triton; `<family>_triton.py`
holds the Triton kernels and their launchers, imports triton at the top, and is imported
by the dispatcher inside the branch that runs it. So the engine imports, and runs on the
CPU, where triton is absent (macOS), and a `_triton` module is the only place to look for
GPU code. tests/test_kernel_modules.py checks both.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

from hubdeploy.kernels.cpu_step import kernel_switch


def force_triton() -> bool:
    return kernel_switch("HUBDEPLOY_FORCE_TRITON") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """True when `t`'s op should run through Triton rather than the torch reference."""
    if t.is_cuda:
        return True
    return force_triton() and triton_available()


def interpreting() -> bool:
    """Triton's CPU interpreter is on: kernels cast bf16 loads to fp32 at once (the interpreter's bf16 arithmetic is
    unreliable)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def check_launchable(kernel: Any, t: torch.Tensor) -> Any:
    """`kernel`, after checking it can run on `t`'s device (compiled on CUDA, interpreted on
    CPU): a forced Triton call on CPU tensors without the interpreter fails with what to set."""
    if t.is_cuda:
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernel called on CPU tensors but Triton runs compiled in this process: set "
            "TRITON_INTERPRET=1 before the first `import triton`, or unset HUBDEPLOY_FORCE_TRITON "
            "to use the torch reference."
        )
    return kernel


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter): sizes split-K grids."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def dot_flags(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """`F32` / `PREC` constexprs for kernels whose `tl.dot` inputs are `a` and `b`.

    fp32/fp64 inputs, mixed dtypes, and every dtype under the interpreter (bf16 loads need
    an fp32 cast right after tl.load there) run the dots in fp32, in IEEE
    precision (no silent tf32); fp16/bf16 dots on CUDA ignore PREC.
    """
    f32 = a.dtype in (torch.float32, torch.float64) or b.dtype != a.dtype or interpreting() or not a.is_cuda
    return {"F32": f32, "PREC": "ieee" if f32 else "tf32"}
