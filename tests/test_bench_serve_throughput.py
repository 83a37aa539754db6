"""CI runs the serving-throughput benchmark in its short form: servers started by the bench,
streams from several client processes, the engine alone beside it; every stream must get all
its tokens (the bench exits 1 otherwise) and every row must carry the served/engine ratios.
It serves with two frontend processes (--frontends 2), so the flag's path is run too."""

from __future__ import annotations

import re
import subprocess
import sys

from servers import REPO_ROOT, server_env
from serving_stack import tiny_model  # noqa: F401  (fixture)


def test_serve_throughput_short(tiny_model):  # noqa: F811
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "serve_throughput.py"), "--short",
         "--model", str(tiny_model), "--frontends", "2"],
        capture_output=True, text=True, timeout=300, env=server_env(), cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    assert sorted(rows) == [1, 4, 16], run.stdout
    assert "frontends 2" in run.stdout
    for cells in rows.values():
        served_tps = float(cells[1].split()[0])
        engine_tps = float(cells[2].split()[0])
        ratio = float(cells[3].split()[0])
        assert served_tps > 0 and engine_tps > 0
        assert abs(ratio - served_tps / engine_tps) < 0.01 * ratio + 0.002
        # CPU use of the four server processes: two frontends, the engine in its own process
        assert re.search(r"tokenizer [0-9.]+ inference [0-9.]+ frontend1 [0-9.]+ engine [0-9.]+",
                         cells[4])  # fmt: skip
