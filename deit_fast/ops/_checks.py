"""Input checks shared by the ops. Each raises ValueError naming the argument, before any launch."""
import math
from typing import Iterable, Optional

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPES = FLOATS  # what the Triton and CUDA kernels take
TORCH_DTYPES = FLOATS + (torch.float64,)  # the reference also runs in fp64 (the test spec)


def tensor(name: str, t, dims: Optional[Iterable[int]] = None, dtypes=TORCH_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in tuple(dims):
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def shape(name: str, t: Tensor, expected, what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{what}, got {tuple(t.shape)}")


FP32 = torch.finfo(torch.float32)


def positive(name: str, value) -> None:
    """A positive float that stays finite and nonzero in fp32, where the kernels take it (a
    softmax scale, an eps, a temperature): inf passed a `> 0` test and gave non-finite outputs,
    and so did 1e39 (inf in fp32); 1e-39 is subnormal, flushed to 0 on the GPU."""
    try:  # a bool is an int to float(): True passed as 1.0
        ok = (not isinstance(value, bool) and math.isfinite(float(value))
              and FP32.tiny <= float(value) <= FP32.max)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive float within fp32's normal range "
                         f"[{FP32.tiny:.3g}, {FP32.max:.3g}], got {value!r}")


def dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """t with contiguous memory (itself if it has it). For the parameters the kernels read as flat
    arrays (gamma, LayerNorm weight and bias, head-mixing weights): a strided or expanded view
    (w.t(), p[:, 0], x.expand(C)) was read as if dense, wrong values without an error. A copy
    of a parameter costs nothing next to a kernel, and autograd takes the grad back through it."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def int32_slices(t: Tensor) -> Tensor:
    """t, or a contiguous copy when one batch element of it spans 2^31 elements or more. The
    attention kernels address within a batch element in int32 (int64 only across the batch), where
    the registers and instructions count (an int64 _gemm took 72 -> 96 registers); views whose
    inner strides span the batch (a sequence-major projection of ~5000+ images) would overflow."""
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n > 0)
    return t if span < 2 ** 31 else t.contiguous()


def same_device(**tensors: Optional[Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}")


def kernel_dtypes(backend: str, **tensors: Optional[Tensor]) -> None:
    """The kernels compute in fp32 from fp32/fp16/bf16 storage; fp64 is the reference's alone."""
    for n, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{n} dtype {t.dtype} is not supported by the {backend} backend "
                             f"(fp32, fp16, bf16); use the torch backend for it")


def dot_dtype(backend: str, name: str, t: Tensor) -> None:
    """For the kernels built on tl.dot (attention, talking heads): the Triton interpreter stores
    bf16 as raw 16-bit integers and its tl.dot multiplies those (triton-lang/triton#11584; the
    maintainers: not supported), so under TRITON_INTERPRET=1 bf16 would give garbage (~1e9)."""
    if t.dtype == torch.bfloat16:
        from deit_fast import kernels
        if kernels.INTERPRETED:
            raise ValueError(f"{name} is bfloat16, which the Triton interpreter (TRITON_INTERPRET=1) "
                             f"cannot multiply in the {backend} backend's attention kernels: use "
                             "float16 or float32 there, or a GPU without the interpreter")
