"""The engine's lean CPU step: each shortcut gives bit-identical results to the path it replaces.

- `rms_norm_torch` (fused `torch.rms_norm` in fp32) and `apply_rotary_torch` (cos/sin once per
  step, q and k rotated as one tensor) against their references, `torch.equal`.
- `fused_moe_torch` at decode and prefill sizes (the two activation strategies) against `fused_moe_ref`.
- Decode attention with the per-step plan and `DecodeKV` (K/V appended across steps instead of
  gathered) against the plain gather, over many real decode steps with a paged cache, including
  rows that change, block tables that grow and a sliding window.
- The whole engine: the same requests with and without `DecodeKV` give equal logits every step,
  and a `ForwardContext` reused with its tensors rewritten in place (CUDA-graph style) is not
  served stale per-step values.
"""
from __future__ import annotations

import random

import pytest
import torch

from hubdeploy.kernels.attention import paged_attention_ref, paged_attention_torch, store_kv_torch
from hubdeploy.kernels.cpu_step import DecodeKV, cpu_step
from hubdeploy.kernels.fused_moe import (
    MoEWeights,
    _BATCHED_ACT_MAX,
    fused_moe_ref,
    fused_moe_torch,
    topk_route,
)
from hubdeploy.kernels.norm_rope_act import (
    apply_rotary_ref,
    apply_rotary_torch,
    rms_norm_ref,
    rms_norm_torch,
    rotary_cos_sin,
)


@pytest.mark.parametrize("shape", [(1, 256), (7, 48), (32, 96), (5, 13)])
def test_rms_norm_torch_is_bit_identical_in_fp32(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    x, res = torch.randn(shape, generator=g) * 7, torch.randn(shape, generator=g)
    w = torch.randn(shape[1], generator=g)
    assert torch.equal(rms_norm_torch(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    out, new_res = rms_norm_torch(x, w, 1e-6, res)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, res)
    assert torch.equal(out, ref_out) and torch.equal(new_res, ref_res)
    xb, wb = x.bfloat16(), w.bfloat16()  # other dtypes take the reference itself
    assert torch.equal(rms_norm_torch(xb, wb, 1e-5), rms_norm_ref(xb, wb, 1e-5))


def test_apply_rotary_torch_is_bit_identical_and_shares_cos_sin() -> None:
    g = torch.Generator().manual_seed(1)
    n, h, hkv, d = 9, 4, 2, 32
    cs = rotary_cos_sin(d, 128, 10000.0, None)
    pos = torch.randint(0, 128, (n,), generator=g)
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g)
    q, k, _ = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(n, h, d), k.reshape(n, hkv, d)  # adjacent views: rotated as one tensor
    ref_q, ref_k = apply_rotary_ref(q, k, pos, cs)
    with cpu_step() as step:
        for _ in range(2):  # the second call reuses the step's cos/sin rows
            got_q, got_k = apply_rotary_torch(q, k, pos, cs)
            assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
        assert len(step.memo) == 1
        q2, k2 = q.contiguous(), k.contiguous() * 2  # separate tensors: rotated one by one
        r2 = apply_rotary_ref(q2, k2, pos, cs)
        g2 = apply_rotary_torch(q2, k2, pos, cs)
    assert torch.equal(g2[0], r2[0]) and torch.equal(g2[1], r2[1])
    assert torch.equal(qkv[:, : h * d].reshape(n, h, d), q)  # inputs untouched


@pytest.mark.parametrize("m", [1, 8, 32, _BATCHED_ACT_MAX // 64])
def test_fused_moe_torch_equals_reference_at_decode_and_prefill_sizes(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    e, hid, inter = 4, 64, 96
    w13 = torch.randn(e, 2 * inter, hid, generator=g) / 8
    w2 = torch.randn(e, hid, inter, generator=g) / 8
    w = MoEWeights(w13.transpose(-1, -2).contiguous().transpose(-1, -2), w2)  # the CPU engine's layout
    x = torch.randn(m, hid, generator=g)
    tw, ti = topk_route(torch.randn(m, e, generator=g), 2, True)
    assert torch.equal(fused_moe_torch(x, w, tw, ti), fused_moe_ref(x, w, tw, ti))


def _decode_steps(sliding_window: int | None, dense: bool) -> list[torch.Tensor]:
    """Run 40 decode steps of a changing batch over a real paged cache; return each step's output."""
    g = torch.Generator().manual_seed(7)
    rng = random.Random(7)
    nb, bs, hkv, h, d = 96, 4, 2, 4, 16
    kc, vc = torch.zeros(nb, bs, hkv, d), torch.zeros(nb, bs, hkv, d)
    free = list(range(nb))
    rng.shuffle(free)
    seqs = [{"len": 0, "table": []} for _ in range(6)]
    for s in seqs:  # a prompt of 3..9 tokens each
        n = rng.randint(3, 9)
        s["table"] = [free.pop() for _ in range(-(-n // bs))]
        slots = torch.tensor([s["table"][p // bs] * bs + p % bs for p in range(n)])
        store_kv_torch(torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g), kc, vc, slots)
        s["len"] = n
    kv = DecodeKV(num_layers=1, headroom=4) if dense else None
    if kv is not None:
        kv.min_gather_bytes = 0
    outs = []
    for step in range(40):
        if step == 15:
            seqs.pop(2)  # a sequence finishes: the rows change
        if step == 28:
            seqs.append({"len": 0, "table": []})  # one joins (a one-token prompt)
        for s in seqs:
            if s["len"] % bs == 0:
                s["table"].append(free.pop())
            p = s["len"]
            store_kv_torch(torch.randn(1, hkv, d, generator=g), torch.randn(1, hkv, d, generator=g), kc, vc,
                           torch.tensor([s["table"][p // bs] * bs + p % bs]))
            s["len"] += 1
        b = len(seqs)
        width = max(len(s["table"]) for s in seqs)
        tables = torch.tensor([s["table"] + [-1] * (width - len(s["table"])) for s in seqs], dtype=torch.int32)
        lens = torch.tensor([s["len"] for s in seqs], dtype=torch.int32)
        rows = [id(s) for s in seqs]
        q = torch.randn(b, h, d, generator=g)
        cu = torch.arange(b + 1, dtype=torch.int32)
        with cpu_step(kv, rows if kv is not None else None):
            for _layer in range(2):  # two "layers" share the step's plan (same cache here)
                out = paged_attention_torch(q, kc, vc, cu, lens, tables, 1, int(lens.max()), 0.25, sliding_window)
        ref = paged_attention_ref(q, kc, vc, cu, lens, tables, 1, int(lens.max()), 0.25, sliding_window)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        outs.append(out)
    if kv is not None:
        # gathered: the first step, and the one sequence that joins; a sequence leaving and the
        # buffers growing cost no gather (rows move, buffers are copied)
        assert kv.appended == 39 and kv.gathered == 2
    return outs


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_decode_kv_appending_is_bit_identical_to_gathering(sliding_window: int | None) -> None:
    plain = _decode_steps(sliding_window, dense=False)
    kept = _decode_steps(sliding_window, dense=True)
    for i, (a, b) in enumerate(zip(plain, kept)):
        assert torch.equal(a, b), f"step {i}"


@pytest.mark.parametrize("kv_cache_tokens", [1024, 160])
def test_engine_logits_equal_with_and_without_dense_kv(tiny_models, kv_cache_tokens: int) -> None:
    """Requests join while others decode (mixed prefill + decode steps, chunked prompts), finish
    at different steps (rows move) and, with 160 cache tokens, get preempted and recomputed:
    every step's logits equal those of the gather path."""
    from hubdeploy.serving.engine import EngineArgs, LLMEngine
    from hubdeploy.serving.sampling_params import SamplingParams

    model_dir = tiny_models("mixtral", "none")

    def run(dense: bool) -> tuple[list[torch.Tensor], LLMEngine]:
        eng = LLMEngine(EngineArgs(model=str(model_dir), device="cpu", max_model_len=128, max_num_seqs=8,
                                   max_num_batched_tokens=24, max_loras=0, kv_cache_tokens=kv_cache_tokens))
        if not dense:
            eng.runner.cpu.dense_kv = None
        else:
            eng.runner.cpu.dense_kv.min_gather_bytes = 0
        logits: list[torch.Tensor] = []
        run_step = eng.runner.run
        eng.runner.run = lambda batch: (lambda r: logits.append(r) or r)(run_step(batch))  # type: ignore[method-assign]
        rng = random.Random(3)
        for step in range(400):
            if step % 3 == 0 and step < 60:  # a new request every third step
                eng.add_request(f"r{step}", [rng.randrange(3, 200) for _ in range(rng.randint(2, 20))],
                                SamplingParams(max_tokens=rng.choice([4, 12, 20]), temperature=0.0, ignore_eos=True))
            if not eng.has_unfinished() and step >= 60:
                break
            eng.step()
        return logits, eng

    (a, _), (b, eng) = run(False), run(True)
    kv = eng.runner.cpu.dense_kv
    assert kv.appended > 0 and kv.gathered > 0 and kv.moved > 0
    if kv_cache_tokens == 160:
        assert eng.stats().preemptions_total > 0
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def test_reused_context_rewritten_in_place_is_not_served_stale_values(tiny_models) -> None:
    """A context whose tensors are rewritten in place between forwards (as CUDA-graph static
    buffers are) must give what a fresh context gives: the CPU step's memo lives for one step
    (one forward, as the runner runs them)."""
    from hubdeploy.serving.forward_context import ForwardContext
    from hubdeploy.serving.loader import load_model

    model, cfg = load_model(tiny_models("mixtral", "none"), torch.device("cpu"), torch.float32)
    bs, nb = 4, 16
    shape = (nb, bs, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(cfg.num_hidden_layers)]

    def ctx_for(lens: list[int], tables: list[list[int]]) -> ForwardContext:
        b = len(lens)
        slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for n, t in zip(lens, tables)]
        return ForwardContext(is_prefill=False, cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32),
                              context_lens=torch.tensor(lens, dtype=torch.int32),
                              block_tables=torch.tensor(tables, dtype=torch.int32),
                              slot_mapping=torch.tensor(slots), max_seqlen_q=1, max_context_len=16, kv_caches=caches)

    ids = torch.tensor([5, 9])
    with torch.inference_mode():
        static = ctx_for([5, 7], [[0, 1, 2, 3], [4, 5, 6, 7]])
        with cpu_step():
            model(ids, torch.tensor([4, 6]), static)
        second = ctx_for([11, 3], [[8, 9, 10, 11], [12, 13, 14, 15]])
        for name in ("context_lens", "block_tables", "slot_mapping"):
            getattr(static, name).copy_(getattr(second, name))
        with cpu_step():
            got = model(ids, torch.tensor([10, 2]), static)
        with cpu_step():
            expect = model(ids, torch.tensor([10, 2]), second)
    assert torch.equal(got, expect)


def test_delta_outputs_only_streams_the_same_tokens_and_logprobs(tiny_models) -> None:
    """`LLMEngine.delta_outputs_only`: unfinished outputs carry only the step's part (O(1) per
    request), finished ones are whole; the deltas add up to what the default mode returns."""
    from hubdeploy.serving.engine import EngineArgs, LLMEngine
    from hubdeploy.serving.sampling_params import SamplingParams

    def run(delta_only: bool) -> dict[str, list]:
        eng = LLMEngine(EngineArgs(model=str(tiny_models("mixtral", "none")), device="cpu", max_model_len=128,
                                   max_num_seqs=4, max_loras=0, kv_cache_tokens=512))
        eng.delta_outputs_only = delta_only
        params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2)
        for i in range(3):
            eng.add_request(f"r{i}", [5 + i, 17, 42, 8], params)
        got: dict[str, list] = {}
        for _ in range(50):
            if not eng.has_unfinished():
                break
            for out in eng.step():
                ids, lps, final = got.setdefault(out.request_id, [[], [], None])
                ids += out.delta_token_ids
                lps += [(lp.token_id, lp.logprob, lp.top) for lp in out.delta_logprobs]
                if out.finished:
                    got[out.request_id][2] = (out.token_ids, [(lp.token_id, lp.logprob) for lp in out.logprobs],
                                              out.text, out.finish_reason, out.metrics.num_prompt_tokens)
                elif delta_only:
                    assert out.token_ids == out.delta_token_ids and len(out.logprobs) == 1 and out.metrics is None
        return got

    full, deltas = run(False), run(True)
    assert full == deltas and len(full) == 3
    for ids, lps, final in full.values():
        assert final[0] == ids and len(ids) == 9 and [t for t, _ in final[1]] == ids


def test_cpu_threads_all_for_prefill_sized_steps_one_for_decode(tiny_models) -> None:
    """`cpu_threads` threads for steps of >= `cpu_parallel_min_tokens` tokens, one for smaller
    ones; the caller's thread count is back after every step."""
    from hubdeploy.serving.engine import EngineArgs, LLMEngine
    from hubdeploy.serving.sampling_params import SamplingParams

    caller = torch.get_num_threads()
    eng = LLMEngine(EngineArgs(model=str(tiny_models("mixtral", "none")), device="cpu", max_model_len=128,
                               max_num_seqs=8, max_loras=0, kv_cache_tokens=1024, cpu_threads=3,
                               cpu_parallel_min_tokens=40))
    seen: list[tuple[int, int]] = []
    run_step = eng.runner._run

    def spy(batch):
        seen.append((sum(item.num_tokens for item in batch), torch.get_num_threads()))
        return run_step(batch)

    eng.runner._run = spy  # type: ignore[method-assign]
    for i in range(4):
        eng.add_request(f"r{i}", list(range(3, 23)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
        assert torch.get_num_threads() == caller
    assert seen[0] == (80, 3)  # 4 prompts of 20 tokens: one prefill step over the threshold
    assert seen[1:] and all(threads == 1 for n, threads in seen[1:] if n < 40)


def test_parallel_threshold_defaults_to_work_per_step(tiny_models) -> None:
    """Without `cpu_parallel_min_tokens` the threshold is CPU_PARALLEL_MIN_WORK over the weights
    one token multiplies (every linear, top_k experts per MoE), counted from the config here."""
    import json

    from hubdeploy.serving.engine import EngineArgs, LLMEngine
    from hubdeploy.serving.cpu_backend import CPU_PARALLEL_MIN_WORK, active_weights_per_token

    model_dir = tiny_models("mixtral", "none")
    c = json.loads((model_dir / "config.json").read_text())
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    attn = h * d * (c["num_attention_heads"] * 2 + 2 * c["num_key_value_heads"])  # q, o, k, v
    per_layer = attn + h * c["num_local_experts"] + c["num_experts_per_tok"] * 3 * h * i
    expect = layers * per_layer + (0 if c.get("tie_word_embeddings") else h * v)
    eng = LLMEngine(EngineArgs(model=str(model_dir), device="cpu", max_model_len=64, max_loras=0, kv_cache_tokens=256))
    assert active_weights_per_token(eng.runner.model) == expect
    assert eng.runner.cpu.parallel_min_tokens == -(-CPU_PARALLEL_MIN_WORK // expect)
