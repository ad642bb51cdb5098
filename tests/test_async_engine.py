"""The engine fronts: `AsyncEngine` (step loop in a thread) and `EngineProcess` (in a child
process, talked to over a pipe) — the same streams, aborts, disconnects and failures."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from hubdeploy.serving.async_engine import AsyncEngine, EngineDeadError
from hubdeploy.serving.engine import EngineArgs, LLMEngine
from hubdeploy.serving.engine_process import EngineProcess
from hubdeploy.serving.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py


@pytest.fixture(scope="module")
def args(tiny_models) -> EngineArgs:
    return EngineArgs(str(tiny_models("mixtral", "none")), device="cpu", dtype="float32", max_model_len=128,
                      kv_cache_tokens=2048)


FRONTS = {"thread": AsyncEngine, "process": EngineProcess}


@pytest.fixture(scope="module", params=sorted(FRONTS))
def front(request):
    return FRONTS[request.param]


@pytest.fixture(scope="module")
def engine(args, front):
    eng = front(args)
    yield eng
    eng.shutdown()


async def collect(eng: AsyncEngine, ids: list[int], rid: str, params: SamplingParams = GREEDY):
    return [o async for o in eng.generate(ids, params, rid)]


def wait_idle(eng: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = eng.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {eng.stats()}")


def test_concurrent_streams_match_offline_engine(engine: AsyncEngine, args: EngineArgs) -> None:
    prompts = [[1, 5, 9, 33], [1, 100, 200, 300, 400, 500, 7], [1, 42], [1] + list(range(50, 90))]

    async def main():
        return await asyncio.gather(*(collect(engine, p, f"c{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLMEngine(args)
    for i, p in enumerate(prompts):
        offline.add_request(str(i), p, GREEDY)
    final = {}
    while offline.has_unfinished():
        for o in offline.step():
            final[o.request_id] = o
    for i, outs in enumerate(streams):
        last = outs[-1]
        assert last.finished and last.finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        assert last.token_ids == final[str(i)].token_ids
        assert [t for o in outs for t in o.delta_token_ids] == last.token_ids
        assert "".join(o.delta_text for o in outs) == last.text == final[str(i)].text
    assert engine.tokenizer is not None and engine.model_config.architecture == "MixtralForCausalLM"
    wait_idle(engine)
    assert engine.stats().requests_finished_total >= 4


def test_client_disconnect_aborts_and_frees_blocks(engine: AsyncEngine) -> None:
    async def main():
        gen = engine.generate([1, 2, 3, 4, 5], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), "dc")
        got = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()  # what a server does when the client goes away
        return got

    got = asyncio.run(main())
    assert len(got) == 2 and not got[-1].finished
    wait_idle(engine)
    assert engine.stats().requests_aborted_total >= 1


def test_abort_ends_the_stream(engine: AsyncEngine) -> None:
    async def main():
        outs = []
        async for o in engine.generate([1, 7, 8], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True),
                                       "ab"):
            outs.append(o)
            if len(outs) == 3:
                await engine.abort("ab")
        return outs

    outs = asyncio.run(asyncio.wait_for(main(), 30))
    assert outs[-1].finish_reason == "abort" and outs[-1].finished and len(outs[-1].token_ids) < 100
    wait_idle(engine)


def test_bad_request_raises_in_its_stream_only(engine: AsyncEngine) -> None:
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, [1] * 200, "too-long")
        return await collect(engine, [1, 2], "fine")

    outs = asyncio.run(asyncio.wait_for(main(), 30))
    assert outs[-1].finish_reason == "length"


def test_background_load_and_failures(args: EngineArgs, front, tmp_path) -> None:
    eng = front(args, load_in_background=True)
    assert eng.wait_ready(60) and eng.is_ready
    eng.shutdown()
    assert not eng.is_ready
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(eng, [1, 2], "late"))
    broken = front(EngineArgs(str(tmp_path), device="cpu"), load_in_background=True)
    assert not broken.wait_ready(30)
    assert broken.load_error is not None and "config.json" in str(broken.load_error)
    broken.shutdown()


def test_engine_process_death_fails_streams_and_reports(args: EngineArgs) -> None:
    """A killed engine process (e.g. by the OOM killer): in-flight streams end with
    EngineDeadError, `on_exit` is told once, new requests are refused, nothing hangs."""
    exits: list[str] = []
    eng = EngineProcess(args, on_exit=exits.append)

    async def main():
        gen = eng.generate([1, 2, 3], SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True), "victim")
        await gen.__anext__()
        os.kill(eng.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(exits) == 1 and "exit code -9" in exits[0]
        assert not eng.is_ready
        with pytest.raises(EngineDeadError):
            asyncio.run(collect(eng, [1, 2], "after"))
    finally:
        eng.shutdown()
