"""Self-attention: softmax(q k^T * scale) v over (B, H, N, D) tensors (DeiT, ViT).

The triton backend runs the flash kernels of kernels/attention.py behind the custom ops
deit_fast::attention / deit_fast::attention_backward; the forward also returns the per-row
log-sum-exp, which autograd saves instead of the N x N probabilities. The torch backend is SDPA.

The cuda backend runs the forward on csrc/attention.cu (tensor-core mma.sync, head dim 48 without
padding to 64) where that kernel applies: fp16/bf16, D in CUDA_HEAD_DIMS, N <= CUDA_MAX_N. Every
other case (fp32, other head dims, longer sequences) runs the Triton forward, and the backward is
always Triton's: the CUDA forward saves the same (o, lse) the Triton backward reads.

attention_qkv takes q, k, v packed as the qkv projection makes them, (B, N, 3, H, D), and its
grad is that one tensor, written by the kernels in place: three separate grads of views of one
projection cost autograd a stack and a reshape copy (two reads and writes of 3 B N C elements)
before the projection's backward, which is what timm's blocks pay.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks
from ._dispatch import backward_call, custom_op, dispatch, register_autograd


def check_qkv(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    """q (B, H, Nq, D), k and v (B, H, N, D), one device and dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, dims=(4,))
    _checks.shape("k", k, (*q.shape[:2], k.shape[2], q.shape[3]), " (B, H, N, D) matching q")
    _checks.shape("v", v, k.shape, " (same as k)")
    _checks.same_device(q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] == 0:
        raise ValueError("k must hold at least one key (N >= 1)")
    check_scale(scale)


def check_scale(scale: Optional[float]) -> None:
    if scale is not None:
        _checks.positive("scale", scale)


def check_head_dim(backend: str, q: Tensor, head_dims, name: str = "q") -> None:
    if q.shape[-1] not in head_dims:
        raise ValueError(f"{name} has head dim D={q.shape[-1]}; the {backend} kernels take D in "
                         f"{tuple(head_dims)}: use the torch backend")


# Where the cuda backend's forward is csrc/attention.cu; elsewhere it is the Triton kernel.
CUDA_DTYPES = (torch.float16, torch.bfloat16)  # mma.sync takes no fp32 (TF32 would lose accuracy)
CUDA_HEAD_DIMS = (48, 64)
CUDA_MAX_N = 1024  # the lengths it is tested and tuned at (ViTs up to 448 px)
# The CUDA forward's tiling: queries per CTA, 64 or 128 (4 or 8 warps), and key / value tiles in
# shared memory, 2 to 4. 128 reads each head's k and v from L2 half as often; 4 stages request
# all of k and v at N <= 256 up front. On an H200 (2026-11-27, bench/results/2026-11-27-nvidia-h200.md,
# bf16, graph replays) (128, 4) was the fastest of the five timed at all eight shapes, 3-6 %
# ahead of (64, 2) (e.g. 124.6 vs 132.2 us at 256x8x197x48, 105.7 vs 109.4 us at 256x6x197x64).
CUDA_BLOCK_M = 128
CUDA_STAGES = 4
# Queries each warp owns: 16, or 32 at CUDA_BLOCK_M 128 (4 warps, FlashAttention-2's split): each
# k / v fragment a warp reads from shared memory then feeds two MMAs, and the warp runs two
# independent MMA chains, at 168 registers (12 warps an SM) at D = 48. The ncu profile of the
# 16-row kernel (H200, 2026-11-27: bench/results/2026-11-27-nvidia-h200-ncu.md) shows it stalled
# mostly on dependent instructions ("wait") at 16 warps an SM. Not yet timed: bench.ops.attention
# times it as cuda_w32 (and cuda_w32_s3).
CUDA_ROWS_PER_WARP = 16


def uses_cuda_kernel(q: Tensor) -> bool:
    """Whether the cuda backend runs this forward on the CUDA kernel (else on Triton's)."""
    return q.dtype in CUDA_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS and q.shape[2] <= CUDA_MAX_N


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    from deit_fast import _C  # noqa: F401  (registers torch.ops.deit_fast_C)
    return torch.ops.deit_fast_C.attention_forward(q, k, v, scale, CUDA_BLOCK_M, CUDA_STAGES,
                                                   CUDA_ROWS_PER_WARP)


@custom_op("deit_fast::attention")
def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    if backend == "cuda" and uses_cuda_kernel(q):
        return _cuda_forward(q, k, v, scale)
    from deit_fast.kernels import attention
    return attention.forward(q, k, v, scale)


def outputs_fake(q: Tensor) -> Tuple[Tensor, Tensor]:
    """(o, lse) as the kernel backends give them, without triton: o (B, H, N, D) laid out
    (B, N, H, D) in memory (kernels.attention.token_major_empty, empty_outputs in
    csrc/attention.cu), lse (B, H, N) fp32 contiguous."""
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D)).transpose(1, 2), q.new_empty((B, H, N), dtype=torch.float32)


@_fused.register_fake
def _(q, k, v, scale, backend):
    return outputs_fake(q)


@custom_op("deit_fast::attention_backward")
def _fused_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                    scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    # Triton on every backend: o and lse have the same layout whichever forward made them.
    from deit_fast.kernels import attention
    return attention.backward(do, q, k, v, o, lse, scale)


@_fused_backward.register_fake
def _(do, q, k, v, o, lse, scale, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    do = _checks.int32_slices(do)
    return (*backward_call(ctx, _fused_backward)(do, q, k, v, o, lse, ctx.scale, ctx.backend), None, None)


register_autograd(_fused, _backward, _setup_context, stats=1)


def split_qkv(qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3, H, D) -> q, k, v, each a (B, H, N, D) view."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def check_packed(qkv: Tensor, scale: Optional[float]) -> None:
    """check_qkv for q, k, v packed in qkv (B, N, 3, H, D): one tensor, so shapes, dtype and
    device agree by construction (and the check needs no views, which cost host time)."""
    _checks.tensor("qkv", qkv, dims=(5,))
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), q, k and v packed on dim 2, got shape "
                         f"{tuple(qkv.shape)}")
    if qkv.shape[1] == 0:
        raise ValueError("qkv must hold at least one token (N >= 1)")
    check_scale(scale)


@custom_op("deit_fast::attention_qkv")
def _fused_qkv(qkv: Tensor, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    return _fused.plain(*split_qkv(qkv), scale, backend)


@_fused_qkv.register_fake
def _(qkv, scale, backend):
    return outputs_fake(split_qkv(qkv)[0])


@custom_op("deit_fast::attention_qkv_backward")
def _fused_qkv_backward(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, scale: float,
                        backend: str) -> Tensor:
    from deit_fast.kernels import attention
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    attention.backward(do, *split_qkv(qkv), o, lse, scale, out=split_qkv(dqkv))
    return dqkv


@_fused_qkv_backward.register_fake
def _(do, qkv, o, lse, scale, backend):
    return qkv.new_empty(qkv.shape)


def _setup_context_qkv(ctx, inputs, output):
    qkv, scale, backend = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.scale, ctx.backend = scale, backend


def _backward_qkv(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    do = _checks.int32_slices(do)
    return backward_call(ctx, _fused_qkv_backward)(do, qkv, o, lse, ctx.scale, ctx.backend), None, None


register_autograd(_fused_qkv, _backward_qkv, _setup_context_qkv, stats=1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """The torch backend: SDPA, with CUDA inputs whose base is off a 16-byte boundary copied
    first. torch 2.11's mem-efficient kernel picks its aligned variant from strides alone and
    faults on such a base in fp32 (pytorch/pytorch#183484; seen on an H200, 2026-11-26)."""
    if q.is_cuda and not torch.compiler.is_compiling():  # fake tensors have no data_ptr
        q, k, v = (t.clone() if t.data_ptr() % 16 else t for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def check_kernel(backend: str, q: Tensor, name: str = "q", keys: Optional[int] = None) -> None:
    """What the kernel backends take beyond the input checks: dtype, head dim and (keys: k's
    token count) Nq == N. q: any tensor whose last dim is the head dim."""
    from deit_fast.kernels.attention import HEAD_DIMS
    _checks.kernel_dtypes(backend, **{name: q})
    _checks.dot_dtype(backend, name, q)
    check_head_dim(backend, q, HEAD_DIMS, name)
    if keys is not None and q.shape[2] != keys:
        raise ValueError(f"q has {q.shape[2]} queries but k has {keys} keys; the {backend} "
                         "self-attention kernel takes Nq == N: use the torch backend")


def _kernel_scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v.

    q: (B, H, Nq, D); k, v: (B, H, N, D); strided views (e.g. of the qkv projection) are fine.
    scale defaults to D ** -0.5. Returns (B, H, Nq, D) in q's dtype; the kernel backends lay it out
    (B, Nq, H, D) in memory, as FlashAttention does, so that o.transpose(1, 2).reshape(B, Nq, H * D)
    is a view. The triton and cuda backends
    take Nq == N (self-attention), fp32/fp16/bf16 and D in kernels.attention.HEAD_DIMS; cuda runs
    the CUDA forward where uses_cuda_kernel(q) says so and Triton's otherwise (see the top).
    """
    check_qkv(q, k, v, scale)
    # checked before the empty shortcut: what a backend refuses must not depend on the batch size
    backend = _backend.fit("attention", q.device, lambda b: check_kernel(b, q, keys=k.shape[2]))
    if backend == "torch" or q.numel() == 0:  # empty: nothing to launch
        return sdpa(q, k, v, scale)
    q, k, v = map(_checks.int32_slices, (q, k, v))
    return dispatch(_fused, q, k, v, _kernel_scale(q, scale), backend)[0]


def attention_qkv(qkv: Tensor, scale: Optional[float] = None) -> Tensor:
    """attention(q, k, v) of the q, k, v packed in qkv (B, N, 3, H, D), the qkv projection's
    output as timm's blocks reshape it (a view is fine). Returns what attention() returns; on the
    kernel backends the grad of qkv is one tensor the kernels write directly (see the top), where
    unpacked q, k, v grads cost two extra copies of it.
    """
    check_packed(qkv, scale)
    backend = _backend.fit("attention", qkv.device, lambda b: check_kernel(b, qkv, "qkv"))
    if backend == "torch" or qkv.numel() == 0:  # empty: nothing to launch
        return sdpa(*split_qkv(qkv), scale)
    return dispatch(_fused_qkv, _checks.int32_slices(qkv), _kernel_scale(qkv, scale), backend)[0]
