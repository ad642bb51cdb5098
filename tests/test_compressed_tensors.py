"""llm-compressor's W4A16 checkpoints (compressed-tensors `pack-quantized`) served exactly.

Checkpoints here are written by the `compressed-tensors` library's own compressor
(`tests/helpers_ct.py`: its minmax qparams, `PackedQuantizationCompressor.compress`, its
config) from random tiny transformers models; references are transformers (float32) on the
weights the library's own unpacker dequantizes. For Mixtral under all three expert namings,
Qwen3-MoE and Llama, group sizes 32/64/128, symmetric and asymmetric: last-position logits
within 1e-4 (float32 both sides, logits O(1)) and 16 greedy tokens identical. The repack
alone is bit-exact against the library's dequantization; `ignore` is honoured; what is not
W4A16 is refused naming the field, by the engine and by the deploy-side report alike; the
whole engine (`LLM`) serves one; the report sizes them from their headers (also a shape-only
full-size Mixtral-8x7B against its AWQ twin). Slow: the Triton path under the interpreter,
and checkpoints made by llm-compressor itself in its own venv
(`scripts/setup_llmcompressor_venv.sh`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from hubdeploy.kernels.compressed_tensors import ct_repack
from hubdeploy.serving.config import ConfigError
from hubdeploy.serving.loader import CheckpointError, load_model
from hubdeploy.serving.models.layers import Linear, MoE
from tests.helpers_forward import (
    greedy_generate,
    hf_greedy,
    hf_last_logits,
    make_hf_checkpoint,
    prefill_last_logits,
    run_under_triton_interpreter,
)

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from tests.helpers_ct import ct_dequantized_copy, ct_quantize_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLMC_PY = Path(os.environ.get("LLMCOMPRESSOR_VENV", REPO / ".venv-llmcompressor")) / "bin" / "python"
LOGIT_ATOL = 1e-4
PROMPTS = [[5, 17, 3, 99, 42, 7, 8, 1, 60, 33, 2], [11, 12], [100, 3, 50, 21, 90, 14]]
GEN_TOKENS = 16
# Llama wide enough for groups of 64 and 128 (hidden 128, intermediate 256)
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory):
    """(arch, naming, group, symmetric, keep) -> (compressed-tensors dir, fp32 reference dir), built once."""
    root = tmp_path_factory.mktemp("ct")
    cache: dict[tuple, tuple[Path, Path]] = {}

    def base(arch: str) -> Path:
        d = root / f"{arch}-fp16"
        if not d.exists():
            if arch == "llama_wide":
                make_hf_checkpoint("llama", d, **WIDE)
            else:
                make_hf_checkpoint(arch, d)
        return d

    def get(arch: str, naming: str = "w", group: int = 32, symmetric: bool = True,
            keep: tuple[str, ...] = ()) -> tuple[Path, Path]:
        key = (arch, naming, group, symmetric, keep)
        if key not in cache:
            tag = f"{arch}-{naming}-g{group}-{'sym' if symmetric else 'asym'}-{len(cache)}"
            ct = ct_quantize_checkpoint(base(arch), root / tag, group, symmetric, naming, keep)
            cache[key] = (ct, ct_dequantized_copy(ct, root / (tag + "-ref")))
        return cache[key]

    return get


def _assert_matches_transformers(ours_dir: Path, ref_dir: Path, label: str) -> None:
    model, cfg = load_model(ours_dir)
    assert model.dtype == torch.float32 and cfg.quant is not None and cfg.quant.method == "compressed-tensors"
    quantized = [m for m in model.modules() if isinstance(m, (Linear, MoE)) and m.quantized]
    assert quantized and all((m.packed if isinstance(m, Linear) else m.weights) is not None for m in quantized)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    diff = (prefill_last_logits(model, PROMPTS) - hf_last_logits(hf, PROMPTS)).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{label}: max abs logit diff {diff:.2e}"
    assert greedy_generate(model, PROMPTS, GEN_TOKENS) == hf_greedy(hf, PROMPTS, GEN_TOKENS), label


CASES = {
    # Mixtral under the three expert namings: transformers' w1|w3|w2, llm-compressor's
    # block_sparse_moe.*.gate_proj, gptqmodel's mlp.experts.*.gate_proj (router mlp.gate)
    "mixtral-w-sym": ("mixtral", "w", 32, True),
    "mixtral-mixed-asym": ("mixtral", "mixed", 32, False),
    "mixtral-mlp-sym": ("mixtral", "mlp", 32, True),
    # Qwen3-MoE: q/k norms, a dense MLP layer (mlp_only_layers) beside the MoE one
    "qwen3_moe-sym": ("qwen3_moe", "w", 32, True),
    "qwen3_moe-asym": ("qwen3_moe", "w", 32, False),
    # Llama (tied embeddings, llama3 rope) at group 32, wider Llamas at 64 and 128
    "llama-asym": ("llama", "w", 32, False),
    "llama_wide-g64-sym": ("llama_wide", "w", 64, True),
    "llama_wide-g64-asym": ("llama_wide", "w", 64, False),
    "llama_wide-g128-sym": ("llama_wide", "w", 128, True),
    "llama_wide-g128-asym": ("llama_wide", "w", 128, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_on_library_dequantized_weights(case: str, ckpts) -> None:
    ours, ref = ckpts(*CASES[case])
    _assert_matches_transformers(ours, ref, case)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_repack_is_the_library_dequantization_exactly(symmetric: bool, scale_dtype: torch.dtype) -> None:
    """`ct_repack` -> `AWQPacked.dequantize` equals the library's own unpack + dequantize
    (fp32 scales: exact), bit for bit, with and without zero points."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    out_f, in_f, g = 48, 256, 64
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=g)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = (0.1 * torch.randn(out_f, in_f) + (0.0 if symmetric else 0.05)).to(scale_dtype)
    grouped = w.reshape(out_f, -1, g)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    packed = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp.to(torch.int8)}, scheme)
    assert ("weight_zero_point" in packed) is (not symmetric)
    ref = PackedQuantizationCompressor.decompress({**packed, "weight_scale": packed["weight_scale"].float()},
                                                  scheme)["weight"]
    ours = ct_repack(packed["weight_packed"], packed["weight_scale"], g, packed.get("weight_zero_point"),
                     packed["weight_shape"])
    assert ours.qweight.data_ptr() == packed["weight_packed"].data_ptr()  # used as is: same nibble order
    assert ours.scales.dtype == scale_dtype and (ours.in_features, ours.out_features) == (in_f, out_f)
    assert torch.equal(ours.dequantize(torch.float32), ref)


def test_repack_names_the_disagreeing_tensor() -> None:
    qw = torch.zeros(16, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"weight_shape \[16, 60\] disagrees with weight_packed"):
        ct_repack(qw, torch.ones(16, 2), 32, None, torch.tensor([16, 60]))
    with pytest.raises(ValueError, match=r"weight_scale has shape \(16, 4\).*expected a float \[16, 2\]"):
        ct_repack(qw, torch.ones(16, 4), 32)
    with pytest.raises(ValueError, match=r"weight_zero_point has shape \(16, 2\).*expected int32 \[2, 2\]"):
        ct_repack(qw, torch.ones(16, 2), 32, torch.zeros(16, 2, dtype=torch.int32))


def test_unpacked_zero_points_of_older_releases_load_the_same(ckpts, tmp_path: Path) -> None:
    """compressed-tensors before 0.10 stored asymmetric zero points unpacked (int8 [out, in/g]);
    turned into that form by the library's own unpacker, the same model loads, logits equal."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = ckpts("qwen3_moe", "w", 32, False)[0]
    d = tmp_path / "old"
    shutil.copytree(src, d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in [k for k in tensors if k.endswith(".weight_zero_point")]:
        mod = k[: -len(".weight_zero_point")]
        shape = (int(tensors[mod + ".weight_shape"][0]), tensors[mod + ".weight_scale"].shape[1])
        tensors[k] = unpack_from_int32(tensors[k], 4, torch.Size(shape), packed_dim=0).contiguous()
        assert tensors[k].dtype == torch.int8 and tuple(tensors[k].shape) == shape
    save_file(tensors, str(d / "model.safetensors"))
    assert torch.equal(prefill_last_logits(load_model(d)[0], PROMPTS), prefill_last_logits(load_model(src)[0], PROMPTS))


def test_quantized_router_gate_is_named(ckpts, tmp_path: Path) -> None:
    """A router gate (or lm_head) stored 4-bit: the engine runs those unquantized; the error says so."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path / "gate"
    shutil.copytree(ckpts("mixtral", "w", 32, True)[0], d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gate = "model.layers.1.block_sparse_moe.gate"
    del tensors[gate + ".weight"]
    tensors |= {gate + ".weight_packed": torch.zeros(4, 8, dtype=torch.int32),
                gate + ".weight_scale": torch.ones(4, 2, dtype=torch.float16), gate + ".weight_shape": torch.tensor([4, 64])}
    save_file(tensors, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["ignore"].remove(gate)  # quantized on purpose, as the config now says
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.gate is stored 4-bit \(compressed-tensors\) "
                                              r"but the engine runs it unquantized"):
        load_model(d)


def test_weight_shape_disagreeing_is_named(ckpts, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path / "shape"
    shutil.copytree(ckpts("mixtral", "mixed", 32, False)[0], d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.block_sparse_moe.experts.2.up_proj.weight_shape"] = torch.tensor([32, 60])
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3: "
                                              r"weight_shape \[32, 60\] disagrees with weight_packed"):
        load_model(d)


def test_ignore_is_honoured(ckpts, tmp_path: Path) -> None:
    """Modules in `ignore` (here every o_proj, besides router gates and lm_head) are read
    plain and still match; a module listed in `ignore` but stored packed is an error."""
    ours, ref = ckpts("qwen3_moe", "w", 32, False, ("self_attn.o_proj",))
    ignore = json.loads((ours / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.self_attn.o_proj" in ignore and "model.layers.0.mlp.gate" in ignore
    model, _ = load_model(ours)
    assert not model.layers[0].self_attn.o_proj.quantized and model.layers[0].self_attn.qkv_proj.quantized
    assert not model.layers[0].mlp.gate.quantized
    _assert_matches_transformers(ours, ref, "qwen3_moe ignore o_proj")

    bad = tmp_path / "bad"
    shutil.copytree(ckpts("qwen3_moe", "w", 32, False)[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append("re:.*layers\\.1\\.self_attn\\.q_proj$")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj is listed in "
                                              r"quantization_config\.ignore but stored quantized"):
        load_model(bad)


def test_llm_serves_it_on_the_cpu(tiny_models, tmp_path: Path) -> None:
    """The whole engine (`LLM`: runner, scheduler, paged cache) on a compressed-tensors Mixtral
    (the repo's tiny one, with its tokenizer) gives the tokens of the model-level greedy loop."""
    from hubdeploy import LLM, SamplingParams

    ours = ct_quantize_checkpoint(tiny_models("mixtral", "none"), tmp_path / "ct", 32, False, "mixed")
    model, cfg = load_model(ours)
    prompts = [[t % cfg.vocab_size for t in p] for p in PROMPTS]
    want = greedy_generate(model, prompts, 8)
    llm = LLM(str(ours), device="cpu", dtype="float32", max_model_len=64, kv_cache_tokens=512)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


# ----------------------------------------------------------------------------- refusals


def _edited(src: Path, dst: Path, path: list[str], value) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    node = cfg["quantization_config"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


W = ["config_groups", "group_0", "weights"]
REFUSED = {
    "activation_quantization": (["config_groups", "group_0", "input_activations"],
                                {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
                                r"config_groups\.group_0\.input_activations = .*activation quantization"),
    "8_bit": (W + ["num_bits"], 8, r"config_groups\.group_0\.weights\.num_bits = 8: only 4-bit"),
    "actorder_group": (W + ["actorder"], "group", r"weights\.actorder = 'group': group activation ordering"),
    "sparsity": (["sparsity_config"], {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"},
                 r"quantization_config\.sparsity_config = .*sparse"),
    "float_weights": (W + ["type"], "float", r"weights\.type = 'float': float weights"),
    "channel_strategy": (W + ["strategy"], "channel", r"weights\.strategy = 'channel'"),
    "other_format": (["format"], "naive-quantized", r"quantization_config\.format = 'naive-quantized'"),
    "transforms": (["transform_config"], {"config_groups": {"u": {"type": "hadamard"}}},
                   r"quantization_config\.transform_config = .*rotated"),
    "kv_cache_scheme": (["kv_cache_scheme"], {"num_bits": 8, "type": "float"}, r"kv_cache_scheme = .*KV cache"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_not_w4a16_is_refused_naming_the_field(case: str, ckpts, tmp_path: Path) -> None:
    """The engine refuses (ConfigError, before reading a tensor) and the report's verdict is
    the same sentence."""
    from hubdeploy.hub_integration.report import inspect_model

    path, value, match = REFUSED[case]
    d = _edited(ckpts("mixtral", "w", 32, True)[0], tmp_path / case, path, value)
    with pytest.raises(ConfigError, match=r"config\.json: compressed-tensors " + ".*" + match):
        load_model(d)
    verdict = next(c for c in inspect_model(str(d), with_adapters=False).compat if c.capability == "quantization")
    assert verdict.status == "error" and re.search(match, verdict.reason), verdict.reason


def test_format_neutral_actorder_is_served(ckpts, tmp_path: Path) -> None:
    """actorder 'weight' (alias 'static') only steers GPTQ's calibration: same format, served."""
    src, ref = ckpts("mixtral", "w", 32, True)
    d = _edited(src, tmp_path / "static", W + ["actorder"], "static")
    _assert_matches_transformers(d, ref, "actorder static")


def test_g_idx_tensor_is_refused(ckpts, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path / "gidx"
    shutil.copytree(ckpts("mixtral", "w", 32, True)[0], d)
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.q_proj.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_g_idx reorders the input channels.*actorder 'group'"):
        load_model(d)


# ----------------------------------------------------------------------------- report and plan


def test_report_serves_and_sizes_it_from_headers(ckpts) -> None:
    """Verdict ok; parameters counted per weight (8 per packed int32) equal the fp16 model's;
    the memory plan adds exactly the zero-point words a symmetric checkpoint gets at load."""
    from hubdeploy.hub_integration.memory_plan import plan
    from hubdeploy.hub_integration.report import inspect_model

    for symmetric in (True, False):
        ours, _ = ckpts("mixtral", "w", 32, symmetric)
        report = inspect_model(str(ours), with_adapters=False)
        plain = inspect_model(str(ours.parent / "mixtral-fp16"), with_adapters=False)
        verdict = next(c for c in report.compat if c.capability == "quantization")
        assert verdict.status == "ok", verdict.reason
        assert f"W4A16 {'symmetric' if symmetric else 'asymmetric'}, group 32" in verdict.reason
        q = report.quant
        assert (q.method, q.bits, q.group_size, q.format, q.zero_point) == (
            "compressed-tensors", 4, 32, "pack-quantized", not symmetric)
        w = report.weights
        assert w.param_count == plain.weights.param_count
        assert w.expert_params == plain.weights.expert_params
        model, _ = load_model(ours)
        zeros = sum(m.packed.qzeros.numel() * 4 for m in model.modules() if isinstance(m, Linear) and m.quantized)
        zeros += sum(p.qzeros.numel() * 4 for m in model.modules() if isinstance(m, MoE) and m.quantized
                     for p in (m.weights.w13, m.weights.w2))
        assert w.load_extra_bytes == (zeros if symmetric else 0)
        assert plan(report, "H100").weights_bytes == w.total_bytes + w.load_extra_bytes


def test_full_size_mixtral_w4a16_is_sized_like_its_awq_twin(tmp_path: Path) -> None:
    """Shape-only Mixtral-8x7B (real names, dtypes and shapes; no data): llm-compressor's W4A16
    has the AWQ repo's 46.7 B parameters, and with the zero points it gets at load exactly the
    AWQ repo's bytes but for `weight_shape` (16 bytes per linear); both fit an H100."""
    from hubdeploy.hub_integration.memory_plan import plan
    from hubdeploy.hub_integration.report import inspect_model
    from tests.fixtures.shape_only import mixtral_awq, mixtral_w4a16_ct

    ct = inspect_model(str(mixtral_w4a16_ct(tmp_path / "ct")), with_adapters=False)
    awq = inspect_model(str(mixtral_awq(tmp_path / "awq")), with_adapters=False)
    assert next(c for c in ct.compat if c.capability == "quantization").status == "ok"
    assert ct.weights.param_count == awq.weights.param_count and round(ct.weights.param_count / 1e9, 1) == 46.7
    linears = 32 * (4 + 8 * 3)  # per layer: q, k, v, o and 8 experts x 3
    assert ct.weights.load_extra_bytes > 0
    assert ct.weights.total_bytes + ct.weights.load_extra_bytes == awq.weights.total_bytes + 16 * linears
    assert ct.weights.expert_params == awq.weights.expert_params
    assert plan(ct, "H100").fits and plan(ct, "H100").weights_bytes == ct.weights.total_bytes + ct.weights.load_extra_bytes


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_triton_path_under_interpreter_matches_reference(ckpts) -> None:
    """An asymmetric compressed-tensors Mixtral (llm-compressor's naming) through every Triton
    kernel (interpreter, child process so TRITON_INTERPRET never leaks) vs the torch path."""
    ckpt, _ = ckpts("mixtral", "mixed", 32, False)
    prompts = [p[:5] for p in PROMPTS]
    got = run_under_triton_interpreter(ckpt, prompts, 3)
    model, _ = load_model(ckpt)
    diff = (torch.tensor(got["logits"]) - prefill_last_logits(model, prompts)).abs().max().item()
    assert diff <= 2e-2, f"Triton path logits differ from the reference by {diff:.2e}"
    assert got["tokens"] == greedy_generate(model, prompts, 3)


LLMC_SCRIPT = textwrap.dedent(
    r'''
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    src, out, group, sym = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "sym"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    recipe = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}}},
        ignore=["lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    '''
)

LLMC_CASES = {"mixtral-sym": ("mixtral", 32, "sym"), "qwen3_moe-asym": ("qwen3_moe", 32, "asym"),
              "llama_wide-g128-asym": ("llama_wide", 128, "asym"), "llama_wide-g64-sym": ("llama_wide", 64, "sym")}


@pytest.mark.slow
@pytest.mark.skipif(not LLMC_PY.is_file(), reason=f"llm-compressor venv missing ({LLMC_PY}); create it with "
                                                  "scripts/setup_llmcompressor_venv.sh")
@pytest.mark.parametrize("case", list(LLMC_CASES))
def test_llmcompressor_checkpoint_matches_transformers(case: str, tmp_path: Path) -> None:
    """A checkpoint written by llm-compressor itself (oneshot, round-to-nearest W4A16, its
    save_pretrained) against transformers on this env's compressed-tensors dequantization."""
    arch, group, sym = LLMC_CASES[case]
    src = tmp_path / "fp16"
    if arch == "llama_wide":
        make_hf_checkpoint("llama", src, **WIDE)
    else:
        make_hf_checkpoint(arch, src)
    out = tmp_path / "llmc"
    proc = subprocess.run([str(LLMC_PY), "-c", LLMC_SCRIPT, str(src), str(out), str(group), sym],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "pack-quantized")
    assert "lm_head" in q["ignore"]
    if arch == "mixtral":  # llm-compressor writes Mixtral experts as block_sparse_moe.*.gate_proj
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight_packed" in f.keys()
    _assert_matches_transformers(out, ct_dequantized_copy(out, tmp_path / "ref"), f"llm-compressor {case}")
