"""A stand-in backend for engine tests: its "KV cache" stores token ids, and its "model" picks
the next token from the tokens it reads back through the block table.

So a wrong block table, a block shared when it should not be, or a prefix reused from the
wrong sequence changes the output, and `oracle_next` (computed from the true token list, with
no paging at all) catches it.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future

import numpy as np

from inference_service.backends.base import BatchItem, StepWorker
from inference_service.models.config import ModelConfig
from inference_service.sampling.params import SampleOutput


def oracle_next(tokens: list[int], vocab_size: int) -> int:
    digest = hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


def oracle_generate(
    prompt: list[int], max_new_tokens: int, vocab_size: int, stop_ids=(), max_len=10**9
) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens and len(tokens) < max_len:
        t = oracle_next(tokens, vocab_size)
        out.append(t)
        tokens.append(t)
        if t in stop_ids:
            break
    return out


def fake_config(
    vocab_size: int = 64, context: int = 4096, eos: tuple[int, ...] = ()
) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        eos_token_ids=eos,
    )


class FakeBackend:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int = 64,
        context: int = 4096,
        eos: tuple[int, ...] = (),
        step_delay_s: float = 0.0,
    ):
        self.config = fake_config(vocab_size, context, eos)
        self.sample_vocab = vocab_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = context
        self.device_name = "fake"
        self.kv = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self.step_delay_s = step_delay_s
        self.batch_sizes: list[int] = []
        self.fail_next = False
        self.closed = False
        self._event = threading.Event()
        self._worker: StepWorker | None = None
        self.in_step = False

    def _run(self, item: BatchItem) -> list[int]:
        bs = self.block_size
        end = item.start_pos + len(item.token_ids)
        assert len(item.block_table) * bs >= end, "block table too short for the chunk"
        for i, tok in enumerate(item.token_ids):
            pos = item.start_pos + i
            self.kv[item.block_table[pos // bs], pos % bs] = int(tok)
        return [int(self.kv[item.block_table[p // bs], p % bs]) for p in range(end)]

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        if self.step_delay_s:
            self._event.wait(self.step_delay_s)
        self.batch_sizes.append(len(batch))
        outs: list[SampleOutput | None] = []
        for item in batch:
            tokens = self._run(item)
            if item.sampling is None:
                outs.append(None)
            else:
                outs.append(SampleOutput(oracle_next(tokens, self.config.vocab_size)))
        return outs

    def step_async(self, batch: list[BatchItem]) -> Future[list[SampleOutput | None]]:
        """step() in a worker thread (engines with overlap_steps); in_step says when it runs."""
        if self._worker is None:
            self._worker = StepWorker("fake-step")
        return self._worker.submit(self._step_in_worker, batch)

    def _step_in_worker(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        self.in_step = True
        try:
            return self.step(batch)
        finally:
            self.in_step = False

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self.closed = True
