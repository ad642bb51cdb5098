"""benchmarks/engine_gpu.py: the random AWQ model is laid out exactly as `load_model` lays out
a checkpoint with the same tensors, the decode roofline matches Mixtral-8x7B AWQ's 6.82 GB per
batch-1 token (active experts + attention at 4 bits, fp16 `lm_head`), and the CPU smoke run
drives the real engine and reports sane numbers."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hubdeploy.serving.config import ModelConfig
from hubdeploy.serving.engine import EngineArgs, LLMEngine
from hubdeploy.serving.loader import load_model
from hubdeploy.serving.models import MoE, build_model
from hubdeploy.serving.models.layers import Linear

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_engine_gpu", ROOT / "benchmarks" / "engine_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


eg = _bench()


def _awq_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.quantized:
            packs = {"": m.packed}
        elif isinstance(m, MoE) and m.quantized:
            packs = {".w13": m.weights.w13, ".w2": m.weights.w2}
        else:
            continue
        for suffix, pk in packs.items():
            for leaf in ("qweight", "qzeros", "scales"):
                out[f"{name}{suffix}.{leaf}"] = getattr(pk, leaf)
    return out


def test_random_model_has_the_loaders_layout(tmp_path: Path) -> None:
    cfg_dict = eg.mixtral_config_dict(eg.TINY, layers=2, group=32)
    cfg = ModelConfig.from_dict(cfg_dict)
    ours = eg.random_awq_model(cfg, "cpu", torch.float32, seed=3)

    # the same random tensors written as a Hub checkpoint, read back by the real loader
    fresh = build_model(cfg, torch.float32, "cpu")
    tensors = {name: t.contiguous() for name, _, t in eg.random_checkpoint(fresh, 32, seed=3)}
    assert any(n.endswith(".experts.0.w1.qweight") for n in tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    loaded, _ = load_model(tmp_path, "cpu", torch.float32)

    a, b = _awq_tensors(ours), _awq_tensors(loaded)
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 4  # per layer: qkv, o, w13, w2
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    sa, sb = ours.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the scales keep activations O(1): dequantized weights have std ≈ 1/√in
    w = ours.layers[0].self_attn.o_proj.packed.dequantize(torch.float32)
    assert 0.3 < float(w.std()) * math.sqrt(w.shape[1]) < 3


def test_roofline_bytes_match_field_notes() -> None:
    cfg = ModelConfig.from_dict(eg.mixtral_config_dict(eg.MIXTRAL_8X7B))
    one = eg.decode_step_bytes(cfg, 1, 0)
    assert one["experts_touched"] == pytest.approx(2.0)
    assert one["total"] / 1e9 == pytest.approx(6.82, abs=0.02)  # Mixtral-8x7B AWQ: ≈ 6.82 GB per batch-1 token
    b64 = eg.decode_step_bytes(cfg, 64, 1000)
    assert 7.99 < b64["experts_touched"] <= 8
    assert b64["kv_cache"] == 64 * 1000 * 32 * 2 * 8 * 128 * 2


def test_engine_refuses_a_model_without_config_and_tokenizer() -> None:
    cfg = ModelConfig.from_dict(eg.mixtral_config_dict(eg.TINY, layers=1, group=32))
    model = eg.random_awq_model(cfg, "cpu", torch.float32)
    with pytest.raises(ValueError, match="model_config= and tokenizer="):
        LLMEngine(EngineArgs(model="x", device="cpu", max_loras=0), model=model)


def test_smoke_run_prints_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "r.json"
    try:
        assert eg.main(["--smoke", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "TTFT (batch 1)" in text and "%roof" in text
    r = json.loads(out.read_text())
    assert [x["prompt"] for x in r["ttft"]] == [16, 64]
    assert all(0 < x["ms"] < 5000 for x in r["ttft"])
    rows = {x["batch"]: x for x in r["tpot"]}
    assert sorted(rows) == [1, 8, 64] and all(x["mode"] == "eager" for x in r["tpot"])
    for x in rows.values():
        assert 0 < x["ms"] < 5000 and 0 < x["pct_roofline"] < 100
        assert x["context"] > r["decode_prompt"]
        assert x["roofline_ms"] == pytest.approx(x["bytes"]["total"] / r["copy_bw"] * 1000)
    assert rows[64]["tok_s"] > rows[1]["tok_s"]  # batching pays even on the CPU
    assert rows[1]["bytes"]["experts_touched"] == pytest.approx(2.0)
