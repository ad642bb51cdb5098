"""Fused MoE: routing, slot alignment, torch reference vs a per-token float64 loop, Triton vs
the reference (dense and AWQ experts).

The Triton cases (`CASES`) run on the CPU in one child process under Triton's interpreter and
in process on CUDA with the `gpu` marker (tests/fixtures/triton_interp.py); `aot_compile`
proves the kernels compile to sm_90 cubins.

Tolerance: max |y − y_ref| ≤ tol · max |y_ref|; y_ref in float64 from the same (dequantized)
weights and x rounded to the test dtype. tol = 1e-5 fp32, 5e-3 fp16, 3e-2 bf16 (the
intermediate SiLU·up activation is rounded to x's dtype, as in vLLM).
"""
from __future__ import annotations

import pytest
import torch

from hubdeploy.kernels.awq_format import awq_dequantize, awq_quantize
from tests.fixtures.triton_interp import (
    Cases,
    aot_compile,
    assert_rel_close,
    run_cases_main,
    triton_case_tests,
)
from hubdeploy.kernels.fused_moe import (
    DIRECT_MAX_TOKENS,
    AWQMoEWeights,
    MoEWeights,
    awq_moe_repack,
    fused_moe,
    fused_moe_ref,
    fused_moe_torch,
    moe_align_block_size,
    topk_route,
)
from hubdeploy.kernels.fused_moe_triton import fused_moe_triton

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CASES = Cases()
case = CASES.add


def _dense(E: int, H: int, I: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=gen) / H**0.5, torch.randn(E, H, I, generator=gen) / I**0.5


def _awq(E: int, H: int, I: int, g: int, seed: int = 0) -> tuple[AWQMoEWeights, list]:
    w13, w2 = _dense(E, H, I, seed)
    w1 = [awq_quantize(w13[e, :I], g) for e in range(E)]
    w3 = [awq_quantize(w13[e, I:], g) for e in range(E)]
    dn = [awq_quantize(w2[e], g) for e in range(E)]
    return awq_moe_repack(w1, w3, dn, g), [w1, w3, dn]


def _per_token_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
    """Independent float64 reference: loop over tokens and their k choices."""
    I = w2.shape[2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ti.shape[1]):
            e = int(ti[t, j])
            h = w13[e].double() @ x[t].double()
            out[t] += float(tw[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


def _routing(M: int, E: int, k: int, case: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(M, E, generator=gen)
    if case == "one_expert":  # every token's first choice is expert 2
        logits[:, 2] += 100.0
    elif case == "some_empty":  # experts >= k never chosen
        logits[:, k:] -= 100.0
    return topk_route(logits, k, renormalize=True)


# ---------------------------------------------------------------- routing and alignment


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route(renormalize: bool) -> None:
    logits = torch.randn(6, 8, dtype=torch.bfloat16)
    w, ids = topk_route(logits, 2, renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (6, 2)
    probs = torch.softmax(logits.double(), -1)
    chosen = probs.gather(1, ids.long())
    assert torch.equal(ids.long(), probs.topk(2, -1).indices)
    expect = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
    assert torch.allclose(w.double(), expect, atol=1e-6)
    if renormalize:
        assert torch.allclose(w.sum(-1), torch.ones(6), atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        topk_route(logits, 9, renormalize)


@pytest.mark.parametrize("M,k,E,bm", [(1, 2, 8, 16), (5, 2, 4, 4), (33, 3, 6, 8), (7, 1, 3, 16)])
def test_moe_align_block_size(M: int, k: int, E: int, bm: int) -> None:
    ids = torch.randint(0, E, (M, k), dtype=torch.int32)
    ids[:, 0] = torch.where(ids[:, 0] == E - 1, 0, ids[:, 0])  # often leaves expert E-1 empty
    sorted_ids, expert_ids, ntp = moe_align_block_size(ids, bm, E)
    flat = ids.flatten().tolist()
    n = len(flat)
    # brute force: expert by expert, slots in order, padded to bm with n
    exp_sorted, exp_eids = [], []
    for e in range(E):
        slots = [i for i, v in enumerate(flat) if v == e]
        if not slots:
            continue
        pad = -len(slots) % bm
        exp_sorted += slots + [n] * pad
        exp_eids += [e] * ((len(slots) + pad) // bm)
    total = len(exp_sorted)
    assert int(ntp[0]) == total
    assert sorted_ids[:total].tolist() == exp_sorted
    assert (sorted_ids[total:] == n).all()
    assert expert_ids[: total // bm].tolist() == exp_eids
    assert (expert_ids[total // bm:] == -1).all()
    assert sorted_ids.numel() % bm == 0 and expert_ids.numel() == sorted_ids.numel() // bm


def test_align_m1_touches_only_chosen_experts() -> None:
    ids = torch.tensor([[5, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, ntp = moe_align_block_size(ids, 16, 8)
    assert expert_ids.tolist() == [2, 5] and int(ntp[0]) == 32
    assert sorted_ids[0].item() == 1 and sorted_ids[16].item() == 0


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("case", ["random", "one_expert", "some_empty"])
def test_ref_matches_per_token_float64(case: str) -> None:
    E, H, I, k, M = 6, 32, 16, 2, 9
    w13, w2 = _dense(E, H, I)
    x = torch.randn(M, H, dtype=torch.float64)
    tw, ti = _routing(M, E, k, case, seed=1)
    y = fused_moe_ref(x, MoEWeights(w13.double(), w2.double()), tw, ti)
    assert_rel_close(y, _per_token_ref(x, w13, w2, tw, ti), 1e-12)


@pytest.mark.parametrize("case", ["random", "one_expert", "some_empty"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_path_is_bit_identical_to_reference(case: str, k: int, dtype: torch.dtype) -> None:
    """The CPU path (one sort, slices per expert) keeps the reference's GEMMs and addition order."""
    E, H, I, M = 6, 32, 16, 9
    w13, w2 = _dense(E, H, I)
    w = MoEWeights(w13.to(dtype), w2.to(dtype))
    x = torch.randn(M, H, dtype=dtype)
    tw, ti = _routing(M, E, k, case, seed=2)
    assert torch.equal(fused_moe_torch(x, w, tw, ti), fused_moe_ref(x, w, tw, ti))
    assert fused_moe_torch(x[:0], w, tw[:0], ti[:0]).shape == (0, H)


def test_awq_moe_repack_concatenates_gate_and_up() -> None:
    E, H, I, g = 3, 64, 32, 32
    w, (w1, w3, dn) = _awq(E, H, I, g)
    dense13 = w.w13.dequantize()
    for e in range(E):
        expect = torch.cat([awq_dequantize(*w1[e], g), awq_dequantize(*w3[e], g)], dim=1).t()
        assert torch.equal(dense13[e], expect)
        assert torch.equal(w.w2.dequantize()[e], awq_dequantize(*dn[e], g).t())
    assert (w.num_experts, w.hidden_size, w.intermediate_size) == (E, H, I)


def test_bad_shapes_are_errors() -> None:
    with pytest.raises(ValueError, match="w2"):
        MoEWeights(torch.zeros(2, 8, 4), torch.zeros(2, 4, 3))
    w13, w2 = _dense(2, 8, 4)
    tw, ti = topk_route(torch.randn(3, 2), 1, True)
    with pytest.raises(ValueError, match="x"):
        fused_moe_ref(torch.zeros(3, 7), MoEWeights(w13, w2), tw, ti)


def test_dispatcher_uses_reference_on_cpu_without_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBDEPLOY_FORCE_TRITON", raising=False)
    w13, w2 = _dense(4, 16, 8)
    x = torch.randn(3, 16)
    tw, ti = topk_route(torch.randn(3, 4), 2, True)
    assert torch.equal(fused_moe(x, MoEWeights(w13, w2), tw, ti), fused_moe_ref(x, MoEWeights(w13, w2), tw, ti))


# ---------------------------------------------------------------- Triton vs reference (cases)


def _paths(M: int) -> tuple[bool, ...]:
    """Both MoE paths where both apply: the direct decode path (M ≤ DIRECT_MAX_TOKENS) and the
    slot-sorted grouped GEMMs (any M)."""
    return (True, False) if M <= DIRECT_MAX_TOKENS else (False,)


def _triton_dense(dev: str, M: int, kind: str, dtype: torch.dtype) -> None:
    E, H, I, k = 8, 64, 32, 2
    w13, w2 = _dense(E, H, I, seed=M)
    w13, w2 = w13.to(dtype), w2.to(dtype)
    x = torch.randn(M, H).to(dtype)
    tw, ti = _routing(M, E, k, kind, seed=M)
    ref = fused_moe_ref(x.double(), MoEWeights(w13.double(), w2.double()), tw, ti)
    for direct in _paths(M):
        y = fused_moe_triton(x.to(dev), MoEWeights(w13, w2).to(dev), tw.to(dev), ti.to(dev), DIRECT=direct)
        assert y.shape == (M, H) and y.dtype == dtype
        assert_rel_close(y, ref, TOL[dtype])


for _dt in (torch.float32, torch.float16, torch.bfloat16):
    for _m, _kind in ((1, "random"), (5, "some_empty"), (33, "random"), (17, "one_expert")):
        case(f"dense_M{_m}_{_kind}_{str(_dt)[6:]}", _triton_dense, M=_m, kind=_kind, dtype=_dt)


def _triton_awq(dev: str, dtype: torch.dtype, g: int) -> None:
    E, H, I, k, M = 4, 128, g, 2, 7
    w, _ = _awq(E, H, I, g, seed=g)
    x = torch.randn(M, H).to(dtype)
    tw, ti = _routing(M, E, k, "random", seed=g)
    y = fused_moe_triton(x.to(dev), w.to(dev), tw.to(dev), ti.to(dev))
    assert_rel_close(y, fused_moe_ref(x.double(), w, tw, ti), TOL[dtype])  # float64 from dequantized experts


for _dt, _g in ((torch.float32, 32), (torch.float16, 32), (torch.bfloat16, 32), (torch.float16, 64), (torch.bfloat16, 128)):
    case(f"awq_{str(_dt)[6:]}_g{_g}", _triton_awq, dtype=_dt, g=_g)


def _triton_awq_edge(dev: str, M: int, kind: str, renorm: bool) -> None:
    E, H, I, k, g = 8, 64, 32, 2, 32
    w, _ = _awq(E, H, I, g, seed=M)
    x = torch.randn(M, H, dtype=torch.float16)
    tw, ti = _routing(M, E, k, kind, seed=M)
    if not renorm:
        tw, ti = topk_route(torch.randn(M, E), k, renormalize=False)
    for direct in _paths(M):
        y = fused_moe_triton(x.to(dev), w.to(dev), tw.to(dev), ti.to(dev), DIRECT=direct)
        assert_rel_close(y, fused_moe_ref(x.double(), w, tw, ti), TOL[torch.float16])


for _m, _kind, _rn in ((1, "random", False), (33, "some_empty", True), (12, "one_expert", True)):
    case(f"awq_edge_M{_m}_{_kind}_renorm{int(_rn)}", _triton_awq_edge, M=_m, kind=_kind, renorm=_rn)


def _triton_all_on_one_expert(dev: str, awq: bool) -> None:
    """top-1 with every token on expert 2: one expert spans several blocks, the others get none."""
    E, H, I, M, g = 4, 64, 32, 33, 32
    w13, w2 = _dense(E, H, I, seed=11)
    w = _awq(E, H, I, g, seed=11)[0] if awq else MoEWeights(w13, w2)
    logits = torch.randn(M, E)
    logits[:, 2] += 100.0
    tw, ti = topk_route(logits, 1, renormalize=True)
    assert (ti == 2).all()
    x = torch.randn(M, H, dtype=torch.float16)
    y = fused_moe_triton(x.to(dev), w.to(dev), tw.to(dev), ti.to(dev))
    ref_w = w if awq else MoEWeights(w13.double(), w2.double())
    assert_rel_close(y, fused_moe_ref(x.double(), ref_w, tw, ti), TOL[torch.float16])


case("all_on_one_expert_awq", _triton_all_on_one_expert, awq=True)
case("all_on_one_expert_dense", _triton_all_on_one_expert, awq=False)


def _triton_split_k(dev: str, split: int) -> None:
    E, H, I, k, M, g = 4, 128, 64, 2, 3, 32
    w, _ = _awq(E, H, I, g, seed=split)
    x = torch.randn(M, H, dtype=torch.float16)
    tw, ti = _routing(M, E, k, "random", seed=split)
    for direct in _paths(M):
        y = fused_moe_triton(x.to(dev), w.to(dev), tw.to(dev), ti.to(dev), SPLIT_K=split, DIRECT=direct)
        assert_rel_close(y, fused_moe_ref(x.double(), w, tw, ti), TOL[torch.float16])


for _s in (1, 2, 4):
    case(f"split_k{_s}", _triton_split_k, split=_s)


def _triton_gemv_block(dev: str, awq: bool) -> None:
    """BLOCK_M < 16 runs the multiply-reduce (GEMV) branch instead of tl.dot."""
    E, H, I, k, M, g = 4, 64, 32, 2, 3, 32
    w13, w2 = _dense(E, H, I, seed=5)
    w = _awq(E, H, I, g, seed=5)[0] if awq else MoEWeights(w13, w2)
    x = torch.randn(M, H, dtype=torch.float16)
    tw, ti = _routing(M, E, k, "random", seed=5)
    ref_w = w if awq else MoEWeights(w13.double(), w2.double())
    for direct in _paths(M):
        y = fused_moe_triton(x.to(dev), w.to(dev), tw.to(dev), ti.to(dev), BLOCK_M=4, BLOCK_N=32, DIRECT=direct)
        assert_rel_close(y, fused_moe_ref(x.double(), ref_w, tw, ti), TOL[torch.float16])


case("gemv_block_awq", _triton_gemv_block, awq=True)
case("gemv_block_dense", _triton_gemv_block, awq=False)


def _triton_top1_and_top4(dev: str) -> None:
    E, H, I = 6, 64, 32
    w13, w2 = _dense(E, H, I, seed=9)
    x = torch.randn(10, H)
    for k in (1, 4):
        tw, ti = topk_route(torch.randn(10, E), k, renormalize=k > 1)
        for direct in _paths(10):
            y = fused_moe_triton(x.to(dev), MoEWeights(w13, w2).to(dev), tw.to(dev), ti.to(dev), DIRECT=direct)
            ref = fused_moe_ref(x.double(), MoEWeights(w13.double(), w2.double()), tw, ti)
            assert_rel_close(y, ref, TOL[torch.float32])


case("top1_and_top4", _triton_top1_and_top4)


def _silu_mul(dev: str) -> None:
    from hubdeploy.kernels.norm_rope_act import silu_and_mul

    h = torch.randn(5, 2 * 40, dtype=torch.float16)
    y = silu_and_mul(h.to(dev))
    assert_rel_close(y, torch.nn.functional.silu(h[:, :40].double()) * h[:, 40:].double(), TOL[torch.float16])


case("silu_mul", _silu_mul)


interp_results, test_triton_interpreted, test_triton_cuda = triton_case_tests("tests.test_kernels_moe", CASES)


# ---------------------------------------------------------------- compiled path, without a GPU

_AWQ_PTRS = dict(b_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16")


@pytest.mark.parametrize("is_awq,dtype,bm,bn,bk,mul", [
    (True, "fp16", 16, 64, 128, False), (True, "bf16", 4, 32, 128, True), (True, "fp16", 64, 128, 64, True),
    (False, "bf16", 16, 64, 128, False), (False, "fp16", 128, 128, 64, True),
])
def test_moe_kernel_compiles_for_sm90(is_awq: bool, dtype: str, bm: int, bn: int, bk: int, mul: bool) -> None:
    """Same source as the interpreter cases, compiled to a cubin for an H100 without a GPU."""
    import hubdeploy.kernels.fused_moe_triton as moe_mod

    w = _AWQ_PTRS if is_awq else dict(b_ptr=f"*{dtype}", qz_ptr=f"*{dtype}", s_ptr=f"*{dtype}")
    ptrs = dict(a_ptr=f"*{dtype}", c_ptr="*fp32", tw_ptr="*fp32", sorted_ptr="*i32", eids_ptr="*i32",
                ntp_ptr="*i32", **w)
    consts = dict(TOP_K=2, MUL_WEIGHT=mul, IS_AWQ=is_awq, GROUP=128 if is_awq else 1, BLOCK_M=bm,
                  BLOCK_N=bn, BLOCK_K=bk, COMPUTE_F32=False, LOOP_STAGES=3)
    aot_compile(moe_mod.moe_gemm_kernel, ptrs, consts, num_warps=8 if bm == 128 else 4)


@pytest.mark.parametrize("is_awq,dtype,bm,bn,per_slot,stages", [
    (True, "fp16", 1, 64, False, 3), (True, "fp16", 16, 64, True, 3), (True, "bf16", 1, 128, True, 1),
    (False, "bf16", 1, 64, False, 3), (False, "fp16", 16, 64, True, 3),
])
def test_moe_direct_kernel_compiles_for_sm90(is_awq: bool, dtype: str, bm: int, bn: int, per_slot: bool,
                                             stages: int) -> None:
    """The decode (direct) kernel compiles to a cubin; LOOP_STAGES > 1 pipelines its AWQ K loop."""
    import hubdeploy.kernels.fused_moe_triton as moe_mod

    w = _AWQ_PTRS if is_awq else dict(b_ptr=f"*{dtype}", qz_ptr=f"*{dtype}", s_ptr=f"*{dtype}")
    ptrs = dict(a_ptr=f"*{dtype}", c_ptr="*fp32", tw_ptr="*fp32", ids_ptr="*i32", **w)
    consts = dict(TOP_K=2, K_PAD=2, A_PER_SLOT=per_slot, MUL_WEIGHT=per_slot, IS_AWQ=is_awq,
                  GROUP=128 if is_awq else 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, COMPUTE_F32=False,
                  LOOP_STAGES=stages)
    compiled = aot_compile(moe_mod.moe_direct_kernel, ptrs, consts)
    if stages > 1 and is_awq:  # dense experts: strided, masked loads stay synchronous
        assert "cp.async" in compiled.asm["ptx"], "the K loop was not software-pipelined"


def test_silu_mul_kernel_compiles_for_sm90() -> None:
    """Fused MoE's SiLU·up runs kernels/norm_rope_act_triton.py's kernel (BLOCK 256: I = 256 experts)."""
    from hubdeploy.kernels import norm_rope_act_triton as nra

    aot_compile(nra._silu_and_mul_kernel, dict(x_ptr="*bf16", out_ptr="*bf16"), dict(BLOCK=256))


if __name__ == "__main__":
    run_cases_main(CASES)
