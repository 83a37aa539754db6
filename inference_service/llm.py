"""Generate in-process, without the servers: `LLM(model).generate(prompt, params)`.

A thin wrapper over the serving `Engine` (the same scheduler, continuous batching, paged KV
cache and finish rules): one prompt streams `GenerationChunk`s; a list of prompts runs batched
and returns one `Completion` each. Text in and out goes through the model's own tokenizer.
Used by `kuiper generate --local`, tests and benchmarks.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_service.backends.base import Backend
from inference_service.build import build_engine
from inference_service.config import EngineConfig
from inference_service.engine.admission import QueueFullError
from inference_service.engine.engine import RequestOutput
from inference_service.engine.stop_strings import StopStringMatcher
from inference_service.engine_core.build import widest_batch_engine
from inference_service.sampling.params import SamplingParams

Prompt = str | Sequence[int]


@dataclass
class GenerationChunk:
    """One generated token, the text it completed, and at the end why generation stopped."""

    token_id: int
    text: str  # text delta (special tokens skipped; held back while it may start a stop string)
    finish_reason: str | None = None  # None while streaming; then "length", "stop" or "eos"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """A whole generation of one prompt (what `generate` returns per prompt of a list)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "length", "stop" or "eos"
    chunks: list[GenerationChunk]  # per token: its text delta and logprobs

    @classmethod
    def of(cls, chunks: list[GenerationChunk]) -> Completion:
        return cls(
            [c.token_id for c in chunks],
            "".join(c.text for c in chunks),
            chunks[-1].finish_reason or "length",
            chunks,
        )


class LLM:
    """A loaded model + tokenizer + a running Engine over the chosen backend."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "cpu",
        max_context: int | None = None,
        block_size: int = 16,
        config: EngineConfig | None = None,
    ) -> None:
        """max_context bounds prompt + generated tokens (default: the model's context). The
        KV pool defaults to one full context (config.num_kv_blocks / kv_memory_mb give more,
        for batches of long generations). Without `config` the batch is as wide as the
        server's default: the backend's widest (256 CUDA, 32 CPU), at most the KV blocks."""
        base = config or EngineConfig()
        self.config = dataclasses.replace(
            base,
            model=str(model) if model is not None else base.model,
            device=device,
            block_size=block_size,
            max_model_len=max_context or base.max_model_len,
        )
        built = build_engine(self.config, one_context_kv=True)
        self.model = built.model  # config and source; the backend holds the weights
        self.engine = built.engine if config is not None else widest_batch_engine(built.engine)
        self.config = self.engine.config
        self.max_context = self.engine.max_model_len
        self.tokenizer = _load_tokenizer_or_none(built.path)
        eos = set(self.model.config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.stop_ids)
        self.eos_ids = frozenset(eos)
        self._streams: dict[int, queue.SimpleQueue[RequestOutput]] = {}
        self._lock = threading.Lock()
        self.engine.add_output_listener(self._dispatch)
        self.engine.start()
        # Stop the engine thread before the interpreter (and the CUDA backend's own atexit
        # hook, registered earlier) tears down: it releases its device context itself.
        atexit.register(self.engine.stop)

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    @property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids (the model's and the tokenizer's), for generations started
        from now on."""
        return self.engine.stop_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self.engine.set_stop_ids(ids)

    def close(self) -> None:
        """Stop the engine thread (generations still running end as cancelled)."""
        atexit.unregister(self.engine.stop)
        self.engine.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ text in, text out

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
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
        prompt: Prompt | Sequence[Prompt],
        params: SamplingParams,
        add_special_tokens: bool = True,
    ) -> Any:
        """One prompt (text or token ids): an iterator of chunks, one per generated token,
        streamed as the engine produces them. A list of prompts (texts or token-id lists):
        all run batched by the engine; returns one Completion per prompt, in order."""
        if _is_batch(prompt):
            ids = [self._prompt_ids(p, params, add_special_tokens) for p in prompt]
            streams = [self._start(p, params) for p in ids]
            return [Completion.of(list(s)) for s in streams]
        return self._start(self._prompt_ids(prompt, params, add_special_tokens), params)

    # ------------------------------------------------------------------ requests

    def _prompt_ids(
        self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool
    ) -> list[int]:
        """The prompt's ids, refusing what the engine could not run (ValueError)."""
        vocab = self.model.config.vocab_size
        params.validate(vocab)
        ids = self.encode(prompt, add_special_tokens)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_context}"
            )
        return ids

    def _start(self, ids: list[int], params: SamplingParams) -> _Stream:
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        while True:
            # Held while submitting, so the engine thread cannot report on the request before
            # its queue is registered.
            with self._lock:
                try:
                    request_id = self.engine.submit(ids, params)
                except QueueFullError:
                    request_id = None
                else:
                    self._streams[request_id] = outputs
            if request_id is not None:
                break
            time.sleep(0.01)  # the engine admits waiting requests every step
        decoder = (
            self.tokenizer.incremental_decoder(ids, skip_special_tokens=True)
            if self.tokenizer is not None
            else None
        )
        return _Stream(self, request_id, outputs, decoder, StopStringMatcher(params.stop))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: hand each request's news to its stream."""
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._streams.pop(request_id, None)


class _Stream:
    """Chunks of one request, read from the engine's outputs; closing it early (or dropping
    it) aborts the request, so its KV blocks go back to the pool."""

    def __init__(self, llm: LLM, request_id: int, outputs, decoder, stops) -> None:
        self._llm = llm
        self._id = request_id
        self._outputs = outputs
        self._decoder = decoder
        self._stops = stops
        self._chunks = self._read()

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> GenerationChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._end()

    def __del__(self) -> None:
        self._end()

    def _end(self) -> None:
        if self._id is not None:
            self._llm.engine.abort(self._id)  # a no-op once the request has ended
            self._llm._forget(self._id)
            self._id = None

    def _read(self) -> Iterator[GenerationChunk]:
        try:
            while True:
                out = self._outputs.get()
                if out.error:
                    raise RuntimeError(out.error)
                n = len(out.new_token_ids)
                for i, token in enumerate(out.new_token_ids):
                    reason = out.finish_reason if out.finished and i == n - 1 else None
                    chunk = self._chunk(token, reason.value if reason else None)
                    if i < len(out.new_logprobs):
                        chunk.logprob = out.new_logprobs[i].logprob
                        chunk.top_logprobs = out.new_logprobs[i].top_logprobs
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                if out.finished:  # cancelled (the engine stopped) without a new token
                    raise RuntimeError(f"the generation ended early: {out.finish_reason.value}")
        finally:
            self._end()

    def _chunk(self, token: int, finish: str | None) -> GenerationChunk:
        """The token's text delta; a stop string in the text ends the generation."""
        decoder, stops = self._decoder, self._stops
        text = decoder.push([token]) if decoder is not None else ""
        text, hit = stops.feed(text)
        if hit:
            finish = "stop"
        elif finish is not None:
            tail = decoder.flush() if decoder is not None else ""
            more, hit = stops.feed(tail)
            text += more if hit else more + stops.flush()
            finish = "stop" if hit else finish
        return GenerationChunk(token, text, finish)


def _is_batch(prompt: Any) -> bool:
    """A list of prompts (texts or id lists), as opposed to one prompt (a text or ids)."""
    if isinstance(prompt, str) or len(prompt) == 0:
        return False
    return isinstance(prompt[0], str) or hasattr(prompt[0], "__len__")


def _load_tokenizer_or_none(path: Path) -> Any:
    """The model's tokenizer, or None for a weights-only folder (then prompts are token ids)."""
    from tokenizer_service.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError):
        return None
