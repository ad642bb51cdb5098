"""A naive baseline server for the peer comparison: `transformers` `generate`, batch 1,
behind the same OpenAI routes (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`) so `hubdeploy bench` measures it exactly as it measures our engine and vLLM.

Requests are served one at a time (an asyncio lock): this is what "just call generate in
a web handler" gives, the floor a serving engine must beat. Streaming emits one SSE chunk
per generated token (a custom streamer, not `TextIteratorStreamer`, which buffers words).

    python benchmarks/transformers_server.py MODEL_DIR --port 8002 [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages, installed or not
from hubdeploy.serving.server.protocol import ChatCompletionRequest, CompletionRequest


class _QueueStreamer(BaseStreamer):
    """Pushes each new token's text (incrementally decoded) onto an asyncio queue."""

    def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.tok, self.loop, self.queue = tokenizer, loop, queue
        self.ids: list[int] = []
        self.text = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete UTF-8 character: wait for the next token
        delta, self.text = text[len(self.text):], text
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("token", delta, len(self.ids)))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ("end", "", len(self.ids)))


def build_app(model_dir: str, dtype: str, name: str) -> FastAPI:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    lock = asyncio.Lock()
    app = FastAPI()

    def gen_kwargs(body: Any, max_tokens: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": tok.eos_token_id}
        if body.ignore_eos:
            kw["min_new_tokens"] = max_tokens
        t = 1.0 if body.temperature is None else body.temperature
        if t > 0:
            kw.update(do_sample=True, temperature=t, top_p=body.top_p or 1.0)
        else:
            kw["do_sample"] = False
        return kw

    async def run(ids: list[int], kw: dict[str, Any]) -> AsyncIterator[tuple[str, str, int]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = _QueueStreamer(tok, loop, queue)
        async with lock:  # batch 1
            thread = threading.Thread(target=lambda: model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), streamer=streamer, **kw))
            thread.start()  # generate() runs under no_grad itself
            while True:
                item = await queue.get()
                yield item
                if item[0] == "end":
                    break
            await asyncio.to_thread(thread.join)

    async def respond(kind: str, body: Any, ids: list[int]) -> Any:
        max_tokens = body.requested_max_tokens() or 16
        kw = gen_kwargs(body, max_tokens)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if kind == "chat":
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def stream() -> AsyncIterator[str]:
            n = 0
            async for ev, text, n in run(ids, kw):
                if ev == "token" and text:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                                 "choices": [choice(text, None)]}) + "\n\n"
            finish = "length" if n >= max_tokens else "stop"
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name,
                                         "choices": [choice("", finish)]}) + "\n\n"
            if body.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                                       "total_tokens": len(ids) + n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        if body.stream:
            return StreamingResponse(stream(), media_type="text/event-stream")

        text, n = "", 0
        async for ev, delta, n in run(ids, kw):
            text += delta
        finish = "length" if n >= max_tokens else "stop"
        c = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
             if kind == "chat" else {"index": 0, "text": text, "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": created, "model": name, "choices": [c],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                       "total_tokens": len(ids) + n}})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "transformers"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        prompts = body.prompt_list()
        if len(prompts) != 1 or body.n != 1:
            return JSONResponse({"error": {"message": "this baseline serves one prompt and n=1 per request",
                                           "type": "invalid_request_error", "param": "prompt", "code": None}}, 400)
        p = prompts[0]
        ids = tok(p)["input_ids"] if isinstance(p, str) else list(p)
        return await respond("completion", body, ids)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        ids = tok.apply_chat_template(body.template_messages(), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return await respond("chat", body, list(ids))

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--served-model-name", default=None)
    args = ap.parse_args()
    app = build_app(args.model_dir, args.dtype, args.served_model_name or args.model_dir)
    print("phase: ready", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
