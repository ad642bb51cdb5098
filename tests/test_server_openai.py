"""The endpoint through real clients: the `openai` SDK (sync, async, streaming), the
`huggingface_hub.InferenceClient`, plain httpx for /health, /v1/models and /metrics —
all against one real `hubdeploy serve` child process of the tiny AWQ Mixtral on loopback.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.serve import TEST_API_KEY

pytestmark = pytest.mark.timeout(240)

USER = [{"role": "user", "content": "Tell me about the quick brown fox."}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0, timeout=60)


def scrape(server) -> dict[str, float]:
    """`/metrics` parsed by prometheus_client's own parser: sample name -> value (unlabelled sum)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out: dict[str, float] = defaultdict(float)  # labelled series appear on first use
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_health_and_models(tiny_server) -> None:
    r = httpx.get(tiny_server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = httpx.get(tiny_server.base_url + "/models", headers=tiny_server.headers).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == 256
    # the phases the deploy service reads, in order
    phases = [line.split()[1] for line in tiny_server.stdout().splitlines() if line.startswith("phase: ")]
    assert phases == ["downloading", "loading", "warming_up", "ready"]


def test_openai_sync_chat_and_completion(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 4 and chat.usage.total_tokens == chat.usage.prompt_tokens + 4
    # list-of-parts content renders exactly like the plain string
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about the "},
                                           {"type": "text", "text": "quick brown fox."}]}]
    chat2 = client.chat.completions.create(model="tiny", messages=parts, max_tokens=4, temperature=0)
    assert chat2.choices[0].message.content == chat.choices[0].message.content
    assert chat2.usage.prompt_tokens == chat.usage.prompt_tokens

    comp = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=4, temperature=0)
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 4
    # token-id prompts and batches of prompts
    batch = client.completions.create(model="tiny", prompt=["The quick brown fox", "Hello"], max_tokens=2,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text.startswith(comp.choices[0].text[:1]) or comp.choices[0].text == ""
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7, 8]], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 4
    echo = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=4, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The quick brown fox" + comp.choices[0].text


def test_openai_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == "length" and usage is not None and usage.completion_tokens == 6

    text = ""
    for chunk in client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0,
                                           stream=True):
        text += chunk.choices[0].text
    assert text == client.completions.create(model="tiny", prompt="Hello there", max_tokens=5,
                                             temperature=0).choices[0].text


def test_openai_async_concurrent(tiny_server) -> None:
    async def main() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0)
        async def one(i: int) -> str:
            r = await aclient.completions.create(model="tiny", prompt=f"Story number {i}", max_tokens=3,
                                                 temperature=0)
            return r.choices[0].text
        try:
            return list(await asyncio.gather(*(one(i) for i in range(3))))
        finally:
            await aclient.close()

    texts = asyncio.run(main())
    assert len(texts) == 3
    sync = openai.OpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0)
    # batched with others, each request still gets exactly its greedy answer
    assert texts[1] == sync.completions.create(model="tiny", prompt="Story number 1", max_tokens=3,
                                               temperature=0).choices[0].text


def test_n_and_seed(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, n=2, seed=7,
                                  temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10
    again = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, n=2, seed=7,
                                      temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeds seed+i reproduce
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, n=2, seed=1, stream=True)
    seen = {c.index for chunk in chat for c in chunk.choices}
    assert seen == {0, 1}


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    for tok in content:
        assert tok.logprob <= 0.0 and len(tok.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert tok.logprob == pytest.approx(max(t.logprob for t in tok.top_logprobs), abs=1e-4)
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=1)
    assert len(comp.choices[0].logprobs.tokens) == 3
    assert "".join(comp.choices[0].logprobs.tokens) == comp.choices[0].text


def test_stop_across_token_boundary(tiny_server, client: openai.OpenAI) -> None:
    """A stop string that starts inside one token and ends inside the next cuts the text
    exactly before it, in both the JSON and the streamed answer."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ref = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, logprobs=0)
    tokens, text = ref.choices[0].logprobs.tokens, ref.choices[0].text
    assert "".join(tokens) == text
    stop = None
    pos = 0
    for a, b in zip(tokens, tokens[1:]):
        pos += len(a)
        cand = a[-2:] + b[:2]
        if (len(a) >= 2 and len(b) >= 2 and cand.isprintable() and "\ufffd" not in cand
                and text.find(cand) == pos - 2):
            stop = cand
            break
    if stop is None:
        pytest.skip(f"no two adjacent multi-character tokens in {tokens!r}")
    cut = text[: text.index(stop)]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed, finish = "", None
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                           stop=stop, stream=True):
        streamed += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert streamed == cut and finish == "stop"


def test_huggingface_inference_client(tiny_server) -> None:
    from huggingface_hub import InferenceClient

    hf = InferenceClient(base_url=tiny_server.base_url, api_key=TEST_API_KEY)
    out = hf.chat_completion(messages=USER, model="tiny", max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 4
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       hf.chat_completion(messages=USER, model="tiny", max_tokens=4, temperature=0, stream=True)
                       if c.choices)
    assert streamed == out.choices[0].message.content


def test_metrics_move(tiny_server, client: openai.OpenAI) -> None:
    before = scrape(tiny_server)
    client.completions.create(model="tiny", prompt="Counting tokens now", max_tokens=3, temperature=0)
    after = scrape(tiny_server)
    assert after["hubdeploy:generation_tokens_total"] >= before["hubdeploy:generation_tokens_total"] + 3
    assert after["hubdeploy:prompt_tokens_total"] > before["hubdeploy:prompt_tokens_total"]
    assert after["hubdeploy:time_to_first_token_seconds_count"] == before["hubdeploy:time_to_first_token_seconds_count"] + 1
    assert after["hubdeploy:e2e_request_latency_seconds_count"] == before["hubdeploy:e2e_request_latency_seconds_count"] + 1
    assert after["hubdeploy:inter_token_latency_seconds_count"] >= before["hubdeploy:inter_token_latency_seconds_count"] + 2
    for gauge in ("hubdeploy:num_requests_running", "hubdeploy:num_requests_waiting",
                  "hubdeploy:num_requests_preempted", "hubdeploy:kv_cache_usage_perc",
                  "hubdeploy:prefix_cache_hit_rate"):
        assert gauge in after
    assert after["hubdeploy:engine_ready"] == 1.0


def test_disconnect_mid_stream_frees_kv_blocks(tiny_server) -> None:
    before = scrape(tiny_server)
    body = {"model": "tiny", "prompt": "Write a very long story", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", tiny_server.base_url + "/completions", json=body, headers=tiny_server.headers) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    n += 1
                    if n == 3:
                        # still connected (leaving iter_lines closes the connection): blocks are held
                        mid = scrape(tiny_server)
                        break
            assert mid["hubdeploy:num_requests_running"] == 1 and mid["hubdeploy:kv_cache_usage_perc"] > 0.0, mid
        # leaving both blocks closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = scrape(tiny_server)
        if m["hubdeploy:num_requests_running"] == 0 and m["hubdeploy:kv_cache_usage_perc"] == 0.0:
            break
        time.sleep(0.2)
    assert m["hubdeploy:num_requests_running"] == 0
    assert m["hubdeploy:kv_cache_usage_perc"] == 0.0
    assert m["hubdeploy:engine_requests_aborted_total"] == before["hubdeploy:engine_requests_aborted_total"] + 1
    assert m["hubdeploy:generation_tokens_total"] < before["hubdeploy:generation_tokens_total"] + 200


def test_lora_admin_routes_answer_not_implemented(tiny_server) -> None:
    r = httpx.post(tiny_server.base_url + "/load_lora_adapter", headers=tiny_server.headers,
                   json={"lora_name": "x", "lora_path": "/nowhere"})
    assert r.status_code in (400, 404, 501)  # 501 until the LoRA manager fills the hook
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if r.status_code == 501:
        assert "--lora" in r.json()["error"]["message"]


def test_sse_wire_format(tiny_server) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", tiny_server.base_url + "/chat/completions", json=body, headers=tiny_server.headers,
                      timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_serve_hub_repo_id_with_env_api_key(tiny_models, local_hub) -> None:
    """MODEL as a repo id of a private repo: downloaded from the (local) Hub through serving.hub
    with HF_TOKEN, the key from HUBDEPLOY_API_KEY, the served name the repo id, huggingface_hub's
    progress bar on stderr and the phase lines on stdout. Its KV cache (512 tokens) is too small
    for six 120-token requests at once: they are preempted and still give their alone-outputs."""
    from tests.fixtures.serve import start_serve

    repo, token = "private-org/tiny-mixtral-awq", "hf_audit_private_token"
    local_hub.add_repo(repo, tiny_models("mixtral", "awq"), private=True)
    local_hub.grant(token, repo)
    args = ["--max-model-len", "128", "--kv-cache-tokens", "512"]
    no_token = launch_serve_failing(repo, {"HF_ENDPOINT": local_hub.endpoint}, args)
    assert "private repos need a token" in no_token and "HF_TOKEN" in no_token
    with start_serve(repo, model_name=None, extra_args=args,
                     env={"HF_ENDPOINT": local_hub.endpoint, "HUBDEPLOY_API_KEY": "env-key", "HF_TOKEN": token,
                          "HF_HOME": str(local_hub.root / "serve-hf-home")}) as server:
        assert httpx.get(server.base_url + "/models").status_code == 401
        c = openai.OpenAI(base_url=server.base_url, api_key="env-key", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == [repo]
        r = c.completions.create(model=repo, prompt="Hello", max_tokens=2)
        assert r.usage.completion_tokens == 2
        out = server.stdout()
        phases = [line.split()[1] for line in out.splitlines() if line.startswith("phase: ")]
        assert phases == ["downloading", "loading", "warming_up", "ready"]
        assert f"phase: downloading {repo}" in out
        assert "Fetching" in server.stderr() and "100%" in server.stderr()  # the download progress bar
        assert "Loading weights" in server.stderr()  # and the loading one
        assert token not in out + server.stderr()

        prompts = _mixed_prompts(6, seed=21)
        prompts = [p[:20] for p in prompts]
        kw = dict(model=repo, max_tokens=100, temperature=0, extra_body={"ignore_eos": True})

        async def together() -> list:
            ac = openai.AsyncOpenAI(base_url=server.base_url, api_key="env-key", max_retries=0, timeout=120)
            try:
                return list(await asyncio.gather(*(ac.completions.create(prompt=p, **kw) for p in prompts)))
            finally:
                await ac.close()

        before = scrape(server)
        batched = asyncio.run(together())
        after = scrape(server)
        assert after["hubdeploy:preemptions_total"] > before["hubdeploy:preemptions_total"]
        alone = [c.completions.create(prompt=p, **kw) for p in prompts]
        assert [r.choices[0].text for r in batched] == [r.choices[0].text for r in alone]
        assert all(r.usage.completion_tokens == 100 for r in batched)
        assert scrape(server)["hubdeploy:kv_cache_usage_perc"] == 0.0


def launch_serve_failing(model: str, env: dict[str, str], args: list[str]) -> str:
    """Run `hubdeploy serve` that must fail to load; its stdout (the phase lines)."""
    from tests.fixtures.serve import launch_serve

    server = launch_serve(model, model_name=None, env=env, extra_args=args)
    try:
        assert server.proc.wait(90) != 0
    finally:
        server.stop()
    return server.stdout()


def test_disconnect_before_non_streamed_answer_aborts(tiny_server) -> None:
    """A client that leaves while its non-streamed request runs: its sequences are aborted and
    their KV blocks freed. The request goes over a raw socket that is closed only once the
    engine reports it running, so the test does not race the server under load."""
    import json
    import socket

    before = scrape(tiny_server)
    # 4 x 240 tokens take well over a second here
    body = json.dumps({"model": "tiny", "prompt": "Write a very long story", "max_tokens": 240, "n": 4,
                       "ignore_eos": True, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nAuthorization: Bearer {tiny_server.api_key}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", tiny_server.port), timeout=10)
    try:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while scrape(tiny_server)["hubdeploy:num_requests_running"] < 1:
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.02)
    finally:
        sock.close()  # the client goes away mid-generation
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = scrape(tiny_server)
        if m["hubdeploy:num_requests_running"] == 0 and m["hubdeploy:num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert m["hubdeploy:engine_requests_aborted_total"] >= before["hubdeploy:engine_requests_aborted_total"] + 1
    assert m["hubdeploy:generation_tokens_total"] < before["hubdeploy:generation_tokens_total"] + 4 * 240
    assert m["hubdeploy:kv_cache_usage_perc"] == 0.0


# ---------------------------------------------------------------- audit additions (issue 4)


def _vocab_ids(server) -> dict[str, int]:
    """Token string (as the endpoint's logprobs show it) -> id, for strings one id decodes to."""
    from hubdeploy.serving.tokenizer import load_tokenizer

    tok = load_tokenizer(server.model_dir)
    seen: dict[str, list[int]] = defaultdict(list)
    for i in range(tok.vocab_size):
        seen[tok.decode([i], skip_special_tokens=False)].append(i)
    return {s: ids[0] for s, ids in seen.items() if len(ids) == 1}


def test_request_fields_clients_send(tiny_server, client: openai.OpenAI) -> None:
    """max_completion_tokens, user, and vLLM's top_k / min_tokens / stop_token_ids each change
    what is generated the way vLLM documents."""
    chat = client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=3, temperature=0,
                                          user="user-42")
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    prompt = "Once upon a time"
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                       extra_body={"ignore_eos": True})
    # top_k=1 leaves only the argmax, whatever the temperature and seed
    k1 = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.5, seed=3,
                                   extra_body={"top_k": 1, "ignore_eos": True})
    assert k1.choices[0].text == greedy.choices[0].text
    first = greedy.choices[0].logprobs.tokens[0]
    ids = _vocab_ids(tiny_server)
    if first not in ids:
        pytest.skip(f"first greedy token {first!r} is not a unique vocabulary string")
    stop_id = ids[first]
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    # min_tokens keeps stop ids (and EOS) from ending the sequence early
    held = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [stop_id], "min_tokens": 4})
    assert held.usage.completion_tokens >= 4


def test_streaming_logprobs_match_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    streamed = []
    for chunk in client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    want = full.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in want]
    for s, w in zip(streamed, want):
        assert s.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert [t.token for t in s.top_logprobs] == [t.token for t in w.top_logprobs] and len(s.top_logprobs) == 2
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=1)
    tokens, text = [], ""
    for chunk in client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=1,
                                           stream=True):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            assert all(len(t) == 1 for t in c.logprobs.top_logprobs)
    assert tokens == comp.choices[0].logprobs.tokens and text == comp.choices[0].text
    # completions stream with n=2 and include_usage: the last chunk counts the prompt once
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 6 and usage.prompt_tokens == comp.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def _mixed_prompts(n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 600) for _ in range(rng.randrange(2, 60))] for _ in range(n)]


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_batch_invariance_32_concurrent_over_http(tiny_server, client: openai.OpenAI, seeded: bool) -> None:
    """32 concurrent requests of mixed lengths (batched, chunked) give exactly what each gives alone."""
    prompts = _mixed_prompts(32, seed=11 if seeded else 12)

    def kw(i: int) -> dict:
        sampling = dict(temperature=0.9, top_p=0.9, seed=1000 + i) if seeded else dict(temperature=0)
        return dict(model="tiny", prompt=prompts[i], max_tokens=6, logprobs=0, extra_body={"ignore_eos": True},
                    **sampling)

    async def together() -> list:
        aclient = openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key=TEST_API_KEY, max_retries=0, timeout=120)
        try:
            return list(await asyncio.gather(*(aclient.completions.create(**kw(i)) for i in range(32))))
        finally:
            await aclient.close()

    before = scrape(tiny_server)
    batched = asyncio.run(together())
    alone = [client.completions.create(**kw(i)) for i in range(32)]
    got = [(r.choices[0].logprobs.tokens, r.choices[0].text) for r in batched]
    assert got == [(r.choices[0].logprobs.tokens, r.choices[0].text) for r in alone]
    assert all(r.usage.completion_tokens == 6 for r in batched)
    after = scrape(tiny_server)
    assert after["hubdeploy:request_success_total"] >= before["hubdeploy:request_success_total"] + 64
    assert after["hubdeploy:kv_cache_usage_perc"] == 0.0


def test_repeated_system_prompt_hits_prefix_cache_over_http(tiny_server, client: openai.OpenAI) -> None:
    """The Mixtral template has no system role, so the shared instructions open the first user
    turn (what Mixtral clients do): the second request reuses its KV blocks (metric) and a
    repeat of the first request, now served from the cache, answers exactly as before."""
    import uuid

    system = (f"[{uuid.uuid4().hex[:8]}] You are a careful assistant. Answer briefly, cite no sources, "
              "and keep every reply under forty words please.")

    def ask(question: str) -> str:
        msgs = [{"role": "user", "content": f"{system}\n\n{question}"}]
        return client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                              ).choices[0].message.content

    m0 = scrape(tiny_server)
    first = ask("What is a fox?")
    m1 = scrape(tiny_server)
    assert m1["hubdeploy:prefix_cache_hits_total"] == m0["hubdeploy:prefix_cache_hits_total"]  # a new prefix
    ask("Why is the sky blue?")
    m2 = scrape(tiny_server)
    assert m2["hubdeploy:prefix_cache_hits_total"] >= m1["hubdeploy:prefix_cache_hits_total"] + 3  # >= 48 tokens
    assert m2["hubdeploy:prefix_cache_hit_rate"] > 0.0
    assert ask("What is a fox?") == first  # from the cache, same answer
    m3 = scrape(tiny_server)
    assert m3["hubdeploy:prefix_cache_hits_total"] > m2["hubdeploy:prefix_cache_hits_total"]


def test_utf8_split_across_tokens_never_broken_in_the_stream(tiny_server, client: openai.OpenAI) -> None:
    """The tiny byte-level vocabulary spells non-ASCII characters with several byte tokens. With
    hot seeded sampling the model emits such bytes; the streamed pieces must add up to the same
    text as the non-streamed answer (a character cut in half would show up as U+FFFD in one
    and not the other), and no piece may start with a UTF-8 continuation left over."""
    body = dict(model="tiny", prompt=" héllo 日本語 🙂", max_tokens=48, temperature=2.0, logprobs=0,
                extra_body={"ignore_eos": True})
    for seed in range(4):
        full = client.completions.create(seed=seed, **body)
        partial = [t for t in full.choices[0].logprobs.tokens if "\ufffd" in t]
        if partial:
            break
    else:
        pytest.skip("no byte token of a multi-byte character was sampled")
    pieces = [chunk.choices[0].text for chunk in client.completions.create(seed=seed, stream=True, **body)]
    assert "".join(pieces) == full.choices[0].text
