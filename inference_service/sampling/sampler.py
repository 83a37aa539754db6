"""Turn one row of logits into the next token: penalties, temperature, top-k/top-p/min-p, draw.

Order of operations (as HF transformers' logits processors / warpers apply them):
  1. repetition penalty over the ids in `history` (HF semantics: a positive logit is divided
     by the penalty, a negative one multiplied),
  2. logprobs are taken here: log-softmax of the penalized logits, before temperature and
     before any top-k/top-p/min-p filtering (so they describe the model, not the sampler),
  3. temperature == 0: argmax (greedy; ties → lowest id); otherwise divide by temperature,
  4. top-k (keep logits >= the k-th largest), top-p (smallest most-likely-first set whose
     probability reaches top_p), min-p (keep p >= min_p * p_max),
  5. draw one token from the renormalized kept set with a single uniform u in [0, 1):
     the first token id (ascending id order) whose cumulative kept probability exceeds
     u * total.

Seeds: with params.seed set, u comes from Philox keyed by (seed, step) alone, so the same
request gives the same tokens however it is batched or scheduled. Without a seed, fresh OS
entropy is used on every call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference_service.sampling.params import SampleOutput, SamplingParams

_U64 = (1 << 64) - 1


def uniform_for(seed: int | None, step: int) -> float:
    """The one uniform draw in [0, 1) used to sample step `step` of a request."""
    if seed is None:
        return float(np.random.default_rng().random())
    key = np.array([seed & _U64, step & _U64], dtype=np.uint64)
    return float(np.random.Generator(np.random.Philox(key=key)).random())


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float) -> np.ndarray:
    """A penalized copy of logits (or logits itself when the penalty is off)."""
    if penalty == 1.0 or history.size == 0:
        return logits
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = np.unique(history[(history >= 0) & (history < out.shape[-1])])
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = np.max(x)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted)))


def keep_mask(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """bool [vocab]: the tokens top-k, top-p and min-p leave eligible (logits already scaled
    by temperature). Always keeps at least the most likely token."""
    vocab = logits.shape[-1]
    keep = np.ones(vocab, dtype=bool)
    if 0 < params.top_k < vocab:
        kth = np.partition(logits, vocab - params.top_k)[vocab - params.top_k]
        keep &= logits >= kth
    if params.top_p < 1.0 or params.min_p > 0.0:
        masked = np.where(keep, logits, -np.inf)
        probs = np.exp(masked - np.max(masked))
        probs /= probs.sum()
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            before = np.cumsum(sorted_p) - sorted_p  # probability of strictly more likely tokens
            keep_sorted = before < params.top_p
            keep_sorted[0] = True
            top_p_keep = np.zeros(vocab, dtype=bool)
            top_p_keep[order[keep_sorted]] = True
            keep &= top_p_keep
        if params.min_p > 0.0:
            keep &= probs >= params.min_p * probs.max()
    return keep


def sample(
    logits: np.ndarray, params: SamplingParams, history: np.ndarray, step: int
) -> SampleOutput:
    """Choose the next token from float logits [vocab]; see the module docstring."""
    logits = np.asarray(logits, dtype=np.float32)
    penalized = apply_repetition_penalty(logits, np.asarray(history), params.repetition_penalty)
    if params.greedy:
        token = int(np.argmax(penalized))
    else:
        scaled = penalized / np.float32(params.temperature)
        keep = keep_mask(scaled, params)
        probs = np.where(keep, np.exp(scaled - np.max(scaled[keep])), 0.0).astype(np.float64)
        cdf = np.cumsum(probs)
        u = uniform_for(params.seed, step)
        token = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        token = min(token, logits.shape[-1] - 1)
        while not keep[token]:  # guards float edge cases at the top of the cdf
            token -= 1
    if params.logprobs is None:
        return SampleOutput(token_id=token)
    lp = log_softmax(penalized)
    top: list[tuple[int, float]] = []
    if params.logprobs > 0:
        n = min(params.logprobs, lp.size)
        # the n-th largest value; every id above it, then the lowest ids tied with it
        kth = np.partition(lp, lp.size - n)[lp.size - n]
        above = np.flatnonzero(lp > kth)
        idx = np.concatenate([above, np.flatnonzero(lp == kth)[: n - above.size]])
        idx = idx[np.lexsort((idx, -lp[idx]))]  # most likely first, ties by id
        top = [(int(i), float(lp[i])) for i in idx]
    return SampleOutput(token_id=token, logprob=float(lp[token]), top_logprobs=top)


def sample_batch(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    histories: Sequence[np.ndarray],
    steps: Sequence[int],
) -> list[SampleOutput]:
    """sample() for each row of logits [batch, vocab]."""
    return [
        sample(row, p, h, s) for row, p, h, s in zip(logits, params, histories, steps, strict=True)
    ]
