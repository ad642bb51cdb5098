"""The endpoint gateway (`<service>/endpoints/{name}/v1`): real service on a loopback port, real
endpoint processes, real clients (`openai`, `huggingface_hub.InferenceClient`, httpx)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import not_a_server_error

from hubdeploy.hub_integration.gateway_schema import GATEWAY_TAG
from hubdeploy.hub_integration.service import build_service_app
from tests.fixtures.service import ADMIN, LiveService, reap, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any):
    """One service with three endpoints, one per access mode (`pub` restarts when it fails)."""
    model = tiny_models("mixtral", "awq")
    data = tmp_path_factory.mktemp("gw")
    svc = LiveService(build_service_app(data, admin_token=ADMIN, allowed_model_roots=[model.parent], cpu_slots=4,
                                        scale_to_zero_interval_s=0.2))
    svc.model = str(model)  # type: ignore[attr-defined]
    svc.keys = {}  # type: ignore[attr-defined]
    try:
        for name, extra in (("priv", {"access": "private"}), ("prot", {"access": "protected"}),
                            ("pub", {"access": "public", "restart_on_failure": True})):
            r = svc.client.post("/api/endpoints", json={"name": name, "model": str(model), **extra})
            assert r.status_code == 201, r.text
            svc.keys[name] = r.json()["api_key"]  # type: ignore[attr-defined]
        svc.eps = {n: wait_status(svc, n, {"running", "failed"}, timeout=180) for n in ("priv", "prot", "pub")}  # type: ignore[attr-defined]
        for e in svc.eps.values():  # type: ignore[attr-defined]
            assert e["status"] == "running", e["reason"]
        yield svc
    finally:
        svc.stop()
        reap(data)


def url_of(gw: LiveService, name: str) -> str:
    return f"{gw.base_url}/endpoints/{name}/v1"


def scrape(gw: LiveService, name: str) -> dict[str, float]:
    """The endpoint's `/metrics` through the gateway (sample name -> unlabelled sum)."""
    r = httpx.get(f"{gw.base_url}/endpoints/{name}/metrics", headers={"Authorization": f"Bearer {ADMIN}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_api_gives_the_gateway_url(gw: LiveService) -> None:
    e = gw.client.get("/api/endpoints/priv").json()
    assert e["url"] == url_of(gw, "priv")
    direct = gw.app.state.store.get_endpoint("priv").url
    assert direct != e["url"] and direct.startswith("http://127.0.0.1:")


def test_openai_sdk_through_the_gateway(gw: LiveService) -> None:
    e = gw.eps["priv"]  # type: ignore[attr-defined]
    client = openai.OpenAI(base_url=e["url"], api_key=gw.keys["priv"], max_retries=0, timeout=60)  # type: ignore[attr-defined]
    out = client.chat.completions.create(model=e["served_model_name"], messages=USER, max_tokens=5, temperature=0)
    assert out.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=e["served_model_name"], messages=USER, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content
    assert [m.id for m in client.models.list()] == [e["served_model_name"]]
    # the endpoint's own errors pass unchanged: status, type and code
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="no-such-model", messages=USER, max_tokens=2)
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=e["served_model_name"], messages=USER, max_tokens=-1)
    assert bad.value.status_code == 400
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=e["url"], api_key="hdk_wrong", max_retries=0).models.list()
    assert wrong.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def test_inference_client_through_the_gateway(gw: LiveService) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    e = gw.eps["priv"]  # type: ignore[attr-defined]
    hf = InferenceClient(base_url=e["url"], api_key=gw.keys["priv"])  # type: ignore[attr-defined]
    out = hf.chat_completion(messages=USER, model=e["served_model_name"], max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    streamed = "".join(c.choices[0].delta.content or "" for c in hf.chat_completion(
        messages=USER, model=e["served_model_name"], max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content
    with pytest.raises(HfHubHTTPError) as err:
        InferenceClient(base_url=e["url"], api_key="hdk_wrong").chat_completion(messages=USER, max_tokens=2)
    assert err.value.response.status_code == 401


@pytest.mark.parametrize("name,token,status", [
    ("priv", None, 401), ("priv", "wrong", 401), ("priv", "key:prot", 401), ("priv", "key:priv", 200),
    ("priv", ADMIN, 401), ("prot", "Basic x", 401),
    ("prot", None, 401), ("prot", "key:priv", 401), ("prot", ADMIN, 200),
    ("pub", None, 200), ("pub", "anything", 200)])
def test_access_modes(gw: LiveService, name: str, token: str | None, status: int) -> None:
    if token and token.startswith("key:"):
        token = gw.keys[token[4:]] or "none"  # type: ignore[attr-defined]
    headers = {"Authorization": token if token.startswith("Basic") else f"Bearer {token}"} if token else {}
    r = httpx.get(url_of(gw, name) + "/models", headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{gw.base_url}/endpoints/{name}/health", timeout=10).status_code == 200  # open, as upstream


def test_the_engine_never_sees_a_users_key(gw: LiveService) -> None:
    """The child listens with an internal key: the user's key does not open it directly."""
    direct = gw.app.state.store.get_endpoint("priv").url
    r = httpx.get(direct + "/models", headers={"Authorization": f"Bearer {gw.keys['priv']}"}, timeout=10)  # type: ignore[attr-defined]
    assert r.status_code == 401
    assert httpx.get(gw.app.state.store.get_endpoint("pub").url + "/models", timeout=10).status_code == 401


def test_adapter_admin_needs_a_service_credential_on_public(gw: LiveService) -> None:
    body = {"lora_name": "x", "lora_path": "nobody/nothing"}
    r = httpx.post(url_of(gw, "pub") + "/load_lora_adapter", json=body, timeout=30)
    assert r.status_code == 401
    r = httpx.post(url_of(gw, "pub") + "/load_lora_adapter", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code not in (401, 403, 500), r.text  # past the gateway; the engine's answer


def test_gateway_errors(gw: LiveService) -> None:
    r = httpx.get(url_of(gw, "nobody") + "/models", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_found"
    assert httpx.get(f"{gw.base_url}/endpoints/pub/other", timeout=10).status_code == 404
    r = httpx.post(url_of(gw, "pub") + "/completions", content=b"x" * (9 * 1024 * 1024),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(url_of(gw, "pub") + "/models", headers={"X-Scale-Up-Timeout": "soon"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_scale_up_timeout"


def test_disconnect_mid_stream_frees_kv_blocks(gw: LiveService) -> None:
    before = scrape(gw, "pub")
    body = {"model": gw.eps["pub"]["served_model_name"], "prompt": "Write a very long story", "max_tokens": 2000,  # type: ignore[attr-defined]
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url_of(gw, "pub") + "/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    n += 1
                    if n == 3:  # still connected: the sequence holds blocks
                        mid = scrape(gw, "pub")
                        break
            assert mid["hubdeploy:num_requests_running"] == 1 and mid["hubdeploy:kv_cache_usage_perc"] > 0.0, mid
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = scrape(gw, "pub")
        if m["hubdeploy:num_requests_running"] == 0 and m["hubdeploy:kv_cache_usage_perc"] == 0.0:
            break
        time.sleep(0.2)
    assert m["hubdeploy:num_requests_running"] == 0 and m["hubdeploy:kv_cache_usage_perc"] == 0.0
    assert m["hubdeploy:engine_requests_aborted_total"] == before["hubdeploy:engine_requests_aborted_total"] + 1
    assert m["hubdeploy:generation_tokens_total"] < before["hubdeploy:generation_tokens_total"] + 2000


def test_killed_child_is_502_or_503_then_recovers(gw: LiveService) -> None:
    store = gw.app.state.store
    pid = store.get_endpoint("pub").pid
    os.killpg(pid, signal.SIGKILL)
    r = httpx.get(url_of(gw, "pub") + "/models", timeout=10)
    assert r.status_code in (502, 503), r.text
    assert "pub" in r.json()["error"]["message"] and r.json()["error"]["code"].startswith(("endpoint_", "upstream_"))
    # restart_on_failure brings it back; a request that may wait is answered once it is ready
    r = httpx.get(url_of(gw, "pub") + "/models", headers={"X-Scale-Up-Timeout": "180"}, timeout=200)
    assert r.status_code == 200, r.text
    assert store.get_endpoint("pub").pid != pid


def test_paused_endpoint_is_503_naming_its_state(gw: LiveService) -> None:
    r = gw.client.post("/api/endpoints", json={"name": "sleepy", "model": gw.model})  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    key = r.json()["api_key"]
    try:
        gw.client.post("/api/endpoints/sleepy/pause")
        r = httpx.get(url_of(gw, "sleepy") + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "endpoint_paused"
        assert "paused" in r.json()["error"]["message"]
    finally:
        gw.client.delete("/api/endpoints/sleepy")


def test_scale_to_zero_and_wake_up(gw: LiveService) -> None:
    store = gw.app.state.store
    r = gw.client.post("/api/endpoints", json={"name": "nap", "model": gw.model, "access": "public",  # type: ignore[attr-defined]
                                               "scale_to_zero_after_s": 2})
    assert r.status_code == 201, r.text
    try:
        assert wait_status(gw, "nap", {"running", "failed"}, timeout=180)["status"] == "running"
        e = wait_status(gw, "nap", {"scaled_to_zero"}, timeout=60)
        assert e["url"] == url_of(gw, "nap") and "nap" not in store.claimed_slots()
        assert store.get_endpoint("nap").pid is None
        # no header: 503 + Retry-After, and the endpoint starts
        r = httpx.get(url_of(gw, "nap") + "/models", timeout=10)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "endpoint_scaled_to_zero"
        assert wait_status(gw, "nap", {"running", "failed"}, timeout=180)["status"] == "running"
        wait_status(gw, "nap", {"scaled_to_zero"}, timeout=60)
        wakes = sum(ev["kind"] == "wake" for ev in store.events("nap"))
        starts = sum(ev["kind"] == "start" for ev in store.events("nap"))
        # ten requests together, each ready to wait: one start, ten answers
        body = {"model": e["served_model_name"], "messages": USER, "max_tokens": 3, "temperature": 0}

        def ask(_: int) -> int:
            return httpx.post(url_of(gw, "nap") + "/chat/completions", json=body, timeout=200,
                              headers={"X-Scale-Up-Timeout": "180"}).status_code

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(ask, range(10)))
        assert codes == [200] * 10
        assert sum(ev["kind"] == "wake" for ev in store.events("nap")) == wakes + 1
        assert sum(ev["kind"] == "start" for ev in store.events("nap")) == starts + 1
        # resume wakes it too (the page's button)
        wait_status(gw, "nap", {"scaled_to_zero"}, timeout=60)
        assert gw.client.post("/api/endpoints/nap/resume").json()["status"] == "initializing"
        assert wait_status(gw, "nap", {"running", "failed"}, timeout=180)["status"] == "running"
        # access is the gateway's: a PATCH applies at once, without a restart
        pid = store.get_endpoint("nap").pid
        assert httpx.get(url_of(gw, "nap") + "/models", timeout=10).status_code == 200
        r = gw.client.patch("/api/endpoints/nap", json={"access": "protected", "scale_to_zero_after_s": 0})
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        assert httpx.get(url_of(gw, "nap") + "/models", timeout=10).status_code == 401
        assert store.get_endpoint("nap").pid == pid
    finally:
        gw.client.delete("/api/endpoints/nap")


def test_rotating_a_key_works_at_once_without_a_restart(gw: LiveService) -> None:
    store = gw.app.state.store
    pid = store.get_endpoint("priv").pid
    old = gw.keys["priv"]  # type: ignore[attr-defined]
    new = gw.client.post("/api/endpoints/priv/rotate_key").json()["api_key"]
    gw.keys["priv"] = new  # type: ignore[attr-defined]
    assert httpx.get(url_of(gw, "priv") + "/models", headers={"Authorization": f"Bearer {old}"},
                     timeout=10).status_code == 401
    assert httpx.get(url_of(gw, "priv") + "/models", headers={"Authorization": f"Bearer {new}"},
                     timeout=10).status_code == 200
    assert store.get_endpoint("priv").pid == pid


@pytest.fixture(scope="module")
def gw_schema(gw: LiveService) -> Any:
    """The service's own OpenAPI schema, its gateway operations only, against the live service."""
    return schemathesis.openapi.from_url(f"{gw.base_url}/openapi.json")


gateway_operations = schemathesis.pytest.from_fixture("gw_schema").include(tag=GATEWAY_TAG)


@gateway_operations.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_gateway_schema_fuzz_reaches_the_engine_without_5xx(case: schemathesis.Case) -> None:
    """Generated requests through the gateway to a running endpoint (`pub`): engine and gateway
    answer every one with a 2xx or an OpenAI-style 4xx, never a 5xx."""
    assert case.operation.path.startswith("/endpoints/{name}/"), case.operation.path  # the service's own API: not here
    case.path_parameters = {**(case.path_parameters or {}), "name": "pub"}
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, checks=[not_a_server_error], timeout=60)
