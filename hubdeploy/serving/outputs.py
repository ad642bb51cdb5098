"""`RequestOutput`: what the engine hands back for a request after each step.

Cumulative fields (`token_ids`, `text`, `logprobs`) hold everything so far; the `delta_*`
fields hold what is new since the previous output, for streaming. `EngineDeadError` is what
a stream raises instead when the engine cannot run it any more.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from hubdeploy.serving.sequence import TokenLogprob


class EngineDeadError(RuntimeError):
    """The engine stopped (shut down, failed to load or exited); the request cannot run."""


@dataclass
class RequestMetrics:
    """Times (time.monotonic seconds) and counts for latency histograms and usage."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all output tokens so far
    text: str  # all output text so far (stop strings cut)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids when requested
    finish_reason: str | None = None  # None | "stop" | "length" | "abort"
    finished: bool = False
    prompt: str | None = None
    lora_name: str | None = None
    metrics: RequestMetrics | None = None

    @property
    def delta_logprobs(self) -> list[TokenLogprob] | None:
        if self.logprobs is None:
            return None
        return self.logprobs[len(self.logprobs) - len(self.delta_token_ids):]


async def outputs_until_finished(q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
    """A request's outputs from its queue up to the finished one; an exception put there is raised.

    The engine fronts (`AsyncEngine`, `EngineProcess`) feed the queue from their engine side.
    """
    while True:
        item = await q.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return
