"""Fused Mixture-of-Experts: routing, slot alignment, torch reference, launch configs (the
Triton kernels and launchers are in fused_moe_triton.py).

Flow (as vLLM's fused_moe): softmax top-k routing -> sort the M·k token slots by expert and
pad each expert's run to a multiple of BLOCK_M (padding slots hold M·k, past the end) ->
one grouped GEMM `x @ w13[e].T` over the sorted slots -> SiLU(gate)·up -> grouped GEMM
`· w2[e].T` with the routing weight multiplied in -> sum over the k slots of each token.
Experts with no tokens get no block, so M = 1 reads only the chosen experts' weights.
Weights are dense (`MoEWeights`) or AWQ (`AWQMoEWeights`, dequantized inside the kernel
with the zero point factored out of the inner loop, see kernels/awq.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from hubdeploy.kernels.awq import AWQPacked, CpuInt4Form, awq_repack, concat_out, stack_packed
from hubdeploy.kernels.awq_cpu import Avx2Dense16Weight, dense16_supported
from hubdeploy.kernels.cpu_gemm import LOW_PRECISION, PACKED_MAX_ROWS, bucket_rows, packed_copy, packed_linear
from hubdeploy.kernels.dispatch import use_triton
from hubdeploy.kernels.tuned import tuned_config

# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------


@dataclass
class MoEWeights:
    """Dense experts: `w13 [E, 2I, H]` (gate rows then up rows), `w2 [E, H, I]`."""

    w13: torch.Tensor
    w2: torch.Tensor

    def __post_init__(self) -> None:
        E, I2, H = self.w13.shape
        if I2 % 2 or self.w2.shape != (E, H, I2 // 2):
            raise ValueError(
                f"MoEWeights: w13 {tuple(self.w13.shape)} must be [E, 2I, H] and w2 "
                f"{tuple(self.w2.shape)} must be [E, H, I]"
            )

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // 2

    def to(self, device: torch.device | str) -> "MoEWeights":
        return MoEWeights(self.w13.to(device), self.w2.to(device))


@dataclass
class AWQMoEWeights:
    """AWQ experts stacked in the `AWQPacked` layout: `w13` (w1 | w3 along out) and `w2`."""

    w13: AWQPacked  # qweight [E, 2I, H/8]
    w2: AWQPacked  # qweight [E, H, I/8]

    @property
    def num_experts(self) -> int:
        return self.w13.qweight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.in_features

    @property
    def intermediate_size(self) -> int:
        return self.w13.out_features // 2

    def to(self, device: torch.device | str) -> "AWQMoEWeights":
        return AWQMoEWeights(self.w13.to(device), self.w2.to(device))


AWQTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def awq_moe_repack(
    w1: Sequence[AWQTriple], w3: Sequence[AWQTriple], w2: Sequence[AWQTriple], group_size: int
) -> AWQMoEWeights:
    """Per-expert AutoAWQ `(qweight, qzeros, scales)` for w1 (gate), w3 (up), w2 (down) -> stacked.

    w1 and w3 are concatenated along out so gate+up is one GEMM. Run on the target device.
    """
    if not (len(w1) == len(w3) == len(w2)) or not w1:
        raise ValueError(f"awq_moe_repack needs the same non-zero number of w1/w3/w2 experts, got {len(w1)}/{len(w3)}/{len(w2)}")
    w13 = [concat_out(awq_repack(*a, group_size), awq_repack(*b, group_size)) for a, b in zip(w1, w3)]
    down = [awq_repack(*c, group_size) for c in w2]
    return AWQMoEWeights(stack_packed(w13), stack_packed(down))


Weights = MoEWeights | AWQMoEWeights


class MoEHook(Protocol):
    """Terms added between fused MoE's two GEMMs (multi-LoRA on experts: serving/lora), as
    vLLM's modular MoE kernel lets LoRA plug in. Rows are the M·k (token, choice) slots, in
    `order` (the torch path's sort of the slots, expert-major) or in slot order (`order` None,
    the Triton paths, where slot = token · k + choice)."""

    def sort_key(self, expert_of_slot: torch.Tensor) -> torch.Tensor:
        """The torch path's stable sort key of the slots (expert-major; may split an expert's run)."""
        ...

    def add_w13(self, h: torch.Tensor, x_rows: torch.Tensor, order: torch.Tensor | None) -> None:
        """Add to `h` (gate | up, before SiLU) in place; `x_rows` are the rows' inputs."""
        ...

    def add_w2(self, y: torch.Tensor, act: torch.Tensor, order: torch.Tensor | None,
               row_weights: torch.Tensor | None) -> None:
        """Add the down-projection terms to fp32 `y` in place, times `row_weights` when given
        (the Triton path's `y` already carries the routing weights; the torch path weights after)."""
        ...

# ----------------------------------------------------------------------------------------
# Routing and alignment
# ----------------------------------------------------------------------------------------


def topk_route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32 then top-k -> `(weights fp32 [M, k], ids int32 [M, k])`.

    `renormalize=True` (Mixtral; Qwen3-MoE when `norm_topk_prob`) rescales the k weights to sum 1.
    """
    if router_logits.dim() != 2 or not 0 < top_k <= router_logits.shape[1]:
        raise ValueError(f"topk_route: logits {tuple(router_logits.shape)} need [M, E] with 0 < top_k={top_k} <= E")
    # softmax's dtype= casts the input first (one op, the same values as `.to` then softmax);
    # the renormalising division writes into topk's fresh output
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w.div_(w.sum(dim=-1, keepdim=True))
    return w, ids.to(torch.int32)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the M·k slots by expert, each expert's run padded to a multiple of `block_m`.

    Returns `sorted_token_ids` int32 (padding = M·k), `expert_ids` int32 per block (-1 past
    the used blocks), `num_tokens_post_pad` int32 [1]. Sizes depend only on shapes (no host
    sync): at most min(M·k, M·k/block_m + E) blocks. Experts with no tokens get no block.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    dev = flat.device
    max_blocks = max(1, min(numel, -(-numel // block_m) + num_experts))
    # scatter_add, not bincount: bincount syncs with the host on CUDA (breaks CUDA graphs)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first_of_e = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=dev) - first_of_e[sorted_e]
    pos = starts[sorted_e] + rank
    sorted_ids = torch.full((max_blocks * block_m,), numel, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=dev) * block_m
    expert_ids = torch.searchsorted(ends, block_start, right=True)
    total = ends[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, torch.full_like(expert_ids, -1))
    return sorted_ids, expert_ids.to(torch.int32), total.to(torch.int32)


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------


def _dense(weights: Weights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(weights, MoEWeights):
        w13, w2 = weights.w13, weights.w2
        if w13.dtype == dtype and w2.dtype == dtype:  # the usual case: no conversion ops per call
            return w13, w2
        return w13.to(dtype), w2.to(dtype)
    return weights.w13.dense_weight(dtype), weights.w2.dense_weight(dtype)


def fused_moe_ref(
    x: torch.Tensor, weights: Weights, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Per-expert loop in torch in x's dtype (sum over k in fp32, fp64 for fp64 x): the reference and CPU path.

    AWQ experts are dequantized once and cached on the CPU (see `AWQPacked.dense_weight`).
    """
    _check(x, weights, topk_weights, topk_ids)
    w13, w2 = _dense(weights, x.dtype)
    I = weights.intermediate_size
    M, k = topk_ids.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(M, x.shape[1], dtype=acc_dtype, device=x.device)
    ids = topk_ids.to(torch.int64)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = x[tok] @ w13[e].t()
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y = act @ w2[e].t()
        out.index_add_(0, tok, y.to(acc_dtype) * topk_weights[tok, slot, None].to(acc_dtype))
    return out.to(x.dtype)


def fused_moe_torch(
    x: torch.Tensor, weights: Weights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    hook: MoEHook | None = None,
) -> torch.Tensor:
    """The CPU path: `fused_moe_ref`'s math with one sort instead of a scan per expert.

    The M·k slots are sorted by expert once (stable, so each token's contributions stay in
    ascending expert order), each expert runs its two GEMMs on a contiguous slice, and one
    `index_add_` sums the weighted rows in that same order: bit-identical to the reference
    (same GEMM shapes and operands, same fp32 additions in the same order) with fewer ops.
    The down GEMMs write into one buffer shared by all experts (no concatenation); at decode
    sizes the gate|up GEMMs do too and SiLU·up runs once over all slots (element-wise: the
    same values as per expert), at prefill sizes it runs per expert (cache locality).
    With a `hook` (expert LoRA) the slots sort by its key, h is kept whole for its terms, and
    the sums run in fp32 whatever x's dtype (the low-precision and one-token CPU paths are for
    the base model alone).
    """
    _check(x, weights, topk_weights, topk_ids)
    I = weights.intermediate_size
    w4 = _cpu_int4_experts(weights, x)
    if w4 is not None:
        if hook is None:
            return _fused_moe_forms(x, I, topk_weights, topk_ids, *w4)
        w13 = w2 = None
    else:
        w13, w2 = _dense(weights, x.dtype)

    def mm13(e: int, a: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(a, w13[e].t(), out=out) if w4 is None else out.copy_(w4[0].mm(a, e))

    def mm2(e: int, a: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(a, w2[e].t(), out=out) if w4 is None else out.copy_(w4[1].mm(a, e))

    M, k = topk_ids.shape
    if hook is None and x.dtype in LOW_PRECISION and x.device.type == "cpu" and M > 0:
        packed = packed_copy(w13, w2)  # per-expert blocked copies (kernels/cpu_gemm.py), if made
        if packed is None and w13.dtype == x.dtype and dense16_supported(w13, w2):  # AVX2: our 16-bit kernel
            return _fused_moe_forms(x, I, topk_weights, topk_ids, Avx2Dense16Weight(w13), Avx2Dense16Weight(w2))
        if M == 1 and packed is not None:
            return _fused_moe_one_token(x, I, topk_weights, topk_ids, packed)
        return _fused_moe_lowp(x, w13, w2, I, topk_weights, topk_ids, packed)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if hook is None and M == 1 and x.device.type == "cpu":
        return _fused_moe_one_token(x, I, topk_weights, topk_ids, None, w13, w2, acc_dtype)
    out = torch.zeros(M, x.shape[1], dtype=acc_dtype, device=x.device)
    if M == 0:
        return out.to(x.dtype)
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    order = torch.argsort(flat if hook is None else hook.sort_key(flat), stable=True)
    counts = torch.bincount(flat, minlength=weights.num_experts).tolist()
    tok = order // k
    xs = x.index_select(0, tok)
    n = M * k
    runs = [(e, a, a + c) for e, (c, a) in enumerate(zip(counts, _starts(counts))) if c]
    y = torch.empty(n, x.shape[1], dtype=x.dtype, device=x.device)
    if n * I < _BATCHED_ACT_MAX or hook is not None:  # decode sizes: SiLU·up once over all slots (fewer ops)
        h = torch.empty(n, 2 * I, dtype=x.dtype, device=x.device)
        for e, a, b in runs:
            mm13(e, xs[a:b], h[a:b])
        if hook is not None:
            hook.add_w13(h, xs, order)
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        for e, a, b in runs:
            mm2(e, act[a:b], y[a:b])
    else:  # prefill sizes: per expert, so each activation is used while it is still in cache
        for e, a, b in runs:
            h = torch.empty(b - a, 2 * I, dtype=x.dtype, device=x.device)
            mm13(e, xs[a:b], h)
            mm2(e, torch.nn.functional.silu(h[:, :I]) * h[:, I:], y[a:b])
    tw = topk_weights.reshape(-1).index_select(0, order)
    if tw.dtype != acc_dtype:
        tw = tw.to(acc_dtype)
    if y.dtype != acc_dtype:
        y = y.to(acc_dtype)
    if hook is not None:
        hook.add_w2(y, act, order, None)
    out.index_add_(0, tok, y.mul_(tw[:, None]))  # y (or its fresh cast) is ours: in place
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _fused_moe_lowp(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, I: int, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The CPU bf16/fp16 path: transformers' MixtralExperts math, laid out for oneDNN (AMX).

    As transformers does in bf16: each expert's output is multiplied by its routing weight
    (here rounded to x's dtype first: within one rounding of transformers' fp32 product),
    and the k contributions of a token are summed by `index_add_` in x's dtype in ascending
    expert order. No fp32 copies of activations (a bf16<->fp32 conversion costs ~1 ns/element
    here, as much as the GEMMs). Each expert's run of slots is padded to `bucket_rows` with
    zero rows (weight 0, landing on token 0 as an exact +0): oneDNN builds a primitive per
    GEMM shape (~1-2 ms), and expert row counts change every step. `packed`: per-expert
    oneDNN-blocked weights (`kernels.cpu_gemm.pack_weight`), ~2x faster at decode sizes.
    """
    M, k = topk_ids.shape
    H = x.shape[1]
    E = w13.shape[0]
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    n = M * k
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    runs, shift, a, real = [], [], 0, 0
    for e, c in enumerate(counts):
        shift.append(a - real)
        if c:
            pb = bucket_rows(c)
            runs.append((e, a, pb))
            a += pb
            real += c
    total = a
    tok = order // k
    tw = topk_weights.reshape(-1).index_select(0, order)
    if total == n:  # no padding needed
        xs = x.index_select(0, tok)
    else:
        pos = torch.arange(n, device=x.device) + torch.tensor(shift, device=x.device)[flat.index_select(0, order)]
        src = torch.full((total,), M, dtype=torch.int64, device=x.device)
        src[pos] = tok
        xs = torch.cat([x, x.new_zeros(1, H)]).index_select(0, src)  # pad slots read the zero row M
        tok = src.masked_fill_(src == M, 0)
        tw = torch.zeros(total, dtype=tw.dtype, device=x.device).index_copy_(0, pos, tw)
    F = torch.nn.functional
    if packed is not None and max(pb for _, _, pb in runs) > PACKED_MAX_ROWS:
        packed = None  # prefill sizes: the plain call is as fast or faster (see kernels/cpu_gemm.py)

    def up(e: int, a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if packed is None:
            return torch.mm(xs[a:b], w13[e].t(), out=out)
        return packed_linear(xs[a:b], packed[0][e]) if out is None else out.copy_(packed_linear(xs[a:b], packed[0][e]))

    def down(act: torch.Tensor, e: int, out: torch.Tensor) -> torch.Tensor:
        if packed is None:
            return torch.mm(act, w2[e].t(), out=out)
        return out.copy_(packed_linear(act, packed[1][e]))

    y = torch.empty(total, H, dtype=x.dtype, device=x.device)
    if total * I < _BATCHED_ACT_MAX:  # decode sizes: SiLU·up once over all slots
        h = torch.empty(total, 2 * I, dtype=x.dtype, device=x.device)
        for e, a, pb in runs:
            up(e, a, a + pb, out=h[a:a + pb])
        act = F.silu(h[:, :I]) * h[:, I:]
        for e, a, pb in runs:
            down(act[a:a + pb], e, out=y[a:a + pb])
    else:  # prefill sizes: per expert, while the activation is in cache
        for e, a, pb in runs:
            h = up(e, a, a + pb)
            down(F.silu(h[:, :I]) * h[:, I:], e, out=y[a:a + pb])
    y.mul_(tw.to(x.dtype)[:, None])  # in x's dtype: a mixed-dtype in-place mul is ~10x slower here
    return torch.zeros(M, H, dtype=x.dtype, device=x.device).index_add_(0, tok, y)


def _fused_moe_one_token(
    x: torch.Tensor, I: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
    w13: torch.Tensor | None = None, w2: torch.Tensor | None = None, acc_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One token (a batch-1 decode step) on the CPU: the same per-expert GEMMs, activation,
    weighting and summation order as `fused_moe_torch` / `_fused_moe_lowp` (bit-identical,
    checked in tests/test_cpu_overhead.py) without the sort, count, gather and scatter that
    pay off only for many tokens: ~20 fewer tensor ops, each a few microseconds here.

    `packed` (bf16/fp16): per-expert oneDNN-blocked weights; the k outputs are weighted in x's
    dtype and summed in ascending expert order in fp32, rounded once (as `index_add_` into
    zeros does there).
    Otherwise (fp32/fp64) plain `w13`/`w2` and the sum in `acc_dtype` (as `fused_moe_torch`).
    """
    ids = topk_ids[0].tolist()
    order = sorted(range(len(ids)), key=ids.__getitem__)  # ascending expert: the reference's order
    silu = torch.nn.functional.silu
    if packed is not None:
        tw = topk_weights[0].to(x.dtype)
        ys = []
        for j in order:
            e = ids[j]
            h = packed_linear(x, packed[0][e])
            ys.append(packed_linear(silu(h[:, :I]) * h[:, I:], packed[1][e]).mul_(tw[j]))
        if len(ys) <= 2:  # one rounding of the fp32 sum either way
            return ys[0] if len(ys) == 1 else ys[0].add_(ys[1])
        acc = ys[0].float()  # `index_add_` sums a row's k > 2 contributions in fp32, rounding once
        for y in ys[1:]:
            acc += y.float()
        return acc.to(x.dtype)
    tw = topk_weights[0]
    if tw.dtype != acc_dtype:
        tw = tw.to(acc_dtype)
    out = torch.zeros_like(x, dtype=acc_dtype)
    for j in order:
        e = ids[j]
        h = torch.mm(x, w13[e].t())
        y = torch.mm(silu(h[:, :I]) * h[:, I:], w2[e].t())
        if y.dtype != acc_dtype:
            y = y.to(acc_dtype)
        out.add_(y.mul_(tw[j]))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _cpu_int4_experts(weights: Weights, x: torch.Tensor) -> tuple[CpuInt4Form, CpuInt4Form] | None:
    """AWQ experts' 4-bit CPU forms when they serve x (`AWQPacked.cpu_int4_for`), else None."""
    if not isinstance(weights, AWQMoEWeights) or x.device.type != "cpu":
        return None
    w13, w2 = weights.w13.cpu_int4_for(x.dtype), weights.w2.cpu_int4_for(x.dtype)
    return None if w13 is None or w2 is None else (w13, w2)


def _fused_moe_forms(
    x: torch.Tensor, I: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    w13: CpuInt4Form | Avx2Dense16Weight, w2: CpuInt4Form | Avx2Dense16Weight,
) -> torch.Tensor:
    """Experts on the CPU with 16-bit x through a CPU kernel's weight form (`.mm(x, expert)`):
    AWQ's 4-bit forms (`CpuInt4Form`, no dense copy) or our AVX2 16-bit one. Same math and
    order as `_fused_moe_lowp` / `_fused_moe_one_token` (routing weight applied in x's dtype,
    the k contributions summed in ascending expert order); these kernels have no per-shape
    primitive, so no padding.
    """
    M, k = topk_ids.shape
    silu = torch.nn.functional.silu
    if M == 1:
        ids = topk_ids[0].tolist()
        tw = topk_weights[0].to(x.dtype)
        ys = []
        for j in sorted(range(k), key=ids.__getitem__):
            h = w13.mm(x, ids[j])
            ys.append(w2.mm(silu(h[:, :I]) * h[:, I:], ids[j]).mul_(tw[j]))
        if len(ys) <= 2:
            return ys[0] if len(ys) == 1 else ys[0].add_(ys[1])
        acc = ys[0].float()
        for y in ys[1:]:
            acc += y.float()
        return acc.to(x.dtype)
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.weight.shape[0]).tolist()
    tok = order // k
    xs = x.index_select(0, tok)
    y = torch.empty(M * k, x.shape[1], dtype=x.dtype, device=x.device)
    for e, (c, a) in enumerate(zip(counts, _starts(counts))):
        if c:
            h = w13.mm(xs[a:a + c], e)
            y[a:a + c].copy_(w2.mm(silu(h[:, :I]) * h[:, I:], e))
    y.mul_(topk_weights.reshape(-1).index_select(0, order).to(x.dtype)[:, None])
    return torch.zeros(M, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, tok, y)


_BATCHED_ACT_MAX = 1 << 16  # elements of the SiLU·up activation up to which it runs once for all experts


def _starts(counts: list[int]) -> list[int]:
    """Exclusive prefix sums of `counts`."""
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def _check(x: torch.Tensor, weights: Weights, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != weights.hidden_size:
        raise ValueError(f"fused_moe: x {tuple(x.shape)} must be [M, {weights.hidden_size}]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [M={x.shape[0]}, k]"
        )


# ----------------------------------------------------------------------------------------
# Launch configs (the kernels and launchers: fused_moe_triton.py)
# ----------------------------------------------------------------------------------------

# Decode batches up to this many tokens skip the slot sort (`moe_align_block_size`, ~30 small
# launches): one program per (N tile, expert, K split) finds its tokens in `topk_ids` itself and
# exits at once when no token chose its expert, so each chosen expert's weights are read once.
DIRECT_MAX_TOKENS = 16


def moe_config(M: int, top_k: int, E: int, N: int, K: int, group_size: int | None, device: torch.device) -> dict[str, int]:
    """Tuned for this GPU (kernels/tuned.py) when a table is committed, else defaults by the
    average slots per expert (decode = BLOCK_M 16 with split-K). BLOCK_M follows the rule either
    way: both grouped GEMMs share one slot alignment."""
    slots_per_expert = M * top_k / E
    bk_cap = 128 if slots_per_expert <= 16 else 64
    bk = min(group_size, bk_cap) if group_size else bk_cap
    if slots_per_expert <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, SPLIT_K=0, num_warps=4, num_stages=4)
    elif slots_per_expert <= 128:
        cfg = dict(BLOCK_M=32 if slots_per_expert <= 32 else 64, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=1, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=1, num_warps=8, num_stages=3)
    if device.type != "cuda":  # interpreter: small tiles are much faster
        cfg.update(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1)
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    t = tuned_config("moe_aligned", _shape_key(E, N, K, group_size), M, device)
    if t is not None:
        cfg.update({k: v for k, v in t.items() if k != "BLOCK_M"})
    return cfg


def _shape_key(E: int, N: int, K: int, group_size: int | None) -> str:
    return f"E={E},N={N},K={K},G={group_size or 0}"


def moe_direct_config(M: int, E: int, N: int, K: int, group_size: int | None,
                      device: torch.device) -> dict[str, int]:
    """Launch config of the direct (decode) path: tuned for this GPU (kernels/tuned.py) when a
    table is committed, else the rule: a 16-row `tl.dot` tile (on the H200 it beat the BLOCK_M 1
    GEMV even for one token), split-K sized in `direct_gemm` (SPLIT_K 0 = auto)."""
    t = tuned_config("moe_direct", _shape_key(E, N, K, group_size), M, device)
    if t is not None and t.get("BLOCK_M", 16) >= M:
        return t
    bk = min(group_size, 128) if group_size else 128
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, SPLIT_K=0, num_warps=4, num_stages=1, LOOP_STAGES=1)
    if device.type != "cuda":  # interpreter: small tiles are much faster
        cfg.update(BLOCK_N=32, BLOCK_K=min(bk, 32), num_warps=1, LOOP_STAGES=1)
    return cfg


def fused_moe(
    x: torch.Tensor, weights: Weights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    hook: MoEHook | None = None,
) -> torch.Tensor:
    """`sum_j w_j · expert_{id_j}(x)` for each token (+ `hook`'s terms between the GEMMs):
    Triton on CUDA (or forced), else `fused_moe_torch`."""
    if use_triton(x):
        from hubdeploy.kernels.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(x, weights, topk_weights, topk_ids, hook)
    return fused_moe_torch(x, weights, topk_weights, topk_ids, hook)


__all__ = [
    "MoEWeights",
    "AWQMoEWeights",
    "MoEHook",
    "awq_moe_repack",
    "topk_route",
    "moe_align_block_size",
    "moe_config",
    "moe_direct_config",
    "fused_moe_ref",
    "fused_moe_torch",
    "fused_moe",
]
