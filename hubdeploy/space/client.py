"""An httpx client of the deploy service REST API (docs/deploy-service.md), so one page works anywhere.

Mounted in `hubdeploy up` the page calls its own service over loopback; on a Hugging Face
Space it calls a remote one whose URL and admin token come from the Space secrets
`HUBDEPLOY_URL` and `HUBDEPLOY_TOKEN`. Errors become `ServiceError` carrying the service's
own reason (its `detail`, or the inspection error's message) and the field it names.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

URL_ENV, TOKEN_ENV = "HUBDEPLOY_URL", "HUBDEPLOY_TOKEN"


class ServiceError(RuntimeError):
    """A failed service call: HTTP status, the service's reason, and the field it blames (if any)."""

    def __init__(self, status: int, message: str, loc: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.loc = status, message, loc or []

    @property
    def field(self) -> str | None:
        """`engine.max_model_len` for loc ['body', 'engine', 'max_model_len']."""
        parts = [str(p) for p in self.loc if p not in ("body", "query")]
        return ".".join(parts) or None

    @property
    def hint(self) -> str:
        """What to do about it, for statuses whose message may not say."""
        return {401: "Enter the deploy service's admin token (printed by `hubdeploy up`) under Service access.",
                403: "Accept the model's conditions on the Hub, then give a Hugging Face token with access.",
                409: "Pause or delete another endpoint on that device, or pick another GPU.",
                502: "The Hub did not answer: check the network or the service's --hub-endpoint.",
                503: "The Hub did not answer: try again in a moment."}.get(self.status, "")


def _reason(resp: httpx.Response) -> tuple[str, list[Any]]:
    try:
        body = resp.json()
    except ValueError:
        return (resp.text.strip()[:500] or resp.reason_phrase), []
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # the service's one error shape: {"error": {"message", "fields", ...}}
            fields = err.get("fields") or []
            loc = list(fields[0].get("loc") or []) if fields and isinstance(fields[0], dict) else []
            return str(err.get("message") or err), loc
        detail = body.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI 422
            first = detail[0]
            loc = list(first.get("loc") or [])
            where = ".".join(str(p) for p in loc if p not in ("body", "query"))
            return (f"{where}: {first.get('msg')}" if where else str(first.get("msg"))), loc
        if detail is not None:
            return str(detail), []
    return json.dumps(body)[:500], []


class ServiceClient:
    """Typed-enough calls of the deploy service; every method returns the JSON the API answers."""

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not base_url:
            raise ValueError(f"no deploy service URL: set {URL_ENV} (e.g. https://deploy.example.org)")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, hf_token: str | None = None, **kw: Any) -> Any:
        headers = {"X-HF-Token": hf_token} if hf_token else None
        try:
            resp = self._http.request(method, path, headers=headers, **kw)
        except httpx.TimeoutException:
            raise ServiceError(504, f"the deploy service at {self.base_url} did not answer in time") from None
        except httpx.TransportError as e:
            raise ServiceError(503, f"cannot reach the deploy service at {self.base_url} ({e}); "
                                    f"is it running? (`hubdeploy up`, or check {URL_ENV})") from None
        if resp.status_code >= 400:
            msg, loc = _reason(resp)
            raise ServiceError(resp.status_code, msg, loc)
        return resp.json()

    # -- the routes (docs/deploy-service.md, "API") -----------------------------------
    def inspect(self, model: str, revision: str | None = None, hf_token: str | None = None) -> dict[str, Any]:
        """Report, compatibility and one memory plan per GPU (`GET /api/inspect`)."""
        params = {"model": model, **({"revision": revision} if revision else {})}
        return self._call("GET", "/api/inspect", params=params, hf_token=hf_token)

    def defaults(self) -> dict[str, Any]:
        return self._call("GET", "/api/defaults")

    def create(self, spec: dict[str, Any], hf_token: str | None = None) -> dict[str, Any]:
        """Create and start an endpoint; a private endpoint's `api_key` is in this answer only."""
        body = {**spec, **({"hf_token": hf_token} if hf_token else {})}
        return self._call("POST", "/api/endpoints", json=body)

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/endpoints")["endpoints"]

    def get(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/api/endpoints/{name}")

    def patch(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", f"/api/endpoints/{name}", json=changes)

    def delete(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/endpoints/{name}")

    def pause(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/api/endpoints/{name}/pause")

    def resume(self, name: str, hf_token: str | None = None) -> dict[str, Any]:
        return self._call("POST", f"/api/endpoints/{name}/resume", hf_token=hf_token)

    def rotate_key(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/api/endpoints/{name}/rotate_key")

    def logs(self, name: str, tail: int = 200) -> list[str]:
        return self._call("GET", f"/api/endpoints/{name}/logs", params={"tail": tail})["lines"]


def stream_chat(base_url: str, api_key: str | None, model: str, messages: list[dict[str, str]], *,
                temperature: float = 0.7, max_tokens: int = 128, timeout: float = 120.0) -> Iterator[str]:
    """Text deltas of `POST {base_url}/chat/completions` with `stream: true` (OpenAI SSE)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
            "stream": True}
    with httpx.stream("POST", base_url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                      timeout=timeout) as resp:
        if resp.status_code >= 400:
            resp.read()
            try:
                err = resp.json().get("error", {})
                msg = err.get("message") if isinstance(err, dict) else str(err)
            except ValueError:
                msg = resp.text[:300]
            raise ServiceError(resp.status_code, f"the endpoint answered {resp.status_code}: {msg}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if chunk.get("error"):
                raise ServiceError(500, f"the endpoint failed mid-stream: {chunk['error'].get('message')}")
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    yield delta
