"""How many frontend processes a server runs (inference_service/frontends.py) and when it falls
back to one, saying why. The serving itself: tests/test_multi_frontend.py."""

from __future__ import annotations

import logging
import sys

import pytest

from inference_service import frontends
from inference_service.config import EngineConfig
from inference_service.frontends import default_frontends, multi_frontend_possible
from inference_service.server import ServerConfig, _may_run_several
from kuiper_serve.cli.main import main as kuiper_main


def test_default_is_one_on_the_cpu_and_gpu_frontends_within_the_cores():
    assert default_frontends("cpu", cpus=64) == 1
    assert default_frontends("NVIDIA H200", cpus=16) == frontends.GPU_FRONTENDS == 4
    assert default_frontends("NVIDIA H200", cpus=5) == 3  # the core and the tokenizer: 2
    assert default_frontends("NVIDIA H200", cpus=2) == 1


def test_several_frontends_need_linux_and_the_engine_process(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert multi_frontend_possible(2, "cpu", False)
    assert not multi_frontend_possible(1, "cuda", False)
    assert multi_frontend_possible(None, "cuda", False)  # the GPU default may be several
    assert not multi_frontend_possible(None, "cpu", False)
    assert not multi_frontend_possible(4, "cuda", True)  # --single-process
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not multi_frontend_possible(4, "cuda", False)


@pytest.mark.parametrize(
    ("platform", "single", "says"),
    [("darwin", False, "needs Linux"), ("linux", True, "--single-process runs one frontend")],
)
def test_the_fallback_to_one_frontend_is_logged(monkeypatch, caplog, platform, single, says):
    monkeypatch.setattr(sys, "platform", platform)
    cfg = ServerConfig(engine=EngineConfig(device="cpu"), frontends=3, single_process=single)
    with caplog.at_level(logging.WARNING, "kuiper.inference"):
        assert not _may_run_several(cfg)
    assert "--frontends 3" in caplog.text and says in caplog.text


def test_frontends_below_one_is_a_usage_error(capsys):
    assert kuiper_main(["serve-inference", "--frontends", "0"]) == 2
    assert "--frontends must be >= 1" in capsys.readouterr().err


def test_port_in_use_sees_a_listener_that_set_so_reuseport():
    """The probe binds without SO_REUSEPORT, so another server that set it (as several
    frontends do) still counts as taking the port; a closed port is free; 0 is never taken."""
    import socket

    from kuiper_serve.common.ports import port_in_use

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", 0)
