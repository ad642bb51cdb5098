"""W4A16 AWQ linear: repack round trip, torch reference, Triton kernel vs a float64 reference.

The Triton cases (`CASES`) run on the CPU in one child process under Triton's interpreter,
on CUDA in process (`gpu` marker), and compile to sm_90 cubins without a GPU (`aot_compile`):
see tests/fixtures/triton_interp.py.

Tolerance: max |y − y_ref| ≤ tol · max |y_ref|, with y_ref in float64 from the exact
dequantized weight and x rounded to its test dtype; tol = 1e-5 fp32, 4e-3 fp16, 2e-2 bf16
(output rounding plus fp16/bf16 tensor-core inputs).
"""
from __future__ import annotations

import pytest
import torch

from hubdeploy.kernels.awq import (
    AWQPacked,
    awq_config,
    awq_linear,
    awq_linear_ref,
    awq_repack,
    pack_int4_natural,
    unpack_int4_natural,
)
from hubdeploy.kernels.awq_triton import awq_linear_triton
from hubdeploy.kernels.awq_format import awq_dequantize, awq_quantize, awq_unpack
from tests.fixtures.triton_interp import (
    Cases,
    aot_compile,
    assert_rel_close,
    run_cases_main,
    triton_case_tests,
)

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
CASES = Cases()
case = CASES.add


def _layer(out_f: int, in_f: int, g: int, seed: int = 0, device: str | torch.device = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    qw, qz, s = awq_quantize(w, g)
    return (qw, qz, s), awq_repack(qw.to(device), qz.to(device), s.to(device), g)


def _exact_w(packed: AWQPacked) -> torch.Tensor:
    """float64 [out, in] straight from the unpacked nibbles (independent of dequantize())."""
    q = unpack_int4_natural(packed.qweight.cpu()).double()
    z = unpack_int4_natural(packed.qzeros.cpu()).double().repeat_interleave(packed.group_size, 0).t()
    s = packed.scales.cpu().double().repeat_interleave(packed.group_size, 0).t()
    return (q - z) * s


# ---------------------------------------------------------------- layout


def test_natural_pack_roundtrip_incl_sign_bit() -> None:
    vals = torch.tensor([[15, 0, 1, 2, 3, 4, 5, 15, 7, 8, 9, 10, 11, 12, 13, 14]], dtype=torch.uint8)
    packed = pack_int4_natural(vals)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert int(packed[0, 0]) < 0  # nibble 7 = 15 sets the sign bit
    assert (int(packed[0, 0]) & 0xFFFFFFFF) == 0xF543210F
    assert torch.equal(unpack_int4_natural(packed), vals)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_repack_roundtrip_equals_awq_dequantize(g: int) -> None:
    (qw, qz, s), p = _layer(48, 256, g)
    assert p.qweight.shape == (48, 32) and p.qzeros.shape == (256 // g, 6) and p.scales.shape == (256 // g, 48)
    iw, iz = awq_unpack(qw, qz)
    assert torch.equal(unpack_int4_natural(p.qweight).t(), iw)
    assert torch.equal(unpack_int4_natural(p.qzeros), iz)
    assert torch.equal(p.dequantize().t(), awq_dequantize(qw, qz, s, g))  # exact, fp16
    assert torch.equal(p.dequantize(torch.float64), _exact_w(p))


def test_repack_rejects_bad_shapes_with_a_clear_message() -> None:
    (qw, qz, s), _ = _layer(16, 128, 32)
    with pytest.raises(ValueError, match="group_size"):
        awq_repack(qw, qz, s, 48)
    with pytest.raises(ValueError, match="shapes disagree"):
        awq_repack(qw, qz, s, 64)
    with pytest.raises(ValueError, match="int32"):
        awq_repack(qw.to(torch.int64), qz, s, 32)


# ---------------------------------------------------------------- reference (CPU engine path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_float64_with_bias_and_3d_input(dtype: torch.dtype) -> None:
    _, p = _layer(40, 128, 64, seed=1)
    x = torch.randn(2, 3, 128).to(dtype)
    bias = torch.randn(40)
    y = awq_linear_ref(x, p, bias)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    ref = x.double() @ _exact_w(p).t() + bias.to(dtype).double()
    assert_rel_close(y, ref, TOL[dtype])


def test_ref_caches_dense_weight_on_cpu_only_once() -> None:
    _, p = _layer(16, 64, 32)
    x = torch.randn(1, 64)
    awq_linear_ref(x, p)
    w1 = p._dequant_cache[torch.float32]
    awq_linear_ref(x, p)
    assert p._dequant_cache[torch.float32] is w1
    assert p.to("cpu")._dequant_cache == {}


def test_wrong_input_width_is_an_error() -> None:
    _, p = _layer(16, 64, 32)
    with pytest.raises(ValueError, match="features"):
        awq_linear_ref(torch.randn(1, 32), p)


def test_dispatcher_uses_reference_on_cpu_without_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBDEPLOY_FORCE_TRITON", raising=False)
    _, p = _layer(16, 64, 32)
    x = torch.randn(3, 64)
    assert torch.equal(awq_linear(x, p), awq_linear_ref(x, p))


# ---------------------------------------------------------------- Triton vs float64 (cases)


def _triton_matches_reference(dev: str, M: int, dtype: torch.dtype, g: int) -> None:
    _, p = _layer(72, 256, g, seed=M, device=dev)  # N = 72: not a multiple of BLOCK_N
    x = torch.randn(M, 256).to(dtype)
    y = awq_linear_triton(x.to(dev), p)
    assert y.shape == (M, 72) and y.dtype == dtype
    assert_rel_close(y, x.double() @ _exact_w(p).t(), TOL[dtype])


for _g in (32, 64, 128):
    for _dt in (torch.float32, torch.float16, torch.bfloat16):
        for _m in (1, 3, 33):  # GEMV (M=1, M=3 padded to 4) and tiled tl.dot
            case(f"linear_M{_m}_{str(_dt)[6:]}_g{_g}", _triton_matches_reference, M=_m, dtype=_dt, g=_g)
case("linear_M7_float16_g64", _triton_matches_reference, M=7, dtype=torch.float16, g=64)


def _split_k_and_bias(dev: str, split: int, bm: int) -> None:
    _, p = _layer(40, 256, 32, seed=3, device=dev)
    x = torch.randn(2, 256, dtype=torch.float16)
    bias = torch.randn(40, dtype=torch.float16)
    y = awq_linear_triton(x.to(dev), p, bias.to(dev), SPLIT_K=split, BLOCK_M=bm)
    assert_rel_close(y, x.double() @ _exact_w(p).t() + bias.double(), TOL[torch.float16])


for _s in (1, 3, 8):
    for _bm in (2, 16):
        case(f"split_k{_s}_bm{_bm}", _split_k_and_bias, split=_s, bm=_bm)


def _prefill_tiles(dev: str) -> None:
    """Several M tiles and K tiles inside one group (BLOCK_K < group)."""
    _, p = _layer(64, 256, 128, seed=4, device=dev)
    x = torch.randn(70, 256, dtype=torch.float16)
    y = awq_linear_triton(x.to(dev), p, BLOCK_M=32, BLOCK_K=32, SPLIT_K=1)
    assert_rel_close(y, x.double() @ _exact_w(p).t(), TOL[torch.float16])


case("prefill_tiles", _prefill_tiles)


def _dispatcher_forced(dev: str) -> None:
    _, p = _layer(32, 64, 32, device=dev)
    x = torch.randn(2, 64).to(dev)
    assert torch.equal(awq_linear(x, p), awq_linear_triton(x, p))


case("dispatcher_forced", _dispatcher_forced)


interp_results, test_triton_interpreted, test_triton_cuda = triton_case_tests("tests.test_kernels_awq", CASES)


def test_forced_triton_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """This (parent) process runs Triton compiled; forcing it onto CPU tensors must say why it fails."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HUBDEPLOY_FORCE_TRITON", "1")
    import triton

    if triton.knobs.runtime.interpret:
        pytest.skip("triton was imported with its interpreter in this process")
    _, p = _layer(16, 64, 32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        awq_linear(torch.randn(1, 64), p)


def test_config_picks_decode_and_prefill_paths() -> None:
    cuda = torch.device("cuda")
    cpu = torch.device("cpu")
    assert [awq_config(m, 4096, 4096, 128, cpu)["BLOCK_M"] for m in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 16, 16, 16]
    # cuda configs are computed without touching a GPU except for the SM count
    if torch.cuda.is_available():
        d = awq_config(1, 4096, 4096, 128, cuda)
        pre = awq_config(2048, 4096, 4096, 128, cuda)
        assert d["BLOCK_M"] == 1 and d["SPLIT_K"] > 1
        assert pre["BLOCK_M"] == 128 and pre["SPLIT_K"] == 1


# ---------------------------------------------------------------- compiled path, without a GPU


@pytest.mark.parametrize("dtype,bm,bn,bk,f32,stages", [
    ("fp16", 1, 64, 128, False, 3), ("fp16", 1, 64, 128, False, 1), ("bf16", 4, 32, 128, False, 3),
    ("fp16", 16, 64, 128, False, 3), ("bf16", 128, 128, 64, False, 1), ("fp32", 16, 64, 32, True, 1),
])
def test_awq_kernel_compiles_for_sm90(dtype: str, bm: int, bn: int, bk: int, f32: bool, stages: int) -> None:
    """The CPU cases run the interpreter; the same source must also compile to a cubin
    (GEMV, skinny tl.dot, prefill tiles). A pipelined K loop (LOOP_STAGES > 1) must come out
    as asynchronous copies into shared memory, also for the dot-free GEMV."""
    import hubdeploy.kernels.awq_triton as awq_mod

    ptrs = dict(a_ptr=f"*{dtype}", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", c_ptr="*fp32")
    consts = dict(GROUP=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, COMPUTE_F32=f32, LOOP_STAGES=stages)
    compiled = aot_compile(awq_mod.awq_gemm_kernel, ptrs, consts, num_warps=8 if bm == 128 else 4)
    if stages > 1:
        assert "cp.async" in compiled.asm["ptx"], "the K loop was not software-pipelined"


if __name__ == "__main__":
    run_cases_main(CASES)
