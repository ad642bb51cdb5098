"""Quantized checkpoints made on deploy, cached under the service's data dir and reused.

An entry is `<data_dir>/quantized/<source>--<commit>--<settings key>/`, one per (repo or
local dir, revision commit or content fingerprint, quantization settings). The worker
(`quantize_worker`) writes into `<entry>.partial/`; only a complete result is renamed to the
entry, so a half-written checkpoint is never served. An interrupted run (delete, pause,
service restart) leaves the `.partial` to resume into; a run that failed removes it, so the
next one starts clean. One run per entry at a time (a lock per entry in this service, which
is the only one per data dir).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from hubdeploy.hub_integration.provisioner.files import private_dir

FreeBytes = Callable[[Path], int]


def disk_free_bytes(path: Path) -> int:
    """Bytes free on the filesystem holding `path` (the default free-space probe)."""
    return shutil.disk_usage(path).free


class QuantizeFailed(RuntimeError):
    """Quantizing could not finish; the message is the endpoint's reason."""


@dataclass(frozen=True)
class QuantizeJob:
    """One quantization: the 16-bit model directory and what names its cache entry."""

    src: Path
    source: str  # repo id, or `local-<dir name>`
    commit: str  # the revision's commit, or a fingerprint of a local directory's files
    method: str
    group_size: int
    calib: Path | None = None

    def entry_name(self) -> str:
        from hubdeploy.quantize import QuantizeSettings

        # the settings' key covers the calibration text's content, not just its path
        key = QuantizeSettings(method=self.method, group_size=self.group_size, calib=self.calib).key()
        source = re.sub(r"[^A-Za-z0-9_.\-]", "-", self.source.replace("/", "--"))
        return f"{source}--{self.commit[:40]}--{key}"


def local_fingerprint(model_dir: Path) -> str:
    """What names a local directory's version: its files' names, sizes and modification times."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(model_dir).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "local-" + h.hexdigest()[:16]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@dataclass
class QuantizeUpdate:
    layers_done: int
    layers_total: int
    bytes_written: int
    stage: str


class QuantizedCache:
    """The cache of quantized checkpoints; `get_or_make` runs the worker when an entry is missing."""

    def __init__(self, root: Path, kill: Callable[[subprocess.Popen], None],
                 free_bytes: FreeBytes = disk_free_bytes) -> None:
        self.root = private_dir(root)
        self.kill = kill  # ends a worker and its process group (the provisioner's way of stopping children)
        self.free_bytes = free_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def entry(self, job: QuantizeJob) -> Path:
        return self.root / job.entry_name()

    def partial(self, job: QuantizeJob) -> Path:
        return self.root / (job.entry_name() + ".partial")

    def lookup(self, job: QuantizeJob) -> Path | None:
        """The complete entry for `job`, if one was made before (config.json is written last)."""
        entry = self.entry(job)
        return entry if (entry / "config.json").is_file() else None

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def get_or_make(self, job: QuantizeJob, expected_bytes: int, on_progress: Callable[[QuantizeUpdate], None],
                    stopped: Callable[[], bool], log: TextIO, note: Callable[[str], None],
                    env: dict[str, str]) -> Path | None:
        """The entry for `job`, made now if missing; None when `stopped()` turned true first.
        The worker runs with `env` (no secrets; the GPU it may use) and writes its output to `log`.

        Raises `QuantizeFailed` (no space, the quantizer's error, a crashed worker).
        """
        lock = self._lock(job.entry_name())
        if not lock.acquire(blocking=False):  # another endpoint makes the same entry: wait for it
            note(f"waiting for another endpoint's quantization of the same model and settings ({job.entry_name()})")
            while not lock.acquire(timeout=0.2):
                if stopped():
                    return None
        try:
            hit = self.lookup(job)
            if hit is not None:
                return hit
            partial = self.partial(job)
            need = expected_bytes - dir_bytes(partial)
            free = self.free_bytes(self.root)
            if need > free:
                raise QuantizeFailed(f"no space: the quantized checkpoint needs about {need / 1e9:.2f} GB more, "
                                     f"{free / 1e9:.2f} GB are free under {self.root}; free some space "
                                     "(or delete unused entries there) and resume")
            if partial.exists():
                note(f"resuming the quantization in {partial.name}")
            if not self._run_worker(job, partial, on_progress, stopped, log, env):
                return None
            if not (partial / "config.json").is_file():
                raise QuantizeFailed("the quantizer finished without writing config.json")
            entry = self.entry(job)
            os.rename(partial, entry)  # atomic: the entry is complete or absent
            return entry
        finally:
            lock.release()

    def _run_worker(self, job: QuantizeJob, partial: Path, on_progress: Callable[[QuantizeUpdate], None],
                    stopped: Callable[[], bool], log: TextIO, env: dict[str, str]) -> bool:
        """Run the worker into `partial`; False when stopped (the worker killed, `partial` kept to resume)."""
        spec = {"src": str(job.src), "out": str(partial), "method": job.method, "group_size": job.group_size,
                "calib": str(job.calib) if job.calib else None, "parent": os.getpid()}
        cmd = [sys.executable, "-m", "hubdeploy.hub_integration.provisioner.quantize_worker", json.dumps(spec)]
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                                 start_new_session=True, cwd=self.root, env=env)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name=f"quantize-{partial.name}", daemon=True).start()
        error: dict[str, str] | None = None
        while True:
            if stopped():
                self.kill(popen)
                return False
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                on_progress(QuantizeUpdate(int(event["layers_done"]), int(event["layers_total"]),
                                           int(event["bytes_written"]), str(event.get("stage", ""))))
            elif event.get("event") == "error":
                error = event
        code = popen.wait()
        if stopped():
            return False
        if error is not None or code != 0:
            shutil.rmtree(partial, ignore_errors=True)  # the next run starts clean
            if error is not None:
                raise QuantizeFailed(f"{error.get('kind')}: {error.get('message')}")
            raise QuantizeFailed(f"the quantize worker exited with code {code} (the endpoint's log has its output)")
        return True
