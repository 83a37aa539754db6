"""`kuiper export` (int8 / bf16 folders), quantized-in-memory loading, and the import of files
written in the ancestor's (KuiperLLama's) exporter layouts — each against transformers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from models_util import BUILDERS, VOCAB, _common, _save, hf_greedy, hf_logits, write_gguf

from inference_service.backends.base import BatchItem
from inference_service.backends.numpy_backend import NumpyBackend
from inference_service.models import load_model
from inference_service.models.quantized import Int8Weight, Q4Weight
from inference_service.quant.export import export_model
from inference_service.quant.int8 import choose_group
from inference_service.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
IDS = np.random.default_rng(7).integers(3, VOCAB, 24).tolist()


def our_logits(model, ids: list[int]) -> np.ndarray:
    """Logits at every position (one prefill per prefix length would be slow: use teacher
    forcing through decode steps after a prefill of the first token)."""
    backend = NumpyBackend(model, num_blocks=16, block_size=4)
    table = list(range(16))
    rows = [backend.logits([BatchItem(0, np.array(ids[:1], np.int32), 0, table)])[0]]
    for pos in range(1, len(ids)):
        item = BatchItem(0, np.array([ids[pos]], np.int32), pos, table)
        rows.append(backend.logits([item])[0])
    return np.stack(rows)


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    backend = NumpyBackend(model, num_blocks=16, block_size=4)
    table = list(range(16))
    out = backend.step([BatchItem(0, np.array(ids, np.int32), 0, table, GREEDY)])
    tokens = [out[0].token_id]
    for step in range(n - 1):
        item = BatchItem(0, np.array([tokens[-1]], np.int32), len(ids) + step, table, GREEDY)
        tokens.append(backend.step([item])[0].token_id)
    return tokens


def hf_with_weights(hf, weights: dict[str, np.ndarray]):
    """A copy of an HF model whose tensors are replaced (the oracle for quantized values)."""
    import copy

    import torch

    clone = copy.deepcopy(hf)
    state = clone.state_dict()
    with torch.no_grad():
        for name, arr in weights.items():
            state[name].copy_(torch.from_numpy(np.array(arr, np.float32)))
    return clone


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    folder, hf = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    return request.param, folder, hf


@pytest.mark.parametrize("group", [64, 128])
def test_int8_export_loads_quantized_and_matches_transformers(tiny, tmp_path, group):
    name, folder, hf = tiny
    out = tmp_path / "int8"
    summary = export_model(folder, out, "int8", group, progress=False)
    assert summary.written_bytes < 0.3 * summary.source_bytes
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "kuiper-int8"

    model = load_model(out, keep_quantized=True)
    assert model.dtype == "int8"
    q = model.weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, Int8Weight) and q.q.dtype == np.int8
    assert q.group == choose_group(model.config.hidden_size, group)  # 64 | 96 backs off
    assert isinstance(model.weights["model.embed_tokens.weight"], Int8Weight)
    assert model.weights["model.norm.weight"].dtype == np.float32

    got = our_logits(model, IDS)
    # Tight: transformers running exactly the int8 values (dequantized) — the kernels and
    # the loader add only fp32 rounding.
    deq = {
        n: (w.dequantize() if isinstance(w, Int8Weight) else w) for n, w in model.weights.items()
    }
    if model.config.tie_word_embeddings:
        deq["lm_head.weight"] = deq["model.embed_tokens.weight"]
    exact = hf_logits(hf_with_weights(hf, deq), IDS)
    np.testing.assert_allclose(got, exact, atol=2e-4 * np.abs(exact).max(), rtol=0)
    # Stated tolerance against the original fp32 model: int8 moves the logits by at most
    # 3 % of their range, and the greedy choice at >= 90 % of positions.
    ref = hf_logits(hf, IDS)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_bf16_export_is_a_plain_checkpoint_transformers_loads(tiny, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    name, folder, hf = tiny
    out = tmp_path / "bf16"
    export_model(folder, out, "none", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = our_logits(load_model(out), IDS)
    np.testing.assert_allclose(ours, hf_logits(theirs, IDS), atol=1e-4 * np.abs(ours).max(), rtol=0)
    ref = hf_logits(hf, IDS)
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()  # bf16 rounding only


def test_int8_export_opens_in_safetensors(tiny, tmp_path):
    from safetensors import safe_open

    _, folder, _ = tiny
    export_model(folder, tmp_path / "o", "int8", 64, progress=False)
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "np") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        assert f.metadata()["kuiper_quant"] == "int8"
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "I8"
    assert dtypes["model.layers.0.mlp.down_proj.weight_scale"] == "F16"
    assert dtypes["model.layers.0.input_layernorm.weight"] == "F32"


def test_export_refuses_a_non_empty_folder(tiny, tmp_path):
    _, folder, _ = tiny
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        export_model(folder, tmp_path / "x", "int8", progress=False)
    with pytest.raises(ValueError, match="group size"):
        export_model(folder, tmp_path / "y", "int8", 32, progress=False)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0"])
def test_gguf_kept_quantized_runs_like_the_dequantized_model(tmp_path, qtype):
    """The CPU path with GGUF blocks in memory equals the float32 path on the same file
    (including llama's Q/K row un-permutation, done on whole quantized rows)."""
    folder, hf = BUILDERS["llama2"](tmp_path / "m")
    path = write_gguf(hf, tmp_path / "m.gguf", qtype)
    kept = load_model(path, keep_quantized=True)
    kind = Int8Weight if qtype == "Q8_0" else Q4Weight
    assert isinstance(kept.weights["model.layers.1.self_attn.k_proj.weight"], kind)
    flat = load_model(path)
    a, b = our_logits(kept, IDS), our_logits(flat, IDS)
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=0)


# ---------------------------------------------------------------------------- ancestor files
# The writer below follows KuiperLLama's tools/export.py and tools/export_qwen2.py:
# `legacy_export` (float32, 7-int header) and `legacy_export_quant` (int8, 8-int header).


def _meta_order(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows → Meta / llama2.c interleaved rows (export.py's permute_reverse)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _q80(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_q80 of the exporter: scale = max|w| / 127 per group (fp32), q = round(w / s)."""
    g = w.astype(np.float32).reshape(-1, group)
    scale = np.abs(g).max(axis=1) / np.float32(127.0)
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q, scale.astype(np.float32)


def write_ancestor(hf, path, quant: bool, interleaved: bool, group: int = 64) -> dict:
    """Write `hf` as the ancestor exporter would; return the weights it implies (HF names,
    HF row order), i.e. the int8 values dequantized, for the oracle."""
    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    n, dim = cfg.num_hidden_layers, cfg.hidden_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    shared = bool(cfg.tie_word_embeddings)
    qwen = cfg.model_type == "qwen2"
    vocab = cfg.vocab_size if shared else -cfg.vocab_size
    header = [dim, cfg.intermediate_size, n, heads, kv_heads, vocab, cfg.max_position_embeddings]
    implied = dict(sd)

    def layer(i, s):
        return sd[f"model.layers.{i}.{s}"]

    def mat(i, s):
        w = layer(i, s + ".weight")
        if interleaved and s in ("self_attn.q_proj", "self_attn.k_proj"):
            w = _meta_order(w, heads if s == "self_attn.q_proj" else kv_heads)
        return w

    order = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.down_proj",
        "mlp.up_proj",
    ]  # wq wk wv wo w1 w2 w3
    with open(path, "wb") as f:
        if quant:
            f.write(struct.pack("<8i", *header, group))
            for s in order:
                for i in range(n):
                    q, scale = _q80(mat(i, s), group)
                    f.write(q.tobytes())
                    f.write(scale.tobytes())
                    back = (q.astype(np.float32) * scale[:, None]).reshape(
                        layer(i, s + ".weight").shape
                    )
                    if interleaved and s in ("self_attn.q_proj", "self_attn.k_proj"):
                        h = heads if s == "self_attn.q_proj" else kv_heads
                        back = back.reshape(h, back.shape[0] // h // 2, 2, -1).swapaxes(1, 2)
                        back = back.reshape(layer(i, s + ".weight").shape)
                    implied[f"model.layers.{i}.{s}.weight"] = back
            if not shared:
                q, scale = _q80(sd["lm_head.weight"], group)
                f.write(q.tobytes())
                f.write(scale.tobytes())
                implied["lm_head.weight"] = (q.astype(np.float32) * scale[:, None]).reshape(
                    sd["lm_head.weight"].shape)  # fmt: skip
            f.write(sd["model.embed_tokens.weight"].tobytes())
            for i in range(n):
                f.write(layer(i, "input_layernorm.weight").tobytes())
            for i in range(n):
                f.write(layer(i, "post_attention_layernorm.weight").tobytes())
            f.write(sd["model.norm.weight"].tobytes())
            if qwen:  # the int8 layout has no biases; the ancestor runs without them
                for i in range(n):
                    for s in ("q", "k", "v"):
                        implied[f"model.layers.{i}.self_attn.{s}_proj.bias"] *= 0
        else:
            f.write(struct.pack("<7i", *header))
            f.write(sd["model.embed_tokens.weight"].tobytes())
            for i in range(n):
                f.write(layer(i, "input_layernorm.weight").tobytes())
            for s in order[:4]:
                for i in range(n):
                    f.write(mat(i, s).tobytes())
                    if qwen and s != "self_attn.o_proj":
                        f.write(layer(i, s + ".bias").tobytes())
            for i in range(n):
                f.write(layer(i, "post_attention_layernorm.weight").tobytes())
            for s in order[4:]:
                for i in range(n):
                    f.write(mat(i, s).tobytes())
            f.write(sd["model.norm.weight"].tobytes())
            half = dim // heads // 2
            f.write(np.zeros(2 * cfg.max_position_embeddings * half, np.float32).tobytes())
            if not shared:
                f.write(sd["lm_head.weight"].tobytes())
    return implied


def _ancestor_hf(arch: str, tmp_path, tied: bool):
    """Tiny HF models with the ancestor's fixed settings per family."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    if arch == "qwen2":
        cfg = Qwen2Config(**_common(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied))
        return _save(Qwen2ForCausalLM(cfg), tmp_path / arch, 3)[1]
    theta = 1e4 if arch == "llama2" else 5e5
    cfg = LlamaConfig(**_common(rope_theta=theta, tie_word_embeddings=tied))
    return _save(LlamaForCausalLM(cfg), tmp_path / arch, 3)[1]


@pytest.mark.parametrize(
    "arch,quant,tied",
    [("llama2", False, False), ("llama2", True, True), ("llama3", True, False),
     ("qwen2", False, True), ("qwen2", True, False)],
)  # fmt: skip
def test_ancestor_file_generates_the_source_weights_tokens(tmp_path, arch, quant, tied):
    hf = _ancestor_hf(arch, tmp_path, tied)
    path = tmp_path / "model.bin"
    implied = write_ancestor(hf, path, quant, interleaved=arch == "llama2")
    oracle = hf_with_weights(hf, implied) if quant else hf
    explicit = None if arch == "llama2" or (arch == "qwen2" and not quant) else arch
    from inference_service.models.ancestor import load_ancestor

    model = load_ancestor(path, explicit, keep_quantized=True)
    assert model.dtype == ("int8" if quant else "float32")
    assert model.config.tie_word_embeddings == tied
    if quant:
        assert isinstance(model.weights["model.layers.0.mlp.up_proj.weight"], Int8Weight)
    want = hf_greedy(oracle, IDS, 12)
    assert our_greedy(model, IDS, 12) == want
    # load_model finds the layout by itself (family: llama2 unless q/k/v biases are there).
    if explicit is None:
        assert our_greedy(load_model(path), IDS, 12) == want


def test_ancestor_import_through_export(tmp_path):
    """kuiper export turns an ancestor int8 file + a tokenizer into a servable folder."""
    from tokenizer_models import build_hf_bpe

    hf = _ancestor_hf("llama3", tmp_path, tied=False)
    path = tmp_path / "m.bin"
    implied = write_ancestor(hf, path, quant=True, interleaved=False)
    tok_dir = build_hf_bpe(tmp_path / "tok")
    out = tmp_path / "out"
    export_model(path, out, "int8", 64, tokenizer=tok_dir / "tokenizer.json",
                 ancestor_arch="llama3", progress=False)  # fmt: skip
    assert (out / "tokenizer.json").is_file()
    model = load_model(out, keep_quantized=True)
    # Re-quantizing the ancestor's int8 values (fp32 scales) with fp16 scales keeps tokens.
    assert our_greedy(model, IDS, 12) == hf_greedy(hf_with_weights(hf, implied), IDS, 12)


def test_ancestor_file_of_the_wrong_size_is_refused(tmp_path):
    from inference_service.models.ancestor import load_ancestor
    from inference_service.models.config import ModelLoadError

    hf = _ancestor_hf("llama2", tmp_path, tied=False)
    path = tmp_path / "m.bin"
    write_ancestor(hf, path, quant=False, interleaved=True)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ModelLoadError, match="fit neither"):
        load_ancestor(cut)
    with pytest.raises(ModelLoadError, match="not a GGUF file, an HF model folder"):
        load_model(cut)


def test_cuda_weight_arena_takes_quantized_weights(tiny, tmp_path):
    """The CUDA backend fills its bf16 arena from an int8 model's dequantized values (host
    side only: the arena plan and the bytes each entry uploads)."""
    from inference_service.backends.cuda.arena import plan_arena

    _, folder, _ = tiny
    export_model(folder, tmp_path / "q", "int8", 64, progress=False)
    kept = load_model(tmp_path / "q", keep_quantized=True)
    flat = load_model(tmp_path / "q")
    a, total_a = plan_arena(kept.config, kept.weights)
    b, total_b = plan_arena(flat.config, flat.weights)
    assert total_a == total_b and [e.name for e in a] == [e.name for e in b]
    for ea, eb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ea.build(), eb.build())


@pytest.mark.slow
def test_kuiper_export_of_the_default_gguf_ships_its_tokenizer(smollm2_gguf, tmp_path):
    """`kuiper export` of the real SmolLM2 GGUF: the written tokenizer.json encodes as the GGUF
    vocabulary does (the tokenizer service's reference), chat template included."""
    from kuiper_serve.cli.main import main
    from tokenizer_service.tokenizer import load_tokenizer

    out = tmp_path / "smol"
    assert main(["export", str(smollm2_gguf), str(out), "--quant", "int8", "--quiet"]) == 0
    ours, ref = load_tokenizer(out), load_tokenizer(smollm2_gguf)
    text = "Hello world! The café costs 3.50€ — 日本語 <|im_start|>user\nHi<|im_end|>"
    assert ours.encode(text) == ref.encode(text)
    assert (ours.bos_id, ours.eos_id, ours.chat_template) == (
        ref.bos_id,
        ref.eos_id,
        ref.chat_template,
    )
    model = load_model(out, keep_quantized=True)
    assert model.config.vocab_size == 49152 and model.dtype == "int8"


def test_quant_bench_counts_the_weights_the_backend_holds(tiny, tmp_path):
    """bench/quant.py's held_bytes: the float32 backend holds 4 bytes per parameter of the
    transformers model (tied embeddings once), and an int8 export's quantized backend holds
    int8 values plus per-group scales (between 1/4 and 35 % of that)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "quant.py"
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    _, folder, hf = tiny
    fp32 = bench.held_bytes(NumpyBackend(load_model(folder), num_blocks=4, block_size=4))
    assert fp32 == 4 * hf.num_parameters()
    export_model(folder, tmp_path / "q", "int8", 64, progress=False)
    quant = NumpyBackend(load_model(tmp_path / "q", keep_quantized=True), 4, 4)
    assert fp32 / 4 < bench.held_bytes(quant) <= 0.35 * fp32
