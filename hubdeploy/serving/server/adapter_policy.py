"""What `/v1/load_lora_adapter` may load: adapter names, and sources limited to Hub ids or
directories under the endpoint's allowed adapter roots.

Without this, anyone allowed to call the route could make the server read any directory it
can see, and tell from the errors which paths exist. A local source is resolved (symlinks
and all) and must sit under a root; one outside gets the same answer whether it exists or
not. `hubdeploy serve --lora-root DIR` (or `HUBDEPLOY_LORA_ROOTS`) sets the roots; the deploy
service passes its allowed model roots. No roots: Hub ids only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
LORA_ROOTS_ENV = "HUBDEPLOY_LORA_ROOTS"  # os.pathsep-separated, as the deploy service passes them
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}")


class AdapterRefused(ValueError):
    """A name or source the policy refuses; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def check_adapter_name(name: str) -> str:
    """`name` if it is a valid adapter name (as the deploy service's specs require)."""
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise AdapterRefused(f"adapter name must match {ADAPTER_NAME_PATTERN} (letters, digits, '_', '.', '-'; "
                             "at most 64)", "lora_name")
    return name


def roots_from_env(value: str | None) -> list[Path]:
    return [Path(p) for p in (value or "").split(os.pathsep) if p.strip()]


def allowed_source(source: str, roots: list[Path]) -> str:
    """The source to load: a Hub id (`org/name[@revision]`) as given, or the real path of a
    directory under one of `roots`; `AdapterRefused` otherwise."""
    if not source or any(ord(c) < 32 or c == "\x7f" for c in source) or "://" in source or "\\" in source:
        raise AdapterRefused("lora_path must be a Hub repo id (org/name[@revision]) or an absolute directory "
                             "under the endpoint's adapter roots", "lora_path")
    if source.startswith(("/", "~")):
        return _local(source, roots)
    repo, _, revision = source.partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or (revision and (not _REVISION.fullmatch(revision)
                                                                      or ".." in revision)):
        raise AdapterRefused(f"{source!r} is not a Hub repo id (org/name[@revision]); local adapters are given "
                             "as absolute paths under the endpoint's adapter roots", "lora_path")
    if Path(repo).exists():  # the loader would read a relative directory of that name: never
        raise AdapterRefused(f"{source!r} is also a relative path on the server; give an absolute path under the "
                             "endpoint's adapter roots, or a Hub repo id that is not one", "lora_path")
    return source


def _local(source: str, roots: list[Path]) -> str:
    real = Path(os.path.realpath(Path(source).expanduser()))  # not strict: no answer depends on existence
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not any(real == r or real.is_relative_to(r) for r in real_roots):
        where = (f"under {', '.join(map(str, real_roots))}" if real_roots else
                 "(this endpoint allows no local adapter paths at run time: start it with --lora-root DIR)")
        raise AdapterRefused(f"lora_path is not an allowed adapter location; local adapters must be directories "
                             f"{where}, or give a Hub repo id (org/name[@revision])", "lora_path")
    return str(real)
