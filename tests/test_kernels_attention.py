"""Paged KV cache writes and paged attention: reference vs SDPA, Triton vs reference.

The reference is checked against `torch.nn.functional.scaled_dot_product_attention` on
contiguous K/V (fp64); the Triton kernels against the reference (fp32: atol/rtol 2e-5;
fp16: 2e-3; bf16: 2e-2). Triton runs under its CPU interpreter in a child process, as explained at the
top of tests/fixtures/triton_interp.py; with a GPU also in process on CUDA;
and every kernel is compiled ahead of time for sm_90 (`aot_compile`, no GPU needed).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hubdeploy.kernels import attention_triton as attn
from hubdeploy.kernels.attention import (
    paged_attention,
    paged_attention_ref,
    paged_attention_torch,
    store_kv,
    store_kv_ref,
    store_kv_torch,
)
from hubdeploy.kernels.attention_triton import (
    paged_attention_decode_triton,
    paged_attention_triton,
    store_kv_triton,
)
from tests.fixtures.triton_interp import Cases, aot_compile, run_cases_main, triton_case_tests

CASES = Cases()
case = CASES.register


@dataclass
class Batch:
    q: torch.Tensor  # [N, H, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor  # slots of the new tokens (with -1 padding rows appended)
    keys: list[torch.Tensor]  # per sequence contiguous K [ctx, Hkv, D]
    values: list[torch.Tensor]

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.context_lens, self.block_tables,
                int((self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).max()), int(self.context_lens.max()))


def make_batch(ctx_lens: list[int], q_lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
               seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu", pad_rows: int = 2) -> Batch:
    """Sequences on shuffled (non-contiguous) blocks; prefix K/V written directly, new K/V via store_kv."""
    g = torch.Generator().manual_seed(seed)
    nblk = [(c + block_size - 1) // block_size for c in ctx_lens]
    num_blocks = sum(nblk) + 3  # spare blocks that no sequence owns (must never be read)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.full((len(ctx_lens), max(nblk) + 1), -1, dtype=torch.int32)
    keys, values, new_k, new_v, slots = [], [], [], [], []
    for b, (ctx, ql) in enumerate(zip(ctx_lens, q_lens)):
        blocks = [perm.pop() for _ in range(nblk[b])]
        tables[b, : nblk[b]] = torch.tensor(blocks, dtype=torch.int32)
        kk = torch.randn(ctx, kv_heads, head_dim, generator=g).to(dtype)
        vv = torch.randn(ctx, kv_heads, head_dim, generator=g).to(dtype)
        keys.append(kk)
        values.append(vv)
        for pos in range(ctx):
            slot = blocks[pos // block_size] * block_size + pos % block_size
            if pos < ctx - ql:
                k_cache[slot // block_size, slot % block_size] = kk[pos]
                v_cache[slot // block_size, slot % block_size] = vv[pos]
            else:
                slots.append(slot)
                new_k.append(kk[pos])
                new_v.append(vv[pos])
    # padding rows (as CUDA-graph padding) carry garbage and slot -1: must not be stored
    for _ in range(pad_rows):
        slots.append(-1)
        new_k.append(torch.full((kv_heads, head_dim), 1e4).to(dtype))
        new_v.append(torch.full((kv_heads, head_dim), 1e4).to(dtype))
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    store_kv(torch.stack(new_k).to(device), torch.stack(new_v).to(device), k_cache, v_cache, slot_mapping.to(device))
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=g).to(dtype)
    return Batch(q.to(device), k_cache, v_cache, cu.to(device), torch.tensor(ctx_lens, dtype=torch.int32).to(device),
                 tables.to(device), slot_mapping.to(device), keys, values)


def sdpa_expected(batch: Batch, scale: float, window: int | None) -> torch.Tensor:
    """Plain SDPA per sequence on contiguous K/V in fp64; the new tokens are the last q_len rows."""
    outs = []
    cu = batch.cu_seqlens_q.tolist()
    for b, (kk, vv) in enumerate(zip(batch.keys, batch.values)):
        ctx, ql = kk.shape[0], cu[b + 1] - cu[b]
        q = batch.q[cu[b]: cu[b + 1]].double().cpu().transpose(0, 1)  # [H, ql, D]
        qpos = torch.arange(ctx - ql, ctx)[:, None]
        kpos = torch.arange(ctx)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        o = F.scaled_dot_product_attention(
            q[None], kk.double().transpose(0, 1)[None], vv.double().transpose(0, 1)[None],
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- reference vs SDPA


@pytest.mark.parametrize(
    "ctx_lens,q_lens,heads,kv_heads,block_size,window",
    [
        ([9, 23], [9, 23], 4, 4, 4, None),  # prefill, MHA
        ([30, 7, 12], [1, 1, 1], 8, 2, 4, None),  # decode, GQA 4
        ([40, 17], [6, 17], 8, 1, 16, None),  # chunked prefill over a cached prefix, GQA 8
        ([40, 17], [6, 17], 4, 2, 4, 5),  # sliding window
    ],
)
def test_reference_matches_sdpa(ctx_lens, q_lens, heads, kv_heads, block_size, window) -> None:
    batch = make_batch(ctx_lens, q_lens, heads, kv_heads, 16, block_size, dtype=torch.float64)
    out = paged_attention_ref(*batch.args(), scale=0.25, sliding_window=window)
    torch.testing.assert_close(out, sdpa_expected(batch, 0.25, window), atol=1e-10, rtol=1e-10)
    # the padding rows with slot -1 wrote nothing: the garbage value 1e4 is nowhere in the cache
    assert batch.k_cache.abs().max() < 1e3 and batch.v_cache.abs().max() < 1e3


@pytest.mark.parametrize(
    "ctx_lens,q_lens,heads,kv_heads,block_size,window",
    [
        ([9, 23], [9, 23], 4, 4, 4, None),  # prefill, MHA
        ([30, 7, 12, 1], [1, 1, 1, 1], 8, 2, 4, None),  # decode, GQA 4
        ([30, 7, 12], [1, 1, 1], 4, 2, 4, 5),  # decode, sliding window
        ([40, 17], [6, 17], 8, 1, 16, None),  # chunked prefill over a cached prefix, GQA 8
        ([40, 17, 25, 3], [1, 17, 1, 3], 4, 2, 4, None),  # decodes mixed with prefills
        ([40, 17, 25], [1, 17, 2], 4, 2, 4, 5),  # mixed, sliding window
    ],
)
def test_torch_path_matches_sdpa_and_reference(ctx_lens, q_lens, heads, kv_heads, block_size, window) -> None:
    """The CPU fast path (vectorized decode, SDPA prefill): fp64 against SDPA, fp32 against the reference."""
    batch = make_batch(ctx_lens, q_lens, heads, kv_heads, 16, block_size, dtype=torch.float64)
    out = paged_attention_torch(*batch.args(), scale=0.25, sliding_window=window)
    torch.testing.assert_close(out, sdpa_expected(batch, 0.25, window), atol=1e-10, rtol=1e-10)
    batch = make_batch(ctx_lens, q_lens, heads, kv_heads, 16, block_size, seed=1)
    got = paged_attention(*batch.args(), scale=0.25, sliding_window=window)  # CPU dispatcher -> torch path
    expect = paged_attention_ref(*batch.args(), scale=0.25, sliding_window=window)
    torch.testing.assert_close(got, expect, atol=2e-6, rtol=2e-6)


def test_store_kv_ref_writes_slots_and_skips_minus_one() -> None:
    kc = torch.zeros(3, 4, 2, 8)
    vc = torch.zeros(3, 4, 2, 8)
    k = torch.randn(3, 2, 8)
    v = torch.randn(3, 2, 8)
    store_kv_ref(k, v, kc, vc, torch.tensor([9, -1, 2]))
    torch.testing.assert_close(kc[2, 1], k[0], atol=0, rtol=0)
    torch.testing.assert_close(vc[0, 2], v[2], atol=0, rtol=0)
    assert int((kc != 0).any(-1).any(-1).sum()) == 2  # exactly two slots written


@pytest.mark.parametrize("slots", [[9, 0, 2, 5], [9, -1, 2, -1]])
def test_store_kv_torch_equals_reference(slots: list[int]) -> None:
    """The CPU path writes exactly what the reference writes (padding slots -1 included)."""
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    caches = [torch.zeros(3, 4, 2, 8) for _ in range(4)]
    store_kv_ref(k, v, caches[0], caches[1], torch.tensor(slots))
    store_kv_torch(k, v, caches[2], caches[3], torch.tensor(slots))
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_errors_name_the_problem() -> None:
    batch = make_batch([5], [5], 4, 2, 8, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention_ref(batch.q[:, :3], *batch.args()[1:], scale=1.0)
    with pytest.raises(ValueError, match="new tokens but context_len"):
        paged_attention_ref(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q,
                            torch.tensor([3], dtype=torch.int32), batch.block_tables, 5, 3, scale=1.0)


# ----------------------------------------------------------------------------- Triton vs reference


def _check(batch: Batch, window: int | None, what: str, atol: float = 2e-5, **decode_kw) -> None:
    expect = paged_attention_ref(*batch.args(), scale=0.3, sliding_window=window)
    if decode_kw:
        q, kc, vc, _, cl, bt, _, max_ctx = batch.args()
        got = paged_attention_decode_triton(q, kc, vc, cl, bt, max_ctx, 0.3, window, **decode_kw)
    else:
        got = paged_attention(*batch.args(), scale=0.3, sliding_window=window)  # dispatcher -> Triton
    torch.testing.assert_close(got.float(), expect.float(), atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


@case
def case_store_kv(device: str) -> None:
    kc = torch.zeros(5, 4, 2, 8, device=device)
    vc = torch.zeros_like(kc)
    kc2, vc2 = kc.clone(), vc.clone()
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(4, 2 + 2, 8, generator=g).to(device)  # k|v as strided views of one buffer
    k, v = kv[:, :2], kv[:, 2:]
    slots = torch.tensor([17, -1, 3, 8], device=device)
    store_kv_triton(k, v, kc, vc, slots)
    store_kv_ref(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@case
def case_decode_gqa_block_sizes(device: str) -> None:
    for bs, (h, hkv) in [(4, (4, 4)), (16, (8, 2)), (4, (8, 1))]:
        batch = make_batch([1, 37, 12, 70], [1, 1, 1, 1], h, hkv, 16, bs, seed=bs + h, device=device)
        _check(batch, None, f"decode bs={bs} H={h} Hkv={hkv}")


@case
def case_decode_split_context(device: str) -> None:
    batch = make_batch([3, 90, 41], [1, 1, 1], 8, 2, 16, 4, seed=7, device=device)
    _check(batch, None, "decode split 32", partition_size=32)  # 3 splits, incl. empty ones
    _check(batch, 20, "decode split + window", partition_size=32)
    # max_context_len below the real contexts (a CUDA graph captured earlier): still exact
    expect = paged_attention_ref(*batch.args(), scale=0.3)
    for max_ctx, part in [(8, None), (40, 16)]:
        got = paged_attention_decode_triton(batch.q, batch.k_cache, batch.v_cache, batch.context_lens,
                                            batch.block_tables, max_ctx, 0.3, partition_size=part)
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)


@case
def case_decode_sliding_window(device: str) -> None:
    batch = make_batch([50, 6, 33], [1, 1, 1], 4, 1, 32, 16, seed=3, device=device)
    _check(batch, 8, "decode window 8")


@case
def case_prefill(device: str) -> None:
    batch = make_batch([20, 5, 33], [20, 5, 33], 4, 2, 16, 4, seed=4, device=device)
    _check(batch, None, "prefill")


@case
def case_prefill_gqa_ratios(device: str) -> None:
    # GQA 1 / 4 / 8 in the prefill kernel too, over a cached prefix (chunked prefill)
    for h, hkv in [(4, 4), (8, 2), (8, 1)]:
        batch = make_batch([26, 11], [9, 11], h, hkv, 16, 4, seed=20 + h + hkv, device=device)
        _check(batch, None, f"prefill GQA {h // hkv}")


@case
def case_chunked_prefill_with_prefix_and_decode_mix(device: str) -> None:
    # prefix-cached prefill (ctx > q_len), plain prefill, and decode rows in one batch
    batch = make_batch([45, 18, 9, 30], [12, 18, 1, 17], 8, 1, 16, 16, seed=5, device=device)
    _check(batch, None, "chunked prefill mix")


@case
def case_prefill_sliding_window(device: str) -> None:
    batch = make_batch([45, 18], [30, 18], 4, 4, 16, 4, seed=6, device=device)
    _check(batch, 7, "prefill window 7")


@case
def case_fp16(device: str) -> None:
    batch = make_batch([29, 10], [1, 1], 8, 2, 32, 16, seed=8, dtype=torch.float16, device=device)
    _check(batch, None, "decode fp16", atol=2e-3)
    batch = make_batch([29, 10], [13, 10], 8, 2, 32, 16, seed=9, dtype=torch.float16, device=device)
    _check(batch, None, "prefill fp16", atol=2e-3)


@case
def case_bf16(device: str) -> None:
    # bf16 K/V; on the CPU the interpreter's fp32 -> bf16 output cast truncates (1 ulp)
    for q_lens in ([1, 1], [7, 12]):
        batch = make_batch([20, 12], q_lens, 8, 2, 32, 4, seed=11, dtype=torch.bfloat16, device=device)
        _check(batch, None, f"bf16 q_lens={q_lens}", atol=2e-2)


@case
def case_head_dim_128_and_80(device: str) -> None:
    # Mixtral/Qwen head_dim 128, and a non-power-of-two head_dim (masked to 128 lanes)
    for d in (128, 80):
        batch = make_batch([21, 9], [1, 1], 4, 1, d, 16, seed=d, device=device)
        _check(batch, None, f"decode D={d}")
        batch = make_batch([21, 9], [5, 9], 4, 1, d, 16, seed=d + 1, device=device)
        _check(batch, None, f"prefill D={d}")


@case
def case_dispatch_picks_decode_kernel(device: str) -> None:
    batch = make_batch([15, 4], [1, 1], 4, 2, 16, 4, seed=10, device=device)
    a = paged_attention_triton(*batch.args(), scale=0.3)
    b = paged_attention_decode_triton(batch.q, batch.k_cache, batch.v_cache, batch.context_lens,
                                      batch.block_tables, 15, 0.3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_kernels_compile_for_sm90(dt: str) -> None:
    """Mixtral shapes (GQA 4, D 128, block 16) at the block sizes the launchers pick on CUDA."""
    p = f"*{dt}"
    common = dict(q_ptr=p, kc_ptr=p, vc_ptr=p, bt_ptr="*i32", ctx_ptr="*i32", out_ptr=p)
    for splits in (1, 8):
        aot_compile(attn._decode_kernel, dict(common, tmp_o_ptr="*fp32", tmp_ml_ptr="*fp32"),
                    dict(GROUP=4, BS=16, D=128, BLOCK_G=16, BLOCK_N=32, BLOCK_D=128, PART=512, SPLITS=splits,
                         HAS_WINDOW=splits > 1, F32=False, PREC="tf32"), floats=("sm_scale",))
    aot_compile(attn._decode_reduce_kernel, dict(tmp_o_ptr="*fp32", tmp_ml_ptr="*fp32", out_ptr=p),
                dict(D=128, SPLITS=8, BLOCK_S=8, BLOCK_D=128))
    aot_compile(attn._prefill_kernel, dict(common, cu_ptr="*i32"),
                dict(GROUP=4, BS=16, D=128, BLOCK_M=64, BLOCK_N=32, BLOCK_D=128, HAS_WINDOW=True, F32=False,
                     PREC="tf32"), floats=("sm_scale",))
    aot_compile(attn._store_kv_kernel, dict(k_ptr=p, v_ptr=p, kc_ptr=p, vc_ptr=p, slot_ptr="*i64"),
                dict(BLOCK_H=8, BLOCK_D=128))


interp_results, test_triton_interpreted, test_triton_cuda = triton_case_tests("tests.test_kernels_attention", CASES)


if __name__ == "__main__":
    run_cases_main(CASES)
