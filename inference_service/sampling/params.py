"""Sampling parameters of one request: the engine's own copy of the proto's SamplingParams."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_MAX_NEW_TOKENS = 256
# Floors: logits are divided by the temperature and by the repetition penalty, so values near
# zero overflow float32 to inf and sampling turns to NaN. Below them: refused.
MIN_TEMPERATURE = 1e-5  # other than 0 (greedy)
MIN_REPETITION_PENALTY = 1e-2
# Stop conditions are matched on every step of the request, on the server's event loop (stop
# strings) and in the engine (ids): their number and size bound that per-step work.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = fresh randomness
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = none; n = chosen token + top-n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError with a message a caller can act on."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, "
                f"got {self.temperature:g}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be at least {MIN_REPETITION_PENALTY:g} (1 = off), "
                f"got {self.repetition_penalty:g}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        check_stop_counts(len(self.stop), len(self.stop_token_ids))
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"stop_token_ids {bad} are outside the vocabulary (0..{vocab_size - 1})"
                )


def check_stop_counts(num_stop: int, num_stop_token_ids: int) -> None:
    """Raise ValueError when there are more stop strings or stop ids than allowed (a caller
    can check the counts of a parsed request before it converts the lists themselves)."""
    if num_stop > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {num_stop}")
    if num_stop_token_ids > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {num_stop_token_ids}")


@dataclass(frozen=True)
class SampleOutput:
    """What sampling one step of one sequence produced."""

    token_id: int
    logprob: float | None = None  # log-probability of token_id, if requested
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely first
