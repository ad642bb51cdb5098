"""Sampler: each knob against a hand-computed reference on fixed logits."""
from __future__ import annotations

import math

import pytest
import torch

from hubdeploy.serving.sampler import SampleInput, Sampler, apply_penalties, filter_probs, suppress_stop_ids
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.sequence import Sequence

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])


def row(prompt=(), output=(), gen=None, eos=(), **kw) -> SampleInput:
    return SampleInput(SamplingParams(**kw), list(prompt), list(output), gen, tuple(eos))


def test_greedy_is_argmax() -> None:
    tokens, _ = Sampler()(LOGITS.clone(), [row(temperature=0.0)])
    assert tokens == [3]


def test_repetition_penalty_over_prompt_and_output() -> None:
    out = apply_penalties(LOGITS.clone(), [row(prompt=[0], output=[4], repetition_penalty=2.0)])
    expect = LOGITS.clone()
    expect[0, 0] = 2.0 / 2.0  # positive: divided
    expect[0, 4] = -2.0 * 2.0  # negative: multiplied
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_presence_and_frequency_over_output_only() -> None:
    out = apply_penalties(LOGITS.clone(), [row(prompt=[1], output=[3, 3, 2], presence_penalty=0.5,
                                               frequency_penalty=0.25)])
    expect = LOGITS.clone()
    expect[0, 3] -= 2 * 0.25 + 0.5
    expect[0, 2] -= 1 * 0.25 + 0.5
    torch.testing.assert_close(out, expect, rtol=0, atol=0)  # prompt token 1 untouched


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    r = row(output=[1], eos=[3], stop_token_ids=[0], min_tokens=2, max_tokens=5, temperature=0.0)
    out = suppress_stop_ids(LOGITS.clone(), [r])
    assert out[0, 3] == -math.inf and out[0, 0] == -math.inf and out[0, 5] == 1.0
    done = row(output=[1, 2], eos=[3], min_tokens=2, max_tokens=5)
    assert torch.equal(suppress_stop_ids(LOGITS.clone(), [done]), LOGITS)
    tokens, _ = Sampler()(LOGITS.clone(), [r])
    assert tokens == [5]


def test_filters_match_hand_computed_sets() -> None:
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    assert filter_probs(p, top_k=2, top_p=1.0, min_p=0.0).nonzero().flatten().tolist() == [1, 3]
    # sorted: .4 .3 .15 .1 .05; mass before each: 0 .4 .7 .85 .95 -> p=0.7 keeps .4 .3
    assert filter_probs(p, top_k=-1, top_p=0.7, min_p=0.0).nonzero().flatten().tolist() == [1, 3]
    assert filter_probs(p, top_k=-1, top_p=0.71, min_p=0.0).nonzero().flatten().tolist() == [1, 3, 4]
    # min_p 0.3: threshold 0.3 * 0.4 = 0.12
    assert filter_probs(p, top_k=-1, top_p=1.0, min_p=0.3).nonzero().flatten().tolist() == [1, 3, 4]
    # top_p tiny still keeps the best token
    assert filter_probs(p, top_k=-1, top_p=1e-6, min_p=0.0).nonzero().flatten().tolist() == [1]


def test_sampling_distribution_matches_temperature_softmax() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    temp = 0.7
    expect = torch.softmax(logits / temp, 0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    s = Sampler()
    rows = [SampleInput(SamplingParams(temperature=temp), [], [], g) for _ in range(n)]
    tokens, _ = s(logits.expand(n, 4).clone(), rows)
    counts += torch.bincount(torch.tensor(tokens), minlength=4)
    # 4000 draws: binomial std <= 0.008; 4 sigma
    torch.testing.assert_close(counts / n, expect, atol=0.032, rtol=0)


def test_top_k_sampling_never_leaves_the_set() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    rows = [row(temperature=1.0, top_k=3) for _ in range(64)]
    tokens, _ = Sampler()(logits.clone(), rows)
    top3 = torch.topk(logits, 3).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(tokens))


def test_seeded_rows_do_not_depend_on_batch_companions() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))

    def run(batch_rows: list[int], companions_seeded: bool) -> list[int]:
        seqs = {i: Sequence(str(i), [1], SamplingParams(temperature=1.0, seed=1234 + i)) for i in batch_rows}
        out = []
        for _ in range(5):
            rows = [SampleInput(seqs[i].params, [1], [], seqs[i].generator) if i < 4 or companions_seeded
                    else row(temperature=0.9) for i in batch_rows]
            toks, _ = Sampler()(logits[batch_rows].clone(), rows)
            out.append(toks[batch_rows.index(2)])
        return out

    alone = run([2], True)
    assert run([0, 1, 2, 3], True) == alone
    assert run([5, 2, 7, 6], False) == alone
    assert run([2], True) == alone  # same seed, same output


def test_logprobs_are_raw_log_softmax_with_top_alternatives() -> None:
    tokens, lps = Sampler()(LOGITS.clone(), [row(temperature=0.0, logprobs=2, repetition_penalty=1.5,
                                                  prompt=[3])])
    ref = torch.log_softmax(LOGITS[0].double(), 0)
    lp = lps[0]
    assert lp is not None and lp.token_id == tokens[0]
    assert lp.logprob == pytest.approx(float(ref[tokens[0]]), abs=1e-6)
    assert [t for t, _ in lp.top] == [3, 0]
    assert [v for _, v in lp.top] == pytest.approx([float(ref[3]), float(ref[0])], abs=1e-6)
    _, none = Sampler()(LOGITS.clone(), [row(temperature=0.0)])
    assert none == [None]


def test_batched_filters_equal_row_by_row() -> None:
    probs = torch.softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(3)), -1)
    knobs = [(-1, 0.5, 0.0), (5, 1.0, 0.0), (3, 0.8, 0.1), (0, 1.0, 0.2)]
    batched = filter_probs(probs, torch.tensor([k[0] for k in knobs]), torch.tensor([k[1] for k in knobs]),
                           torch.tensor([k[2] for k in knobs]))
    for i, (k, p, m) in enumerate(knobs):
        torch.testing.assert_close(batched[i], filter_probs(probs[i], k, p, m), rtol=0, atol=0)
