"""CUDA graphs through cuda.bindings (PyCUDA has no graph API): capture whatever is launched on
a stream, instantiate once, replay with one launch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cuda_kernels.loader import check_result, cu_driver


class CudaGraph:
    """One instantiated graph, replayed on a stream (a cuda.bindings CUstream)."""

    def __init__(self, graph: Any, exec_: Any) -> None:
        self._graph = graph
        self._exec = exec_

    def launch(self, stream: Any) -> None:
        check_result(cu_driver().cuGraphLaunch(self._exec, stream), "cuGraphLaunch")

    def close(self) -> None:
        drv = cu_driver()
        if self._exec is not None:
            drv.cuGraphExecDestroy(self._exec)
            drv.cuGraphDestroy(self._graph)
            self._exec = self._graph = None


def capture(stream: Any, record: Callable[[], None]) -> CudaGraph:
    """Capture the work `record()` launches on the stream (thread-local mode: other threads'
    CUDA calls are unaffected) and instantiate it."""
    drv = cu_driver()
    mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    check_result(drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
    try:
        record()
    except BaseException:
        res = drv.cuStreamEndCapture(stream)
        if res[0] == drv.CUresult.CUDA_SUCCESS and res[1] is not None:
            drv.cuGraphDestroy(res[1])
        raise
    graph = check_result(drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
    exec_ = check_result(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
    return CudaGraph(graph, exec_)


def stream_capturing(stream: Any) -> bool:
    """Whether a CUDA graph capture is in progress on the stream (a CUstream)."""
    drv = cu_driver()
    status = check_result(drv.cuStreamIsCapturing(stream), "cuStreamIsCapturing")
    return status != drv.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE
