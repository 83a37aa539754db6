"""The CPU reference backend: Llama/Qwen2 forward pass in numpy over a paged KV cache.

Weights are held as float32, fused per layer (q|k|v and gate|up), because numpy's float16
matmul has no BLAS path and runs ~50x slower than float32 sgemm: on the CPU, fp32 storage is
what keeps numpy fast (decode reads every weight once per step, so this costs bandwidth, not
correctness). All arithmetic is float32, as transformers' fp32 run.

One step runs every item's tokens through each weight in a single matmul (the tokens of all
sequences are concatenated); only attention loops over items, each reading its own blocks.
"""

from __future__ import annotations

import os

import numpy as np

from inference_service.backends.base import BatchItem, check_batch
from inference_service.models.config import ModelConfig
from inference_service.models.loader import LoadedModel
from inference_service.models.rope import apply_rope, rope_cos_sin, rope_inv_freq
from inference_service.sampling.params import SampleOutput
from inference_service.sampling.sampler import sample

KV_DTYPE = np.float32
THREADS_ENV = "KUIPER_CPU_THREADS"


def set_blas_threads(n: int) -> bool:
    """Set the thread count of the OpenBLAS numpy uses (best effort; False if not found).

    OpenBLAS threads spin while they wait: on a machine whose cores are busy with other
    work (a server's gRPC threads, other processes) fewer BLAS threads can be much faster."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            libs = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return False
    for lib_path in libs:
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError:
            continue
        for name in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def kv_bytes_per_block(config: ModelConfig, block_size: int) -> int:
    """Bytes one KV block takes across all layers (K and V), as this backend stores it."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * np.dtype(KV_DTYPE).itemsize


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "bqkv", "wo", "mlp_norm", "wgu", "wd")

    def __init__(self, w: dict, p: str, attention_bias: bool) -> None:
        a = p + "self_attn."
        self.attn_norm = _f32(w[p + "input_layernorm.weight"])
        self.mlp_norm = _f32(w[p + "post_attention_layernorm.weight"])
        self.wqkv = _f32(np.concatenate([w[a + f"{n}_proj.weight"] for n in "qkv"], axis=0))
        self.bqkv = (
            _f32(np.concatenate([w[a + f"{n}_proj.bias"] for n in "qkv"]))
            if attention_bias
            else None
        )
        self.wo = _f32(w[a + "o_proj.weight"])
        m = p + "mlp."
        self.wgu = _f32(np.concatenate([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]))
        self.wd = _f32(w[m + "down_proj.weight"])


def causal_bias(start: int, n: int) -> np.ndarray:
    """Additive mask [n, start + n]: query i (at position start + i) sees positions <= its own."""
    future = np.arange(start + n)[None, :] > (start + np.arange(n))[:, None]
    return np.where(future, np.float32(-np.inf), np.float32(0.0))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return weight * (x / np.sqrt(var + np.float32(eps)))


class NumpyBackend:
    device_name = "cpu"

    def __init__(self, model: LoadedModel, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        threads = os.environ.get(THREADS_ENV)
        if threads:
            set_blas_threads(int(threads))
        c = model.config
        self.config = c
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sample_vocab = c.vocab_size  # see base.Backend
        w = dict(model.weights)
        self.embed = _f32(w["model.embed_tokens.weight"])
        self.lm_head = self.embed if c.tie_word_embeddings else _f32(w["lm_head.weight"])
        self.final_norm = _f32(w["model.norm.weight"])
        self.layers = [
            _Layer(w, f"model.layers.{i}.", c.attention_bias) for i in range(c.num_layers)
        ]
        self.inv_freq = rope_inv_freq(c)
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        # np.zeros maps untouched pages lazily, so a large pool costs only what is used.
        self.k_cache = [np.zeros(shape, KV_DTYPE) for _ in range(c.num_layers)]
        self.v_cache = [np.zeros(shape, KV_DTYPE) for _ in range(c.num_layers)]
        self._q_dim = c.num_heads * c.head_dim
        self._kv_dim = c.num_kv_heads * c.head_dim
        self._scale = np.float32(1.0 / np.sqrt(c.head_dim))

    # ------------------------------------------------------------------ public API

    def step(self, batch: list[BatchItem]) -> list[SampleOutput | None]:
        rows = [i for i, item in enumerate(batch) if item.sampling is not None]
        if not batch:
            return []
        logits = self._forward(batch, rows)
        n = self.sample_vocab
        out: list[SampleOutput | None] = [None] * len(batch)
        for r, i in enumerate(rows):
            item = batch[i]
            out[i] = sample(logits[r, :n], item.sampling, item.history, item.step)
        return out

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        logits = self._forward(batch, list(range(len(batch))))
        logits[:, self.sample_vocab :] = -np.inf  # never sampled (as the CUDA backend's)
        return logits

    # ------------------------------------------------------------------ forward pass

    def _check(self, batch: list[BatchItem]) -> None:
        check_batch(
            batch,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            vocab_size=self.config.vocab_size,
        )

    def _forward(self, batch: list[BatchItem], rows: list[int]) -> np.ndarray:
        """Run the batch; return float32 logits [len(rows), vocab] of the last token of each
        item listed in rows."""
        self._check(batch)
        c = self.config
        bs = self.block_size
        ids = np.concatenate([np.asarray(it.token_ids, dtype=np.int64) for it in batch])
        positions = np.concatenate(
            [np.arange(it.start_pos, it.start_pos + len(it.token_ids)) for it in batch]
        )
        # Flat KV slot of every new token: block_table[pos // bs] * bs + pos % bs.
        slots = np.concatenate(
            [
                np.asarray(it.block_table, dtype=np.int64)[
                    np.arange(it.start_pos, it.start_pos + len(it.token_ids)) // bs
                ]
                * bs
                + np.arange(it.start_pos, it.start_pos + len(it.token_ids)) % bs
                for it in batch
            ]
        )
        bounds = np.cumsum([0] + [len(it.token_ids) for it in batch])
        cos, sin = rope_cos_sin(self.inv_freq, positions)
        # Single-token (decode) items share one padded attention call per layer; prefill
        # chunks attend one by one.
        singles = [b for b, it in enumerate(batch) if len(it.token_ids) == 1]
        decode = self._decode_plan(batch, singles, bounds) if len(singles) > 1 else None
        chunked = [b for b in range(len(batch)) if decode is None or b not in set(singles)]
        masks = {b: causal_bias(batch[b].start_pos, len(batch[b].token_ids)) for b in chunked}
        n_tok = len(ids)
        x = self.embed[ids]  # [T, hidden]
        qd, kvd = self._q_dim, self._kv_dim
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            qkv = h @ layer.wqkv.T
            if layer.bqkv is not None:
                qkv += layer.bqkv
            q = apply_rope(qkv[:, :qd].reshape(n_tok, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(
                qkv[:, qd : qd + kvd].reshape(n_tok, c.num_kv_heads, c.head_dim), cos, sin
            )
            v = qkv[:, qd + kvd :].reshape(n_tok, c.num_kv_heads, c.head_dim)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kflat = kc.reshape(-1, c.num_kv_heads, c.head_dim)
            vflat = vc.reshape(-1, c.num_kv_heads, c.head_dim)
            kflat[slots] = k
            vflat[slots] = v
            attn = np.empty((n_tok, qd), dtype=np.float32)
            for b in chunked:
                lo, hi = bounds[b], bounds[b + 1]
                it = batch[b]
                attn[lo:hi] = self._attend(
                    q[lo:hi], kc, vc, it.block_table, it.start_pos, masks.get(b)
                )
            if decode is not None:
                rows_d, tables, bias = decode
                attn[rows_d] = self._attend_decode(q[rows_d], kc, vc, tables, bias)
            x = x + attn @ layer.wo.T
            h = rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
            gu = h @ layer.wgu.T
            gate = gu[:, : c.intermediate_size]
            up = gu[:, c.intermediate_size :]
            x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ layer.wd.T
        last = bounds[1:][rows] - 1 if rows else np.zeros(0, dtype=np.int64)
        h = rms_norm(x[last], self.final_norm, c.rms_norm_eps)
        return np.ascontiguousarray(h @ self.lm_head.T, dtype=np.float32)

    def _decode_plan(
        self, batch: list[BatchItem], singles: list[int], bounds: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token rows, block tables padded to one width [D, nb], additive mask [D, 1, 1, L])
        for the single-token items of a step."""
        bs = self.block_size
        lengths = np.array([batch[b].start_pos + 1 for b in singles])
        nb = int(-(-lengths.max() // bs))
        tables = np.zeros((len(singles), nb), dtype=np.int64)  # pad with block 0: masked out
        for r, b in enumerate(singles):
            used = -(-int(lengths[r]) // bs)
            tables[r, :used] = batch[b].block_table[:used]
        bias = np.where(np.arange(nb * bs)[None, :] < lengths[:, None], 0.0, -np.inf)
        return bounds[singles], tables, bias.astype(np.float32)[:, None, None, :]

    def _attend_decode(
        self, q: np.ndarray, kc: np.ndarray, vc: np.ndarray, tables: np.ndarray, bias: np.ndarray
    ) -> np.ndarray:
        """Attention of D single queries [D, heads, hd] over their padded block tables."""
        c = self.config
        d = q.shape[0]
        group = c.num_heads // c.num_kv_heads
        keys = kc[tables].reshape(d, -1, c.num_kv_heads, c.head_dim)  # [D, L, kv, hd]
        vals = vc[tables].reshape(d, -1, c.num_kv_heads, c.head_dim)
        qg = q.reshape(d, c.num_kv_heads, group, c.head_dim)
        scores = (qg @ keys.transpose(0, 2, 3, 1)) * self._scale + bias  # [D, kv, group, L]
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs @ vals.transpose(0, 2, 1, 3)  # [D, kv, group, hd]
        return out.reshape(d, c.num_heads * c.head_dim)

    def _attend(
        self,
        q: np.ndarray,
        kc: np.ndarray,
        vc: np.ndarray,
        block_table: list[int],
        start: int,
        bias: np.ndarray | None = None,
    ) -> np.ndarray:
        """Causal attention of one item's n queries [n, heads, hd] over positions
        [0, start + n) read from its KV blocks; returns [n, heads * hd]."""
        c = self.config
        n = q.shape[0]
        length = start + n
        nb = -(-length // self.block_size)
        blocks = np.asarray(block_table[:nb], dtype=np.int64)
        keys = kc[blocks].reshape(-1, c.num_kv_heads, c.head_dim)[:length]  # [L, kv, hd]
        vals = vc[blocks].reshape(-1, c.num_kv_heads, c.head_dim)[:length]
        group = c.num_heads // c.num_kv_heads
        # [n, kv*group, hd] → [kv, group*n, hd]: query head h reads kv head h // group.
        qg = q.reshape(n, c.num_kv_heads, group, c.head_dim).transpose(1, 2, 0, 3)
        qg = qg.reshape(c.num_kv_heads, group * n, c.head_dim)
        scores = (qg * self._scale) @ keys.transpose(1, 2, 0)  # [kv, group*n, L]
        if n > 1:
            if bias is None:
                bias = causal_bias(start, n)
            scores = scores.reshape(c.num_kv_heads, group, n, length)
            scores += bias
            scores = scores.reshape(c.num_kv_heads, group * n, length)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores, out=scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs @ vals.transpose(1, 0, 2)  # [kv, group*n, hd]
        out = out.reshape(c.num_kv_heads, group, n, c.head_dim).transpose(2, 0, 1, 3)
        return out.reshape(n, c.num_heads * c.head_dim)
