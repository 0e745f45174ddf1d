"""Triton kernels, one file per fused op; installed as deit_fast.kernels.

Only deit_fast.ops calls into here. Whether triton.jit built interpreted functions is fixed at
import (TRITON_INTERPRET=1 must be set before), so the op layer asks INTERPRETED, not the env.
"""
import triton

INTERPRETED = bool(triton.knobs.runtime.interpret)
