"""AWQ's two searches, as AutoAWQ 0.2.9 does them (Lin et al., "AWQ", MLSys 2024).

Scale search: for linears that share an input `x`, try per-input-channel scales
`s = mean|x|^a / mean|w~|^(1-a)` (`w~`: weights normalised within each quantization group)
for a in 0, 1/20, ..., 19/20, quantize `W * s` (the caller folds `1/s` into the previous op),
and keep the `s` whose sub-module output is closest (mean squared error) to the 16-bit one.
Clipping search: per output channel and group, shrink the weight range by up to half in 1/20
steps and keep the clip with the smallest error of `x . w` on (at most 512) sampled tokens.
Unlike AutoAWQ, clipping works for any out_features (AutoAWQ asserts a multiple of 64) and
batches output channels by a memory budget.
"""
from __future__ import annotations

from typing import Callable

import torch

from hubdeploy.kernels.awq_format import awq_fake_quantize

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512
CLIP_BATCH_BYTES = 256 << 20  # working set of one clipping batch


def channel_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """Mean |x| per input channel over all rows (float32)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.abs().float().mean(dim=0)


def weight_mean_normalised(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| within each group: AWQ's per-channel weight size."""
    w = torch.cat(weights, dim=0)
    g = w.reshape(-1, group_size).abs()
    return (g / (g.amax(dim=1, keepdim=True) + 1e-6)).view_as(w).mean(dim=0)


def search_scales(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor,
    run: Callable[[torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """Best per-input-channel scales (float32 `[in]`).

    `run(s)` returns the sub-module's output with its searched linears replaced by
    `Q(W * s) / s` (`s=None`: the original 16-bit weights); the loss is the MSE between them.
    """
    reference = run(None)
    best, best_loss = None, float("inf")
    for i in range(N_GRID):
        ratio = i / N_GRID
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1
        loss = (run(s) - reference).float().pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    if best is None:  # every trial was NaN: keep the weights as they are
        best = torch.ones_like(x_mean)
    return best


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """`Q(W * s) / s`: the weight a searched linear acts with under trial scales `s`."""
    return awq_fake_quantize(w * s.view(1, -1), group_size) / s.view(1, -1)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Best clipping bound per (output row, group): `[out, in/g]`; clamp `w` to +-bound.

    The per-group dot products `x[t, g] . w[o, g]` are batched matmuls (AutoAWQ materialises
    the `[out, tokens, groups, group_size]` product instead: the same sums, far more memory).
    """
    out_f, in_f = w.shape
    n_group = in_f // group_size
    x = x.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)].to(w.dtype)
    xg = x.view(-1, n_group, group_size).transpose(0, 1)  # [ng, tokens, gs]
    per_row = (x.shape[0] * n_group + in_f * 3) * w.element_size()
    batch = max(1, min(out_f, CLIP_BATCH_BYTES // max(per_row, 1)))
    bounds = []
    for a in range(0, out_f, batch):
        wb = w[a:a + batch].view(-1, n_group, group_size)  # [b, ng, gs]
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [b, ng, 1]
        ref = torch.bmm(xg, wb.permute(1, 2, 0))  # [ng, tokens, b]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(MAX_SHRINK * N_GRID)):
            max_val = org_max * (1 - i / N_GRID)
            cur = torch.max(torch.min(wb, max_val), -max_val)
            q = awq_fake_quantize(cur.reshape(-1, in_f), group_size).view_as(wb)
            err = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow(2).mean(dim=1).t()[..., None]  # [b, ng, 1]
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        bounds.append(best_max.view(-1, n_group))
    return torch.cat(bounds, dim=0)


def apply_clip(w: torch.Tensor, bounds: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` clamped to `+-bounds` per (row, group)."""
    g = w.view(w.shape[0], -1, group_size)
    b = bounds[..., None].to(w.dtype)
    return torch.max(torch.min(g, b), -b).view_as(w)


__all__ = ["apply_clip", "channel_mean_abs", "scaled_fake_quant", "search_clip", "search_scales", "weight_mean_normalised"]
