"""Typed errors of Hub inspection; each carries the HTTP status the deploy service answers.

The message says what is wrong and what to do; `to_dict()` is the deploy service's error body
(its one error shape: `{"error": {status, code, message, fields, ...}, "detail": message}`).
"""
from __future__ import annotations

from typing import Any


class InspectError(Exception):
    """Base class: a model that cannot be inspected, with an actionable message."""

    status: int = 400
    code: str = "inspect_error"

    def __init__(self, message: str, *, repo_id: str | None = None, revision: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.repo_id = repo_id
        self.revision = revision

    def to_dict(self) -> dict[str, Any]:
        """The deploy service's one error shape (docs/deploy-service.md), with the model and revision."""
        return {"error": {"status": self.status, "code": self.code, "message": self.message, "fields": [],
                          "model": self.repo_id, "revision": self.revision},
                "detail": self.message}


class RepoNotFoundError(InspectError):
    """The repo does not exist, or is private and the token cannot see it."""

    status, code = 404, "repo_not_found"


class RevisionNotFoundError(InspectError):
    """The repo exists but not the branch, tag or commit asked for."""

    status, code = 404, "revision_not_found"


class GatedRepoError(InspectError):
    """Gated repo: no token (401) or a token without access (403)."""

    code = "gated_repo"

    def __init__(self, message: str, *, status: int = 403, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status


class HubUnreachableError(InspectError):
    """The Hub endpoint did not answer (network down, wrong URL, closed port)."""

    status, code = 502, "hub_unreachable"


class InvalidRepoError(InspectError):
    """The repo is reachable but is not a model we can read (no config.json, bad JSON, no weights)."""

    status, code = 422, "invalid_repo"


class CorruptCheckpointError(InspectError):
    """A safetensors header that does not parse or is inconsistent with the file."""

    status, code = 422, "corrupt_checkpoint"


class UnknownGPUError(InspectError):
    """A GPU name that is not in the catalog."""

    status, code = 400, "unknown_gpu"
