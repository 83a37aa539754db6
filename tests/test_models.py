"""Model loading: HF folders (single, sharded, bf16), GGUF (synthetic + the real SmolLM2),
and clear errors for bad models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from models_util import build_llama2, build_llama3, build_qwen2, hf_logits, write_gguf

from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.models import ModelLoadError, load_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_llama2(tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return build_llama3(tmp_path_factory.mktemp("llama3") / "m")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_qwen2(tmp_path_factory.mktemp("qwen") / "m")


def hf_state(hf) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}


def our_logits(model, ids: list[int]) -> np.ndarray:
    backend = NumpyBackend(model, num_blocks=8, block_size=16)
    return backend.logits([BatchItem(0, np.array(ids, np.int32), 0, list(range(8)))])[0]


def rel_err(got, ref) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


IDS = [5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 11]


def test_hf_folder_weights_are_the_hf_weights(llama):
    folder, hf = llama
    model = load_model(folder)
    ref = hf_state(hf)
    assert model.dtype == "float32" and model.source == str(folder)
    for name, arr in model.weights.items():
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    assert set(model.weights) == set(ref)


def test_sharded_index_folder(llama, tmp_path):
    _, hf = llama
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(tmp_path)
    ref = hf_state(hf)
    for name, arr in model.weights.items():
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)


def test_bf16_folder_is_widened_exactly(qwen, tmp_path):
    _, hf = qwen
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    hf.to(torch.float32)
    model = load_model(tmp_path)
    assert model.dtype == "bfloat16"
    from safetensors.torch import load_file

    ref = load_file(tmp_path / "model.safetensors")
    for name, arr in model.weights.items():
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, ref[name].float().numpy(), err_msg=name)


@pytest.mark.parametrize("which", ["llama", "llama3", "qwen"])
def test_gguf_f32_matches_transformers(which, request, tmp_path):
    """A GGUF written as llama.cpp's converter writes it (Q/K permuted for llama) loads
    back to logits equal to the HF model's."""
    _, hf = request.getfixturevalue(which)
    path = write_gguf(hf, tmp_path / "m.gguf", "F32")
    model = load_model(path)
    assert model.config.architecture == hf.config.model_type
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    # Llama 3.x GGUFs carry llama3 rope scaling as per-frequency factors (rope_freqs.weight).
    assert (model.config.rope_freq_factors is not None) == (which == "llama3")
    assert rel_err(our_logits(model, IDS), hf_logits(hf, IDS)[-1]) < 1e-4


@pytest.mark.parametrize(
    "qtype,tol", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.15), ("Q4_1", 0.15)]
)
def test_gguf_quantized_weights_close_to_hf(llama, tmp_path, qtype, tol):
    _, hf = llama
    model = load_model(write_gguf(hf, tmp_path / "m.gguf", qtype))
    assert model.dtype == {"F16": "float16", "BF16": "bfloat16"}.get(qtype, qtype)
    for name, ref in hf_state(hf).items():
        arr = model.weights[name]
        assert arr.dtype in (np.float32, np.float16)
        err = np.max(np.abs(arr.astype(np.float32) - ref)) / np.max(np.abs(ref))
        assert err < tol, f"{name}: {err}"


def test_real_smollm2_gguf_config(smollm2_gguf):
    model = load_model(smollm2_gguf)
    c = model.config
    # SmolLM2-135M's published shape.
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings
    assert model.dtype == "Q4_1"


# ---------------------------------------------------------------------------- bad models


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(llama, tmp_path):
    folder = copy_folder(llama[0], tmp_path / "m")
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(folder)


def test_wrong_shape_names_the_tensor(llama, tmp_path):
    from safetensors.numpy import save_file

    folder = copy_folder(llama[0], tmp_path / "m")
    state = hf_state(llama[1])
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        load_model(folder)
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k"):
        load_model(folder)


def test_integer_weights_are_refused(llama, tmp_path):
    from safetensors.numpy import save_file

    folder = copy_folder(llama[0], tmp_path / "m")
    state = hf_state(llama[1])
    state["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 128), np.int8)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"down_proj\.weight' is I8"):
        load_model(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="quantized checkpoint.*gptq"):
        load_model(folder)


def test_unsupported_architecture(llama, tmp_path):
    folder = copy_folder(llama[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*gpt2"):
        load_model(folder)


def test_unsupported_gguf_architecture(llama, tmp_path):
    path = write_gguf(llama[1], tmp_path / "m.gguf", "F32", arch="gpt2")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_gguf(llama, tmp_path, keep):
    full = write_gguf(llama[1], tmp_path / "full.gguf", "Q8_0")
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(cut)


def test_not_a_model(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(
        ModelLoadError, match="not a GGUF file, an HF model folder or a KuiperLLama"
    ):
        load_model(junk)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="model not found"):
        load_model(tmp_path / "nope")


# ---------------------------------------------------------------------------- configs

# config.json of meta-llama/Llama-3.2-1B as published (transformers 4 spelling).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
}


def test_config_from_published_llama32_json():
    from inference_service.models.config import RopeScaling, config_from_hf

    c = config_from_hf(LLAMA_32_1B)
    assert c.rope_theta == 500000.0 and c.tie_word_embeddings and not c.attention_bias
    assert c.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert (c.num_kv_heads, c.head_dim, c.eos_token_ids) == (8, 64, (128001,))


def test_config_rope_matches_transformers_inv_freq():
    """Our llama3-scaled inverse frequencies equal transformers' own rope init."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from inference_service.models.config import config_from_hf
    from inference_service.models.rope import rope_inv_freq

    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**LLAMA_32_1B), "cpu")
    np.testing.assert_allclose(
        rope_inv_freq(config_from_hf(LLAMA_32_1B)), hf_inv.numpy(), rtol=1e-6
    )


def test_config_mistral_window_and_bad_rope():
    from inference_service.models.config import config_from_hf

    mistral = dict(LLAMA_32_1B, model_type="mistral", sliding_window=4096, rope_scaling=None)
    assert config_from_hf(mistral).max_position_embeddings == 4096
    yarn = dict(LLAMA_32_1B, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="unsupported rope scaling type 'yarn'"):
        config_from_hf(yarn)
    no_heads = {k: v for k, v in LLAMA_32_1B.items() if k != "num_attention_heads"}
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        config_from_hf(no_heads)
