"""The loader on bad and unusual checkpoints: each bad one gets a clear error naming what is
wrong (file, tensor, expected vs found); each unusual but valid layout (legacy
quant_config.json, gptqmodel's expert naming, shards, dropped lm_head) loads to the very
same model as the plain layout; partly-quantized (`modules_to_not_convert`) and bf16
checkpoints match transformers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hubdeploy.serving.config import ConfigError
from hubdeploy.serving.hub import HubError, resolve_model_dir
from hubdeploy.serving.loader import CheckpointError, load_model
from tests.helpers_forward import (
    awq_quantize_checkpoint,
    dequantized_copy,
    hf_last_logits,
    make_hf_checkpoint,
    prefill_last_logits,
)

PROMPTS = [[5, 17, 3, 99, 42], [11, 12]]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader")
    mix = make_hf_checkpoint("mixtral", root / "mixtral-fp16")
    llama = make_hf_checkpoint("qwen2", root / "qwen2-fp16")
    return {
        "mixtral": mix,
        "mixtral-awq": awq_quantize_checkpoint(mix, root / "mixtral-awq", 32, ["gate"]),
        "qwen2": llama,
    }


def copy_of(src: Path, tmp_path: Path, name: str = "m") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def edit_quant(d: Path, **changes) -> None:
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    q.update(changes)
    edit_config(d, quantization_config=q)


def rewrite_tensors(d: Path, fn) -> None:
    """fn(dict) -> dict over the single model.safetensors."""
    path = d / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), str(path), metadata={"format": "pt"})


def logits(model_dir: Path) -> torch.Tensor:
    model, _ = load_model(model_dir)
    return prefill_last_logits(model, PROMPTS)


# ----------------------------------------------------------------------------- config errors


# Each bad config: (checkpoint, how it is edited, the changes, what the ConfigError must say).
BAD_CONFIGS = {
    "unsupported_architecture_lists_supported": (
        "qwen2", edit_config, dict(architectures=["GPT2LMHeadModel"]),
        r"GPT2LMHeadModel is not supported.*MixtralForCausalLM.*Qwen3ForCausalLM"),
    "trust_remote_code_only": (
        "qwen2", edit_config,
        dict(architectures=["MyFancyForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling.MyFancy"}),
        r"trust_remote_code"),
    "awq_bits_other_than_4": ("mixtral-awq", edit_quant, dict(bits=8), r"config\.json.*bits=8.*only 4-bit"),
    "group_size_not_dividing_in_features": (  # a multiple of 8 that does not divide hidden 64
        "mixtral-awq", edit_quant, dict(group_size=48),
        r"group_size 48 does not divide in_features 64 of model\.layers\.0\.self_attn\.q_proj"),
    "group_size_not_multiple_of_8": (
        "mixtral-awq", edit_quant, dict(group_size=12), r"group_size 12 is not supported.*multiple of 8"),
    "compressed_tensors_not_w4a16_names_the_field": (  # tests/test_compressed_tensors.py has the rest
        "qwen2", edit_config, dict(quantization_config={
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"format": "pack-quantized", "weights": {"num_bits": 4}}},
        }),
        r"config\.json: compressed-tensors quantization_config\.config_groups\.group_0\.weights\.strategy = None"),
    "gptq_not_supported": (
        "qwen2", edit_config,
        dict(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}),
        r"method 'gptq' is not supported.*AWQ"),
    "awq_gemv_not_supported": ("mixtral-awq", edit_quant, dict(version="gemv"), r"version 'gemv' is not supported"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_named(case: str, base, tmp_path: Path) -> None:
    src, edit, changes, match = BAD_CONFIGS[case]
    d = copy_of(base[src], tmp_path)
    edit(d, **changes)
    with pytest.raises(ConfigError, match=match):
        load_model(d)


# ----------------------------------------------------------------------------- tensor errors


def test_missing_tensor(base, tmp_path: Path) -> None:
    d = copy_of(base["mixtral-awq"], tmp_path)
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.scales"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.safetensors.*model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.scales"):
        load_model(d)


def test_unexpected_tensor(base, tmp_path: Path) -> None:
    d = copy_of(base["qwen2"], tmp_path)
    rewrite_tensors(d, lambda t: {**t, "model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra_proj\.weight.*model\.safetensors"):
        load_model(d)


def test_shape_mismatch_names_expected_and_found(base, tmp_path: Path) -> None:
    d = copy_of(base["qwen2"], tmp_path)
    rewrite_tensors(d, lambda t: {**t, "model.layers.1.self_attn.k_proj.bias": torch.zeros(30, dtype=torch.float16)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.k_proj\.bias has shape \[30\], expected \[32\]"):
        load_model(d)


def test_awq_tensors_without_quant_config(base, tmp_path: Path) -> None:
    d = copy_of(base["mixtral-awq"], tmp_path)
    edit_config(d, quantization_config=None)
    with pytest.raises(CheckpointError, match=r"qweight is AWQ-packed but config\.json has no AWQ quantization_config"):
        load_model(d)


def test_awq_config_without_awq_tensors(base, tmp_path: Path) -> None:
    d = copy_of(base["qwen2"], tmp_path)
    edit_config(d, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})
    with pytest.raises(CheckpointError, match=r"config\.json declares AWQ but no tensor in model\.safetensors is AWQ-packed"):
        load_model(d)


def test_corrupt_safetensors_header(base, tmp_path: Path) -> None:
    d = copy_of(base["qwen2"], tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or unreadable safetensors header"):
        load_model(d)


def test_no_safetensors(base, tmp_path: Path) -> None:
    d = copy_of(base["qwen2"], tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*pytorch_model\.bin.*convert to safetensors"):
        load_model(d)


def test_missing_shard(base, tmp_path: Path) -> None:
    d = copy_of(base["qwen2"], tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing: model-00002-of-00002\.safetensors"):
        load_model(d)


# ----------------------------------------------------------------------------- valid variants


def test_legacy_quant_config_json(base, tmp_path: Path) -> None:
    d = copy_of(base["mixtral-awq"], tmp_path)
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    edit_config(d, quantization_config=None)
    (d / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": q["group_size"], "w_bit": 4, "version": "GEMM"}))
    model, cfg = load_model(d)
    assert cfg.quant.source == "quant_config.json" and cfg.quant.is_awq
    assert torch.equal(prefill_last_logits(model, PROMPTS), logits(base["mixtral-awq"]))


def test_gptqmodel_expert_naming(base, tmp_path: Path) -> None:
    """`mlp.experts.N.gate_proj|up_proj|down_proj` + `mlp.gate` loads to the same Mixtral."""
    d = copy_of(base["mixtral-awq"], tmp_path)
    names = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}

    def rename(t: dict) -> dict:
        out = {}
        for k, v in t.items():
            k = k.replace(".block_sparse_moe.", ".mlp.")
            for a, b in names.items():
                k = k.replace(a, b)
            out[k] = v
        return out

    rewrite_tensors(d, rename)
    # gptqmodel's AWQ config: method/format/checkpoint_format beside quant_method
    q = {"quant_method": "awq", "method": "awq", "format": "gemm", "checkpoint_format": "gemm",
         "bits": 4, "group_size": 32, "desc_act": False, "sym": False, "pack_dtype": "int32"}
    edit_config(d, quantization_config=q)
    (d / "quantize_config.json").write_text(json.dumps(q))
    model, _ = load_model(d)
    assert "model.layers.0.mlp.experts.3.up_proj" in model.lora_targets()
    assert torch.equal(prefill_last_logits(model, PROMPTS), logits(base["mixtral-awq"]))


def test_sharded_checkpoint(base, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base["qwen2"], dtype=torch.float16)
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    assert torch.equal(logits(d), logits(base["qwen2"]))


def test_modules_to_not_convert_stay_plain_and_match_transformers(base, tmp_path: Path) -> None:
    """AWQ checkpoints with whole modules left in fp16 (`modules_to_not_convert`): those load as
    plain linears / experts, the rest as AWQ, and logits match transformers on the dequantized
    weights (float32, 1e-4 as in tests/test_models.py)."""
    transformers = pytest.importorskip("transformers")
    keep = ["gate", "model.layers.1.self_attn", "model.layers.0.block_sparse_moe.experts"]
    d = awq_quantize_checkpoint(base["mixtral"], tmp_path / "partial", 32, keep)
    cfg_q = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg_q["modules_to_not_convert"] == keep
    model, cfg = load_model(d)
    assert cfg.quant.is_awq
    l0, l1 = model.layers
    assert l0.self_attn.qkv_proj.quantized and not l1.self_attn.qkv_proj.quantized
    assert not l0.mlp.quantized and l1.mlp.quantized
    hf = transformers.AutoModelForCausalLM.from_pretrained(dequantized_copy(d, tmp_path / "deq"),
                                                           dtype=torch.float32).eval()
    diff = (prefill_last_logits(model, PROMPTS) - hf_last_logits(hf, PROMPTS)).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff:.2e}"


def test_bf16_checkpoint(base, tmp_path: Path) -> None:
    """A checkpoint saved in bfloat16 (config torch_dtype bfloat16): float32 compute matches
    transformers on the same bf16 weights (1e-4); dtype="auto" computes in bf16 and lands within
    4e-2 (a few bf16 ulps at logits ~2) of transformers' own bf16 forward, and no further from
    float32 than transformers' bf16 is (plus 1e-2)."""
    transformers = pytest.importorskip("transformers")
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(base["mixtral"], dtype=torch.bfloat16)
    d = tmp_path / "bf16"
    hf16.save_pretrained(d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    model, cfg = load_model(d)
    assert model.dtype == torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = hf_last_logits(hf, PROMPTS)
    ours = prefill_last_logits(model, PROMPTS)
    assert (ours - ref).abs().max().item() <= 1e-4
    model_bf16, _ = load_model(d, dtype="auto")
    assert model_bf16.embed_tokens.weight.dtype == torch.bfloat16
    ours_bf16 = prefill_last_logits(model_bf16, PROMPTS)
    hf_bf16 = hf_last_logits(transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval(), PROMPTS)
    assert (ours_bf16 - hf_bf16).abs().max().item() <= 4e-2
    assert (ours_bf16 - ref).abs().max().item() <= 1.5 * (hf_bf16 - ref).abs().max().item() + 1e-2


def test_lm_head_absent_means_tied(base, tmp_path: Path) -> None:
    """Some exports drop lm_head.weight of tied models without saying so in config.json."""
    d = copy_of(base["qwen2"], tmp_path)
    rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    model, cfg = load_model(d)
    assert model.lm_head is None and cfg.tie_word_embeddings
    ids = PROMPTS[0]
    h = model(torch.tensor(ids), torch.arange(len(ids)), _ctx_for(model, ids))
    assert torch.equal(model.compute_logits(h[-1:]), (h[-1:] @ model.embed_tokens.weight.T).float())


def _ctx_for(model, ids):
    from tests.helpers_forward import PagedCache

    return PagedCache(model.cfg, 1, len(ids)).context([0], [0], [len(ids)])


def test_dtype_choices(base) -> None:
    """CPU default is float32; fp16/bf16 compute stays close to it (AWQ Mixtral, logits O(1))."""
    ref = logits(base["mixtral-awq"])
    for dtype, tol in (("float16", 5e-3), ("bfloat16", 5e-2)):
        model, _ = load_model(base["mixtral-awq"], dtype=dtype)
        assert model.embed_tokens.weight.dtype == getattr(torch, dtype)
        out = prefill_last_logits(model, PROMPTS)
        assert out.dtype == torch.float32
        assert (out - ref).abs().max().item() <= tol, dtype
    with pytest.raises(ConfigError, match=r"dtype 'int8' is not supported"):
        load_model(base["qwen2"], dtype="int8")


# ----------------------------------------------------------------------------- hub resolution


def test_resolve_local_dir_as_is(base) -> None:
    assert resolve_model_dir(str(base["qwen2"])) == base["qwen2"]


def test_resolve_bad_references(tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"neither an existing local directory nor a Hub repo id"):
        resolve_model_dir(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(HubError, match=r"revision .* applies to Hub repos only"):
        resolve_model_dir(str(tmp_path), revision="main")


def test_resolve_from_local_hub(hub_tiny_model, local_hub, tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id is downloaded from the (local) Hub and loads; bad ids/revisions/gates say why."""
    repo = hub_tiny_model("llama", "none")
    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    d = resolve_model_dir(repo)
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    model, cfg = load_model(d)
    assert cfg.architecture == "LlamaForCausalLM"
    with pytest.raises(HubError, match=r"repo nobody/nothing-here not found"):
        resolve_model_dir("nobody/nothing-here")
    with pytest.raises(HubError, match=r"has no revision 'no-such-branch'"):
        resolve_model_dir(repo, revision="no-such-branch")
    gated = "gatedtest/llama-none"
    if gated not in local_hub.repo_ids():
        local_hub.add_repo(gated, tiny_models("llama", "none"), gated=True)
    with pytest.raises(HubError, match=r"is gated: accept its terms"):
        resolve_model_dir(gated)
    local_hub.grant("hf_loader_test_token", gated)
    assert (resolve_model_dir(gated, token="hf_loader_test_token") / "model.safetensors").is_file()
