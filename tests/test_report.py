"""ModelReport from the local Hub and from local dirs: facts, exact sizes, compatibility, errors."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from safetensors import safe_open

from hubdeploy.hub_integration import errors
from hubdeploy.hub_integration.report import ModelReport, inspect_model
from tests.fixtures.hub import GATED_REPO, GATED_TOKEN

MIXTRAL_AWQ = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"
MIXTRAL_BF16 = "mistralai/Mixtral-8x7B-Instruct-v0.1"
H, I, L, E, V, KV = 4096, 14336, 32, 8, 32000, 1024


def awq_bytes(d_in: int, d_out: int) -> int:
    """qweight + qzeros + scales of one AWQ g128 linear."""
    return d_in * d_out // 2 + d_in * d_out // 256 + d_in * d_out // 64


@pytest.fixture(scope="module")
def hub(shape_only_hub):
    return shape_only_hub


@pytest.fixture(scope="module")
def mixtral_awq(hub) -> ModelReport:
    return inspect_model(MIXTRAL_AWQ, endpoint=hub.endpoint)


def test_mixtral_awq_facts_and_exact_sizes(mixtral_awq: ModelReport, hub) -> None:
    r = mixtral_awq
    assert r.sha and len(r.sha) == 40 and r.source == "hub"
    a = r.arch
    assert (a.architecture, a.num_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
            a.head_dim, a.vocab_size, a.context_length, a.rope_theta) == (
        "MixtralForCausalLM", 32, 4096, 32, 8, 128, 32000, 32768, 1e6)
    assert (r.moe.num_experts, r.moe.experts_per_token, r.moe.expert_intermediate_size) == (8, 2, 14336)
    q = r.quant
    assert (q.method, q.bits, q.group_size, q.zero_point, q.version) == ("awq", 4, 128, True, "gemm")
    assert "gate" in q.modules_to_not_convert
    assert r.card.base_model == [MIXTRAL_BF16] and r.card.base_model_relation == "quantized"
    assert r.card.license == "apache-2.0" and r.has_chat_template and r.has_tokenizer

    params_layer = 2 * H * H + 2 * H * KV + E * 3 * H * I + E * H + 2 * H
    assert r.weights.param_count == L * params_layer + 2 * V * H + H  # exact, int4 counted per weight
    bytes_layer = (2 * awq_bytes(H, H) + 2 * awq_bytes(H, KV) + E * 3 * awq_bytes(H, I)
                   + (E * H + 2 * H) * 2)
    assert r.weights.total_bytes == L * bytes_layer + (2 * V * H + H) * 2
    assert r.weights.param_count / 1e9 == pytest.approx(46.7, abs=0.05)
    assert r.weights.total_bytes / 1e9 == pytest.approx(24.65, rel=0.02)  # AWQ g128: ≈ 4.16 bits a weight
    assert r.weights.active_bytes_per_token / 1e9 == pytest.approx(6.82, rel=0.02)
    # cross-check with the Hub's file listing: each file = 8 + header + data
    assert r.weights.sizes_consistent is True
    assert 0 < r.weights.file_bytes - r.weights.total_bytes < 2_000_000


def test_bf16_and_qwen3_and_suggested_awq_variant(hub) -> None:
    r = inspect_model(MIXTRAL_BF16, endpoint=hub.endpoint)
    assert r.quant.method == "none" and r.arch.torch_dtype == "bfloat16"
    assert r.weights.total_bytes / 1e9 == pytest.approx(93.4, rel=0.01)
    assert r.weights.param_count / 1e9 == pytest.approx(46.7, abs=0.05)
    # The gated variant is not readable without a token; the session-wide hub may hold more
    # variants pushed by other tests, so check membership, not the whole list.
    assert MIXTRAL_AWQ in r.awq_variants and GATED_REPO not in r.awq_variants
    q = inspect_model("Qwen/Qwen3-30B-A3B-AWQ", endpoint=hub.endpoint)
    assert (q.moe.num_experts, q.moe.experts_per_token, q.moe.expert_intermediate_size) == (128, 8, 768)
    assert (q.arch.head_dim, q.arch.num_key_value_heads, q.arch.context_length) == (128, 4, 40960)
    assert q.weights.param_count / 1e9 == pytest.approx(30.5, abs=0.1)


def test_gptq_is_unsupported_with_awq_suggestion(hub) -> None:
    r = inspect_model("TheBloke/Mistral-7B-Instruct-v0.2-GPTQ", endpoint=hub.endpoint)
    assert r.quant.method == "gptq" and r.quant.bits == 4
    verdict = next(c for c in r.compat if c.capability == "quantization")
    assert verdict.status == "error" and "GPTQ" in verdict.reason
    assert "TheBloke/Mistral-7B-Instruct-v0.2-AWQ" in verdict.action
    assert not r.servable
    # GPTQ qweight [in/8, out] counts 8 weights per int32 too: same params as the AWQ repo
    awq = inspect_model("TheBloke/Mistral-7B-Instruct-v0.2-AWQ", endpoint=hub.endpoint)
    assert r.weights.param_count == awq.weights.param_count
    assert awq.servable and awq.weights.param_count / 1e9 == pytest.approx(7.24, abs=0.01)


def test_broken_repos_each_raise_their_own_error(hub) -> None:
    ep = hub.endpoint
    with pytest.raises(errors.InvalidRepoError, match="no config.json"):
        inspect_model("broken/no-config", endpoint=ep)
    with pytest.raises(errors.CorruptCheckpointError, match="corrupt"):
        inspect_model("broken/corrupt-header", endpoint=ep)
    with pytest.raises(errors.GatedRepoError) as e:
        inspect_model(GATED_REPO, endpoint=ep, token=None)
    assert e.value.status == 401 and "token" in e.value.message
    with pytest.raises(errors.GatedRepoError) as e:
        inspect_model(GATED_REPO, endpoint=ep, token="hf_wrong")
    assert e.value.status == 403
    with pytest.raises(errors.RepoNotFoundError):
        inspect_model("nobody/nothing", endpoint=ep)
    with pytest.raises(errors.RevisionNotFoundError, match="v42"):
        inspect_model(MIXTRAL_AWQ, "v42", endpoint=ep)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(errors.HubUnreachableError, match="cannot reach"):
        inspect_model(MIXTRAL_AWQ, endpoint=closed)


def test_gated_with_granted_token(hub) -> None:
    r = inspect_model(GATED_REPO, endpoint=hub.endpoint, token=GATED_TOKEN)
    assert r.gated == "manual"
    access = next(c for c in r.compat if c.capability == "access")
    assert access.status == "warn"


def test_round_trip_json(mixtral_awq: ModelReport) -> None:
    d = json.loads(mixtral_awq.to_json())
    back = ModelReport.from_dict(d)
    assert back == mixtral_awq
    assert d["weights"]["active_bytes_per_token"] == mixtral_awq.weights.active_bytes_per_token


def test_tiny_model_adapters_and_params_against_torch(hub_tiny_model, tiny_models, local_hub) -> None:
    repo = hub_tiny_model("mixtral", "awq", adapters=2)
    r = inspect_model(repo, endpoint=local_hub.endpoint)
    model_dir = tiny_models("mixtral", "awq", adapters=2)
    assert sorted(a.repo_id for a in r.adapters) == [f"{repo}-lora-0", f"{repo}-lora-1"]
    for ad in r.adapters:
        cfg = json.loads((model_dir.parent / f"{model_dir.name}-lora-{ad.repo_id[-1]}" /
                          "adapter_config.json").read_text())
        assert ad.rank == cfg["r"] and ad.target_modules == sorted(cfg["target_modules"])
    # reference: the unquantized tiny model's parameters counted by torch
    dense = tiny_models("mixtral", "none")
    n = 0
    for f in dense.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(st.get_tensor(k).numel() for k in st.keys())
    assert r.weights.param_count == n
    local = inspect_model(str(model_dir))
    assert local.source == "local" and local.weights == r.weights
    # Local adapters are the sibling `-lora-*` dirs; the shared build may hold more than 2
    # when another test asked the cache for more adapters.
    on_disk = sorted(p.name for p in model_dir.parent.glob(f"{model_dir.name}-lora-*"))
    assert len(on_disk) >= 2
    assert sorted(Path(a.repo_id).name for a in local.adapters) == on_disk


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_compat_verdicts_on_local_dirs(tiny_models, tmp_path: Path) -> None:
    base = tiny_models("llama", "none")

    def verdict(d: Path, cap: str):
        return next(c for c in inspect_model(str(d)).compat if c.capability == cap)

    d = _edit_config(base, tmp_path / "arch", architectures=["FalconForCausalLM"])
    assert verdict(d, "architecture").status == "error" and "Falcon" in verdict(d, "architecture").reason
    d = _edit_config(base, tmp_path / "remote", architectures=["MyLM"], auto_map={"AutoModel": "x.MyLM"})
    assert "trust_remote_code" in verdict(d, "architecture").reason
    for name, q, words in [
        ("bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ("awq8", {"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "8-bit"),
        ("ct", {"quant_method": "compressed-tensors", "format": "pack-quantized"}, "pack-quantized"),
    ]:
        d = _edit_config(base, tmp_path / name, quantization_config=q)
        v = verdict(d, "quantization")
        assert v.status == "error" and words in v.reason and v.action
    d = _edit_config(base, tmp_path / "nochat")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (d / extra).unlink(missing_ok=True)
    v = verdict(d, "chat")
    assert v.status == "warn" and "completions only" in v.reason
    d = _edit_config(base, tmp_path / "nost")
    for f in d.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    v = verdict(d, "weights")
    assert v.status == "error" and "no safetensors" in v.reason


def test_legacy_quant_config_and_missing_tokenizer(tiny_models, tmp_path: Path) -> None:
    d = _edit_config(tiny_models("mixtral", "awq"), tmp_path / "legacy", quantization_config=None)
    (d / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4,
                                                     "version": "GEMM"}))
    r = inspect_model(str(d))
    assert (r.quant.method, r.quant.bits, r.quant.group_size, r.quant.version, r.quant.source) == (
        "awq", 4, 32, "gemm", "quant_config.json")
    assert next(c for c in r.compat if c.capability == "quantization").status == "ok"
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").unlink(missing_ok=True)
    v = next(c for c in inspect_model(str(d)).compat if c.capability == "tokenizer")
    assert v.status == "error" and "tokenizer" in v.action


def test_report_never_downloads_the_weights(hub_tiny_model, local_hub) -> None:
    """Every request `inspect_model` makes for a `.safetensors` file is a HEAD or a ranged GET of its
    header, reading far less than the file (test_inspect_cli checks the cache stays free of weights)."""
    import re

    import huggingface_hub.utils._http as hf_http

    repo = hub_tiny_model("mixtral", "awq")
    seen: list[tuple[str, str, str | None]] = []

    def factory():  # huggingface_hub's own client, with one more request hook that records
        client = hf_http.default_client_factory()
        client.event_hooks["request"] = [*client.event_hooks["request"],
                                         lambda req: seen.append((req.method, str(req.url), req.headers.get("range")))]
        return client

    hf_http.set_client_factory(factory)
    try:
        r = inspect_model(repo, endpoint=local_hub.endpoint, with_adapters=False)
    finally:
        hf_http.set_client_factory(hf_http.default_client_factory)
    weights = [(m, u, rng) for m, u, rng in seen if u.split("?")[0].endswith(".safetensors")]
    assert weights, seen  # the headers were read from the Hub
    read = 0
    for method, url, rng in weights:
        if method == "HEAD":
            continue
        assert method == "GET" and rng, (method, url, "a GET of weights without a Range header")
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
        assert m, rng
        read += int(m[2]) - int(m[1]) + 1
    size = r.weights.file_bytes
    assert size and size > r.weights.total_bytes > 0  # file sizes from the Hub listing, tensor bytes from headers
    assert 0 < read < size / 2, (read, size)  # header bytes only (the tiny file is ~300 kB, its header a few kB)


ARCH_NAMES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.mark.parametrize("arch", sorted(ARCH_NAMES))
def test_every_tiny_architecture_and_quantization_from_the_hub(arch: str, hub_tiny_model, tiny_models,
                                                              local_hub) -> None:
    """AWQ and unquantized tiny models of each architecture, read from the local Hub with their adapter.

    AWQ packs 8 weights per int32: its real parameter count must equal the unquantized twin's,
    which torch counts from the tensors themselves."""
    repo_awq, repo_dense = hub_tiny_model(arch, "awq", adapters=1), hub_tiny_model(arch, "none")
    awq = inspect_model(repo_awq, endpoint=local_hub.endpoint)
    dense = inspect_model(repo_dense, endpoint=local_hub.endpoint)
    assert awq.arch.architecture == dense.arch.architecture == ARCH_NAMES[arch]
    assert (awq.quant.method, awq.quant.bits, awq.quant.version) == ("awq", 4, "gemm")
    assert dense.quant.method == "none" and dense.quant.bits is None
    n = 0
    for f in tiny_models(arch, "none").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(st.get_tensor(k).numel() for k in st.keys())
    assert awq.weights.param_count == dense.weights.param_count == n
    assert awq.weights.total_bytes < dense.weights.total_bytes and awq.weights.sizes_consistent is True
    assert (awq.moe is None) == (arch == "llama")
    assert awq.servable and dense.servable, [c for c in awq.compat + dense.compat if c.status == "error"]
    assert awq.sha and len(awq.sha) == 40 and awq.has_tokenizer and awq.has_chat_template
    assert f"{repo_awq}-lora-0" in [a.repo_id for a in awq.adapters]  # (other tests may push more)
    assert all(a.repo_id.startswith(f"{repo_awq}-lora-") and a.rank and a.target_modules for a in awq.adapters)


def test_card_metadata_and_private_repo(local_hub, tiny_models) -> None:
    """License, base model and relation, tags, pipeline_tag, library_name from the card; private flag."""
    repo = "cards/tiny-private"
    local_hub.add_repo(repo, tiny_models("llama", "awq"), private=True, card_data={
        "license": "mit", "base_model": "test/tiny-llama-base", "base_model_relation": "quantized",
        "tags": ["awq", "tiny"], "pipeline_tag": "text-generation", "library_name": "transformers"})
    local_hub.grant("hf_card_reader", repo)
    with pytest.raises(errors.RepoNotFoundError, match="token"):  # private: invisible without a token
        inspect_model(repo, endpoint=local_hub.endpoint)
    r = inspect_model(repo, endpoint=local_hub.endpoint, token="hf_card_reader")
    c = r.card
    assert (c.license, c.base_model, c.base_model_relation, c.pipeline_tag, c.library_name) == (
        "mit", ["test/tiny-llama-base"], "quantized", "text-generation", "transformers")
    assert {"awq", "tiny"} <= set(c.tags)
    assert r.private is True
