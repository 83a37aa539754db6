"""docs/clients.md: every code-generation command it shows runs as written (where its tools are
installed) and makes stubs for both services; the protos carry the generators' options."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "clients.md"
NODE_BIN = REPO_ROOT / "clients" / "node" / "node_modules" / ".bin"

# What a command needs besides itself, by the flag or word that shows it.
NEEDS = {
    "--go_out": "protoc-gen-go",
    "--go-grpc_out": "protoc-gen-go-grpc",
    "grpc_cpp_plugin": "grpc_cpp_plugin",
    "grpc_java_plugin": "grpc_java_plugin",
    "--prost_out": "protoc-gen-prost",
    "--tonic_out": "protoc-gen-tonic",
}


def _sections() -> dict[str, str]:
    """Each `## Language` section's ```bash block that generates code."""
    out = {}
    for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", DOC.read_text(), re.M | re.S):
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            if "protoc " in block or "proto-loader-gen-types" in block:
                out[title.strip()] = block
    return out


SECTIONS = _sections()


def test_the_doc_covers_the_languages_the_issue_names() -> None:
    for lang in ("Go", "C++", "Java", "Node.js and TypeScript", "Rust"):
        assert lang in SECTIONS, f"docs/clients.md has no generation command for {lang}"


@pytest.mark.parametrize("lang", sorted(SECTIONS))
def test_documented_generation_command_runs(lang: str, tmp_path: Path) -> None:
    block = SECTIONS[lang]
    tools = ["protoc"] if "protoc " in block else []
    tools += [tool for flag, tool in NEEDS.items() if flag in block]
    env = dict(os.environ)
    if "npx proto-loader-gen-types" in block:
        if not (NODE_BIN / "proto-loader-gen-types").exists():
            pytest.skip("clients/node/node_modules missing (npm install there; .ci/run does)")
        env["PATH"] = f"{NODE_BIN}{os.pathsep}{env['PATH']}"
        block = block.replace("npx proto-loader-gen-types", "proto-loader-gen-types")  # no fetch
    missing = [t for t in tools if shutil.which(t, path=env["PATH"]) is None]
    if missing:
        pytest.skip(f"{lang}: {', '.join(missing)} not installed")
    (tmp_path / "protos").symlink_to(REPO_ROOT / "protos")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"{lang}:\n{block}\n{proc.stdout}\n{proc.stderr}"
    generated = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert generated, f"{lang}: nothing written under out/"
    text = "\n".join(p.read_text(errors="replace") for p in generated)
    names = ["GenerateRequest", "SequenceIds"]
    if lang != "C#":  # protoc alone writes C# messages; Grpc.Tools makes the stubs
        names += ["InferenceService", "TokenizerService"]
    for name in names:
        assert name in text, f"{lang}: no generated code mentions {name}"


def test_protos_carry_the_code_generation_options() -> None:
    from kuiper.v1 import inference_pb2, tokenizer_pb2

    for mod in (inference_pb2, tokenizer_pb2):
        opts = mod.DESCRIPTOR.GetOptions()
        assert opts.go_package.endswith("/clients/go/kuiperv1;kuiperv1")
        assert opts.java_package == "dev.kuiper.v1" and opts.java_multiple_files
        assert opts.csharp_namespace == "Kuiper.V1"
