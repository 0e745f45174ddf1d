"""LayerScale residual: x + gamma * y with per-sample DropPath, the end of every block branch;
fused with the LayerNorm that follows it; and a plain LayerNorm on the same kernel.

The kernel backends run behind torch.library custom ops (a forward and a backward op each), so
torch.compile sees one opaque node per call (fake impls give it shapes) and autograd saves only
what the kernels need (y, the block output, per-row mean and rstd). The torch backend calls
reference.py directly, which autograd and torch.compile handle natively.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _checks, reference
from ._dispatch import backward_call, custom_op, dispatch, register_autograd


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


@custom_op("deit_fast::layerscale_residual")
def _fused(x: Tensor, y: Tensor, gamma: Optional[Tensor], scale: Optional[Tensor],
           backend: str) -> Tensor:
    forward, _ = _kernels(backend)
    return forward(x, y, gamma, scale, _result_dtype(x, y, gamma))


@_fused.register_fake
def _(x, y, gamma, scale, backend):
    return x.new_empty(x.shape, dtype=_result_dtype(x, y, gamma))


@custom_op("deit_fast::layerscale_residual_backward")
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
    dy, dgamma = backward_call(ctx, _fused_backward)(dout, y, gamma, scale, ctx.backend)
    return dout.to(ctx.x_dtype), dy, (dgamma if gamma is not None else None), None, None


register_autograd(_fused, _backward, _setup_context)


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
    backend = _backend.fit("layerscale_residual", x.device,
                           lambda b: check_residual_kernel(b, x, y, gamma))
    if backend == "torch" or x.numel() == 0:  # empty: nothing to launch (refusals checked first)
        return reference.layerscale_residual(x, y, gamma, keep_mask, keep_prob)
    gamma = _checks.dense(gamma)
    scale = None if keep_mask is None else keep_mask.to(torch.float32) / keep_prob
    return dispatch(_fused, x, y, gamma, scale, backend)


def check_norm(weight: Tensor, bias: Tensor, eps: float, channels: int) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        _checks.tensor(name, t, dims=(1,))
        _checks.shape(name, t, (channels,), " (C,)")
    _checks.positive("eps", eps)


CUDA_LN_MAX_C = 8192  # kMaxC in csrc/layerscale_layernorm.cu


def check_residual_kernel(backend: str, x: Tensor, y: Tensor, gamma: Optional[Tensor]) -> None:
    """What layerscale_residual's kernel backends refuse on top of check()."""
    _checks.kernel_dtypes(backend, x=x, y=y, gamma=gamma)
    if backend == "triton":
        from deit_fast.kernels.layerscale import MAX_C
        if x.shape[-1] > MAX_C:
            raise ValueError(f"x has C={x.shape[-1]} channels; the triton kernel takes "
                             f"C <= {MAX_C}: use the torch backend")


def check_norm_kernel(backend: str, x: Tensor, **params: Optional[Tensor]) -> None:
    """What the LayerNorm kernel backends refuse on top of the input checks: dtypes, and rows
    wider than a program holds in registers."""
    _checks.kernel_dtypes(backend, x=x, **params)
    if backend == "cuda":
        limit = CUDA_LN_MAX_C
    else:
        from deit_fast.kernels.layerscale import LN_MAX_C as limit
    if x.shape[-1] > limit:
        raise ValueError(f"x has C={x.shape[-1]} channels; the {backend} LayerNorm kernels hold a "
                         f"row in registers and take C <= {limit}: use the torch backend")


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)  # custom ops cannot return None


# The cuda backend's residual + LayerNorm backward: with CUDA_PREFETCH a row's dout and y are
# requested (cp.async into shared memory) at the end of the row before, so each row waits for
# memory once instead of twice, where the kernel sat at 50-58 % of the HBM roofline (an H200,
# 2026-11-27). The same arithmetic in the same order. It applies where the rows take 16-byte
# vectors, C <= 4096 and y is fp16 or bf16 (mixed precision, 16-bit training); elsewhere it
# changes nothing. Off until bench.ops.layerscale_layernorm's cuda_prefetch has timed it.
CUDA_PREFETCH = False


def _ln_kernels(backend: str):
    """(forward, backward) of the residual + LayerNorm kernels, with the Triton functions'
    signatures (y None: a plain LayerNorm, see kernels/layerscale.py)."""
    if backend == "triton":
        from deit_fast.kernels import layerscale
        return layerscale.residual_layernorm_forward, layerscale.residual_layernorm_backward
    from deit_fast import _C  # noqa: F401  (registers torch.ops.deit_fast_C)
    ops = torch.ops.deit_fast_C

    def forward(x, y, gamma, scale, weight, bias, eps, out_dtype):
        if y is None:
            return (None,) + tuple(ops.layer_norm_forward(x, weight, bias, eps))
        return ops.layerscale_residual_layernorm_forward(x, y, gamma, scale, weight, bias, eps, out_dtype)

    def backward(dout, dnormed, out, y, gamma, scale, weight, mean, rstd, x_dtype):
        dnormed = dnormed.to(out.dtype)  # the extension takes grads in the outputs' dtype
        if y is None:
            dx, dweight, dbias = ops.layer_norm_backward(dnormed, out, weight, mean, rstd)
            return dx, None, None, dweight, dbias
        dx, dy, dgamma, dweight, dbias = ops.layerscale_residual_layernorm_backward(
            dout.to(out.dtype), dnormed, out, y, gamma, scale, weight, mean, rstd, x_dtype,
            CUDA_PREFETCH)
        return dx, dy, (dgamma if gamma is not None else None), dweight, dbias
    return forward, backward


@custom_op("deit_fast::layerscale_residual_layernorm")
def _fused_ln(x: Tensor, y: Tensor, gamma: Optional[Tensor], scale: Optional[Tensor], weight: Tensor,
              bias: Tensor, eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    forward, _ = _ln_kernels(backend)
    return forward(x, y, gamma, scale, weight, bias, eps, _result_dtype(x, y, gamma))


@_fused_ln.register_fake
def _(x, y, gamma, scale, weight, bias, eps, backend):
    dtype, rows = _result_dtype(x, y, gamma), x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@custom_op("deit_fast::layerscale_residual_layernorm_backward")
def _fused_ln_backward(dout: Tensor, dnormed: Tensor, out: Tensor, y: Tensor, gamma: Optional[Tensor],
                       scale: Optional[Tensor], weight: Tensor, mean: Tensor, rstd: Tensor,
                       x_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, backward = _ln_kernels(backend)
    dx, dy, dgamma, dweight, dbias = backward(dout, dnormed, out, y, gamma, scale, weight, mean, rstd,
                                              x_dtype)
    return dx, dy, _empty_if_none(dgamma, y), dweight, dbias


@_fused_ln_backward.register_fake
def _(dout, dnormed, out, y, gamma, scale, weight, mean, rstd, x_dtype, backend):
    return (out.new_empty(out.shape, dtype=x_dtype), y.new_empty(y.shape),
            _empty_if_none(gamma.new_empty(gamma.shape) if gamma is not None else None, y),
            weight.new_empty(weight.shape), weight.new_empty(weight.shape))


def _fused_ln_setup(ctx, inputs, output):
    x, y, gamma, scale, weight, bias, eps, backend = inputs
    out, _, mean, rstd = output
    ctx.save_for_backward(out, y, gamma, scale, weight, mean, rstd)
    ctx.backend, ctx.x_dtype = backend, x.dtype


def _fused_ln_grad(ctx, dout, dnormed, _dmean, _drstd):
    out, y, gamma, scale, weight, mean, rstd = ctx.saved_tensors
    dx, dy, dgamma, dweight, dbias = backward_call(ctx, _fused_ln_backward)(
        dout, dnormed, out, y, gamma, scale, weight, mean, rstd, ctx.x_dtype, ctx.backend)
    return dx, dy, (dgamma if gamma is not None else None), None, dweight, dbias, None, None


register_autograd(_fused_ln, _fused_ln_grad, _fused_ln_setup, stats=2)


def layerscale_residual_layernorm(x: Tensor, y: Tensor, gamma: Optional[Tensor], weight: Tensor,
                                  bias: Tensor, eps: float = 1e-6, keep_mask: Optional[Tensor] = None,
                                  keep_prob: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(out, layer_norm(out)) with out = layerscale_residual(x, y, gamma, keep_mask, keep_prob):
    the end of a block branch and the LayerNorm that opens the next one, in one pass.

    weight, bias: (C,) LayerNorm affine parameters. On the kernel backends the normalised output
    takes out's dtype; on torch it is whatever F.layer_norm gives (fp32 under autocast).
    """
    check(x, y, gamma, keep_mask, keep_prob)
    check_norm(weight, bias, eps, x.shape[-1])
    _checks.same_device(x=x, weight=weight, bias=bias)
    backend = _backend.fit("layerscale_residual_layernorm", x.device, lambda b: check_norm_kernel(
        b, x, y=y, gamma=gamma, weight=weight, bias=bias), width=x.shape[-1])
    if backend == "torch" or x.numel() == 0:  # empty: nothing to launch (refusals checked first)
        return reference.layerscale_residual_layernorm(x, y, gamma, weight, bias, eps, keep_mask,
                                                       keep_prob)
    gamma, weight, bias = (_checks.dense(t) for t in (gamma, weight, bias))
    scale = None if keep_mask is None else keep_mask.to(torch.float32) / keep_prob
    out, normed, _, _ = dispatch(_fused_ln, x, y, gamma, scale, weight, bias, eps, backend)
    return out, normed


@custom_op("deit_fast::layer_norm")
def _ln(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    forward, _ = _ln_kernels(backend)
    _, normed, mean, rstd = forward(x, None, None, None, weight, bias, eps, x.dtype)
    return normed, mean, rstd


@_ln.register_fake
def _(x, weight, bias, eps, backend):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


@custom_op("deit_fast::layer_norm_backward")
def _ln_backward(dnormed: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _, backward = _ln_kernels(backend)
    dx, _, _, dweight, dbias = backward(None, dnormed, x, None, None, None, weight, mean, rstd, x.dtype)
    return dx, dweight, dbias


@_ln_backward.register_fake
def _(dnormed, x, weight, mean, rstd, backend):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.backend = backend


def _ln_grad(ctx, dnormed, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = backward_call(ctx, _ln_backward)(dnormed, x, weight, mean, rstd, ctx.backend)
    return dx, dweight, dbias, None, None


register_autograd(_ln, _ln_grad, _ln_setup, stats=2)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim, for the places with no residual before it. x: (..., C)."""
    _checks.tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be (rows, C) or (B, ..., C), got shape {tuple(x.shape)}")
    check_norm(weight, bias, eps, x.shape[-1])
    _checks.same_device(x=x, weight=weight, bias=bias)
    backend = _backend.fit("layer_norm", x.device,
                           lambda b: check_norm_kernel(b, x, weight=weight, bias=bias))
    if backend == "torch" or x.numel() == 0:  # empty: nothing to launch (refusals checked first)
        return reference.layer_norm(x, weight, bias, eps)
    weight, bias = _checks.dense(weight), _checks.dense(bias)
    return dispatch(_ln, x, weight, bias, eps, backend)[0]
