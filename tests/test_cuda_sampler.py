"""The host side of the device sampler (backends/cuda/sampler.py) without a GPU: the packed
parameter layout sample_rows reads, the uniforms (identical to sampler.uniform_for), and the
unpacking of its results."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.backends.cuda import sampler as cs
from inference_service.sampling.params import SampleOutput, SamplingParams
from inference_service.sampling.sampler import uniform_for


def test_pack_rows_layout():
    vocab = 1000
    params = [
        SamplingParams(
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            min_p=0.05,
            seed=3,
            repetition_penalty=1.3,
            logprobs=5,
        ),  # fmt: skip
        SamplingParams(temperature=0.0, repetition_penalty=1.2),  # greedy: u unused
        SamplingParams(temperature=1.0, top_k=vocab, seed=4),  # k >= vocab: off
        SamplingParams(temperature=1.0, top_k=5000, seed=5, logprobs=0),
    ]
    hists = [
        np.array([5, -1, 5, 999, 1000, 12, 3000]),
        np.array([7, 7, 8], np.int32),
        np.array([1, 2, 3]),  # penalty off: not sent
        np.zeros(0, np.int64),
    ]
    steps = [11, 0, 2, 9]
    buf = cs.pack_rows([3, 0, 2, 1], params, hists, steps, vocab)
    assert buf.dtype == np.int32
    n, W = len(params), cs.PARAM_WORDS
    head = buf[: n * W].reshape(n, W)
    tail = buf[n * W :]
    assert head[:, cs.SP_ROW].tolist() == [3, 0, 2, 1]
    assert head[:, cs.SP_NLOGPROBS].tolist() == [5, -1, -1, 0]
    assert head[:, cs.SP_TOPK].tolist() == [40, 0, 0, 0]
    assert head[:, cs.SP_HIST_LEN].tolist() == [4, 3, 0, 0]  # out-of-range ids dropped
    offs = head[:, cs.SP_HIST_OFF]
    assert tail[offs[0] : offs[0] + 4].tolist() == [5, 5, 999, 12]  # duplicates kept
    assert tail[offs[1] : offs[1] + 3].tolist() == [7, 7, 8]
    assert len(tail) == 7
    f = head.view(np.float32)
    assert f[0, cs.SP_TEMP] == np.float32(0.7) and f[0, cs.SP_TOPP] == np.float32(0.9)
    assert f[0, cs.SP_MINP] == np.float32(0.05) and f[0, cs.SP_PENALTY] == np.float32(1.3)
    u = np.ascontiguousarray(head[:, cs.SP_U : cs.SP_U + 2]).view(np.float64)[:, 0]
    assert u[0] == uniform_for(3, 11) and u[1] == 0.0 and u[2] == uniform_for(4, 2)
    assert u[3] == uniform_for(5, 9)
    given = cs.pack_rows([0], params[:1], hists[:1], [0], vocab, uniforms=[0.25])
    assert np.ascontiguousarray(given[cs.SP_U : cs.SP_U + 2]).view(np.float64)[0] == 0.25


def test_pack_rows_needs_matching_lengths():
    with pytest.raises(ValueError):
        cs.pack_rows([0], [SamplingParams()], [], [0], 10)


def test_unpack_rows():
    out = np.zeros((3, cs.OUT_WORDS), np.int32)
    f = out.view(np.float32)
    out[:, 0] = [17, 4, 9]
    f[1, 1], out[1, 2] = -1.5, 2
    out[1, 4:6] = [4, 8]
    f[1, 4 + cs.MAX_TOP : 6 + cs.MAX_TOP] = [-1.5, -2.25]
    f[2, 1] = -0.5
    params = [SamplingParams(), SamplingParams(logprobs=2), SamplingParams(logprobs=0)]
    assert cs.unpack_rows(out, params) == [
        SampleOutput(17),
        SampleOutput(4, -1.5, [(4, -1.5), (8, -2.25)]),
        SampleOutput(9, -0.5, []),
    ]


def test_supported():
    assert cs.supported(SamplingParams(top_p=0.5, logprobs=20), 151936)
    assert not cs.supported(SamplingParams(), cs.MAX_VOCAB)
    assert not cs.supported(SamplingParams(temperature=1e39), 1000)  # not a float32


def reference_rows(logits_rows, params, hists, steps, vocab, uniforms) -> np.ndarray:
    """The layout row by row with struct (as sampling.cu reads it): 6 int32 (row, n logprobs,
    top-k, history offset, history length, pad), 4 float32 (temperature, top-p, min-p,
    penalty), u as float64; then the history ids of the penalized rows, in range only."""
    import struct

    row = struct.Struct("<6i4fd")
    assert row.size == 4 * cs.PARAM_WORDS
    head, tail = b"", []
    for r, (p, h) in enumerate(zip(params, hists, strict=True)):
        kept = [int(t) for t in h if 0 <= t < vocab] if p.repetition_penalty != 1.0 else []
        u = 0.0 if p.greedy else uniforms[r]
        head += row.pack(logits_rows[r], -1 if p.logprobs is None else min(p.logprobs, vocab),
                         p.top_k if 0 < p.top_k < vocab else 0, len(tail), len(kept), 0,
                         p.temperature, p.top_p, p.min_p, p.repetition_penalty, u)  # fmt: skip
        tail += kept
    return np.concatenate([np.frombuffer(head, np.int32), np.asarray(tail, np.int32)])


@pytest.mark.parametrize("seed", range(30))
def test_pack_rows_equals_the_row_by_row_reference(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.choice([50, 49152, 128256]))
    n = int(rng.integers(1, 40))
    params, hists = [], []
    for _ in range(n):
        params.append(SamplingParams(
            temperature=float(rng.choice([0.0, 0.3, 1.0, 1.7])),
            top_k=int(rng.choice([0, 1, 40, vocab, vocab + 5])),
            top_p=float(rng.choice([1.0, 0.9, 0.123456789])),
            min_p=float(rng.choice([0.0, 0.05])),
            repetition_penalty=float(rng.choice([1.0, 1.0, 1.1, 0.7])),
            seed=int(rng.integers(0, 2**63)) if rng.random() < 0.8 else None,
            logprobs=[None, 0, 5, 20][int(rng.integers(0, 4))],
        ))  # fmt: skip
        hists.append(rng.integers(-3, vocab + 3, int(rng.integers(0, 30))))
    rows = rng.permutation(n).tolist()
    steps = rng.integers(0, 1000, n).tolist()
    uniforms = rng.random(n).tolist()
    got = cs.pack_rows(rows, params, hists, steps, vocab, uniforms=uniforms)
    np.testing.assert_array_equal(got, reference_rows(rows, params, hists, steps, vocab, uniforms))
    # Drawn here: the same u as uniform_for for seeded non-greedy rows.
    drawn = cs.pack_rows(rows, params, hists, steps, vocab)
    u = drawn[: n * cs.PARAM_WORDS].reshape(n, -1).view(np.float64)[:, cs.SP_U // 2]
    for r, p in enumerate(params):
        if p.greedy:
            assert u[r] == 0.0
        elif p.seed is not None:
            assert u[r] == uniform_for(p.seed, steps[r])


def test_vectorized_uniforms_equal_uniform_for():
    rng = np.random.default_rng(1)
    seeds = [0, 1, 2**32 - 1, 2**63 + 5, 2**64 - 1, -1, -(2**63)]
    seeds += rng.integers(0, 2**63, 199).tolist()
    steps = [0, 1, 7, 2**31, 2**64 - 1, 3] + rng.integers(0, 2**40, 200).tolist()
    want = [uniform_for(s, t) for s, t in zip(seeds, steps, strict=True)]
    assert cs.philox_uniforms(seeds, steps).tolist() == want  # all rows at once
    assert cs.uniforms_for(seeds, steps).tolist() == want
    assert cs.uniforms_for(seeds[:5], steps[:5]).tolist() == want[:5]  # row by row
