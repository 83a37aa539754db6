"""The CPU reference backend: Llama/Qwen2 forward pass in numpy over a paged KV cache.

Weights are held as float32, fused per layer (q|k|v and gate|up), because numpy's float16
matmul has no BLAS path and runs ~50x slower than float32 sgemm: on the CPU, fp32 storage is
what keeps numpy fast (decode reads every weight once per step, so this costs bandwidth, not
correctness). All arithmetic is float32, as transformers' fp32 run.

One step runs every item's tokens through each weight in a single matmul (the tokens of all
sequences are concatenated); only attention loops over items, each reading its own blocks.
"""

from __future__ import annotations

import numpy as np

from inference_service.backends.base import BatchItem
from inference_service.engine.sampler import sample
from inference_service.engine.sampling_params import SampleOutput
from inference_service.models.config import ModelConfig
from inference_service.models.loader import LoadedModel
from inference_service.models.rope import apply_rope, rope_cos_sin, rope_inv_freq

KV_DTYPE = np.float32


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
        c = model.config
        self.config = c
        self.num_blocks = num_blocks
        self.block_size = block_size
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
        out: list[SampleOutput | None] = [None] * len(batch)
        for r, i in enumerate(rows):
            item = batch[i]
            out[i] = sample(logits[r], item.sampling, item.history, item.step)
        return out

    def logits(self, batch: list[BatchItem]) -> np.ndarray:
        return self._forward(batch, list(range(len(batch))))

    # ------------------------------------------------------------------ forward pass

    def _check(self, batch: list[BatchItem]) -> None:
        for item in batch:
            n = len(item.token_ids)
            if n == 0:
                raise ValueError(f"sequence {item.seq_id}: no tokens to run")
            end = item.start_pos + n
            if len(item.block_table) * self.block_size < end:
                raise ValueError(
                    f"sequence {item.seq_id}: block table of {len(item.block_table)} blocks "
                    f"cannot hold {end} positions (block size {self.block_size})"
                )
            ids = np.asarray(item.token_ids)
            if ids.min() < 0 or ids.max() >= self.config.vocab_size:
                raise ValueError(
                    f"sequence {item.seq_id}: token id out of range 0..{self.config.vocab_size - 1}"
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
            for b, it in enumerate(batch):
                lo, hi = bounds[b], bounds[b + 1]
                attn[lo:hi] = self._attend(q[lo:hi], kc, vc, it.block_table, it.start_pos)
            x = x + attn @ layer.wo.T
            h = rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
            gu = h @ layer.wgu.T
            gate = gu[:, : c.intermediate_size]
            up = gu[:, c.intermediate_size :]
            x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ layer.wd.T
        last = bounds[1:][rows] - 1 if rows else np.zeros(0, dtype=np.int64)
        h = rms_norm(x[last], self.final_norm, c.rms_norm_eps)
        return np.ascontiguousarray(h @ self.lm_head.T, dtype=np.float32)

    def _attend(
        self,
        q: np.ndarray,
        kc: np.ndarray,
        vc: np.ndarray,
        block_table: list[int],
        start: int,
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
        scores = (qg @ keys.transpose(1, 2, 0)) * self._scale  # [kv, group*n, L]
        if n > 1:
            scores = scores.reshape(c.num_kv_heads, group, n, length)
            future = np.arange(length)[None, :] > (start + np.arange(n))[:, None]
            scores[:, :, future] = -np.inf
            scores = scores.reshape(c.num_kv_heads, group * n, length)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = probs @ vals.transpose(1, 0, 2)  # [kv, group*n, hd]
        out = out.reshape(c.num_kv_heads, group, n, c.head_dim).transpose(2, 0, 1, 3)
        return out.reshape(n, c.num_heads * c.head_dim)
