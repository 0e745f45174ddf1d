"""Test-suite setup: without a GPU the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before deit_fast is
imported, which is why it happens here at module level.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel tests run on the GPU when there is one, else on CPU tensors through the interpreter.
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from the same seed and the default backend."""
    import deit_fast.ops as ops
    torch.manual_seed(0)
    ops.set_backend("auto")
    yield
    ops.set_backend("auto")
