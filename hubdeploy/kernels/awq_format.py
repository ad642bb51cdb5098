"""AutoAWQ "GEMM" checkpoint format: quantize, pack, unpack, dequantize (plain torch).

The single reference for the on-disk layout that Hub AWQ repos use; the Triton kernels
(`kernels/awq.py`) and the loader import these names so the format is written down once.

Layout per linear layer with weight `w [out, in]` and group size `g` (groups of *input*
channels):
- `qweight` int32 `[in, out/8]`: nibble `i` (bits 4i..4i+3) of column `c` holds output
  column `8c + AWQ_ORDER[i]`.
- `qzeros`  int32 `[in/g, out/8]`: zero points packed the same way.
- `scales`  fp16  `[in/g, out]`.
- `w.T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

AWQ_ORDER: list[int] = [0, 2, 4, 6, 1, 3, 5, 7]
# position p of output column within its group of 8 -> nibble index holding it
AWQ_REVERSE_ORDER: list[int] = [0, 4, 1, 5, 2, 6, 3, 7]
PACK_FACTOR = 8
MAX_INT4 = 15


def _check_group(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"AWQ group_size {group_size} must divide the input dimension {in_features}; "
            "pick a group size that divides every quantized layer's in_features."
        )


def awq_quantize_groups(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's `pseudo_quantize_tensor` arithmetic on `w [out, in]`, unpacked.

    Per group of `group_size` input channels, `scales = (max - min) / 15`,
    `zeros = clamp(-round(min / scales), 0, 15)`, `q = clamp(round(w / scales) + zeros, 0, 15)`,
    in the weight's own dtype (fp16 for Hub checkpoints, as AutoAWQ), so the same weight gives
    bit-identical integers. Returns `(q [out, in], zeros [out, in/g], scales [out, in/g])`,
    all in that dtype; `(q - zeros) * scales` is the weight the checkpoint will hold.
    """
    if w.dim() != 2:
        raise ValueError(f"awq_quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    _check_group(in_f, group_size)
    dt = w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32
    wf = w.detach().to(dt).reshape(out_f, in_f // group_size, group_size)
    w_max = wf.amax(dim=2)
    w_min = wf.amin(dim=2)
    scales = (w_max - w_min).clamp(min=1e-5) / MAX_INT4
    zeros = (-torch.round(w_min / scales)).clamp(0, MAX_INT4)
    q = (torch.round(wf / scales[..., None]) + zeros[..., None]).clamp(0, MAX_INT4)
    return q.reshape(out_f, in_f), zeros, scales


def awq_fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` rounded to the 4-bit grid and back (same shape and dtype): what AWQ's searches score."""
    q, zeros, scales = awq_quantize_groups(w, group_size)
    g = q.view(q.shape[0], -1, group_size)
    return ((g - zeros[..., None]) * scales[..., None]).view_as(w)


def awq_quantize(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `w [out, in]` to AutoAWQ GEMM tensors (asymmetric 4-bit, zero point per group).

    The arithmetic of `awq_quantize_groups` (AutoAWQ's, without its activation-aware scale
    search: `hubdeploy.quantize` adds that), packed. Returns
    `(qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out])`.
    """
    q, zeros, scales = awq_quantize_groups(w, group_size)
    if q.shape[0] % PACK_FACTOR:
        raise ValueError(f"AWQ packs 8 output columns per int32; out_features {q.shape[0]} is not a multiple of 8")
    qweight = awq_pack_int4(q.to(torch.int32).t().contiguous())  # [in, out/8]
    qzeros = awq_pack_int4(zeros.t().contiguous().to(torch.int32))  # [in/g, out/8]
    return qweight, qzeros, scales.t().contiguous().to(torch.float16)


def awq_pack_int4(int_mat: torch.Tensor) -> torch.Tensor:
    """Pack `int_mat [rows, out]` of values 0..15 into int32 `[rows, out/8]` in AWQ nibble order."""
    if int_mat.dim() != 2 or int_mat.shape[1] % PACK_FACTOR:
        raise ValueError(f"awq_pack_int4 expects [rows, out] with out % 8 == 0, got {tuple(int_mat.shape)}")
    v = int_mat.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > MAX_INT4):
        raise ValueError("awq_pack_int4 values must lie in 0..15")
    rows, out_f = v.shape
    v = v.reshape(rows, out_f // PACK_FACTOR, PACK_FACTOR)
    packed = torch.zeros(rows, out_f // PACK_FACTOR, dtype=torch.int64, device=v.device)
    for i, col in enumerate(AWQ_ORDER):
        packed |= v[:, :, col] << (4 * i)
    # reinterpret as signed int32 (two's complement), as the checkpoint stores it
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def awq_unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `awq_pack_int4`: int32 `[rows, out/8]` -> uint8 `[rows, out]`."""
    if packed.dtype != torch.int32:
        raise ValueError(f"AWQ packed tensors are int32, got {packed.dtype}")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([4 * AWQ_REVERSE_ORDER[j] for j in range(PACK_FACTOR)], device=p.device)
    vals = (p[..., None] >> shifts) & 0xF  # [rows, out/8, 8] in output-column order
    return vals.reshape(p.shape[0], -1).to(torch.uint8)


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack to `(iweight uint8 [in, out], izeros uint8 [in/g, out])`."""
    return awq_unpack_int4(qweight), awq_unpack_int4(qzeros)


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Dequantize to `w [in, out]` in `scales`' dtype: `(q - z) * s` (transpose for nn.Linear)."""
    iw, iz = awq_unpack(qweight, qzeros)
    in_f = iw.shape[0]
    _check_group(in_f, group_size)
    if scales.shape != (in_f // group_size, iw.shape[1]) or iz.shape != scales.shape:
        raise ValueError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} for group_size {group_size}"
        )
    z = iz.to(torch.float32).repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    return ((iw.to(torch.float32) - z) * s).to(scales.dtype)


def read_legacy_quant_config(model_dir: str | Path) -> dict[str, Any] | None:
    """Read AutoAWQ's legacy `quant_config.json` (`w_bit`, `q_group_size`, `zero_point`,
    `version`) as a `config.json`-style `quantization_config` dict; None when absent."""
    path = Path(model_dir) / "quant_config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {
        "quant_method": "awq",
        "bits": int(raw.get("w_bit", raw.get("bits", 4))),
        "group_size": int(raw.get("q_group_size", raw.get("group_size", 128))),
        "zero_point": bool(raw.get("zero_point", True)),
        "version": str(raw.get("version", "gemm")).lower(),
        "modules_to_not_convert": list(raw.get("modules_to_not_convert") or []),
    }


__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "PACK_FACTOR",
    "awq_fake_quantize",
    "awq_quantize",
    "awq_quantize_groups",
    "awq_pack_int4",
    "awq_unpack_int4",
    "awq_unpack",
    "awq_dequantize",
    "read_legacy_quant_config",
]
