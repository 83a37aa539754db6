"""The committed generated modules must equal what grpcio-tools makes from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

PROTO_DIR = REPO_ROOT / "protos"
sys.path.insert(0, str(PROTO_DIR))
from generate import PROTOS  # noqa: E402


def test_generated_modules_match_protos(tmp_path: Path) -> None:
    for proto in PROTOS:
        dest = tmp_path / proto
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROTO_DIR / proto, dest)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}"]
    cmd += [f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    subprocess.run(cmd + [str(tmp_path / p) for p in PROTOS], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert len(generated) == 6
    for rel in generated:
        fresh = (tmp_path / rel).read_text()
        committed = (PROTO_DIR / rel).read_text()
        assert fresh == committed, f"{rel} is stale: run `python protos/generate.py`"


def test_generated_modules_import() -> None:
    from kuiper.v1 import inference_pb2, inference_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

    assert inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"]
    assert inference_pb2_grpc.InferenceServiceStub and tokenizer_pb2_grpc.TokenizerServiceStub
