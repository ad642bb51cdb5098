"""The engine end to end on a tiny real-format model (CPU, float32).

Reference: transformers' greedy `generate` on the same checkpoint. Properties: batch
invariance (greedy and seeded sampling), preemption by recompute, prefix caching, stop
conditions and abort, all with exact token equality.
"""
from __future__ import annotations

import random

import pytest
import torch

from hubdeploy.serving import LLM, SamplingParams
from hubdeploy.serving.engine import EngineArgs, LLMEngine
from hubdeploy.serving.tokenizer import token_bytes, utf8_incomplete_tail

ARCH = "mixtral"
NEW = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return tiny_models(ARCH, "none")


def make_llm(model_dir, **kw) -> LLM:
    opts = dict(device="cpu", dtype="float32", max_model_len=256, kv_cache_tokens=4096,
                max_num_batched_tokens=256)
    opts.update(kw)
    return LLM(str(model_dir), **opts)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return make_llm(model_dir)


def prompts_mixed(n: int, seed: int = 0, vocab: int = 600) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 60))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def test_greedy_matches_transformers_generate(model_dir, llm: LLM) -> None:
    from transformers import AutoModelForCausalLM

    texts = ["Hello world", "def add(a, b): return a + b. for i in range(10):", "The"]
    prompts: list = texts + [prompts_mixed(1, seed=3)[0]]
    outs = llm.generate(prompts, GREEDY)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for p, o in zip(prompts, outs):
        ids = llm.tokenizer.encode(p) if isinstance(p, str) else p
        assert o.prompt_token_ids == ids
        with torch.no_grad():
            g = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                             pad_token_id=0, eos_token_id=None)
        assert o.token_ids == g[0, len(ids):].tolist()
        assert o.finish_reason == "length" and len(o.token_ids) == NEW
        # the full decode, less at most one unfinished character at the end (byte-level BPE:
        # exactly the lossy UTF-8 decode of the output's bytes without an incomplete tail)
        data = b"".join(token_bytes(llm.tokenizer).level_bytes(t) for t in o.token_ids)
        assert o.text == data[:utf8_incomplete_tail(data)].decode("utf-8", errors="replace")
    # logprobs: the raw log-softmax of the reference's logits at each generated position
    ids = prompts[-1]
    o = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3))[0]
    with torch.no_grad():
        ref_lp = torch.log_softmax(ref(torch.tensor([ids + o.token_ids])).logits[0].double(), -1)
    for j, lp in enumerate(o.logprobs):
        row = ref_lp[len(ids) - 1 + j]
        assert lp.token_id == o.token_ids[j] and lp.top[0][0] == lp.token_id
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7,
                                                           ignore_eos=True)], ids=["greedy", "seeded"])
def test_batch_invariance(llm: LLM, params: SamplingParams) -> None:
    prompts = prompts_mixed(32, seed=1)
    n = 16
    sp = [SamplingParams(**{**params.__dict__, "max_tokens": n, "seed": None if params.seed is None else i})
          for i in range(32)]
    together = llm.generate(prompts, sp)
    alone = [llm.generate([p], s)[0] for p, s in zip(prompts, sp)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert llm.engine.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_preemption_gives_identical_outputs(model_dir, llm: LLM, seeded: bool) -> None:
    prompts = prompts_mixed(8, seed=2)
    prompts = [p[:30] for p in prompts]
    params = [SamplingParams(max_tokens=NEW, temperature=0.9, seed=100 + i, ignore_eos=True) if seeded else GREEDY
              for i in range(len(prompts))]
    expect = llm.generate(prompts, params)
    small = make_llm(model_dir, max_model_len=96, kv_cache_tokens=160)  # 10 blocks: ~2 sequences at once
    got = small.generate(prompts, params)
    s = small.engine.stats()
    assert s.preemptions_total > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in expect]
    assert s.kv_cache_usage == 0.0 and small.engine.block_manager.num_free_blocks == 10


def test_prefix_cache_hits_and_changes_nothing(model_dir) -> None:
    rng = random.Random(5)
    shared = [1] + [rng.randrange(3, 600) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 600) for _ in range(k)] for k in (3, 7, 12)]
    cached = make_llm(model_dir)
    first = cached.generate(prompts[:1], GREEDY)
    before = cached.engine.stats()
    rest = cached.generate(prompts[1:], GREEDY)
    after = cached.engine.stats()
    # 41 shared tokens = 2 full blocks of 16, for each of the 2 later prompts
    assert after.prefix_cache_hits - before.prefix_cache_hits == 4
    assert after.prompt_tokens_total - before.prompt_tokens_total == sum(len(p) for p in prompts[1:]) - 64
    plain = make_llm(model_dir, enable_prefix_caching=False).generate(prompts, GREEDY)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in plain]
    assert plain and make_llm(model_dir, enable_prefix_caching=False).engine.stats().prefix_cache_hits == 0


def test_abort_frees_all_blocks(llm: LLM) -> None:
    eng = llm.engine
    for i, p in enumerate(prompts_mixed(6, seed=4)):
        eng.add_request(f"abort-{i}", p, GREEDY)
    for _ in range(3):
        eng.step()
    assert eng.stats().kv_cache_usage > 0
    outs = [eng.abort_request(f"abort-{i}") for i in range(6)]
    assert all(o is not None and o.finish_reason == "abort" and o.finished for o in outs)
    assert eng.abort_request("abort-0") is None
    s = eng.stats()
    assert s.kv_cache_usage == 0.0 and s.num_running == 0 and s.num_waiting == 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.has_unfinished()


def test_stop_conditions(llm: LLM) -> None:
    base = llm.generate(["The quick brown fox"], GREEDY)[0]
    # stop token id: the 5th generated token ends generation at its first occurrence
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    o = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=NEW, temperature=0.0,
                                                              stop_token_ids=[stop_id]))[0]
    assert o.finish_reason == "stop" and o.token_ids == base.token_ids[:first + 1]
    # stop string across tokens: text is cut before it
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 4]
    o = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                              stop=[stop]))[0]
    assert o.finish_reason == "stop" and o.text == text[: text.index(stop)] and stop not in o.text
    # max_tokens and the context limit give "length"
    o = llm.generate([[1, 5, 6]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5
    o = llm.generate([[1] * 250], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 6  # 256 - 250
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 256], GREEDY)


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    base = llm.generate(["Hello"], GREEDY)[0]
    eng = llm.engine
    fake_eos = base.token_ids[2]
    eng.eos_token_ids = (*eng.eos_token_ids, fake_eos)
    try:
        o = llm.generate(["Hello"], SamplingParams(max_tokens=NEW, temperature=0.0))[0]
        assert o.finish_reason == "stop" and o.token_ids[-1] == fake_eos
        assert o.token_ids == base.token_ids[: base.token_ids.index(fake_eos) + 1]
        o = llm.generate(["Hello"], SamplingParams(max_tokens=NEW, temperature=0.0, min_tokens=NEW))[0]
        assert fake_eos not in o.token_ids and len(o.token_ids) == NEW
        o = llm.generate(["Hello"], GREEDY)[0]
        assert o.token_ids == base.token_ids
    finally:
        eng.eos_token_ids = eng.eos_token_ids[:-1]


def test_engine_args_errors(model_dir) -> None:
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(str(model_dir), device="cpu", max_seqs=3)
    with pytest.raises(ValueError, match="KV cache holds"):
        LLMEngine(EngineArgs(str(model_dir), device="cpu", max_model_len=512, kv_cache_tokens=64))


@pytest.mark.parametrize("arch,quant", [("mixtral", "awq"), ("qwen3_moe", "none"), ("llama", "none")])
def test_other_tiny_models_batch_equals_alone(tiny_models, arch: str, quant: str) -> None:
    llm = make_llm(tiny_models(arch, quant), max_num_batched_tokens=32)  # forces chunked prefill
    prompts = prompts_mixed(4, seed=6)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, sp)
    alone = [llm.generate([p], sp)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 8 for o in together)


@pytest.mark.gpu
def test_cuda_graphs_match_eager(tiny_models) -> None:
    d = str(tiny_models("mixtral", "awq"))
    prompts = prompts_mixed(5, seed=8)
    opts = dict(device="cuda", max_model_len=256, gpu_memory_utilization=0.3)
    graphs = LLM(d, **opts)
    assert graphs.engine.runner.graphs, "no CUDA graph was captured"
    got = graphs.generate(prompts, GREEDY)
    del graphs
    eager = LLM(d, enforce_eager=True, **opts).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]


def test_unknown_lora_is_a_clear_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="LoRA adapter 'nope' is not loaded"):
        llm.generate(["Hi", "there"], GREEDY, lora=[None, "nope"])
    assert not llm.engine.has_unfinished()
