"""Paged KV cache writes and causal attention over paged K/V (decode, prefill, chunked prefill).

Cache layout per layer: `k_cache, v_cache` each `[num_blocks, block_size, num_kv_heads, head_dim]`;
token `t` of a sequence lives in block `block_tables[b, t // block_size]` at offset
`t % block_size`. One contract serves every step shape: the `q_len_b` new tokens of
sequence `b` are the last `q_len_b` positions of its `context_lens[b]` tokens (their K/V are
stored first with `store_kv`), each attends causally (and within `sliding_window`, Mistral
style: a query at position p sees keys at positions > p - window). GQA by `H // Hkv`.

Layers, side by side: `*_ref` (plain torch, fp32 math; the contract), `*_torch` (the CPU
path the dispatchers take without Triton: the same contract vectorized over the batch), the Triton
kernels (attention_triton.py) and the dispatchers.
"""
from __future__ import annotations

import torch

from hubdeploy.kernels.cpu_step import DecodeKV, DensePlan, current_step, dense_kv_views, gather_blocks, step_memo
from hubdeploy.kernels.dispatch import use_triton

__all__ = [
    "store_kv",
    "store_kv_ref",
    "store_kv_torch",
    "paged_attention",
    "paged_attention_ref",
    "paged_attention_torch",
]

# ----------------------------------------------------------------------------- store_kv


def _check_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"store_kv: k and v must both be [N, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(
            f"store_kv: caches must be [num_blocks, block_size, Hkv={k.shape[1]}, D={k.shape[2]}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"store_kv: slot_mapping must be [N={k.shape[0]}], got {tuple(slot_mapping.shape)}")


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V at its flat slot (block * block_size + offset); slot -1 is skipped."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    nb, bs, hkv, d = k_cache.shape
    blocks, offs = slots // bs, slots % bs
    k_cache[blocks, offs] = k[valid].to(k_cache.dtype)
    v_cache[blocks, offs] = v[valid].to(v_cache.dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's new K/V [N, Hkv, D] into the paged caches in place (slot -1 = skip)."""
    if use_triton(k):
        from hubdeploy.kernels.attention_triton import store_kv_triton

        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """The CPU path: `index_copy_` into the flat [slots, Hkv, D] view (the reference's boolean
    mask and 2-D advanced indexing cost more than the copy at decode sizes). Same result.
    Whether the step has padding slots (-1) is looked at once per CPU step (`cpu_step`)."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    step_cache = step_memo()
    key = ("store_slots", id(slot_mapping))
    slots = step_cache.get(key) if step_cache is not None else None
    if slots is None:
        slots = slot_mapping.to(torch.long)
        if k.shape[0] and int(slot_mapping.min()) < 0:
            slots = False  # padding rows: the masked path
        if step_cache is not None:
            step_cache[key] = slots
    if slots is False:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    nb, bs, hkv, d = k_cache.shape
    k_cache.view(nb * bs, hkv, d).index_copy_(0, slots, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    v_cache.view(nb * bs, hkv, d).index_copy_(0, slots, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))


# ----------------------------------------------------------------------------- reference


def _check_attn(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                context_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"paged_attention: q must be [N, H, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(
            f"paged_attention: caches must be [num_blocks, block_size, Hkv, D={q.shape[2]}], "
            f"got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: {q.shape[1]} query heads not a multiple of {k_cache.shape[2]} KV heads")
    b = context_lens.shape[0]
    if cu_seqlens_q.shape != (b + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != b:
        raise ValueError(
            f"paged_attention: for {b} sequences need cu_seqlens_q [{b + 1}] and block_tables [{b}, max_blocks]; "
            f"got {tuple(cu_seqlens_q.shape)} and {tuple(block_tables.shape)}"
        )


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Gather each sequence's K/V through its block table; masked softmax attention in fp32."""
    _check_attn(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables)
    n, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros((n, h, d), dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    ctx_lens = context_lens.tolist()
    for b, ctx in enumerate(ctx_lens):
        q0, q1 = cu[b], cu[b + 1]
        qlen = q1 - q0
        if qlen == 0:
            continue
        if qlen > ctx:
            raise ValueError(f"paged_attention: sequence {b} has {qlen} new tokens but context_len {ctx}")
        nblk = (ctx + bs - 1) // bs
        blocks = block_tables[b, :nblk].long()
        kk = k_cache[blocks].reshape(nblk * bs, hkv, d)[:ctx].to(acc_dtype)
        vv = v_cache[blocks].reshape(nblk * bs, hkv, d)[:ctx].to(acc_dtype)
        kk = kk.repeat_interleave(group, dim=1)  # [ctx, H, D]
        vv = vv.repeat_interleave(group, dim=1)
        qq = q[q0:q1].to(acc_dtype)  # [qlen, H, D]
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask = mask & (kpos > qpos - sliding_window)
        scores = scores.masked_fill(~mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vv).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- torch fast path (CPU)


def _decode_plan(context_lens: torch.Tensor, block_tables: torch.Tensor, max_context_len: int, bs: int,
                 sliding_window: int | None, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decode batch's attention needs besides q and the caches, the same in every layer:
    the block index [B, nblk] (int64; -1 padding reads block 0, masked) and the additive key
    mask [B, 1, 1, L] (0 where visible, -inf past a sequence's length or outside its window:
    what SDPA turns a boolean mask into, so passing it is bit-identical and saves the conversion)."""
    nblk = max(1, min(-(-max_context_len // bs), block_tables.shape[1]))
    blocks = block_tables[:, :nblk].to(torch.long).clamp(min=0)
    kpos = torch.arange(nblk * bs, device=context_lens.device)[None, :]
    lens = context_lens.to(torch.long)[:, None]
    hidden = kpos >= lens
    if sliding_window is not None:
        hidden |= kpos <= lens - 1 - sliding_window
    mask = torch.zeros(hidden.shape, dtype=acc_dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
    return blocks, mask[:, None, None, :]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU paths hand SDPA: fp64 and fp32 as they are, bf16/fp16 too (SDPA's
    CPU kernel accumulates softmax and P·V in fp32 inside, as transformers' sdpa attention
    relies on), other dtypes fp32. No fp32 copies of the gathered K/V."""
    return dtype if dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                  block_tables: torch.Tensor, max_context_len: int, scale: float,
                  sliding_window: int | None, step_cache: dict | None = None,
                  dense: DecodeKV | None = None, keys: list | None = None) -> torch.Tensor:
    """Every row of q [B, H, D] is the one new token of sequence b: the whole batch at once.

    One gather of the batch's blocks ([B, L, Hkv, D], L = max context rounded up to blocks),
    then one SDPA call over strided views with a key mask (positions past a sequence's
    length or outside its window). The Python cost no longer grows with the batch (the
    reference loops over sequences). The block index and mask are built once per step
    (`step_cache`, the CPU step's memo) and shared by the layers; with `dense` (and the
    sequences' `keys`) the K/V come from its buffers instead of a gather.
    """
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    acc_dtype = _work_dtype(q.dtype)
    key = ("decode_plan", id(context_lens), id(block_tables), max_context_len, bs, sliding_window, acc_dtype)
    plan = step_cache.get(key) if step_cache is not None else None
    if plan is None:
        plan = _decode_plan(context_lens, block_tables, max_context_len, bs, sliding_window, acc_dtype)
        # `dense` needs the once-per-step plan (step_cache); a step that does not use it leaves
        # the buffers as they were, and rows whose sequences moved on are gathered again
        row_bytes = hkv * d * torch.finfo(acc_dtype).bits // 8
        if (dense is not None and keys is not None and step_cache is not None
                and dense.worth(b, plan[0].shape[1] * bs, row_bytes)):
            plan = (*plan, dense.plan(keys, context_lens, plan[0], bs))
        if step_cache is not None:
            step_cache[key] = plan
    blocks, mask = plan[0], plan[1]
    if len(plan) == 3:
        dp: DensePlan = plan[2]
        kk, vv = dense_kv_views(dense, dp, k_cache, v_cache, blocks, acc_dtype)
        if dp.order is not None:  # buffer rows are not in batch order: permute q and mask to them
            q = q.index_select(0, dp.order)
            mask = mask.index_select(0, dp.order)
    else:
        dp = None
        kk = gather_blocks(k_cache, blocks)
        vv = gather_blocks(v_cache, blocks)
        if kk.dtype != acc_dtype:
            kk, vv = kk.to(acc_dtype), vv.to(acc_dtype)
    # GQA folded into the query axis: the group's heads are `group` queries of one KV head
    # ([B, Hkv, group, D] against [B, Hkv, L, D]), so SDPA never repeats K/V per query head.
    o = torch.nn.functional.scaled_dot_product_attention(
        (q if q.dtype == acc_dtype else q.to(acc_dtype)).reshape(b, hkv, h // hkv, d),
        kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask, scale=scale)
    o = o.reshape(b, h, d)
    if dp is not None and dp.rows is not None:
        o = o.index_select(0, dp.rows)
    return o if o.dtype == q.dtype else o.to(q.dtype)


def _prefill_seq_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor,
                       ctx: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One sequence's q [qlen, H, D] (its last qlen positions) over its ctx cached tokens, SDPA with GQA."""
    qlen, h, d = q.shape
    hkv = k_cache.shape[2]
    acc_dtype = _work_dtype(q.dtype)
    kk = gather_blocks(k_cache, blocks[None])[0, :ctx].to(acc_dtype).transpose(0, 1)  # [Hkv, ctx, D]
    vv = gather_blocks(v_cache, blocks[None])[0, :ctx].to(acc_dtype).transpose(0, 1)
    qq = q.to(acc_dtype).transpose(0, 1)  # [H, qlen, D]
    mask = None
    if qlen != ctx or sliding_window is not None:  # causal, bottom-right aligned
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
    # 4-D ([1, H, ...]): SDPA's CPU flash kernel takes only batched inputs; 3-D ones fall back
    # to the math path (fp32 casts, a materialized mask: 2-3x the time of a prefill's attention)
    o = torch.nn.functional.scaled_dot_product_attention(
        qq[None], kk[None], vv[None], attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=hkv != h)[0]
    return o.transpose(0, 1).to(q.dtype)


def _prefill_batched_low_precision(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu: list[int],
                                   ctx_lens: list[int], block_tables: torch.Tensor, scale: float,
                                   sliding_window: int | None, out: torch.Tensor) -> set[int]:
    """bf16/fp16: whole-prompt sequences (no cached prefix, q_len == context_len > 1, no window) of
    equal length through one batched causal SDPA call per length (32 prompts of 64 tokens: 0.9 ms
    instead of 5.0 ms per layer here). Writes their rows of `out`; returns the sequences done."""
    if sliding_window is not None:
        return set()
    groups: dict[int, list[int]] = {}
    for b, ctx in enumerate(ctx_lens):
        if cu[b + 1] - cu[b] == ctx > 1:
            groups.setdefault(ctx, []).append(b)
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    h, d = q.shape[1], q.shape[2]
    done: set[int] = set()
    for ctx, seqs in groups.items():
        if len(seqs) < 2:
            continue
        sel = torch.tensor(seqs, dtype=torch.long, device=q.device)
        blocks = block_tables.index_select(0, sel)[:, :(ctx + bs - 1) // bs].to(torch.long)
        kk = gather_blocks(k_cache, blocks)[:, :ctx].transpose(1, 2)  # [n, Hkv, ctx, D]
        vv = gather_blocks(v_cache, blocks)[:, :ctx].transpose(1, 2)
        rows = torch.cat([torch.arange(cu[b], cu[b + 1], device=q.device) for b in seqs])
        qq = q.index_select(0, rows).view(len(seqs), ctx, h, d).transpose(1, 2)  # [n, H, ctx, D]
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                                             enable_gqa=hkv != h)
        out.index_copy_(0, rows, o.transpose(1, 2).reshape(-1, h, d))
        done.update(seqs)
    return done


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The CPU path of `paged_attention` (same contract as `paged_attention_ref`; fp32 math for
    fp32, bf16/fp16 handed to SDPA as they are: its CPU kernel accumulates in fp32 inside).

    Decode rows (q_len 1) of the whole batch go through one vectorized `_decode_torch`;
    prefill / chunked-prefill sequences through SDPA one sequence at a time. Agrees with the
    reference to fp32 rounding (summation order differs), see tests/test_kernels_attention.py.
    """
    _check_attn(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables)
    n = q.shape[0]
    nseq = context_lens.shape[0]
    if n == 0 or nseq == 0:
        return torch.zeros_like(q)
    step = current_step()  # the CPU step's memo and dense decode K/V, when a CPU backend runs one
    step_cache, dense_kv = (step.memo, step.dense) if step is not None else (None, None)
    keys = step.keys if dense_kv is not None else None
    if max_seqlen_q == 1 and n == nseq:
        return _decode_torch(q, k_cache, v_cache, context_lens, block_tables, max_context_len, scale,
                             sliding_window, step_cache, dense_kv, keys)
    cu = cu_seqlens_q.tolist()
    ctx_lens = context_lens.tolist()
    out = torch.empty_like(q)
    sub = step_cache.get("decode_rows") if step_cache is not None else None
    if sub is None:  # the decode rows of a mixed step, the same in every layer
        dec = [b for b in range(nseq) if cu[b + 1] - cu[b] == 1]
        sub = (dec, None)
        if dec:
            sel = torch.tensor(dec, dtype=torch.long, device=q.device)
            sub = (dec, (torch.tensor([cu[b] for b in dec], dtype=torch.long, device=q.device),
                         context_lens.index_select(0, sel), block_tables.index_select(0, sel),
                         max(ctx_lens[b] for b in dec), [keys[b] for b in dec] if keys is not None else None))
        if step_cache is not None:
            step_cache["decode_rows"] = sub
    dec = sub[0]
    if dec:
        rows, sub_lens, sub_tables, sub_max, sub_keys = sub[1]
        out[rows] = _decode_torch(q.index_select(0, rows), k_cache, v_cache, sub_lens, sub_tables, sub_max, scale,
                                  sliding_window, step_cache, dense_kv, sub_keys)
    bs = k_cache.shape[1]
    done: set[int] = set()
    if q.dtype in (torch.bfloat16, torch.float16):
        done = _prefill_batched_low_precision(q, k_cache, v_cache, cu, ctx_lens, block_tables, scale,
                                              sliding_window, out)
    for b, ctx in enumerate(ctx_lens):
        q0, q1 = cu[b], cu[b + 1]
        qlen = q1 - q0
        if qlen <= 1 or b in done:
            continue
        if qlen > ctx:
            raise ValueError(f"paged_attention: sequence {b} has {qlen} new tokens but context_len {ctx}")
        blocks = block_tables[b, :(ctx + bs - 1) // bs].to(torch.long)
        out[q0:q1] = _prefill_seq_torch(q[q0:q1], k_cache, v_cache, blocks, ctx, scale, sliding_window)
    return out


# ----------------------------------------------------------------------------- dispatchers


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    max_context_len: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the step's new tokens q [N, H, D] over their sequences' paged K/V."""
    if use_triton(q):
        from hubdeploy.kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, max_context_len,
            scale, sliding_window,
        )
    return paged_attention_torch(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q, max_context_len,
        scale, sliding_window,
    )
