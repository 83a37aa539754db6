"""The in-process generate API and `kuiper generate --local`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from models_util import build_llama2, hf_greedy

import inference_service.llm as llm_module
from inference_service.config import EngineConfig
from inference_service.llm import LLM
from inference_service.sampling.params import SamplingParams
from kuiper_serve.cli.main import main as kuiper_main

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, hf = build_llama2(tmp_path_factory.mktemp("llm") / "m")
    return LLM(folder, device="cpu"), hf


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return LLM(smollm2_gguf, device="cpu")


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 256, n).tolist()


def test_greedy_ids_match_transformers(tiny):
    llm, hf = tiny
    ids = prompt(0, 12)
    assert llm.generate_ids(ids, GREEDY) == hf_greedy(hf, ids, 24)


def test_long_prompt_is_prefilled_in_chunks(tiny):
    llm, hf = tiny
    ids = prompt(1, 40)
    # 7 tokens per engine step: the 40-token prompt takes 6 prefill steps
    with LLM(
        llm.model.source, config=EngineConfig(max_batch_size=4, max_num_batched_tokens=7)
    ) as small:
        assert small.generate_ids(ids, GREEDY) == hf_greedy(hf, ids, 24)


def test_batch_width_is_the_servers_default(tiny):
    """kuiper generate --local runs LLM(model, device): as wide a batch as the server's default
    (the backend's widest, at most the KV pool's blocks), not EngineConfig's 32."""
    from inference_service.engine_core.build import default_max_batch_size

    llm, _ = tiny
    assert llm.engine.config.max_batch_size == default_max_batch_size(llm.engine.backend) == 32
    # a one-context KV pool of 16 tokens in blocks of 8: 2 blocks, so 2 sequences at most
    with LLM(llm.model.source, device="cpu", max_context=16, block_size=8) as narrow:
        assert narrow.engine.backend.num_blocks == 2
        assert narrow.engine.config.max_batch_size == 2
        assert narrow.config.max_batch_size == 2
    # an explicit config keeps its own width
    with LLM(llm.model.source, config=EngineConfig(max_batch_size=4)) as given:
        assert given.engine.config.max_batch_size == 4


def test_a_list_of_prompts_runs_batched(tiny):
    llm, hf = tiny
    prompts = [prompt(10 + i, 5 + 3 * i) for i in range(5)]
    sizes: list[int] = []
    llm.engine.add_stats_listener(lambda stats: sizes.append(stats.batch_size))
    done = llm.generate(prompts, GREEDY)
    assert [c.token_ids for c in done] == [hf_greedy(hf, p, 24) for p in prompts]
    assert all(c.finish_reason == "length" and len(c.chunks) == 24 for c in done)
    assert max(sizes) == len(prompts)  # the engine ran them together
    # seeded sampling gives each prompt the same tokens batched as alone
    p = SamplingParams(temperature=1.0, top_k=20, seed=7, max_new_tokens=10, ignore_eos=True)
    batched = [c.token_ids for c in llm.generate(prompts[:3], p)]
    assert batched == [llm.generate_ids(q, p) for q in prompts[:3]]


def test_eos_and_stop_token_ids(tiny):
    llm, hf = tiny
    ids = prompt(2, 10)
    free = hf_greedy(hf, ids, 24)
    # A stop id: the first token of the free run that repeats later, so it is not trivial.
    stop_at = free[5]
    first = free.index(stop_at)
    chunks = list(
        llm.generate(
            ids, SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=(stop_at,))
        )
    )
    assert [c.token_id for c in chunks] == free[: first + 1]
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])
    # EOS: treat that same id as the model's end-of-sequence.
    llm.eos_ids = frozenset({stop_at})
    try:
        chunks = list(llm.generate(ids, SamplingParams(temperature=0, max_new_tokens=24)))
        assert chunks[-1].finish_reason == "eos" and len(chunks) == first + 1
        ignored = llm.generate_ids(ids, GREEDY)
        assert ignored == free  # ignore_eos runs to max_new_tokens
    finally:
        llm.eos_ids = frozenset(llm.model.config.eos_token_ids)
    last = list(llm.generate(ids, GREEDY))[-1]
    assert last.finish_reason == "length"


def test_seeded_sampling_reproduces(tiny):
    llm, _ = tiny
    ids = prompt(3, 8)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_new_tokens=16, ignore_eos=True)
    a = llm.generate_ids(ids, p)
    assert a == llm.generate_ids(ids, p)
    other = SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_new_tokens=16, ignore_eos=True)
    assert llm.generate_ids(ids, other) != a


def test_streams_interleave_and_an_abandoned_one_is_aborted(tiny):
    llm, hf = tiny
    a_ids, b_ids = prompt(5, 6), prompt(6, 9)
    a, b = llm.generate(a_ids, GREEDY), llm.generate(b_ids, GREEDY)
    got_a = [next(a).token_id for _ in range(3)]
    got_b = [c.token_id for c in b]
    got_a += [c.token_id for c in a]
    assert (got_a, got_b) == (hf_greedy(hf, a_ids, 24), hf_greedy(hf, b_ids, 24))
    abandoned = llm.generate(a_ids, GREEDY)
    next(abandoned)
    abandoned.close()  # aborts the request: its KV blocks go back to the pool
    deadline = time.monotonic() + 30
    while llm.engine.block_manager.num_used_blocks:
        assert time.monotonic() < deadline, "the abandoned request kept its blocks"
        time.sleep(0.01)
    assert llm.generate_ids(a_ids, GREEDY) == got_a


def test_bad_requests(tiny):
    llm, _ = tiny
    with pytest.raises(ValueError, match="no tokenizer"):
        list(llm.generate("text needs a tokenizer", GREEDY))
    with pytest.raises(ValueError, match="context"):
        llm.generate(prompt(4, llm.max_context), GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([1, 999], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate([1, 2], SamplingParams(temperature=-1))
    # the served path's protobuf field is uint64: the in-process API refuses the same seeds
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed must be between 0 and 2\\*\\*64 - 1"):
            llm.generate([1, 2], SamplingParams(seed=seed))


@pytest.mark.slow
def test_chat_answer_is_sensible(smol):
    chunks = list(
        smol.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(temperature=0.0, max_new_tokens=48),
        )
    )
    text = "".join(c.text for c in chunks)
    assert "Paris" in text
    assert chunks[-1].finish_reason == "eos"  # the model ends its turn by itself
    # Streamed deltas add up to the tokenizer's decode of the ids (special tokens skipped).
    ids = [c.token_id for c in chunks]
    assert text == smol.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_stop_string_is_cut_from_the_text(smol):
    p = SamplingParams(temperature=0.0, max_new_tokens=48, stop=("Paris",))
    chunks = list(smol.chat([{"role": "user", "content": "What is the capital of France?"}], p))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert "Paris" not in text and "capital" in text


@pytest.fixture
def cli_uses_smol(smol, smollm2_gguf, monkeypatch):
    """The CLI's LLM(...) returns the already loaded SmolLM2 (loading is tested above), after
    checking it was asked for that model on the CPU."""

    def fake_llm(model, device):
        assert (str(model), device) == (str(smollm2_gguf), "cpu")
        return smol

    monkeypatch.setattr(llm_module, "LLM", fake_llm)


@pytest.mark.slow
@pytest.mark.usefixtures("cli_uses_smol")
def test_cli_local_json(smol, smollm2_gguf, capsys):
    argv = ["generate", "--local", "--model", str(smollm2_gguf), "--device", "cpu", "--json",
            "--temperature", "0", "--max-new-tokens", "12", "The capital of France is"]  # fmt: skip
    assert kuiper_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    expected = smol.generate_ids(smol.tokenizer.encode("The capital of France is"),
                                 SamplingParams(temperature=0, max_new_tokens=12))  # fmt: skip
    assert out["token_ids"] == expected
    assert out["text"] == smol.tokenizer.decode(expected, skip_special_tokens=True)
    assert out["finish_reason"] in ("length", "eos")


@pytest.mark.slow
@pytest.mark.usefixtures("cli_uses_smol")
def test_cli_local_streams_text(smollm2_gguf, capsys):
    argv = ["generate", "--local", "--model", str(smollm2_gguf), "--device", "cpu",
            "--temperature", "0", "--max-new-tokens", "8", "--stop", "\n",
            "The capital of France is"]  # fmt: skip
    assert kuiper_main(argv) == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_bad_model_is_one_clear_line(tmp_path, subprocess_env):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)  # header cut short
    for model in (bad, tmp_path / "missing.gguf"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "kuiper_serve.cli",
                "generate",
                "--local",
                "--model",
                str(model),
                "--device",
                "cpu",
                "hi",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            env=subprocess_env,
            timeout=120,
        )
        assert proc.returncode == 1  # docs/serving.md: a model that cannot load is 1
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(model.name) in lines[0], proc.stderr


def test_cli_names_flags_the_path_ignores(capsys):
    """--local runs in-process: the served path's flags would do nothing, and the reverse."""
    from kuiper_serve.cli.generate import unused_flags

    def parse(*argv: str):
        import argparse

        from kuiper_serve.cli.generate import register

        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        return parser.parse_args(["generate", *argv, "hi"])

    assert unused_flags(parse("--local", "--timeout", "5", "--tls")) == ["--timeout", "--tls"]
    assert unused_flags(parse("--local", "--model", "m.gguf", "--device", "cpu")) == []
    assert unused_flags(parse("--model", "m.gguf", "--device", "cpu")) == ["--model", "--device"]
    assert unused_flags(parse("--address", "h:1", "--timeout", "5")) == []
    # said once on stderr, before the run (here: a refused parameter, so nothing loads)
    assert kuiper_main(["generate", "--local", "--timeout", "5", "--top-p", "0", "hi"]) == 2
    err = capsys.readouterr().err
    assert "ignoring --timeout: only the served path (without --local) uses them" in err


def test_cli_bad_parameter(tmp_path, capsys):
    assert kuiper_main(["generate", "--local", "--top-p", "0", "hi"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_huge_max_new_tokens_stops_at_the_context_length(tiny):
    # In process, max_new_tokens is capped by the context (finish "length" there); asking for
    # 10**10 tokens once tried to allocate a 37 GiB history array.
    llm, _ = tiny
    ids = prompt(5, llm.max_context - 3)
    params = SamplingParams(temperature=0.0, max_new_tokens=10**10, ignore_eos=True)
    chunks = list(llm.generate(ids, params))
    assert chunks[-1].finish_reason == "length"
    assert len(ids) + len(chunks) == llm.max_context  # as served: the engine's length rule
