"""The CUDA backend's host packing of a step, without a GPU: pack_inputs (runner.py) against a
per-token reference written here from the layout's definition (shapes.InputLayout), for random
mixed prefill/decode batches, graph padding and block tables cut at the width bucket."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.backends.base import BatchItem
from inference_service.backends.cuda.backend import step_rows
from inference_service.backends.cuda.runner import (
    eager_input_layout,
    graph_input_layout,
    pack_inputs,
)
from inference_service.backends.cuda.shapes import InputLayout, prefill_tiles
from inference_service.sampling.params import SamplingParams

BS = 16
SCRATCH = 999
SENTINEL = -7


def reference_pack(batch, rows, layout: InputLayout, pad_to: int, tiles) -> np.ndarray:
    """The layout's definition, token by token: item s's tokens follow those of items < s;
    token j of item s sits at position start_pos + j, in KV slot
    block_table[position // BS] * BS + position % BS; out_rows holds the token row of the last
    token of each sampled item, then of each padding item; padding items run token 0 at
    position 0 in the scratch block; block table rows are cut at the width, the rest (and the
    padding rows) name the scratch block."""
    h = np.zeros(layout.total, np.int64)
    ids, positions, slots, tok_seq, last = [], [], [], [], []
    for s, it in enumerate(batch):
        for j, tok in enumerate(it.token_ids):
            p = it.start_pos + j
            ids.append(int(tok))
            positions.append(p)
            slots.append(it.block_table[p // BS] * BS + p % BS)
            tok_seq.append(s)
        last.append(len(ids) - 1)
    for s in range(len(batch), pad_to):
        ids.append(0)
        positions.append(0)
        slots.append(SCRATCH * BS)
        tok_seq.append(s)
        last.append(len(ids) - 1)
    n = len(ids)
    for offset, values in ((layout.ids, ids), (layout.positions, positions),
                           (layout.slots, slots), (layout.tok_seq, tok_seq)):  # fmt: skip
        h[offset : offset + n] = values
    out = [last[i] for i in rows] + last[len(batch) :]
    h[layout.out_rows : layout.out_rows + len(out)] = out
    for s in range(layout.seqs):
        table = batch[s].block_table if s < len(batch) else []
        for c in range(layout.width):
            h[layout.block_tables + s * layout.width + c] = table[c] if c < len(table) else SCRATCH
    for i, tile in enumerate(tiles or []):
        h[layout.prefill_tiles + 4 * i : layout.prefill_tiles + 4 * i + 4] = tile
    return h


def random_item(rng, seq_id: int, decode: bool, sampling: bool) -> BatchItem:
    start = int(rng.integers(0, 300))
    n = 1 if decode else int(rng.integers(1, 40))
    end = start + n
    extra = int(rng.integers(0, 3))  # tables may hold blocks beyond the step's tokens
    table = rng.choice(5000, size=-(-end // BS) + extra, replace=False).tolist()
    return BatchItem(
        seq_id=seq_id,
        token_ids=rng.integers(0, 50000, n).astype(np.int32),
        start_pos=start,
        block_table=table,
        sampling=SamplingParams(temperature=0.0) if sampling or decode else None,
    )


def check(batch, rows, layout, pad_to, tiles=None) -> None:
    h = np.full(layout.total + 37, SENTINEL, np.int32)
    pack_inputs(h, batch, rows, layout, pad_to, BS, SCRATCH, tiles)
    want = reference_pack(batch, rows, layout, pad_to, tiles)
    np.testing.assert_array_equal(h[: layout.total], want)
    assert (h[layout.total :] == SENTINEL).all()  # nothing written past the layout


@pytest.mark.parametrize("seed", range(40))
def test_eager_mixed_batches_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 24))
    decode_share = rng.random()
    batch = [random_item(rng, i, rng.random() < decode_share, rng.random() < 0.5)
             for i in range(n)]  # fmt: skip
    rows = [i for i, it in enumerate(batch) if it.sampling is not None]
    max_width = int(rng.choice([4, 8, 64]))  # small: tables get cut
    tiles = []
    if rng.random() < 0.5:
        tiles = prefill_tiles([len(it.token_ids) for it in batch],
                              [it.start_pos for it in batch], int(rng.choice([1, 4, 8])))  # fmt: skip
    layout = eager_input_layout(batch, len(rows), max_width, len(tiles))
    check(batch, rows, layout, len(batch), tiles)


@pytest.mark.parametrize("seed", range(30))
def test_graph_decode_batches_with_padding_match_the_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 64))
    batch = [random_item(rng, i, True, True) for i in range(n)]
    buckets = (1, 2, 4, 8, 16, 32, 64)
    rows, bucket = step_rows(batch, buckets, 64)
    assert rows == list(range(n)) and bucket is not None and bucket >= n
    max_width = int(rng.choice([16, 32, 512]))
    layout = graph_input_layout(batch, bucket, BS, max_width)
    assert layout.width >= min(max(-(-(it.start_pos + 1) // BS) for it in batch), max_width)
    check(batch, rows, layout, bucket)


def test_step_rows_picks_graphs_for_decode_only_steps_within_the_buckets():
    rng = np.random.default_rng(7)
    decode = [random_item(rng, i, True, True) for i in range(5)]
    assert step_rows(decode, (1, 2, 4, 8), 256) == ([0, 1, 2, 3, 4], 8)
    assert step_rows(decode, (1, 2, 4), 256) == ([0, 1, 2, 3, 4], None)  # past the buckets
    assert step_rows(decode, (), 256)[1] is None  # graphs off
    assert step_rows(decode, (1, 2, 4, 8), 4)[1] is None  # bucket past max_batch
    mixed = decode + [random_item(rng, 9, False, False)]
    mixed[-1].token_ids = mixed[-1].token_ids[:1].repeat(3)
    assert step_rows(mixed, (1, 2, 4, 8), 256) == ([0, 1, 2, 3, 4], None)
