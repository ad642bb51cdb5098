"""Provisioners: backends that run `hubdeploy serve` for a `DeploymentSpec`."""
from hubdeploy.hub_integration.provisioner.base import Provisioner, Secrets

__all__ = ["Provisioner", "Secrets", "LocalProvisioner"]


def __getattr__(name: str):  # lazy: the local backend pulls in subprocess/httpx machinery
    if name == "LocalProvisioner":
        from hubdeploy.hub_integration.provisioner.local import LocalProvisioner

        return LocalProvisioner
    raise AttributeError(name)
