"""Triton kernels, one file per fused op; installed as deit_fast.kernels.

Only deit_fast.ops calls into here. Whether triton.jit built interpreted functions is fixed at
import (TRITON_INTERPRET=1 must be set before), so the op layer asks INTERPRETED, not the env.
"""
import torch
import triton

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
