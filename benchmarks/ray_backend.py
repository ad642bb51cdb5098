"""Ray backend vs local backend: time from create to `running`, and recovery after a node loss.

A real Ray cluster on this machine (`ray.cluster_utils.Cluster`: a CPU head and two workers
declaring one H100 each, the engine on the CPU) and the demo model from a local folder (no
download). Rounds alternate local and Ray so both see the same load; the ratio is Ray's
overhead for placing an actor and following it over its method calls.

    python benchmarks/ray_backend.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address is 127.0.0.1

from _common import use_source_tree  # noqa: E402

use_source_tree()


def wait(store: object, name: str, want: str, timeout: float = 300.0, other_than_pid: int | None = None) -> float:
    t0 = time.monotonic()
    while True:
        rec = store.get_endpoint(name)
        if rec.status == want and (other_than_pid is None or rec.pid not in (None, other_than_pid)):
            return time.monotonic() - t0
        if rec.status == "failed":
            raise RuntimeError(rec.reason)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{name}: {rec.status} after {timeout} s")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    from hubdeploy.hub_integration.demo import ensure_demo_model
    from hubdeploy.hub_integration.provisioner import Secrets, make_provisioner
    from hubdeploy.hub_integration.spec import DeploymentSpec
    from hubdeploy.hub_integration.store import Store

    work = Path(tempfile.mkdtemp(prefix="hubdeploy-raybench-"))
    model = str(ensure_demo_model(work / "demo"))
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=0, num_gpus=1, resources={"accelerator_type:H100": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="hubdeploy", log_to_driver=False)
    print(f"cluster of 3 nodes up in {time.monotonic() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    recovery: list[float] = []
    try:
        for backend, gpu in [("local", "cpu"), ("ray", "H100-80GB")] * args.rounds:
            data = Path(tempfile.mkdtemp(dir=work))
            store = Store(data / "hubdeploy.db")
            opts = {"cpu_slots": 1} if backend == "local" else {"engine_device": "cpu", "poll_interval": 0.1}
            prov = make_provisioner(backend, store, data, **opts)
            spec = DeploymentSpec(name="bench", model=model, gpu=gpu, access="public")
            store.create_endpoint("bench", spec.model_dump(), api_key_hash=None)
            t0 = time.monotonic()
            prov.provision(spec, Secrets())
            took = wait(store, "bench", "running")
            times[backend].append(took)
            print(f"{backend:5s} create → running {took:6.2f} s", flush=True)
            if backend == "ray":
                rec = store.get_endpoint("bench")
                node = rec.device.split(":", 1)[1]
                cluster.remove_node(next(w for w in workers if w.node_id == node))
                workers = [w for w in workers if w.node_id != node]
                took = wait(store, "bench", "running", other_than_pid=rec.pid)
                recovery.append(took)
                print(f"ray   node lost → running elsewhere {took:6.2f} s", flush=True)
                workers.append(cluster.add_node(num_cpus=0, num_gpus=1, resources={"accelerator_type:H100": 1}))
            prov.delete("bench")
            prov.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    print(f"\ncreate → running, median of {args.rounds}: local {med['local']:.2f} s "
          f"({spread['local'][0]:.2f}–{spread['local'][1]:.2f}), ray {med['ray']:.2f} s "
          f"({spread['ray'][0]:.2f}–{spread['ray'][1]:.2f}); ray/local {med['ray'] / med['local']:.2f}×")
    if recovery:
        print(f"node lost → running on another node: {', '.join(f'{r:.2f} s' for r in recovery)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
