"""Messages between the engine-core process and its frontend (the gRPC server).

Both ends speak over one `multiprocessing` pipe; every message is one pickled tuple whose first
element names it. One `step` message carries the news of one or more engine steps for every
request at once. The common case (a running request gained tokens, nothing else) travels as
three packed integer arrays instead of one Python object per request; only the rare outputs
(a request's first one, which carries its queue time, the last one, logprobs, errors) are
pickled whole. `bench/ipc_step.py` measures both encodings and the pipe's round trip.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np

from inference_service.engine.engine import RequestOutput, StepStats
from inference_service.models.config import ModelConfig

# frontend -> core
ADD = "add"  # (ADD, request_id, prompt_ids, SamplingParams)
ABORT = "abort"  # (ABORT, request_id)
STOP_IDS = "stop_ids"  # (STOP_IDS, tuple of ids)
SAMPLE_VOCAB = "sample_vocab"  # (SAMPLE_VOCAB, n)
STOP = "stop"  # (STOP,)
# core -> frontend
READY = "ready"  # (READY, CoreInfo)
FATAL = "fatal"  # (FATAL, message): the core could not start
STEP = "step"  # (STEP, rids, counts, tokens, rich outputs, StepStats list, heartbeat)


@dataclass(frozen=True)
class CoreInfo:
    """What the frontend needs to know about the engine the core built."""

    model_config: ModelConfig
    device_name: str
    block_size: int
    num_blocks: int
    max_model_len: int
    capacity_tokens: int
    max_batch_size: int
    max_waiting: int
    sample_vocab: int
    source: str  # the resolved model path
    dtype: str
    pid: int


@dataclass
class StepBatch:
    """Outputs (and stats) of the engine steps since the last message."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stats: list[StepStats] = field(default_factory=list)
    heartbeat: float = 0.0  # the engine thread's last time round its loop (time.monotonic)


def dumps(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> tuple:
    return pickle.loads(data)


class StepEncoder:
    """Core side: packs step batches. Keeps which requests already sent their first output,
    so later outputs drop the queue time (sent once) and travel packed."""

    def __init__(self) -> None:
        self._announced: set[int] = set()

    def encode(self, batch: StepBatch) -> bytes:
        rids: list[int] = []
        counts: list[int] = []
        tokens: list[int] = []
        rich: list[RequestOutput] = []
        rich_ids: set[int] = set()  # later outputs of these go rich too: order per request
        for out in batch.outputs:
            rid = out.request_id
            if out.finished:
                self._announced.discard(rid)
            elif rid in self._announced:
                out.queue_time_s = None
            elif out.queue_time_s is not None:
                self._announced.add(rid)
            plain = (
                out.finish_reason is None
                and not out.new_logprobs
                and out.error is None
                and out.queue_time_s is None
                and rid not in rich_ids
            )
            if plain:
                rids.append(rid)
                counts.append(len(out.new_token_ids))
                tokens.extend(out.new_token_ids)
            else:
                rich.append(out)
                rich_ids.add(rid)
        return dumps(
            (
                STEP,
                np.asarray(rids, np.int64).tobytes(),
                np.asarray(counts, np.int32).tobytes(),
                np.asarray(tokens, np.int64).tobytes(),
                rich,
                batch.stats,
                batch.heartbeat,
            )
        )


def decode_step(message: tuple) -> StepBatch:
    _, rids_b, counts_b, tokens_b, rich, stats, heartbeat = message
    rids = np.frombuffer(rids_b, np.int64).tolist()
    counts = np.frombuffer(counts_b, np.int32)
    tokens = np.frombuffer(tokens_b, np.int64).tolist()
    # Packed outputs first: a request's packed outputs never follow its rich ones (encode).
    if len(tokens) == len(rids):  # one token each: the steady decode case
        outputs = [RequestOutput(r, [t]) for r, t in zip(rids, tokens, strict=True)]
    else:
        outputs, pos = [], 0
        for r, n in zip(rids, counts.tolist(), strict=True):
            outputs.append(RequestOutput(r, tokens[pos : pos + n]))
            pos += n
    outputs.extend(rich)
    return StepBatch(outputs, stats, heartbeat)
