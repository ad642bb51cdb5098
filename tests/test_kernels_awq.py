"""W4A16 AWQ linear: repack round trip, torch reference, Triton kernel vs a float64 reference.

How the Triton kernels run without a GPU: the `device` fixture sets `TRITON_INTERPRET=1` and
`HUBDEPLOY_FORCE_TRITON=1` with monkeypatch for the test only. That is enough because
triton 3.9 reads TRITON_INTERPRET when `triton.jit` decorates a function, and kernels/awq.py
builds its kernels lazily on first launch, cached per interpreter mode; other test modules
in the same pytest process keep the plain environment. The "cuda" variants (marker `gpu`)
run the same checks compiled on a GPU.

Tolerance: max |y − y_ref| ≤ tol · max |y_ref|, with y_ref in float64 from the exact
dequantized weight and x rounded to its test dtype; tol = 1e-5 fp32, 4e-3 fp16, 2e-2 bf16
(output rounding plus fp16/bf16 tensor-core inputs).
"""
from __future__ import annotations

import pytest
import torch

from kernels.awq import (
    AWQPacked,
    awq_config,
    awq_linear,
    awq_linear_ref,
    awq_linear_triton,
    awq_repack,
    pack_int4_natural,
    unpack_int4_natural,
)
from kernels.awq_format import awq_dequantize, awq_quantize, awq_unpack

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# skipif as well as the marker: gpu_check.sh runs pytest with --noconftest
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """'cpu' = Triton interpreter (env set for this test only); 'cuda' = compiled."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("HUBDEPLOY_FORCE_TRITON", "1")
    return torch.device(request.param)


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


def _assert_close(y: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (y.double().cpu() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max err {err:.3g} > {tol} * {scale:.3g}"


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
    _assert_close(y, ref, TOL[dtype])


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


# ---------------------------------------------------------------- Triton vs float64


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 7, 33])
def test_triton_matches_reference(device: torch.device, M: int, dtype: torch.dtype, g: int) -> None:
    _, p = _layer(72, 256, g, seed=M, device=device)  # N = 72: not a multiple of BLOCK_N
    x = torch.randn(M, 256).to(dtype)
    y = awq_linear_triton(x.to(device), p)
    assert y.shape == (M, 72) and y.dtype == dtype
    _assert_close(y, x.double() @ _exact_w(p).t(), TOL[dtype])


@pytest.mark.parametrize("split", [1, 3, 8])
def test_triton_split_k_and_bias(device: torch.device, split: int) -> None:
    _, p = _layer(40, 256, 32, seed=3, device=device)
    x = torch.randn(2, 256, dtype=torch.float16)
    bias = torch.randn(40, dtype=torch.float16)
    y = awq_linear_triton(x.to(device), p, bias.to(device), SPLIT_K=split)
    _assert_close(y, x.double() @ _exact_w(p).t() + bias.double(), TOL[torch.float16])


def test_triton_prefill_tiles(device: torch.device) -> None:
    """Several M tiles and K tiles inside one group (BLOCK_K < group)."""
    _, p = _layer(64, 256, 128, seed=4, device=device)
    x = torch.randn(70, 256, dtype=torch.float16)
    y = awq_linear_triton(x.to(device), p, BLOCK_M=32, BLOCK_K=32, SPLIT_K=1)
    _assert_close(y, x.double() @ _exact_w(p).t(), TOL[torch.float16])


def test_dispatcher_forced_triton_equals_triton(device: torch.device) -> None:
    _, p = _layer(32, 64, 32, device=device)
    x = torch.randn(2, 64).to(device)
    assert torch.equal(awq_linear(x, p), awq_linear_triton(x, p))


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

_SM90_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
spec = json.loads(sys.argv[1])
mod = importlib.import_module(spec["module"])
kernel = mod._kernels()
if spec["index"] is not None:
    kernel = kernel[spec["index"]]
for ptrs, consts, nw, ns in spec["configs"]:
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in kernel.arg_names}
    k = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=nw, num_stages=ns))
    assert k.asm.get("cubin"), "no cubin"
print("compiled", len(spec["configs"]))
"""


def compile_for_sm90(module: str, index: int | None, configs: list) -> None:
    """Compile kernels ahead of time for an H100 (sm_90, through triton's ptxas); no GPU needed.

    Runs in a fresh interpreter: after Triton's interpreter has run in this process, its
    patched `triton.language` no longer compiles.
    """
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HUBDEPLOY_FORCE_TRITON")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    spec = json.dumps(dict(module=module, index=index, configs=configs))
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT, spec], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton has no ptxas here")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_awq_kernel_compiles_for_sm90() -> None:
    """The CPU tests run the interpreter; this proves the same source compiles to cubin (GEMV,
    skinny tl.dot, prefill tiles; fp16/bf16/fp32)."""
    def ptrs(dt: str) -> dict[str, str]:
        return dict(a_ptr=f"*{dt}", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", c_ptr="*fp32")

    def consts(bm: int, bn: int, bk: int, f32: bool = False) -> dict[str, object]:
        return dict(GROUP=128, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, COMPUTE_F32=f32)

    compile_for_sm90("kernels.awq", None, [
        [ptrs("fp16"), consts(1, 64, 128), 4, 4],
        [ptrs("bf16"), consts(4, 32, 128), 4, 4],
        [ptrs("fp16"), consts(16, 64, 128), 4, 4],
        [ptrs("bf16"), consts(128, 128, 64), 8, 3],
        [ptrs("fp32"), consts(16, 64, 32, True), 4, 2],
    ])
