"""Choosing between a Triton kernel and its plain-torch reference.

Triton runs when the tensor lives on CUDA, or when `HUBDEPLOY_FORCE_TRITON=1` asks for it
on the CPU (then `TRITON_INTERPRET=1` must be set before triton is imported). This is how
tests prove the Triton path on a machine with no GPU.
"""
from __future__ import annotations

import os

import torch


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
