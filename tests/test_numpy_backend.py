"""The numpy backend against transformers (fp32) on tiny random Llama-2, Llama-3, Qwen2."""

from __future__ import annotations

import numpy as np
import pytest
from models_util import BUILDERS, VOCAB, hf_greedy, hf_logits

from inference_service.backends import create_backend
from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend, kv_bytes_per_block
from inference_service.models import load_model
from inference_service.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
BLOCK = 4  # small blocks, so sequences cross many block boundaries


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    folder, hf = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    return request.param, load_model(folder), hf


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def scattered_blocks(n: int, seed: int, pool: int) -> list[int]:
    """n distinct, non-contiguous block ids: the paged cache must not assume order."""
    return np.random.default_rng(seed).permutation(pool)[:n].tolist()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def test_config_read_from_hf(tiny):
    name, model, hf = tiny
    c, h = model.config, hf.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (
        h.num_hidden_layers,
        h.num_attention_heads,
        h.num_key_value_heads,
    )
    assert c.rope_theta == h.rope_parameters["rope_theta"]
    assert c.tie_word_embeddings == h.tie_word_embeddings
    assert c.attention_bias == (name == "qwen2")
    assert (c.rope_scaling is not None) == (name == "llama3")
    assert ("lm_head.weight" in model.weights) != c.tie_word_embeddings


def test_prefill_and_16_decode_steps_match_transformers(tiny):
    _, model, hf = tiny
    backend = NumpyBackend(model, num_blocks=64, block_size=BLOCK)
    ids = prompt(1, 21)
    full = ids + prompt(2, 16)
    ref = hf_logits(hf, full)  # logits at every position of one full forward pass
    table = scattered_blocks(-(-len(full) // BLOCK), 3, 64)
    got = backend.logits([BatchItem(0, np.array(ids, np.int32), 0, table)])[0]
    assert rel_err(got, ref[len(ids) - 1]) < 1e-4
    for i in range(16):
        pos = len(ids) + i
        got = backend.logits([BatchItem(0, np.array([full[pos]], np.int32), pos, table)])[0]
        assert rel_err(got, ref[pos]) < 1e-4, f"decode step {i}"


def test_greedy_32_tokens_identical_to_transformers_generate(tiny):
    _, model, hf = tiny
    backend = NumpyBackend(model, num_blocks=32, block_size=BLOCK)
    ids = prompt(4, 9)
    expected = hf_greedy(hf, ids, 32)
    table = scattered_blocks(11, 5, 32)
    tokens: list[int] = []
    chunk, pos = ids, 0
    for step in range(32):
        hist = np.array(ids + tokens, np.int32)
        item = BatchItem(0, np.array(chunk, np.int32), pos, table, GREEDY, hist, step)
        out = backend.step([item])[0]
        pos += len(chunk)
        tokens.append(out.token_id)
        chunk = [out.token_id]
    assert tokens == expected


def test_batched_step_equals_one_by_one(tiny):
    """One step mixing a fresh prefill, a prefill chunk continuation and two decodes of
    different lengths gives the same logits as running each sequence alone."""
    _, model, _ = tiny
    seqs = {0: prompt(10, 13), 1: prompt(11, 5), 2: prompt(12, 30), 3: prompt(13, 22)}
    seqs[4] = prompt(14, 17)
    done = {0: 0, 1: 4, 2: 29, 3: 10, 4: 16}  # tokens already in the cache before the step
    tables = {s: [s * 10 + b for b in range(10)] for s in seqs}

    def run(backend: NumpyBackend, sids: list[int]) -> np.ndarray:
        for s in sids:  # fill the cache up to `done` (one prefill each)
            if done[s]:
                backend.logits([BatchItem(s, np.array(seqs[s][: done[s]]), 0, tables[s])])
        items = [
            BatchItem(s, np.array(seqs[s][done[s] :], np.int32), done[s], tables[s]) for s in sids
        ]
        return backend.logits(items)

    order = [2, 0, 4, 1, 3]  # three decodes (lengths 30, 17, 5) among two prefill chunks
    batched = run(NumpyBackend(model, num_blocks=50, block_size=BLOCK), order)
    for i, s in enumerate(order):
        alone = run(NumpyBackend(model, num_blocks=50, block_size=BLOCK), [s])[0]
        np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_whole_prefill(tiny):
    _, model, hf = tiny
    ids = prompt(20, 23)
    ref = hf_logits(hf, ids)[-1]
    backend = NumpyBackend(model, num_blocks=8, block_size=BLOCK)
    table = [7, 2, 5, 0, 1, 3]
    backend.logits([BatchItem(0, np.array(ids[:10]), 0, table)])
    backend.logits([BatchItem(0, np.array(ids[10:17]), 10, table)])
    got = backend.logits([BatchItem(0, np.array(ids[17:]), 17, table)])[0]
    assert rel_err(got, ref) < 1e-4


def test_step_samples_only_where_asked(tiny):
    _, model, _ = tiny
    backend = NumpyBackend(model, num_blocks=8, block_size=BLOCK)
    a = BatchItem(0, np.array(prompt(1, 5)), 0, [0, 1])
    b = BatchItem(1, np.array(prompt(2, 3)), 0, [2], GREEDY)
    out = backend.step([a, b])
    assert out[0] is None
    logits = NumpyBackend(model, num_blocks=8, block_size=BLOCK).logits([b])[0]
    assert out[1].token_id == int(np.argmax(logits))


def test_bad_batches_raise(tiny):
    _, model, _ = tiny
    backend = NumpyBackend(model, num_blocks=4, block_size=BLOCK)
    with pytest.raises(ValueError, match="block table"):
        backend.logits([BatchItem(0, np.arange(3, 12), 0, [0, 1])])
    with pytest.raises(ValueError, match="token id out of range"):
        backend.logits([BatchItem(0, np.array([VOCAB + 5]), 0, [0])])
    with pytest.raises(ValueError, match="block id out of range"):
        backend.logits([BatchItem(0, np.arange(3, 9), 0, [1, 4])])
    with pytest.raises(ValueError, match="block id out of range"):
        backend.logits([BatchItem(0, np.arange(3, 9), 0, [-1, 2])])


def test_kv_sizing(tiny):
    _, model, _ = tiny
    c = model.config
    backend = NumpyBackend(model, num_blocks=3, block_size=BLOCK)
    pool = sum(a.nbytes for a in backend.kv.k + backend.kv.v)
    assert pool == 3 * kv_bytes_per_block(c, BLOCK)
    per = kv_bytes_per_block(c, 16)
    sized = create_backend(model, "cpu", kv_memory_bytes=10 * per + 5)
    assert (sized.num_blocks, sized.block_size, sized.device_name) == (10, 16, "cpu")
    with pytest.raises(ValueError, match="less than one KV block"):
        create_backend(model, "cpu", kv_memory_bytes=per - 1)
