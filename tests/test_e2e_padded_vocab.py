"""A model whose embedding table is padded past its tokenizer's vocabulary (as Qwen2.5's
151936 rows for 151665 tokens): ids past the tokenizer have no text, so the served stack never
samples them. Before the limit, a random model of this kind generated such ids and the
tokenizer service refused to decode them, failing the request."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from kuiper_client import KuiperClient, KuiperError
from serving_stack import build_tiny_model, run_stack

from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.models import load_model
from inference_service.sampling.params import SamplingParams
from tokenizer_service.tokenizer import load_tokenizer

PADDED_VOCAB = 4096  # the test tokenizer has a few hundred ids


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    pytest.importorskip("torch")
    return build_tiny_model(tmp_path_factory.mktemp("padded") / "model", vocab_size=PADDED_VOCAB)


def test_numpy_backend_samples_below_sample_vocab(padded_model):
    model = load_model(padded_model)
    backend = NumpyBackend(model, 16, 16)
    ids = np.arange(3, 40, dtype=np.int32)
    item = BatchItem(0, ids, 0, [0, 1, 2, 3])
    full = backend.logits([item])[0]
    assert full.argmax() >= 300  # the random model prefers a padded id ...
    backend.sample_vocab = 300
    limited = backend.logits([item])[0]
    assert np.isneginf(limited[300:]).all()
    np.testing.assert_array_equal(limited[:300], full[:300])
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=3)):
        token = backend.step([BatchItem(0, ids, 0, [0, 1, 2, 3], params)])[0].token_id
        assert token < 300  # ... which is never sampled
        if params.greedy:
            assert token == int(full[:300].argmax())


def test_served_stack_never_generates_ids_past_the_tokenizer(padded_model):
    tok_vocab = load_tokenizer(padded_model).vocab_size
    assert tok_vocab < PADDED_VOCAB
    with (
        run_stack(padded_model, "--num-kv-blocks", "64") as stack,
        KuiperClient(stack.address, timeout=60) as client,
    ):
        for params in (dict(temperature=0.0), dict(temperature=1.0, seed=5)):
            chunks = list(client.generate("Once upon a time", max_new_tokens=24,
                                          ignore_eos=True, **params))  # fmt: skip
            ids = [t for c in chunks for t in c.token_ids]
            assert len(ids) == 24 and max(ids) < tok_vocab, ids
        # a prompt id the tokenizer cannot decode is refused up front ...
        with pytest.raises(KuiperError) as err:
            list(client.generate([5, tok_vocab + 7], max_new_tokens=4))
        assert (
            err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            and "outside the vocabulary" in str(err.value)
        )
        # ... and the shared detokenizer stream still serves the next request
        assert len(client.complete([5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
