"""serving.lora unit tests: PEFT adapter reading/validation, the manager's slots, the batch
mapping, and the LoRA sites' math against plain float64 torch (and the Triton path under
the interpreter against the reference path)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubdeploy.serving.loader import load_model
from hubdeploy.serving.lora import LoRAConfig, LoRAError, LoRAManager, build_lora_batch, load_adapter
from hubdeploy.serving.lora.adapter import TargetShape, parse_source
from hubdeploy.serving.tiny import adapter_dir


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py


@pytest.fixture(scope="module")
def mixtral(tiny_models):
    d = tiny_models("mixtral", "none", adapters=3)
    model, _ = load_model(d, "cpu", torch.float32)
    return d, model


def _targets(model) -> dict[str, TargetShape]:
    return {n: TargetShape(t.in_features, t.out_features) for n, t in model.lora_targets().items()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------- PEFT config semantics
def test_target_matching_follows_peft() -> None:
    c = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "w1"])
    assert c.targets("model.layers.0.self_attn.q_proj")
    assert not c.targets("model.layers.0.self_attn.k_proj")
    assert c.targets("model.layers.1.block_sparse_moe.experts.3.w1")
    rx = LoRAConfig(r=4, lora_alpha=8, target_modules=r".*layers\.1\..*(q|v)_proj")
    assert rx.targets("model.layers.1.self_attn.v_proj") and not rx.targets("model.layers.0.self_attn.v_proj")
    # layers_to_transform picks the first index (the layer), not the expert index
    lt = LoRAConfig(r=4, lora_alpha=8, target_modules=["w1", "q_proj"], layers_to_transform=[1])
    assert lt.targets("model.layers.1.block_sparse_moe.experts.0.w1")
    assert not lt.targets("model.layers.0.block_sparse_moe.experts.1.w1")
    lp = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert lp.targets("model.layers.0.self_attn.q_proj") and not lp.targets("model.layers.1.self_attn.q_proj")
    ex = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    assert not ex.targets("model.layers.0.self_attn.v_proj")


def test_rank_alpha_pattern_and_rslora_scaling() -> None:
    c = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2})
    assert c.rank_and_scaling("model.layers.0.self_attn.q_proj") == (8, 2.0)
    assert c.rank_and_scaling("model.layers.0.self_attn.v_proj") == (4, 4.0)
    assert c.rank_and_scaling("model.layers.1.self_attn.q_proj") == (8, 0.25)
    rs = LoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj"], use_rslora=True)
    assert rs.rank_and_scaling("model.layers.0.self_attn.q_proj") == (16, 32 / math.sqrt(16))


def test_parse_source() -> None:
    assert parse_source("org/name@v1") == ("org/name", "v1")
    assert parse_source("org/name") == ("org/name", None)


# ---------------------------------------------------------------- reading real adapters
def test_tiny_adapters_load_with_ranks_scalings_and_targets(mixtral) -> None:
    d, model = mixtral
    targets = _targets(model)
    got = {}
    for i in range(3):
        a = load_adapter(f"a{i}", str(adapter_dir(d, i)), targets, max_lora_rank=16)
        cfg = json.loads((adapter_dir(d, i) / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
        assert a.max_rank == (4, 8, 16)[i]
        assert all(m.scaling == pytest.approx(scale) for m in a.modules.values())
        got[i] = a
    assert set(got[0].modules) == {f"model.layers.{l}.self_attn.{p}_proj" for l in (0, 1) for p in "qv"}
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in got[2].modules
    m = got[2].modules["model.layers.0.block_sparse_moe.experts.0.w1"]
    assert m.a.shape == (16, 64) and m.b.shape == (128, 16)


def test_other_expert_naming_is_mapped(mixtral, tmp_path) -> None:
    """An adapter saved with `mlp.experts.N.gate_proj` names serves a `block_sparse_moe` checkpoint."""
    d, model = mixtral
    src = adapter_dir(d, 2)
    dst = _copy(src, tmp_path / "renamed")
    sd = load_file(str(src / "adapter_model.safetensors"))
    ren = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    out = {}
    for k, v in sd.items():
        for a, b in ren.items():
            k = k.replace(f"block_sparse_moe.experts.", "mlp.experts.") if ".experts." in k else k
            k = k.replace(f".{a}.lora_", f".{b}.lora_")
        out[k] = v
    save_file(out, str(dst / "adapter_model.safetensors"))
    _edit_config(dst, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
    a = load_adapter("x", str(dst), _targets(model), 16)
    orig = load_adapter("y", str(src), _targets(model), 16)
    assert set(a.modules) == set(orig.modules)
    key = "model.layers.1.block_sparse_moe.experts.2.w3"
    assert torch.equal(a.modules[key].b, orig.modules[key].b)


def test_layers_to_transform_rank_pattern_and_fan_in_fan_out_on_real_files(mixtral, tmp_path) -> None:
    d, model = mixtral
    src = adapter_dir(d, 0)  # q/v, r=4, alpha=8
    lt = _copy(src, tmp_path / "lt")
    _edit_config(lt, layers_to_transform=[1])
    a = load_adapter("lt", str(lt), _targets(model), 16)
    assert sorted(a.modules) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    rp = _copy(src, tmp_path / "rp")
    sd = load_file(str(rp / "adapter_model.safetensors"))
    sd = {k: (v[:2] if ".v_proj.lora_A" in k else v[:, :2] if ".v_proj.lora_B" in k else v).contiguous()
          for k, v in sd.items()}
    save_file(sd, str(rp / "adapter_model.safetensors"))
    _edit_config(rp, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 1})
    b = load_adapter("rp", str(rp), _targets(model), 16)
    v, q = b.modules["model.layers.0.self_attn.v_proj"], b.modules["model.layers.0.self_attn.q_proj"]
    assert (v.rank, v.scaling, q.rank, q.scaling) == (2, 0.5, 4, 2.0)
    # fan_in_fan_out only transposes Conv1D base weights; on nn.Linear PEFT turns it off: same math
    ff = _copy(src, tmp_path / "ff")
    _edit_config(ff, fan_in_fan_out=True)
    c = load_adapter("ff", str(ff), _targets(model), 16)
    plain = load_adapter("plain", str(src), _targets(model), 16)
    assert all(torch.equal(c.modules[n].a, plain.modules[n].a) for n in plain.modules)


BAD = {
    "dora": ("DoRA", lambda d: _edit_config(d, use_dora=True)),
    "modules_to_save": ("modules_to_save", lambda d: _edit_config(d, modules_to_save=["lm_head"])),
    "bias": ("bias='all'", lambda d: _edit_config(d, bias="all")),
    # fused expert parameters are served (tests/test_lora_target_parameters.py); other parameters are not
    "target_parameters_router": ("target_parameters entry 'mlp.gate.weight': LoRA on the MoE router",
                                 lambda d: _edit_config(d, target_parameters=["mlp.gate.weight"])),
    "target_parameters_2d": ("'self_attn.q_proj.weight': only the fused MoE expert parameters",
                             lambda d: _edit_config(d, target_parameters=["self_attn.q_proj.weight"])),
    "missing_config": ("missing adapter_config.json", lambda d: (d / "adapter_config.json").unlink()),
    "missing_weights": ("missing adapter_model.safetensors", lambda d: (d / "adapter_model.safetensors").unlink()),
    "bin_only": ("never unpickle", lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")),
    "corrupt": ("corrupt", lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:200])),
    "bad_json": ("not valid JSON", lambda d: (d / "adapter_config.json").write_text("{r: 4")),
    "rank_mismatch": ("says 8", lambda d: _edit_config(d, r=8)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_refused_with_the_reason(mixtral, tmp_path, case: str) -> None:
    d, model = mixtral
    bad = _copy(adapter_dir(d, 0), tmp_path / case)
    words, breaker = BAD[case]
    breaker(bad)
    with pytest.raises(LoRAError, match=words.replace("(", r"\(").replace("[", r"\[")):
        load_adapter("bad", str(bad), _targets(model), 16)


def test_rank_above_max_and_wrong_base_shapes_are_refused(mixtral, tmp_path, tiny_models) -> None:
    d, model = mixtral
    with pytest.raises(LoRAError, match=r"rank 16 .* exceeds max_lora_rank=8.*--max-lora-rank 16"):
        load_adapter("big", str(adapter_dir(d, 2)), _targets(model), max_lora_rank=8)
    qwen = tiny_models("qwen3_moe", "none", adapters=3)  # same hidden size, other expert shapes
    with pytest.raises(LoRAError, match=r"(another base model|no such linear)"):
        load_adapter("other", str(adapter_dir(qwen, 2)), _targets(model), 16)
    wide = _copy(adapter_dir(d, 0), tmp_path / "wide")
    sd = load_file(str(wide / "adapter_model.safetensors"))
    sd = {k: (torch.cat([v, v], 1) if ".lora_A." in k else v) for k, v in sd.items()}
    save_file(sd, str(wide / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match=r"in=128, out=64 but the base model's has in=64, out=64"):
        load_adapter("wide", str(wide), _targets(model), 16)


def test_embedding_lora_is_refused(mixtral, tmp_path) -> None:
    d, model = mixtral
    emb = _copy(adapter_dir(d, 0), tmp_path / "emb")
    sd = load_file(str(emb / "adapter_model.safetensors"))
    sd["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 10)
    save_file(sd, str(emb / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="embedding LoRA"):
        load_adapter("emb", str(emb), _targets(model), 16)
    head = _copy(adapter_dir(d, 0), tmp_path / "head")
    sd = load_file(str(head / "adapter_model.safetensors"))
    sd["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    sd["base_model.model.lm_head.lora_B.weight"] = torch.zeros(10, 4)
    save_file(sd, str(head / "adapter_model.safetensors"))
    _edit_config(head, target_modules=["q_proj", "v_proj", "lm_head"])
    with pytest.raises(LoRAError, match="embeddings / lm_head"):
        load_adapter("head", str(head), _targets(model), 16)


def test_adapter_from_the_local_hub_by_repo_id(hub_tiny_model, local_hub, mixtral, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", local_hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # a fresh cache: the download really happens
    # no patching of huggingface_hub.constants: load_adapter must read HF_ENDPOINT at call time
    repo = hub_tiny_model("mixtral", "none", adapters=2)
    _, model = mixtral
    a = load_adapter("hub", f"{repo}-lora-1", _targets(model), 16)
    local = load_adapter("loc", str(adapter_dir(mixtral[0], 1)), _targets(model), 16)
    assert set(a.modules) == set(local.modules) and a.max_rank == 8
    assert any((tmp_path / "hf-home" / "hub").glob("models--tiny--mixtral-none-lora-1/snapshots/*/adapter_config.json"))
    with pytest.raises(LoRAError, match="not found"):
        load_adapter("nope", "tiny/does-not-exist-lora", _targets(model), 16)


# ---------------------------------------------------------------- batch and manager
def test_batch_mapping() -> None:
    assert build_lora_batch([(-1, 5), (-1, 1)], "cpu") is None
    b = build_lora_batch([(-1, 2), (1, 3), (0, 1)], "cpu")
    assert b.token_slots.tolist() == [-1, -1, 1, 1, 1, 0] and b.active_slots == {0, 1}
    assert [t.tolist() for t in b.segments] == [[0, 2, 5], [2, 3, 1], [-1, 1, 0]]
    assert b.slot_of_rows(2).tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 0, 0]
    assert build_lora_batch([(0, 1), (-1, 1)], "cpu").segments is None  # decode: BGMV, no segments


def _seq(i: int, name: str | None):
    return SimpleNamespace(seq_id=i, lora_name=name)


def test_manager_slots_lru_pinning_and_waiting(mixtral, tmp_path) -> None:
    d, model = mixtral
    mgr = LoRAManager(model, max_loras=2, max_lora_rank=16, max_cpu_loras=2)
    try:
        for i in range(3):
            mgr.register(f"a{i}", str(adapter_dir(d, i)))
        with pytest.raises(LoRAError, match="already loaded"):
            mgr.register("a0", str(adapter_dir(d, 0)))
        with pytest.raises(ValueError, match="LoRA adapter 'zz' is not loaded"):
            mgr.add_user(_seq(99, "zz"))
        s = [_seq(i, f"a{i}") for i in range(3)]
        for q in s:
            mgr.add_user(q)
        assert mgr.acquire(s[0]) and mgr.acquire(s[1])
        assert not mgr.acquire(s[2])  # both slots pinned: it waits
        assert mgr.stats.swaps_total == 2
        mgr.release(s[0], finished=True)
        assert mgr.acquire(s[2])  # a0 (unpinned, least recent) is evicted
        assert mgr.slot_names == ["a2", "a1"] and mgr.stats.swaps_total == 3 and mgr.stats.evictions_total == 1
        again = _seq(7, "a1")
        mgr.add_user(again)
        assert mgr.acquire(again) and mgr.stats.swaps_total == 3  # resident: no swap
        with pytest.raises(LoRAError, match="in use by 2 request"):
            mgr.unregister("a1")
        # a0 was dropped from the 2-entry host cache: swapping it in again re-reads it
        assert "a0" not in mgr._host
        for q in (s[1], s[2], again):
            mgr.release(q, finished=True)
        b0 = _seq(8, "a0")
        mgr.add_user(b0)
        assert mgr.acquire(b0) and "a0" in mgr.slot_names
        batch = mgr.build_batch([(None, 2), ("a0", 1)])
        assert batch.token_slots.tolist() == [-1, -1, mgr.slot_names.index("a0")]
        mgr.release(b0, finished=True)
        mgr.unregister("a0")
        assert "a0" not in mgr.slot_names and mgr.take_prefix_cache_stale() and not mgr.take_prefix_cache_stale()
        assert mgr.build_batch([(None, 3)]) is None
    finally:
        for site in mgr.sites:
            site.module.lora_hook = None


# ---------------------------------------------------------------- the math of the sites
def _merged_delta(adapter, name: str) -> torch.Tensor:
    m = adapter.modules[name]
    return m.scaling * m.b.double() @ m.a.double()


def test_linear_site_mixes_slots_like_merged_weights(mixtral) -> None:
    """qkv of layer 0 with tokens of two adapters (ranks 4 and 8, padded to 16) and none."""
    d, model = mixtral
    mgr = LoRAManager(model, max_loras=2, max_lora_rank=16)
    try:
        ads = [mgr.register(f"a{i}", str(adapter_dir(d, i))) for i in (0, 1)]
        seqs = [_seq(i, f"a{i}") for i in (0, 1)]
        for q in seqs:
            mgr.add_user(q)
            mgr.acquire(q)
        qkv = model.layers[0].self_attn.qkv_proj
        torch.manual_seed(0)
        x = torch.randn(7, 64)
        x = torch.cat([x, torch.randn(33, 64)])  # + a long run: the per-slot GEMM path
        lora = mgr.build_batch([("a1", 3), (None, 2), ("a0", 2), ("a1", 33)])
        y = qkv(x, lora)
        w = qkv.weight.double()
        rows = [1, 1, 1, None, None, 0, 0] + [1] * 33
        assert qkv(x[:7], mgr.build_batch([("a1", 3), (None, 2), ("a0", 2)])).allclose(y[:7], atol=1e-5)
        for n, which in enumerate(rows):
            wn = w.clone()
            if which is not None:
                for name, sl in qkv.part_slices().items():
                    if name in ads[which].modules:
                        wn[sl] += _merged_delta(ads[which], name)
            torch.testing.assert_close(y[n].double(), x[n].double() @ wn.T, atol=1e-5, rtol=1e-5)
    finally:
        for site in mgr.sites:
            site.module.lora_hook = None


def _moe_reference(moe, x, adapter, slots_of_tokens) -> torch.Tensor:
    """float64 per-token loop over the merged expert weights of each token's adapter."""
    from hubdeploy.kernels.fused_moe import topk_route

    tw, ids = topk_route(moe.gate(x), moe.top_k, moe.renormalize)
    I = moe.inter
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(ids[n, j])
            w1, w3 = moe.w13[e, :I].double(), moe.w13[e, I:].double()
            w2 = moe.w2[e].double()
            ad = adapter[slots_of_tokens[n]] if slots_of_tokens[n] is not None else None
            if ad is not None:
                w1 = w1 + _merged_delta(ad, moe.expert_name(e, "w1"))
                w3 = w3 + _merged_delta(ad, moe.expert_name(e, "w3"))
                w2 = w2 + _merged_delta(ad, moe.expert_name(e, "w2"))
            xn = x[n].double()
            h = torch.nn.functional.silu(w1 @ xn) * (w3 @ xn)
            out[n] += float(tw[n, j]) * (w2 @ h)
    return out


def test_moe_site_matches_merged_experts(mixtral) -> None:
    """Expert LoRA (rank 16) on some tokens, none on others vs float64 merged experts."""
    d, model = mixtral
    mgr = LoRAManager(model, max_loras=2, max_lora_rank=16)
    try:
        ad = mgr.register("e", str(adapter_dir(d, 2)))
        q = _seq(0, "e")
        mgr.add_user(q)
        mgr.acquire(q)
        moe = model.layers[1].mlp
        torch.manual_seed(1)
        x = torch.randn(5, 64)
        got = moe(x, SimpleNamespace(lora=mgr.build_batch([(None, 2), ("e", 3)])))
        ref = _moe_reference(moe, x, {0: ad}, [None, None, 0, 0, 0])
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
        base = moe(x, SimpleNamespace(lora=None))
        assert torch.equal(got[:2], base[:2])  # base tokens untouched
        assert (got[2:] - base[2:]).abs().max() > 1e-2  # the adapter did change the others
        # prefill-shaped: many rows per (expert, slot) take the per-slot GEMM path
        x = torch.randn(48, 64)
        got = moe(x, SimpleNamespace(lora=mgr.build_batch([("e", 40), (None, 8)])))
        ref = _moe_reference(moe, x, {0: ad}, [0] * 40 + [None] * 8)
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    finally:
        for site in mgr.sites:
            site.module.lora_hook = None


def test_triton_path_matches_reference_under_interpreter(mixtral) -> None:
    """The LoRA sites' Triton path (BGMV decode, SGMV prefill, MoE grouped GEMMs + MoE LoRA
    kernels) vs their torch path, in a child process under Triton's interpreter."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", HUBDEPLOY_FORCE_TRITON="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.test_lora_adapter", str(mixtral[0])],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    diffs = json.loads(lines[-1])
    print("triton vs torch LoRA paths, max abs diff:", diffs)
    assert set(diffs) == {"qkv_decode", "qkv_prefill", "moe_mixed"}
    assert all(v <= 2e-3 for v in diffs.values()), diffs


def _interpreter_child(model_dir: str) -> None:
    """Child side: run each site through both paths (toggling the force flag) and print diffs."""
    import os

    torch.set_num_threads(1)
    model, _ = load_model(Path(model_dir), "cpu", torch.float32)
    mgr = LoRAManager(model, max_loras=3, max_lora_rank=16)
    for i in range(3):
        mgr.register(f"a{i}", str(adapter_dir(Path(model_dir), i)))
        q = _seq(i, f"a{i}")
        mgr.add_user(q)
        mgr.acquire(q)
    torch.manual_seed(2)

    def both(fn):
        os.environ["HUBDEPLOY_FORCE_TRITON"] = "0"
        ref = fn()
        os.environ["HUBDEPLOY_FORCE_TRITON"] = "1"
        return float((fn() - ref).abs().max())

    qkv = model.layers[0].self_attn.qkv_proj
    x1 = torch.randn(4, 64)
    dec = mgr.build_batch([("a1", 1), (None, 1), ("a0", 1), ("a2", 1)])
    x2 = torch.randn(40, 64)
    pre = mgr.build_batch([("a1", 20), (None, 4), ("a0", 16)])
    moe = model.layers[0].mlp
    x3 = torch.randn(6, 64)
    mix = mgr.build_batch([("a2", 3), (None, 1), ("a0", 1), ("a2", 1)])
    out = {
        "qkv_decode": both(lambda: qkv(x1, dec)),
        "qkv_prefill": both(lambda: qkv(x2, pre)),
        "moe_mixed": both(lambda: moe(x3, SimpleNamespace(lora=mix))),
    }
    print(json.dumps(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_sites_compiled_on_cuda_match_cpu(tmp_path) -> None:
    """On a GPU: the compiled Triton LoRA path (fp16, AWQ base) vs the CPU fp32 torch path,
    decode (BGMV), prefill (SGMV) and MoE rows (grouped GEMMs + MoE LoRA kernels)."""
    from hubdeploy.serving.tiny import make_tiny

    d = make_tiny(tmp_path / "m", arch="mixtral", quant="awq", adapters=3)
    runs = {}
    for dev, dt in (("cpu", torch.float32), ("cuda", torch.float16)):
        model, _ = load_model(d, dev, dt)
        mgr = LoRAManager(model, max_loras=3, max_lora_rank=16, device=dev, dtype=dt)
        for i in range(3):
            mgr.register(f"a{i}", str(adapter_dir(d, i)))
            q = _seq(i, f"a{i}")
            mgr.add_user(q)
            mgr.acquire(q)
        g = torch.Generator().manual_seed(3)
        x1, x2, x3 = (torch.randn(n, 64, generator=g).to(dev, dt) for n in (4, 40, 6))
        qkv, moe = model.layers[0].self_attn.qkv_proj, model.layers[0].mlp
        with torch.no_grad():
            runs[dev] = [
                qkv(x1, mgr.build_batch([("a1", 1), (None, 1), ("a0", 1), ("a2", 1)])),
                qkv(x2, mgr.build_batch([("a1", 20), (None, 4), ("a0", 16)])),
                moe(x3, SimpleNamespace(lora=mgr.build_batch([("a2", 3), (None, 1), ("a0", 1), ("a2", 1)]))),
            ]
    for name, a, b in zip(("qkv_decode", "qkv_prefill", "moe_mixed"), runs["cpu"], runs["cuda"]):
        torch.testing.assert_close(b.float().cpu(), a, atol=3e-2, rtol=3e-2, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_cuda_with_adapters_matches_cpu(tmp_path) -> None:
    """On a GPU: base + three adapters in one batch, two device slots (swaps), fp16 AWQ on CUDA
    vs float32 on the CPU: the first greedy token equal, log-probs within 5e-2 while tokens agree."""
    from hubdeploy.serving import LLM, SamplingParams
    from hubdeploy.serving.tiny import make_tiny

    d = make_tiny(tmp_path / "m", arch="mixtral", quant="awq", adapters=3)
    loras = {f"a{i}": str(adapter_dir(d, i)) for i in range(3)}
    prompts = [[1, 50, 60, 70, 80, 90, 100, 110], [1, 5, 300, 7, 9]]
    names = [None, "a0", "a1", "a2"]
    ps = [p for p in prompts for _ in names]
    ls = [n for _ in prompts for n in names]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = {}
    for dev, dt, slots in (("cpu", "float32", 3), ("cuda", "float16", 2)):
        llm = LLM(str(d), device=dev, dtype=dt, max_model_len=64, kv_cache_tokens=512, lora_modules=loras,
                  max_loras=slots)
        outs[dev] = llm.generate(ps, sp, lora=ls)
        if dev == "cuda":
            assert llm.engine.stats().lora_swaps_total >= 3
        del llm
    for k, (c, g) in enumerate(zip(outs["cpu"], outs["cuda"])):
        assert c.token_ids[0] == g.token_ids[0], (k, ls[k], c.token_ids, g.token_ids)
        for tc, tg, lc, lg in zip(c.token_ids, g.token_ids, c.logprobs, g.logprobs):
            if tc != tg:
                break
            assert abs(lc.logprob - lg.logprob) < 5e-2, (k, ls[k])


if __name__ == "__main__":
    import sys

    _interpreter_child(sys.argv[1])
