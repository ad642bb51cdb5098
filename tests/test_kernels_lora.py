"""Multi-LoRA shrink/expand: references vs PEFT and per-adapter float64 math, Triton vs references.

Triton runs under its CPU interpreter in a child process, as explained at the top of
tests/fixtures/triton_interp.py; with a GPU also in process on CUDA;
and every kernel is compiled ahead of time for sm_90 (`aot_compile`, no GPU needed).
Tolerances: fp32 atol/rtol 1e-4 (sums over up to 96 products); fp16/bf16 outputs 2e-2.
"""
from __future__ import annotations

import pytest
import torch

from hubdeploy.kernels import lora_triton as lora_mod
from hubdeploy.kernels.lora import (
    lora_expand,
    lora_expand_ref,
    lora_segments,
    lora_shrink,
    lora_shrink_ref,
    moe_lora_expand,
    moe_lora_ref,
    moe_lora_shrink,
    moe_lora_shrink_ref,
)
from hubdeploy.kernels.lora_triton import (
    lora_expand_triton,
    lora_shrink_triton,
    moe_lora_expand_triton,
    moe_lora_shrink_triton,
)
from tests.fixtures.triton_interp import Cases, aot_compile, run_cases_main, triton_case_tests

CASES = Cases()
case = CASES.register


def make_slots(ranks: list[int], d_in: int, d_out: int, seed: int, dtype: torch.dtype = torch.float32):
    """Adapters of different ranks zero-padded into slots; also returns the unpadded (A, B)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    lora_a = torch.zeros(len(ranks), r_max, d_in, dtype=dtype)
    lora_b = torch.zeros(len(ranks), d_out, r_max, dtype=dtype)
    raw = []
    for s, r in enumerate(ranks):
        a = torch.randn(r, d_in, generator=g).to(dtype)
        b = torch.randn(d_out, r, generator=g).to(dtype)
        lora_a[s, :r], lora_b[s, :, :r] = a, b
        raw.append((a, b))
    scalings = torch.tensor([2.0 / r for r in ranks], dtype=torch.float32)
    return lora_a, lora_b, scalings, raw


# ----------------------------------------------------------------------------- references


def test_reference_matches_per_adapter_math_with_padding() -> None:
    ranks = [2, 8, 5]
    lora_a, lora_b, scalings, raw = make_slots(ranks, 24, 20, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 24, generator=g, dtype=torch.float64)
    slots = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2], dtype=torch.int32)
    out = torch.randn(9, 30, generator=g, dtype=torch.float64)
    base = out.clone()
    t = lora_shrink_ref(x, lora_a, slots)
    lora_expand_ref(out, t, lora_b, slots, scalings, out_offset=7)
    for n, s in enumerate(slots.tolist()):
        expect = base[n].clone()
        if s >= 0:
            a, b = raw[s]
            expect[7:27] += float(scalings[s]) * (b @ (a @ x[n]))
            assert torch.all(t[n, ranks[s]:] == 0)
        else:
            assert torch.all(t[n] == 0)
        torch.testing.assert_close(out[n], expect, atol=1e-10, rtol=1e-10)


def test_reference_matches_peft_linear() -> None:
    """Base linear + lora_shrink/expand == PEFT's LoRA Linear (r=4, alpha=8, and rsLoRA)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    for use_rslora in (False, True):
        base = torch.nn.Sequential(torch.nn.Linear(16, 12, bias=False))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False,
                                                use_rslora=use_rslora))
        layer = model.base_model.model[0]
        a = layer.lora_A["default"].weight.detach()  # [r, in]
        b = layer.lora_B["default"].weight.detach()  # [out, r]
        scaling = float(layer.scaling["default"])
        assert scaling == pytest.approx(8 / 2 if use_rslora else 8 / 4)
        x = torch.randn(5, 16)
        with torch.no_grad():
            expect = model(x)
            out = x @ layer.base_layer.weight.T
        lora_a = torch.zeros(2, 6, 16)  # slot 1 holds it, rank padded 4 -> 6
        lora_b = torch.zeros(2, 12, 6)
        lora_a[1, :4], lora_b[1, :, :4] = a, b
        slots = torch.ones(5, dtype=torch.int32)
        t = lora_shrink(x, lora_a, slots)
        lora_expand(out, t, lora_b, slots, torch.tensor([0.0, scaling]))
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_moe_reference_matches_per_row_math() -> None:
    g = torch.Generator().manual_seed(2)
    s, e, r, d_in, d_out, t_rows = 2, 3, 4, 10, 6, 7
    lora_a = torch.randn(s, e, r, d_in, generator=g, dtype=torch.float64)
    lora_b = torch.randn(s, e, d_out, r, generator=g, dtype=torch.float64)
    sc = torch.tensor([0.5, 2.0])
    x = torch.randn(t_rows, d_in, generator=g, dtype=torch.float64)
    experts = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    slots = torch.tensor([1, 0, -1, 1, 0, 0, -1], dtype=torch.int32)
    out = moe_lora_ref(x, experts, slots, lora_a, lora_b, sc)
    for i in range(t_rows):
        si, ei = int(slots[i]), int(experts[i])
        expect = torch.zeros(d_out, dtype=torch.float64) if si < 0 else \
            float(sc[si]) * (lora_b[si, ei] @ (lora_a[si, ei] @ x[i]))
        torch.testing.assert_close(out[i], expect, atol=1e-10, rtol=1e-10)


def test_segments_group_consecutive_slots() -> None:
    starts, lens, slots = lora_segments(torch.tensor([3, 3, -1, -1, -1, 0, 3], dtype=torch.int32))
    assert starts.tolist() == [0, 2, 5, 6] and lens.tolist() == [2, 3, 1, 1] and slots.tolist() == [3, -1, 0, 3]


def test_expand_rejects_columns_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        lora_expand_ref(torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(1, 6, 4), torch.zeros(2, dtype=torch.int32),
                        torch.ones(1), out_offset=4)


# ----------------------------------------------------------------------------- Triton vs reference


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@case
def case_bgmv_decode_mixed_slots(device: str) -> None:
    lora_a, lora_b, sc, _ = make_slots([4, 16, 8], 96, 40, seed=3)
    lora_a, lora_b, sc = lora_a.to(device), lora_b.to(device), sc.to(device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 96, generator=g).to(device)
    slots = torch.tensor([2, -1, 0, 1, 1, -1], dtype=torch.int32, device=device)
    t = lora_shrink(x, lora_a, slots)  # dispatcher -> Triton
    _close(t, lora_shrink_ref(x, lora_a, slots), "bgmv shrink")
    base = torch.randn(6, 40, generator=g).to(device)
    got, expect = base.clone(), base.clone()
    lora_expand(got, t, lora_b, slots, sc)
    lora_expand_ref(expect, t, lora_b, slots, sc)
    _close(got, expect, "bgmv expand")
    assert torch.equal(got[1], base[1]) and torch.equal(got[5], base[5])  # -1 rows untouched


@case
def case_sgmv_prefill_segments(device: str) -> None:
    lora_a, lora_b, sc, _ = make_slots([8, 3], 48, 36, seed=5)
    lora_a, lora_b, sc = lora_a.to(device), lora_b.to(device), sc.to(device)
    g = torch.Generator().manual_seed(6)
    slots = torch.tensor([1] * 20 + [-1] * 9 + [0] * 35 + [1] * 3, dtype=torch.int32, device=device)
    x = torch.randn(slots.shape[0], 48, generator=g).to(device)
    seg = lora_segments(slots)
    t = lora_shrink_triton(x, lora_a, slots, seg)
    _close(t, lora_shrink_ref(x, lora_a, slots), "sgmv shrink")
    base = torch.randn(slots.shape[0], 36, generator=g).to(device)
    got, expect = base.clone(), base.clone()
    lora_expand_triton(got, t, lora_b, slots, sc, segments=seg)
    lora_expand_ref(expect, t, lora_b, slots, sc)
    _close(got, expect, "sgmv expand")
    assert torch.equal(got[20:29], base[20:29])


@case
def case_expand_into_fused_qkv_columns(device: str) -> None:
    # one shrink per projection, expands into q | k | v column slices of one output
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 32, generator=g).to(device)
    slots = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32, device=device)
    base = torch.randn(5, 32 + 16 + 16, generator=g).to(device)
    got, expect = base.clone(), base.clone()
    for off, width, seed in [(0, 32, 8), (32, 16, 9), (48, 16, 10)]:
        la, lb, sc, _ = make_slots([4, 6], 32, width, seed=seed)
        la, lb, sc = la.to(device), lb.to(device), sc.to(device)
        t = lora_shrink_triton(x, la, slots)
        lora_expand_triton(got, t, lb, slots, sc, out_offset=off)
        lora_expand_ref(expect, lora_shrink_ref(x, la, slots), lb, slots, sc, out_offset=off)
    _close(got, expect, "qkv slices")


def _shrink_expand_both_paths(x, base, lora_a, lora_b, slots, sc, what: str, shrink_tol: float,
                              expand_atol: float, expand_rtol: float) -> None:
    """Half-precision Triton shrink/expand vs the references, per token (bgmv) and per segment (sgmv)."""
    for seg in (None, lora_segments(slots)):
        t = lora_shrink_triton(x, lora_a, slots, seg)
        _close(t, lora_shrink_ref(x, lora_a, slots), f"{what} shrink", tol=shrink_tol)
        got, expect = base.clone(), base.clone()
        lora_expand_triton(got, t, lora_b, slots, sc, segments=seg)
        lora_expand_ref(expect, t, lora_b, slots, sc)
        torch.testing.assert_close(got.float(), expect.float(), atol=expand_atol, rtol=expand_rtol,
                                   msg=lambda m: f"{what} expand: {m}")


@case
def case_fp16_output(device: str) -> None:
    lora_a, lora_b, sc, _ = make_slots([8, 8], 64, 48, seed=11, dtype=torch.float16)
    lora_a, lora_b, sc = lora_a.to(device), lora_b.to(device), sc.to(device)
    g = torch.Generator().manual_seed(12)
    slots = torch.tensor([0] * 18 + [1] * 14, dtype=torch.int32, device=device)
    x = (torch.randn(32, 64, generator=g) * 0.1).half().to(device)
    base = torch.randn(32, 48, generator=g).half().to(device)
    _shrink_expand_both_paths(x, base, lora_a, lora_b, slots, sc, "fp16", shrink_tol=2e-3, expand_atol=2e-2,
                              expand_rtol=2e-2)


@case
def case_bf16(device: str) -> None:
    # interpreter: fp32 -> bf16 stores truncate, so out may be 1 bf16 ulp (2^-7 relative) off
    lora_a, lora_b, sc, _ = make_slots([8, 4], 64, 48, seed=14, dtype=torch.bfloat16)
    lora_a, lora_b, sc = lora_a.to(device), lora_b.to(device), sc.to(device)
    g = torch.Generator().manual_seed(15)
    slots = torch.tensor([0] * 20 + [-1] * 4 + [1] * 12, dtype=torch.int32, device=device)
    x = (torch.randn(36, 64, generator=g) * 0.1).to(torch.bfloat16).to(device)
    base = torch.randn(36, 48, generator=g).to(torch.bfloat16).to(device)
    _shrink_expand_both_paths(x, base, lora_a, lora_b, slots, sc, "bf16", shrink_tol=1e-3, expand_atol=2e-2,
                              expand_rtol=2**-6)


@case
def case_moe_rows(device: str) -> None:
    g = torch.Generator().manual_seed(13)
    s, e, r, d_in, d_out, top_k = 3, 4, 8, 40, 24, 2
    lora_a = torch.randn(s, e, r, d_in, generator=g).to(device)
    lora_b = torch.randn(s, e, d_out, r, generator=g).to(device)
    sc = torch.tensor([1.0, 0.5, 0.25], device=device)
    token_slots = torch.tensor([2, -1, 0, 1, 2], dtype=torch.int32, device=device)
    topk_ids = torch.randint(0, e, (5, top_k), generator=g).to(device)
    x = torch.randn(5, d_in, generator=g).to(device)
    x_rows = x.repeat_interleave(top_k, dim=0)
    experts = topk_ids.flatten()
    slots = token_slots.repeat_interleave(top_k)
    t = moe_lora_shrink(x_rows, experts, slots, lora_a)
    _close(t, moe_lora_shrink_ref(x_rows, experts, slots, lora_a), "moe shrink")
    out = torch.zeros(10, d_out, device=device)
    moe_lora_expand(out, t, experts, slots, lora_b, sc)
    _close(out, moe_lora_ref(x_rows, experts, slots, lora_a, lora_b, sc), "moe expand")
    # the explicit Triton entry points agree with the dispatchers
    t2 = moe_lora_shrink_triton(x_rows, experts, slots, lora_a)
    out2 = moe_lora_expand_triton(torch.zeros(10, d_out, device=device), t2, experts, slots, lora_b, sc)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_kernels_compile_for_sm90(dt: str) -> None:
    p = f"*{dt}"
    seg = dict(seg_start_ptr="*i32", seg_len_ptr="*i32", seg_slot_ptr="*i32")
    for has_e in (False, True):
        aot_compile(lora_mod._bgmv_shrink_kernel, dict(x_ptr=p, a_ptr=p, slot_ptr="*i32", e_ptr="*i32", t_ptr="*fp32"),
                    dict(HAS_E=has_e, BLOCK_R=16, BLOCK_K=256))
        aot_compile(lora_mod._bgmv_expand_kernel,
                    dict(out_ptr=p, t_ptr="*fp32", b_ptr=p, slot_ptr="*i32", e_ptr="*i32", sc_ptr="*fp32"),
                    dict(HAS_E=has_e, BLOCK_O=128, BLOCK_R=16))
    aot_compile(lora_mod._sgmv_shrink_kernel, dict(seg, x_ptr=p, a_ptr=p, t_ptr="*fp32"),
                dict(BLOCK_M=32, BLOCK_R=16, BLOCK_K=64, F32=False, PREC="tf32"))
    aot_compile(lora_mod._sgmv_expand_kernel, dict(seg, out_ptr=p, t_ptr="*fp32", b_ptr=p, sc_ptr="*fp32"),
                dict(BLOCK_M=32, BLOCK_O=64, BLOCK_R=16, F32=False, PREC="tf32"))


interp_results, test_triton_interpreted, test_triton_cuda = triton_case_tests("tests.test_kernels_lora", CASES)


if __name__ == "__main__":
    run_cases_main(CASES)
