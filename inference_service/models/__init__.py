"""Model configs and loaders (HF safetensors folders, GGUF).

Weights contract (what every backend may rely on): `LoadedModel.weights` maps canonical HF
Llama names (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
q/k/v `.bias` for Qwen2, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`,
`lm_head.weight` — absent when `config.tie_word_embeddings`) to numpy arrays that are
  * float32 or float16 (F32/F16 sources stay as read-only views of the file's mmap;
    BF16 and every quantized GGUF type are converted to float32 on load), or, with
    `load_model(path, keep_quantized=True)`, quantized matrices kept as they are stored
    (`models.quantized.Int8Weight` for int8 / GGUF Q8_0, `Q4Weight` for GGUF Q4_0 / Q4_1),
  * in [out_features, in_features] layout,
  * with Q/K rows in HF order (rotate-half / "neox" rope): GGUF Llama files store them
    permuted for interleaved rope and are un-permuted on load.
Every shape is checked against the config; problems raise `ModelLoadError` (a ValueError)
with a message that names the file and tensor.
"""

from inference_service.models.config import ModelConfig, ModelLoadError, RopeScaling
from inference_service.models.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "ModelConfig", "ModelLoadError", "RopeScaling", "load_model"]
