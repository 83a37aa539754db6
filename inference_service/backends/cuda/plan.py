"""One forward step on the GPU as the sequence of kernel calls (kernels.StepKernels), in the
order of the model's math: embed; per layer x += o_proj(attention(rope(qkv(norm(x))))),
x += down(swiglu(gate_up(norm(x)))); logits = lm_head(norm(x)) with the argmax fused in.

Up to GEMV_MAX_TOKENS token rows run the decode GEMVs (norm, RoPE, the KV-cache write and
SwiGLU fused into them: 5 kernels per layer); more rows run RMSNorm + tensor-core GEMMs + the
RoPE/KV kernel. The same calls are what a CUDA graph captures."""

from __future__ import annotations

from dataclasses import dataclass

from inference_service.backends.cuda.kernels import StepKernels
from inference_service.backends.cuda.memory import KvPool, Workspace
from inference_service.backends.cuda.shapes import GEMV_MAX_TOKENS, InputLayout


@dataclass
class StepBuffers:
    """Where a step reads and writes: the weights (arena name -> address), the KV pool, the
    activations and packed inputs, the logits and fused-argmax outputs."""

    weights: dict[str, int]
    kv: KvPool
    ws: Workspace
    logits: int  # fp32 [max_batch, vocab]
    argmax: int  # uint64 [max_batch] packed (value, index) keys
    lm_rows: int  # lm_head rows computed (the sample vocabulary)


def forward(k: StepKernels, buf: StepBuffers, layout: InputLayout, max_ctx: int,
            decode_unroll: int | None) -> None:  # fmt: skip
    """Enqueue one whole step: layout says where the step's inputs sit in buf.ws.inputs;
    max_ctx is the longest context any row attends to (a graph's: its bucket's)."""
    c, w, ws = k.config, buf.weights, buf.ws
    T, R = layout.tokens, layout.rows
    hid, inter, qkv_dim, q_dim = c.hidden_size, c.intermediate_size, k.qkv_dim, k.q_dim
    if ws.tokens < T:
        raise AssertionError("workspace too small")
    inp = int(ws.inputs)
    ids, positions = inp + 4 * layout.ids, inp + 4 * layout.positions
    slots, tok_seq = inp + 4 * layout.slots, inp + 4 * layout.tok_seq
    out_rows, tables = inp + 4 * layout.out_rows, inp + 4 * layout.block_tables
    x, xnorm, qkv, attn, act = int(ws.resid), int(ws.xnorm), int(ws.qkv), int(ws.attn), int(ws.act)
    small = T <= GEMV_MAX_TOKENS
    attention = k.attention_choice(T, max_ctx, decode_unroll)

    k.embed(T, table=w["embed"], ids=ids, out=x, argmax=buf.argmax, rows=R)
    for li in range(c.num_layers):
        kc, vc = buf.kv.k_cache(li), buf.kv.v_cache(li)
        # Attention block: q|k|v of norm(x), RoPE, K/V into the cache, attention, x += o_proj.
        if small:
            k.qkv_rope(T, resid=x, norm=w[f"L{li}.attn_norm"], weight=w[f"L{li}.wqkv"],
                       bias=w.get(f"L{li}.bqkv", 0), out=qkv, positions=positions, slots=slots,
                       k_cache=kc, v_cache=vc)  # fmt: skip
        else:
            k.rmsnorm(T, x=x, weight=w[f"L{li}.attn_norm"], out=xnorm)
            k.matmul("gemm qkv", x=xnorm, weight=w[f"L{li}.wqkv"], m=T, n=qkv_dim, k=hid,
                     out=qkv, bias=w.get(f"L{li}.bqkv", 0))  # fmt: skip
            k.rope_kv_write(T, qkv=qkv, positions=positions, slots=slots, k_cache=kc, v_cache=vc)
        if layout.tiles:  # tensor-core prefill attention over the step's query tiles
            k.prefill_attention(layout.tiles, qkv=qkv, k_cache=kc, v_cache=vc,
                                block_tables=tables, width=layout.width, out=attn,
                                tile_table=inp + 4 * layout.prefill_tiles)  # fmt: skip
        else:
            k.attention(T, qkv=qkv, k_cache=kc, v_cache=vc, block_tables=tables,
                        width=layout.width, tok_seq=tok_seq, positions=positions, out=attn,
                        counters=int(ws.counters), choice=attention)  # fmt: skip
        # MLP block: x += down(silu(gate(norm(x))) * up(norm(x))).
        if small:
            k.gemv("o_proj+resid", T, weight=w[f"L{li}.wo"], n=hid, k=q_dim, x=attn, out=x,
                   residual=True)  # fmt: skip
            k.mlp(T, resid=x, norm=w[f"L{li}.mlp_norm"], weight=w[f"L{li}.wgu"], out=act)
            k.gemv("down+resid", T, weight=w[f"L{li}.wd"], n=hid, k=inter, x=act, out=x,
                   residual=True)  # fmt: skip
        else:
            k.matmul("gemm o_proj", x=attn, weight=w[f"L{li}.wo"], m=T, n=hid, k=q_dim, out=x,
                     residual=True)  # fmt: skip
            k.rmsnorm(T, x=x, weight=w[f"L{li}.mlp_norm"], out=xnorm)
            # SwiGLU fused into the gate|up GEMM: act = silu(gate) * up, no gate_up buffer.
            k.matmul("gemm gate_up", x=xnorm, weight=w[f"L{li}.wgu"], m=T, n=inter, k=hid,
                     out=act, swiglu=True)  # fmt: skip
            k.matmul("gemm down", x=act, weight=w[f"L{li}.wd"], m=T, n=hid, k=inter, out=x,
                     residual=True)  # fmt: skip
    # Final norm + lm_head (+ fused argmax) over the rows to sample, 8 rows per launch.
    v = c.vocab_size
    for r0 in range(0, R, GEMV_MAX_TOKENS):
        k.lm_head(min(GEMV_MAX_TOKENS, R - r0), resid=x, row_index=out_rows + 4 * r0,
                  norm=w["final_norm"], weight=w["lm_head"], n=buf.lm_rows,
                  logits=buf.logits + 4 * r0 * v, argmax=buf.argmax + 8 * r0)  # fmt: skip
