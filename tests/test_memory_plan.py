"""MemoryPlan: fit / no fit with reasons, KV arithmetic, LoRA slots, decode estimate, catalog."""
from __future__ import annotations

import pytest

from hubdeploy.hub_integration.errors import UnknownGPUError
from hubdeploy.hub_integration.gpus import catalog, get_gpu
from hubdeploy.hub_integration.memory_plan import lora_adapter_bytes, plan, plan_all
from hubdeploy.hub_integration.report import AdapterInfo, ModelReport, inspect_model

MIXTRAL_AWQ = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"


@pytest.fixture(scope="module")
def awq(shape_only_hub) -> ModelReport:
    return inspect_model(MIXTRAL_AWQ, endpoint=shape_only_hub.endpoint)


@pytest.fixture(scope="module")
def bf16(shape_only_hub) -> ModelReport:
    return inspect_model("mistralai/Mixtral-8x7B-Instruct-v0.1", endpoint=shape_only_hub.endpoint)


def test_catalog() -> None:
    names = [g.name for g in catalog()]
    assert names == ["T4", "L4", "A10G", "L40S", "A100-40GB", "A100-80GB", "H100-80GB", "H200", "B200"]
    assert get_gpu("h100") is get_gpu("H100-80GB") and get_gpu("a100").memory_gb == 80
    assert get_gpu("H200").memory_gb == 141 and get_gpu("B200").bandwidth_gbs == 8000
    with pytest.raises(UnknownGPUError, match="known: T4"):
        get_gpu("RTX-9090")


def test_mixtral_awq_fits_80gb_not_l4(awq: ModelReport) -> None:
    for gpu in ("H100", "A100-80GB"):
        p = plan(awq, gpu)
        assert p.fits, p.reason
        assert p.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
        assert p.kv_tokens * p.kv_bytes_per_token <= p.kv_cache_bytes
        assert p.kv_cache_bytes - p.kv_tokens * p.kv_bytes_per_token < p.block_size * p.kv_bytes_per_token
        assert p.budget_bytes == p.weights_bytes + p.overhead_bytes + p.kv_cache_bytes
        assert p.max_model_len == 32768  # the model's context: KV holds far more
        assert p.concurrency_at_max_len == p.kv_tokens // 32768 >= 10
        d = p.engine_defaults()
        assert d["max_model_len"] == 32768 and 1 <= d["max_num_seqs"] <= 256
        assert p.serve_args()[:2] == ["--max-model-len", "32768"]
    l4 = plan(awq, "L4")
    assert not l4.fits and "exceed" in l4.reason and "L4" in l4.reason and f"{awq.weights.total_bytes / 1e9:.1f} GB" in l4.reason
    with pytest.raises(ValueError, match="does not fit L4"):
        l4.engine_defaults()
    # A100-40GB: fits, smaller KV cache
    a40 = plan(awq, "A100-40GB")
    assert a40.fits and a40.kv_tokens < plan(awq, "A100-80GB").kv_tokens


def test_bf16_does_not_fit_h100(bf16: ModelReport) -> None:
    p = plan(bf16, "H100")
    assert not p.fits and "93.4 GB" in p.reason and "exceed" in p.reason
    assert "AWQ 4-bit variant TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ" in p.reason
    size = next(c for c in bf16.compat if c.capability == "size")
    assert size.status == "warn" and "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ" in size.action
    assert plan(bf16, "H200").fits and plan(bf16, "B200").fits


def test_decode_roofline_matches_field_notes(awq: ModelReport) -> None:
    a100 = plan(awq, "A100-80GB", decode_efficiency=1.0)
    h100 = plan(awq, "H100", decode_efficiency=1.0)
    assert a100.roofline_ms_per_token == pytest.approx(3.4, abs=0.1)
    assert h100.roofline_ms_per_token == pytest.approx(2.0, abs=0.1)
    assert plan(awq, "H100").decode_tok_s == pytest.approx(0.6 * 1e3 / h100.roofline_ms_per_token, rel=1e-6)


def test_lora_slots_take_memory_from_kv(awq: ModelReport) -> None:
    ad = AdapterInfo(repo_id="x/lora", rank=16, target_modules=["q_proj", "v_proj"])
    per = lora_adapter_bytes(awq, 16, ["q_proj", "v_proj"])
    assert per == ((4096 + 4096) + (4096 + 1024)) * 16 * 32 * 2
    experts = lora_adapter_bytes(awq, 8, ["w1"])
    assert experts == (4096 + 14336) * 8 * 8 * 32 * 2  # one slot per expert
    base = plan(awq, "H100")
    with_lora = plan(awq, "H100", adapters=[ad, ad], max_loras=2)
    assert with_lora.lora_bytes == 2 * per and with_lora.max_lora_rank == 16
    assert base.kv_cache_bytes - with_lora.kv_cache_bytes == 2 * per
    assert with_lora.engine_defaults()["max_loras"] == 2
    with pytest.raises(ValueError, match="not among the adapters"):
        plan(awq, "H100", adapters=["nobody/lora"])


def test_fused_expert_adapters_are_sized_as_expert_lora(awq: ModelReport) -> None:
    """PEFT `target_parameters` on transformers 5's fused experts adapt every expert's gate, up
    and down projections: the plan sizes them so, not as attention-only adapters."""
    import json

    from hubdeploy.hub_integration.report import adapter_info_from_config

    cfg = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"],
           "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    ad = adapter_info_from_config("x/experts-lora", json.dumps(cfg))
    assert ad.error is None and ad.target_modules == ["down_proj", "gate_proj", "q_proj", "up_proj"]
    per_expert = lora_adapter_bytes(awq, 16, ["gate_proj", "up_proj", "down_proj"])
    assert per_expert == 3 * (4096 + 14336) * 16 * 8 * 32 * 2
    assert plan(awq, "H100", adapters=[ad], max_loras=1).lora_bytes == \
        per_expert + lora_adapter_bytes(awq, 16, ["q_proj"])
    for bad in ("not json", "[1, 2]", json.dumps({"r": 8, "target_modules": 5})):
        assert "not a valid PEFT config" in (adapter_info_from_config("x/bad", bad).error or "")
    assert adapter_info_from_config("x/none", None).error == "adapter_config.json is missing"


def test_requested_lengths(awq: ModelReport) -> None:
    assert plan(awq, "H100", max_model_len=8192).max_model_len == 8192
    p = plan(awq, "H100", max_model_len=65536)
    assert not p.fits and "context length 32768" in p.reason
    base = plan(awq, "A100-40GB")
    util = (base.weights_bytes + base.overhead_bytes + 1000 * base.kv_bytes_per_token) / base.gpu_memory_bytes
    tight = plan(awq, "A100-40GB", gpu_memory_utilization=util)
    assert not tight.fits and "KV cache holds only" in tight.reason  # ~1000 tokens < 2048
    short = plan(awq, "A100-40GB", gpu_memory_utilization=util, max_model_len=512)
    assert short.fits and short.max_model_len == 512 and short.concurrency_at_max_len == short.kv_tokens // 512
    full = plan(awq, "A100-40GB", gpu_memory_utilization=(base.weights_bytes + 2**20) / base.gpu_memory_bytes)
    assert not full.fits and "no memory is left for the KV cache" in full.reason


def test_plan_all_covers_catalog(awq: ModelReport) -> None:
    plans = plan_all(awq)
    assert [p.gpu for p in plans] == [g.name for g in catalog()]
    fits = {p.gpu: p.fits for p in plans}
    assert fits["T4"] is False and fits["L4"] is False and fits["H100-80GB"] is True
