"""LayerScale residual: x + gamma * y with per-sample DropPath, the end of every block branch.

The kernel backends run behind the custom ops deit_fast::layerscale_residual and
deit_fast::layerscale_residual_backward, so torch.compile sees one opaque node per call (fake
impls give it shapes) and autograd needs no saved activations beyond y. The torch backend calls
reference.py directly, which autograd and torch.compile handle natively.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _checks, reference


def _result_dtype(x: Tensor, y: Tensor, gamma: Optional[Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, y.dtype)
    return dtype if gamma is None else torch.promote_types(dtype, gamma.dtype)


def _kernels(backend: str):
    if backend == "triton":
        from deit_fast.kernels import layerscale
        return layerscale.forward, layerscale.backward
    from deit_fast import _C  # noqa: F401  (registers torch.ops.deit_fast_C)
    ops = torch.ops.deit_fast_C

    def backward(dout, y, gamma, scale):
        dy, dgamma = ops.layerscale_residual_backward(dout, y, gamma, scale)
        return dy, (dgamma if gamma is not None else None)
    return (lambda x, y, gamma, scale, dtype: ops.layerscale_residual_forward(x, y, gamma, scale, dtype),
            backward)


@torch.library.custom_op("deit_fast::layerscale_residual", mutates_args=())
def _fused(x: Tensor, y: Tensor, gamma: Optional[Tensor], scale: Optional[Tensor],
           backend: str) -> Tensor:
    forward, _ = _kernels(backend)
    return forward(x, y, gamma, scale, _result_dtype(x, y, gamma))


@_fused.register_fake
def _(x, y, gamma, scale, backend):
    return x.new_empty(x.shape, dtype=_result_dtype(x, y, gamma))


@torch.library.custom_op("deit_fast::layerscale_residual_backward", mutates_args=())
def _fused_backward(dout: Tensor, y: Tensor, gamma: Optional[Tensor], scale: Optional[Tensor],
                    backend: str) -> Tuple[Tensor, Tensor]:
    _, backward = _kernels(backend)
    dy, dgamma = backward(dout, y, gamma, scale)
    # A custom op cannot return None: an empty tensor stands for "no gamma".
    return dy, dgamma if dgamma is not None else y.new_empty(0)


@_fused_backward.register_fake
def _(dout, y, gamma, scale, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format), (
        gamma.new_empty(gamma.shape) if gamma is not None else y.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, y, gamma, scale, backend = inputs
    ctx.save_for_backward(y, gamma, scale)
    ctx.backend, ctx.x_dtype = backend, x.dtype


def _backward(ctx, dout):
    y, gamma, scale = ctx.saved_tensors
    dy, dgamma = _fused_backward(dout, y, gamma, scale, ctx.backend)
    return dout.to(ctx.x_dtype), dy, (dgamma if gamma is not None else None), None, None


_fused.register_autograd(_backward, setup_context=_setup_context)


def check(x: Tensor, y: Tensor, gamma: Optional[Tensor], keep_mask: Optional[Tensor],
          keep_prob: float) -> None:
    _checks.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (rows, C) or (B, ..., C), got shape {tuple(x.shape)}")
    _checks.tensor("y", y)
    _checks.shape("y", y, x.shape, " (same as x)")
    if gamma is not None:
        _checks.tensor("gamma", gamma, dims=(1,))
        _checks.shape("gamma", gamma, (x.shape[-1],), " (C,)")
    if keep_mask is not None:
        _checks.tensor("keep_mask", keep_mask, dims=(1,), dtypes=None)
        _checks.shape("keep_mask", keep_mask, (x.shape[0],), " (one entry per sample)")
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
    _checks.same_device(x=x, y=y, gamma=gamma, keep_mask=keep_mask)


def layerscale_residual(x: Tensor, y: Tensor, gamma: Optional[Tensor],
                        keep_mask: Optional[Tensor] = None, keep_prob: float = 1.0) -> Tensor:
    """x + gamma * y * (keep_mask[b] / keep_prob), computed in fp32.

    x, y: (B, ..., C) or (rows, C), any strides; gamma: (C,) or None (no LayerScale);
    keep_mask: (B,) per-sample DropPath mask (bool or float) or None. The result has x's shape
    and the promoted dtype of x, y and gamma (fp32 under autocast with an fp32 gamma, as timm).
    """
    check(x, y, gamma, keep_mask, keep_prob)
    backend = _backend.resolve("layerscale_residual", x.device)
    if backend == "torch":
        return reference.layerscale_residual(x, y, gamma, keep_mask, keep_prob)
    _checks.kernel_dtypes(backend, x=x, y=y, gamma=gamma)
    scale = None if keep_mask is None else keep_mask.to(torch.float32) / keep_prob
    return _fused(x, y, gamma, scale, backend)


def layerscale_residual_layernorm(x: Tensor, y: Tensor, gamma: Optional[Tensor], weight: Tensor,
                                  bias: Tensor, eps: float = 1e-6, keep_mask: Optional[Tensor] = None,
                                  keep_prob: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(out, layer_norm(out)) with out = layerscale_residual(x, y, gamma, keep_mask, keep_prob)."""
    check(x, y, gamma, keep_mask, keep_prob)
    for name, t in (("weight", weight), ("bias", bias)):
        _checks.tensor(name, t, dims=(1,))
        _checks.shape(name, t, (x.shape[-1],), " (C,)")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    _backend.resolve("layerscale_residual_layernorm", x.device)
    out = layerscale_residual(x, y, gamma, keep_mask, keep_prob)
    return out, torch.nn.functional.layer_norm(out, (out.shape[-1],), weight, bias, eps)
