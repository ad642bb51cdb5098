"""The caps a parsed completion request must fit before any engine work starts, so that no
single request can take an endpoint down: sequences (prompts x n), tokens asked (prompt plus
generated, over all sequences) and log-prob entries the answer would carry.

No web framework here: `hubdeploy serve` reads the defaults for its flags.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """What one completion request may ask for (`hubdeploy serve --max-request-*` flags).

    `max_sequences`: prompts × n. `max_tokens`: prompt plus generated tokens summed over
    all sequences (never below one full-context sequence). `max_logprob_entries`: generated
    tokens × (1 + top log-probs) summed over sequences, the strings the answer would carry.
    `max_concurrent_per_key`: requests in flight at once per key (429 above).
    """

    max_body_bytes: int = 8 * MIB
    max_sequences: int = 64
    max_tokens: int = 131_072
    max_logprob_entries: int = 262_144
    max_concurrent_per_key: int = 256  # generation requests in flight per key (or client address if public)


def check_sequences(limits: RequestLimits, prompts: int, n: int, prompt_param: str) -> None:
    """`LimitExceeded` when prompts x n is over the cap (checked before any prompt is tokenized)."""
    sequences = prompts * n
    if sequences > limits.max_sequences:
        raise LimitExceeded(f"this request asks for {sequences} sequences ({prompts} prompt(s) x n={n}); "
                            f"at most {limits.max_sequences} per request are allowed: send fewer prompts or a "
                            "lower 'n', or split the request", "n" if n > 1 else prompt_param)


def cap_tokens(limits: RequestLimits, prompt_lens: list[int], n: int, max_tokens: int, explicit: bool,
               num_logprobs: int | None, max_model_len: int | None, *, prompt_param: str, max_param: str,
               logprobs_param: str) -> int:
    """The `max_tokens` each sequence may run with under `limits`; `LimitExceeded` otherwise.

    An explicit `max_tokens` over the token cap is refused; the default (the rest of the
    context) is lowered to fit instead, since the client did not ask for that length.
    """
    sequences = len(prompt_lens) * n
    cap = max(limits.max_tokens, max_model_len or 0)
    prompt_total = n * sum(prompt_lens)
    if prompt_total + sequences > cap:
        raise LimitExceeded(f"the prompts of this request total {prompt_total} tokens (counting each of the n={n} "
                            f"choices); at most {cap} tokens per request are allowed: send fewer or shorter "
                            "prompts, or a lower 'n'", prompt_param)
    if prompt_total + sequences * max_tokens > cap:
        room = (cap - prompt_total) // sequences
        if explicit:
            raise LimitExceeded(f"'{max_param}' is {max_tokens} for {sequences} sequence(s), which with the prompts "
                                f"asks for {prompt_total + sequences * max_tokens} tokens; at most {cap} tokens per "
                                f"request are allowed, so '{max_param}' can be at most {room} here (or lower 'n')",
                                max_param)
        max_tokens = room
    if num_logprobs is not None:
        entries = sequences * max_tokens * (1 + num_logprobs)
        if entries > limits.max_logprob_entries:
            most = limits.max_logprob_entries // (sequences * (1 + num_logprobs))
            raise LimitExceeded(f"this request asks for log-probs of up to {sequences * max_tokens} tokens with "
                                f"{num_logprobs} alternatives each ({entries} entries); at most "
                                f"{limits.max_logprob_entries} per request are allowed: lower '{max_param}' "
                                f"(at most {most} here), 'n' or '{logprobs_param}'", logprobs_param)
    return max_tokens


class LimitExceeded(ValueError):
    """A request over one of `RequestLimits`; `param` names the field to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param
