"""The deploy page through `gradio_client`: `hubdeploy up` in a real process, a tiny model on the local Hub.

`/inspect` reports the model and its plans, `/deploy` ends in a running endpoint that answers
a chat request with the key it showed, `/chat` streams from it, `/endpoints` lists it and
`/delete` removes it. The helpers here (`start_space_service`, `push_hostile_repo`) are
shared with the browser test.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.fixtures.local_hub import LocalHub, free_port
from tests.fixtures.service import reap

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN = "adm-space-test-token"
HOSTILE_BODY = """
## Hostile section (must render inert)

<script>window.__pwned = 'script'</script>
<img src="x.png" onerror="window.__pwned = 'onerror'">
<a id="jslink" href="javascript:window.__pwned='javascript'">click for prizes</a>
[md js link](javascript:window.__pwned='md')
<iframe src="javascript:window.__pwned='iframe'"></iframe>
"""


@dataclass
class SpaceService:
    url: str
    token: str
    proc: subprocess.Popen
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def delete_all(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            for ep in httpx.get(self.url + "/api/endpoints", headers=self.headers, timeout=30).json()["endpoints"]:
                httpx.delete(f"{self.url}/api/endpoints/{ep['name']}", headers=self.headers, timeout=60)


@contextlib.contextmanager
def start_space_service(hub: LocalHub, data_dir: Path, timeout: float = 180.0,
                        demo: bool = False) -> Iterator[SpaceService]:
    """`hubdeploy up` (service + mounted page) on a free loopback port, against the local Hub; with
    `demo`, as a newcomer starts it: the built-in tiny demo model is what the page offers first."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "up.log"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HUBDEPLOY_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("HUBDEPLOY_URL", "HUBDEPLOY_TOKEN", "SPACE_ID"):
        env.pop(k, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hubdeploy", "up", "--host", "127.0.0.1", "--port", str(port),
                                 "--data-dir", str(data_dir), "--hub-endpoint", hub.endpoint,
                                 *([] if demo else ["--no-demo"])],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    svc = SpaceService(f"http://127.0.0.1:{port}", ADMIN, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"hubdeploy up exited with {proc.returncode}:\n{svc.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(svc.url + "/", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"hubdeploy up did not answer in {timeout}s:\n{svc.log_tail()}"
            time.sleep(0.3)
        yield svc
    finally:
        if proc.poll() is None:
            svc.delete_all()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        reap(data_dir)  # endpoint processes outlive the service by design


def push_hostile_repo(hub: LocalHub, model_dir: Path, work: Path, repo_id: str = "tiny/mixtral-awq-card") -> str:
    """The tiny model again, its card carrying script / onerror / javascript: payloads, plus one adapter."""
    from hubdeploy.serving.tiny import adapter_dir

    staged = work / "hostile"
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(model_dir, staged)
    readme = staged / "README.md"
    readme.write_text(readme.read_text() + HOSTILE_BODY)
    hub.add_repo(repo_id, staged, card_data={"base_model": "test/tiny-mixtral-base", "license": "apache-2.0"})
    hub.add_repo(f"{repo_id}-lora-0", adapter_dir(model_dir, 0),
                 card_data={"base_model": repo_id, "base_model_relation": "adapter"})
    return repo_id


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, local_hub: LocalHub, hub_tiny_model: Any) -> Iterator[SpaceService]:
    hub_tiny_model("mixtral", "awq", adapters=1)
    with start_space_service(local_hub, tmp_path_factory.mktemp("space_up")) as s:
        yield s


@pytest.mark.slow
def test_inspect_deploy_chat_delete(svc: SpaceService) -> None:
    from gradio_client import Client

    client = Client(svc.url + "/", verbose=False, download_files=False)
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/inspect", "/deploy", "/chat", "/endpoints", "/pause", "/resume", "/delete", "/logs"} <= set(api)

    repo = "tiny/mixtral-awq"
    out = client.predict(model=repo, revision="", hf_token="", token=svc.token, api_name="/inspect")
    status, summary, verdict, facts, card, preview, badge_md = out[:7]
    assert "error" not in status, status
    assert "MixtralForCausalLM" in facts and "AWQ 4-bit" in facts, facts
    assert "Ready to deploy" in verdict and "tiny/mixtral-awq" in summary
    assert f"/deploy?model={repo}" in badge_md and "/badge.svg" in badge_md
    gpu = out[8]
    assert any(v == "cpu" for _, v in gpu["choices"]) and gpu["value"] != "cpu"  # best fitting GPU preselected
    assert any(v.startswith("H100") and label.startswith("✓") for label, v in gpu["choices"]), gpu["choices"]
    assert any("lora-0" in v for _, v in out[10]["choices"])  # the Hub's adapter list
    name = out[12]
    assert name == "mixtral-awq"

    bad = client.predict(model="nobody/nothing", revision="", hf_token="", token=svc.token, api_name="/inspect")[0]
    assert "nobody/nothing" in bad and "not found" in bad.lower()
    unauth = client.predict(model=repo, revision="", hf_token="", token="wrong", api_name="/inspect")[0]
    assert "401" in unauth and "admin token" in unauth

    t0 = time.monotonic()
    job = client.submit(model=repo, gpu="cpu", name=name, adapters=[f"{repo}-lora-0"], max_model_len=256,
                        scale_to_zero_after_s=600, token=svc.token, api_name="/deploy")
    result = job.result(timeout=300)
    progress, logs, url, key, curl, openai_py = result[:6]  # layout and state outputs are not sent to clients
    deploy_s = time.monotonic() - t0
    assert 'data-status="running"' in progress, (progress, logs, svc.log_tail())
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert key.startswith(("hd_", "sk-", "hdk_")) or len(key) >= 20, key
    assert "chat/completions" in curl and "HUBDEPLOY_API_KEY" in openai_py and url in openai_py
    assert "X-Scale-Up-Timeout" in curl and result[7].startswith("after 600 s")  # the panel's scale-to-zero
    phases = [p for p in ("downloading", "loading", "warming_up", "running")
              if any(f'data-phase="{p}"' in (u[0] if isinstance(u, (list, tuple)) else "") for u in job.outputs())]
    assert "running" in phases
    print(f"\ndeploy through gradio_client: {deploy_s:.1f} s, phases seen {phases}")

    r = httpx.post(url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": repo, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert httpx.post(url + "/chat/completions", timeout=60, json={"model": repo, "messages": []}).status_code == 401
    models = {m["id"] for m in httpx.get(url + "/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]}
    assert {repo, "mixtral-awq-lora-0"} <= models, models

    chat_job = client.submit(message="hi", history=[], model=repo, system="", temp=0.0, max_new=8, api_name="/chat")
    history, _ = chat_job.result(timeout=120)
    assert history[-1]["role"] == "assistant" and history[-1]["content"] and "⚠️" not in history[-1]["content"], history
    partial = [_text(o[0][-1]["content"]) for o in chat_job.outputs() if o[0] and o[0][-1]["role"] == "assistant"]
    assert len(set(partial)) >= 3, partial  # streamed: the answer grew delta by delta
    # Mixtral's template refuses a system role: the playground folds it into the first user turn.
    history, _ = client.predict(message="again", history=history, model=repo, system="Be brief.", temp=0.0, max_new=4,
                                api_name="/chat")
    assert len(history) == 4 and history[-1]["content"] and "⚠️" not in history[-1]["content"], history

    rows, pick, _ = client.predict(token=svc.token, current=None, api_name="/endpoints")
    assert [name, "running"] == _rows(rows)[0][:2] and pick["value"] == name
    logs = client.predict(name=name, token=svc.token, api_name="/logs")[0]
    assert logs["value"] if isinstance(logs, dict) else logs

    paused = client.predict(name=name, token=svc.token, hf_token="", api_name="/pause")
    assert "paused" in paused[2] and [name, "paused"] == _rows(paused[0])[0][:2]
    resumed = client.predict(name=name, token=svc.token, hf_token="", api_name="/resume")
    assert "starting again" in resumed[2], resumed[2]
    deadline = time.monotonic() + 120
    while (ep := httpx.get(f"{svc.url}/api/endpoints/{name}", headers=svc.headers).json())["status"] != "running":
        assert ep["status"] != "failed" and time.monotonic() < deadline, ep
        time.sleep(0.3)
    r = httpx.post(ep["url"] + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"model": repo, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text  # same key after resume

    deleted = client.predict(name=name, token=svc.token, hf_token="", api_name="/delete")
    assert "deleted" in deleted[2]
    assert httpx.get(f"{svc.url}/api/endpoints/{name}", headers=svc.headers).status_code == 404


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _rows(table: Any) -> list[list[Any]]:
    return table["data"] if isinstance(table, dict) else table


def test_deploy_errors_show_the_service_reason(svc: SpaceService) -> None:
    """A refused deploy shows the service's own reason and what to do, and leaves nothing behind."""
    import torch
    from gradio_client import Client

    client = Client(svc.url + "/", verbose=False, download_files=False)
    bad_name = client.predict(model="tiny/mixtral-awq", gpu="cpu", name="Bad_Name", token=svc.token, api_name="/deploy")[0]
    assert "name" in bad_name and "hd-error" in bad_name, bad_name
    if not torch.cuda.is_available():
        no_gpu = client.predict(model="tiny/mixtral-awq", gpu="T4", name="gpu-one", token=svc.token, api_name="/deploy")[0]
        assert "409" in no_gpu and "What to do" in no_gpu, no_gpu
    assert httpx.get(svc.url + "/api/endpoints", headers=svc.headers).json()["endpoints"] == []


def test_standalone_page_against_a_remote_service(svc: SpaceService, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Space runs: the page in its own server, told the service URL and token by secrets."""
    from gradio_client import Client

    from hubdeploy.space.page import PageConfig, build_page

    monkeypatch.setenv("HUBDEPLOY_URL", svc.url)
    monkeypatch.setenv("HUBDEPLOY_TOKEN", svc.token)
    demo = build_page(PageConfig())
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        out = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False).predict(
            model="tiny/mixtral-awq", api_name="/inspect")  # no token from the browser: the secret is used
        assert "MixtralForCausalLM" in out[3], out[0]
        access = [c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "hd-access"]
        assert access and access[0]["props"]["visible"] is False  # no token box when the secret is set
    finally:
        demo.close()


def test_badge_svg_and_deploy_redirect(svc: SpaceService) -> None:
    r = httpx.get(svc.url + "/badge.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and "<svg" in r.text
    r = httpx.get(svc.url + "/deploy?model=org/m&gpu=cpu", follow_redirects=False)
    assert r.status_code in (302, 303, 307) and r.headers["location"].endswith("?model=org/m&gpu=cpu")


def test_form_helpers() -> None:
    """Adapter entry, name suggestion and the progress view (pure functions of space.view)."""
    from hubdeploy.space import view

    assert view.parse_adapters(["org/lora-a"], "b=org/other, org/lora-a\n./local-lora") == {
        "lora-a": "org/lora-a", "b": "org/other", "local-lora": "./local-lora"}
    with pytest.raises(ValueError, match="served as 'x'"):
        view.parse_adapters(["a/x", "b/x"], "")
    assert view.suggest_name("Org/Mixtral-8x7B-Instruct-v0.1-AWQ") == "mixtral-8x7b-instruct-v0-1"
    assert view.suggest_name("org/m", {"m", "m-2"}) == "m-3"
    ep = {"name": "e", "status": "initializing", "phase": "downloading",
          "progress": {"bytes_done": 6_000_000_000, "bytes_total": 24_000_000_000}}
    html = view.progress_html(ep)
    assert 'data-phase="downloading"' in html and "6.00 GB of 24.0 GB (25%)" in html
    report = {"compat": [{"capability": "quantization", "status": "error", "reason": "GPTQ is not served",
                          "action": "use an AWQ 4-bit variant"}], "awq_variants": ["org/m-AWQ"]}
    verdict = view.verdict_html(report, [], None)
    assert "cannot be served" in verdict and "GPTQ is not served" in verdict and "use an AWQ 4-bit variant" in verdict
    assert '<a class="hd-alt" href="/deploy?model=org/m-AWQ">org/m-AWQ</a>' in verdict  # reloads the form with it
    failed = view.progress_html({"name": "e", "status": "failed", "reason": "out of memory <b>"})
    assert "out of memory &lt;b&gt;" in failed and "What to do" in failed


def test_sign_in_line() -> None:
    """`hubdeploy up`'s sign-in link: the token only in the fragment (percent-encoded); a made token is
    shown once, one the operator gave only to a terminal, and no token means no line."""
    from hubdeploy.commands.up import browse_url, sign_in_line, sign_in_url

    base = browse_url("0.0.0.0", 7860)
    assert base == "http://127.0.0.1:7860" and browse_url("::", 1) == "http://[::1]:1"
    assert browse_url("10.0.0.5", 80) == "http://10.0.0.5:80"
    assert sign_in_url(base + "/", "hdadm_a-b_c") == "http://127.0.0.1:7860/#token=hdadm_a-b_c"
    assert sign_in_url(base, "a+b/c d#e") == "http://127.0.0.1:7860/#token=a%2Bb%2Fc%20d%23e"
    made = sign_in_line(base, "hdadm_new", None, tty=False)
    assert made is not None and "http://127.0.0.1:7860/#token=hdadm_new " in made and "shown once" in made
    assert sign_in_line(base, None, "chosen-secret", tty=True) == "hubdeploy: sign in: http://127.0.0.1:7860/#token=chosen-secret"
    logged = sign_in_line(base, None, "chosen-secret", tty=False)
    assert logged is not None and "chosen-secret" not in logged and "#token=<HUBDEPLOY_ADMIN_TOKEN>" in logged
    assert sign_in_line(base, None, None, tty=True) is None


def test_query_prefill() -> None:
    """The badge's query as the page reads it: known fields only, numbers only when they are numbers."""
    from hubdeploy.space.page import query_prefill

    q = {"model": " org/m ", "revision": "v1", "gpu": "cpu", "max_model_len": "512", "max_num_seqs": "x",
         "max_loras": "0", "access": "public", "evil": "1", "adapters": ""}
    assert query_prefill(q) == {"model": "org/m", "revision": "v1", "gpu": "cpu", "access": "public",
                                "max_model_len": 512}
    assert query_prefill({}) == {}
