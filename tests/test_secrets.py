"""Secrets: hashing of admin token and endpoint keys, and the HF token never leaking
into the DB file bytes, logs, API responses or any process's argv (/proc/*/cmdline)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hubdeploy.hub_integration import auth
from hubdeploy.hub_integration.service import ADMIN_HASH_KEY, build_service_app
from tests.fixtures.service import reap

HF_TOKEN = "hf_test_secret_token_e2b7c9"


def test_hash_and_verify() -> None:
    tok = auth.generate_token()
    h = auth.hash_secret(tok)
    assert h.startswith("scrypt$") and tok not in h
    assert h != auth.hash_secret(tok)  # salted
    assert auth.verify_secret(tok, h)
    assert not auth.verify_secret(tok + "x", h)
    assert not auth.verify_secret("", h) and not auth.verify_secret(tok, None)
    assert not auth.verify_secret(tok, "garbage") and not auth.verify_secret(tok, "scrypt$1$2$3$!!$??")
    assert auth.bearer_token("Bearer abc") == "abc" and auth.bearer_token("Basic abc") is None


def test_admin_token_made_once_and_stored_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBDEPLOY_ADMIN_TOKEN", raising=False)
    app = build_service_app(tmp_path)
    tok = app.state.new_admin_token
    assert tok and tok.startswith(auth.ADMIN_PREFIX)
    app.state.provisioner.close()
    assert tok.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("hubdeploy.db*"))
    app2 = build_service_app(tmp_path)
    assert app2.state.new_admin_token is None  # printed once only
    c = TestClient(app2)
    assert c.get("/api/endpoints", headers={"Authorization": f"Bearer {tok}"}).status_code == 200
    assert c.get("/api/endpoints", headers={"Authorization": "Bearer nope"}).status_code == 401
    app2.state.provisioner.close()
    monkeypatch.setenv("HUBDEPLOY_ADMIN_TOKEN", "operator-chosen")
    app3 = build_service_app(tmp_path)
    assert app3.state.new_admin_token is None
    assert auth.verify_secret("operator-chosen", app3.state.store.get_meta(ADMIN_HASH_KEY))
    app3.state.provisioner.close()


def _all_cmdlines() -> bytes:
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(p.read_bytes())
        except OSError:
            pass
    return b"\n".join(out)


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and "secrets" not in p.parts)


@pytest.mark.slow
def test_hf_token_and_api_key_never_leak(tmp_path: Path, local_hub: Any, tiny_models: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A gated repo deployed with an HF token: the token reaches the child only via its env."""
    import logging
    import subprocess

    caplog.set_level(logging.DEBUG)  # everything the service process logs, at every level
    repo = "gatedtiny/mixtral-awq"
    local_hub.add_repo(repo, tiny_models("mixtral", "awq"), gated=True)
    local_hub.grant(HF_TOKEN, repo)
    data = tmp_path / "svc"
    app = build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token="adm")
    c = TestClient(app)
    H = {"Authorization": "Bearer adm"}
    try:
        r = c.post("/api/endpoints", json={"name": "g", "model": repo}, headers=H)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "hf_token"]
        wrong = "hf_wrong_token_never_echoed"
        r = c.post("/api/endpoints", json={"name": "g", "model": repo, "hf_token": wrong}, headers=H)
        assert r.status_code == 422 and wrong.encode() not in r.content
        r = c.post("/api/endpoints", json={"name": "g", "model": repo, "hf_token": HF_TOKEN}, headers=H)
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        bodies = [r.content]
        deadline = time.monotonic() + 120
        while True:
            r = c.get("/api/endpoints/g", headers=H)
            bodies.append(r.content)
            if r.json()["status"] in ("running", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.json()["status"] == "running", r.json()["reason"]
        pid = app.state.store.get_endpoint("g").pid
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert f"HF_TOKEN={HF_TOKEN}".encode() in environ  # it did get the token, by environment
        # the server runs with the gateway's internal key, never the user's (checked at the gateway)
        assert b"HUBDEPLOY_API_KEY=hdint_" in environ and key.encode() not in environ
        cmdlines = _all_cmdlines()
        assert b"hubdeploy\x00serve" in cmdlines
        ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, timeout=30).stdout
        assert b"hubdeploy serve" in ps and HF_TOKEN.encode() not in ps and key.encode() not in ps
        bodies += [c.get(u, headers=H).content for u in ("/api/endpoints", "/api/endpoints/g/logs?tail=1000")]
        on_disk = _all_bytes(data)
        for secret in (HF_TOKEN.encode(), key.encode()):
            assert secret not in cmdlines
            assert secret not in on_disk  # DB, WAL and logs
        assert HF_TOKEN.encode() not in b"".join(bodies)
        assert key.encode() not in b"".join(bodies[1:])  # the key only in the create answer
        assert HF_TOKEN.encode() not in b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
        assert caplog.records and HF_TOKEN not in caplog.text and key not in caplog.text
        key_file = data / "secrets" / "g.key"
        assert key_file.stat().st_mode & 0o077 == 0
    finally:
        c.delete("/api/endpoints/g", headers=H)
        app.state.provisioner.close()
        reap(data)


def test_hugging_face_users_let_in_by_their_own_token(tmp_path: Path, local_hub: Any) -> None:
    """The OAuth mode (a Space): an HF token whose user, or one of whose orgs, is allowed works like the
    admin token; other HF tokens, junk and no token get 401. Checked against the Hub's whoami."""
    local_hub.add_user("hf_alice_oauth", "alice", orgs=("team-a",))
    local_hub.add_user("hf_bob_oauth", "bob")
    local_hub.add_user("hf_carol_oauth", "carol", orgs=("other-org",))
    app = build_service_app(tmp_path / "svc", hub_endpoint=local_hub.endpoint, admin_token="adm",
                            hf_users=["team-a", "bob"])
    try:
        c = TestClient(app)

        def status(token: str | None) -> int:
            return c.get("/api/endpoints", headers={"Authorization": f"Bearer {token}"} if token else {}).status_code

        assert status("adm") == 200
        assert status("hf_alice_oauth") == 200  # through her organisation
        assert status("hf_bob_oauth") == 200  # by name
        assert status("hf_carol_oauth") == 401 and status("hf_unknown") == 401 and status(None) == 401
        r = c.get("/api/endpoints", headers={"Authorization": "Bearer hf_carol_oauth"})
        assert "team-a" in r.json()["error"]["message"]  # says who may come in
        assert b"hf_carol_oauth" not in r.content
    finally:
        app.state.provisioner.close()
    from tests.fixtures.service import closed_port_url

    assert not auth.HubUsers(["team-a"], endpoint=closed_port_url()).allows("hf_alice_oauth")  # Hub down: no one
    # without the option, HF tokens are not admin tokens
    plain = build_service_app(tmp_path / "svc2", hub_endpoint=local_hub.endpoint, admin_token="adm")
    try:
        r = TestClient(plain).get("/api/endpoints", headers={"Authorization": "Bearer hf_alice_oauth"})
        assert r.status_code == 401
    finally:
        plain.state.provisioner.close()
