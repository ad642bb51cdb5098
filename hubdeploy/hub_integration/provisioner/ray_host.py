"""The Ray actor that hosts one endpoint on whatever node Ray placed it: `EndpointHost`.

It downloads the weights into its node's HF cache (recording bytes), runs `hubdeploy serve`
as a child listening on the node's address, and answers `report()` polls from the service.
Its `phase` is its own (`downloading`); the server's phases and readiness the service reads
from the server's `/health` (`health`), never from its output, which carries request paths.
It knows no secret until `start()` hands them over by method call (never through actor
options, names, arguments of its creation or `runtime_env`, all of which Ray's state API
shows), and passes them to the child by environment only.

The child dies with the actor (`PR_SET_PDEATHSIG` from the supervising thread, which lives as
long as the child), so a lost node or a killed actor leaves no server behind. This module
imports nothing from Ray: `RayProvisioner` wraps the class with `ray.remote` at creation.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from hubdeploy.hub_integration.provisioner.local import (
    _SCRUBBED_ENV, _kill_group, free_port, hub_cache_dir, progress_class,
)
from hubdeploy.hub_integration.spec import DeploymentSpec, classify_source
from hubdeploy.serving.server.adapter_policy import LORA_ROOTS_ENV

_PR_SET_PDEATHSIG = 1
_LOG_KEEP = 2000  # lines kept in memory for `report()`; the service keeps the whole log


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it goes (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EndpointHost:
    """One endpoint's server on one Ray node. Every public method returns quickly."""

    def __init__(self, name: str, hub_endpoint: str | None = None, engine_device: str = "auto",
                 host: str | None = None, adapter_roots: list[str] | None = None) -> None:
        self.name = name
        self.adapter_roots = list(adapter_roots or [])
        self.hub_endpoint = hub_endpoint
        self.engine_device = engine_device
        self.host = host or _node_address()
        self.node_id = _node_id()
        self.incarnation = uuid.uuid4().hex  # a new one after Ray restarts the actor elsewhere
        self._lock = threading.Lock()
        self._lines: deque[tuple[int, str]] = deque(maxlen=_LOG_KEEP)
        self._next_line = 0
        self._phase: str | None = None
        self._bytes = (0, 0)
        self._popen: subprocess.Popen | None = None
        self._port: int | None = None
        self._error: str | None = None
        self._exit_code: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- called by the service ------------------------------------------------------
    def start(self, spec: dict[str, Any], hf_token: str | None, api_key: str | None) -> str:
        """Download and start the server unless it already runs; returns this incarnation's id."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self.incarnation
            self._error = self._exit_code = None
            self._stopping.clear()
            self._thread = threading.Thread(target=self._supervise, name=f"endpoint-{self.name}", daemon=True,
                                            args=(DeploymentSpec.model_validate(spec), hf_token, api_key))
            self._thread.start()
        return self.incarnation

    def report(self, after_line: int = 0) -> dict[str, Any]:
        """State for the service: where the server listens, its phase, bytes, exit, new log lines."""
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            lines = [text for i, text in self._lines if i >= after_line]
            return {"incarnation": self.incarnation, "node_id": self.node_id, "host": self.host, "port": self._port,
                    "pid": self._popen.pid if self._popen else None, "phase": self._phase,
                    "bytes_done": self._bytes[0], "bytes_total": self._bytes[1], "started": running,
                    "exit_code": self._exit_code, "error": self._error, "lines": lines,
                    "next_line": self._next_line}

    def stop(self) -> None:
        """Stop the server (the actor stays until the service kills it)."""
        self._stopping.set()
        popen = self._popen
        if popen is not None and popen.poll() is None:
            _kill_group(popen.pid, popen=popen)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- on the node ----------------------------------------------------------------
    def _say(self, line: str) -> None:
        with self._lock:
            self._lines.append((self._next_line, line))
            self._next_line += 1

    def _supervise(self, spec: DeploymentSpec, hf_token: str | None, api_key: str | None) -> None:
        """Download, start, follow the child's output until it exits (this thread is its parent)."""
        try:
            self._download(spec, hf_token)
            if self._stopping.is_set():
                return
            popen = self._spawn(spec, hf_token, api_key)
            assert popen.stdout is not None
            for raw in popen.stdout:  # until the child closes its output (exits)
                self._say(raw.decode(errors="replace").rstrip("\n"))
            code = popen.wait()
            with self._lock:
                self._exit_code = code
        except Exception as e:  # noqa: BLE001 - any failure is reported to the service
            with self._lock:
                self._error = f"{type(e).__name__}: {e}"
            self._say(f"[hubdeploy] failed: {self._error}")

    def _download(self, spec: DeploymentSpec, token: str | None) -> None:
        repos = [(spec.model, spec.revision)] if spec.model_kind == "repo" else []
        repos += [(src, None) for src in spec.adapters.values() if classify_source(src) == "repo"]
        if not repos:
            return
        from huggingface_hub import snapshot_download

        self._phase = "downloading"
        done_before = 0

        def report(done: int, total: int) -> None:
            self._bytes = (done_before + done, max(self._bytes[1], done_before + total))

        for repo, rev in repos:
            if self._stopping.is_set():
                return
            self._say(f"[hubdeploy] downloading {repo}@{rev or 'main'} on {self.host}")
            try:
                path = snapshot_download(repo, revision=rev, token=token or False, endpoint=self.hub_endpoint,
                                         cache_dir=hub_cache_dir(), tqdm_class=progress_class(report))
            except Exception as e:
                raise RuntimeError(f"download of {repo}@{rev or 'main'} failed: {type(e).__name__}: {e}") from None
            done_before += sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        self._bytes = (done_before, done_before)

    def _device(self) -> tuple[str, str]:
        """(`--device`, CUDA_VISIBLE_DEVICES) from the GPUs Ray gave this actor."""
        gpus = _ray_gpu_ids()
        if self.engine_device == "cpu" or not gpus:
            return "cpu", ""
        return "cuda", ",".join(str(g) for g in gpus)

    def _spawn(self, spec: DeploymentSpec, hf_token: str | None, api_key: str | None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_HUB_CACHE=hub_cache_dir())
        if self.hub_endpoint:
            env["HF_ENDPOINT"] = self.hub_endpoint
        if self.adapter_roots:
            env[LORA_ROOTS_ENV] = os.pathsep.join(self.adapter_roots)
        if hf_token:
            env["HF_TOKEN"] = hf_token
        if api_key:
            env["HUBDEPLOY_API_KEY"] = api_key
        device, visible = self._device()
        env["CUDA_VISIBLE_DEVICES"] = visible
        self._port = free_port(self.host)
        cmd = [sys.executable, "-m", "hubdeploy", "serve",
               *spec.serve_args(host=self.host, port=self._port, device=device)]
        self._say("[hubdeploy] starting: " + " ".join(cmd[1:]))
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self._popen = popen
        return popen


def _node_address() -> str:
    """The address Ray knows this node by (where the server must listen to be reached)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests of this class alone)
        return socket.gethostbyname("localhost")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


def _ray_gpu_ids() -> list[int]:
    try:
        import ray

        return [int(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside Ray
        return []

