"""Bad requests get OpenAI-style 4xx bodies naming the field, never a 500 and never a dead
engine: each case is one test against a real `hubdeploy serve` child process; the last
test checks that the server still generates after all of them.
"""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.fixtures.serve import TEST_API_KEY

pytestmark = pytest.mark.timeout(240)

USER = [{"role": "user", "content": "hi"}]


def post(server, path: str, body: object | None = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = dict(server.headers) if headers is None else headers
    if content is not None:
        h["Content-Type"] = "application/json"
        return httpx.post(server.base_url + path, content=content, headers=h, timeout=30)
    return httpx.post(server.base_url + path, json=body, headers=h, timeout=30)


def assert_error(r: httpx.Response, status: int, param: str | None, type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert err["param"] == param
    assert err["message"]
    return err


def test_prompt_longer_than_context(tiny_server) -> None:
    long_prompt = " ".join(["word"] * 400)  # > --max-model-len 256 tokens
    err = assert_error(post(tiny_server, "/completions", {"model": "tiny", "prompt": long_prompt, "max_tokens": 1}),
                       400, "prompt")
    assert "256" in err["message"] and err["code"] == "context_length_exceeded"
    err = assert_error(post(tiny_server, "/chat/completions",
                            {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}]}),
                       400, "messages")


def test_max_tokens_zero(tiny_server) -> None:
    assert_error(post(tiny_server, "/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}), 400, "max_tokens")
    assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": USER,
                                                         "max_completion_tokens": 0}), 400, "max_completion_tokens")


def test_max_tokens_beyond_context(tiny_server) -> None:
    err = assert_error(post(tiny_server, "/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10_000}),
                       400, "max_tokens")
    assert "at most" in err["message"]


def test_unknown_model(tiny_server) -> None:
    err = assert_error(post(tiny_server, "/chat/completions", {"model": "gpt-4", "messages": USER, "max_tokens": 1}),
                       404, "model", "not_found_error")
    assert err["code"] == "model_not_found" and "tiny" in err["message"]
    c = openai.OpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=1)


def test_malformed_json(tiny_server) -> None:
    err = assert_error(post(tiny_server, "/chat/completions", content=b'{"model": "tiny", "messages": ['), 400, None)
    assert "JSON" in err["message"]


def test_wrong_type(tiny_server) -> None:
    err = assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": USER,
                                                               "temperature": "hot"}), 400, "temperature")
    assert "hot" in err["message"]
    assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": "hi"}), 400, "messages")
    assert_error(post(tiny_server, "/completions", {"model": "tiny", "prompt": "hi", "n": 0}), 400, "n")
    assert_error(post(tiny_server, "/completions", {"model": "tiny", "prompt": "hi", "top_k": -2}), 400, "top_k")
    assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": USER, "min_tokens": -1}), 400,
                 "min_tokens")
    assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": USER, "top_logprobs": 21,
                                                         "logprobs": True}), 400, "top_logprobs")
    assert_error(post(tiny_server, "/completions", {"model": "tiny"}), 400, "prompt")


def test_empty_messages(tiny_server) -> None:
    assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": []}), 400, "messages")


def test_non_text_content_part(tiny_server) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    err = assert_error(post(tiny_server, "/chat/completions", {"model": "tiny", "messages": msgs}), 400,
                       "messages[0].content")
    assert "'text'" in err["message"] and "image_url" in err["message"]


def test_system_message_rejected_by_mixtral_template_is_400(tiny_server) -> None:
    body = {"model": "tiny", "max_tokens": 1,
            "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]}
    err = assert_error(post(tiny_server, "/chat/completions", body), 400, "messages")
    assert "chat template rejected" in err["message"] and "alternate" in err["message"]
    c = openai.OpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=1)


@pytest.mark.parametrize("headers,code", [({}, "missing_api_key"),
                                          ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
                                          ({"Authorization": f"Basic {TEST_API_KEY}"}, "invalid_api_key")])
def test_api_key_required(tiny_server, headers: dict[str, str], code: str) -> None:
    for path, body in (("/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 1}),
                       ("/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})):
        err = assert_error(post(tiny_server, path, body, headers=headers), 401, None, "authentication_error")
        assert err["code"] == code
    r = httpx.get(tiny_server.base_url + "/models", headers=headers)
    assert r.status_code == 401
    # health and metrics stay open for load balancers and scrapers
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    assert httpx.get(tiny_server.url + "/metrics").status_code == 200


def test_openai_sdk_authentication_error(tiny_server) -> None:
    c = openai.OpenAI(base_url=tiny_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_server_survives_and_log_is_clean(tiny_server) -> None:
    c = openai.OpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0)
    r = c.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert r.usage.completion_tokens == 2
    log = tiny_server.stderr() + tiny_server.stdout()
    assert TEST_API_KEY not in log.replace(f"--api-key {TEST_API_KEY}", "")  # keys never logged
    assert "Be terse." not in log and "word word" not in log  # nor prompt text
    assert "Traceback" not in log


def test_no_chat_template_points_to_completions(tiny_server, tmp_path) -> None:
    """A model without a chat template: chat answers 400 naming /v1/completions; completions work."""
    import json
    import shutil

    from tests.fixtures.serve import start_serve

    d = tmp_path / "no-template"
    shutil.copytree(tiny_server.model_dir, d, ignore=shutil.ignore_patterns("*-lora-*"))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with start_serve(d, extra_args=["--max-model-len", "128", "--kv-cache-tokens", "512"]) as server:
        r = httpx.post(server.base_url + "/chat/completions", json={"model": "tiny", "messages": USER}, timeout=30)
        err = assert_error(r, 400, "messages")
        assert "/v1/completions" in err["message"] and err["code"] == "no_chat_template"
        ok = httpx.post(server.base_url + "/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                        timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_broken_model_fails_with_phase_line(tmp_path) -> None:
    """A model that cannot load: `phase: failed <reason>` on stdout and a non-zero exit."""
    from tests.fixtures.serve import launch_serve

    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    server = launch_serve(d)
    try:
        assert server.proc.wait(60) != 0
    finally:
        server.stop()
    lines = [line for line in server.stdout().splitlines() if line.startswith("phase: ")]
    assert lines[0].startswith("phase: downloading") and lines[-1].startswith("phase: failed ")
    assert len(lines[-1]) > len("phase: failed ") + 10  # carries the reason


def test_health_503_and_routes_503_while_loading() -> None:
    """The app before its engine is attached (what clients see during download/load)."""
    from fastapi.testclient import TestClient

    from hubdeploy.serving.server.api_server import build_app, set_phase

    app = build_app(None, served_model_name="tiny", api_key="k")
    set_phase(app, "downloading")
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json() == {"status": "loading", "phase": "downloading", "phases": ["downloading"]}
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"Authorization": "Bearer k"})
        err = assert_error(r, 503, None, "service_unavailable_error")
        assert "downloading" in err["message"] and err["code"] == "model_loading"
        assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
        assert c.get("/metrics").status_code == 200
        set_phase(app, "loading", failure="CheckpointError: model.safetensors is truncated")
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "truncated" in r.json()["error"]


@pytest.mark.parametrize("kwargs, words", [
    ({"messages": []}, "'messages' is not allowed"),
    ({"add_generation_prompt": False}, "'add_generation_prompt' is not allowed"),
    ({"template": "{{ 7 * 7 }}"}, "'template' is not allowed"),
    ({"eos_token": 5}, "'eos_token' is not allowed"),
    ({"bos_token": "<evil>"}, "'bos_token' is not allowed"),
    ({"enable_thinking": "yes"}, "enable_thinking must be a bool"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort must be one of"),
])
def test_chat_template_kwargs_outside_the_allow_list_are_400(tiny_server, kwargs: dict, words: str) -> None:
    """Issue 21, point 4: these used to reach the template (500 with a traceback, or overriding
    the model's special tokens)."""
    r = post(tiny_server, "/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 1,
                                                 "chat_template_kwargs": kwargs})
    err = assert_error(r, 400, "chat_template_kwargs")
    assert words in err["message"], err["message"]


def test_allowed_chat_template_kwargs_serve(tiny_server) -> None:
    r = post(tiny_server, "/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 1,
                                                 "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
