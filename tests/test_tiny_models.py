"""Tiny models: transformers/PEFT load them unchanged, AWQ files hold the fp16 weights,
builds are byte-deterministic, adapters are real and match a merged-weights reference."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubdeploy.serving.config import ModelConfig
from hubdeploy.serving.tiny import GROUP_SIZE, adapter_dir, dequantize_awq_dir, make_tiny
from tests.helpers_forward import merged_reference

ARCHS = ["mixtral", "qwen3_moe", "llama"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py


PROMPTS = ["Hello, the experts", "Tell me a story about a robot", "The sea is wide and"]


# ---------------------------------------------------------------- independent AWQ reader
def _ref_unpack(packed: torch.Tensor) -> torch.Tensor:
    """From the format description only: nibble i of int32 column c holds output column
    8c + [0,2,4,6,1,3,5,7][i]. Written here on purpose instead of importing awq_format."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows, cols = words.shape
    out = torch.empty(rows, cols * 8, dtype=torch.int64)
    for i in range(8):
        out[:, order[i]::8] = (words >> (4 * i)) & 0xF
    return out


def _ref_dequant(qweight, qzeros, scales, group):
    q = _ref_unpack(qweight).double()
    z = _ref_unpack(qzeros).double().repeat_interleave(group, dim=0)
    s = scales.double().repeat_interleave(group, dim=0)
    return ((q - z) * s).t()  # [out, in] like nn.Linear.weight


def _load(model_dir: Path, dtype=torch.float16):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers reported loading problems for {model_dir}: {bad}"
    return model.eval()


def _greedy_distinct(model, tok, prompts: list[str] = PROMPTS) -> list[int]:
    counts = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        counts.append(len(set(out[0, ids.shape[1]:].tolist())))
    return counts


# ---------------------------------------------------------------- fp16 models
@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_model_loads_in_transformers_and_generates(tiny_models, arch: str) -> None:
    from transformers import AutoTokenizer

    d = tiny_models(arch, "none")
    names = sorted(p.name for p in d.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and "quantization_config" not in cfg
    mc = ModelConfig.from_dict(cfg)
    assert mc.family == arch and mc.num_hidden_layers == 2 and mc.head_dim == 16
    assert (mc.num_attention_heads, mc.num_key_value_heads, mc.hidden_size) == (4, 2, 64)
    if arch == "mixtral":
        assert (mc.num_experts, mc.num_experts_per_tok, cfg["sliding_window"]) == (4, 2, None)
    if arch == "qwen3_moe":
        assert (mc.num_experts, mc.num_experts_per_tok, mc.qk_norm, mc.norm_topk_prob) == (8, 4, True, True)
        assert cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []

    tok = AutoTokenizer.from_pretrained(d)
    assert cfg["vocab_size"] % 64 == 0 and len(tok) <= cfg["vocab_size"]
    assert tok.eos_token_id == cfg["eos_token_id"]
    text = "Hello, the experts route every token."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text

    model = _load(d)
    assert model.dtype == torch.float16
    sd = load_file(str(d / "model.safetensors"))
    # The Hub per-expert layout really reached the (fused) modules, not a random init.
    if arch == "mixtral":
        e = model.model.layers[1].mlp.experts
        assert torch.equal(e.gate_up_proj[3][:128], sd["model.layers.1.block_sparse_moe.experts.3.w1.weight"])
        assert torch.equal(e.gate_up_proj[3][128:], sd["model.layers.1.block_sparse_moe.experts.3.w3.weight"])
        assert torch.equal(e.down_proj[3], sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"])
    elif arch == "qwen3_moe":
        e = model.model.layers[1].mlp.experts
        assert torch.equal(e.gate_up_proj[7][:64], sd["model.layers.1.mlp.experts.7.gate_proj.weight"])
        assert torch.equal(e.down_proj[7], sd["model.layers.1.mlp.experts.7.down_proj.weight"])
    counts = _greedy_distinct(model, tok)
    assert sum(c >= 8 for c in counts) >= 2, f"greedy output collapsed: distinct tokens per prompt {counts}"


# ---------------------------------------------------------------- AWQ models
@pytest.mark.parametrize("arch", ARCHS)
def test_awq_files_match_fp16_weights_within_one_step(tiny_models, arch: str) -> None:
    d = tiny_models(arch, "awq")
    fp = load_file(str(tiny_models(arch, "none") / "model.safetensors"))
    q = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": ["gate"],
    }
    assert ModelConfig.from_dict(cfg).quant.is_awq
    quantized = sorted(k[: -len(".qweight")] for k in q if k.endswith(".qweight"))
    fp_linears = sorted(k[: -len(".weight")] for k in fp if k.endswith("_proj.weight") or k.endswith((".w1.weight", ".w2.weight", ".w3.weight")))
    assert quantized == fp_linears and len(quantized) > 0
    for name in quantized:
        qw, qz, s = q[f"{name}.qweight"], q[f"{name}.qzeros"], q[f"{name}.scales"]
        w = fp[f"{name}.weight"].double()  # [out, in]
        out_f, in_f = w.shape
        assert qw.dtype == torch.int32 and qw.shape == (in_f, out_f // 8), name
        assert qz.dtype == torch.int32 and qz.shape == (in_f // GROUP_SIZE, out_f // 8), name
        assert s.dtype == torch.float16 and s.shape == (in_f // GROUP_SIZE, out_f), name
        assert int(_ref_unpack(qz).max()) <= 15
        deq = _ref_dequant(qw, qz, s, GROUP_SIZE)
        step = s.double().repeat_interleave(GROUP_SIZE, dim=0).t()
        err = (deq - w).abs()
        assert bool((err <= step + 1e-6).all()), f"{name}: max error {float((err / step).max()):.2f} steps"
    # Router gate, norms, embeddings and lm_head stay fp16 and equal to the fp16 build.
    rest = [k for k in q if not k.endswith((".qweight", ".qzeros", ".scales"))]
    for k in rest:
        assert q[k].dtype == torch.float16 and torch.equal(q[k], fp[k]), k
    gates = [k for k in rest if k.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight"))]
    assert len(gates) == (0 if arch == "llama" else 2)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(rest)


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_dequantized_copy_loads_and_generates(tiny_models, tmp_path, arch: str) -> None:
    from transformers import AutoTokenizer

    d = tiny_models(arch, "awq")
    deq_dir = dequantize_awq_dir(d, tmp_path / f"{arch}-deq")
    assert "quantization_config" not in json.loads((deq_dir / "config.json").read_text())
    model = _load(deq_dir)
    tok = AutoTokenizer.from_pretrained(deq_dir)
    counts = _greedy_distinct(model, tok, PROMPTS[:1])
    assert counts[0] >= 8, counts
    # The 4-bit model stays close to the fp16 one it was quantized from (same seed).
    ref = _load(tiny_models(arch, "none"), dtype=torch.float32)
    model = model.float()
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert float(cos) > 0.9, float(cos)


# ---------------------------------------------------------------- determinism
def _all_bytes(root: Path, adapters: int) -> dict[str, bytes]:
    files = {f"model/{p.name}": p.read_bytes() for p in root.iterdir()}
    for i in range(adapters):
        for p in adapter_dir(root, i).iterdir():
            files[f"lora{i}/{p.name}"] = p.read_bytes()
    return files


@pytest.mark.parametrize("arch,quant", [("mixtral", "awq"), ("qwen3_moe", "awq"), ("llama", "none")])
def test_same_seed_byte_identical_different_seed_differs(tmp_path, arch: str, quant: str) -> None:
    a = make_tiny(tmp_path / "a" / "m", arch=arch, quant=quant, adapters=3, seed=7)
    b = make_tiny(tmp_path / "b" / "m", arch=arch, quant=quant, adapters=3, seed=7)
    c = make_tiny(tmp_path / "c" / "m", arch=arch, quant=quant, adapters=3, seed=8)
    fa, fb, fc = _all_bytes(a, 3), _all_bytes(b, 3), _all_bytes(c, 3)
    assert fa.keys() == fb.keys() and len(fa) == 7 + 3 * 3
    for k in fa:
        assert fa[k] == fb[k], f"{k} differs between two builds with the same seed"
    assert fa["model/model.safetensors"] != fc["model/model.safetensors"]
    assert fa["lora2/adapter_model.safetensors"] != fc["lora2/adapter_model.safetensors"]
    assert fa["model/tokenizer.json"] == fc["model/tokenizer.json"]  # the tokenizer does not depend on the seed


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_load_in_peft_and_match_merged_reference(tiny_models, tmp_path, arch: str) -> None:
    from peft import PeftModel

    base_dir = tiny_models(arch, "none", adapters=3)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    expected_targets = {
        0: ["q_proj", "v_proj"],
        1: ["k_proj", "o_proj", "q_proj", "v_proj"] + (["down_proj", "gate_proj", "up_proj"] if arch == "llama" else []),
        2: sorted((["w1", "w2", "w3"] if arch == "mixtral" else ["down_proj", "gate_proj", "up_proj"]) + ["q_proj"]),
    }
    for i in range(3):
        ad = adapter_dir(base_dir, i)
        assert ad == base_dir.parent / f"{base_dir.name}-lora-{i}"
        cfg = json.loads((ad / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
        assert cfg["r"] == (4, 8, 16)[i] and cfg["base_model_name_or_path"] == base_dir.name
        assert sorted(cfg["target_modules"]) == sorted(expected_targets[i])
        lora = load_file(str(ad / "adapter_model.safetensors"))
        assert all(float(t.abs().max()) > 0 for t in lora.values())  # B is not zero
        if i == 2 and arch == "mixtral":
            assert "base_model.model.model.layers.0.block_sparse_moe.experts.3.w2.lora_B.weight" in lora

        base = _load(base_dir, dtype=torch.float32)
        with torch.no_grad():
            ref_base = base(ids).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(base, ad)
        missing = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        assert not missing, missing
        with torch.no_grad():
            out = peft_model(ids).logits
        merged = _load(merged_reference(base_dir, ad, tmp_path / f"merged{i}"), dtype=torch.float32)
        with torch.no_grad():
            ref = merged(ids).logits
        assert float((out - ref_base).abs().max()) > 0.5, f"adapter {i} has no visible effect"
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- card, CLI, errors
def test_model_card_front_matter(tiny_models) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny_models("mixtral", "awq", adapters=1) / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["base_model"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert {"mixtral", "awq", "moe"} <= set(data["tags"])
    plain = ModelCard.load(tiny_models("llama", "none") / "README.md").data.to_dict()
    assert "awq" not in plain["tags"] and "llama" in plain["tags"]


def test_cli_make_tiny_in_a_fresh_process_is_byte_identical(tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "cli-model"
    proc = subprocess.run(
        [sys.executable, "-m", "hubdeploy", "make-tiny", str(out), "--arch", "mixtral", "--quant", "awq",
         "--adapters", "1", "--seed", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in proc.stdout and "cli-model-lora-0" in proc.stdout
    ref = make_tiny(tmp_path / "x" / "cli-model", arch="mixtral", quant="awq", adapters=1, seed=3)
    assert _all_bytes(out, 1) == _all_bytes(ref, 1)  # another process (hash seed, threads): same bytes


def test_bad_arguments_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ValueError, match="choose one of mixtral, qwen3_moe, llama"):
        make_tiny(tmp_path / "m", arch="gpt2")
    with pytest.raises(ValueError, match="choose one of awq, none"):
        make_tiny(tmp_path / "m", quant="gptq")
