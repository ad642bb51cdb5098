"""Deploy service end to end: real service on loopback, real `hubdeploy serve` children,
tiny models on the local Hub, the `openai` SDK as the client.

create (Hub repo id) → phases in order → running → chat → 401 with a wrong key → pause
(slot freed, URL refuses) → resume → kill the child (failed with reason) → resume →
restart the service (re-adopted) → delete (process, logs, key gone).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hubdeploy.hub_integration.service import build_service_app
from tests.fixtures.service import ADMIN, LiveService, chat, closed_port_url, pid_alive, reap, wait_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub_repo(hub_tiny_model: Any) -> str:
    return hub_tiny_model("mixtral", "awq", adapters=1)


def test_lifecycle_from_hub_repo(tmp_path: Path, local_hub: Any, hub_repo: str) -> None:
    data = tmp_path / "svc"
    svc = LiveService(build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token=ADMIN))
    try:
        r = svc.client.post("/api/endpoints", json={"name": "lc", "model": hub_repo, "gpu": "cpu", "tags": ["test"]})
        assert r.status_code == 201, r.text
        created = r.json()
        key = created["api_key"]
        assert key and key.startswith("hdk_")
        assert created["status"] in ("pending", "initializing")

        e = wait_status(svc, "lc", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        phases = [h["phase"] for h in e["history"] if h["phase"]]
        order = [p for p in ("downloading", "loading", "warming_up", "ready") if p in phases]
        assert order == ["downloading", "loading", "warming_up", "ready"], phases
        assert [phases.index(p) for p in order] == sorted(phases.index(p) for p in order)
        assert e["progress"]["bytes_total"] > 0
        assert e["progress"]["bytes_done"] == e["progress"]["bytes_total"]
        assert e["url"] == f"{svc.base_url}/endpoints/lc/v1"  # the gateway's stable URL

        assert chat(e, key)
        with pytest.raises(openai.AuthenticationError):
            chat(e, "hdk_wrong")
        with pytest.raises(openai.AuthenticationError):
            chat(e, None)
        store = svc.app.state.store
        assert store.claimed_slots() == {"cpu:0": "lc"}
        logs = svc.client.get("/api/endpoints/lc/logs", params={"tail": 50}).json()["lines"]
        assert any("phase: ready" in line for line in logs)

        # pause: process gone, slot freed, the server's port refuses, the gateway says why
        pid, direct = store.get_endpoint("lc").pid, store.get_endpoint("lc").url
        p = svc.client.post("/api/endpoints/lc/pause").json()
        assert p["status"] == "paused" and p["url"] is None
        assert not pid_alive(pid)
        assert store.claimed_slots() == {}
        with pytest.raises(httpx.ConnectError):
            httpx.get(direct.removesuffix("/v1") + "/health", timeout=2)
        r = httpx.get(e["url"] + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "endpoint_paused"

        # resume: same key works again
        assert svc.client.post("/api/endpoints/lc/resume").status_code == 200
        e = wait_status(svc, "lc", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        assert chat(e, key)

        # kill the child: failed with the reason, within seconds
        pid = store.get_endpoint("lc").pid
        t0 = time.monotonic()
        os.killpg(pid, signal.SIGKILL)
        f = wait_status(svc, "lc", {"failed"}, timeout=15)
        assert time.monotonic() - t0 < 10
        assert "exited" in f["reason"] and "log lines" in f["reason"]
        assert store.claimed_slots() == {}

        assert svc.client.post("/api/endpoints/lc/resume").status_code == 200
        e = wait_status(svc, "lc", {"running", "failed"})
        assert e["status"] == "running", e["reason"]

        # a hung child (SIGSTOP): /health fails 3 times → failed, process removed
        pid = store.get_endpoint("lc").pid
        os.kill(pid, signal.SIGSTOP)
        f = wait_status(svc, "lc", {"failed"}, timeout=30)
        assert "/health failed 3 times" in f["reason"]
        deadline = time.monotonic() + 15
        while pid_alive(pid):
            assert time.monotonic() < deadline, "hung child was not killed"
            time.sleep(0.1)

        assert svc.client.post("/api/endpoints/lc/resume").status_code == 200
        e = wait_status(svc, "lc", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        pid = store.get_endpoint("lc").pid
    except BaseException:
        reap(data)
        raise
    finally:
        svc.stop()

    # restart the service on the same data dir: the running endpoint is re-adopted
    svc = LiveService(build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token=ADMIN))
    try:
        listed = svc.client.get("/api/endpoints").json()["endpoints"]
        assert [x["name"] for x in listed] == ["lc"]
        e = wait_status(svc, "lc", {"running", "failed"}, timeout=30)
        assert e["status"] == "running"
        assert svc.app.state.store.get_endpoint("lc").pid == pid  # adopted, not restarted
        assert chat(e, key)

        d = svc.client.delete("/api/endpoints/lc")
        assert d.status_code == 200 and d.json()["status"] == "deleted"
        assert not pid_alive(pid)
        assert not (data / "logs" / "lc.log").exists()
        assert not (data / "secrets" / "lc.key").exists()
        assert svc.client.get("/api/endpoints/lc").status_code == 404
        assert svc.client.get("/api/endpoints").json()["endpoints"] == []
        assert svc.app.state.store.claimed_slots() == {}
    finally:
        svc.stop()
        reap(data)


def test_restart_on_failure(tmp_path: Path, tiny_models: Any) -> None:
    """A spec with restart_on_failure comes back by itself after its process dies."""
    model = tiny_models("mixtral", "awq")
    svc = LiveService(build_service_app(tmp_path / "svc", admin_token=ADMIN, allowed_model_roots=[model.parent]))
    try:
        r = svc.client.post("/api/endpoints", json={"name": "phoenix", "model": str(model), "access": "public",
                                                    "restart_on_failure": True})
        assert r.status_code == 201, r.text
        assert r.json()["api_key"] is None
        e = wait_status(svc, "phoenix", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        assert chat(e, None)  # public: no key needed
        old_pid = svc.app.state.store.get_endpoint("phoenix").pid
        os.killpg(old_pid, signal.SIGKILL)
        wait_status(svc, "phoenix", {"failed"}, timeout=15)
        e = wait_status(svc, "phoenix", {"running"}, timeout=120)
        assert e["restarts"] == 1
        pid = svc.app.state.store.get_endpoint("phoenix").pid
        assert pid != old_pid
        assert chat(e, None)
    finally:
        svc.stop()
    # the service is down and the endpoint dies meanwhile: the next service start restarts it
    os.killpg(pid, signal.SIGKILL)
    svc = LiveService(build_service_app(tmp_path / "svc", admin_token=ADMIN, allowed_model_roots=[model.parent]))
    try:
        e = wait_status(svc, "phoenix", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        assert svc.app.state.store.get_endpoint("phoenix").pid != pid
        assert any(ev["kind"] == "restart" for ev in svc.app.state.store.events("phoenix"))
        assert chat(e, None)
        svc.client.delete("/api/endpoints/phoenix")
    finally:
        svc.stop()
        reap(tmp_path / "svc")


def test_failed_download_leaves_no_half_state(tmp_path: Path) -> None:
    """The Hub goes away between validation and download: `failed` with the reason, slot free, no partial blobs."""
    from hubdeploy.hub_integration.provisioner.base import Secrets
    from hubdeploy.hub_integration.provisioner.local import LocalProvisioner, hub_cache_dir
    from hubdeploy.hub_integration.spec import DeploymentSpec
    from hubdeploy.hub_integration.store import Store

    dead = closed_port_url()
    store = Store(tmp_path / "db.sqlite")
    prov = LocalProvisioner(store, tmp_path, hub_endpoint=dead)
    spec = DeploymentSpec(name="dl", model="nobody/unreachable")
    store.create_endpoint("dl", spec.model_dump(), None)
    try:
        prov.provision(spec, Secrets())
        deadline = time.monotonic() + 60
        while store.get_endpoint("dl").status != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rec = store.get_endpoint("dl")
        assert "download of nobody/unreachable@main failed" in rec.reason
        assert rec.pid is None and store.claimed_slots() == {}
        folder = Path(hub_cache_dir()) / "models--nobody--unreachable"
        assert not list(folder.glob("blobs/*.incomplete"))
        assert "failed: download" in "\n".join(prov.logs("dl"))
    finally:
        prov.close()


def test_download_failing_midway_through_the_api(tmp_path: Path, local_hub: Any, tiny_models: Any) -> None:
    """One file of the repo cannot be fetched (its LFS object is gone), after others arrived.

    The endpoint ends `failed` naming the download, with no process, no claimed slot, no key
    left in use, no `.incomplete` blob; once the file is back, `resume` brings it up.
    """
    import hashlib
    import shutil

    from hubdeploy.hub_integration.provisioner.local import hub_cache_dir

    repo = "broken/missing-lfs-object"
    src = tmp_path / "src"
    shutil.copytree(tiny_models("mixtral", "awq"), src)
    (src / "training_state.pt").write_bytes(b"not needed to serve, but part of the repo" * 64)
    local_hub.add_repo(repo, src)
    oid = hashlib.sha256((src / "training_state.pt").read_bytes()).hexdigest()
    obj = local_hub.repo_path(repo) / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    kept = tmp_path / "kept-object"
    shutil.move(str(obj), str(kept))  # the Hub now fails on this one file (HTTP 500, after retries)

    data = tmp_path / "svc"
    svc = LiveService(build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token=ADMIN))
    try:
        r = svc.client.post("/api/endpoints", json={"name": "half", "model": repo})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        f = wait_status(svc, "half", {"failed", "running"}, timeout=90)
        assert f["status"] == "failed"
        assert f["reason"].startswith(f"download of {repo}@main failed"), f["reason"]
        assert f["phase"] == "downloading" and f["url"] is None
        rec = svc.app.state.store.get_endpoint("half")
        assert rec.pid is None and svc.app.state.store.claimed_slots() == {}
        folder = Path(hub_cache_dir()) / ("models--" + repo.replace("/", "--"))
        assert (folder / "blobs").is_dir()  # other files did arrive: the failure was midway
        assert not list(folder.glob("blobs/*.incomplete"))
        assert any("failed: download" in line for line in svc.client.get("/api/endpoints/half/logs").json()["lines"])
        assert not any(ev["kind"] == "start" for ev in svc.app.state.store.events("half"))  # no server started

        shutil.move(str(kept), str(obj))  # the Hub is whole again: resume completes the download and runs
        assert svc.client.post("/api/endpoints/half/resume").status_code == 200
        e = wait_status(svc, "half", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        assert e["progress"]["bytes_done"] == e["progress"]["bytes_total"] > 0
        assert chat(e, key)
        assert svc.client.delete("/api/endpoints/half").json()["status"] == "deleted"
    finally:
        svc.stop()
        reap(data)


def test_endpoint_with_hub_adapter(tmp_path: Path, local_hub: Any, hub_repo: str) -> None:
    """Base model + a LoRA adapter from the Hub, both addressable by `model`."""
    svc = LiveService(build_service_app(tmp_path / "svc", hub_endpoint=local_hub.endpoint, admin_token=ADMIN))
    try:
        r = svc.client.post("/api/endpoints", json={"name": "ad", "model": hub_repo,
                                                    "adapters": {"sql": f"{hub_repo}-lora-0"}})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        e = wait_status(svc, "ad", {"running", "failed"})
        assert e["status"] == "running", e["reason"]
        models = openai.OpenAI(base_url=e["url"], api_key=key).models.list()
        assert {m.id for m in models} >= {hub_repo, "sql"}
        assert chat(e, key, model="sql") is not None
        svc.client.delete("/api/endpoints/ad")
    finally:
        svc.stop()
        reap(tmp_path / "svc")


def test_download_progress_counts_bytes(tmp_path: Path, local_hub: Any, tiny_models: Any) -> None:
    """The tqdm class handed to `snapshot_download` sees bytes done/total grow to the files' size."""
    from huggingface_hub import snapshot_download

    from hubdeploy.hub_integration.provisioner.local import progress_class

    local_hub.add_repo("progress/mixtral-awq", tiny_models("mixtral", "awq"))
    seen: list[tuple[int, int]] = []
    path = snapshot_download("progress/mixtral-awq", endpoint=local_hub.endpoint, token=False,
                             cache_dir=tmp_path, tqdm_class=progress_class(lambda d, t: seen.append((d, t))))
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    assert len(seen) > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (size, size)


def test_restart_keeps_paused_and_failed_endpoints_as_they_were(tmp_path: Path) -> None:
    """A new service process on the same data dir: paused stays paused, failed keeps its reason,
    nothing is started and no device is claimed for them."""
    from fastapi.testclient import TestClient

    from hubdeploy.hub_integration.spec import DeploymentSpec
    from hubdeploy.hub_integration.store import Store

    data = tmp_path / "svc"
    store = Store(data / "hubdeploy.db")
    for name, status in (("sleepy", "paused"), ("broken", "failed")):
        store.create_endpoint(name, DeploymentSpec(name=name, model="org/m").model_dump(), None)
        store.update_endpoint(name, status=status, desired="paused" if status == "paused" else "running",
                              reason="it broke" if status == "failed" else None, port=1, device="cpu:0")
    store.claim_slot("broken", ["cpu:0"])  # a stale claim from before the restart
    app = build_service_app(data, admin_token=ADMIN)
    try:
        c = TestClient(app)
        got = {e["name"]: e for e in c.get("/api/endpoints", headers={"Authorization": f"Bearer {ADMIN}"})
               .json()["endpoints"]}
        assert {n: e["status"] for n, e in got.items()} == {"sleepy": "paused", "broken": "failed"}
        assert got["broken"]["reason"] == "it broke" and got["sleepy"]["url"] is None
        assert app.state.store.claimed_slots() == {}  # the stale claim is released
        assert not [ev for ev in app.state.store.events() if ev["kind"] in ("restart", "start", "provision")]
    finally:
        app.state.provisioner.close()
