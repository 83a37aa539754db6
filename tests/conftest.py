"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Re-exported: tests import REPO_ROOT and free_port from here as well as from servers.
from servers import REPO_ROOT, free_port  # noqa: F401


@pytest.hookimpl(tryfirst=True)  # before -m deselects: see below
def pytest_collection_modifyitems(config, items):
    # Long reliability runs only when asked for (-m long); CI runs the short mode.
    # `pytest -m long tests/reliability` is the suite's long mode: every reliability test runs
    # (scaled up where it reads reliability_util.long_mode), not only those marked long.
    if "long" in (config.getoption("-m") or ""):
        for item in items:
            if "reliability" in item.path.parts:
                item.add_marker(pytest.mark.long)
    else:
        skip_long = pytest.mark.skip(reason="long run: select it with -m long")
        for item in items:
            if item.get_closest_marker("long"):
                item.add_marker(skip_long)
    # GPU tests run by hand on a GPU machine; everywhere else they skip with the reason.
    try:
        import pycuda.driver as cuda  # noqa: F401

        cuda.init()
        has_gpu = cuda.Device.count() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and pycuda; run tests/gpu on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model (fetched once into $KUIPER_HOME or the user cache)."""
    from kuiper_serve.common.model_source import fetch_default_model

    return fetch_default_model(quiet=True)
