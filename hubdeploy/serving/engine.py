"""`LLMEngine`: the step loop that ties scheduler, model runner, sampler and detokenizer.

`add_request` queues a sequence; each `step()` schedules a batch, runs the model once,
samples, hands the tokens to `Scheduler.postprocess` (which owns the step's bookkeeping and
stop conditions), applies stop strings and returns the incremental outputs of every request
that produced something (or finished) in that step. Not thread-safe: `AsyncEngine` drives
it from a single thread.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hubdeploy.serving.block_manager import BlockManager
from hubdeploy.serving.config import EngineArgs, ModelConfig
from hubdeploy.serving.hub import resolve_model_dir
from hubdeploy.serving.loader import load_model
from hubdeploy.serving.model_runner import ModelRunner
from hubdeploy.serving.outputs import RequestMetrics, RequestOutput
from hubdeploy.serving.sampler import SampleInput, Sampler
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.scheduler import Scheduler
from hubdeploy.serving.sequence import Sequence
from hubdeploy.serving.stats import EngineStats
from hubdeploy.serving.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

if TYPE_CHECKING:  # serving.lora loads only for an engine that serves adapters
    from hubdeploy.serving.lora.manager import LoRAManager

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(device)


class LLMEngine:
    def __init__(self, args: EngineArgs, *, model: torch.nn.Module | None = None,
                 model_config: ModelConfig | None = None, tokenizer: Tokenizer | None = None) -> None:
        """Load `args.model`; or serve an already built `model` on `args.device` with its
        `model_config` and `tokenizer` (benchmarks with random weights; no checkpoint read)."""
        torch.manual_seed(args.seed)
        self.device = resolve_device(args.device)
        if model is None:
            self.model_dir: Path | None = resolve_model_dir(args.model, args.revision, args.token)
            # the engine's "auto" is the loader's None: float32 off CUDA (exact against transformers)
            model, cfg = load_model(self.model_dir, self.device, None if args.dtype == "auto" else args.dtype)
            self.dtype = model.dtype
            tokenizer = load_tokenizer(self.model_dir)
        elif model_config is None or tokenizer is None:
            raise ValueError("LLMEngine(args, model=...) also needs model_config= and tokenizer=")
        else:
            self.model_dir, cfg = None, model_config
            self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.model_config: ModelConfig = cfg
        self.tokenizer: Tokenizer = tokenizer
        eos = tuple(dict.fromkeys([*self.tokenizer.eos_token_ids, *cfg.eos_token_id]))
        max_len = args.max_model_len or min(cfg.max_position_embeddings, 4096)
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}; lower max_model_len")
        self.max_model_len = max_len
        self.args = args = replace(args, max_model_len=max_len)  # resolved, as the runner reads it
        # adapters and their device slots come before the KV cache takes the free memory
        self.lora_manager: LoRAManager | None = None
        if args.max_loras > 0:
            from hubdeploy.serving.lora import create_lora_manager

            self.lora_manager = create_lora_manager(args, model, self.device, self.dtype)
        self.runner = ModelRunner(model, cfg, args, self.device, self.dtype, self.lora_manager)
        capacity = self.runner.num_blocks * args.block_size
        if capacity < max_len:
            raise ValueError(f"the KV cache holds {capacity} tokens, less than max_model_len={max_len}: one "
                             "request could never fit. Raise kv_cache_tokens / gpu_memory_utilization or "
                             "lower max_model_len")
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens, max_len,
                                   eos, self.lora_manager)
        self.sampler = Sampler()
        self.seqs: dict[str, Sequence] = {}
        # True for a front end that reads only the delta fields of unfinished outputs (e.g. the
        # engine process, which streams deltas): their `token_ids` / `logprobs` then hold just
        # this step's part and `metrics` is None, so a step costs O(1) per request instead of
        # copying every output so far. Finished outputs are always whole.
        self.delta_outputs_only = False
        self._stats = EngineStats(num_kv_blocks=self.runner.num_blocks, block_size=args.block_size)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokens that end a request: the scheduler's stop check, the sampler's min_tokens mask."""
        return self.scheduler.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: tuple[int, ...]) -> None:
        self.scheduler.eos_token_ids = ids

    # --- requests --------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora_name: str | None = None) -> None:
        """Queue a request; raises ValueError for a duplicate id or a prompt that cannot fit."""
        params = params or SamplingParams()
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in flight; use a unique id")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                             "(prompt plus at least one new token); shorten the prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if lora_name is not None and self.lora_manager is None:
            raise ValueError(f"LoRA adapter {lora_name!r} is not loaded: this engine serves no adapters "
                             "(start it with lora_modules)")
        seq = Sequence(request_id, ids, params, lora_name=lora_name, prompt=text)
        if self.lora_manager is not None:
            self.lora_manager.add_user(seq)  # ValueError for an adapter that is not loaded
        seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._stats.requests_aborted_total += 1
        return self._output(seq, [], "")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step --------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self.runner.run(batch)
        stats = self._stats
        stats.steps_total += 1
        sampling: list[Sequence] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            stats.prompt_tokens_total += max(0, min(start + item.num_tokens, len(seq.prompt_token_ids)) - start)
            if item.samples:
                sampling.append(seq)
        eos = self.eos_token_ids
        rows = [SampleInput(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, eos) for s in sampling]
        tokens, lps = self.sampler(logits, rows) if rows else ([], [])
        self.scheduler.postprocess(batch, tokens, lps)
        outputs: list[RequestOutput] = []
        for seq, tok in zip(sampling, tokens):
            stats.generation_tokens_total += 1
            # an EOS / stop token is not text; a stop string (also in the final flush) ends it as "stop"
            delta, hit = seq.detok.add(None if seq.finish_reason == "stop" else tok, finished=seq.is_finished)
            if hit:
                self.scheduler.finish(seq, "stop")
            if seq.is_finished:
                self.seqs.pop(seq.request_id, None)
                stats.requests_finished_total += 1
            outputs.append(self._output(seq, [tok], delta))
        return outputs

    def _output(self, seq: Sequence, delta_ids: list[int], delta_text: str) -> RequestOutput:
        if self.delta_outputs_only and not seq.is_finished:
            lps = seq.logprobs
            return RequestOutput(
                request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids, token_ids=list(delta_ids),
                text="", delta_text=delta_text, delta_token_ids=delta_ids,
                logprobs=None if lps is None else lps[len(lps) - len(delta_ids):],
                prompt=seq.prompt, lora_name=seq.lora_name,
            )
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=seq.detok.text if seq.detok is not None else "",
            delta_text=delta_text,
            delta_token_ids=delta_ids,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            finished=seq.is_finished,
            prompt=seq.prompt,
            lora_name=seq.lora_name,
            metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finished_time,
                                   seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_preemptions),
        )

    # --- introspection ---------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.num_preempted = self.scheduler.num_preempted_waiting
        s.kv_cache_usage = self.block_manager.usage
        s.prefix_cache_queries = self.block_manager.prefix_queries
        s.prefix_cache_hits = self.block_manager.prefix_hits
        s.preemptions_total = self.scheduler.num_preemptions
        if self.lora_manager is not None:
            lo = self.lora_manager.snapshot()
            s.lora_swaps_total, s.lora_resident, s.lora_registered = lo.swaps_total, lo.resident, lo.registered
        return EngineStats(**{k: getattr(s, k) for k in s.__dataclass_fields__})
