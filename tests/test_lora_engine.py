"""Multi-LoRA through the engine (`LLM`) on the tiny models, CPU float32 compute on the fp16
checkpoints.

Reference: `transformers` on a copy of the base checkpoint with the adapter merged in
float64 (W + scaling · B @ A; PEFT's `merge_and_unload` math, and what
tests/test_tiny_models.py shows PEFT itself matches). Greedy tokens must be equal and the
chosen tokens' log-probabilities within LOGPROB_ATOL.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hubdeploy.serving import LLM, SamplingParams
from hubdeploy.serving.tiny import adapter_dir, dequantize_awq_dir
from tests.helpers_forward import merged_reference, peft_greedy_logprobs

ARCHS = ("mixtral", "qwen3_moe", "llama")
NEW = 10
LOGPROB_ATOL = 1e-3  # fp32 engine vs fp32 transformers on the same merged weights
# AWQ: the engine's dequantization rounds (q - z) * s in fp16 differently from the fp16
# reference copy; the base model alone (no adapter) shows the same size of difference.
LOGPROB_ATOL_AWQ = 5e-3
PROMPTS = [[1, 50, 60, 70, 80, 90, 100, 110], [1, 5, 300, 7, 9], [1, 222, 17, 404, 31, 8, 99, 250, 12, 61, 7]]
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py


# ---------------------------------------------------------------- the reference
def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[float]]]:
    """transformers greedy tokens and their log-probs, one prompt at a time (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            toks = g.sequences[0, len(p):].tolist()
            # scores are post-processing; recompute raw log-probs with one forward over the sequence
            logits = model(g.sequences).logits[0, len(p) - 1:-1].float()
            lps = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0].tolist()
            out.append((toks, lps))
    return out


_REF_CACHE: dict[tuple[str, str, int | None], list] = {}


def reference(tiny_models, tmp_root: Path, arch: str, quant: str, i: int | None) -> list:
    key = (arch, quant, i)
    if key not in _REF_CACHE:
        base = tiny_models(arch, quant, adapters=3)
        src = base
        if quant == "awq":
            src = tmp_root / f"{arch}-awq-deq"
            if not (src / "model.safetensors").is_file():
                dequantize_awq_dir(base, src)
        d = src if i is None else merged_reference(src, adapter_dir(base, i), tmp_root / f"{arch}-{quant}-m{i}")
        _REF_CACHE[key] = hf_greedy(d, PROMPTS, NEW)
    return _REF_CACHE[key]


def make_llm(model_dir: Path, **kw) -> LLM:
    opts = dict(device="cpu", dtype="float32", max_model_len=128, kv_cache_tokens=2048, max_num_batched_tokens=256,
                lora_modules={f"a{i}": str(adapter_dir(model_dir, i)) for i in range(3)}, max_loras=3)
    opts.update(kw)
    return LLM(str(model_dir), **opts)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora_ref")


_LLMS: dict[str, LLM] = {}


@pytest.fixture
def llm_for(tiny_models):
    def get(arch: str) -> LLM:
        if arch not in _LLMS:
            _LLMS.clear()  # one engine alive at a time
            _LLMS[arch] = make_llm(tiny_models(arch, "none", adapters=3))
        return _LLMS[arch]

    return get


def _check(outs, refs, what: str, atol: float = LOGPROB_ATOL) -> None:
    for o, (toks, lps) in zip(outs, refs):
        assert o.token_ids == toks, f"{what}: engine {o.token_ids} != transformers+merged {toks}"
        got = [lp.logprob for lp in o.logprobs]
        diff = max(abs(a - b) for a, b in zip(got, lps))
        assert diff <= atol, f"{what}: log-probs differ by {diff:.2e}"


# ---------------------------------------------------------------- correctness per adapter
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("i", [0, 1, 2])
def test_adapter_matches_transformers_with_merged_adapter(arch: str, i: int, llm_for, tiny_models, tmp_root) -> None:
    llm = llm_for(arch)
    outs = llm.generate(PROMPTS, GREEDY, lora=f"a{i}")
    _check(outs, reference(tiny_models, tmp_root, arch, "none", i), f"{arch} adapter {i}")
    base = llm.generate(PROMPTS, GREEDY)
    assert any(o.token_ids != b.token_ids for o, b in zip(outs, base)), "the adapter changed nothing"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_one_batch_mixing_base_and_three_adapters(arch: str, llm_for) -> None:
    llm = llm_for(arch)
    loras = [None, "a0", "a1", "a2"]
    alone = {lo: llm.generate(PROMPTS, GREEDY, lora=lo) for lo in loras}
    prompts = [p for p in PROMPTS for _ in loras]
    names = [lo for _ in PROMPTS for lo in loras]
    steps0 = llm.engine.stats().steps_total
    mixed = llm.generate(prompts, GREEDY, lora=names)
    assert llm.engine.stats().steps_total - steps0 <= NEW + 1, "the requests did not run in one batch"
    for k, (p, lo) in enumerate(zip(prompts, names)):
        want = alone[lo][PROMPTS.index(p)]
        assert mixed[k].token_ids == want.token_ids, f"prompt {PROMPTS.index(p)} with {lo}"


def test_max_loras_1_swaps_and_every_request_finishes_correctly(tiny_models) -> None:
    d = tiny_models("mixtral", "none", adapters=3)
    ref = make_llm(d)
    loras = ["a0", "a1", "a2", None, "a2", "a0"]
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(len(loras))]
    want = [ref.generate([p], GREEDY, lora=lo)[0].token_ids for p, lo in zip(prompts, loras)]
    del ref
    one = make_llm(d, max_loras=1, max_cpu_loras=1)
    got = one.generate(prompts, GREEDY, lora=loras)
    assert [o.token_ids for o in got] == want
    assert all(o.finish_reason == "length" for o in got)
    stats = one.engine.stats()
    assert stats.lora_swaps_total >= 3 and stats.lora_resident == 1 and stats.lora_registered == 3
    assert not one.engine.has_unfinished()


def test_preemption_with_adapters_and_one_slot(llm_for, tiny_models) -> None:
    """A KV cache for ~2 sequences and one device slot: preempted sequences give up their
    pin, come back and still produce their alone-outputs; nothing stays pinned at the end."""
    ref = llm_for("mixtral")
    loras = ["a0", "a0", None, "a0", "a2", None, "a2", "a1"]
    prompts = [(PROMPTS[k % 3] * 3)[:28] for k in range(len(loras))]
    want = [ref.generate([p], GREEDY, lora=lo)[0].token_ids for p, lo in zip(prompts, loras)]
    small = make_llm(tiny_models("mixtral", "none", adapters=3), max_model_len=64, kv_cache_tokens=96,
                     max_loras=1)
    got = small.generate(prompts, GREEDY, lora=loras)
    s = small.engine.stats()
    assert [o.token_ids for o in got] == want
    assert s.preemptions_total > 0 and s.lora_swaps_total >= 3
    mgr = small.engine.lora_manager
    assert not mgr._pins and not any(mgr._users.values())


def test_awq_base_with_adapters_matches_dequantized_merged(tiny_models, tmp_root) -> None:
    d = tiny_models("mixtral", "awq", adapters=3)
    llm = make_llm(d)
    for i in (None, 1, 2):
        _check(llm.generate(PROMPTS, GREEDY, lora=None if i is None else f"a{i}"),
               reference(tiny_models, tmp_root, "mixtral", "awq", i), f"awq mixtral adapter {i}", LOGPROB_ATOL_AWQ)


def test_unload_then_reuse_name_never_reuses_cached_kv(llm_for) -> None:
    """Prefix-cache blocks are keyed by adapter name: an adapter unloaded and another loaded
    under the same name must not see the old K/V."""
    llm = llm_for("mixtral")
    mgr = llm.engine.lora_manager
    long_prompt = [PROMPTS[2] * 4]  # several full KV blocks
    first = llm.generate(long_prompt, GREEDY, lora="a0")[0].token_ids
    want_a1 = llm.generate(long_prompt, GREEDY, lora="a1")[0].token_ids
    mgr.unregister("a0")
    with pytest.raises(ValueError, match="LoRA adapter 'a0' is not loaded"):
        llm.generate(long_prompt, GREEDY, lora="a0")
    mgr.register("a0", mgr.sources["a1"])
    try:
        assert llm.generate(long_prompt, GREEDY, lora="a0")[0].token_ids == want_a1 != first
    finally:
        mgr.unregister("a0")
        mgr.register("a0", str(adapter_dir(Path(llm.engine.model_dir), 0)))


def test_no_lora_work_without_adapters_in_the_step(llm_for, monkeypatch) -> None:
    llm = llm_for("llama")
    calls = []
    mgr = llm.engine.lora_manager
    orig = mgr.build_batch
    monkeypatch.setattr(mgr, "build_batch", lambda chunks: calls.append(r := orig(chunks)) or r)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3, temperature=0.0))
    assert calls and all(c is None for c in calls)  # ctx.lora None: no hook runs


def test_whole_model_with_adapters_through_triton_interpreter(tiny_models) -> None:
    """AWQ Mixtral + an expert adapter and an attention adapter in one batch, every kernel on
    its Triton path (interpreter, child process) vs the torch path: same greedy tokens."""
    import os
    import subprocess
    import sys

    d = tiny_models("mixtral", "awq", adapters=3)
    want = _mixed_tokens(str(d))
    env = dict(os.environ, TRITON_INTERPRET="1", HUBDEPLOY_FORCE_TRITON="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.test_lora_engine", str(d)], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    assert json.loads(lines[-1]) == want


def _mixed_tokens(model_dir: str) -> list[list[int]]:
    llm = make_llm(Path(model_dir), max_model_len=64, kv_cache_tokens=256)
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS[:2] + PROMPTS[:1], sp, lora=["a2", "a0", None])]


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    print(json.dumps(_mixed_tokens(sys.argv[1])))


# ---------------------------------------------------------------- PEFT config semantics vs PEFT itself
PEFT_VARIANTS = {
    # layers_to_transform picks layer 1 only; per-module ranks and alphas; rsLoRA scaling;
    # fan_in_fan_out on nn.Linear (PEFT turns it off with a warning: same math)
    "layers_rank_alpha_rslora_fifo": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], layers_to_transform=[1],
        rank_pattern={"v_proj": 2, "down_proj": 4}, alpha_pattern={"q_proj": 3, r"layers\.1\.mlp\.gate_proj": 40},
        use_rslora=True, fan_in_fan_out=True),
    # target_modules as one regex over the full module name
    "regex_targets": dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.0\.(self_attn\.(k|o)_proj|mlp\.up_proj)"),
}


@pytest.mark.parametrize("variant", sorted(PEFT_VARIANTS))
def test_peft_config_variants_match_peft_itself(variant: str, tiny_models, tmp_path) -> None:
    """Adapters written by PEFT's own `save_pretrained` with the config features above: the
    engine's greedy tokens and log-probs equal `PeftModel` (unmerged) on the same base."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_models("llama", "none")
    opts = dict(PEFT_VARIANTS[variant])
    fifo = opts.pop("fan_in_fan_out", False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **opts))
    with torch.no_grad():  # PEFT's non-zero init is small; make the effect plain
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.mul_(4.0)
    ad = tmp_path / variant
    peft_model.save_pretrained(str(ad))
    if fifo:
        cfg = json.loads((ad / "adapter_config.json").read_text())
        cfg["fan_in_fan_out"] = True
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
    del peft_model, model

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = PeftModel.from_pretrained(base, str(ad)).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in ref_model.named_modules() if hasattr(m, "lora_A")}
    refs, changed = peft_greedy_logprobs(ref_model, PROMPTS, NEW)
    assert changed > 0.05, "the adapter changes nothing"

    llm = make_llm(base_dir, lora_modules={"v": str(ad)}, max_loras=1)
    assert set(llm.engine.lora_manager._host_adapter("v").modules) == wrapped  # the same modules as PEFT
    _check(llm.generate(PROMPTS, GREEDY, lora="v"), refs, f"PEFT variant {variant}")
