"""Multi-LoRA shrink/expand (Punica style) for a batch that mixes adapters per token.

Adapters live in fixed device slots, zero-padded to the largest rank: `lora_a [S, r_max, in]`,
`lora_b [S, out, r_max]`, `scalings [S]` fp32 (alpha / r, or alpha / sqrt(r) for rsLoRA).
The base GEMM runs once for the whole batch; then per token

    t   = x @ A[slot]^T                    (lora_shrink, fp32 result [N, r_max])
    out[:, off:off+o] += scaling[slot] * t @ B[slot]^T   (lora_expand, in place)

with slot -1 meaning "no adapter" (no work, no change). Zero padding makes mixed ranks exact.

Two Triton shapes (lora_triton.py), as Punica: BGMV (one token per program; decode) and SGMV
(runs of consecutive tokens with the same slot, `lora_segments`; prefill). MoE experts use the
row-wise `moe_lora_*` ops: each row is one (token, k) pair with its own expert and slot.
"""
from __future__ import annotations

import torch

from hubdeploy.kernels.dispatch import use_triton

__all__ = [
    "LoRASegments",
    "lora_segments",
    "lora_shrink",
    "lora_shrink_ref",
    "lora_expand",
    "lora_expand_ref",
    "moe_lora_ref",
    "moe_lora_shrink",
    "moe_lora_shrink_ref",
    "moe_lora_expand",
    "moe_lora_expand_ref",
]

LoRASegments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def lora_segments(token_slots: torch.Tensor) -> LoRASegments:
    """Runs of consecutive tokens with the same slot: (seg_starts, seg_lens, seg_slots), int32.

    Compute once per step and pass to every LoRA call of the step (it syncs with the host).
    Runs of slot -1 are included; kernels skip them.
    """
    slots, counts = torch.unique_consecutive(token_slots, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return starts.to(torch.int32), counts.to(torch.int32), slots.to(torch.int32)


# ----------------------------------------------------------------------------- references


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> None:
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(
            f"lora_shrink: need x [N, in] and lora_a [S, r, in]; got {tuple(x.shape)}, {tuple(lora_a.shape)}"
        )
    if token_slots.shape != (x.shape[0],):
        raise ValueError(f"lora_shrink: token_slots must be [N={x.shape[0]}], got {tuple(token_slots.shape)}")


def _check_expand(out: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                  scalings: torch.Tensor, out_offset: int) -> None:
    if out.dim() != 2 or t.dim() != 2 or lora_b.dim() != 3 or t.shape[0] != out.shape[0]:
        raise ValueError(
            f"lora_expand: need out [N, o], t [N, r], lora_b [S, o, r]; "
            f"got {tuple(out.shape)}, {tuple(t.shape)}, {tuple(lora_b.shape)}"
        )
    if lora_b.shape[2] != t.shape[1]:
        raise ValueError(f"lora_expand: t has rank {t.shape[1]} but lora_b has {lora_b.shape[2]}")
    if out_offset < 0 or out_offset + lora_b.shape[1] > out.shape[1]:
        raise ValueError(
            f"lora_expand: columns [{out_offset}, {out_offset + lora_b.shape[1]}) do not fit out width {out.shape[1]}"
        )
    if token_slots.shape != (out.shape[0],) or scalings.shape != (lora_b.shape[0],):
        raise ValueError(
            f"lora_expand: token_slots must be [N={out.shape[0]}] and scalings [S={lora_b.shape[0]}]; "
            f"got {tuple(token_slots.shape)}, {tuple(scalings.shape)}"
        )


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_of(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot clamped to 0 as int64, row uses an adapter): gather indices with no host sync."""
    return token_slots.clamp(min=0).long(), token_slots >= 0


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """t[n] = x[n] @ A[slot[n]]^T in fp32 (fp64 for fp64 inputs); rows with slot -1 are zero.

    BGMV in torch: each row's A is gathered (`index_select`) and one batched matmul runs
    them all, so the cost does not grow with the number of distinct slots, and nothing
    waits on the device (no data-dependent shapes): CUDA-graph safe.
    """
    _check_shrink(x, lora_a, token_slots)
    acc = _acc(x)
    idx, valid = _rows_of(token_slots)
    a = lora_a.index_select(0, idx).to(acc)  # [N, r, in]
    t = torch.bmm(a, x.to(acc).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid[:, None], t, 0.0)


def _add_rows(out: torch.Tensor, delta: torch.Tensor) -> None:
    """out += delta in place, through the accumulation dtype when out is narrower."""
    if out.dtype == delta.dtype:
        out.add_(delta)
    else:
        out.copy_(out.to(delta.dtype) + delta)


def lora_expand_ref(out: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                    scalings: torch.Tensor, out_offset: int = 0) -> torch.Tensor:
    """out[n, off:off+o] += scaling[slot] * t[n] @ B[slot]^T (in place, slot -1 rows untouched:
    their scaling is 0, and x + 0 == x). BGMV in torch as `lora_shrink_ref`."""
    _check_expand(out, t, lora_b, token_slots, scalings, out_offset)
    acc = _acc(out)
    idx, valid = _rows_of(token_slots)
    b = lora_b.index_select(0, idx).to(acc)  # [n, o, r]
    sc = torch.where(valid, scalings.index_select(0, idx).to(acc), 0.0)
    delta = torch.bmm(b, t.to(acc).unsqueeze(-1)).squeeze(-1) * sc[:, None]
    _add_rows(out[:, out_offset:out_offset + lora_b.shape[1]], delta)
    return out


def _check_moe_shrink(x_rows: torch.Tensor, lora_a: torch.Tensor) -> None:
    if lora_a.dim() != 4 or x_rows.dim() != 2 or lora_a.shape[3] != x_rows.shape[1]:
        raise ValueError(f"moe_lora_shrink: need x_rows [T, in], lora_a [S, E, r, in]; got "
                         f"{tuple(x_rows.shape)}, {tuple(lora_a.shape)}")


def _check_moe_expand(out: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor) -> None:
    if lora_b.dim() != 4 or out.shape[1] != lora_b.shape[2] or t.shape[1] != lora_b.shape[3]:
        raise ValueError(f"moe_lora_expand: need out [T, o], t [T, r], lora_b [S, E, o, r]; got "
                         f"{tuple(out.shape)}, {tuple(t.shape)}, {tuple(lora_b.shape)}")


def _expert_rows(lora_w: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's [slot, expert] matrix of `lora_w [S, E, a, b]` gathered -> ([T, a, b], valid rows)."""
    idx, valid = _rows_of(slot_of_row)
    S, E = lora_w.shape[:2]
    key = idx * E + expert_of_row.long()
    return lora_w.reshape(S * E, *lora_w.shape[2:]).index_select(0, key), valid


def moe_lora_shrink_ref(x_rows: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                        lora_a: torch.Tensor) -> torch.Tensor:
    """Per (token, k) row: x_rows[t] @ A[slot, expert]^T -> [T, r] fp32; slot -1 rows are zero.
    BGMV in torch (gather + batched matmul), no host sync."""
    _check_moe_shrink(x_rows, lora_a)
    acc = _acc(x_rows)
    a, valid = _expert_rows(lora_a, expert_of_row, slot_of_row)
    t = torch.bmm(a.to(acc), x_rows.to(acc).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid[:, None], t, 0.0)


def moe_lora_expand_ref(out: torch.Tensor, t: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                        lora_b: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """out[row] += scaling[slot] * t[row] @ B[slot, expert]^T in place; slot -1 rows untouched."""
    _check_moe_expand(out, t, lora_b)
    acc = _acc(out)
    b, valid = _expert_rows(lora_b, expert_of_row, slot_of_row)
    sc = torch.where(valid, scalings.index_select(0, slot_of_row.clamp(min=0).long()).to(acc), 0.0)
    delta = torch.bmm(b.to(acc), t.to(acc).unsqueeze(-1)).squeeze(-1) * sc[:, None]
    _add_rows(out, delta)
    return out


def moe_lora_ref(x_rows: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                 lora_a: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """The LoRA delta [T, out] (fp32) of each (token, k) row through its expert's adapter.

    Rows are what fused MoE feeds an expert GEMM: for w13 the token's hidden state, for w2
    the row's activated intermediate; `expert_of_row = topk_ids.flatten()`,
    `slot_of_row = token_slots.repeat_interleave(top_k)`.
    """
    t = moe_lora_shrink_ref(x_rows, expert_of_row, slot_of_row, lora_a)
    out = torch.zeros((x_rows.shape[0], lora_b.shape[2]), dtype=t.dtype, device=x_rows.device)
    return moe_lora_expand_ref(out, t, expert_of_row, slot_of_row, lora_b, scalings)


# ----------------------------------------------------------------------------- dispatchers


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor,
                segments: LoRASegments | None = None) -> torch.Tensor:
    """x [N, in] -> t [N, r_max] fp32 through each token's adapter A (slot -1 -> zeros)."""
    if use_triton(x):
        from hubdeploy.kernels.lora_triton import lora_shrink_triton

        return lora_shrink_triton(x, lora_a, token_slots, segments)
    return lora_shrink_ref(x, lora_a, token_slots)


def lora_expand(out: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                scalings: torch.Tensor, out_offset: int = 0, segments: LoRASegments | None = None) -> torch.Tensor:
    """Add scaling[slot] * t @ B[slot]^T into out[:, out_offset:out_offset+o] in place; returns out."""
    if use_triton(out):
        from hubdeploy.kernels.lora_triton import lora_expand_triton

        return lora_expand_triton(out, t, lora_b, token_slots, scalings, out_offset, segments)
    return lora_expand_ref(out, t, lora_b, token_slots, scalings, out_offset)


def moe_lora_shrink(x_rows: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                    lora_a: torch.Tensor) -> torch.Tensor:
    """Per (token, k) row: x_rows @ A[slot, expert]^T -> [T, r] fp32."""
    if use_triton(x_rows):
        from hubdeploy.kernels.lora_triton import moe_lora_shrink_triton

        return moe_lora_shrink_triton(x_rows, expert_of_row, slot_of_row, lora_a)
    return moe_lora_shrink_ref(x_rows, expert_of_row, slot_of_row, lora_a)


def moe_lora_expand(out: torch.Tensor, t: torch.Tensor, expert_of_row: torch.Tensor, slot_of_row: torch.Tensor,
                    lora_b: torch.Tensor, scalings: torch.Tensor) -> torch.Tensor:
    """Per (token, k) row: out += scaling[slot] * t @ B[slot, expert]^T in place; returns out."""
    if use_triton(out):
        from hubdeploy.kernels.lora_triton import moe_lora_expand_triton

        return moe_lora_expand_triton(out, t, expert_of_row, slot_of_row, lora_b, scalings)
    return moe_lora_expand_ref(out, t, expert_of_row, slot_of_row, lora_b, scalings)
