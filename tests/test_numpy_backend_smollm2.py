"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our numpy backend against
transformers' fp32 run of the same file (transformers dequantizes and un-permutes itself)."""

from __future__ import annotations

import numpy as np
import pytest
from models_util import hf_greedy, hf_logits

from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.models import load_model
from inference_service.sampling.params import SamplingParams

pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")

STORY = "Once upon a time, there was a little girl named Lily who"
N_TOKENS = 40


@pytest.mark.slow
def test_greedy_story_identical_to_transformers(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenizer_service.tokenizer import load_tokenizer

    # The prompt ids are only an input here (both models get the same ids); the project's
    # tokenizer is checked against the reference one in its own tests.
    tok = load_tokenizer(smollm2_gguf)
    ids = tok.encode(STORY)
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    expected = hf_greedy(hf, ids, N_TOKENS)
    # Prompt logits for a tolerance check too (one full forward pass).
    ref_logits = hf_logits(hf, ids)[-1]
    del hf

    backend = NumpyBackend(load_model(smollm2_gguf), num_blocks=8, block_size=16)
    table = [3, 0, 6, 1, 7]
    greedy = SamplingParams(temperature=0.0)
    first = backend.logits([BatchItem(0, np.array(ids, np.int32), 0, table)])[0]
    assert np.max(np.abs(first - ref_logits)) / np.max(np.abs(ref_logits)) < 1e-4

    tokens = [int(np.argmax(first))]
    for step in range(1, N_TOKENS):
        pos = len(ids) + step - 1
        item = BatchItem(0, np.array(tokens[-1:], np.int32), pos, table, greedy, step=step)
        tokens.append(backend.step([item])[0].token_id)
    assert tokens == expected, tok.decode(tokens) + " != " + tok.decode(expected)
