"""AWQ on the CPU with 16-bit activations: the weights stay 4-bit, through our AVX2 kernel
(`kernels/awq_cpu.py`) or torch's int4 (tinygemm) kernel where ours is unavailable.

- Our kernel's layout and math against the exact dequantized weights: applied to the fp32
  identity it gives back (q - z)·s within fp32 rounding (2^-22 of |q·s| + |z·s|), for group
  sizes 32/64/128/256, odd output sizes, stacked experts, and both its paths (GEMV for few
  rows, dequantize + sgemm above `GEMV_MAX_ROWS`).
- tinygemm's repack (`to_cpu_int4`) against our reference dequantizer: the kernel applied to the
  identity gives back W; it must equal `(q - z)·s` up to the bf16 rounding of scale and zero
  the kernel requires (bound: (|q - 8|·|s| + |(8 - z)·s|)·2^-8, plus one bf16 rounding of the
  output), for group sizes 32/64/128/256, zero points 0..15, single linears and stacked experts.
- With each kernel (`HUBDEPLOY_CPU_INT4` picks): `awq_linear` (bf16, CPU) and `fused_moe_torch` with AWQ experts against float64 on the exact
  dequantized weights: within bf16 rounding (tolerance as tests/test_kernels_awq.py: 2e-2 of
  the output scale); no dense copy of any weight is built.
- Whole tiny AWQ models (Mixtral's w1/w2/w3 experts, Qwen3-MoE's gate/up/down_proj experts)
  loaded in bf16 and laid out as the CPU runner does: last-position logits against the same
  checkpoint in fp32 (the reference numerics), 0.1 max abs as tests/test_cpu_bf16.py; every
  quantized weight int4 only (natural-layout integers freed), none dense.
- The expert-LoRA hook path (fused_moe_torch with a hook) uses the int4 experts as well.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hubdeploy.kernels.awq import (
    AWQPacked,
    awq_linear,
    awq_repack,
    cpu_int4_supported,
    stack_packed,
    to_cpu_int4,
    unpack_int4_natural,
)
from hubdeploy.kernels.awq_cpu import GEMV_MAX_ROWS, Avx2Int4Weight, avx2_unavailable_reason
from hubdeploy.kernels.awq_format import awq_quantize
from hubdeploy.kernels.fused_moe import AWQMoEWeights, MoEWeights, fused_moe_ref, fused_moe_torch, topk_route
from hubdeploy.serving.loader import load_model
from hubdeploy.serving.cpu_backend import cpu_gemm_layout
from hubdeploy.serving.models.layers import Linear
from tests.helpers_forward import (
    awq_quantize_checkpoint,
    make_hf_checkpoint,
    prefill_last_logits,
    prompts_clear_of_router_ties,
)

BF16_REL = 2e-2
needs_avx2 = pytest.mark.skipif(avx2_unavailable_reason() is not None, reason=f"AVX2 kernel: {avx2_unavailable_reason()}")


@pytest.fixture(params=["avx2", "tinygemm"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each CPU int4 kernel (the environment switch users have too)."""
    if request.param == "avx2" and avx2_unavailable_reason() is not None:
        pytest.skip(f"AVX2 kernel: {avx2_unavailable_reason()}")
    monkeypatch.setenv("HUBDEPLOY_CPU_INT4", request.param)
    return request.param


def _fp32_bound(p: AWQPacked) -> torch.Tensor:
    g = p.group_size
    q = unpack_int4_natural(p.qweight).double()
    z = unpack_int4_natural(p.qzeros).double().repeat_interleave(g, -2).transpose(-1, -2)
    s = p.scales.double().abs().repeat_interleave(g, -2).transpose(-1, -2)
    return (q * s + z * s) * 2.0**-22 + 1e-30


@needs_avx2
@pytest.mark.parametrize("g", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS + 1])
def test_avx2_kernel_gives_back_the_exact_weights(g: int, rows: int) -> None:
    p = _packed(40, 512, g, seed=g + rows)  # 40: no multiple-of-16 requirement
    w4 = p.cpu_int4()
    assert isinstance(w4, Avx2Int4Weight) and w4.weight.numel() == 40 * 512 // 8  # 4 bits per weight
    eye = torch.eye(512)
    w_back = torch.cat([w4.mm(eye[i:i + rows]) for i in range(0, 512, rows)]).double().t()
    err = (w_back - _exact(p)).abs()
    assert (err <= _fp32_bound(p)).all(), err.max().item()


@needs_avx2
def test_avx2_kernel_stacked_experts_each_expert_its_own() -> None:
    parts = [_packed(24, 128, 64, seed=e) for e in range(3)]
    st = stack_packed(parts)
    w4 = st.cpu_int4()
    assert isinstance(w4, Avx2Int4Weight) and w4.num_experts == 3
    for e, p in enumerate(parts):
        err = (w4.mm(torch.eye(128), e).double().t() - _exact(p)).abs()
        assert (err <= _fp32_bound(p)).all(), (e, err.max().item())


def _packed(out_f: int, in_f: int, g: int, seed: int) -> AWQPacked:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * (1 + 4 * torch.rand(out_f, 1, generator=gen))
    return awq_repack(*awq_quantize(w, g), g)


def _exact(p: AWQPacked) -> torch.Tensor:
    """float64 `[.., out, in]` straight from the nibbles: (q - z)·s."""
    g = p.group_size
    q = unpack_int4_natural(p.qweight).double()
    z = unpack_int4_natural(p.qzeros).double().repeat_interleave(g, -2).transpose(-1, -2)
    s = p.scales.double().repeat_interleave(g, -2).transpose(-1, -2)
    return (q - z) * s


def _bound(p: AWQPacked) -> torch.Tensor:
    g = p.group_size
    q = unpack_int4_natural(p.qweight).double()
    z = unpack_int4_natural(p.qzeros).double().repeat_interleave(g, -2).transpose(-1, -2)
    s = p.scales.double().abs().repeat_interleave(g, -2).transpose(-1, -2)
    w = (q - z) * s
    return ((q - 8).abs() * s + ((8 - z) * s).abs()) * 2.0**-8 + w.abs() * 2.0**-8 + 1e-30


@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_repack_matches_reference_dequantizer(g: int) -> None:
    p = _packed(48, 512, g, seed=g)
    zeros = unpack_int4_natural(p.qzeros)
    assert zeros.min() < 8 < zeros.max()  # real zero points on both sides of tinygemm's 8
    w4 = to_cpu_int4(p)
    assert w4.weight.dtype == torch.uint8 and w4.weight.numel() == 48 * 512 // 2  # 4 bits per weight
    w_back = w4.mm(torch.eye(512, dtype=torch.bfloat16)).double().t()  # [out, in]
    err = (w_back - _exact(p)).abs()
    assert (err <= _bound(p)).all(), err.max().item()


def test_repack_stacked_experts_each_expert_its_own() -> None:
    parts = [_packed(32, 128, 32, seed=e) for e in range(3)]
    st = stack_packed(parts)
    w4 = to_cpu_int4(st)
    eye = torch.eye(128, dtype=torch.bfloat16)
    for e, p in enumerate(parts):
        err = (w4.mm(eye, e).double().t() - _exact(p)).abs()
        assert (err <= _bound(p)).all(), (e, err.max().item())


def test_unsupported_shapes_fall_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBDEPLOY_CPU_INT4", "tinygemm")
    p = _packed(40, 64, 32, seed=1)  # out % 16 != 0: tinygemm does not take it
    assert not cpu_int4_supported(p) and p.cpu_int4() is None
    x = torch.randn(2, 64).to(torch.bfloat16)
    ref = x.double() @ _exact(p).t()
    y = awq_linear(x, p)
    assert (y.double() - ref).abs().max() <= BF16_REL * ref.abs().max()
    with pytest.raises(ValueError, match="out_features % 16"):
        to_cpu_int4(p)


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("g", [32, 128])
def test_awq_linear_bf16_uses_int4_within_bf16_rounding(m: int, g: int, kernel: str) -> None:
    p = _packed(64, 256, g, seed=m)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, m, 256, generator=gen).to(torch.bfloat16)
    bias = torch.randn(64, generator=gen).to(torch.bfloat16)
    y = awq_linear(x, p, bias)
    ref = x.double() @ _exact(p).t() + bias.double()
    assert y.shape == (2, m, 64) and y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= BF16_REL * ref.abs().max()
    assert p._cpu_int4 is not None and p._dequant_cache == {}  # no dense copy
    # fp32 keeps the exact reference numerics (dense fp32 dequantization, as before)
    y32 = awq_linear(x.float(), p)
    assert (y32.double() - (x.double() @ _exact(p).t())).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("m", [1, 5])
def test_fused_moe_awq_bf16_int4_no_dense_copy(m: int, kernel: str) -> None:
    E, H, I, g = 4, 128, 64, 32
    w13 = stack_packed([_packed(2 * I, H, g, seed=10 + e) for e in range(E)])
    w2 = stack_packed([_packed(H, I, g, seed=20 + e) for e in range(E)])
    weights = AWQMoEWeights(w13, w2)
    gen = torch.Generator().manual_seed(m)
    x = (0.1 * torch.randn(m, H, generator=gen)).to(torch.bfloat16)
    tw, ids = topk_route(torch.randn(m, E, generator=gen), 2, True)
    y = fused_moe_torch(x, weights, tw, ids)
    assert w13._dequant_cache == {} and w2._dequant_cache == {}
    assert w13._cpu_int4 is not None and w2._cpu_int4 is not None
    ref = fused_moe_ref(x.double(), MoEWeights(_exact(w13), _exact(w2)), tw.double(), ids)
    assert y.shape == (m, H) and y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= BF16_REL * ref.abs().max()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_tiny_awq_model_bf16_int4_matches_fp32_reference(arch: str, kernel: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    plain = make_hf_checkpoint(arch, tmp_path / "fp16")
    ckpt = awq_quantize_checkpoint(plain, tmp_path / "awq", group_size=32)
    ref_model, _ = load_model(ckpt, dtype=torch.float32)
    # prompts whose experts bf16 cannot flip: a router near-tie (seen at a 0.001 gap on an
    # AVX-512 Xeon) sends a token to another expert, a different computation, not an error
    prompts = prompts_clear_of_router_ties(ref_model, 2, 8)
    ref = prefill_last_logits(ref_model, prompts)
    model, _ = load_model(ckpt, dtype=torch.bfloat16)
    assert cpu_gemm_layout(model) > 0  # what the CPU runner does at load: int4 built, integers freed
    ours = prefill_last_logits(model, prompts)
    diff = (ours - ref).abs().max().item()
    print(f"{arch}: bf16 int4 vs fp32 reference max abs logit diff {diff:.3f}")
    assert diff <= 0.1
    packs = [m.packed for m in model.modules() if isinstance(m, Linear) and m.quantized]
    packs += [w for m in model.modules() for w in _moe_awq(m)]
    assert packs and all(p._cpu_int4 is not None and p._dequant_cache == {} and p.qweight.numel() == 0 for p in packs)


def _moe_awq(module: torch.nn.Module) -> list[AWQPacked]:
    w = getattr(module, "weights", None)
    return [w.w13, w.w2] if isinstance(w, AWQMoEWeights) else []


def test_keep_cpu_int4_only_frees_the_integers_and_refuses_dense() -> None:
    p = _packed(32, 128, 32, seed=3)
    x = torch.randn(3, 128).to(torch.bfloat16)
    before = awq_linear(x, p)
    assert p.keep_cpu_int4_only() and not p.keep_cpu_int4_only()
    assert p.qweight.numel() == 0 and p.num_experts is None
    assert torch.equal(awq_linear(x, p), before)  # same kernel, same operands
    with pytest.raises(RuntimeError, match="CPU int4 form"):
        awq_linear(x.float(), p)


class _AddHook:
    """A stand-in expert-LoRA hook with real terms: adds fixed tensors to h and y by slot."""

    def __init__(self, n: int, I2: int, H: int) -> None:
        g = torch.Generator().manual_seed(9)
        self.t13, self.t2 = torch.randn(n, I2, generator=g), torch.randn(n, H, generator=g)

    def sort_key(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def add_w13(self, h: torch.Tensor, xs: torch.Tensor, order: torch.Tensor) -> None:
        h += self.t13.to(h.dtype)

    def add_w2(self, y: torch.Tensor, act: torch.Tensor, order: torch.Tensor, _: object) -> None:
        y += self.t2.to(y.dtype)


def test_fused_moe_awq_bf16_with_hook_uses_int4_too(kernel: str) -> None:
    E, H, I, g, m = 4, 64, 32, 32, 3
    w13 = stack_packed([_packed(2 * I, H, g, seed=30 + e) for e in range(E)])
    w2 = stack_packed([_packed(H, I, g, seed=40 + e) for e in range(E)])
    exact = MoEWeights(_exact(w13), _exact(w2))
    gen = torch.Generator().manual_seed(1)
    x = (0.1 * torch.randn(m, H, generator=gen)).to(torch.bfloat16)
    tw, ids = topk_route(torch.randn(m, E, generator=gen), 2, True)
    y = fused_moe_torch(x, AWQMoEWeights(w13, w2), tw, ids, hook=_AddHook(m * 2, 2 * I, H))
    ref = fused_moe_torch(x.double(), exact, tw.double(), ids, hook=_AddHook(m * 2, 2 * I, H))
    assert w13._dequant_cache == {} and w2._dequant_cache == {}
    assert (y.double() - ref).abs().max() <= BF16_REL * ref.abs().max()


@needs_avx2
def test_fp16_activations_use_the_avx2_kernel_too() -> None:
    p = _packed(64, 256, 64, seed=11)
    x = torch.randn(3, 256).to(torch.float16)
    y = awq_linear(x, p)
    ref = x.double() @ _exact(p).t()
    assert y.dtype == torch.float16 and isinstance(p._cpu_int4, Avx2Int4Weight) and p._dequant_cache == {}
    assert (y.double() - ref).abs().max() <= 2e-3 * ref.abs().max()  # fp16 output rounding (2^-11) and then some
