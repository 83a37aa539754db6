"""Running one step's forward (plan.forward): pack the step's inputs into the pinned buffer and
copy them in one transfer, then launch the kernels eagerly, or replay the CUDA graph captured
for the batch's size bucket and block-table width (decode steps)."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np

from inference_service.backends.base import BatchItem
from inference_service.backends.cuda.graphs import CudaGraph, capture
from inference_service.backends.cuda.kernels import StepKernels
from inference_service.backends.cuda.memory import Workspace
from inference_service.backends.cuda.plan import StepBuffers, forward
from inference_service.backends.cuda.shapes import (
    GEMV_MAX_TOKENS,
    InputLayout,
    ceil_div,
    prefill_tiles,
    width_bucket,
)


def pack_inputs(h: np.ndarray, batch: list[BatchItem], rows: list[int], layout: InputLayout,
                pad_to: int, block_size: int, scratch_block: int,
                tiles: list[tuple[int, int, int, int]] | None = None) -> None:  # fmt: skip
    """Write the step's int32 inputs into h (laid out by `layout`): token ids, positions, KV
    slots, each token's sequence, the token row of each row to sample (`rows` = the items that
    sample), block tables, prefill tiles. Items past len(batch) up to pad_to (graph padding) run
    token 0 at position 0 in the scratch block.

    Each field is written for the whole batch in one numpy assignment: a decode step's fields
    are gathered with one list comprehension each (cheapest at every batch size), a step with
    prefill chunks goes through flat arrays (_token_fields)."""
    bs, n, W = block_size, len(batch), layout.width
    h[: layout.total] = 0
    T = layout.tokens
    ids = h[layout.ids : layout.ids + T]
    pos = h[layout.positions : layout.positions + T]
    slots = h[layout.slots : layout.slots + T]
    tok_seq = h[layout.tok_seq : layout.tok_seq + T]
    out_rows = h[layout.out_rows : layout.out_rows + layout.rows]
    bt = h[layout.block_tables : layout.block_tables + layout.seqs * W]
    bt = bt.reshape(layout.seqs, W)
    tables = [it.block_table for it in batch]
    if all(len(it.token_ids) == 1 for it in batch):  # decode: one token per item
        t = n
        p = [it.start_pos for it in batch]
        ids[:n] = [it.token_ids[0] for it in batch]
        pos[:n] = p
        slots[:n] = [table[q // bs] * bs + q % bs for table, q in zip(tables, p, strict=True)]
        tok_seq[:n] = last = np.arange(n)
    else:
        t, last = _token_fields(batch, tables, bs, ids, pos, slots, tok_seq)
    # Block tables cut at the width; the rest of a row names the scratch block.
    bt[:n] = [table[:W] + [scratch_block] * (W - len(table)) for table in tables]
    out_rows[: len(rows)] = last[rows]
    pad = pad_to - n
    if pad:  # graph padding: token 0 at position 0 in the scratch block, one per padded item
        bt[n:] = scratch_block
        slots[t : t + pad] = scratch_block * bs
        tok_seq[t : t + pad] = range(n, pad_to)
        out_rows[len(rows) : len(rows) + pad] = range(t, t + pad)
    if tiles:
        h[layout.prefill_tiles : layout.total] = np.asarray(tiles, np.int32).ravel()


def _token_fields(batch: list[BatchItem], tables: list[list[int]], bs: int, ids: np.ndarray,
                  pos: np.ndarray, slots: np.ndarray,
                  tok_seq: np.ndarray) -> tuple[int, np.ndarray]:  # fmt: skip
    """pack_inputs' token fields of a step with prefill chunks, from flat arrays over the
    batch; returns (tokens, the row of each item's last token)."""
    n = len(batch)
    lens = np.fromiter((len(it.token_ids) for it in batch), np.int64, n)
    starts = np.fromiter((it.start_pos for it in batch), np.int64, n)
    table_lens = np.fromiter(map(len, tables), np.int64, n)
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(table_lens.sum()))
    t = int(lens.sum())
    seq_of = np.repeat(np.arange(n), lens)
    ends = np.cumsum(lens)
    p = np.arange(t) - (ends - lens)[seq_of] + starts[seq_of]
    ids[:t] = np.concatenate([np.asarray(it.token_ids) for it in batch])
    pos[:t] = p
    slots[:t] = flat[(np.cumsum(table_lens) - table_lens)[seq_of] + p // bs] * bs + p % bs
    tok_seq[:t] = seq_of
    return t, ends - 1


def eager_input_layout(batch: list[BatchItem], n_rows: int, max_width: int,
                       n_tiles: int = 0) -> InputLayout:  # fmt: skip
    """The layout of an eager step: every token, one row per sampling item, block tables as
    wide as the longest (at most max_width)."""
    T = sum(len(it.token_ids) for it in batch)
    width = min(max(1, max(len(it.block_table) for it in batch)), max_width)
    return InputLayout(T, len(batch), n_rows, width, n_tiles)


def graph_input_layout(batch: list[BatchItem], bucket: int, block_size: int,
                       max_width: int) -> InputLayout:  # fmt: skip
    """The layout of a decode step replayed as the graph of `bucket` rows: its block-table
    width is the bucket (width_bucket) of the longest context."""
    need = max(ceil_div(it.start_pos + 1, block_size) for it in batch)
    width = width_bucket(need, max_width)
    return InputLayout(bucket, bucket, bucket, width)


class StepRunner:
    """The step-level state of a backend: workspace, captured graphs, max block-table width."""

    def __init__(self, cuda: Any, kernels: StepKernels, buffers: StepBuffers, block_size: int,
                 max_batch: int, use_pdl: bool) -> None:  # fmt: skip
        self._cuda = cuda
        self.k = kernels
        self.buf = buffers
        self.block_size = block_size
        self.max_batch = max_batch
        self.use_pdl = use_pdl
        self.decode_unroll: int | None = None  # see CudaBackend.decode_unroll
        self.max_width = 1  # block-table columns; set once the KV pool is sized
        self.scratch_block = 0
        self.graphs: dict[tuple[int, int], CudaGraph] = {}

    @property
    def ws(self) -> Workspace:
        return self.buf.ws

    def alloc_workspace(self, tokens: int) -> None:
        """(Re)allocate the workspace for `tokens` token rows (graphs read the old buffers, so
        they go too)."""
        self.clear_graphs()
        self.buf.ws = None  # free the old buffers first
        self.buf.ws = Workspace.allocate(self._cuda, self.k.config, tokens, self.max_batch,
                                         self.max_width)  # fmt: skip
        self.k.gate_up_scratch = int(self.buf.ws.gate_up)

    def clear_graphs(self) -> None:
        for g in self.graphs.values():
            g.close()
        self.graphs = {}

    def prefill_tiles(self, batch: list[BatchItem], T: int) -> list[tuple[int, int, int, int]]:
        """Query tiles for prefill_attention_d* when this step runs it (a GEMM-path step with
        some item of more than one token, in a supported head dim), else none: decode-only
        steps keep paged_attention_d*, whose splits spread long contexts over the SMs."""
        if self.k.prefill_attention_name is None or T <= GEMV_MAX_TOKENS:
            return []
        if all(len(it.token_ids) == 1 for it in batch):
            return []
        lengths = [len(it.token_ids) for it in batch]
        c = self.k.config
        return prefill_tiles(lengths, [it.start_pos for it in batch], c.num_heads // c.num_kv_heads)

    def fill_inputs(self, batch: list[BatchItem], rows: list[int], layout: InputLayout,
                    pad_to: int, tiles: list | None = None) -> None:  # fmt: skip
        """Pack the step's inputs into the pinned buffer and copy them to the device."""
        h = self.ws.inputs_host
        pack_inputs(h, batch, rows, layout, pad_to, self.block_size, self.scratch_block, tiles)
        self._cuda.memcpy_htod_async(self.ws.inputs, h[: layout.total], self.k.stream)

    def eager_layout(self, batch: list[BatchItem], rows: list[int]) -> tuple[InputLayout, int]:
        """Pack the inputs of an eager step; (layout, longest context)."""
        T = sum(len(it.token_ids) for it in batch)
        if self.ws.tokens < T:
            self.alloc_workspace(max(T, 2 * self.ws.tokens))
        tiles = self.prefill_tiles(batch, T)
        layout = eager_input_layout(batch, len(rows), self.max_width, len(tiles))
        self.fill_inputs(batch, rows, layout, pad_to=len(batch), tiles=tiles)
        return layout, max(it.start_pos + len(it.token_ids) for it in batch)

    def run_eager(self, batch: list[BatchItem], rows: list[int]) -> None:
        layout, max_ctx = self.eager_layout(batch, rows)
        forward(self.k, self.buf, layout, max_ctx, self.decode_unroll)

    def run_graph(self, batch: list[BatchItem], bucket: int) -> CudaGraph:
        """Replay (capturing first if new) the decode graph of this bucket and table width."""
        layout = graph_input_layout(batch, bucket, self.block_size, self.max_width)
        if bucket > self.ws.tokens:
            self.alloc_workspace(bucket)
        self.fill_inputs(batch, list(range(len(batch))), layout, pad_to=bucket)
        width = layout.width
        key = (bucket, width)
        graph = self.graphs.get(key)
        if graph is None:
            self.k.stream.synchronize()
            max_ctx = width * self.block_size
            graph = self._capture(lambda: forward(self.k, self.buf, layout, max_ctx,
                                                  self.decode_unroll))  # fmt: skip
            self.graphs[key] = graph
        graph.launch(self.k.cu_stream)
        return graph

    def _capture(self, record) -> CudaGraph:
        """A graph of record()'s launches: with programmatic dependent launch when available
        (kernels overlap their prologue with the previous kernel's tail), else plain."""
        stream = self.k.cu_stream
        if self.use_pdl:
            try:
                self.k.pdl = True
                return capture(stream, record)
            except Exception as e:  # noqa: BLE001 - any failure: fall back to plain graphs
                warnings.warn(f"CUDA graph capture with PDL failed ({e}); using plain graphs",
                              stacklevel=2)  # fmt: skip
                self.use_pdl = False
            finally:
                self.k.pdl = False
        return capture(stream, record)
