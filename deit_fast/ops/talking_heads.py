"""Talking-heads attention (CaiT): logits mixed across heads before the softmax, probabilities
after. The triton backend runs kernels/talking_heads.py (or, with its STRATEGY "chunked",
kernels/talking_heads_chunked.py) behind deit_fast::talking_heads_attention (+ its backward op);
autograd saves q, k, v and the per-row log-sum-exp, never an N x N tensor.
talking_heads_attention_qkv is the same on the packed qkv projection, with one grad tensor for
it (see ops.attention_qkv).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _checks, reference
from .attention import check_head_dim, check_packed, check_qkv, outputs_fake, split_qkv
from ._dispatch import backward_call, custom_op, dispatch, register_autograd


@custom_op("deit_fast::talking_heads_attention")
def _fused(q: Tensor, k: Tensor, v: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor,
           scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    # b_l is an input only so that autograd hands it a real zero grad (DDP wants every
    # parameter to receive one); the kernels never read it.
    from deit_fast.kernels import talking_heads
    return talking_heads.forward(q, k, v, w_l, w_w, b_w, scale)


@_fused.register_fake
def _(q, k, v, w_l, b_l, w_w, b_w, scale, backend):
    return outputs_fake(q)


@custom_op("deit_fast::talking_heads_attention_backward")
def _fused_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, w_l: Tensor, w_w: Tensor,
                    b_w: Tensor, lse: Tensor, scale: float,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from deit_fast.kernels import talking_heads
    return talking_heads.backward(do, q, k, v, w_l, w_w, b_w, lse, scale)


@_fused_backward.register_fake
def _(do, q, k, v, w_l, w_w, b_w, lse, scale, backend):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, w_l, w_w, b_w))


def _setup_context(ctx, inputs, output):
    q, k, v, w_l, b_l, w_w, b_w, scale, backend = inputs
    ctx.save_for_backward(q, k, v, w_l, w_w, b_w, output[1])
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, do, _dlse):
    dq, dk, dv, dw_l, dw_w, db_w = backward_call(ctx, _fused_backward)(
        _checks.int32_slices(do), *ctx.saved_tensors, ctx.scale, ctx.backend)
    return dq, dk, dv, dw_l, torch.zeros_like(db_w), dw_w, db_w, None, None


register_autograd(_fused, _backward, _setup_context, stats=1)


@custom_op("deit_fast::talking_heads_attention_qkv")
def _fused_qkv(qkv: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor, scale: float,
               backend: str) -> Tuple[Tensor, Tensor]:
    return _fused.plain(*split_qkv(qkv), w_l, b_l, w_w, b_w, scale, backend)


@_fused_qkv.register_fake
def _(qkv, w_l, b_l, w_w, b_w, scale, backend):
    return outputs_fake(split_qkv(qkv)[0])


@custom_op("deit_fast::talking_heads_attention_qkv_backward")
def _fused_qkv_backward(do: Tensor, qkv: Tensor, w_l: Tensor, w_w: Tensor, b_w: Tensor, lse: Tensor,
                        scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from deit_fast.kernels import talking_heads
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    *_, dw_l, dw_w, db_w = talking_heads.backward(do, *split_qkv(qkv), w_l, w_w, b_w, lse, scale,
                                                  out=split_qkv(dqkv))
    return dqkv, dw_l, dw_w, db_w


@_fused_qkv_backward.register_fake
def _(do, qkv, w_l, w_w, b_w, lse, scale, backend):
    return tuple(t.new_empty(t.shape) for t in (qkv, w_l, w_w, b_w))


def _setup_context_qkv(ctx, inputs, output):
    qkv, w_l, b_l, w_w, b_w, scale, backend = inputs
    ctx.save_for_backward(qkv, w_l, w_w, b_w, output[1])
    ctx.scale, ctx.backend = scale, backend


def _backward_qkv(ctx, do, _dlse):
    dqkv, dw_l, dw_w, db_w = backward_call(ctx, _fused_qkv_backward)(
        _checks.int32_slices(do), *ctx.saved_tensors, ctx.scale, ctx.backend)
    return dqkv, dw_l, torch.zeros_like(db_w), dw_w, db_w, None, None


register_autograd(_fused_qkv, _backward_qkv, _setup_context_qkv, stats=1)


def _backend_for(q: Tensor, k: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor,
                 name: str = "q") -> str:
    """Checks the mixing weights against q, k, v checked already (and a kernel backend's limits);
    returns the backend that runs them. name: what the caller calls q's tensor (q or qkv)."""
    heads = q.shape[1]
    for arg, t, shape in (("w_l", w_l, (heads, heads)), ("b_l", b_l, (heads,)),
                          ("w_w", w_w, (heads, heads)), ("b_w", b_w, (heads,))):
        _checks.tensor(arg, t)
        _checks.shape(arg, t, shape, f" for H={heads} heads")
    _checks.same_device(q=q, w_l=w_l, b_l=b_l, w_w=w_w, b_w=b_w)

    def check_kernel(backend: str) -> None:
        from deit_fast.kernels.talking_heads import HEAD_DIMS, MAX_HEADS
        _checks.kernel_dtypes(backend, q=q, w_l=w_l, b_l=b_l, w_w=w_w, b_w=b_w)
        _checks.dot_dtype(backend, name, q)
        check_head_dim(backend, q, HEAD_DIMS, name)
        if heads > MAX_HEADS:
            raise ValueError(f"q has H={heads} heads; the {backend} kernel holds all heads of a "
                             f"tile in registers and takes H <= {MAX_HEADS}: use the torch backend")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q has {q.shape[2]} queries but k has {k.shape[2]} keys; the "
                             f"{backend} kernel takes Nq == N: use the torch backend")
    return _backend.fit("talking_heads_attention", q.device, check_kernel)


def talking_heads_attention(q: Tensor, k: Tensor, v: Tensor, w_l: Tensor, b_l: Tensor,
                            w_w: Tensor, b_w: Tensor, scale: Optional[float] = None) -> Tensor:
    """q, k, v: (B, H, N, D); w_l, w_w: (H, H) head-mixing weights; b_l, b_w: (H,).

    S' = w_l . (q k^T * scale) + b_l ; P = softmax(S') ; out = (w_w . P + b_w) v.
    b_l shifts whole softmax rows, so it never changes the output and its grad is zero.
    The triton backend takes Nq == N, H <= 16 heads, D in kernels.talking_heads.HEAD_DIMS, and
    lays the (B, H, N, D) output out (B, N, H, D) in memory, as ops.attention does.
    """
    check_qkv(q, k, v, scale)
    backend = _backend_for(q, k, w_l, b_l, w_w, b_w)
    if backend == "torch" or q.numel() == 0:  # empty: nothing to launch
        return reference.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = map(_checks.int32_slices, (q, k, v))
    return dispatch(_fused, q, k, v, *map(_checks.dense, (w_l, b_l, w_w, b_w)), scale, backend)[0]


def talking_heads_attention_qkv(qkv: Tensor, w_l: Tensor, b_l: Tensor, w_w: Tensor, b_w: Tensor,
                                scale: Optional[float] = None) -> Tensor:
    """talking_heads_attention of the q, k, v packed in qkv (B, N, 3, H, D), the qkv
    projection's output as timm reshapes it; on the triton backend qkv's grad is one tensor the
    kernels write directly (see ops.attention_qkv)."""
    check_packed(qkv, scale)
    q, k, v = split_qkv(qkv)
    backend = _backend_for(q, k, w_l, b_l, w_w, b_w, name="qkv")
    if backend == "torch" or qkv.numel() == 0:  # empty: nothing to launch
        return reference.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return dispatch(_fused_qkv, _checks.int32_slices(qkv), *map(_checks.dense, (w_l, b_l, w_w, b_w)),
                    scale, backend)[0]
