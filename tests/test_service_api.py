"""The deploy service REST API (real app, real store, real local provisioner, local Hub)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from hubdeploy.hub_integration.service import build_service_app, mount_page
from tests.fixtures.service import reap

H = {"Authorization": "Bearer adm"}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, local_hub: Any, hub_tiny_model: Any, tiny_models: Any):
    from hubdeploy.serving.tiny import adapter_dir

    repo = hub_tiny_model("mixtral", "awq", adapters=1)
    model = tiny_models("mixtral", "awq", adapters=1)
    data = tmp_path_factory.mktemp("svc")
    app = build_service_app(data, hub_endpoint=local_hub.endpoint, admin_token="adm",
                            allowed_model_roots=[model.parent], default_model=str(model))
    client = TestClient(app)
    client.repo, client.model, client.adapter = repo, str(model), str(adapter_dir(model, 0))  # type: ignore[attr-defined]
    yield client
    for e in client.get("/api/endpoints", headers=H).json()["endpoints"]:
        client.delete(f"/api/endpoints/{e['name']}", headers=H)
    app.state.provisioner.close()
    reap(data)


def wait(c: TestClient, name: str, want: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        e = c.get(f"/api/endpoints/{name}", headers=H).json()
        if e["status"] in want:
            return e
        assert time.monotonic() < deadline, e
        time.sleep(0.2)


def test_one_service_per_data_dir(svc: TestClient) -> None:
    with pytest.raises(RuntimeError, match="another hubdeploy service"):
        build_service_app(svc.app.state.data_dir, admin_token="adm")  # type: ignore[attr-defined]


def test_openapi_lists_the_design_routes(svc: TestClient) -> None:
    paths = svc.get("/openapi.json").json()["paths"]
    assert {"/api/inspect", "/api/endpoints", "/api/endpoints/{name}", "/api/endpoints/{name}/pause",
            "/api/endpoints/{name}/resume", "/api/endpoints/{name}/logs",
            "/api/endpoints/{name}/rotate_key"} <= set(paths)
    assert {"get", "patch", "delete"} <= set(paths["/api/endpoints/{name}"])


@pytest.mark.parametrize("method,url", [("get", "/api/endpoints"), ("post", "/api/endpoints"),
                                        ("get", "/api/endpoints/x"), ("delete", "/api/endpoints/x"),
                                        ("post", "/api/endpoints/x/pause"), ("get", "/api/inspect?model=a/b")])
def test_admin_token_required(svc: TestClient, method: str, url: str) -> None:
    assert getattr(svc, method)(url).status_code == 401
    r = getattr(svc, method)(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_unknown_endpoint_404(svc: TestClient) -> None:
    for method, url in (("get", ""), ("delete", ""), ("post", "/pause"), ("post", "/resume"),
                        ("post", "/rotate_key"), ("get", "/logs")):
        r = getattr(svc, method)(f"/api/endpoints/nope{url}", headers=H)
        assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert svc.patch("/api/endpoints/nope", json={"tags": []}, headers=H).status_code == 404


def loc(svc: TestClient, **body: Any) -> list[Any]:
    r = svc.post("/api/endpoints", json={"name": "v", "model": svc.model, **body}, headers=H)  # type: ignore[attr-defined]
    assert r.status_code == 422, r.text
    return r.json()["detail"][0]["loc"]


def test_invalid_specs_422_naming_the_field(svc: TestClient) -> None:
    assert loc(svc, name="Bad_Name") == ["body", "name"]
    assert loc(svc, name="-x") == ["body", "name"]
    assert loc(svc, model="https://huggingface.co/org/m") == ["body", "model"]
    assert loc(svc, model="/etc/../etc") == ["body", "model"]
    assert loc(svc, model="/etc") == ["body", "model"]  # outside the allowed roots
    assert loc(svc, model="nobody/nothing") == ["body", "model"]  # not on the Hub
    assert loc(svc, adapters={"z": "nobody/lora"}) == ["body", "adapters", "z"]
    assert loc(svc, adapters={"z": "/tmp/no-such-adapter"}) == ["body", "adapters", "z"]
    assert loc(svc, gpu="TPU-v9") == ["body", "gpu"]
    assert loc(svc, gpu="T4", engine={"max_model_len": 999_999}) == ["body", "engine", "max_model_len"]
    assert loc(svc, engine={"max_lora_rank": 1}, adapters={"a": svc.adapter}) == ["body", "adapters", "a"]  # type: ignore[attr-defined]
    assert svc.get("/api/endpoints", headers=H).json()["endpoints"] == []


def test_no_gpu_on_this_host_is_409_and_leaves_nothing(svc: TestClient) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    r = svc.post("/api/endpoints", json={"name": "gpu", "model": svc.model, "gpu": "T4"}, headers=H)  # type: ignore[attr-defined]
    assert r.status_code == 409 and "pause or delete" in r.json()["detail"]
    assert svc.get("/api/endpoints/gpu", headers=H).status_code == 404


def test_inspect_route(svc: TestClient) -> None:
    r = svc.get("/api/inspect", params={"model": svc.repo}, headers=H)  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["report"]["arch"]["architecture"] == "MixtralForCausalLM" and body["plans"]
    r = svc.get("/api/inspect", params={"model": svc.model}, headers=H)  # type: ignore[attr-defined]
    assert r.status_code == 200 and body["report"]["quant"]
    assert svc.get("/api/inspect", params={"model": "nobody/nothing"}, headers=H).status_code == 404
    r = svc.get("/api/inspect", params={"model": "/etc"}, headers=H)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "model"]
    assert svc.get("/api/inspect", params={"model": "http://x/y"}, headers=H).status_code == 422


def test_defaults_and_page(svc: TestClient) -> None:
    d = svc.get("/api/defaults", headers=H).json()
    assert d["model"] == svc.model and "cpu" in d["gpus"] and any(g.startswith("H100") for g in d["gpus"])  # type: ignore[attr-defined]
    app = svc.app
    if not any(getattr(r, "path", None) == "/deploy" for r in app.routes):  # type: ignore[attr-defined]
        mount_page(app)  # type: ignore[arg-type]
    assert "hubdeploy" in svc.get("/").text
    r = svc.get("/deploy?model=org/m&adapters=a", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/?model=org/m&adapters=a"


def test_duplicate_patch_rotate(svc: TestClient) -> None:
    r = svc.post("/api/endpoints", json={"name": "dup", "model": svc.model}, headers=H)  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    assert loc(svc, name="dup") == ["body", "name"]
    e = wait(svc, "dup", {"running", "failed"})
    assert e["status"] == "running", e["reason"]

    def chat_status(k: str | None) -> int:
        return svc.post(e["url"] + "/chat/completions", headers={"Authorization": f"Bearer {k}"} if k else {},
                        json={"model": e["served_model_name"], "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]}).status_code

    assert chat_status(key) == 200
    # the URL rejects everything but its key: none, a wrong one, another scheme, the admin token
    assert chat_status(None) == 401 and chat_status("hdk_wrong") == 401 and chat_status("adm") == 401
    r = svc.get(e["url"] + "/models", headers={"Authorization": f"Basic {key}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert svc.get(e["url"] + "/models").json()["error"]["code"] == "missing_api_key"
    # GET gives a ready-to-use OpenAI base URL (the service's gateway), the phase and the progress
    assert e["url"] == "http://testserver/endpoints/dup/v1" and e["phase"] == "ready"
    assert set(e["progress"]) == {"bytes_done", "bytes_total", "fraction", "layers_done", "layers_total"}
    r = svc.post("/api/endpoints/dup/rotate_key", headers=H)
    new_key = r.json()["api_key"]
    assert r.status_code == 200 and new_key and new_key != key
    e = wait(svc, "dup", {"running", "failed"})
    assert e["status"] == "running", e["reason"]
    assert chat_status(key) == 401 and chat_status(new_key) == 200
    assert svc.get("/api/endpoints/dup", headers=H).json()["api_key"] is None  # shown once only

    p = svc.post("/api/endpoints/dup/pause", headers=H).json()
    assert p["status"] == "paused"
    r = svc.patch("/api/endpoints/dup", json={"tags": ["t1"], "engine": {"max_num_seqs": 3}}, headers=H)
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["tags"] == ["t1"] and r.json()["spec"]["engine"]["max_num_seqs"] == 3
    assert r.json()["status"] == "paused"  # a paused endpoint stays paused
    r = svc.patch("/api/endpoints/dup", json={"engine": {"max_model_len": 10**6}}, headers=H)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "engine", "max_model_len"]
    assert svc.patch("/api/endpoints/dup", json={"name": "other"}, headers=H).status_code == 422
    r = svc.patch("/api/endpoints/dup", json={"adapters": {"bad name": "org/a"}}, headers=H)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "adapters"]
    r = svc.patch("/api/endpoints/dup", json={"access": "public"}, headers=H)
    assert r.json()["spec"]["access"] == "public" and r.json()["api_key"] is None
    assert svc.post("/api/endpoints/dup/rotate_key", headers=H).status_code == 409
    r = svc.patch("/api/endpoints/dup", json={"access": "private"}, headers=H)
    assert r.json()["api_key"]
    logs = svc.get("/api/endpoints/dup/logs", params={"tail": 3}, headers=H).json()["lines"]
    assert 0 < len(logs) <= 3
    assert svc.get("/api/endpoints/dup/logs", params={"tail": 0}, headers=H).status_code == 422
    assert svc.delete("/api/endpoints/dup", headers=H).json()["status"] == "deleted"


def _start_up(data: Path, port: int) -> tuple[Any, list[str]]:
    """`hubdeploy up` as users run it; returns (process, stdout lines up to the URL line(s))."""
    import os
    import subprocess
    import sys

    # as on a laptop with no network: no Hub endpoint, offline, an empty Hugging Face cache, no token
    env = {k: v for k, v in os.environ.items()
           if k not in ("HUBDEPLOY_ADMIN_TOKEN", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(data / "hf-home"))
    proc = subprocess.Popen([sys.executable, "-m", "hubdeploy", "up", "--data-dir", str(data), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "hubdeploy up exited:\n" + "".join(lines)
        lines.append(line)
        if "demo model:" in line:
            break
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc, lines
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("hubdeploy up did not answer:\n" + "".join(lines))


def _stop(proc: Any) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    proc.stdout.close()


def _pid_of(data: Path, name: str) -> int | None:
    from hubdeploy.hub_integration.store import Store

    rec = Store(data / "hubdeploy.db").get_endpoint(name)
    return rec.pid if rec else None


@pytest.mark.slow
def test_hubdeploy_up_with_no_arguments_but_a_data_dir(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, lines = _start_up(tmp_path, port)
    try:
        text = "".join(lines)
        assert f"http://127.0.0.1:{port}/" in text
        sign_in = next(l for l in lines if "admin token" in l)  # the one line that shows the made token
        assert f"http://127.0.0.1:{port}/#token=hdadm_" in sign_in, sign_in  # the page's one-click sign-in link
        token = sign_in.split("#token=")[1].split()[0]
        d = httpx.get(f"http://127.0.0.1:{port}/api/defaults", headers={"Authorization": f"Bearer {token}"}).json()
        assert d["model"] == str(tmp_path / "models" / "tiny-mixtral-awq")
        assert d["adapters"] == {f"lora-{i}": str(tmp_path / "models" / f"tiny-mixtral-awq-lora-{i}") for i in (0, 1)}
        assert (tmp_path / "models" / "tiny-mixtral-awq" / "config.json").is_file()
        assert (tmp_path / "models" / "tiny-mixtral-awq-lora-1" / "adapter_config.json").is_file()
        built = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*") if p.is_file()}
        r = httpx.get(f"http://127.0.0.1:{port}/deploy?model=org/m", follow_redirects=True)
        assert r.status_code == 200 and "hubdeploy" in r.text
        # the whole flow with the demo defaults: deploy, then chat with the base model and an adapter
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                           timeout=60)
        r = api.post("/api/endpoints", json={"name": "demo", "model": d["model"], "adapters": d["adapters"]})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
        deadline = time.monotonic() + 120
        while (e := api.get("/api/endpoints/demo").json())["status"] not in ("running", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert e["status"] == "running", e["reason"]
        import openai

        client = openai.OpenAI(base_url=e["url"], api_key=key, max_retries=0)
        for model in (e["served_model_name"], "lora-1"):
            out = client.chat.completions.create(model=model, max_tokens=3,
                                                 messages=[{"role": "user", "content": "hi"}])
            assert out.usage.completion_tokens > 0
    finally:
        _stop(proc)
    proc, lines = _start_up(tmp_path, port)  # second start: demo reused, no new token printed
    try:
        assert not any("admin token" in l for l in lines)
        H2 = {"Authorization": f"Bearer {token}"}
        assert built == {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*") if p.is_file()}
        e = httpx.get(f"http://127.0.0.1:{port}/api/endpoints/demo", headers=H2).json()
        assert e["status"] == "running"  # re-adopted across the service restart
        pid = _pid_of(tmp_path, "demo")
        d = httpx.delete(f"http://127.0.0.1:{port}/api/endpoints/demo", headers=H2, timeout=60)
        assert d.status_code == 200 and d.json()["status"] == "deleted"
        assert httpx.get(f"http://127.0.0.1:{port}/api/endpoints", headers=H2).json()["endpoints"] == []
        from tests.fixtures.service import pid_alive

        assert pid is not None and not pid_alive(pid)
    finally:
        _stop(proc)
        reap(tmp_path)


def _assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The service's one error shape: {"error": {status, code, message, fields}, "detail": ...}."""
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert err["status"] == status and isinstance(err["message"], str) and err["message"]
    assert isinstance(err["code"], str) and isinstance(err["fields"], list)
    if code is not None:
        assert err["code"] == code, err
    assert body["detail"] == (err["fields"] or err["message"])
    return err


def test_one_error_shape_across_the_service(svc: TestClient) -> None:
    schema = svc.get("/openapi.json").json()
    assert set(schema["components"]["schemas"]["ErrorOut"]["properties"]) == {"error", "detail"}
    assert {"4XX", "5XX"} <= set(schema["paths"]["/api/endpoints"]["post"]["responses"])
    _assert_error(svc.get("/api/endpoints"), 401, "unauthorized")
    _assert_error(svc.get("/api/endpoints/nope", headers=H), 404, "not_found")
    _assert_error(svc.put("/api/endpoints", headers=H), 405, "method_not_allowed")
    err = _assert_error(svc.post("/api/endpoints", json={"name": "Bad_Name", "model": "org/m"}, headers=H), 422,
                        "invalid_request")
    assert err["fields"][0]["loc"] == ["body", "name"] and err["message"].startswith("name: ")
    err = _assert_error(svc.post("/api/endpoints", json={"name": "v", "model": "/etc"}, headers=H), 422,
                        "invalid_spec")
    assert err["fields"][0]["loc"] == ["body", "model"] and "allowed model roots" in err["message"]
    err = _assert_error(svc.get("/api/endpoints/x/logs", params={"tail": 0}, headers=H), 422, "invalid_request")
    assert err["fields"][0]["loc"] == ["query", "tail"]
    _assert_error(svc.get("/api/inspect", params={"model": "nobody/nothing"}, headers=H), 404, "repo_not_found")
    err = _assert_error(svc.get("/api/inspect", params={"model": "/etc"}, headers=H), 422)
    assert err["fields"][0]["loc"] == ["query", "model"]


def test_inspect_errors_each_their_own(svc: TestClient, shape_only_hub: Any, tmp_path: Path) -> None:
    """Missing repo, missing revision, no access, Hub down: distinct status, code and an actionable message."""
    from tests.fixtures.hub import GATED_REPO, GATED_TOKEN
    from tests.fixtures.service import closed_port_url

    def inspect(client: TestClient, **params: Any) -> httpx.Response:
        token = params.pop("token", None)
        return client.get("/api/inspect", params=params, headers={**H, **({"X-HF-Token": token} if token else {})})

    repo = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"
    err = _assert_error(inspect(svc, model="nobody/nothing"), 404, "repo_not_found")
    assert "nobody/nothing" in err["message"] and err["model"] == "nobody/nothing"
    err = _assert_error(inspect(svc, model=repo, revision="no-such-branch"), 404, "revision_not_found")
    assert "no-such-branch" in err["message"] and err["revision"] == "no-such-branch"
    err = _assert_error(inspect(svc, model=GATED_REPO), 401, "gated_repo")
    assert "token" in err["message"].lower()
    err = _assert_error(inspect(svc, model=GATED_REPO, token="hf_not_granted"), 403, "gated_repo")
    ok = inspect(svc, model=GATED_REPO, token=GATED_TOKEN)
    assert ok.status_code == 200 and ok.json()["report"]["gated"] == "manual"
    err = _assert_error(inspect(svc, model="broken/no-config"), 422, "invalid_repo")
    assert "config.json" in err["message"]
    assert ok.json()["report"]["repo_id"] == GATED_REPO
    assert b"hf_test_granted_token" not in ok.content

    down = build_service_app(tmp_path / "down", hub_endpoint=closed_port_url(), admin_token="adm")
    try:
        err = _assert_error(inspect(TestClient(down), model=repo), 502, "hub_unreachable")
        assert "127.0.0.1" in err["message"]
    finally:
        down.state.provisioner.close()


@pytest.mark.slow
def test_two_creates_racing_for_the_last_slot(tmp_path: Path, tiny_models: Any) -> None:
    """Two POSTs at once with one CPU slot: one 201, the other 409, and nothing of the loser remains."""
    import threading

    from tests.fixtures.service import ADMIN, LiveService

    model = tiny_models("mixtral", "awq")
    data = tmp_path / "svc"
    live = LiveService(build_service_app(data, admin_token=ADMIN, allowed_model_roots=[model.parent], cpu_slots=1))
    try:
        barrier = threading.Barrier(2)
        answers: dict[str, httpx.Response] = {}

        def create(name: str) -> None:
            with httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {ADMIN}"},
                              timeout=120) as c:
                barrier.wait(timeout=30)
                answers[name] = c.post("/api/endpoints", json={"name": name, "model": str(model), "gpu": "cpu"})

        threads = [threading.Thread(target=create, args=(n,)) for n in ("racer-a", "racer-b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert sorted(r.status_code for r in answers.values()) == [201, 409], {n: r.text for n, r in answers.items()}
        winner = next(n for n, r in answers.items() if r.status_code == 201)
        loser = next(n for n, r in answers.items() if r.status_code == 409)
        err = _assert_error(answers[loser], 409, "conflict")
        assert "pause or delete" in err["message"]
        assert live.client.get(f"/api/endpoints/{loser}").status_code == 404
        assert [e["name"] for e in live.client.get("/api/endpoints").json()["endpoints"]] == [winner]
        assert live.app.state.store.claimed_slots() == {"cpu:0": winner}
        assert not (data / "secrets" / f"{loser}.key").exists()
        assert live.client.delete(f"/api/endpoints/{winner}").json()["status"] == "deleted"
        assert live.app.state.store.claimed_slots() == {}
    finally:
        live.stop()
        reap(data)
