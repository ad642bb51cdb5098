"""The Ray backend on a real 3-node Ray cluster on this machine (`ray.cluster_utils.Cluster`).

Nodes: the head (2 CPUs, no GPU) and two workers each declaring one H100 (`num_gpus=1`,
`accelerator_type:H100`) and no CPU, so CPU endpoints land on the head and GPU endpoints on
a worker. The declared GPUs do not exist: endpoints run the engine on the CPU
(`engine_device="cpu"`), which is the one thing here that differs from a real GPU fleet.
Every Ray address is 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), so the traffic stays
on loopback. One cluster for the module keeps the suite's time in check.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hubdeploy.hub_integration.service import build_service_app
from tests.fixtures.service import ADMIN, LiveService, chat, pid_alive, reap, wait_status

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: every Ray address is 127.0.0.1
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

HF_TOKEN = "hf_ray_test_token_never_in_ray_state_0001"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True})
    workers = [c.add_node(num_cpus=0, num_gpus=1, resources={"accelerator_type:H100": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="hubdeploy", log_to_driver=False)
    c.gpu_workers = workers
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def hub_repo(hub_tiny_model: Any) -> str:
    return hub_tiny_model("mixtral", "awq")


def _service(data: Path, local_hub: Any) -> LiveService:
    return LiveService(build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token=ADMIN, backend="ray",
                                         engine_device="cpu", poll_interval=0.3))


def _node_of(e: dict[str, Any]) -> str:
    assert e["device"].startswith("ray-node:"), e["device"]
    return e["device"].split(":", 1)[1]


def _pid(svc: LiveService, name: str) -> int | None:
    """The server's pid as the service recorded it (on its node; here, this machine)."""
    return svc.app.state.store.get_endpoint(name).pid


def _ray_state_text() -> str:
    """Everything Ray's state API tells about actors and tasks, in detail."""
    from ray.util import state

    time.sleep(2)  # task events reach the GCS in batches
    return repr(state.list_actors(detail=True, limit=1000)) + repr(state.list_tasks(detail=True, limit=10000))


def test_ray_cluster_endpoints(tmp_path: Path, cluster: Any, local_hub: Any, hub_repo: str) -> None:
    data = tmp_path / "svc"
    svc = _service(data, local_hub)
    head = cluster.head_node.node_id
    gpu_nodes = {n.node_id for n in cluster.gpu_workers}
    try:
        # quantize on deploy is the local backend's: refused up front, naming the field
        r = svc.client.post("/api/endpoints", json={"name": "quant", "model": hub_repo, "quantize": "awq"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["loc"] == ["body", "quantize"], r.text
        assert "does not quantize on deploy" in r.json()["error"]["message"]
        r = svc.client.post("/api/endpoints", json={"name": "on-gpu", "model": hub_repo, "gpu": "H100",
                                                    "hf_token": HF_TOKEN})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        r = svc.client.post("/api/endpoints", json={"name": "on-cpu", "model": hub_repo, "gpu": "cpu",
                                                    "access": "public", "restart_on_failure": True})
        assert r.status_code == 201, r.text
        # an endpoint no node can take stays pending, with the reason
        r = svc.client.post("/api/endpoints", json={"name": "no-room", "model": hub_repo, "gpu": "L4",
                                                    "access": "public"})
        assert r.status_code == 201, r.text

        g = wait_status(svc, "on-gpu", {"running", "failed"}, timeout=180)
        assert g["status"] == "running", g["reason"]
        c = wait_status(svc, "on-cpu", {"running", "failed"}, timeout=180)
        assert c["status"] == "running", c["reason"]
        assert _node_of(g) in gpu_nodes and _node_of(c) == head
        phases = [h["phase"] for h in g["history"] if h["phase"]]
        assert phases.index("downloading") < phases.index("loading") < phases.index("ready"), phases
        assert g["progress"]["bytes_done"] == g["progress"]["bytes_total"] > 0
        assert chat(g, key) and chat(c, None)
        import openai
        with pytest.raises(openai.AuthenticationError):
            chat(g, "hdk_wrong")
        lines = svc.client.get("/api/endpoints/on-gpu/logs", params={"tail": 200}).json()["lines"]
        assert any("phase: ready" in line for line in lines)

        n = wait_status(svc, "no-room", {"pending"}, timeout=60)
        assert "no node of the Ray cluster has a L4 GPU" in n["reason"], n["reason"]

        # secrets: not in Ray's state API, not in any process's argv, not in Ray's logs
        ray_text = _ray_state_text()
        assert "on-gpu" in ray_text  # the dump does cover our actors and their method calls
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        ray_logs = "".join(p.read_text(errors="replace") for p in session_logs.rglob("*") if p.is_file())
        for secret in (key, HF_TOKEN):
            assert secret not in ray_text and secret not in ps and secret not in ray_logs

        # the node of the GPU endpoint goes away: it comes back on the other GPU node
        old_node, old_pid, cpu_pid = _node_of(g), _pid(svc, "on-gpu"), _pid(svc, "on-cpu")
        assert old_pid and pid_alive(old_pid) and cpu_pid
        victim = next(w for w in cluster.gpu_workers if w.node_id == old_node)
        cluster.remove_node(victim)
        deadline = time.monotonic() + 60
        while pid_alive(old_pid):  # the server dies with its actor (parent-death signal)
            assert time.monotonic() < deadline, "the server outlived its node"
            time.sleep(0.2)
        g2 = svc.client.get("/api/endpoints/on-gpu").json()
        deadline = time.monotonic() + 180
        while not (g2["status"] == "running" and _pid(svc, "on-gpu") != old_pid):
            assert time.monotonic() < deadline, g2
            time.sleep(0.3)
            g2 = svc.client.get("/api/endpoints/on-gpu").json()
        assert _node_of(g2) in gpu_nodes - {old_node}
        assert any(h["status"] == "initializing" for h in g2["history"][-6:]), g2["history"]
        assert chat(g2, key)  # the same key was handed to the new incarnation

        # the one H100 left is taken: another H100 endpoint waits, and runs once the first is paused
        r = svc.client.post("/api/endpoints", json={"name": "late", "model": hub_repo, "gpu": "H100",
                                                    "access": "public"})
        assert r.status_code == 201, r.text
        late = wait_status(svc, "late", {"pending", "running"}, timeout=60)
        assert late["status"] == "pending" and "in use" in late["reason"], late
        assert svc.client.post("/api/endpoints/on-gpu/pause").json()["status"] == "paused"
        late = wait_status(svc, "late", {"running", "failed"}, timeout=120)
        assert late["status"] == "running" and _node_of(late) == _node_of(g2), late
        assert svc.client.delete("/api/endpoints/late").json()["status"] == "deleted"
        assert svc.client.post("/api/endpoints/on-gpu/resume").json()["status"] in ("initializing", "pending")
        g2 = wait_status(svc, "on-gpu", {"running", "failed"}, timeout=120)
        assert g2["status"] == "running", g2["reason"]

        # the CPU endpoint's server crashes: restart_on_failure brings it back on its node
        os.kill(cpu_pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (_pid(svc, "on-cpu") not in (None, cpu_pid) and
                   svc.client.get("/api/endpoints/on-cpu").json()["status"] == "running"):
            assert time.monotonic() < deadline, svc.client.get("/api/endpoints/on-cpu").json()
            time.sleep(0.3)
        c = svc.client.get("/api/endpoints/on-cpu").json()
        assert c["restarts"] == 1 and any(h["status"] == "failed" for h in c["history"]), c
        cpu_pid = _pid(svc, "on-cpu")

        # a restarted service re-adopts the live actors: same servers, no restart
        pids = {"on-gpu": _pid(svc, "on-gpu"), "on-cpu": cpu_pid}
        svc.stop()
        svc = _service(data, local_hub)
        for name, pid in pids.items():
            e = wait_status(svc, name, {"running", "failed"}, timeout=60)
            assert e["status"] == "running" and _pid(svc, name) == pid, e
        assert chat(svc.client.get("/api/endpoints/on-cpu").json(), None)

        # delete kills actor and server
        assert svc.client.delete("/api/endpoints/on-cpu").json()["status"] == "deleted"
        with pytest.raises(ValueError):
            ray.get_actor("endpoint-on-cpu", namespace="hubdeploy")
        deadline = time.monotonic() + 30
        while pid_alive(cpu_pid):
            assert time.monotonic() < deadline, "delete left the server running"
            time.sleep(0.2)
    finally:
        for name in ("on-gpu", "on-cpu", "no-room", "late"):
            try:
                ray.kill(ray.get_actor(f"endpoint-{name}", namespace="hubdeploy"), no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        svc.stop()
        reap(data)
