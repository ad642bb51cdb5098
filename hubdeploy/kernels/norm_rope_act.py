"""RMSNorm (+ fused residual add), rotary embeddings (neox style) and SiLU·mul.

Small element-wise ops that sit between the big GEMMs of every decoder layer. Each op has
a plain-torch reference (`<op>_ref`, the numerics contract, written to match transformers'
Llama/Mixtral/Qwen code), a Triton kernel (`<op>_triton`, in norm_rope_act_triton.py) and a
dispatcher (`<op>`) that picks one with `kernels.dispatch.use_triton`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from hubdeploy.kernels.cpu_step import step_memo
from hubdeploy.kernels.dispatch import use_triton

__all__ = [
    "rms_norm",
    "rms_norm_ref",
    "rms_norm_torch",
    "rotary_inv_freq",
    "rotary_cos_sin",
    "apply_rotary",
    "apply_rotary_ref",
    "apply_rotary_torch",
    "silu_and_mul",
    "silu_and_mul_ref",
    "silu_and_mul_torch",
]

# ----------------------------------------------------------------------------- RMSNorm


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaRMSNorm, optionally after `x + residual` (returned as the new residual).

    The sum is formed in fp32 and cast to x's dtype (as the decoder layer's residual add
    does in that dtype); the norm is taken of that cast value, exactly as HF sees it.
    """
    dtype = x.dtype
    new_residual = None
    if residual is not None:
        new_residual = (x.to(torch.float32) + residual.to(torch.float32)).to(dtype)
        x = new_residual
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    out = (weight * h.to(dtype)).to(dtype)
    if new_residual is None:
        return out
    return out, new_residual


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x` (or of `x + residual`, then also returning that sum as the new residual)."""
    if use_triton(x):
        from hubdeploy.kernels.norm_rope_act_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: fp32 through the fused `torch.rms_norm` (one op instead of six; bit-identical
    to `rms_norm_ref` in fp32, checked in tests/test_kernels_ops.py). bf16/fp16 take the
    unweighted fused norm (fp32 inside, rounded once to x's dtype, as the reference's
    `h.to(dtype)`) then the weight in x's dtype: bit-identical to the reference (and to
    transformers' RMSNorm) with no fp32 copies; the residual sum `x + residual` rounds once,
    as the reference's fp32 add does. Mixed dtypes take the reference."""
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
        residual is not None and residual.dtype != x.dtype
    ):
        return rms_norm_ref(x, weight, eps, residual)
    if x.dtype != torch.float32:
        s = x if residual is None else x + residual
        out = weight * torch.rms_norm(s, weight.shape, None, eps)
        return out if residual is None else (out, s)
    if residual is None:
        return torch.rms_norm(x, weight.shape, weight, eps)
    s = x + residual
    return torch.rms_norm(s, weight.shape, weight, eps), s


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, features] tensor with a unit last stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2


# ----------------------------------------------------------------------------- Rotary


def rotary_inv_freq(
    head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None, max_positions: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] fp32 and the cos/sin multiplier, as transformers computes them.

    Follows `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS` for `default`, `linear`,
    `dynamic`, `yarn` and `llama3`. `dynamic` is the static table transformers builds at
    init (sequence length = `max_position_embeddings`), which equals `default`: transformers
    only re-scales once a sequence grows past `max_position_embeddings`; we do not, so
    dynamic-NTK models match transformers up to that length and differ beyond it.
    """
    if head_dim % 2:
        raise ValueError(f"rotary: head_dim must be even, got {head_dim}")
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(
            "rotary: partial_rotary_factor != 1 is not supported (Llama/Mixtral/Qwen rotate all of head_dim)"
        )
    dim = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(_need(scaling, "factor", rope_type)), 1.0
    if rope_type == "dynamic":
        return inv_freq, 1.0
    if rope_type == "llama3":
        factor = float(_need(scaling, "factor", rope_type))
        low = float(_need(scaling, "low_freq_factor", rope_type))
        high = float(_need(scaling, "high_freq_factor", rope_type))
        old_ctx = float(_need(scaling, "original_max_position_embeddings", rope_type))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        inv_l = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv_l), 1.0
    if rope_type == "yarn":
        orig = _need(scaling, "original_max_position_embeddings", rope_type)
        factor = scaling.get("factor")
        if factor is None:
            if max_positions is None:
                raise ValueError("rotary yarn: rope_scaling has no 'factor'; give it or max_positions")
            factor = max_positions / orig
        factor = float(factor)
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extra_factor = 1 - ramp
        return inter * (1 - extra_factor) + extra * extra_factor, float(attention_factor)
    raise ValueError(
        f"rotary: rope_scaling type {rope_type!r} is not supported; "
        "supported: default, linear, dynamic, yarn, llama3"
    )


def _need(scaling: dict[str, Any], key: str, rope_type: str) -> Any:
    if scaling.get(key) is None:
        raise ValueError(f"rotary {rope_type}: rope_scaling needs {key!r} (got keys {sorted(scaling)})")
    return scaling[key]


def rotary_cos_sin(
    head_dim: int,
    max_positions: int,
    theta: float,
    rope_scaling: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Table [max_positions, head_dim]: cos over the first head_dim//2 columns, sin over the rest.

    Built once per model; positions index rows. Yarn's attention factor multiplies both halves.
    """
    inv_freq, attention_factor = rotary_inv_freq(head_dim, theta, rope_scaling, max_positions)
    pos = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1).to(dtype)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :].to(xf.dtype), sin[:, None, :].to(xf.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotation (`x * cos + rotate_half(x) * sin`), computed in fp32; new tensors."""
    _check_rotary(q, k, positions, cos_sin)
    half = q.shape[-1] // 2
    cs = cos_sin[positions.long()]
    cos, sin = cs[:, :half], cs[:, half:]
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"apply_rotary: q and k must be [N, heads, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] != cos_sin.shape[-1]:
        raise ValueError(
            f"apply_rotary: head_dim mismatch q {q.shape[-1]}, k {k.shape[-1]}, cos_sin {cos_sin.shape[-1]}"
        )
    if positions.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(f"apply_rotary: positions {tuple(positions.shape)} must be [N={q.shape[0]}]")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [N, H, D] and k [N, Hkv, D] by their token positions (neox style); returns new tensors."""
    if use_triton(q):
        from hubdeploy.kernels.norm_rope_act_triton import apply_rotary_triton

        return apply_rotary_triton(q, k, positions, cos_sin)
    return apply_rotary_torch(q, k, positions, cos_sin)


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [N, H, D] and k [N, Hkv, D] as one [N, H + Hkv, D] view when k's heads follow q's in
    memory with the same strides (q and k sliced from one fused qkv GEMM output), else None."""
    if q.dtype != k.dtype or q.stride() != k.stride() or q.stride(2) != 1 or q.shape[0] != k.shape[0]:
        return None
    if q.shape[0] > 1 and q.stride(0) < (q.shape[1] + k.shape[1]) * q.stride(1):
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def apply_rotary_torch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU path: `apply_rotary_ref`'s element-wise math (bit-identical), with fewer ops.

    The cos/sin rows of the step's positions are gathered once per CPU step and kept in its
    memo (`cpu_step.step_memo`: every layer rotates the same positions), and when k's heads follow q's in
    memory (both sliced from the qkv GEMM output) q and k rotate as one [N, H + Hkv, D] tensor;
    q and k come back as views of that one new tensor.
    """
    _check_rotary(q, k, positions, cos_sin)
    if q.dtype != k.dtype:
        return apply_rotary_ref(q, k, positions, cos_sin)
    half = q.shape[-1] // 2
    # bf16/fp16 too rotate in fp32, rounded once (as the reference). Rotating in bf16 with bf16
    # cos/sin (transformers' formula, each op rounded) was tried: bit-identical to transformers
    # op for op, and ~1.5 ms less per 2048-token layer, but a bf16 checkpoint's logits then
    # moved 0.1 away from transformers' bf16 through one near-tied router choice
    # (tests/test_loader_errors.py::test_bf16_checkpoint), so the reference's rounding stays.
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    key = ("rotary", id(cos_sin), id(positions), work)
    step_cache = step_memo()
    cs = step_cache.get(key) if step_cache is not None else None
    if cs is None:
        rows = cos_sin.index_select(0, positions.long()).to(work)
        cos, sin = rows[:, None, :half], rows[:, None, half:]
        cs = (torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
        if step_cache is not None:
            step_cache[key] = cs
    cos2, sin2 = cs
    qk = _adjacent_heads(q, k)
    if qk is None:
        return _rotate_cs(q, cos2, sin2), _rotate_cs(k, cos2, sin2)
    out = _rotate_cs(qk, cos2, sin2)
    h = q.shape[1]
    return out[:, :h], out[:, h:]


def _rotate_cs(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """`_rotate_ref` with cos2 = [cos | cos] and sin2 = [-sin | sin], [N, 1, D] in the working
    dtype (made once per step): `x * cos2 + [x2 | x1] * sin2` is `[x1·cos - x2·sin | x2·cos + x1·sin]`
    bit for bit (negation is exact and a - b == a + (-b)), in 5 ops instead of 9."""
    half = x.shape[-1] // 2
    xf = x if x.dtype == cos2.dtype else x.to(cos2.dtype)
    out = xf * cos2
    out += xf.roll(half, -1).mul_(sin2)  # [x2 | x1]: roll is ~2x cheaper than a cat of the halves here
    return out if out.dtype == x.dtype else out.to(x.dtype)


# ----------------------------------------------------------------------------- SiLU·mul


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim (fp32 math, cast back)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even (gate|up), got {x.shape[-1]}")
    i = x.shape[-1] // 2
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    return (torch.nn.functional.silu(xf[..., :i]) * xf[..., i:]).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[M, 2I] -> [M, I]: silu(x[:, :I]) * x[:, I:] (the gated MLP activation)."""
    if use_triton(x):
        from hubdeploy.kernels.norm_rope_act_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_torch(x)


_LOW = (torch.bfloat16, torch.float16)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """The CPU path: the reference for fp32/fp64 (bit-identical); bf16/fp16 in their own dtype
    as transformers' MLP does (`act_fn(gate) * up`, each op rounded), no fp32 copies."""
    if x.dtype not in _LOW:
        return silu_and_mul_ref(x)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even (gate|up), got {x.shape[-1]}")
    i = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :i]) * x[..., i:]
