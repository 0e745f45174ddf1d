"""Fixtures of the CUDA extension's tier-2 tests (tests/aot/test_cuda_*.py), over tests/aot/extension.py.

so_path skips the tests that take it (directly or through ops / resource_usage) when deit_fast._C
was not built; test_cuda_extension.py::test_extension_is_built decides whether that is a failure."""
import pytest
import torch

from tests.aot import extension


@pytest.fixture(scope="module")
def so_path():
    return extension.so_path()


@pytest.fixture(scope="module")
def cuobjdump():
    return extension.cuobjdump()


@pytest.fixture(scope="module")
def resource_usage(so_path, cuobjdump):
    """extension.resource_usage of the built deit_fast._C (see extension.parse_resource_usage)."""
    return extension.resource_usage(so_path, cuobjdump)


@pytest.fixture(scope="module")
def ops(so_path):
    import deit_fast._C  # noqa: F401  (registers torch.ops.deit_fast_C)
    return torch.ops.deit_fast_C
