"""Where a model's files are: a local Hub-layout directory as is, or a Hub snapshot.

Only what serving needs is downloaded (config, tokenizer, safetensors, JSON, model card),
never pickled `.bin` weights or other formats, with huggingface_hub's own progress bars.
`HF_ENDPOINT`, `HF_HOME` and `HF_HUB_CACHE` are read at call time (huggingface_hub reads
them once at import), so a process can point at a mirror or the tests' local Hub late.
"""
from __future__ import annotations

import os
from pathlib import Path

ALLOW_PATTERNS: list[str] = [
    "*.json",
    "*.safetensors",
    "*.md",
    "*.txt",
    "*.jinja",
    "tokenizer*",
    "*.model",  # sentencepiece tokenizers
]


class HubError(ValueError):
    """A model reference that cannot be resolved; says what is wrong and what to do."""


def resolve_model_dir(model: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """`model` as a local directory, or download its snapshot (repo id `org/name`) and return it.

    `token` defaults to `HF_TOKEN` (needed for gated and private repos).
    """
    local = Path(model).expanduser()
    if local.is_dir():
        if revision is not None:
            raise HubError(f"{local} is a local directory; a revision ({revision!r}) applies to Hub repos only")
        return local
    model = str(model)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise HubError(f"{model} is neither an existing local directory nor a Hub repo id (org/name)")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = token or os.environ.get("HF_TOKEN") or None
    at = f" at revision {revision!r}" if revision else ""
    try:
        path = snapshot_download(
            model, revision=revision, token=token, allow_patterns=ALLOW_PATTERNS,
            endpoint=os.environ.get("HF_ENDPOINT") or None, cache_dir=_cache_dir(),
        )
    except GatedRepoError:
        raise HubError(
            f"{model} is gated: accept its terms on its Hub page, then pass a token of that account "
            "(--token / HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{model} has no revision {revision!r}; give a branch, tag or commit that exists") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"repo {model} not found{at} on {_endpoint()} (check the name; private repos need a token "
            "via HF_TOKEN)"
        ) from None
    except HFValidationError as e:
        raise HubError(f"{model!r} is not a valid Hub repo id: {e}") from None
    except LocalEntryNotFoundError as e:
        raise HubError(f"cannot reach {_endpoint()} to download {model}{at} and it is not cached: {e}") from None
    return Path(path)


def _cache_dir() -> str | None:
    """`HF_HUB_CACHE` / `HF_HOME` as set now (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


__all__ = ["ALLOW_PATTERNS", "HubError", "resolve_model_dir"]
