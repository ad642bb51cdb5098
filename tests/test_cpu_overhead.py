"""The decode step's fixed-overhead shortcuts give what the paths they bypass give.

- `Sampler`: an all-greedy batch with no penalties / min_tokens / logprobs takes one argmax;
  each of those knobs (and any random row) still takes the general path.
- `_fused_moe_one_token` (batch-1 decode): bit-identical to `_fused_moe_lowp` (bf16, blocked
  weights) and to `fused_moe_ref` (fp32, fp64).
- `topk_route` and the rotary rewrite: bit-identical to their previous formulas / reference.
- `CausalLM`: a registered torch hook runs and changes nothing, and the bf16 LM head on its
  blocked weight gives `F.linear`'s values.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hubdeploy.kernels.cpu_gemm import (blocked_low_precision_supported, onednn_blocks_low_precision, pack_weight,
                                        packed_copy, remember_packed)

NEEDS_BLOCKED_BF16 = pytest.mark.skipif(not onednn_blocks_low_precision(),
                    reason="this CPU has no oneDNN-blocked bf16 GEMM (needs avx512bw/vl/dq or avx_ne_convert)")
ENGINE_KEEPS_BLOCKED = pytest.mark.skipif(not blocked_low_precision_supported(),
                    reason="the engine keeps no blocked bf16 copies here (no oneDNN blocking, or no native bf16 "
                           "and our 16-bit kernel serves)")
from hubdeploy.kernels.fused_moe import (MoEWeights, _fused_moe_lowp, _fused_moe_one_token, fused_moe_ref, fused_moe_torch,
                               topk_route)
from hubdeploy.kernels.norm_rope_act import apply_rotary_ref, apply_rotary_torch, rotary_cos_sin
from hubdeploy.serving.sampler import SampleInput, Sampler
from hubdeploy.serving.sampling_params import SamplingParams

V = 50


def _rows(params: list[SamplingParams], out: list[int] | None = None, seed: int | None = None) -> list[SampleInput]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return [SampleInput(p, [1, 2, 3], list(out or []), gen if p.seed is not None else None, (2,)) for p in params]


def test_greedy_fast_path_is_the_argmax_and_knobs_fall_back() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    best = torch.argmax(logits, dim=-1).tolist()
    sampler = Sampler()
    tokens, lps = sampler(logits, _rows([SamplingParams(temperature=0.0)] * 6))
    assert tokens == best and lps == [None] * 6

    # logprobs on one row: general path, that row gets its logprob (of the same argmax token)
    ps = [SamplingParams(temperature=0.0)] * 5 + [SamplingParams(temperature=0.0, logprobs=2)]
    tokens, lps = sampler(logits, _rows(ps))
    assert tokens == best and lps[:5] == [None] * 5 and lps[5] is not None
    assert lps[5].token_id == best[5] and len(lps[5].top) == 2

    # a repetition penalty that must change the choice: the best token was already generated
    row = torch.zeros(1, V)
    row[0, 7], row[0, 9] = 5.0, 4.0
    pen = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sampler(row, _rows([pen], out=[7]))[0] == [9]
    # min_tokens: EOS (2) may not be drawn yet
    row2 = torch.zeros(1, V)
    row2[0, 2], row2[0, 4] = 5.0, 1.0
    assert sampler(row2, _rows([SamplingParams(temperature=0.0, min_tokens=3, max_tokens=8)]))[0] == [4]
    assert sampler(row2, _rows([SamplingParams(temperature=0.0)]))[0] == [2]
    # presence penalty large enough to move off the best token
    assert sampler(row, _rows([SamplingParams(temperature=0.0, presence_penalty=2.0)], out=[7]))[0] == [9]

    # a seeded random row in the batch: general path, the same draw as that row alone
    seeded = SamplingParams(temperature=1.0, seed=5)
    mixed, _ = sampler(logits[:2], _rows([SamplingParams(temperature=0.0), seeded], seed=5))
    alone, _ = sampler(logits[1:2], _rows([seeded], seed=5))
    assert mixed[0] == best[0] and mixed[1] == alone[0]


def _experts(dtype: torch.dtype, seed: int = 3, e: int = 4, hid: int = 64, inter: int = 96):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, hid, generator=g, dtype=torch.float64) / 8).to(dtype)
    w2 = (torch.randn(e, hid, inter, generator=g, dtype=torch.float64) / 8).to(dtype)
    return g, w13, w2


@NEEDS_BLOCKED_BF16
@pytest.mark.parametrize("top_k", [1, 2, 3, 8])
def test_one_token_moe_bf16_bit_identical_to_batched_path(top_k: int) -> None:
    g, w13, w2 = _experts(torch.bfloat16, e=8)
    packed = ([pack_weight(t) for t in w13], [pack_weight(t) for t in w2])
    for trial in range(20):
        x = (torch.randn(1, 64, generator=g) * 4).bfloat16()
        tw, ti = topk_route(torch.randn(1, 8, generator=g), top_k, renormalize=trial % 2 == 0)
        got = _fused_moe_one_token(x, 96, tw, ti, packed)
        want = _fused_moe_lowp(x, w13, w2, 96, tw, ti, packed)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    w = MoEWeights(w13, w2)
    remember_packed(packed, w13, w2)
    assert torch.equal(fused_moe_torch(x, w, tw, ti), want)  # the dispatcher takes the one-token path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_token_moe_fp32_fp64_bit_identical_to_reference(dtype: torch.dtype) -> None:
    g, w13, w2 = _experts(dtype)
    w = MoEWeights(w13.transpose(-1, -2).contiguous().transpose(-1, -2), w2)  # the CPU engine's fp32 layout
    for _ in range(6):
        x = torch.randn(1, 64, generator=g, dtype=dtype)
        tw, ti = topk_route(torch.randn(1, 4, generator=g), 2, True)
        assert torch.equal(fused_moe_torch(x, w, tw, ti), fused_moe_ref(x, w, tw, ti))


def _topk_route_before(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_route` as it was written before (separate cast, out-of-place division)."""
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_topk_route_values_unchanged(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    for m, e in ((1, 8), (9, 60), (33, 128)):
        logits = (torch.randn(m, e, generator=g) * 3).to(dtype)
        for renorm in (True, False):
            got, want = topk_route(logits, 2, renorm), _topk_route_before(logits, 2, renorm)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_rewrite_bit_identical(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    n, h, hkv, d = 5, 4, 2, 64
    cs = rotary_cos_sin(d, 256, 1e6, None)
    pos = torch.randint(0, 256, (n,), generator=g)
    qkv = (torch.randn(n, (h + 2 * hkv) * d, generator=g) * 3).to(dtype)
    q, k, _ = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(n, h, d), k.reshape(n, hkv, d)
    rq, rk = apply_rotary_ref(q, k, pos, cs)
    gq, gk = apply_rotary_torch(q, k, pos, cs)
    assert torch.equal(gq, rq) and torch.equal(gk, rk)


def _tiny_forward(model, ids: list[int]):
    """Prefill `ids` as one sequence on a fresh paged cache, then 3 decode steps; returns the
    hidden states of every step."""
    from hubdeploy.serving.forward_context import ForwardContext

    cfg = model.cfg
    bs, nblk = 4, 8
    dt = model.dtype
    caches = [(torch.zeros(nblk, bs, cfg.num_key_value_heads, cfg.head_dim, dtype=dt),
               torch.zeros(nblk, bs, cfg.num_key_value_heads, cfg.head_dim, dtype=dt))
              for _ in range(cfg.num_hidden_layers)]
    table = torch.arange(nblk, dtype=torch.int32)[None]
    outs = []
    tokens = list(ids)
    start = 0
    for _ in range(4):
        n = len(tokens) - start
        ctx = ForwardContext(
            is_prefill=n > 1,
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
            context_lens=torch.tensor([len(tokens)], dtype=torch.int32),
            block_tables=table,
            slot_mapping=torch.arange(start, len(tokens)),
            max_seqlen_q=n,
            max_context_len=len(tokens),
            kv_caches=caches,
        )
        with torch.inference_mode():
            h = model(torch.tensor(tokens[start:]), torch.arange(start, len(tokens)), ctx)
            logits = model.compute_logits(h[-1:])
        outs.append((h.clone(), logits.clone()))
        start = len(tokens)
        tokens.append(int(logits.argmax()))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_honours_torch_hooks(dtype: torch.dtype) -> None:
    from hubdeploy.serving.loader import load_model
    from hubdeploy.serving.cpu_backend import cpu_gemm_layout
    from tests.fixtures.tiny import build_tiny_cached

    model, _ = load_model(build_tiny_cached("mixtral", "none"), torch.device("cpu"), dtype)
    cpu_gemm_layout(model)
    ids = [5, 9, 17, 3, 44, 8]
    fast = _tiny_forward(model, ids)
    calls: list[tuple] = []
    o_proj = model.layers[-1].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)))
    try:
        hooked = _tiny_forward(model, ids)
    finally:
        handle.remove()
    assert len(calls) == 4, "a registered forward hook must run on every step"
    for (h1, l1), (h2, l2) in zip(fast, hooked):
        assert torch.equal(h1, h2) and torch.equal(l1, l2)
    assert len(calls) == 4 and _tiny_forward(model, ids)[0][0].shape == fast[0][0].shape  # removed: not called


@ENGINE_KEEPS_BLOCKED
def test_bf16_lm_head_on_blocked_weight_matches_f_linear() -> None:
    from hubdeploy.serving.loader import load_model
    from hubdeploy.serving.cpu_backend import cpu_gemm_layout
    from tests.fixtures.tiny import build_tiny_cached

    model, cfg = load_model(build_tiny_cached("mixtral", "none"), torch.device("cpu"), torch.bfloat16)
    cpu_gemm_layout(model)
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    if model.lm_head is not None:
        assert packed_copy(model.lm_head.weight) is not None  # the head runs on its blocked copy
    g = torch.Generator().manual_seed(8)
    for m in (1, 3, 8, 33):
        h = torch.randn(m, cfg.hidden_size, generator=g).bfloat16()
        got = model.compute_logits(h)
        want = F.linear(h, weight).float()
        assert got.dtype == torch.float32 and got.shape == (m, cfg.vocab_size)
        torch.testing.assert_close(got, want, atol=0, rtol=2**-7)  # at most one bf16 ulp apart
    model.lm_head = None  # as a tied checkpoint: the layout blocks the embedding for the head
    cpu_gemm_layout(model)
    assert packed_copy(model.embed_tokens.weight) is not None
    h = torch.randn(2, cfg.hidden_size, generator=g).bfloat16()
    want = F.linear(h, model.embed_tokens.weight).float()
    torch.testing.assert_close(model.compute_logits(h), want, atol=0, rtol=2**-7)
    with torch.no_grad():
        model.embed_tokens.weight.data = model.embed_tokens.weight.data * 2  # new storage: the copy is stale
    torch.testing.assert_close(model.compute_logits(h), want * 2, atol=0, rtol=2**-7)
