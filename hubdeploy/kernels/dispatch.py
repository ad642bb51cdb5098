"""Choosing between a Triton kernel and its plain-torch reference.

Triton runs when the tensor lives on CUDA, or when `HUBDEPLOY_FORCE_TRITON=1` asks for it
on the CPU (then `TRITON_INTERPRET=1` must be set before triton is imported). This is how
tests prove the Triton path on a machine with no GPU.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def force_triton() -> bool:
    return os.environ.get("HUBDEPLOY_FORCE_TRITON", "") == "1"


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
    """Triton's CPU interpreter is on: kernels cast bf16 loads to fp32 at once (FIELD-NOTES)."""
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


def lazy_kernels(build: Callable[[], T]) -> Callable[[], T]:
    """`build()` (which defines `@triton.jit` kernels) run on first use, once per mode
    (compiled / interpreted), so importing a kernel module never imports triton."""
    cache: dict[bool, T] = {}

    def get() -> T:
        mode = interpreting()
        if mode not in cache:
            cache[mode] = build()
        return cache[mode]

    return get


def dot_flags(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """`F32` / `PREC` constexprs for kernels whose `tl.dot` inputs are `a` and `b`.

    fp32/fp64 inputs, mixed dtypes, and every dtype under the interpreter (bf16 loads need
    an fp32 cast right after tl.load there; FIELD-NOTES) run the dots in fp32, in IEEE
    precision (no silent tf32); fp16/bf16 dots on CUDA ignore PREC.
    """
    f32 = a.dtype in (torch.float32, torch.float64) or b.dtype != a.dtype or interpreting() or not a.is_cuda
    return {"F32": f32, "PREC": "ieee" if f32 else "tf32"}
