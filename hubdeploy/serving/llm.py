"""`LLM`: the offline API — a batch of prompts in, finished outputs out."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence as Seq

from hubdeploy.serving.engine import EngineArgs, LLMEngine
from hubdeploy.serving.outputs import RequestOutput
from hubdeploy.serving.sampling_params import SamplingParams


@dataclass
class Output:
    """One finished generation."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[Any] | None = None
    prompt: str | None = None


class LLM:
    """`LLM(model, revision=None, device="auto", dtype="auto", lora_modules=None, **engine_options)`.

    `engine_options` are `EngineArgs` fields (max_model_len, max_num_seqs, kv_cache_tokens, ...).
    """

    def __init__(self, model: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                 lora_modules: dict[str, str] | None = None, **engine_options: Any) -> None:
        fields = EngineArgs.__dataclass_fields__
        unknown = sorted(set(engine_options) - set(fields))
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {', '.join(sorted(fields))}")
        self.engine = LLMEngine(EngineArgs(model=model, revision=revision, device=device, dtype=dtype,
                                           lora_modules=lora_modules, **engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):  # noqa: ANN201 - serving.tokenizer.Tokenizer
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str] | Seq[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora: str | None | Seq[str | None] = None,
        use_tqdm: bool | None = None,
    ) -> list[Output]:
        """Generate for every prompt (text or token ids); outputs in prompt order.

        `use_tqdm`: a rich progress bar; None shows it for 32+ prompts on a terminal.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params or SamplingParams()] * n
        loras = list(lora) if isinstance(lora, (list, tuple)) else [lora] * n
        if len(params) != n or len(loras) != n:
            raise ValueError(f"{n} prompts but {len(params)} sampling params and {len(loras)} lora names; "
                             "give one each or a single value for all")
        ids = [f"llm-{next(self._ids)}" for _ in range(n)]
        done: dict[str, RequestOutput] = {}
        progress = None
        if use_tqdm is None:
            import sys

            use_tqdm = n >= 32 and sys.stderr.isatty()
        if use_tqdm:
            from rich.progress import Progress

            progress = Progress(transient=True)
            task = progress.add_task("generating", total=n)
            progress.start()
        try:
            for rid, p, sp, lo in zip(ids, prompts, params, loras):
                self.engine.add_request(rid, p, sp, lora_name=lo)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if progress is not None:
                            progress.advance(task)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            if progress is not None:
                progress.stop()
        return [Output(o.prompt_token_ids, o.token_ids, o.text, o.finish_reason, o.logprobs, o.prompt)
                for o in (done[r] for r in ids)]
