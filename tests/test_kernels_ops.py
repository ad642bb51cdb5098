"""RMSNorm, rotary and SiLU·mul: references vs transformers, Triton kernels vs references.

The Triton cases run on the CPU in one child process under Triton's interpreter, on CUDA in
process (`gpu` marker), and compile ahead of time for sm_90: see tests/fixtures/triton_interp.py.
"""
from __future__ import annotations

import pytest
import torch

from hubdeploy.kernels import norm_rope_act_triton as nra
from hubdeploy.kernels.norm_rope_act import (
    apply_rotary,
    apply_rotary_ref,
    rms_norm,
    rms_norm_ref,
    rotary_cos_sin,
    silu_and_mul,
    silu_and_mul_ref,
)
from hubdeploy.kernels.norm_rope_act_triton import apply_rotary_triton, rms_norm_triton, silu_and_mul_triton
from tests.fixtures.triton_interp import Cases, aot_compile, run_cases_main, triton_case_tests

CASES = Cases()
case = CASES.register


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- references vs transformers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_ref_matches_llama_rmsnorm(dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 48, generator=g).to(dtype)
    res = torch.randn(7, 48, generator=g).to(dtype)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g).to(dtype))
        expect = norm(x)
        # the decoder layer adds the residual in the model dtype, then norms that sum
        summed = res + x
        expect_res_out = norm(summed)
    assert torch.equal(rms_norm_ref(x, norm.weight.detach(), 1e-5), expect)
    out, new_res = rms_norm_ref(x, norm.weight.detach(), 1e-5, residual=res)
    assert torch.equal(new_res, summed)
    assert torch.equal(out, expect_res_out)


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
def test_rotary_matches_transformers(name: str) -> None:
    """cos/sin table and the neox rotation vs LlamaRotaryEmbedding + apply_rotary_pos_emb (fp32)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, theta, max_pos = 32, 5000.0, 256
    scaling = ROPE_CASES[name]
    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_pos, rope_parameters=params)
    emb = LlamaRotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(1)
    n = 11
    positions = torch.randint(0, max_pos, (n,), generator=g)
    q = torch.randn(n, 4, head_dim, generator=g)
    k = torch.randn(n, 2, head_dim, generator=g)
    cos, sin = emb(q, positions[None])  # [1, n, D]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    table = rotary_cos_sin(head_dim, max_pos, theta, scaling)
    half = head_dim // 2
    _close(table[positions, :half], cos[0, :, :half], 2e-6, 1e-5, f"{name} cos")
    _close(table[positions, half:], sin[0, :, :half], 2e-6, 1e-5, f"{name} sin")
    q_ours, k_ours = apply_rotary(q, k, positions, table)
    _close(q_ours, q_hf[0].transpose(0, 1), 1e-5, 1e-5, f"{name} q")
    _close(k_ours, k_hf[0].transpose(0, 1), 1e-5, 1e-5, f"{name} k")


def test_rotary_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="not supported"):
        rotary_cos_sin(16, 8, 1e4, {"rope_type": "su"})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rotary_cos_sin(16, 8, 1e4, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0})


def test_silu_and_mul_ref_is_gated_silu() -> None:
    x = torch.randn(5, 12, dtype=torch.float64)
    expect = torch.nn.functional.silu(x[:, :6]) * x[:, 6:]
    torch.testing.assert_close(silu_and_mul_ref(x), expect, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- Triton vs reference


@case
def case_rms_norm(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    for h in (48, 130):  # 130: masked tail of a 256-wide block
        x = torch.randn(6, h, generator=g).to(device)
        w = torch.randn(h, generator=g).to(device)
        r = torch.randn(6, h, generator=g).to(device)
        _close(rms_norm_triton(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), 1e-5, 1e-5, "rms_norm")
        out, new_r = rms_norm(x, w, 1e-6, residual=r)  # dispatcher -> Triton (forced / CUDA)
        eout, enew = rms_norm_ref(x, w, 1e-6, residual=r)
        _close(out, eout, 1e-5, 1e-5, "rms_norm+residual out")
        _close(new_r, enew, 0, 0, "rms_norm+residual residual")
    # strided input rows (a slice of a wider buffer)
    xs = torch.randn(4, 100, generator=g).to(device)[:, 10:58]
    w = torch.randn(48, generator=g).to(device)
    _close(rms_norm_triton(xs, w, 1e-6), rms_norm_ref(xs, w, 1e-6), 1e-5, 1e-5, "rms_norm strided")
    # Qwen3-style per-head norm over head_dim on a strided [N, H, D] view of a qkv output
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=g).to(device)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    w16 = torch.randn(16, generator=g).to(device)
    got = rms_norm_triton(q, w16, 1e-6)
    assert got.shape == (5, 4, 16)
    _close(got, rms_norm_ref(q, w16, 1e-6), 1e-5, 1e-5, "rms_norm per head")


@case
def case_rms_norm_fp16(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=g).half().to(device)
    r = torch.randn(5, 64, generator=g).half().to(device)
    w = torch.randn(64, generator=g).half().to(device)
    out, new_r = rms_norm_triton(x, w, 1e-5, r)
    eout, enew = rms_norm_ref(x, w, 1e-5, r)
    _close(new_r, enew, 0, 0, "fp16 residual")
    _close(out, eout, 2e-3, 2e-3, "fp16 out")  # one fp16 rounding apart at most


@case
def case_bf16(device: str) -> None:
    # Triton 3.9's interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest):
    # a stored bf16 may be 1 ulp (2^-7 relative) off the reference on the CPU.
    g = torch.Generator().manual_seed(6)
    bf = torch.bfloat16
    x, r = torch.randn(5, 64, generator=g).to(bf).to(device), torch.randn(5, 64, generator=g).to(bf).to(device)
    w = torch.randn(64, generator=g).to(bf).to(device)
    out, new_r = rms_norm_triton(x, w, 1e-6, r)
    eout, enew = rms_norm_ref(x, w, 1e-6, r)
    _close(new_r.float(), enew.float(), 1e-6, 2**-7, "bf16 residual")
    _close(out.float(), eout.float(), 3e-2, 3e-2, "bf16 rms_norm")
    table = rotary_cos_sin(32, 64, 1e4)
    q, k = torch.randn(5, 4, 32, generator=g).to(bf), torch.randn(5, 2, 32, generator=g).to(bf)
    pos = torch.randint(0, 64, (5,), generator=g)
    qt, kt = apply_rotary_triton(q.to(device), k.to(device), pos.to(device), table.to(device))
    qr, kr = apply_rotary_ref(q, k, pos, table)
    _close(qt.float().cpu(), qr.float(), 1e-6, 2**-7, "bf16 rotary q")
    _close(kt.float().cpu(), kr.float(), 1e-6, 2**-7, "bf16 rotary k")
    xs = torch.randn(3, 40, generator=g).to(bf).to(device)
    _close(silu_and_mul_triton(xs).float(), silu_and_mul_ref(xs).float(), 1e-6, 2**-7, "bf16 silu_and_mul")


@case
def case_rotary(device: str) -> None:
    g = torch.Generator().manual_seed(4)
    table = rotary_cos_sin(32, 64, 1e4, {"rope_type": "yarn", "factor": 2.0,
                                         "original_max_position_embeddings": 32}).to(device)
    qkv = torch.randn(9, (6 + 2 + 2) * 32, generator=g).to(device)
    q = qkv[:, : 6 * 32].view(9, 6, 32)  # strided views of a fused qkv output
    k = qkv[:, 6 * 32: 8 * 32].view(9, 2, 32)
    pos = torch.randint(0, 64, (9,), generator=g).to(device)
    qt, kt = apply_rotary_triton(q, k, pos, table)
    qr, kr = apply_rotary_ref(q, k, pos, table)
    _close(qt, qr, 1e-5, 1e-5, "rotary q")
    _close(kt, kr, 1e-5, 1e-5, "rotary k")
    qd, _ = apply_rotary(q, k, pos, table)
    _close(qd, qr, 1e-5, 1e-5, "rotary dispatch")
    # 17 heads: more than one head block of 16
    q2 = torch.randn(3, 17, 32, generator=g).to(device)
    q2t, _ = apply_rotary_triton(q2, k[:3], pos[:3], table)
    q2r, _ = apply_rotary_ref(q2, k[:3], pos[:3], table)
    _close(q2t, q2r, 1e-5, 1e-5, "rotary 17 heads")


@case
def case_silu_and_mul(device: str) -> None:
    g = torch.Generator().manual_seed(5)
    for i in (7, 40):
        x = torch.randn(5, 2 * i, generator=g).to(device)
        _close(silu_and_mul_triton(x), silu_and_mul_ref(x), 1e-6, 1e-5, f"silu_and_mul I={i}")
        _close(silu_and_mul(x), silu_and_mul_ref(x), 1e-6, 1e-5, "silu_and_mul dispatch")
    x3 = torch.randn(2, 3, 20, generator=g).to(device)  # leading dims flattened to rows
    _close(silu_and_mul_triton(x3), silu_and_mul_ref(x3), 1e-6, 1e-5, "silu_and_mul 3-D")


interp_results, test_triton_interpreted, test_triton_cuda = triton_case_tests("tests.test_kernels_ops", CASES)


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_kernels_compile_for_sm90(dt: str) -> None:
    p = f"*{dt}"
    aot_compile(nra._rms_norm_kernel, dict(x_ptr=p, res_ptr=p, w_ptr=p, out_ptr=p, res_out_ptr=p),
                dict(HAS_RES=True, BLOCK=8192), floats=("eps",), num_warps=8)
    aot_compile(nra._rotary_kernel, dict(x_ptr=p, out_ptr=p, pos_ptr="*i64", cs_ptr="*fp32"),
                dict(HALF=64, BLOCK_H=16, BLOCK_D=64))
    aot_compile(nra._silu_and_mul_kernel, dict(x_ptr=p, out_ptr=p), dict(BLOCK=1024))


def test_forced_triton_without_interpreter_is_a_clear_error() -> None:
    # In this (parent) process triton is not interpreting: the error says what to set.
    import triton

    if triton.knobs.runtime.interpret:
        pytest.skip("this process already runs Triton's interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(8), 1e-6)


if __name__ == "__main__":
    run_cases_main(CASES)
