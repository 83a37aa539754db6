"""Runs the Node client's own test suite (`npm test` in clients/node): the @kuiper/client package
against the real tokenizer and inference servers, checked against the `tokenizers` library."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


def _skip_reason() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed (Node.js >= 18 runs the client's tests)"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "clients/node/node_modules missing: run `npm install` in clients/node (.ci/run does)"
    return None


def failures(tap: str, context: int = 40) -> str:
    """The TAP lines of every failed subtest (the whole output is too long to show)."""
    lines = tap.splitlines()
    picked = ["\n".join(lines[i : i + context]) for i, line in enumerate(lines) if "not ok" in line]
    return "\n...\n".join(picked) or tap[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_node_client_suite() -> None:
    env = dict(os.environ, KUIPER_PYTHON=sys.executable)
    proc = subprocess.run(
        ["npm", "test", "--silent"],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"npm test failed:\n{failures(out)}\n{proc.stderr[-3000:]}"
    # node --test writes TAP when stdout is not a terminal.
    counts = {
        k: int(v) for k, v in re.findall(r"^# (pass|fail|cancelled|skipped) (\d+)$", out, re.M)
    }
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, out[-3000:]
    if counts.get("pass", 0) == 0:
        reasons = sorted(set(re.findall(r"# SKIP (.+)$", out, re.M)))
        pytest.skip(f"every Node suite skipped: {'; '.join(reasons) or 'no tests ran'}")
