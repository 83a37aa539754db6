"""Tiny random transformers models for tests (reusable by every test module).

Each builder makes a model with transformers (torch, fp32), saves it with save_pretrained
(safetensors + config.json) into `folder`, and returns (folder, hf_model). The HF model is the
oracle: compare our backends' logits and tokens against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 256


def _common(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    return kw


def _save(model: Any, folder: Path, seed: int) -> tuple[Path, Any]:
    import torch

    torch.manual_seed(seed)
    # Larger-than-default init so logits are spread out and greedy ties are unlikely.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder, model


def build_llama2(folder: Path, seed: int = 0) -> tuple[Path, Any]:
    """Llama-2 style: rope theta 10000, no scaling, untied lm_head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**_common(rope_theta=10000.0, tie_word_embeddings=False))
    return _save(LlamaForCausalLM(cfg), folder, seed)


def build_llama3(folder: Path, seed: int = 1) -> tuple[Path, Any]:
    """Llama-3.x style: rope theta 500000 with "llama3" rope scaling (small original context
    so scaling actually changes frequencies), head_dim 32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **_common(
            hidden_size=96,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=32,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        )
    )
    return _save(LlamaForCausalLM(cfg), folder, seed)


def build_qwen2(folder: Path, seed: int = 2) -> tuple[Path, Any]:
    """Qwen2 style: q/k/v bias, tied embeddings, rope theta 1e6."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**_common(rope_theta=1000000.0, tie_word_embeddings=True))
    return _save(Qwen2ForCausalLM(cfg), folder, seed)


BUILDERS = {"llama2": build_llama2, "llama3": build_llama3, "qwen2": build_qwen2}


def hf_logits(model: Any, ids: list[int]) -> Any:
    """fp32 logits [len(ids), vocab] of a full forward pass (numpy)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, with transformers' own KV-cached generate()."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,  # run all n steps: EOS is just another token here
            pad_token_id=0,
        )
    assert out.shape[1] == len(ids) + n, "generate stopped early"
    return out[0, len(ids) :].tolist()


def llama_cpp_permute(w: Any, n_head: int) -> Any:
    """llama.cpp convert_hf_to_gguf.py's Q/K row permutation (HF rotate-half → interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_cpp_rope_factors(cfg: Any) -> Any:
    """llama.cpp's converter turns llama3 rope scaling into per-frequency divisors
    (the `rope_freqs.weight` tensor); this is its formula."""
    import math

    import numpy as np

    rope = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(hf_model: Any, path: Path, qtype: str = "F32", arch: str | None = None) -> Path:
    """Write an HF Llama/Qwen2 model as GGUF the way llama.cpp's converter does (llama: Q/K
    permuted), matrices in `qtype` (F32, F16, Q8_0, ...), 1-D tensors in F32."""
    import gguf
    import numpy as np

    cfg = hf_model.config
    arch = arch or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(cfg))
    qt = gguf.GGMLQuantizationType[qtype]
    for name, tensor in hf_model.state_dict().items():
        arr = tensor.detach().float().numpy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if cfg.model_type == "llama" and "q_proj" in name:
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and "k_proj" in name:
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            out = f"blk.{layer}.{_GGUF_NAMES[rest]}"
        if arr.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(out, np.ascontiguousarray(arr, np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(out, arr.astype(np.float16))
        else:
            w.add_tensor(out, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
