"""Local backend: each endpoint is a `hubdeploy serve` child process on this machine.

Per endpoint: claim a device slot in SQLite (one `BEGIN IMMEDIATE`), pick a loopback
port, pre-download weights into the shared HF cache recording bytes done/total, start
`python -m hubdeploy serve ...` in its own session with secrets only in its environment,
follow the phases and readiness its `/health` reports (`health`; never its log, which
carries client-controlled text), and watch it until it stops or fails.

Endpoint URL: the child listens on loopback port P (`endpoint_host`); the record's
`http://<url_host>:P/v1` is the gateway's upstream (users get `<service>/endpoints/<name>/v1`,
`gateway.py`). The child's internal key is kept, for restarts, in `data_dir/secrets/<name>.key`
(mode 0600); the database holds only the hash of the user's key. The HF token lives in memory only and reaches the child by
environment; after a service restart the weights are already in the shared cache.
One service process per data dir.
"""
from __future__ import annotations

import fcntl
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm as _tqdm

from hubdeploy.hub_integration.provisioner.base import Provisioner, Secrets
from hubdeploy.hub_integration.provisioner.files import EndpointFiles, open_log
from hubdeploy.hub_integration.provisioner.health import Watchdog, later_phases, probe_health
from hubdeploy.hub_integration.provisioner.quantized_cache import (FreeBytes, QuantizedCache, QuantizeFailed,
                                                                   QuantizeJob, QuantizeUpdate, dir_bytes,
                                                                   disk_free_bytes, local_fingerprint)
from hubdeploy.hub_integration.spec import (DeploymentSpec, SpecError, classify_source, recheck_local_paths,
                                            resolve_local_dir, resolve_local_file)
from hubdeploy.hub_integration.store import EndpointRecord, SlotUnavailable, Store
from hubdeploy.serving.server.adapter_policy import LORA_ROOTS_ENV

_SCRUBBED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUBDEPLOY_API_KEY", "HUBDEPLOY_ADMIN_TOKEN",
                 "HUBDEPLOY_LORA_ADMIN_KEY", "HUBDEPLOY_LORA_ROOTS")


def detect_cuda_devices() -> list[int]:
    """Indices of CUDA GPUs on this host: `nvidia-smi -L` if present, else torch, else none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
            if n:
                return list(range(n))
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no torch / no driver means no GPU
        return []


def free_port(host: str = "127.0.0.1", avoid: set[int] | None = None) -> int:
    """A port the OS says is free now (not one of `avoid`)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if not avoid or port not in avoid:
            return port
    raise RuntimeError("could not find a free port")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def hub_cache_dir() -> str:
    """The Hugging Face cache as the environment says *now* (`HF_HUB_CACHE`, `HF_HOME/hub`).

    huggingface_hub freezes its constant at import; the child reads the environment at its
    start. Both use this one path (the child gets it as `HF_HUB_CACHE`), so what the
    service downloads is what the offline child finds.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def progress_class(report: Callable[[int, int], None]) -> type:
    """A tqdm class for `snapshot_download(tqdm_class=...)` that reports bytes (done, total)."""

    class _Recorder(_tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # record, never draw
            kwargs["disable"] = False
            kwargs["mininterval"] = 0.0
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if self.unit == "B":
                report(int(self.n), int(self.total or 0))
            return out

    return _Recorder


def _child_env(device: str) -> dict[str, str]:
    """The environment of an endpoint's child processes (server, quantize worker): the service's,
    without its secrets, and only the endpoint's own GPU (`cuda:N`) or none (`cpu:N`)."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1] if device.startswith("cuda:") else ""
    return env


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _kill_group(pid: int, timeout: float = 10.0, popen: subprocess.Popen | None = None) -> None:
    """SIGTERM the child's process group, SIGKILL after `timeout` s; reap it if it is ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for s in ((sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,)):  # a stopped child must wake to exit
            try:
                os.killpg(pid, s)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, s)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if popen is not None:
                if popen.poll() is not None:
                    return
            elif not _pid_alive(pid):
                return
            time.sleep(0.05)


@dataclass
class _Running:
    """What this service process knows about one endpoint it watches."""

    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    popen: subprocess.Popen | None = None
    pid: int | None = None


class EndpointFailed(RuntimeError):
    pass


class LocalProvisioner(Provisioner):
    """Runs endpoints as local child processes; one device slot each."""

    supports_quantize = True

    def __init__(self, store: Store, data_dir: str | Path, *, hub_endpoint: str | None = None,
                 endpoint_host: str = "127.0.0.1", url_host: str | None = None, cpu_slots: int = 1,
                 cuda_devices: list[int] | None = None, health_interval: float = 0.5,
                 health_failures: int = 3, start_timeout: float = 600.0, max_restarts: int = 3,
                 allowed_roots: list[Path] | None = None, busy_grace: float = 10.0,
                 free_bytes: FreeBytes = disk_free_bytes) -> None:
        self.store = store
        self.busy_grace = busy_grace
        # where local models and adapters may live: re-checked at every start, and the only
        # places a running endpoint may load adapters from (None: no check, as for `hubdeploy serve`)
        self.allowed_roots = None if allowed_roots is None else list(allowed_roots)
        self.data_dir = Path(data_dir)
        self.files = EndpointFiles(self.data_dir)
        self._lock_file = self._take_service_lock()
        # quantize on deploy: checkpoints made here, reused by later deploys (`free_bytes` probes the disk)
        self.quantized = QuantizedCache(self.data_dir / "quantized", lambda p: _kill_group(p.pid, popen=p),
                                        free_bytes)
        self.hub_endpoint = hub_endpoint
        self.endpoint_host = endpoint_host
        self.url_host = url_host or endpoint_host
        self.cpu_slots = cpu_slots
        self._cuda = cuda_devices
        self.health_interval = health_interval
        self.health_failures = health_failures
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self._running: dict[str, _Running] = {}
        self._hf_tokens: dict[str, str] = {}  # memory only, for restarts within this process
        self._lock = threading.RLock()
        self._name_locks: dict[str, threading.RLock] = {}
        self._closed = threading.Event()

    def _take_service_lock(self) -> Any:
        """One service per data dir: two would both adopt, restart and kill the same children."""
        f = open(self.data_dir / "service.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise RuntimeError(f"another hubdeploy service (pid {holder}) is using {self.data_dir}; "
                               "stop it first or pass another --data-dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f

    # --- devices ------------------------------------------------------------------
    def device_candidates(self, gpu: str) -> list[str]:
        """Slot names that can serve `gpu` ('cpu' or a GPU catalog name) on this host."""
        if gpu == "cpu":
            return [f"cpu:{i}" for i in range(self.cpu_slots)]
        if self._cuda is None:
            self._cuda = detect_cuda_devices()
        return [f"cuda:{i}" for i in self._cuda]

    # --- files --------------------------------------------------------------------
    def set_api_key(self, name: str, api_key: str | None) -> None:
        """Keep the endpoint server's key (0600 file beside the DB) for restarts."""
        self.files.set_key(name, api_key)

    def get_api_key(self, name: str) -> str | None:
        return self.files.get_key(name)

    def _log(self, name: str, line: str) -> None:
        self.files.note(name, line)

    def _name_lock(self, name: str) -> threading.RLock:
        """One lock per endpoint: API calls and automatic restarts never interleave."""
        with self._lock:
            return self._name_locks.setdefault(name, threading.RLock())

    # --- interface ----------------------------------------------------------------
    def provision(self, spec: DeploymentSpec, secrets: Secrets) -> None:
        with self._name_lock(spec.name):
            self._provision(spec, secrets)

    def _provision(self, spec: DeploymentSpec, secrets: Secrets) -> None:
        name = spec.name
        self._stop_watch(name)
        device = self.store.claim_slot(name, self.device_candidates(spec.gpu))
        rec = self.store.get_endpoint(name)
        used = {r.port for r in self.store.list_endpoints() if r.port and r.name != name}
        port = rec.port if rec and rec.port and rec.port not in used and port_is_free(self.endpoint_host, rec.port) \
            else free_port(self.endpoint_host, used)
        if secrets.hf_token:
            self._hf_tokens[name] = secrets.hf_token
        self.set_api_key(name, secrets.api_key)  # the internal key the gateway sends (any access mode)
        self.store.update_endpoint(name, status="initializing", phase=None, desired="running", device=device,
                                   port=port, url=None, pid=None, reason=None, bytes_done=0, bytes_total=0,
                                   layers_done=0, layers_total=0)
        self.store.add_event(name, "provision", f"device {device}, port {port}")
        self._start_worker(name, lambda run: self._bring_up(spec, device, port, run))

    def stop(self, name: str) -> None:
        with self._name_lock(name):
            self._stop(name)

    def _stop(self, name: str) -> None:
        run = self._stop_watch(name)
        rec = self.store.get_endpoint(name)
        pid = rec.pid if rec else None
        if pid and _pid_alive(pid) and self._is_our_server(pid, rec.port if rec else None):
            _kill_group(pid, popen=run.popen if run else None)
        elif run and run.popen is not None and run.popen.poll() is None:
            _kill_group(run.popen.pid, popen=run.popen)
        self.store.release_slot(name)
        if rec is not None:
            self.store.update_endpoint(name, status="paused", desired="paused", phase=None, pid=None, url=None,
                                       reason=None)
            self._log(name, "stopped (paused)")

    def status(self, name: str) -> str:
        rec = self.store.get_endpoint(name)
        return rec.status if rec else "deleted"

    def logs(self, name: str, tail: int = 200) -> list[str]:
        return self.files.tail(name, tail)

    def delete(self, name: str) -> None:
        with self._name_lock(name):
            self._delete(name)

    def _delete(self, name: str) -> None:
        self._stop(name)
        self.files.remove(name)
        self._hf_tokens.pop(name, None)
        self._record_deleted(name, "process, slot, logs and key")

    def _reconcile_one(self, rec: EndpointRecord) -> None:
        if rec.desired != "running" or rec.status in ("failed", "paused"):
            if rec.status in ("failed", "paused"):
                self.store.release_slot(rec.name)
            return
        spec = DeploymentSpec.model_validate(rec.spec)
        if rec.pid and rec.port and _pid_alive(rec.pid) and self._is_our_server(rec.pid, rec.port):
            self.store.claim_slot(rec.name, [rec.device] if rec.device else self.device_candidates(spec.gpu))
            self.store.add_event(rec.name, "adopt", f"re-adopted pid {rec.pid} on port {rec.port}")
            ready = self._healthy(rec.port)
            if ready:
                self.store.update_endpoint(rec.name, status="running", phase="ready", url=self._url(rec.port))
            self._start_worker(rec.name, lambda run, spec=spec, pid=rec.pid, port=rec.port, ready=ready,
                               phase=rec.phase: self._adopt(spec, run, pid, port, ready, phase))
            return
        self.store.release_slot(rec.name)
        self.store.add_event(rec.name, "restart", "not running at service start; starting again")
        try:
            self.provision(spec, Secrets(api_key=self.get_api_key(rec.name)))
        except SlotUnavailable as e:
            self.store.update_endpoint(rec.name, status="failed", pid=None, reason=str(e))

    def close(self) -> None:
        """Stop all watcher threads; endpoint processes keep running (a new service re-adopts them)."""
        self._closed.set()
        with self._lock:
            runs = list(self._running.values())
            self._running.clear()
        for run in runs:
            run.stop.set()
        for run in runs:
            if run.thread is not None and run.thread is not threading.current_thread():
                run.thread.join(timeout=15)
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # --- workers ------------------------------------------------------------------
    def _start_worker(self, name: str, body: Callable[[_Running], None]) -> None:
        run = _Running()

        def target() -> None:
            try:
                body(run)
            except Exception as e:  # noqa: BLE001 - any failure becomes the endpoint's reason
                if not run.stop.is_set():
                    self._fail(name, run, str(e) if isinstance(e, EndpointFailed) else f"{type(e).__name__}: {e}")

        run.thread = threading.Thread(target=target, name=f"endpoint-{name}", daemon=True)
        with self._lock:
            self._running[name] = run
        run.thread.start()

    def _stop_watch(self, name: str) -> _Running | None:
        with self._lock:
            run = self._running.pop(name, None)
        if run is not None:
            run.stop.set()
            if run.thread is not None and run.thread is not threading.current_thread():
                run.thread.join(timeout=30)
        return run

    def _url(self, port: int) -> str:
        return f"http://{self.url_host}:{port}/v1"

    def _healthy(self, port: int) -> bool:
        health = probe_health(self.endpoint_host, port)
        return health is not None and health.ready

    @staticmethod
    def _is_our_server(pid: int, port: int | None) -> bool:
        """The pid is a `hubdeploy serve` on that port (not a recycled pid of something else)."""
        cmd = _pid_cmdline(pid)
        return "serve" in cmd and any("hubdeploy" in c for c in cmd) and (port is None or str(port) in cmd)

    def _download(self, spec: DeploymentSpec, run: _Running) -> Path | None:
        """Fetch model and Hub adapters into the shared cache, recording bytes; no half state on failure.

        Returns the model's snapshot directory (its name is the revision's commit) for a Hub model.
        """
        repos = [(spec.model, spec.revision)] if spec.model_kind == "repo" else []
        repos += [(src, None) for src in spec.adapters.values() if classify_source(src) == "repo"]
        if not repos:
            return None
        from huggingface_hub import HfApi, snapshot_download

        token = self._hf_tokens.get(spec.name)
        api = HfApi(endpoint=self.hub_endpoint, token=token or False)
        total = 0
        for repo, rev in repos:
            try:
                info = api.model_info(repo, revision=rev or "main", files_metadata=True)
                total += sum(int(s.size or 0) for s in (info.siblings or []))
            except Exception:  # noqa: BLE001 - sizes are best effort; the download reports its own
                pass
        done_before = 0
        last = [0.0]

        def report(done: int, bar_total: int) -> None:
            now = time.monotonic()
            if now - last[0] < 0.2 and done < bar_total:
                return
            last[0] = now
            self.store.update_endpoint(spec.name, bytes_done=done_before + done,
                                       bytes_total=max(total, done_before + bar_total))

        self.store.update_endpoint(spec.name, phase="downloading", bytes_total=total)
        model_path = None
        for repo, rev in repos:
            if run.stop.is_set():
                return None
            self._log(spec.name, f"downloading {repo}@{rev or 'main'}")
            try:
                path = snapshot_download(repo, revision=rev, token=token or False, endpoint=self.hub_endpoint,
                                         cache_dir=hub_cache_dir(), tqdm_class=progress_class(report))
            except Exception as e:
                self._remove_incomplete(repo)
                raise EndpointFailed(f"download of {repo}@{rev or 'main'} failed: {type(e).__name__}: {e}") from None
            done_before += sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
            model_path = model_path or Path(path)
        self.store.update_endpoint(spec.name, bytes_done=max(done_before, total), bytes_total=max(done_before, total))
        return model_path if spec.model_kind == "repo" else None

    @staticmethod
    def _remove_incomplete(repo: str) -> None:
        folder = Path(hub_cache_dir()) / ("models--" + repo.replace("/", "--"))
        for p in folder.glob("blobs/*.incomplete"):
            p.unlink(missing_ok=True)

    def _bring_up(self, spec: DeploymentSpec, device: str, port: int, run: _Running) -> None:
        if self.allowed_roots is not None:
            try:
                recheck_local_paths(spec, self.allowed_roots)
            except SpecError as e:
                raise EndpointFailed(f"not started: {'.'.join(map(str, e.loc))}: {e.msg}") from None
        model_path = self._download(spec, run)
        if run.stop.is_set():
            return
        serve_dir = None
        if spec.quantize:
            serve_dir = self._quantize(spec, run, model_path, device)
            if serve_dir is None:  # stopped while quantizing
                return
        env = _child_env(device)
        env["HF_HUB_OFFLINE"] = "1"  # everything is in the cache now; the child needs no network
        env["HF_HUB_CACHE"] = hub_cache_dir()  # the very cache `_download` filled
        if self.hub_endpoint:
            env["HF_ENDPOINT"] = self.hub_endpoint
        if self.allowed_roots:
            env[LORA_ROOTS_ENV] = os.pathsep.join(map(str, self.allowed_roots))
        token = self._hf_tokens.get(spec.name)
        if token:
            env["HF_TOKEN"] = token
        api_key = self.get_api_key(spec.name)
        if api_key:
            env["HUBDEPLOY_API_KEY"] = api_key
        dev_arg = "cuda" if device.startswith("cuda:") else "cpu"
        cmd = [sys.executable, "-m", "hubdeploy", "serve",
               *spec.serve_args(host=self.endpoint_host, port=port, device=dev_arg, model_dir=serve_dir)]
        self._log(spec.name, "starting: " + " ".join(cmd[1:]))
        with open_log(self.files.log_path(spec.name), binary=True) as log:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True, cwd=self.data_dir)
        run.popen, run.pid = popen, popen.pid
        self.store.update_endpoint(spec.name, pid=popen.pid)
        self.store.add_event(spec.name, "start", f"pid {popen.pid}")
        self._wait_ready(spec, run, port, "quantizing" if spec.quantize else
                         "downloading" if spec.model_kind == "repo" else None)
        self._watch(spec, run, popen.pid, port)

    def _quantize(self, spec: DeploymentSpec, run: _Running, snapshot: Path | None, device: str) -> Path | None:
        """The AWQ checkpoint of the spec's model: from the cache, or made now (phase `quantizing`,
        layers and bytes in the store) on the endpoint's device. None when the endpoint was stopped
        meanwhile."""
        from hubdeploy.hub_integration.errors import InspectError
        from hubdeploy.hub_integration.memory_plan import awq_on_deploy_bytes
        from hubdeploy.hub_integration.quantize_offer import calibration_label, quantize_refusal
        from hubdeploy.hub_integration.report import LocalSource, build_report

        if snapshot is not None:
            src = snapshot
        elif self.allowed_roots is not None:  # `./rel` is under the first root, as at create
            src = resolve_local_dir(spec.model, self.allowed_roots, "config.json", ("model",))
        else:
            src = Path(os.path.realpath(Path(spec.model).expanduser()))
        if snapshot is not None:
            source, commit = spec.model, snapshot.name
        else:
            source, commit = f"local-{src.name}", local_fingerprint(src)
        calib = None
        if spec.quantize_calib:
            calib = (resolve_local_file(spec.quantize_calib, self.allowed_roots, ("quantize_calib",))
                     if self.allowed_roots is not None else Path(os.path.realpath(spec.quantize_calib)))
        job = QuantizeJob(src=src, source=source, commit=commit, method=spec.quantize or "awq",
                          group_size=spec.quantize_group_size, calib=calib)
        hit = self.quantized.lookup(job)
        if hit is not None:
            self.store.add_event(spec.name, "quantize", f"reusing the cached quantization {hit.name}")
            self._log(spec.name, f"quantized checkpoint from the cache: {hit.name}")
            return hit
        try:  # the files as downloaded may differ from what was checked at create (a moved branch)
            report = build_report(LocalSource(src), with_adapters=False)
        except InspectError as e:
            raise EndpointFailed(f"quantizing failed: {e.message}") from None
        refusal = quantize_refusal(report)
        if refusal is not None:
            raise EndpointFailed(f"quantizing failed: {refusal}")
        expected, _ = awq_on_deploy_bytes(report, spec.quantize_group_size)
        self.store.update_endpoint(spec.name, phase="quantizing", layers_done=0, layers_total=report.arch.num_layers,
                                   bytes_done=0, bytes_total=expected)
        self.store.add_event(spec.name, "quantize", f"quantizing {source}@{commit[:12]} to AWQ 4-bit, group "
                                                    f"{spec.quantize_group_size}, with {calibration_label(calib)}")
        self._log(spec.name, f"quantizing to AWQ 4-bit into {self.quantized.partial(job).name}")
        last = [0.0, -1.0]  # when the store was last written, and the layers it says

        def progress(u: QuantizeUpdate) -> None:
            now = time.monotonic()
            if now - last[0] < 0.2 and u.layers_done == last[1]:  # a finished layer is always recorded
                return
            last[0], last[1] = now, u.layers_done
            self.store.update_endpoint(spec.name, layers_done=u.layers_done, layers_total=u.layers_total,
                                       bytes_done=u.bytes_written, bytes_total=max(expected, u.bytes_written))

        try:
            with open_log(self.files.log_path(spec.name)) as log:
                out = self.quantized.get_or_make(job, expected, progress, run.stop.is_set, log,
                                                 lambda line: self._log(spec.name, line), _child_env(device))
        except QuantizeFailed as e:
            raise EndpointFailed(f"quantizing failed: {e}") from None
        if out is not None:
            written = dir_bytes(out)
            self.store.update_endpoint(spec.name, layers_done=report.arch.num_layers, bytes_done=written,
                                       bytes_total=written)
            self.store.add_event(spec.name, "quantize", f"quantized: {out.name}")
        return out

    @staticmethod
    def _alive(run: _Running) -> bool:
        if run.popen is not None:
            return run.popen.poll() is None
        return run.pid is not None and _pid_alive(run.pid)

    def _wait_ready(self, spec: DeploymentSpec, run: _Running, port: int, phase: str | None) -> None:
        """Follow the phases the child's `/health` reports until it is ready (`running`)."""
        deadline = time.monotonic() + self.start_timeout
        while not run.stop.is_set():
            if not self._alive(run):
                raise EndpointFailed(self._exit_reason(spec.name, run.popen.returncode if run.popen else None))
            health = probe_health(self.endpoint_host, port)
            healthy = health is not None and health.ready
            for new in later_phases(phase, health.phases if health is not None else ()):
                if new != "ready":  # `ready` is recorded with the status, below
                    phase = new
                    self.store.update_endpoint(spec.name, phase=phase)
            if healthy:
                self.store.update_endpoint(spec.name, status="running", phase="ready", url=self._url(port),
                                           reason=None)
                self.store.add_event(spec.name, "running", f"healthy on port {port}")
                self._log(spec.name, f"running at {self._url(port)}")
                return
            if time.monotonic() > deadline:
                if run.pid:
                    _kill_group(run.pid, popen=run.popen)
                raise EndpointFailed(f"not healthy within {self.start_timeout:.0f} s; last log lines:\n"
                                     + "\n".join(self.logs(spec.name, 20)))
            run.stop.wait(0.2)

    def _exit_reason(self, name: str, code: int | None) -> str:
        tail = "\n".join(self.logs(name, 20))
        return f"server process exited with code {code}; last log lines:\n{tail}"

    def _adopt(self, spec: DeploymentSpec, run: _Running, pid: int, port: int, ready: bool,
               phase: str | None) -> None:
        """Watch a child started by an earlier service process (still loading, or ready)."""
        run.pid = pid
        if not ready:
            self._wait_ready(spec, run, port, phase)
        self._watch(spec, run, pid, port)

    def _watch(self, spec: DeploymentSpec, run: _Running, pid: int, port: int) -> None:
        """Until stopped: the process must live and `/health` must answer (`health.Watchdog`: a
        server that answers late is busy, not dead, for `busy_grace` s); else `failed`."""
        run.pid = pid
        dog = Watchdog(self.health_failures, self.busy_grace)
        while not run.stop.wait(self.health_interval):
            if not self._alive(run):
                code = run.popen.returncode if run.popen is not None else None
                raise EndpointFailed(self._exit_reason(spec.name, code))
            failure = dog.observe(probe_health(self.endpoint_host, port))
            if failure is not None and not run.stop.is_set():
                _kill_group(pid, popen=run.popen)
                raise EndpointFailed(f"{failure}; last log lines:\n" + "\n".join(self.logs(spec.name, 20)))

    def _fail(self, name: str, run: _Running, reason: str) -> None:
        """Record a failure, free the device, and restart when the spec asks for it."""
        if run.popen is not None and run.popen.poll() is None:
            _kill_group(run.popen.pid, popen=run.popen)
        self.store.release_slot(name)
        rec = self.store.get_endpoint(name)
        if rec is None or rec.desired != "running":
            return
        self._log(name, "failed: " + reason.splitlines()[0])
        self.store.add_event(name, "failed", reason.splitlines()[0])
        self.store.update_endpoint(name, status="failed", pid=None, url=None, reason=reason)
        spec = DeploymentSpec.model_validate(rec.spec)
        if spec.restart_on_failure and rec.restarts < self.max_restarts and not self._closed.is_set():
            delay = min(2.0 ** rec.restarts, 30.0)
            if run.stop.wait(delay) or self._closed.is_set():
                return
            lock = self._name_lock(name)
            while not lock.acquire(timeout=0.2):  # a concurrent stop/delete sets run.stop and wins
                if run.stop.is_set() or self._closed.is_set():
                    return
            try:
                rec = self.store.get_endpoint(name)
                if run.stop.is_set() or rec is None or rec.desired != "running" or rec.status != "failed":
                    return
                self.store.update_endpoint(name, restarts=rec.restarts + 1)
                self.store.add_event(name, "restart", f"restart {rec.restarts + 1} of {self.max_restarts}")
                with self._lock:
                    if self._running.get(name) is run:
                        self._running.pop(name)
                try:
                    self._provision(spec, Secrets(api_key=self.get_api_key(name)))
                except SlotUnavailable as e:
                    self.store.update_endpoint(name, status="failed", reason=str(e))
            finally:
                lock.release()
