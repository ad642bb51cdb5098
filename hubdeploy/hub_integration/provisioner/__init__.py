"""Provisioners: backends that run `hubdeploy serve` for a `DeploymentSpec`.

`local` (default): child processes on this machine. `ray`: detached actors on a Ray cluster
(`pip install 'hubdeploy[ray]'`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hubdeploy.hub_integration.provisioner.base import Provisioner, Secrets
from hubdeploy.hub_integration.store import Store

__all__ = ["Provisioner", "Secrets", "LocalProvisioner", "RayProvisioner", "BACKENDS", "make_provisioner"]

BACKENDS = ("local", "ray")


def make_provisioner(backend: str, store: Store, data_dir: str | Path, **options: Any) -> Provisioner:
    """The provisioner of `backend`, built with its own options (`address` for Ray, `cpu_slots` locally)."""
    if backend == "local":
        from hubdeploy.hub_integration.provisioner.local import LocalProvisioner

        return LocalProvisioner(store, data_dir, **options)
    if backend == "ray":
        try:
            from hubdeploy.hub_integration.provisioner.ray_cluster import RayProvisioner
        except ImportError as e:
            raise RuntimeError(f"the ray backend needs Ray: pip install 'hubdeploy[ray]' ({e})") from None
        return RayProvisioner(store, data_dir, **options)
    raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")


def __getattr__(name: str):  # lazy: backends pull in subprocess/httpx/Ray machinery
    if name == "LocalProvisioner":
        from hubdeploy.hub_integration.provisioner.local import LocalProvisioner

        return LocalProvisioner
    if name == "RayProvisioner":
        from hubdeploy.hub_integration.provisioner.ray_cluster import RayProvisioner

        return RayProvisioner
    raise AttributeError(name)
