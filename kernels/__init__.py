"""Triton kernels, one file per fused op; installed as deit_fast.kernels.

Only deit_fast.ops calls into here. Whether triton.jit built interpreted functions is fixed at
import (TRITON_INTERPRET=1 must be set before), so the op layer asks INTERPRETED, not the env.
"""
import os

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

INTERPRETED = bool(triton.knobs.runtime.interpret)
# The input dtypes by the names aot_configs(dtype) and the AOT tools take.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# Host-side grid arithmetic for the launch wrappers. triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions: about 2 us per call from Python (triton 3.6 and 3.8, this machine), and
# the wrappers of one op call made up to 8 of them; these take 0.03 us.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


# Triton's launcher (triton 3.6 and 3.8, backends/nvidia/driver.py, getPointer) checks every
# tensor argument of every launch with the driver call cuPointerGetAttribute, and skips the check
# for an integer pointer. On the H100 machine of 2026-11-26 a Triton launch cost 10-20 us more
# host time per tensor argument than the same op's CUDA-extension launch, while the whole Python
# dispatch takes about 7 us on a 2-core CPU; bench/launch_cost.py tells whether the check is that
# cost. RAW_POINTERS (env DEIT_FAST_RAW_POINTERS=1) makes launch() hand the launcher the tensors'
# addresses instead: every op checks its tensors' devices before launching, so the driver's
# check only repeats ours. Its training-curve gpu test passed on an H200 (2026-11-27); off until
# a GPU run has measured the host time it saves.
RAW_POINTERS = os.environ.get("DEIT_FAST_RAW_POINTERS", "0") == "1"


def launch(kernel, grid: tuple, *args, **kwargs):
    """kernel[grid](*args, **kwargs), the launch every kernel wrapper makes. With RAW_POINTERS
    (never under the interpreter), Triton's JIT still binds, specialises (tensors' alignment
    included) and finds or compiles the kernel, then its launcher gets what kernel[grid] would
    hand it, but integer addresses for the tensors (tests/aot/launch_compiled.py --raw-pointers
    compares the two on the launcher's side, for every launch of whole models)."""
    if INTERPRETED or not RAW_POINTERS:
        return kernel[grid](*args, **kwargs)
    compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
    if compiled is None:  # a knobs.runtime.jit_cache_hook took the compile over
        return kernel[grid](*args, **kwargs)
    if hasattr(compiled, "result"):  # an asynchronous compile's future
        compiled = compiled.result()
    params = kernel.signature.parameters
    values = list(args) + [kwargs[name] if name in kwargs else params[name].default
                           for name in kernel.arg_names[len(args):]]
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    metadata = compiled.launch_metadata(grid, stream, *values)
    run = compiled.run  # first: initialises compiled.function on a kernel's first launch
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
        compiled.function, compiled.packed_metadata, metadata, knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook,
        *(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in values))
    return compiled
