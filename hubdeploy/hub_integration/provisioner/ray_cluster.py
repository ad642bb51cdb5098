"""Ray backend: each endpoint is a detached, named Ray actor that runs `hubdeploy serve` on its node.

Ray does the placement: an endpoint on a catalog GPU asks for `num_gpus=1` plus that GPU's
`accelerator_type:<X>` resource (`cpu` asks for a CPU only), so two creates racing for the
last GPU cannot both run; the loser stays `pending` with the reason until a GPU frees up.
The actor (`ray_host.EndpointHost`, namespace `hubdeploy`, name `endpoint-<name>`) restarts
on another node when its node dies (`max_restarts=-1`); the service sees the new incarnation,
reports `initializing` and hands it the secrets again. Secrets travel only as arguments of
the `start()` method call, which Ray's state API, its logs and `ps` do not show.

One watcher thread per endpoint polls `report()`, mirrors the node's log lines into the
service's log file, follows the phases and readiness `/health` reports on the node's address
(`health`; never the log), and applies
`restart_on_failure` as the local backend does. Pause and delete kill the actor, which frees
its Ray resources and (by parent-death signal) the server. A new service process re-adopts
live actors by name (`reconcile`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubdeploy.hub_integration.provisioner.base import Provisioner, Secrets
from hubdeploy.hub_integration.provisioner.files import EndpointFiles
from hubdeploy.hub_integration.provisioner.health import Watchdog, later_phases, probe_health
from hubdeploy.hub_integration.provisioner.ray_host import EndpointHost
from hubdeploy.hub_integration.spec import DeploymentSpec, SpecError, recheck_local_paths
from hubdeploy.hub_integration.store import EndpointRecord, Store

NAMESPACE = "hubdeploy"
_CALL_TIMEOUT = 5.0


def actor_name(endpoint: str) -> str:
    return f"endpoint-{endpoint}"


def placement(gpu: str) -> dict[str, Any]:
    """Ray resource options for an endpoint on `gpu` (a catalog name or `cpu`).

    A GPU endpoint claims the GPU only: CPUs of GPU nodes are not what runs out.
    """
    if gpu == "cpu":
        return {"num_cpus": 1, "num_gpus": 0}
    from hubdeploy.hub_integration.gpus import get_gpu

    kind = get_gpu(gpu).ray_accelerator_type
    return {"num_cpus": 0, "num_gpus": 1, "resources": {f"accelerator_type:{kind}": 0.001}}


def pending_reason(gpu: str, cluster: dict[str, float], free: dict[str, float]) -> str:
    """Why an endpoint on `gpu` is not placed, from the cluster's total and free resources."""
    if gpu == "cpu":
        return f"waiting for a free CPU in the Ray cluster ({free.get('CPU', 0):g} of {cluster.get('CPU', 0):g} free)"
    from hubdeploy.hub_integration.gpus import get_gpu

    g = get_gpu(gpu)
    key = f"accelerator_type:{g.ray_accelerator_type}"
    if key not in cluster:
        return (f"no node of the Ray cluster has a {g.name} GPU (nodes declare it as resource {key!r}); "
                "add such a node or pick another GPU")
    return f"every {g.name} GPU of the Ray cluster is in use; waiting for one to free up"


@dataclass
class _Watch:
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class RayProvisioner(Provisioner):
    """Endpoints as detached Ray actors on a Ray cluster (`address`, or a local one Ray starts)."""

    def __init__(self, store: Store, data_dir: str | Path, *, address: str | None = None,
                 hub_endpoint: str | None = None, engine_device: str = "auto", poll_interval: float = 0.5,
                 health_failures: int = 3, start_timeout: float = 600.0, max_restarts: int = 3,
                 allowed_roots: list[Path] | None = None, busy_grace: float = 10.0) -> None:
        import ray

        self._ray = ray
        self.store = store
        self.files = EndpointFiles(data_dir)
        self.hub_endpoint = hub_endpoint
        self.engine_device = engine_device  # "cpu": nodes declare GPUs the engine must not use (tests)
        # where local models and adapters may live: re-checked at every start; run-time adapter loads too
        self.allowed_roots = None if allowed_roots is None else [Path(r) for r in allowed_roots]
        self.adapter_roots = [str(r) for r in self.allowed_roots or []]
        self.poll_interval = poll_interval
        self.health_failures = health_failures
        self.busy_grace = busy_grace  # a server that answers late is busy, not dead, this long (health.Watchdog)
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        self._remote_host = ray.remote(EndpointHost)
        self._hf_tokens: dict[str, str] = {}  # memory only, for restarts within this process
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()

    # --- keys and logs (on the service's disk) ----------------------------------------
    def set_api_key(self, name: str, api_key: str | None) -> None:
        self.files.set_key(name, api_key)

    def get_api_key(self, name: str) -> str | None:
        return self.files.get_key(name)

    def logs(self, name: str, tail: int = 200) -> list[str]:
        return self.files.tail(name, tail)

    def status(self, name: str) -> str:
        rec = self.store.get_endpoint(name)
        return rec.status if rec else "deleted"

    # --- actors -------------------------------------------------------------------------
    def _actor(self, name: str) -> Any | None:
        try:
            return self._ray.get_actor(actor_name(name), namespace=NAMESPACE)
        except ValueError:
            return None

    def _kill_actor(self, name: str) -> None:
        actor = self._actor(name)
        if actor is not None:
            try:
                self._ray.get(actor.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead or unplaced actor has nothing to stop
                pass
            self._ray.kill(actor, no_restart=True)
            deadline = time.monotonic() + 10
            while self._actor(name) is not None and time.monotonic() < deadline:  # the name is free again
                time.sleep(0.1)

    def _create_actor(self, spec: DeploymentSpec) -> Any:
        return self._remote_host.options(
            name=actor_name(spec.name), namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
            max_task_retries=0, max_concurrency=4, **placement(spec.gpu),
        ).remote(spec.name, self.hub_endpoint, self.engine_device, adapter_roots=self.adapter_roots)

    # --- interface ----------------------------------------------------------------------
    def provision(self, spec: DeploymentSpec, secrets: Secrets) -> None:
        name = spec.name
        self._stop_watch(name)
        self._kill_actor(name)
        if secrets.hf_token:
            self._hf_tokens[name] = secrets.hf_token
        self.set_api_key(name, secrets.api_key)  # the internal key the gateway sends (any access mode)
        self.store.update_endpoint(name, status="initializing", phase=None, desired="running", device=f"ray:{spec.gpu}",
                                   port=None, url=None, pid=None, reason=None, bytes_done=0, bytes_total=0)
        outside = self._outside_roots(spec)
        if outside is not None:
            self.store.update_endpoint(name, status="failed", reason=outside)
            self.files.note(name, "failed: " + outside)
            return
        actor = self._create_actor(spec)
        self.store.add_event(name, "provision", f"Ray actor {actor_name(name)} asks for {placement(spec.gpu)}")
        self.files.note(name, f"provisioning on the Ray cluster: {placement(spec.gpu)}")
        self._watch(spec, actor, adopt=False)

    def stop(self, name: str) -> None:
        self._stop_watch(name)
        self._kill_actor(name)
        if self.store.get_endpoint(name) is not None:
            self.store.update_endpoint(name, status="paused", desired="paused", phase=None, pid=None, url=None,
                                       port=None, reason=None)
            self.files.note(name, "stopped (paused); Ray actor and its resources released")

    def delete(self, name: str) -> None:
        self.stop(name)
        self.files.remove(name)
        self._hf_tokens.pop(name, None)
        self._record_deleted(name, "Ray actor, server, logs and key")

    def _reconcile_one(self, rec: EndpointRecord) -> None:
        if rec.desired != "running" or rec.status in ("failed", "paused"):
            return
        spec = DeploymentSpec.model_validate(rec.spec)
        actor = self._actor(rec.name)
        if actor is not None:
            self.store.add_event(rec.name, "adopt", f"re-adopted Ray actor {actor_name(rec.name)}")
            self._watch(spec, actor, adopt=True)
            return
        self.store.add_event(rec.name, "restart", "no Ray actor at service start; starting again")
        self.provision(spec, Secrets(api_key=self.get_api_key(rec.name)))

    def close(self) -> None:
        """Stop watching; the actors (and endpoints) keep running on the cluster."""
        self._closed.set()
        with self._lock:
            names = list(self._watches)
        for name in names:
            self._stop_watch(name)

    # --- watching -----------------------------------------------------------------------
    def _watch(self, spec: DeploymentSpec, actor: Any, adopt: bool) -> None:
        w = _Watch()
        w.thread = threading.Thread(target=self._follow, args=(spec, actor, w, adopt), daemon=True,
                                    name=f"ray-endpoint-{spec.name}")
        with self._lock:
            self._watches[spec.name] = w
        w.thread.start()

    def _stop_watch(self, name: str) -> None:
        with self._lock:
            w = self._watches.pop(name, None)
        if w is not None:
            w.stop.set()
            if w.thread is not None and w.thread is not threading.current_thread():
                w.thread.join(timeout=30)

    def _start(self, spec: DeploymentSpec, actor: Any) -> str:
        key = self.get_api_key(spec.name)
        return self._ray.get(actor.start.remote(spec.model_dump(), self._hf_tokens.get(spec.name), key),
                             timeout=_CALL_TIMEOUT)

    def _follow(self, spec: DeploymentSpec, actor: Any, w: _Watch, adopt: bool) -> None:
        """Until stopped: place, start, follow and keep the endpoint up (the one loop per endpoint)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        name = spec.name
        incarnation: str | None = None
        after = 0
        dog = Watchdog(self.health_failures, self.busy_grace)
        ready = False
        phase: str | None = None
        pending_ref = None
        started_at = time.monotonic()
        last: dict[str, Any] = {}
        while not w.stop.wait(self.poll_interval if incarnation else 0.05):
            if pending_ref is None:
                pending_ref = actor.report.remote(after)
            try:
                rep = self._ray.get(pending_ref, timeout=_CALL_TIMEOUT)
            except GetTimeoutError:  # not placed (yet), or being restarted on another node
                self._set(name, last, status="pending", url=None,
                          reason=pending_reason(spec.gpu, self._ray.cluster_resources(),
                                                self._ray.available_resources()))
                continue
            except RayActorError as e:  # its node went away (Ray restarts it elsewhere), or it was killed
                pending_ref = None
                if w.stop.is_set():
                    return
                if self._actor(name) is None:
                    self._set(name, last, status="failed", url=None, reason=f"the endpoint's Ray actor is gone: {e}")
                    return
                if incarnation is not None:
                    self._set(name, last, status="initializing", phase=None, url=None,
                              reason="its Ray node was lost; restarting on another node")
                continue
            pending_ref = None
            if rep["incarnation"] != incarnation:
                if incarnation is not None:
                    self.store.add_event(name, "moved", f"its node was lost; Ray restarted it on {rep['host']}")
                    self.files.note(name, f"node lost; the endpoint restarts on node {rep['host']}")
                incarnation, after, ready, started_at = rep["incarnation"], 0, False, time.monotonic()
                dog = Watchdog(self.health_failures, self.busy_grace)
                phase = None
                if adopt and rep["started"]:
                    after = rep["next_line"]
                    rec = self.store.get_endpoint(name)
                    phase = rec.phase if rec is not None else None  # the phases it has passed are recorded
                else:
                    self._set(name, last, status="initializing", url=None, reason=None)
                    self._start(spec, actor)
                adopt = False
                continue
            self.files.append(name, rep["lines"])
            after = rep["next_line"]
            failure = _failure(rep)
            health = probe_health(rep["host"], rep["port"]) if failure is None and rep["port"] is not None else None
            for new in later_phases(phase, [rep["phase"], *(health.phases if health is not None else ())]):
                if new != "ready":  # `ready` is recorded with the status, below
                    phase = new
                    self._set(name, last, phase=phase)
            self._set(name, last, bytes_done=rep["bytes_done"], bytes_total=rep["bytes_total"], port=rep["port"],
                      pid=rep["pid"], device=f"ray-node:{rep['node_id']}")
            if failure is None:
                healthy = health is not None and health.ready
                if healthy and not ready:
                    ready = True
                    url = f"http://{rep['host']}:{rep['port']}/v1"
                    self._set(name, last, status="running", phase="ready", url=url, reason=None)
                    self.store.add_event(name, "running", f"healthy at {url}")
                    self.files.note(name, f"running at {url}")
                if not ready and time.monotonic() - started_at > self.start_timeout:
                    failure = f"not healthy within {self.start_timeout:.0f} s"
                if ready:
                    failure = dog.observe(health)
            if failure is not None:
                if not self._restart_after_failure(spec, actor, w, failure, last):
                    return
                incarnation = None  # the next report starts it again

    def _restart_after_failure(self, spec: DeploymentSpec, actor: Any, w: _Watch, reason: str,
                               last: dict[str, Any]) -> bool:
        """Record the failure; restart the server when the spec asks (True), else free the node (False)."""
        name = spec.name
        tail = "\n".join(self.logs(name, 20))
        self.store.add_event(name, "failed", reason)
        self.files.note(name, "failed: " + reason)
        self._set(name, last, status="failed", url=None, pid=None, reason=f"{reason}; last log lines:\n{tail}")
        try:
            self._ray.get(actor.stop.remote(), timeout=30)
        except Exception:  # noqa: BLE001
            pass
        rec = self.store.get_endpoint(name)
        if not (spec.restart_on_failure and rec is not None and rec.restarts < self.max_restarts):
            self._ray.kill(actor, no_restart=True)  # frees its resources; the record keeps the reason
            return False
        if w.stop.wait(min(2.0 ** rec.restarts, 30.0)) or self._closed.is_set():
            return False
        outside = self._outside_roots(spec)
        if outside is not None:
            self._set(name, last, status="failed", reason=outside)
            self._ray.kill(actor, no_restart=True)
            return False
        self.store.update_endpoint(name, restarts=rec.restarts + 1)
        self.store.add_event(name, "restart", f"restart {rec.restarts + 1} of {self.max_restarts}")
        return True

    def _outside_roots(self, spec: DeploymentSpec) -> str | None:
        """Why `spec` may not start now (a local path no longer under the allowed roots), or None."""
        if self.allowed_roots is None:
            return None
        try:
            recheck_local_paths(spec, self.allowed_roots)
        except SpecError as e:
            return f"not started: {'.'.join(map(str, e.loc))}: {e.msg}"
        return None

    def _set(self, name: str, last: dict[str, Any], **fields: Any) -> None:
        """Write only what changed (the store keeps a history of status and phase changes)."""
        changed = {k: v for k, v in fields.items() if last.get(k, object()) != v}
        if changed:
            self.store.update_endpoint(name, **changed)
            last.update(changed)


def _failure(rep: dict[str, Any]) -> str | None:
    if rep["error"]:
        return rep["error"]
    if rep["exit_code"] is not None and not rep["started"]:
        return f"server process exited with code {rep['exit_code']}"
    return None

