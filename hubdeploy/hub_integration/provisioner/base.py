"""The provisioner interface: what any backend (local processes, a cluster) must do.

The service owns the spec, the store and the keys; a provisioner turns a validated
`DeploymentSpec` into a running `hubdeploy serve` somewhere and reports on it. All its
state goes through the store, so a new service process can `reconcile()` with the world.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hubdeploy.hub_integration.spec import DeploymentSpec

if TYPE_CHECKING:
    from hubdeploy.hub_integration.store import EndpointRecord, Store


@dataclass
class Secrets:
    """Secrets handed to the endpoint process by environment only (never argv, DB or logs)."""

    hf_token: str | None = None
    api_key: str | None = None  # the server's internal key (the gateway sends it), never a user's


class Provisioner(ABC):
    """A backend that runs endpoints. Methods return quickly; long work runs in the background."""

    store: Store
    # runs quantize-on-deploy (`DeploymentSpec.quantize`); a backend without it gets a 422 at create
    supports_quantize: bool = False

    @abstractmethod
    def provision(self, spec: DeploymentSpec, secrets: Secrets) -> None:
        """Start (or restart) `spec.name`: claim a device, fetch weights, start the server.

        Raises `store.SlotUnavailable` at once when no device is free; the rest is
        reported through the store's status/phase (`initializing` → `running` | `failed`).
        """

    @abstractmethod
    def stop(self, name: str) -> None:
        """Stop the endpoint's server and free its device; the record stays (`paused`)."""

    @abstractmethod
    def status(self, name: str) -> str:
        """The endpoint's status as the backend sees it now (one of `store.STATUSES`)."""

    @abstractmethod
    def logs(self, name: str, tail: int = 200) -> list[str]:
        """The last `tail` lines of the endpoint's log."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Stop the endpoint and remove everything the backend holds for it."""

    @abstractmethod
    def set_api_key(self, name: str, api_key: str | None) -> None:
        """Keep the key the endpoint's server runs with (the gateway's internal key) for restarts."""

    @abstractmethod
    def get_api_key(self, name: str) -> str | None:
        """The key kept by `set_api_key`, for a restart."""

    def reconcile(self) -> None:
        """At service start: re-adopt endpoints that still run, restart those that should. A record
        that cannot be restored becomes `failed` with the reason; the others go on."""
        for rec in self.store.list_endpoints():
            try:
                self._reconcile_one(rec)
            except Exception as e:  # noqa: BLE001 - one broken record must not stop the service
                self.store.update_endpoint(rec.name, status="failed", pid=None,
                                           reason=f"could not be restored at service start: {type(e).__name__}: {e}")

    @abstractmethod
    def _reconcile_one(self, rec: EndpointRecord) -> None:
        """`reconcile` for one record."""

    def _record_deleted(self, name: str, removed: str) -> None:
        """The store's side of `delete`, once the backend has removed `removed` (said in the event)."""
        self.store.update_endpoint(name, status="deleted", desired="deleted", phase=None, port=None, pid=None,
                                   url=None, device=None, api_key_hash=None, bytes_done=0, bytes_total=0,
                                layers_done=0, layers_total=0)
        self.store.add_event(name, "delete", f"endpoint deleted; {removed} removed")

    @abstractmethod
    def close(self) -> None:
        """Stop watching (service shutdown); endpoint processes keep running."""
