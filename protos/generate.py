"""Regenerate the committed Python modules from the .proto files.

Run after editing a .proto: `python protos/generate.py`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ["kuiper/v1/tokenizer.proto", "kuiper/v1/inference.proto"]


def main() -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}"]
    cmd += [f"--{kind}_out={PROTO_DIR}" for kind in ("python", "pyi", "grpc_python")]
    subprocess.run(cmd + [str(PROTO_DIR / p) for p in PROTOS], check=True)


if __name__ == "__main__":
    main()
