"""CUDA graphs for PyCUDA streams through cuda.bindings.driver (PyCUDA has no graph API):
capture whatever is launched on the stream, instantiate once, replay with one launch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _driver() -> Any:
    from cuda.bindings import driver

    return driver


def _check(result: Any, what: str) -> Any:
    """cuda.bindings calls return (CUresult, *values); raise on an error, return the values."""
    drv = _driver()
    if not isinstance(result, tuple):
        result = (result,)
    err, *values = result
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class CudaGraph:
    """One instantiated graph, replayed on a stream given by its raw handle."""

    def __init__(self, graph: Any, exec_: Any) -> None:
        self._graph = graph
        self._exec = exec_

    def launch(self, stream_handle: int) -> None:
        drv = _driver()
        _check(drv.cuGraphLaunch(self._exec, drv.CUstream(stream_handle)), "cuGraphLaunch")

    def close(self) -> None:
        drv = _driver()
        if self._exec is not None:
            drv.cuGraphExecDestroy(self._exec)
            drv.cuGraphDestroy(self._graph)
            self._exec = self._graph = None


def capture(stream_handle: int, record: Callable[[], None]) -> CudaGraph:
    """Capture the work `record()` launches on the stream (thread-local mode: other threads'
    CUDA calls are unaffected) and instantiate it."""
    drv = _driver()
    stream = drv.CUstream(stream_handle)
    mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    _check(drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
    try:
        record()
    except BaseException:
        res = drv.cuStreamEndCapture(stream)
        if res[0] == drv.CUresult.CUDA_SUCCESS and res[1] is not None:
            drv.cuGraphDestroy(res[1])
        raise
    graph = _check(drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
    exec_ = _check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
    return CudaGraph(graph, exec_)
