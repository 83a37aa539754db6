"""The standalone Python client distribution (clients/python, `kuiper-client`): it builds, its
only requirements are grpcio and protobuf, and installed into a fresh venv that holds nothing
else it talks to both live servers through every RPC, sync and asyncio, without importing any
server package. Oracles: the `tokenizers` library and HF transformers' greedy continuation."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from models_util import hf_greedy
from serving_stack import run_stack, tiny_model  # noqa: F401  (fixture)

CLIENT_DIR = REPO_ROOT / "clients" / "python"
SCRIPT = Path(__file__).resolve().parent / "standalone_client_check.py"
PROMPT = "the quick brown fox"
NEW_TOKENS = 8
SERVER_PACKAGES = ("tokenizer_service", "inference_service", "kuiper_serve", "numpy")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel ./clients/python` (no network: setuptools from this environment)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(CLIENT_DIR)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (whl,) = out.glob("kuiper_client-*.whl")
    return whl


def _dist_dir(dist: str) -> list[Path]:
    """The installed files and dist-info folder of `dist` in this environment."""
    d = importlib.metadata.distribution(dist)
    tops = {Path(str(f)).parts[0] for f in d.files or []}
    base = Path(d.locate_file(""))
    return [base / t for t in tops if (base / t).exists() and t != "__pycache__"]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel: Path) -> Path:
    """A venv with the wheel installed and, as its only other packages, links to this
    environment's grpcio, protobuf and typing-extensions (grpcio's one requirement): what
    `pip install kuiper-client` gives, without a trip to the package index."""
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())  # fmt: skip
    deps = root / "deps"
    (deps / "google").mkdir(parents=True)
    for dist in ("grpcio", "protobuf", "typing-extensions"):
        for path in _dist_dir(dist):
            if path.name == "google":  # a namespace package: link protobuf alone
                (deps / "google" / "protobuf").symlink_to(path / "protobuf")
            else:
                (deps / path.name).symlink_to(path)
    (site / "only-grpcio-protobuf.pth").write_text(f"{deps}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


def test_the_wheel_holds_the_client_and_the_stubs_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"kuiper", "kuiper_client"}
    for stub in ("inference_pb2.py", "inference_pb2_grpc.py", "tokenizer_pb2.py",
                 "tokenizer_pb2_grpc.py", "inference.proto", "tokenizer.proto"):  # fmt: skip
        assert f"kuiper/v1/{stub}" in names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = sorted(line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("Requires-Dist:"))  # fmt: skip
    assert [r.split(">")[0].split("=")[0] for r in requires] == ["grpcio", "protobuf"]


def test_nothing_under_clients_python_imports_a_server_package() -> None:
    import ast

    for path in (CLIENT_DIR / "kuiper_client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in {"kuiper", "kuiper_client", "grpc", "google", "__future__"} or (
                    top in sys.stdlib_module_names
                ), f"{path.name} imports {name}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fresh_venv_client_talks_to_both_services(tiny_model, fresh_venv: Path) -> None:  # noqa: F811
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(fresh_venv), "check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(fresh_venv), "list", "--format=json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert names == {"kuiper-client", "grpcio", "protobuf", "typing-extensions"}

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = shutil.copy(SCRIPT, fresh_venv.parent.parent)  # not beside the repo's code
    with run_stack(tiny_model) as stack:
        proc = subprocess.run(
            [str(fresh_venv), str(script), stack.address, stack.tokenizer.address, PROMPT,
             str(NEW_TOKENS)],
            capture_output=True, text=True, timeout=300, env=env, cwd=fresh_venv.parent,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    leaked = [m for m in result["modules"] if m.split(".")[0] in SERVER_PACKAGES]
    assert not leaked, f"the standalone client imported {leaked}"
    assert not any(str(REPO_ROOT) in p for p in result["path"]), result["path"]

    ref = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt_ids = ref.encode(PROMPT).ids
    for flavour in ("sync", "async"):
        r = result[flavour]
        assert r["health"] == ["SERVING", "SERVING"], flavour
        assert r["model_info"]["vocab_size"] == ref.get_vocab_size()
        assert r["model_info"]["architecture"] == "llama"
        info = r["tokenizer_info"]
        assert info["vocab_size"] == ref.get_vocab_size()
        assert info["backend"] == "hf-tokenizers" and info["has_chat_template"]
        assert r["encode"] == prompt_ids
        assert r["encode_batch"] == [ref.encode(t, add_special_tokens=False).ids
                                     for t in (PROMPT, "x")]  # fmt: skip
        assert r["decode"] == ref.decode(prompt_ids, skip_special_tokens=False)
        assert r["decode_batch"] == [PROMPT, "x"]
        gen = r["generate"]
        assert gen["token_ids"] == hf_greedy(hf, prompt_ids, NEW_TOKENS)
        assert gen["finish_reason"] == "length"
        assert gen["usage"]["prompt_tokens"] == len(prompt_ids)
        assert "".join(r["decode_stream"]) == ref.decode(gen["token_ids"])
        tmpl = r["chat_template"]
        assert tmpl["ids"] == ref.encode(tmpl["text"], add_special_tokens=False).ids
        assert PROMPT in tmpl["text"]
        assert r["chat_ids"] == hf_greedy(hf, tmpl["ids"], NEW_TOKENS)
        assert r["bad_decode"] == "INVALID_ARGUMENT"
