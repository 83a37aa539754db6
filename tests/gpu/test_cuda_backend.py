"""The CUDA backend against the numpy backend (the fp32 reference, itself checked against
transformers) on tiny random Llama-2 / Llama-3 / Qwen2 models, and on the real SmolLM2 GGUF.

Tolerance: the CUDA backend stores weights and activations in bf16 (fp32 accumulation, fp32
residual stream), so logits differ from fp32 by bf16 rounding: max |cuda - numpy| / max |numpy|
< 3e-2. Paths that run the same kernels on the same data (graph replay vs eager, batched vs
alone) must agree to float rounding of a different split of the attention sum (1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
from models_util import BUILDERS, VOCAB

from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.models import load_model
from inference_service.sampling.params import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0)
BLOCK = 4
TOL_BF16_MODEL = 3e-2


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    folder, _ = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    return request.param, load_model(folder)


def cuda_backend(model, num_blocks=64, **kw):
    from inference_service.backends.cuda.backend import CudaBackend

    return CudaBackend(model, num_blocks=num_blocks, block_size=BLOCK, **kw)


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def generate(backend, ids: list[int], n: int, table: list[int], params=GREEDY) -> list[int]:
    """Prefill then n-1 decode steps through step() (the serving path: graphs on CUDA)."""
    out: list[int] = []
    hist = list(ids)
    item = BatchItem(0, np.array(ids, np.int32), 0, table, params, np.array(hist), 0)
    for step in range(n):
        tok = backend.step([item])[0].token_id
        out.append(tok)
        hist.append(tok)
        item = BatchItem(0, np.array([tok], np.int32), len(hist) - 1, table, params,
                         np.array(hist), step + 1)  # fmt: skip
    return out


def test_prefill_and_decode_logits_match_numpy(tiny):
    _, model = tiny
    ids = prompt(1, 21)
    table = [9, 3, 14, 0, 7, 1, 2, 11]
    ref_b, got_b = NumpyBackend(model, 16, BLOCK), cuda_backend(model, 16)
    # Prefill of 21 tokens runs the GEMM path, then decode steps the GEMV path.
    ref = ref_b.logits([BatchItem(0, np.array(ids[:-5]), 0, table)])
    got = got_b.logits([BatchItem(0, np.array(ids[:-5]), 0, table)])
    assert rel_err(got, ref) < TOL_BF16_MODEL
    for i in range(len(ids) - 5, len(ids)):
        item = BatchItem(0, np.array([ids[i]]), i, table)
        ref, got = ref_b.logits([item]), got_b.logits([item])
        assert rel_err(got, ref) < TOL_BF16_MODEL, i


def test_greedy_tokens_match_numpy(tiny):
    _, model = tiny
    ids = prompt(2, 9)
    table = list(range(12))
    ref = generate(NumpyBackend(model, 16, BLOCK), ids, 24, table)
    got = generate(cuda_backend(model, 16), ids, 24, table)
    assert got == ref


def test_graph_replay_equals_eager(tiny):
    _, model = tiny
    b = cuda_backend(model)
    seqs = [prompt(s, n) for s, n in ((3, 5), (4, 17), (5, 33))]
    tables = [[s * 12 + j for j in range(12)] for s in range(3)]
    for s, ids in enumerate(seqs):
        b.logits([BatchItem(s, np.array(ids[:-1]), 0, tables[s])])
    batch = [
        BatchItem(s, np.array(ids[-1:]), len(ids) - 1, tables[s]) for s, ids in enumerate(seqs)
    ]
    graph = b.decode_logits_graph(batch)  # 3 rows padded to the 4-bucket
    again = b.decode_logits_graph(batch)  # replay rewrites the same KV slots
    eager = b.logits(batch)
    assert b.use_pdl, "graph capture fell back from programmatic dependent launch"
    np.testing.assert_array_equal(graph, again)
    np.testing.assert_allclose(graph, eager, rtol=1e-4, atol=1e-4 * np.abs(eager).max())
    assert (graph.argmax(1) == eager.argmax(1)).all()


@pytest.mark.parametrize("unroll", [None, 1, 2, 4, 8, 0])
def test_decode_attention_kernels_in_the_backend(tiny, unroll):
    """The decode attention kernels through the backend (decode_unroll: None = U picked per
    launch, the default; U = paged_decode_d*_u{U}; 0 = the tiled kernel): decode logits of three rows (1 to 3 splits for small U) against numpy,
    and graph replay against eager."""
    _, model = tiny
    lens = (150, 70, 9)
    tables = [list(range(0, 40)), list(range(40, 60)), list(range(60, 64))]
    seqs = [prompt(50 + s, n) for s, n in enumerate(lens)]
    ref_b, b = NumpyBackend(model, 128, BLOCK), cuda_backend(model, 128)
    b.decode_unroll = unroll
    for s, ids in enumerate(seqs):
        for backend in (ref_b, b):
            backend.logits([BatchItem(s, np.array(ids[:-1]), 0, tables[s])])
    batch = [
        BatchItem(s, np.array(ids[-1:]), len(ids) - 1, tables[s]) for s, ids in enumerate(seqs)
    ]
    ref = ref_b.logits(batch)
    eager = b.logits(batch)
    graph = b.decode_logits_graph(batch)
    assert rel_err(eager, ref) < TOL_BF16_MODEL
    np.testing.assert_allclose(graph, eager, rtol=1e-4, atol=1e-4 * np.abs(eager).max())


def test_graph_without_pdl_equals_graph_with_pdl(tiny):
    _, model = tiny
    outs = []
    for pdl in (True, False):
        b = cuda_backend(model, use_pdl=pdl)
        ids = prompt(30, 11)
        b.logits([BatchItem(0, np.array(ids[:-1]), 0, list(range(4)))])
        outs.append(b.decode_logits_graph([BatchItem(0, np.array(ids[-1:]), 10, list(range(4)))]))
        assert b.use_pdl == pdl  # the PDL capture worked (a failure falls back to plain graphs)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_batched_equals_one_by_one(tiny):
    """A step mixing a fresh prefill, a prefill continuation and two decodes gives what each
    sequence gives alone (GEMM path for the batch, GEMV / graphs alone)."""
    _, model = tiny
    seqs = {0: prompt(10, 13), 1: prompt(11, 5), 2: prompt(12, 30), 3: prompt(13, 22)}
    done = {0: 0, 1: 4, 2: 29, 3: 10}
    tables = {s: [s * 10 + b for b in range(10)] for s in seqs}

    def run(backend, sids):
        for s in sids:
            if done[s]:
                backend.logits([BatchItem(s, np.array(seqs[s][: done[s]]), 0, tables[s])])
        items = [BatchItem(s, np.array(seqs[s][done[s] :]), done[s], tables[s]) for s in sids]
        return backend.logits(items)

    batched = run(cuda_backend(model, 40), [0, 1, 2, 3])
    for i, s in enumerate([0, 1, 2, 3]):
        alone = run(cuda_backend(model, 40), [s])[0]
        assert rel_err(batched[i], alone) < 1e-2  # bf16 activations: GEMM vs GEMV rounding
        assert batched[i].argmax() == alone.argmax()


def test_batched_decode_graph_equals_single(tiny):
    _, model = tiny
    b = cuda_backend(model)
    prompts = [prompt(20 + s, 4 + 3 * s) for s in range(5)]
    tables = [[s * 12 + j for j in range(12)] for s in range(5)]
    singles = [generate(cuda_backend(model), p, 6, t) for p, t in zip(prompts, tables, strict=True)]
    # all five decode together (bucket 8) after their prefills
    hist = [list(p) for p in prompts]
    items = [BatchItem(s, np.array(p), 0, tables[s], GREEDY) for s, p in enumerate(prompts)]
    outs = [[] for _ in prompts]
    for _ in range(6):
        res = b.step(items)
        for s, r in enumerate(res):
            outs[s].append(r.token_id)
            hist[s].append(r.token_id)
        items = [BatchItem(s, np.array([h[-1]]), len(h) - 1, tables[s], GREEDY)
                 for s, h in enumerate(hist)]  # fmt: skip
    assert outs == singles


def test_host_sampling_rows_are_seeded_and_valid(tiny):
    _, model = tiny
    p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1234, logprobs=2,
                       repetition_penalty=1.2)  # fmt: skip
    a = generate(cuda_backend(model), prompt(7, 6), 8, list(range(8)), p)
    b = generate(cuda_backend(model), prompt(7, 6), 8, list(range(8)), p)
    assert a == b and all(0 <= t < VOCAB for t in a)


def test_bad_batches_raise(tiny):
    _, model = tiny
    b = cuda_backend(model, 8)
    with pytest.raises(ValueError, match="token id out of range"):
        b.logits([BatchItem(0, np.array([VOCAB]), 0, [0])])
    with pytest.raises(ValueError, match="cannot hold"):
        b.logits([BatchItem(0, np.array(prompt(1, 9)), 0, [0, 1])])
    with pytest.raises(ValueError, match="block id out of range"):
        b.logits([BatchItem(0, np.array([5]), 0, [8])])


def test_real_smollm2_gguf_greedy_24_tokens_match_numpy(smollm2_gguf):
    """Along the numpy engine's 24 greedy tokens (teacher-forced), the CUDA backend's argmax
    (decode graphs, the serving path) is the same token, except where numpy's own top two
    logits are closer than bf16 noise (1% of the largest logit): there either token is a
    correct greedy choice for a bf16 engine. Seen on an H100: this prompt has one such tie at
    step 10 (26.19 vs 26.14), which the graph with one attention split and the eager path
    resolve differently."""
    from inference_service.backends.cuda.backend import CudaBackend

    model = load_model(smollm2_gguf)
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018]
    table = list(range(4))
    ref_b = NumpyBackend(model, 8, 16)
    got_b = CudaBackend(model, num_blocks=8, block_size=16)
    ref = ref_b.logits([BatchItem(0, np.array(ids), 0, table)])[0]
    got = got_b.logits([BatchItem(0, np.array(ids), 0, table)])[0]
    ties = 0
    for step in range(24):
        want = int(ref.argmax())
        have = int(got.argmax())
        if have != want:
            gap = float(ref[want] - ref[have])
            assert gap < 0.01 * np.abs(ref).max(), (step, want, have, gap)
            ties += 1
        pos = len(ids) + step
        item = BatchItem(0, np.array([want], np.int32), pos, table)
        ref = ref_b.logits([item])[0]
        got = got_b.decode_logits_graph([item])[0]
        assert rel_err(got, ref) < TOL_BF16_MODEL, step
    assert ties <= 2


def test_backend_runs_in_an_engine_thread():
    """Built in the main thread, stepped and closed in another (the engine thread's life)."""
    import threading

    folder, _ = BUILDERS["qwen2"](__import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    model = load_model(folder)
    b = cuda_backend(model)
    ids = prompt(40, 7)
    want = generate(NumpyBackend(model, 16, BLOCK), ids, 4, list(range(4)))
    got: list = []

    def engine() -> None:
        got.append(generate(b, ids, 4, list(range(4))))
        b.close()

    th = threading.Thread(target=engine)
    th.start()
    th.join(timeout=120)
    assert got == [want]
    # the main thread still drives a backend afterwards
    assert generate(cuda_backend(model), ids, 4, list(range(4))) == want


def test_sample_vocab_limits_the_lm_head(tiny):
    """sample_vocab (the server sets it to the tokenizer's vocabulary): the lm_head computes only
    those rows, the rest of the logits is -inf, greedy (graph and eager) and the samplers pick
    below it, and raising it again restores the full logits."""
    _, model = tiny
    b = cuda_backend(model, 16)
    ids = prompt(7, 12)
    table = list(range(8))
    full = b.logits([BatchItem(0, np.array(ids), 0, table)])[0]
    n = max(1, int(full.argmax()))  # the limit falls just below the favourite token
    b.sample_vocab = n
    limited = b.logits([BatchItem(0, np.array(ids), 0, table)])[0]
    assert np.isneginf(limited[n:]).all()
    np.testing.assert_array_equal(limited[:n], full[:n])
    params = [GREEDY, SamplingParams(temperature=1.3, top_p=0.95, seed=1)]
    for p in params:  # prefill (eager) then a decode step (graph)
        first = b.step([BatchItem(0, np.array(ids), 0, table, p, np.array(ids), 0)])[0].token_id
        nxt = b.step([BatchItem(0, np.array([first]), len(ids), table, p, np.array(ids), 1)])
        assert first < n and nxt[0].token_id < n
        if p.greedy:
            assert first == int(limited[:n].argmax())
    b.sample_vocab = model.config.vocab_size
    again = b.logits([BatchItem(0, np.array(ids), 0, table)])[0]
    np.testing.assert_array_equal(again, full)
