"""`Sampler`: logits of the sampling sequences -> next tokens (+ logprobs).

Order, as vLLM defines it: penalties on the raw logits (repetition over prompt + output,
presence and frequency over output tokens only), `min_tokens` suppression of EOS / stop
ids, then greedy argmax or temperature -> min-p -> top-k -> top-p -> random draw.
Each row draws its own exponential noise (Gumbel-max via `probs / Exp(1)`): from the
sequence's generator when the request is seeded, so a seeded request gives the same
tokens whatever else is in the batch. Logprobs are the raw model log-softmax (before
penalties and temperature), as vLLM returns by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.sequence import TokenLogprob


@dataclass
class SampleInput:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    eos_token_ids: tuple[int, ...] = ()


def apply_penalties(logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties, in place."""
    V = logits.shape[-1]
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)), dtype=torch.long)
            seen = seen[seen < V].to(logits.device)
            if seen.numel():
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and r.output_token_ids:
            out = torch.tensor(r.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out[out < V], minlength=V).to(logits.device, logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def suppress_stop_ids(logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
    """Before `min_tokens` outputs exist, EOS and stop token ids may not be drawn."""
    V = logits.shape[-1]
    for i, r in enumerate(rows):
        if len(r.output_token_ids) < r.params.min_tokens:
            ids = [t for t in (*r.eos_token_ids, *r.params.stop_token_ids) if 0 <= t < V]
            if ids:
                logits[i, ids] = float("-inf")
    return logits


def filter_probs(
    probs: torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    min_p: float | torch.Tensor,
) -> torch.Tensor:
    """Zero out tokens outside min-p, then top-k, then top-p; the best token always stays.

    `probs` is [B, V] (or one row [V]); the knobs are scalars or per-row tensors [B]
    (top_k <= 0 or >= V: off). Each row is filtered on its own, so results do not depend
    on the other rows.
    """
    squeeze = probs.dim() == 1
    if squeeze:
        probs = probs[None]
    B, V = probs.shape
    dev = probs.device
    as_col = lambda x, dt: torch.as_tensor(x, dtype=dt, device=dev).reshape(-1, 1).expand(B, 1)  # noqa: E731
    k = as_col(top_k, torch.long)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    p_top = as_col(top_p, probs.dtype)
    p_min = as_col(min_p, probs.dtype)
    probs = torch.where(probs < p_min * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(V, device=dev).expand(B, V)
    sorted_p = sorted_p.masked_fill(rank >= k, 0.0)
    total = sorted_p.sum(dim=-1, keepdim=True)
    cum_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    drop = (cum_before >= p_top * total) & (rank > 0)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return out[0] if squeeze else out


def _all_plain_greedy(rows: list[SampleInput]) -> bool:
    """Every row greedy with nothing that reads or changes logits before the argmax (no
    penalties, no `min_tokens`, no logprobs): then the result is `argmax(logits)` per row,
    the same token the general path picks (argmax of fp32 logits either way)."""
    for r in rows:
        p = r.params
        if (p.temperature != 0.0 or p.logprobs is not None or p.repetition_penalty != 1.0
                or p.presence_penalty or p.frequency_penalty or p.min_tokens):
            return False
    return True


class Sampler:
    def __call__(
        self, logits: torch.Tensor, rows: list[SampleInput]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Pick one token per row of `logits` [B, V] (float32)."""
        if _all_plain_greedy(rows):  # the common decode step: one argmax, no per-row tensors
            return torch.argmax(logits, dim=-1).tolist(), [None] * len(rows)
        logits = logits.float()
        B, V = logits.shape
        dev = logits.device
        want_lp = [r.params.logprobs is not None for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
               or r.params.min_tokens for r in rows):
            logits = suppress_stop_ids(apply_penalties(logits.clone(), rows), rows)
        chosen = torch.argmax(logits, dim=-1)
        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand:
            sub = logits[rand]
            temp = torch.tensor([rows[i].params.temperature for i in rand], dtype=torch.float32, device=dev)
            probs = torch.softmax(sub / temp[:, None], dim=-1)
            probs = filter_probs(
                probs,
                torch.tensor([rows[i].params.top_k for i in rand], device=dev),
                torch.tensor([rows[i].params.top_p for i in rand], dtype=torch.float32, device=dev),
                torch.tensor([rows[i].params.min_p for i in rand], dtype=torch.float32, device=dev),
            )
            # Gumbel-max in exponential form: argmax(p / E), E ~ Exp(1), one draw per row
            noise = torch.empty_like(probs).exponential_()
            for j, i in enumerate(rand):
                g = rows[i].generator
                if g is not None:
                    noise[j] = torch.empty(V, dtype=torch.float32).exponential_(generator=g).to(dev)
            chosen[rand] = torch.argmax(probs / noise, dim=-1)
        tokens = chosen.tolist()
        lps: list[TokenLogprob | None] = [None] * B
        if raw_logprobs is not None:
            kmax = max((r.params.logprobs or 0) for r in rows)
            top_v, top_i = torch.topk(raw_logprobs, kmax, dim=-1) if kmax else (None, None)
            chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
            top_v = top_v.tolist() if top_v is not None else None
            top_i = top_i.tolist() if top_i is not None else None
            for i, r in enumerate(rows):
                if want_lp[i]:
                    k = r.params.logprobs or 0
                    top = list(zip(top_i[i][:k], top_v[i][:k])) if k else []
                    lps[i] = TokenLogprob(tokens[i], chosen_lp[i], top)
        return tokens, lps
