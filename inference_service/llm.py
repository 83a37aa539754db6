"""Generate in-process, without the servers: `LLM(model).generate(prompt, params)`.

One sequence at a time over the chosen backend (the serving engine does the batching). Used by
`kuiper generate --local`, tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.backends import create_backend
from inference_service.backends.base import Backend, BatchItem
from inference_service.models.loader import LoadedModel, load_model
from inference_service.sampling.params import SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the attention scores' memory


@dataclass
class GenerationChunk:
    """One generated token, the text it completed, and at the end why generation stopped."""

    token_id: int
    text: str  # text delta (special tokens skipped; held back while it may start a stop string)
    finish_reason: str | None = None  # None while streaming; then "length", "stop" or "eos"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class LLM:
    """A loaded model + tokenizer + backend, generating one sequence at a time."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        max_context: int | None = None,
        block_size: int = 16,
    ) -> None:
        from kuiper_serve.common.model_source import resolve_model

        path = resolve_model(model)
        self.model: LoadedModel = load_model(path)
        self.tokenizer = _load_tokenizer_or_none(path)
        cfg = self.model.config
        self.max_context = min(
            max_context or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        num_blocks = -(-self.max_context // block_size)
        self.backend: Backend = create_backend(
            self.model, device, num_blocks=num_blocks, block_size=block_size
        )
        # The backend holds its own (fused, fp32 or device) copy of the weights; drop ours
        # so the process does not keep two.
        self.model = dataclasses.replace(self.model, weights={})
        self._table = list(range(num_blocks))
        self._busy = False
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.stop_ids)
        self.eos_ids = frozenset(eos)

    # ------------------------------------------------------------------ text in, text out

    def encode(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model.source} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return [int(t) for t in prompt]

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of chat messages rendered with the model's template, ready to answer."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model.source} has no tokenizer, so no chat template")
        # As the tokenizer service: special-token text inside contents stays plain text.
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)[1]

    def chat(
        self, messages: Sequence[Mapping[str, Any]], params: SamplingParams
    ) -> Iterator[GenerationChunk]:
        return self.generate(self.chat_prompt(messages), params)

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        return [c.token_id for c in self.generate(list(prompt_ids), params)]

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        add_special_tokens: bool = True,
    ) -> Iterator[GenerationChunk]:
        """Stream the continuation of prompt (text or token ids), one chunk per token."""
        cfg = self.model.config
        params.validate(cfg.vocab_size)
        ids = self.encode(prompt, add_special_tokens)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})"
            )
        if len(ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_context}"
            )
        if self._busy:
            raise RuntimeError(
                "this LLM is still streaming another generation (one at a time: finish it or "
                "call .close() on its iterator)"
            )
        return self._guarded(ids, params)

    def _guarded(self, ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        # The single sequence's KV blocks are reused, so generations must not interleave.
        self._busy = True
        try:
            yield from self._generate(ids, params)
        finally:
            self._busy = False

    # ------------------------------------------------------------------ the loop

    def _generate(self, ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        from inference_service.engine.stop_strings import StopStringMatcher

        decoder = (
            self.tokenizer.incremental_decoder(ids, skip_special_tokens=True)
            if self.tokenizer is not None
            else None
        )
        stops = StopStringMatcher(params.stop)
        # Generation ends at the context length, so a huge max_new_tokens needs no more room.
        history = np.zeros(min(len(ids) + params.max_new_tokens, self.max_context + 1), np.int32)
        history[: len(ids)] = ids
        n_hist = len(ids)
        # Prefill all but the last chunk without sampling.
        pos = 0
        while len(ids) - pos > PREFILL_CHUNK:
            chunk = np.asarray(ids[pos : pos + PREFILL_CHUNK], dtype=np.int32)
            self.backend.step([BatchItem(0, chunk, pos, self._table)])
            pos += PREFILL_CHUNK
        chunk = np.asarray(ids[pos:], dtype=np.int32)
        for step in range(params.max_new_tokens):
            item = BatchItem(0, chunk, pos, self._table, params, history[:n_hist], step)
            out = self.backend.step([item])[0]
            assert out is not None
            pos += len(chunk)
            token = out.token_id
            history[n_hist] = token
            n_hist += 1
            finish = None
            if token in self.eos_ids and not params.ignore_eos:
                finish = "eos"
            elif token in params.stop_token_ids:
                finish = "stop"
            text = decoder.push([token]) if decoder is not None else ""
            text, hit = stops.feed(text)
            if hit:
                finish = "stop"
            elif finish is None and (step + 1 == params.max_new_tokens or pos >= self.max_context):
                finish = "length"
            if finish is not None and not hit:
                tail = decoder.flush() if decoder is not None else ""
                more, hit = stops.feed(tail)
                text += more if hit else more + stops.flush()
                finish = "stop" if hit else finish
            yield GenerationChunk(token, text, finish, out.logprob, out.top_logprobs)
            if finish is not None:
                return
            chunk = np.array([token], dtype=np.int32)


def _load_tokenizer_or_none(path: Path) -> Any:
    """The model's tokenizer, or None for a weights-only folder (then prompts are token ids)."""
    from tokenizer_service.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError):
        return None
