"""Triton's real launch path on a machine without a GPU: a stand-in for its CUDA driver reports
an sm_90 GPU (an H100: 227 KB of shared memory a block; or sm_80, an A100: 163 KB) and every
launch does nothing.

The ops' host code picks its tiles, Triton's JIT binds, specialises, compiles for that arch and
caches exactly as on the GPU; the tensors stay on the CPU and the kernels' outputs are left
unwritten. Two uses: tests/aot/launch_compiled.py compiles every kernel variant whole models
launch (shared memory, spills), and `python -m bench.overhead --stub-driver` times the host path
of our ops including Triton's own dispatch, which the interpreter would otherwise swamp.
Needs TRITON_INTERPRET unset (or 0) before deit_fast is imported.
"""
from typing import Callable, Optional

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import compiler
from triton.runtime import driver

MAX_SHARED = {90: 232448, 80: 166912}  # bytes a block may have (opt-in), per arch


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED[self.arch], "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads


class GpuWithoutLaunches:
    """The parts of triton.runtime.driver.active that compiling and launching touch."""

    def __init__(self, arch: int):
        self.arch, self.utils = arch, _Utils(arch)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return driver.default.map_python_to_cpp_type(ty)

    def launcher_cls(self, src, metadata):
        return lambda *args: None


def install(arch: int = 90, on_compiled: Optional[Callable] = None,
            on_launch: Optional[Callable] = None) -> None:
    """From now on Triton compiles for sm_`arch` and launches nothing; on_compiled(kernel) sees
    each CompiledKernel once, before its first launch, and on_launch(kernel, args) the arguments
    of each call of its launcher. The triton backend then takes CPU tensors (ops._backend would
    otherwise refuse them outside the interpreter)."""
    from deit_fast import kernels
    from deit_fast.ops import _backend
    if kernels.INTERPRETED:
        raise RuntimeError("the stub driver needs real Triton: unset TRITON_INTERPRET "
                           "(or set it to 0) before deit_fast is imported")
    driver.set_active(GpuWithoutLaunches(arch))

    def init_handles(self):  # CompiledKernel._init_handles: once per kernel, before a launch
        if on_compiled is not None:
            on_compiled(self)
        self.module = 1
        self._run = (lambda *args: on_launch(self, args)) if on_launch else (lambda *args: None)
    compiler.CompiledKernel._init_handles = init_handles
    _backend._availability[("triton", "cpu")] = None
