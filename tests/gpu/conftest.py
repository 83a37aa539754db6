"""Fixtures shared by the GPU kernel tests."""

from __future__ import annotations

import pytest
from kernel_util import kernel_context


@pytest.fixture(scope="module")
def K():
    """(pycuda.driver, Kernels) with the device's context pushed for the module's tests."""
    with kernel_context() as k:
        yield k
