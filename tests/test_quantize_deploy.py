"""Quantize on deploy (issue 19, the service side): the AWQ plan and offer, refusals at create,
and an fp16 model that becomes a running AWQ endpoint through the real service, the real
local Hub, the real quantizer in its worker process and the `openai` client."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hubdeploy.hub_integration.memory_plan import awq_on_deploy_bytes, plan, plan_all
from hubdeploy.hub_integration.quantize_offer import quantize_offer, quantize_refusal
from hubdeploy.hub_integration.report import ModelReport, inspect_model
from hubdeploy.hub_integration.service import build_service_app
from tests.fixtures.service import ADMIN, LiveService, chat, pid_alive, reap, wait_status

MIXTRAL_BF16 = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MIXTRAL_AWQ = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"


@pytest.fixture(scope="module")
def bf16(shape_only_hub: Any) -> ModelReport:
    return inspect_model(MIXTRAL_BF16, endpoint=shape_only_hub.endpoint)


@pytest.fixture(scope="module")
def awq(shape_only_hub: Any) -> ModelReport:
    return inspect_model(MIXTRAL_AWQ, endpoint=shape_only_hub.endpoint)


def test_awq_on_deploy_size_matches_a_real_awq_checkpoint(bf16: ModelReport, awq: ModelReport) -> None:
    # TheBloke's AutoAWQ checkpoint of the same model (group 128, gates and lm_head 16-bit): the size
    # from the bf16 headers alone is its tensor bytes exactly (24.65 GB), and so are the bytes per token
    weights, decode = awq_on_deploy_bytes(bf16, 128)
    assert weights == awq.weights.total_bytes == 24_653_602_816
    assert decode == awq.weights.active_bytes_per_token
    assert awq_on_deploy_bytes(bf16, 32)[0] > weights  # smaller groups: more scales and zeros
    p16, p4 = plan(bf16, "H100"), plan(bf16, "H100", quantize="awq")
    assert not p16.fits and "quantize it to AWQ 4-bit on deploy" not in p16.reason  # an AWQ variant exists
    assert p4.fits and p4.weights_bytes == weights and p4.quantize == "awq" and p4.quantize_group_size == 128


def test_offer_and_refusals(bf16: ModelReport, awq: ModelReport) -> None:
    plans = plan_all(bf16)
    offer = quantize_offer(bf16, plans)
    from hubdeploy.quantize.calibration import SHIPPED_NAME

    assert offer["available"] and offer["group_size"] == 128 and offer["calibration"] == SHIPPED_NAME
    assert "H100-80GB" in offer["recommended_for"] and "H200" not in offer["recommended_for"]  # 16-bit fits H200
    assert not offer["recommended"] and MIXTRAL_AWQ in offer["reason"]  # the Hub has an AWQ variant already
    assert [p["gpu"] for p in offer["plans"]] == [p.gpu for p in plans]
    refused = quantize_offer(awq, plan_all(awq))
    assert not refused["available"] and "already quantized (AWQ 4-bit)" in refused["reason"]
    assert "deploy it as is" in refused["reason"]


def test_recommended_without_a_variant(bf16: ModelReport) -> None:
    alone = ModelReport.from_dict({**bf16.to_dict(), "awq_variants": []})
    offer = quantize_offer(alone, plan_all(alone))
    assert offer["recommended"] and "no AWQ 4-bit variant" in offer["reason"]
    assert "quantize it to AWQ 4-bit on deploy" in plan(alone, "H100").reason
    gpt2 = ModelReport.from_dict({**alone.to_dict(), "arch": {**alone.to_dict()["arch"], "family": "",
                                                              "architecture": "GPT2LMHeadModel"}})
    assert "GPT2LMHeadModel cannot be quantized" in (quantize_refusal(gpt2) or "")


def test_progress_view_shows_the_quantizing_phase() -> None:
    from hubdeploy.space import view

    ep = {"name": "q", "status": "initializing", "phase": "quantizing", "spec": {"quantize": "awq"},
          "progress": {"bytes_done": 5_000_000, "bytes_total": 9_000_000, "layers_done": 1, "layers_total": 2}}
    html = view.progress_html(ep)
    assert 'data-phase="quantizing"' in html and "layer 1 of 2, 5.0 MB written" in html
    assert '<li class="hd-now">Quantizing</li>' in html
    assert "Quantizing" not in view.progress_html({**ep, "phase": "loading", "spec": {}})  # only when asked for


def test_page_offers_quantizing_with_the_awq_plans(bf16: ModelReport) -> None:
    from hubdeploy.space import view

    alone = ModelReport.from_dict({**bf16.to_dict(), "awq_variants": []})
    plans = plan_all(alone)
    payload = {"report": alone.to_dict(), "plans": [p.to_dict() for p in plans],
               "quantize": quantize_offer(alone, plans)}
    h100 = dict(view.gpu_choices(view.plans_for(payload, True)))
    assert next(label for label, v in h100.items() if v == "H100-80GB").startswith("✓")
    assert next(label for label, v in dict(view.gpu_choices(view.plans_for(payload, False))).items()
                if v == "H100-80GB").startswith("✗")
    note = view.quantize_html(payload["quantize"], payload["report"])
    assert "Recommended" in note and "H100-80GB" in note and "hubdeploy-calib-v1" in note and "93.4 GB" in note
    plan_h100 = next(p for p in view.plans_for(payload, True) if p["gpu"] == "H100-80GB")
    assert "quantized on deploy" in view.plan_html(plan_h100, "H100-80GB")


# --- through the real service -----------------------------------------------------------
class FreeSpace:
    """The service's free-space probe (passed to the provisioner): the real disk's, or `free` bytes."""

    def __init__(self) -> None:
        self.free: int | None = None

    def __call__(self, path: Path) -> int:
        return shutil.disk_usage(path).free if self.free is None else self.free


@pytest.fixture(scope="module")
def qsvc(tmp_path_factory: pytest.TempPathFactory, local_hub: Any, hub_tiny_model: Any,
         tiny_models: Any) -> Iterator[LiveService]:
    data = tmp_path_factory.mktemp("qsvc")
    roots = tmp_path_factory.mktemp("qroots")
    space = FreeSpace()
    svc = LiveService(build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token=ADMIN,
                                        allowed_model_roots=[roots], free_bytes=space))
    svc.repo, svc.awq_repo = hub_tiny_model("mixtral", "none"), hub_tiny_model("mixtral", "awq")  # type: ignore[attr-defined]
    svc.fp16_dir, svc.roots, svc.space, svc.data = tiny_models("mixtral", "none"), roots, space, data  # type: ignore[attr-defined]
    svc.hub_endpoint = local_hub.endpoint  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        for e in svc.client.get("/api/endpoints").json()["endpoints"]:
            svc.client.delete(f"/api/endpoints/{e['name']}")
        svc.stop()
        reap(data)


def _create(svc: LiveService, name: str, **spec: Any) -> Any:
    """POST an AWQ-on-deploy endpoint of the tiny fp16 model (widths 64: group 32 by default here)."""
    body = {"name": name, "model": svc.repo, "gpu": "cpu", "access": "public", "quantize": "awq",  # type: ignore[attr-defined]
            "quantize_group_size": 32, **spec}
    return svc.client.post("/api/endpoints", json=body)


def _entries(svc: LiveService) -> tuple[list[str], list[str]]:
    """(complete entries, .partial dirs) of the service's quantized cache."""
    root = svc.data / "quantized"  # type: ignore[attr-defined]
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return [n for n in names if not n.endswith(".partial")], [n for n in names if n.endswith(".partial")]


def _phases(e: dict[str, Any]) -> list[str]:
    return [h["phase"] for h in e["history"] if h["phase"]]


def _workers(data: Path) -> list[int]:
    """Pids of quantize workers writing under `data` (their JSON job names the output)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "quantize_worker" in cmd and str(data) in cmd and pid_alive(int(proc.name)):
                out.append(int(proc.name))
    return out


def _restart(svc: LiveService) -> None:
    """Stop the service (endpoint workers stop with it) and start a new one on the same data dir, in place."""
    svc.stop()
    new = LiveService(build_service_app(svc.data, hub_endpoint=svc.hub_endpoint, admin_token=ADMIN,  # type: ignore[attr-defined]
                                        allowed_model_roots=[svc.roots], free_bytes=svc.space))  # type: ignore[attr-defined]
    for attr in ("port", "app", "base_url", "server", "thread", "client"):
        setattr(svc, attr, getattr(new, attr))


def _hold_worker(svc: LiveService, name: str, layers_done: int) -> int:
    """SIGSTOP the endpoint's quantize worker once `layers_done` layers are written; its pid."""
    deadline = time.monotonic() + 300
    while (e := svc.client.get(f"/api/endpoints/{name}").json())["progress"]["layers_done"] < layers_done \
            or not _workers(svc.data):  # type: ignore[attr-defined]
        assert e["status"] == "initializing" and time.monotonic() < deadline, e
        time.sleep(0.05)
    (pid,) = _workers(svc.data)  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGSTOP)  # held between layers: stopping must still end it
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=" in env and not any(v.startswith(b"HUBDEPLOY_ADMIN_TOKEN=") for v in env)
    assert svc.client.get(f"/api/endpoints/{name}").json()["phase"] == "quantizing"
    return pid


def _gone(pid: int) -> None:
    deadline = time.monotonic() + 20
    while pid_alive(pid):
        assert time.monotonic() < deadline, "the quantize worker outlived its endpoint"
        time.sleep(0.05)


def _copy_model(svc: LiveService, name: str) -> Path:
    d = svc.roots / name  # type: ignore[attr-defined]
    shutil.copytree(svc.fp16_dir, d)  # type: ignore[attr-defined]
    return d


def test_refused_at_create(qsvc: LiveService) -> None:
    def refused(name: str, field: str = "quantize", **spec: Any) -> str:
        r = _create(qsvc, name, **spec)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["fields"][0]["loc"] == ["body", field], r.text
        return r.json()["error"]["message"]

    msg = refused("g128", "quantize_group_size", quantize_group_size=128)
    assert "group size 128 does not divide the hidden_size 64" in msg and "use quantize_group_size 64 or 32" in msg
    assert "already quantized (AWQ 4-bit)" in refused("awq", model=qsvc.awq_repo)  # type: ignore[attr-defined]
    assert "deploy it as is" in refused("awq", model=qsvc.awq_repo)  # type: ignore[attr-defined]
    gpt2 = _copy_model(qsvc, "gpt2-like")
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert "GPT2LMHeadModel cannot be quantized" in refused("gpt2", model=str(gpt2))
    bare = _copy_model(qsvc, "no-weights")
    (bare / "model.safetensors").unlink()
    assert "no safetensors weights" in refused("bare", model=str(bare))
    outside = Path(__file__)
    assert "outside the allowed model roots" in refused("calib", "quantize_calib", quantize_calib=str(outside))
    assert refused("calib", "quantize_calib", quantize_calib="https://x/y.txt")
    assert qsvc.client.get("/api/endpoints").json()["endpoints"] == []


def test_no_space_fails_with_the_reason(qsvc: LiveService) -> None:
    calib = qsvc.roots / "calib.txt"  # type: ignore[attr-defined]
    calib.write_text("A calibration text of the user's own.\n\nIt is accepted under an allowed root.\n")
    qsvc.space.free = 1000  # type: ignore[attr-defined]
    try:
        r = _create(qsvc, "nospace", quantize_group_size=64, quantize_calib=str(calib))
        assert r.status_code == 201, r.text
        e = wait_status(qsvc, "nospace", {"failed", "running"}, timeout=120)
    finally:
        qsvc.space.free = None  # type: ignore[attr-defined]
    assert e["status"] == "failed" and e["reason"].startswith("quantizing failed: no space"), e["reason"]
    assert "GB are free under" in e["reason"] and not _workers(qsvc.data)  # type: ignore[attr-defined]
    assert _entries(qsvc) == ([], [])  # nothing was written
    assert qsvc.client.delete("/api/endpoints/nospace").json()["status"] == "deleted"


@pytest.mark.slow
def test_fp16_model_becomes_an_awq_endpoint_and_the_cache_is_reused(qsvc: LiveService) -> None:
    r = _create(qsvc, "q1")
    assert r.status_code == 201, r.text
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 600
    while (e := qsvc.client.get("/api/endpoints/q1").json())["status"] not in ("running", "failed"):
        assert time.monotonic() < deadline, e
        if e["phase"] == "quantizing":
            seen.append(e["progress"])
        time.sleep(0.1)
    assert e["status"] == "running", e["reason"]
    phases = _phases(e)
    assert phases.index("downloading") < phases.index("quantizing") < phases.index("ready"), phases
    assert seen and all(p["layers_total"] == 2 and p["bytes_total"] > 0 for p in seen), seen
    assert e["progress"]["layers_done"] == e["progress"]["layers_total"] == 2
    assert chat(e, None)
    (entry,), partial = _entries(qsvc)
    assert not partial and entry.startswith("tiny--mixtral-none--")
    cfg = json.loads((qsvc.data / "quantized" / entry / "config.json").read_text())  # type: ignore[attr-defined]
    assert cfg["quantization_config"]["quant_method"] == "awq" and cfg["quantization_config"]["group_size"] == 32
    logs = "\n".join(qsvc.client.get("/api/endpoints/q1/logs", params={"tail": 2000}).json()["lines"])
    assert f"quantized/{entry}" in logs  # the server was started on the quantized checkpoint
    stamp = (qsvc.data / "quantized" / entry / "config.json").stat().st_mtime_ns  # type: ignore[attr-defined]
    assert qsvc.client.delete("/api/endpoints/q1").json()["status"] == "deleted"

    # a second deploy of the same repo, revision and settings skips quantizing
    assert _create(qsvc, "q2").status_code == 201
    e = wait_status(qsvc, "q2", {"running", "failed"}, timeout=300)
    assert e["status"] == "running", e["reason"]
    assert "quantizing" not in _phases(e) and chat(e, None)
    logs = "\n".join(qsvc.client.get("/api/endpoints/q2/logs", params={"tail": 2000}).json()["lines"])
    assert f"quantized checkpoint from the cache: {entry}" in logs
    assert _entries(qsvc) == ([entry], [])
    assert (qsvc.data / "quantized" / entry / "config.json").stat().st_mtime_ns == stamp  # type: ignore[attr-defined]
    assert qsvc.client.delete("/api/endpoints/q2").json()["status"] == "deleted"


@pytest.mark.slow
def test_delete_or_restart_while_quantizing_stops_the_worker_and_the_next_run_resumes(qsvc: LiveService) -> None:
    before = _entries(qsvc)[0]
    assert _create(qsvc, "q3", quantize_group_size=64).status_code == 201  # another settings key
    pid = _hold_worker(qsvc, "q3", 1)
    assert qsvc.client.delete("/api/endpoints/q3").json()["status"] == "deleted"
    _gone(pid)
    complete, partial = _entries(qsvc)
    assert complete == before and len(partial) == 1  # the finished layer is kept to resume; nothing served

    # deployed again it resumes; the service restarts meanwhile: the new one resumes again
    assert _create(qsvc, "q3", quantize_group_size=64).status_code == 201
    pid = _hold_worker(qsvc, "q3", 0)
    _restart(qsvc)
    _gone(pid)
    e = wait_status(qsvc, "q3", {"running", "failed"}, timeout=600)
    assert e["status"] == "running", e["reason"]
    logs = "\n".join(qsvc.client.get("/api/endpoints/q3/logs", params={"tail": 2000}).json()["lines"])
    assert logs.count(f"resuming the quantization in {partial[0]}") == 2, logs
    complete, partial = _entries(qsvc)
    assert len(complete) == len(before) + 1 and not partial
    assert chat(e, None)
    assert qsvc.client.delete("/api/endpoints/q3").json()["status"] == "deleted"


def test_a_missing_shard_fails_with_the_quantizers_reason(qsvc: LiveService) -> None:
    d = _copy_model(qsvc, "missing-shard")
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"  # listed, never uploaded
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _create(qsvc, "shard", model=str(d)).status_code == 201
    e = wait_status(qsvc, "shard", {"running", "failed"}, timeout=300)
    assert e["status"] == "failed" and "MissingFiles" in e["reason"], e["reason"]
    assert "model-00002-of-00002.safetensors" in e["reason"]
    assert not [n for n in _entries(qsvc)[1] if n.startswith("local-missing-shard")]  # a failed run leaves none
    assert qsvc.client.delete("/api/endpoints/shard").json()["status"] == "deleted"
