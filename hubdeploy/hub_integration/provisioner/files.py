"""What a provisioner keeps on the service's disk per endpoint: its log and its key.

The log (`data_dir/logs/<name>.log`) is what `GET …/logs` shows, wherever the server runs.
The endpoint key is kept for restarts in `data_dir/secrets/<name>.key`; the database holds
only its hash. Everything is owner-only: files 0600, folders 0700 (`private_dir`, `open_log`).
"""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any


def private_dir(path: Path) -> Path:
    """`path` created if needed and made owner-only (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_log(path: Path, binary: bool = False) -> Any:
    """`path` opened for appending, created owner-only (0600): logs carry request paths and reasons."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab") if binary else os.fdopen(fd, "a", encoding="utf-8")


class EndpointFiles:
    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.logs_dir = private_dir(self.data_dir / "logs")
        self.secrets_dir = private_dir(self.data_dir / "secrets")

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def key_path(self, name: str) -> Path:
        return self.secrets_dir / f"{name}.key"

    def note(self, name: str, line: str) -> None:
        """A line of the service's own about the endpoint, marked as such."""
        self.append(name, [f"[hubdeploy {time.strftime('%H:%M:%S')}] {line}"])

    def append(self, name: str, lines: list[str]) -> None:
        if lines:
            with open_log(self.log_path(name)) as f:
                f.write("".join(line + "\n" for line in lines))

    def tail(self, name: str, n: int = 200) -> list[str]:
        path = self.log_path(name)
        if not path.exists():
            return []
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=max(0, n))]

    def set_key(self, name: str, api_key: str | None) -> None:
        path = self.key_path(name)
        if api_key is None:
            path.unlink(missing_ok=True)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(api_key)

    def get_key(self, name: str) -> str | None:
        try:
            return self.key_path(name).read_text().strip() or None
        except OSError:
            return None

    def remove(self, name: str) -> None:
        self.log_path(name).unlink(missing_ok=True)
        self.key_path(name).unlink(missing_ok=True)
