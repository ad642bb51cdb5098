"""Secrets of the deploy service: the admin token and per-endpoint API keys.

Only salted scrypt hashes are stored; comparison is constant-time. Tokens are random
(256 bits), so the KDF cost is moderate and a verified token is remembered in-process
(keyed by a SHA-256 of the token, never the token itself) to keep each request cheap.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable

ADMIN_PREFIX = "hdadm_"
ENDPOINT_KEY_PREFIX = "hdk_"
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32

_verified: set[tuple[str, str]] = set()
_verified_lock = threading.Lock()


def generate_token(prefix: str = ENDPOINT_KEY_PREFIX) -> str:
    """A new random secret (URL-safe), with a prefix that tells what it is when it leaks."""
    return prefix + secrets.token_urlsafe(32)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_secret(secret: str) -> str:
    """`scrypt$n$r$p$salt$hash`: what the store keeps instead of the secret."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(dk)}"


def verified_before(secret: str | None, encoded: str | None) -> bool:
    """True when `secret` was verified against `encoded` in this process already (no hashing)."""
    if not secret or not encoded:
        return False
    with _verified_lock:
        return (hashlib.sha256(secret.encode()).hexdigest(), encoded) in _verified


def verify_secret(secret: str | None, encoded: str | None) -> bool:
    """True when `secret` hashes to `encoded`; constant-time comparison, False on any junk."""
    if not secret or not encoded:
        return False
    cache_key = (hashlib.sha256(secret.encode()).hexdigest(), encoded)
    with _verified_lock:
        if cache_key in _verified:
            return True
    try:
        algo, n, r, p, salt, want = encoded.split("$")
        if algo != "scrypt":
            return False
        dk = hashlib.scrypt(secret.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                            dklen=len(_unb64(want)))
    except (ValueError, TypeError):
        return False
    ok = hmac.compare_digest(dk, _unb64(want))
    if ok:
        with _verified_lock:
            _verified.add(cache_key)
    return ok


class HubUsers:
    """Hugging Face accounts let into the service with their own HF token (OAuth on a Space).

    A bearer token that is not the admin token is checked with the Hub's `whoami`: the user
    is in if their name, or one of their organisations, is in `allowed`. Verdicts are kept
    for `ttl` seconds, keyed by a SHA-256 of the token; a Hub that does not answer lets no one in.
    """

    def __init__(self, allowed: Iterable[str], endpoint: str | None = None, ttl: float = 300.0) -> None:
        self.allowed = {a.strip() for a in allowed if a and a.strip()}
        self.endpoint = endpoint
        self.ttl = ttl
        self._verdicts: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()

    def allows(self, token: str | None) -> bool:
        if not token or not self.allowed:
            return False
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._verdicts.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            me = HfApi(endpoint=self.endpoint).whoami(token=token)
        except HfHubHTTPError as e:
            if getattr(e.response, "status_code", None) != 401:
                return False  # the Hub failed: no verdict to remember
            me = {}
        except Exception:  # noqa: BLE001 - connection refused, timeouts (httpx errors are not OSErrors)
            return False
        names = {me.get("name")} | {o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict)}
        ok = bool(names & self.allowed)
        with self._lock:
            self._verdicts[key] = (ok, now + self.ttl)
        return ok


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
