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
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()
