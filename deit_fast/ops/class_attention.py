"""Class-attention (CaiT): one query per (batch, head) against all N tokens.

The triton and cuda backends run behind two torch.library custom ops (forward, backward), so
torch.compile sees one opaque node per call (fake impls give it shapes and strides) and autograd
saves q, k, v, the output in fp32 and one fp32 log-sum-exp per (b, h). The backward's
delta = dO . O comes from that fp32 output: rounded to q's dtype, it cancelled badly against
dP_j where one key takes nearly all the weight. Both kernel backends take the same strided views
without a copy, give dk and dv the same layout and keep the log-sum-exp in log2 units. The
torch backend is SDPA (attention.sdpa), which autograd and torch.compile handle natively.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _checks
from .attention import check_qkv, sdpa
from ._dispatch import backward_call, custom_op, dispatch, register_autograd

HEAD_DIMS = (32, 48, 64, 80, 96, 128)  # what the kernels are compiled and tested for


def _grad_layout_fake(t: Tensor) -> Tensor:
    """The layout both kernel backends give dk and dv (kernels.class_attention._grad_layout and
    grad_layout in csrc/class_attention.cu), without importing triton."""
    B, H, N, D = t.shape
    if t.stride(1) < t.stride(2):
        return t.new_empty((B, N, H, D)).transpose(1, 2)
    return t.new_empty((B, H, N, D))


# The cuda backend's key loop: with CUDA_PREFETCH each pass requests the next pass's K and V rows
# (cp.async into shared memory) before it computes, so a block keeps two passes' loads in flight
# instead of one, where the kernels sit at 43-75 % of the HBM roofline (an H200, 2026-11-27).
# The same arithmetic in the same order; where k or v cannot take 16-byte vectors it changes
# nothing. Off until bench.ops.class_attention's cuda_prefetch has timed it.
CUDA_PREFETCH = False


def _cuda_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.deit_fast_C.class_attention_forward(q, k, v, scale, CUDA_PREFETCH)


def _cuda_backward(dout, q, k, v, out_f32, lse, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return torch.ops.deit_fast_C.class_attention_backward(dout, q, k, v, out_f32, lse, scale,
                                                          CUDA_PREFETCH)


def _kernels(backend: str):
    """(forward, backward) of a kernel backend: kernels/class_attention.py or csrc/class_attention.cu."""
    if backend == "triton":
        from deit_fast.kernels import class_attention
        return class_attention.forward, class_attention.backward
    from deit_fast import _C  # noqa: F401  (registers torch.ops.deit_fast_C)
    return _cuda_forward, _cuda_backward


@custom_op("deit_fast::class_attention")
def _fused(q: Tensor, k: Tensor, v: Tensor, scale: float,
           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (out in q's dtype, lse (B, H) fp32, out_f32: out in fp32)."""
    forward, _ = _kernels(backend)
    return forward(q, k, v, scale)


@_fused.register_fake
def _(q, k, v, scale, backend):
    B, H, _, D = q.shape
    return (q.new_empty((B, H, 1, D)), q.new_empty((B, H), dtype=torch.float32),
            q.new_empty((B, H, 1, D), dtype=torch.float32))


@custom_op("deit_fast::class_attention_backward")
def _fused_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out_f32: Tensor, lse: Tensor,
                    scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _, backward = _kernels(backend)
    return backward(dout, q, k, v, out_f32, lse, scale)


@_fused_backward.register_fake
def _(dout, q, k, v, out_f32, lse, scale, backend):
    return q.new_empty((q.shape[0], q.shape[1], 1, q.shape[3])), _grad_layout_fake(k), _grad_layout_fake(k)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    _, lse, out_f32 = output
    ctx.save_for_backward(q, k, v, out_f32, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, _dlse, _dout_f32):
    q, k, v, out_f32, lse = ctx.saved_tensors
    dq, dk, dv = backward_call(ctx, _fused_backward)(_checks.int32_slices(dout), q, k, v, out_f32,
                                                     lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


register_autograd(_fused, _backward, _setup_context, stats=2)


def check_kernel(backend: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    """What the kernel backends take on top of check_qkv: fp32/fp16/bf16 and the compiled head dims."""
    _checks.kernel_dtypes(backend, q=q, k=k, v=v)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"q has head dim D={q.shape[-1]}; the {backend} class-attention kernels take "
                         f"D in {HEAD_DIMS}: use the torch backend")


def class_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v for one query per (batch, head), accumulated in fp32.

    q: (B, H, 1, D); k, v: (B, H, N, D), any N >= 1; all three may be strided views (e.g. k, v of
    a (B, N, 2, H, D) projection, q a transposed (B, 1, H, D)). scale defaults to D ** -0.5.
    Returns (B, H, 1, D) in q's dtype. The kernel backends take fp32/fp16/bf16 and
    D in (32, 48, 64, 80, 96, 128); their grads are bitwise reproducible.
    """
    check_qkv(q, k, v, scale)
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query per head, shape (B, H, 1, D), got {tuple(q.shape)}")
    # checked before the empty shortcut: what a backend refuses must not depend on B
    backend = _backend.fit("class_attention", q.device, lambda b: check_kernel(b, q, k, v))
    if backend == "torch" or q.numel() == 0:  # empty: nothing to launch
        return sdpa(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = map(_checks.int32_slices, (q, k, v))
    return dispatch(_fused, q, k, v, scale, backend)[0]
