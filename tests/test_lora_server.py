"""Multi-LoRA through the real endpoint: a `hubdeploy serve --lora ...` child process of the
tiny Mixtral (fp16 checkpoint) on loopback, adapters from a local directory and from the
local Hub by repo id, `--max-loras 1` so that three adapters in use at once must swap, and
`--max-cpu-loras 1` so that the host cache evicts too (adapters are re-read from disk).

Reference: transformers on the base with the adapter merged in float64
(tests/test_lora_engine.py); greedy text equal, chosen-token log-probs within LOGPROB_ATOL.
"""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from hubdeploy.serving.tiny import adapter_dir
from hubdeploy.serving.tokenizer import load_tokenizer
from tests.fixtures.serve import TEST_API_KEY, start_serve
from tests.test_lora_engine import LOGPROB_ATOL, NEW, PROMPTS, reference

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hub_env(local_hub):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", local_hub.endpoint)  # the child process inherits it
        yield local_hub


@pytest.fixture(scope="module")
def model_dir(tiny_models) -> Path:
    return tiny_models("mixtral", "none", adapters=3)


@pytest.fixture(scope="module")
def server(hub_env, hub_tiny_model, model_dir, tmp_path_factory):
    repo = hub_tiny_model("mixtral", "none", adapters=3)
    # run-time loads may read under the test session's temporary folder only
    args = ["--lora-root", str(tmp_path_factory.getbasetemp()),
            "--lora", f"a0={adapter_dir(model_dir, 0)}", "--lora", f"a1={repo}-lora-1",
            "--lora", f"a2={adapter_dir(model_dir, 2)}", "--max-loras", "1", "--max-cpu-loras", "1", "--max-lora-rank", "16",
            "--max-model-len", "128", "--kv-cache-tokens", "2048"]
    with start_serve(model_dir, api_key=TEST_API_KEY, extra_args=args) as s:
        s.hub_repo = repo
        yield s


@pytest.fixture(scope="module")
def refs(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora_server_ref")
    return {i: reference(tiny_models, root, "mixtral", "none", i) for i in (None, 0, 1, 2)}


def _complete(server, model: str, prompt: list[int], **kw) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, **kw}
    return httpx.post(server.base_url + "/completions", json=body, headers=server.headers, timeout=60)


def _assert_matches(server, r: httpx.Response, ref: tuple[list[int], list[float]], what: str) -> None:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tok = load_tokenizer(server.model_dir)
    toks, lps = ref
    _same_tokens(tok, choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"], ref, what)


def _same_tokens(tok, text: str, tokens: list[str], logprobs: list[float], ref, what: str) -> None:
    """Token by token (the per-token strings and log-probs the endpoint returns) vs the reference."""
    toks, lps = ref
    assert tokens == [tok.decode([t], skip_special_tokens=False) for t in toks], \
        f"{what}: tokens differ from transformers + merged adapter"
    assert tok.decode(toks).startswith(text)  # the text may hold back an incomplete UTF-8 tail
    diff = max(abs(a - b) for a, b in zip(logprobs, lps))
    assert len(logprobs) == len(lps) and diff <= LOGPROB_ATOL, f"{what}: log-probs differ by {diff:.2e}"


def scrape(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_models_lists_adapters_with_parent(server) -> None:
    data = httpx.get(server.base_url + "/models", headers=server.headers).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"tiny", "a0", "a1", "a2"}
    assert all(by_id[a]["parent"] == "tiny" for a in ("a0", "a1", "a2"))
    assert by_id["a1"]["root"] == f"{server.hub_repo}-lora-1"  # served from the local Hub by repo id


@pytest.mark.parametrize("i", [0, 1, 2])
def test_each_adapter_matches_transformers_merged(server, refs, i: int) -> None:
    for k, p in enumerate(PROMPTS[:2]):
        _assert_matches(server, _complete(server, f"a{i}", p), refs[i][k], f"adapter a{i} prompt {k}")
    _assert_matches(server, _complete(server, "tiny", PROMPTS[0]), refs[None][0], "base model")


def test_three_adapters_at_once_with_one_slot_swap_and_finish(server, refs) -> None:
    before = scrape(server)
    jobs = [(m, k) for k in range(2) for m in ("a0", "a1", "a2", "tiny")]

    async def main() -> list[dict]:
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key=TEST_API_KEY, max_retries=0, timeout=120)

        async def one(model: str, k: int):
            return await client.completions.create(model=model, prompt=PROMPTS[k], max_tokens=NEW, temperature=0,
                                                   logprobs=0, extra_body={"ignore_eos": True})
        try:
            return await asyncio.gather(*(one(m, k) for m, k in jobs))
        finally:
            await client.close()

    outs = asyncio.run(main())
    tok = load_tokenizer(server.model_dir)
    for (model, k), o in zip(jobs, outs):
        i = None if model == "tiny" else int(model[1])
        lp = o.choices[0].logprobs
        _same_tokens(tok, o.choices[0].text, lp.tokens, lp.token_logprobs, refs[i][k], f"{model} prompt {k}")
        assert o.choices[0].finish_reason == "length"
    after = scrape(server)
    assert after["hubdeploy:lora_swaps_total"] >= before["hubdeploy:lora_swaps_total"] + 3
    assert after["hubdeploy:lora_resident_adapters"] == 1
    assert after["hubdeploy:lora_loaded_adapters"] == 3


def test_unknown_model_is_404(server) -> None:
    r = _complete(server, "no-such-adapter", PROMPTS[0])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_run_time_load_use_unload_from_the_hub(server, refs) -> None:
    url = server.base_url
    body = {"lora_name": "hubx", "lora_path": f"{server.hub_repo}-lora-2@main"}  # REPO_ID@revision
    r = httpx.post(url + "/load_lora_adapter", headers=server.headers, timeout=60,
                   json={"lora_name": "hubrev", "lora_path": f"{server.hub_repo}-lora-2@no-such-branch"})
    assert 400 <= r.status_code < 500 and "no-such-branch" in r.json()["error"]["message"], r.text
    assert httpx.post(url + "/load_lora_adapter", json=body).status_code == 401  # admin needs the key
    r = httpx.post(url + "/load_lora_adapter", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in httpx.get(url + "/models", headers=server.headers).json()["data"]]
    assert "hubx" in ids
    _assert_matches(server, _complete(server, "hubx", PROMPTS[1]), refs[2][1], "run-time adapter")
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "hubx"}, headers=server.headers)
    assert r.status_code == 200, r.text
    assert _complete(server, "hubx", PROMPTS[1]).status_code == 404
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "hubx"}, headers=server.headers)
    assert r.status_code == 404
    assert "hubx" not in [m["id"] for m in httpx.get(url + "/models", headers=server.headers).json()["data"]]


def _bad(kind: str, model_dir: Path, tiny_models, root: Path) -> Path:
    if kind == "wrong_base":
        return adapter_dir(tiny_models("qwen3_moe", "none", adapters=3), 2)  # other expert shapes
    d = root / kind
    shutil.copytree(adapter_dir(model_dir, 0), d)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if kind == "rank_too_high":
        sd = load_file(str(w_path))
        sd = {k: v.repeat(8, 1) if ".lora_A." in k else v.repeat(1, 8) / 8 for k, v in sd.items()}  # r 4 -> 32
        save_file(sd, str(w_path))
        cfg.update(r=32, lora_alpha=64)
    elif kind == "dora":
        cfg["use_dora"] = True
    elif kind == "missing_file":
        w_path.unlink()
    elif kind == "corrupt":
        w_path.write_bytes(w_path.read_bytes()[:300])
    cfg_path.write_text(json.dumps(cfg))
    return d


BAD_WORDS = {"wrong_base": "another base model", "rank_too_high": "exceeds max_lora_rank=16", "dora": "DoRA",
             "missing_file": "missing adapter_model.safetensors", "corrupt": "corrupt"}


def test_bad_adapters_get_4xx_naming_the_problem_and_serving_goes_on(server, tiny_models, tmp_path, refs) -> None:
    for kind, words in BAD_WORDS.items():
        path = _bad(kind, server.model_dir, tiny_models, tmp_path)
        r = httpx.post(server.base_url + "/load_lora_adapter", json={"lora_name": f"bad-{kind}", "lora_path": str(path)},
                       headers=server.headers, timeout=60)
        assert 400 <= r.status_code < 500, (kind, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err["message"], (kind, err["message"])
        assert set(err) == {"message", "type", "param", "code"}
    _assert_matches(server, _complete(server, "a0", PROMPTS[0]), refs[0][0], "after bad loads")
    ids = [m["id"] for m in httpx.get(server.base_url + "/models", headers=server.headers).json()["data"]]
    assert not [i for i in ids if i.startswith("bad-")]


def test_disable_lora_admin(model_dir) -> None:
    with start_serve(model_dir, api_key=TEST_API_KEY, extra_args=[
            "--lora", f"a0={adapter_dir(model_dir, 0)}", "--disable-lora-admin", "--max-model-len", "64",
            "--kv-cache-tokens", "512"]) as s:
        r = httpx.post(s.base_url + "/load_lora_adapter", headers=s.headers,
                       json={"lora_name": "x", "lora_path": str(adapter_dir(model_dir, 1))})
        assert r.status_code == 403 and "--disable-lora-admin" in r.json()["error"]["message"]
        r = httpx.post(s.base_url + "/unload_lora_adapter", headers=s.headers, json={"lora_name": "a0"})
        assert r.status_code == 403
        assert _complete(s, "a0", PROMPTS[0]).status_code == 200  # the adapter from --lora still serves


def _load(server, name: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.base_url + "/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                      headers=server.headers if headers is None else headers, timeout=60)


def test_adapter_sources_limited_to_roots_and_hub_ids(server, model_dir, tmp_path, refs) -> None:
    """Issue 21, point 2: run-time loads read only under --lora-root; outside paths are refused
    with one answer whether they exist or not (no probing the server's disk); names are checked."""
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="hubdeploy-outside-"))
    try:
        shutil.copytree(adapter_dir(model_dir, 1), outside / "good")  # a valid adapter, outside the root
        (tmp_path / "link").symlink_to(outside / "good")  # under the root, pointing outside
        answers = [_load(server, "x1", p) for p in (str(outside / "good"), "/etc", "/no/such/dir",
                                                     str(tmp_path / "link"), "~/.ssh")]
        for r in answers:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "lora_path" and r.json()["error"]["code"] == "invalid_adapter_source"
        assert len({r.json()["error"]["message"] for r in answers}) == 1  # exists or not: the same answer
        assert "/etc" not in answers[1].text and "/no/such" not in answers[2].text
        for p in ("./good", "org/../x", "file:///etc", "good"):
            r = _load(server, "x2", p)
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (p, r.text)
        for bad_name in ("../a0", "a b", "x" * 65, "-lead", "a\nb"):
            r = _load(server, bad_name, str(tmp_path))
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", (bad_name, r.text)
        shutil.copytree(outside / "good", tmp_path / "inside")  # the same adapter under the root loads
        r = _load(server, "inside", str(tmp_path / "inside"))
        assert r.status_code == 200, r.text
        _assert_matches(server, _complete(server, "inside", PROMPTS[1]), refs[1][1], "adapter from under the root")
        assert httpx.post(server.base_url + "/unload_lora_adapter", json={"lora_name": "inside"},
                          headers=server.headers).status_code == 200
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_public_endpoint_adapter_admin_needs_a_key(model_dir, tmp_path) -> None:
    """Issue 21, point 2: without an endpoint key, adapter admin needs --lora-admin-key; with
    neither it is closed, while completions stay public."""
    from fastapi.testclient import TestClient

    from hubdeploy.serving.server.api_server import build_app

    shutil.copytree(adapter_dir(model_dir, 1), tmp_path / "a1")
    with start_serve(model_dir, extra_args=["--lora", f"a0={adapter_dir(model_dir, 0)}", "--lora-admin-key", "adm-k",
                                            "--lora-root", str(tmp_path), "--max-model-len", "64",
                                            "--kv-cache-tokens", "512"]) as s:
        assert _load(s, "a1", str(tmp_path / "a1"), headers={}).status_code == 401
        assert _load(s, "a1", str(tmp_path / "a1"), headers={"Authorization": "Bearer nope"}).status_code == 401
        r = httpx.post(s.base_url + "/unload_lora_adapter", json={"lora_name": "a0"})
        assert r.status_code == 401
        r = _load(s, "a1", str(tmp_path / "a1"), headers={"Authorization": "Bearer adm-k"})
        assert r.status_code == 200, r.text
        assert _complete(s, "a1", PROMPTS[0]).status_code == 200  # inference needs no key
    app = build_app(None, served_model_name="tiny")  # public, no admin key
    with TestClient(app) as c:
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "org/x"}),
                           ("/v1/unload_lora_adapter", {"lora_name": "x"})):
            r = c.post(path, json=body, headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "lora_admin_disabled", r.text
