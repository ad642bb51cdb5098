"""Issue 19: our AWQ quantizer (`hubdeploy.quantize`) and `hubdeploy quantize`.

On the tiny fp16 models of all three families: the checkpoint has AutoAWQ-GEMM layout
(names, shapes, dtypes, `quantization_config`), our engine loads it and its logits equal
transformers' on the dequantized weights (1e-4, float32); AWQ is closer to the 16-bit model
than round-to-nearest (mean next-token KL on held-out text); bad input fails with the right
`QuantizeError` before anything is written; an interrupted run resumes to the same bytes.
The comparison with AutoAWQ 0.2.9 itself is in tests/test_quantize_autoawq.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubdeploy.quantize import (
    AlreadyQuantized,
    MissingFiles,
    NoSpace,
    QuantizeError,
    QuantizeProgress,
    QuantizeSettings,
    UnsupportedArchitecture,
    quantization_config,
    quantize_model,
)
from hubdeploy.quantize.checkpoint import MANIFEST
from hubdeploy.serving.tiny.spec import ARCHS, linear_shapes, other_shapes
from tests.helpers_forward import dequantized_copy, hf_last_logits, prefill_last_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: threads only contend

REPO = Path(__file__).resolve().parents[1]
GROUP = 32  # the tiny models' dimensions (64, 128) take 32 and 64
FAST = dict(group_size=GROUP, n_samples=8, seq_len=64)  # small calibration: a second per model
LOGIT_ATOL = 1e-4
PROMPTS = [[1, 57, 203, 88, 14, 311, 92, 7, 150, 61, 33], [1, 12], [1, 100, 3, 250, 21, 90]]


def _read_all(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """(arch, method) -> (source dir, AWQ checkpoint dir), each quantized once per module."""
    root = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, method: str = "awq") -> tuple[Path, Path]:
        if (arch, method) not in made:
            src = tiny_models(arch, "none")
            out = root / f"{arch}-{method}"
            quantize_model(src, out, QuantizeSettings(method=method, **FAST))
            made[arch, method] = (src, out)
        return made[arch, method]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_has_autoawq_gemm_layout(quantized, arch: str) -> None:
    src, out = quantized(arch)
    sd = _read_all(out)
    fp = load_file(str(src / "model.safetensors"))
    expect = set()
    for name, out_f, in_f in linear_shapes(arch):
        qw, qz, s = sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"]
        assert qw.dtype == torch.int32 and qw.shape == (in_f, out_f // 8), name
        assert qz.dtype == torch.int32 and qz.shape == (in_f // GROUP, out_f // 8), name
        assert s.dtype == torch.float16 and s.shape == (in_f // GROUP, out_f), name
        expect |= {f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"}
    for name, shape, kind in other_shapes(arch, fp["model.embed_tokens.weight"].shape[0]):
        assert sd[name].dtype == torch.float16 and tuple(sd[name].shape) == shape, name  # router, lm_head: 16-bit
        if kind in ("embed", "head"):
            assert torch.equal(sd[name], fp[name]), f"{name} must be copied unchanged"
        expect.add(name)
    assert set(sd) == expect
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == quantization_config(cfg["model_type"], GROUP)
    assert cfg["quantization_config"] | {"modules_to_not_convert": None} == {
        "quant_method": "awq", "zero_point": True, "group_size": GROUP, "bits": 4, "version": "gemm",
        "modules_to_not_convert": None}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expect and all((out / f).is_file() for f in index["weight_map"].values())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    # config.json is written last: a reader that sees it sees a complete checkpoint
    assert (out / "config.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in out.iterdir())
    assert json.loads((out / MANIFEST).read_text())["complete"] is True


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_our_engine_logits_equal_the_dequantized_reference(quantized, arch: str, method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from hubdeploy.serving.loader import load_model
    from hubdeploy.serving.models.layers import Linear

    _, out = quantized(arch, method)
    model, cfg = load_model(out)
    assert cfg.quant is not None and cfg.quant.is_awq and cfg.quant.group_size == GROUP
    quantized_linears = [m for m in model.modules() if isinstance(m, Linear) and m.quantized]
    assert len(quantized_linears) >= 2 * 2  # fused qkv and o per layer; the experts are fused MoE weights
    hf = AutoModelForCausalLM.from_pretrained(dequantized_copy(out, tmp_path / "deq"), dtype=torch.float32).eval()
    prompts = [[t % cfg.vocab_size for t in p] for p in PROMPTS]
    ours, ref = prefill_last_logits(model, prompts), hf_last_logits(hf, prompts)
    diff = (ours - ref).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{arch}/{method}: max abs logit diff {diff:.2e}"


def test_awq_scales_are_folded_so_the_unquantized_function_is_kept(quantized, tiny_models) -> None:
    """Scales only move between a linear and the op before it: with the 4-bit rounding
    undone (dequantized), AWQ's model still computes close to the source; and the router
    gate's columns carry the post-attention norm's scales, so routing is unchanged."""
    src, out = quantized("mixtral")
    sd, fp = _read_all(out), load_file(str(src / "model.safetensors"))
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        norm_s = fp[f"{p}.post_attention_layernorm.weight"].float() / sd[f"{p}.post_attention_layernorm.weight"].float()
        gate_s = sd[f"{p}.block_sparse_moe.gate.weight"].float() / fp[f"{p}.block_sparse_moe.gate.weight"].float()
        assert not torch.allclose(norm_s, torch.ones_like(norm_s), atol=1e-2), "AWQ found no scales at all"
        torch.testing.assert_close(gate_s, norm_s.expand_as(gate_s), rtol=2e-3, atol=2e-3)


def _interrupt_after(layers: int):
    def cb(p: QuantizeProgress) -> None:
        if p.stage == "layer" and p.layers_done >= layers:
            raise KeyboardInterrupt("stop")
    return cb


def test_interrupted_run_resumes_to_the_same_bytes_and_other_settings_start_clean(quantized, tmp_path: Path) -> None:
    src, clean = quantized("llama")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, out, QuantizeSettings(**FAST), _interrupt_after(1))
    assert not (out / "config.json").exists(), "an interrupted run must not look complete"
    assert json.loads((out / MANIFEST).read_text())["done"] == [0]
    seen: list[QuantizeProgress] = []
    quantize_model(src, out, QuantizeSettings(**FAST), seen.append)
    assert [p.layers_done for p in seen if p.stage == "layer"][0] == 1, "finished layer 0 was not kept"
    for f in sorted(clean.glob("model-*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f"{f.name} differs from an uninterrupted run"
    assert not list(out.glob("*.tmp")) and not (out / "calibration-hidden.pt").exists()

    # A finished checkpoint of the same settings is reused as it is.
    seen.clear()
    quantize_model(src, out, QuantizeSettings(**FAST), seen.append)
    assert [p.stage for p in seen] == ["done"]

    # Other settings in the same directory: the old run is cleared, not mixed in.
    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, out, QuantizeSettings(**{**FAST, "group_size": 64}), _interrupt_after(1))
    seen.clear()
    quantize_model(src, out, QuantizeSettings(**FAST), seen.append)
    assert [p.layers_done for p in seen if p.stage == "layer"][0] == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == GROUP


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_input_gets_a_clear_error_and_nothing_written(tiny_models, tmp_path: Path) -> None:
    src = tiny_models("mixtral", "none")
    out = tmp_path / "out"

    bad_arch = _copy(src, tmp_path / "gpt2")
    cfg = json.loads((bad_arch / "config.json").read_text())
    (bad_arch / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel is not supported"):
        quantize_model(bad_arch, out)

    with pytest.raises(AlreadyQuantized, match="already quantized .awq.; quantize the 16-bit original"):
        quantize_model(tiny_models("mixtral", "awq"), out)

    no_weights = _copy(src, tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(MissingFiles, match="no model.safetensors"):
        quantize_model(no_weights, out)
    no_tok = _copy(src, tmp_path / "notok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(MissingFiles, match="no tokenizer.json"):
        quantize_model(no_tok, out, QuantizeSettings(**FAST))
    with pytest.raises(MissingFiles, match="has no config.json"):
        quantize_model(tmp_path, out)

    probed: list[Path] = []

    def tiny_disk(path: Path) -> int:
        probed.append(path)
        return 10_000

    with pytest.raises(NoSpace, match="GiB free but the quantized checkpoint needs about"):
        quantize_model(src, out, QuantizeSettings(**FAST), free_bytes=tiny_disk)
    assert probed == [out]

    with pytest.raises(QuantizeError, match="group size 96 is not supported"):
        quantize_model(src, out, QuantizeSettings(group_size=96))
    with pytest.raises(QuantizeError, match="use --group-size 32 or 64"):
        quantize_model(src, out, QuantizeSettings(group_size=128))  # k_proj in=64
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(QuantizeError, match='line 2 has no "text"'):
        quantize_model(src, out, QuantizeSettings(calib=jsonl, **FAST))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(QuantizeError, match="not empty and holds no hubdeploy quantize run"):
        quantize_model(src, foreign, QuantizeSettings(**FAST))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_nothing_is_written_before_the_checks(tiny_models, tmp_path: Path) -> None:
    src = tiny_models("qwen3_moe", "none")
    out = tmp_path / "never"
    with pytest.raises(NoSpace):
        quantize_model(src, out, QuantizeSettings(**FAST), free_bytes=lambda p: 0)
    with pytest.raises(QuantizeError):
        quantize_model(src, out, QuantizeSettings(group_size=128))
    assert not out.exists()


def test_settings_key_follows_settings_and_calibration_content(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("one text\n\nanother paragraph")
    base = QuantizeSettings()
    assert base.key() == QuantizeSettings().key() and len(base.key()) == 12
    assert QuantizeSettings(group_size=64).key() != base.key()
    k1 = QuantizeSettings(calib=a).key()
    assert k1 != base.key()
    a.write_text("changed text")
    assert QuantizeSettings(calib=a).key() != k1, "the key must follow the calibration file's content"
    assert QuantizeSettings(method="rtn", calib=a).key() == QuantizeSettings(method="rtn").key()


def test_cli_quantizes_with_a_progress_bar_and_reports_errors(tiny_models, tmp_path: Path) -> None:
    src = tiny_models("llama", "none")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cli-out"
    cmd = [sys.executable, "-m", "hubdeploy", "quantize", str(src), str(out), "--group-size", "32",
           "--n-samples", "4", "--seq-len", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2/2" in proc.stderr and "calibration: hubdeploy-calib-v1" in proc.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    proc = subprocess.run([sys.executable, "-m", "hubdeploy", "quantize", str(out), str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "already quantized" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_awq_is_closer_to_the_16bit_model_than_round_to_nearest(tiny_models, arch: str, tmp_path: Path) -> None:
    """Mean next-token KL to the 16-bit model on held-out text (the tiny tokenizer's corpus;
    calibration is the shipped set). The tiny random models get outlier activation channels
    (`add_outlier_channels`), as real LLMs have: on flat random activations AWQ's gain is a
    few percent, with outliers it is large (the AutoAWQ comparison is test_quantize_autoawq.py)."""
    from tests.helpers_quant import add_outlier_channels, full_logits, held_out_blocks, mean_kl

    src = add_outlier_channels(shutil.copytree(tiny_models(arch, "none"), tmp_path / "fp16"))
    held = held_out_blocks(src)
    ref = full_logits(src, held)
    kl = {}
    for method in ("awq", "rtn"):
        out = quantize_model(src, tmp_path / method, QuantizeSettings(method=method, group_size=GROUP,
                                                                      n_samples=16, seq_len=64)).out_dir
        kl[method] = mean_kl(ref, full_logits(dequantized_copy(out, tmp_path / f"deq-{method}"), held))
    print(f"{arch}: mean KL awq {kl['awq']:.4f}, rtn {kl['rtn']:.4f}")
    assert kl["awq"] < 0.8 * kl["rtn"], kl


def test_clipping_search_equals_autoawqs_formulation() -> None:
    """`search_clip` batches the per-group dot products as matmuls; AutoAWQ's
    `_compute_best_clip` broadcasts `[out, tokens, groups, group_size]`. Same bounds (float64)."""
    from hubdeploy.kernels.awq_format import awq_fake_quantize
    from hubdeploy.quantize.awq_search import search_clip

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g, dtype=torch.float64)
    x = torch.randn(200, 96, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 96, dtype=torch.float64)
    ours = search_clip(w, x, 32)
    xg = x.reshape(1, 200, 3, 32)
    wg = w.reshape(48, 1, 3, 32)
    org_max = wg.abs().amax(dim=-1, keepdim=True)
    best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    ref_out = (xg * wg).sum(-1)
    for i in range(10):
        max_val = org_max * (1 - i / 20)
        q = awq_fake_quantize(torch.clamp(wg, -max_val, max_val).reshape(48, 96), 32).reshape(48, 1, 3, 32)
        err = ((xg * q).sum(-1) - ref_out).pow(2).mean(dim=1).view(min_err.shape)
        better = err < min_err
        min_err[better], best[better] = err[better], max_val[better]
    assert torch.equal(ours, best.view(48, 3))
    assert (ours < org_max.view(48, 3)).any(), "no group was clipped: the check would not see a wrong bound"


@pytest.mark.slow
def test_cli_downloads_a_hub_model_and_quantizes_it(local_hub, hub_tiny_model, tmp_path: Path) -> None:
    """MODEL as a Hub repo id: the snapshot comes through the real huggingface_hub client from
    the local Hub (serving.hub.resolve_model_dir, as `serve` does); a wrong revision is a clear error."""
    repo = hub_tiny_model("qwen3_moe", "none")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": local_hub.endpoint,
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "from-hub"
    proc = subprocess.run([sys.executable, "-m", "hubdeploy", "quantize", repo, str(out), "--group-size", "32",
                           "--method", "rtn"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "calibration: none (round-to-nearest)" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["mlp.gate"]
    proc = subprocess.run([sys.executable, "-m", "hubdeploy", "quantize", repo, str(tmp_path / "x"), "--revision",
                           "no-such-branch"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "has no revision 'no-such-branch'" in proc.stderr, proc.stderr[-2000:]


def test_resume_without_the_saved_hidden_states_redoes_the_finished_layers(quantized, tmp_path: Path) -> None:
    src, clean = quantized("mixtral")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, out, QuantizeSettings(**FAST), _interrupt_after(1))
    (out / "calibration-hidden.pt").unlink()  # e.g. a crash while it was being replaced
    seen: list[QuantizeProgress] = []
    quantize_model(src, out, QuantizeSettings(**FAST), seen.append)
    assert [p.layers_done for p in seen if p.stage == "layer"][0] == 0
    for f in sorted(clean.glob("model-*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_bfloat16_source_gives_the_same_float16_checkpoint_format(tiny_models, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from hubdeploy.serving.loader import load_model

    src = shutil.copytree(tiny_models("llama", "none"), tmp_path / "bf16")
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = quantize_model(src, tmp_path / "out", QuantizeSettings(**FAST)).out_dir
    tensors = _read_all(out)
    assert {t.dtype for k, t in tensors.items() if not k.endswith((".qweight", ".qzeros"))} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    model, _ = load_model(out)
    assert torch.isfinite(prefill_last_logits(model, [[1, 5, 9, 14]])).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_decoder_equals_transformers(tiny_models, arch: str) -> None:
    """The dense float32 decoder layer the searches run (`quantize.decoder`), stacked over the
    whole model, gives transformers' logits (float32, 1e-4): calibration sees the real function."""
    from hubdeploy.kernels.norm_rope_act import rms_norm_ref, rotary_cos_sin
    from hubdeploy.quantize.decoder import layer_forward
    from hubdeploy.quantize.source import SourceCheckpoint, mlp_names
    from tests.helpers_quant import full_logits, held_out_blocks

    src = tiny_models(arch, "none")
    blocks = held_out_blocks(src, seq_len=40, n=3)
    source = SourceCheckpoint(src)
    cfg = source.cfg
    other = {k: v.float() for k, v in source.other_tensors().items()}
    cos_sin = rotary_cos_sin(cfg.head_dim, blocks.shape[1], cfg.rope_theta, cfg.rope_scaling)
    x = other["model.embed_tokens.weight"][blocks]
    with torch.no_grad():
        for i in range(source.num_layers):
            w = {k: v.float() for k, v in source.layer_tensors(i).items()}
            x = layer_forward(x, w, cfg, mlp_names(cfg, i), cos_sin).out
        ours = rms_norm_ref(x, other["model.norm.weight"], cfg.rms_norm_eps) @ other["lm_head.weight"].t()
    ref = full_logits(src, blocks)
    diff = (ours - ref).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{arch}: calibration decoder differs from transformers by {diff:.2e}"
