"""Sampler: filtering sets against transformers' logits warpers, distributions, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inference_service.sampling.params import SamplingParams
from inference_service.sampling.sampler import keep_mask, sample, sample_batch, uniform_for

VOCAB = 50
EMPTY = np.zeros(0, np.int32)


def rand_logits(seed: int, vocab: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * 2.0).astype(np.float32)


def hf_kept(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The token set HF's warpers leave finite (temperature, top-k, top-p, min-p)."""
    scores = torch.tensor(logits)[None, :]
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return torch.isfinite(scores[0]).numpy()


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=5),
        dict(top_p=0.5),
        dict(top_p=0.9, temperature=0.7),
        dict(min_p=0.1),
        dict(top_k=10, top_p=0.8, min_p=0.05, temperature=1.3),
    ],
)
def test_kept_set_matches_transformers_warpers(kw):
    p = SamplingParams(**kw)
    for seed in range(20):
        logits = rand_logits(seed)
        ours = keep_mask(logits / np.float32(p.temperature), p)
        np.testing.assert_array_equal(ours, hf_kept(logits, p))


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2)])
def test_draws_never_leave_the_kept_set(kw):
    p = SamplingParams(**kw)
    logits = rand_logits(7)
    allowed = set(np.flatnonzero(hf_kept(logits, p)).tolist())
    seen = {sample(logits, SamplingParams(**kw, seed=s), EMPTY, 0).token_id for s in range(400)}
    assert seen <= allowed
    assert len(seen) == len(allowed)  # and every kept token does get drawn


def test_temperature_zero_is_argmax():
    for seed in range(30):
        logits = rand_logits(seed)
        out = sample(logits, SamplingParams(temperature=0.0, top_k=3, seed=seed), EMPTY, seed)
        assert out.token_id == int(np.argmax(logits))


def test_distribution_matches_softmax():
    """Frequencies of 8000 draws at temperature 0.8 follow softmax(logits / 0.8)."""
    logits = rand_logits(3, vocab=8)
    expected = torch.softmax(torch.tensor(logits) / 0.8, dim=-1).numpy()
    n = 8000
    counts = np.bincount(
        [sample(logits, SamplingParams(temperature=0.8), EMPTY, 0).token_id for _ in range(n)],
        minlength=8,
    )
    # Each frequency within 5 standard errors of its probability.
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) < 5 * se + 1e-4)


def test_top_k_distribution_is_renormalized():
    logits = rand_logits(11, vocab=10)
    k = 3
    top = np.argsort(-logits)[:k]
    expected = np.zeros(10)
    expected[top] = torch.softmax(torch.tensor(logits[top]), dim=-1).numpy()
    n = 6000
    draws = [sample(logits, SamplingParams(top_k=k, seed=s), EMPTY, 0).token_id for s in range(n)]
    freq = np.bincount(draws, minlength=10) / n
    assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 1e-4)


def test_seed_reproduces_and_depends_only_on_seed_and_step():
    logits = rand_logits(5)
    p = SamplingParams(seed=1234)
    a = [sample(logits, p, EMPTY, step).token_id for step in range(50)]
    b = [sample(logits, p, EMPTY, step).token_id for step in range(50)]
    assert a == b
    assert len(set(a)) > 5  # steps get different draws
    other = [sample(logits, SamplingParams(seed=99), EMPTY, s).token_id for s in range(50)]
    assert other != a
    # Batched with other requests (and in a different order): the same tokens.
    rows = np.stack([rand_logits(9), logits, rand_logits(10)])
    for step in range(10):
        outs = sample_batch(
            rows,
            [SamplingParams(seed=1), p, SamplingParams()],
            [EMPTY, EMPTY, EMPTY],
            [0, step, 3],
        )
        assert outs[1].token_id == a[step]
    assert uniform_for(2**64 - 1, 2**40) == uniform_for(2**64 - 1, 2**40)


def test_repetition_penalty_matches_transformers():
    logits = rand_logits(21)
    history = np.array([3, 3, 7, 12, 40, 0], dtype=np.int32)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(
        torch.tensor(history[None, :].astype(np.int64)), torch.tensor(logits)[None, :]
    )[0].numpy()
    p = SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=0)
    out = sample(logits, p, history, 0)
    assert out.token_id == int(np.argmax(hf))
    expected_lp = torch.log_softmax(torch.tensor(hf), -1).numpy()
    assert out.logprob == pytest.approx(float(expected_lp[out.token_id]), abs=1e-5)
    # Penalizing the argmax token hard moves greedy elsewhere.
    top = int(np.argmax(logits))
    moved = sample(logits, SamplingParams(temperature=0, repetition_penalty=100.0),
                   np.array([top]), 0)  # fmt: skip
    assert moved.token_id != top


def test_logprobs_and_top_n():
    logits = rand_logits(8)
    p = SamplingParams(temperature=0.7, top_k=4, seed=5, logprobs=5)
    out = sample(logits, p, EMPTY, 0)
    ref = torch.log_softmax(torch.tensor(logits), -1).numpy()  # untempered, unfiltered
    assert out.logprob == pytest.approx(float(ref[out.token_id]), abs=1e-5)
    order = np.argsort(-ref)[:5]
    assert [t for t, _ in out.top_logprobs] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in out.top_logprobs], ref[order], atol=1e-5)
    assert sample(logits, SamplingParams(), EMPTY, 0).logprob is None


def test_top_n_logprobs_ties_keep_the_lowest_ids():
    """n cuts through a group of equal logits: the lowest ids of the group are listed, most
    likely first (the order a stable sort by -logprob gives)."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(5000).astype(np.float32) - 10.0
    logits[[4000, 17]] = 5.0  # the top two, tied: 17 first
    tied = np.array([3999, 12, 4500, 250, 77])
    logits[tied] = 2.0  # a five-way tie for places 3..7
    out = sample(logits, SamplingParams(temperature=0.0, logprobs=4), EMPTY, 0)
    ref = torch.log_softmax(torch.tensor(logits), -1).numpy()
    stable = np.argsort(-ref, kind="stable")[:4]
    assert [t for t, _ in out.top_logprobs] == stable.tolist() == [17, 4000, 12, 77]
    assert len(sample(logits[:3], SamplingParams(logprobs=20), EMPTY, 0).top_logprobs) == 3
