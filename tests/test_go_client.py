"""The Go client (clients/go): its generated code is what protoc makes from the protos, and its
example builds and talks to both live servers. Oracles: the `tokenizers` library for encode and
decode, HF transformers' greedy continuation for the generated ids."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

GO_DIR = REPO_ROOT / "clients" / "go"
GENERATED = sorted((GO_DIR / "kuiperv1").glob("*.pb.go"))
PROMPT = "the quick brown fox"
NEW_TOKENS = 12

needs_go = pytest.mark.skipif(
    shutil.which("go") is None,
    reason="the go command is missing (Debian: golang-go golang-google-grpc-dev "
    "golang-google-protobuf-dev; .ci/run installs them)",
)


def _tool_version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True).stdout + " "
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None


def test_generated_go_code_matches_the_protos(tmp_path: Path) -> None:
    assert len(GENERATED) == 4, "clients/go/kuiperv1 should hold 2 .pb.go + 2 _grpc.pb.go"
    header = (GO_DIR / "kuiperv1" / "inference.pb.go").read_text()
    want = {
        "protoc": re.search(r"//\s+protoc\s+v(\S+)", header).group(1),
        "protoc-gen-go": re.search(r"//\s+protoc-gen-go\s+v(\S+)", header).group(1),
    }
    have = {
        "protoc": _tool_version(["protoc", "--version"]),
        "protoc-gen-go": _tool_version(["protoc-gen-go", "--version"]),
    }
    if shutil.which("protoc-gen-go-grpc") is None or have != want:
        pytest.skip(
            f"needs protoc {want['protoc']} + protoc-gen-go {want['protoc-gen-go']} + "
            f"protoc-gen-go-grpc (the versions the committed code came from); found {have}"
        )
    subprocess.run(["bash", str(GO_DIR / "generate.sh"), str(tmp_path)], check=True)
    for path in GENERATED:
        fresh = (tmp_path / "kuiperv1" / path.name).read_text()
        assert fresh == path.read_text(), f"{path.name} is stale: run clients/go/generate.sh"


def _greedy_oracle(model: Path, prompt_ids: list[int], n: int) -> list[int]:
    """HF transformers' greedy continuation, EOS ignored (as -ignore-eos asks)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example, built once (offline from Debian's Go packages where they are installed)."""
    binary = tmp_path_factory.mktemp("go") / "kuiper-example"
    build = subprocess.run(
        ["bash", str(GO_DIR / "build.sh"), str(binary)], capture_output=True, text=True, timeout=500
    )
    assert build.returncode == 0, f"go build failed:\n{build.stdout}\n{build.stderr}"
    return binary


@needs_go
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_go_example_encodes_streams_and_decodes(tiny_model, example: Path) -> None:  # noqa: F811
    from tokenizers import Tokenizer

    with run_stack(tiny_model) as stack:
        proc = subprocess.run(
            [str(example), "-address", stack.address, "-tokenizer-address",
             stack.tokenizer.address, "-max-new-tokens", str(NEW_TOKENS), "-ignore-eos",
             "-json", PROMPT],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    ref = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert out["prompt_ids"] == ref.encode(PROMPT).ids
    assert out["token_ids"] == _greedy_oracle(tiny_model, out["prompt_ids"], NEW_TOKENS)
    want_text = ref.decode(out["token_ids"], skip_special_tokens=False)
    assert out["decoded"] == want_text
    assert out["decode_stream"] == want_text
    assert out["text"] == ref.decode(out["token_ids"], skip_special_tokens=True)
    assert out["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == len(out["prompt_ids"])
    assert out["usage"]["completion_tokens"] == NEW_TOKENS


@needs_go
@pytest.mark.timeout(600)
def test_go_example_reports_an_unreachable_server(example: Path) -> None:
    """Exit code 1 and the gRPC status on stderr, no panic."""
    proc = subprocess.run(
        [str(example), "-tokenizer-address", "127.0.0.1:1", "-timeout", "5s", "hi"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("kuiper-example: Unavailable: "), proc.stderr
