"""Token-distillation loss (DeiT): cross-entropy on the class head + hard or soft KD on the
distillation head.

On the kernel backends (triton: kernels/distill_loss.py; cuda: csrc/distill_loss.cu, the same
contract) one kernel launch reads each row of logits, dist_logits and teacher_logits once and
writes the gradients w.r.t. both heads, and the last of its programs to finish sums the rows into
the loss and its two components (fp32, fixed order: deterministic). The backward is one launch
too, multiplying both saved gradients by the upstream gradient: no second pass over the logits.
So a training step spends two launches on the loss, at a size (B = 256, C = 1000) where launches
are most of its time. It runs behind the torch.library custom ops deit_fast::distillation_loss
and deit_fast::distillation_loss_backward (fake impls + autograd), so torch.compile(fullgraph=True)
traces it. The torch backend calls reference.py.
"""
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _backend, _checks, reference
from ._dispatch import backward_call, custom_op, dispatch, register_autograd

KINDS = ("none", "hard", "soft")
KL_REDUCTIONS = ("numel", "batchmean")


def _grad_dtype(head_dtype: torch.dtype) -> torch.dtype:
    # Kept in step with kernels/distill_loss.grad_dtype (not imported: triton may be missing).
    return torch.float32 if head_dtype == torch.float16 else head_dtype


def _kernels(backend: str):
    """(forward, backward) of a kernel backend: kernels/distill_loss.py or csrc/distill_loss.cu.
    forward(logits, dist_logits, target, teacher_logits, kind, alpha, tau, label_smoothing,
    kl_reduction, grad_logits, grad_dist, tickets) -> (loss, parts, rows, dlogits, ddist);
    backward(dlogits, ddist, dloss, logits_dtype, dist_dtype) -> (dlogits, ddist) scaled by dloss
    (see kernels/distill_loss.forward and backward)."""
    if backend == "cuda":
        from deit_fast import _C  # noqa: F401  (registers torch.ops.deit_fast_C)
        ops = torch.ops.deit_fast_C
        return ops.distillation_loss_forward, ops.distillation_loss_backward
    from deit_fast.kernels import distill_loss
    return distill_loss.forward, distill_loss.backward


# The kernels' ticket counters: a launch needs an int32 at 0 that no concurrent launch shares, and
# leaves it at 0. Eager launches share one per (device, stream): launches on one stream are
# ordered. A launch captured into a CUDA graph gets one of its own for good, from a slab made with
# the first eager counter of its device: a graph may be replayed on another stream than it was
# captured on, alongside eager launches there. (Without a slab, before any eager launch on the
# device or once 1024 captured launches have used it up, a captured launch zeroes a counter of
# the graph's own: one more node per replay.)
_TICKETS = {}  # (device, stream) -> its counter
_SLABS = {}  # cuda device -> [slab of counters for captured launches, how many are handed out]
_SLAB = 1024


def _tickets(device: torch.device) -> Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        slab = _SLABS.get(device)
        if slab is None or slab[1] == _SLAB:
            return torch.zeros(1, dtype=torch.int32, device=device)
        slab[1] += 1
        return slab[0][slab[1] - 1:slab[1]]
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    tickets = _TICKETS.get((device, stream))
    if tickets is None:
        if device.type == "cuda" and device not in _SLABS:
            _SLABS[device] = [torch.zeros(_SLAB, dtype=torch.int32, device=device), 0]
        tickets = _TICKETS[device, stream] = torch.zeros(1, dtype=torch.int32, device=device)
    return tickets


# Few arguments on purpose: torch.library re-reads the schema once per argument on every call
# (utils.fill_defaults, quadratic in their number), which is CPU time at DeiT's batch, where the
# whole loss is a few microseconds of GPU work. scalars: (alpha, tau, label_smoothing);
# grads: whether to write d/d logits and d/d dist_logits; backend: "triton" or "cuda".
@custom_op("deit_fast::distillation_loss")
def _fused(logits: Tensor, dist_logits: Optional[Tensor], target: Tensor,
           teacher_logits: Optional[Tensor], kind: str, kl_reduction: str, scalars: List[float],
           grads: List[bool], backend: str = "triton") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss () fp32, components (2,) fp32: base and distill, saved dlogits, saved ddist); a
    saved grad is empty when not asked for. See kernels/distill_loss (csrc/distill_loss.cu is its
    twin)."""
    alpha, tau, label_smoothing = scalars
    loss, parts, _, ds, dd = _kernels(backend)[0](
        logits, dist_logits, target, teacher_logits, kind, alpha, tau, label_smoothing,
        kl_reduction, grads[0], grads[1], _tickets(logits.device))
    return loss, parts, ds, dd


@_fused.register_fake
def _(logits, dist_logits, target, teacher_logits, kind, kl_reduction, scalars, grads,
      backend="triton"):
    ds = (logits.new_empty(logits.shape, dtype=_grad_dtype(logits.dtype)) if grads[0]
          else logits.new_empty(0))
    dd = (logits.new_empty(logits.shape, dtype=_grad_dtype(dist_logits.dtype))
          if grads[1] and kind != "none" else logits.new_empty(0))
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty(2, dtype=torch.float32),
            ds, dd)


@custom_op("deit_fast::distillation_loss_backward")
def _fused_backward(dlogits: Tensor, ddist: Tensor, dloss: Tensor, logits_dtype: torch.dtype,
                    dist_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor]:
    """The saved grads (either empty for a head that needs none) times dloss, in the heads'
    dtypes: one launch for both."""
    return _kernels(backend)[1](dlogits, ddist, dloss, logits_dtype, dist_dtype)


@_fused_backward.register_fake
def _(dlogits, ddist, dloss, logits_dtype, dist_dtype, backend):
    return dlogits.new_empty(dlogits.shape, dtype=logits_dtype), ddist.new_empty(ddist.shape, dtype=dist_dtype)


def _setup_context(ctx, inputs, output):
    logits, dist_logits, *_, backend = inputs
    _, parts, ds, dd = output
    ctx.save_for_backward(ds, dd)
    ctx.dtypes = (logits.dtype, dist_logits.dtype if dist_logits is not None else logits.dtype)
    ctx.backend = backend
    # The components are for logging and the saved grads are results, not functions of the
    # inputs to differentiate: no grads flow back through them (and none are materialised).
    ctx.mark_non_differentiable(parts, ds, dd)
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, _dparts, _dds, _ddd):
    ds, dd = ctx.saved_tensors
    need = ctx.needs_input_grad
    want = (need[0] and ds.numel() > 0, need[1] and dd.numel() > 0)
    if dloss is None or not any(want):
        return (None,) * 9
    if dloss.requires_grad and torch.is_grad_enabled():  # a double backward: the differentiable form
        grads = [(g * dloss).to(dtype) if w else None for g, w, dtype in zip((ds, dd), want, ctx.dtypes)]
    else:
        grads = backward_call(ctx, _fused_backward)(ds if want[0] else ds.new_empty(0),
                                                    dd if want[1] else dd.new_empty(0), dloss,
                                                    *ctx.dtypes, ctx.backend)
    # target and teacher_logits get no grad (the teacher is frozen; the target is data).
    return (grads[0] if want[0] else None, grads[1] if want[1] else None) + (None,) * 7


register_autograd(_fused, _backward, _setup_context, double_backward=True)


def check(logits, dist_logits, target, teacher_logits, kind, alpha, tau, label_smoothing,
          kl_reduction, check_target: bool = True) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    _checks.tensor("logits", logits, dims=(2,))
    batch, classes = logits.shape
    if kind != "none":
        _checks.tensor("dist_logits", dist_logits, dims=(2,))
        _checks.shape("dist_logits", dist_logits, logits.shape, " (same as logits)")
        if teacher_logits is None:
            raise ValueError(f"teacher_logits is required for kind={kind!r}")
        _checks.tensor("teacher_logits", teacher_logits, dims=(2,))
        _checks.shape("teacher_logits", teacher_logits, logits.shape, " (same as logits)")
    _checks.tensor("target", target, dtypes=None)
    if target.is_floating_point():
        _checks.shape("target", target, logits.shape, " (soft targets, same as logits)")
    else:
        if target.dtype != torch.int64:
            raise ValueError(f"target must be int64 class indices or float soft targets, got {target.dtype}")
        _checks.shape("target", target, (batch,), " (one class index per row)")
        # Reading the range costs a device sync (one: both ends in one copy), and torch.compile
        # cannot trace the data-dependent branch: compiled code skips it, and the kernel then
        # turns an out-of-range class into a nan loss without reading outside the row.
        if check_target and target.numel() and not torch.compiler.is_compiling():
            lo, hi = torch.stack(torch.aminmax(target)).tolist()
            if lo < 0 or hi >= classes:
                raise ValueError(f"target holds class indices outside [0, {classes}): "
                                 f"min {lo}, max {hi}")
    _checks.same_device(logits=logits, dist_logits=dist_logits if kind != "none" else None,
                        target=target, teacher_logits=teacher_logits if kind != "none" else None)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _checks.positive("tau", tau)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _reference_with_components(logits, dist_logits, target, teacher_logits, kind, alpha, tau,
                               label_smoothing, kl_reduction) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, base, distill) from reference.distillation_loss alone: kind "none" is the base;
    alpha = 1 gives 0 * base + distill, i.e. the distillation term (its base on detached logits,
    so that no gradient flows through the spare copy)."""
    base = reference.distillation_loss(logits, dist_logits, target, teacher_logits, "none", alpha,
                                       tau, label_smoothing, kl_reduction)
    if kind == "none":
        return base, base.detach(), torch.zeros_like(base)
    distill = reference.distillation_loss(logits.detach(), dist_logits, target, teacher_logits, kind,
                                          1.0, tau, label_smoothing, kl_reduction)
    loss = (1 - alpha) * base + alpha * distill  # the reference's own last line
    return loss, base.detach(), distill.detach()


def check_kernel(backend: str, logits, dist_logits, target, teacher_logits, kind: str) -> None:
    """What the kernel backends refuse on top of check(): grads they would drop, and dtypes."""
    if torch.is_grad_enabled():  # the kernels give these no grad: say so rather than drop it
        for name, t in (("teacher_logits", teacher_logits if kind != "none" else None),
                        ("target", target if target.is_floating_point() else None)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but the {backend} backend gives it none "
                                 "(the teacher is frozen, targets are data): detach it, or use "
                                 "the torch backend")
    heads = dict(logits=logits)
    if kind != "none":
        heads.update(dist_logits=dist_logits, teacher_logits=teacher_logits)
    _checks.kernel_dtypes(backend, target=target if target.is_floating_point() else None, **heads)


def distillation_loss(logits: Tensor, dist_logits: Optional[Tensor], target: Tensor,
                      teacher_logits: Optional[Tensor] = None, kind: str = "hard",
                      alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0,
                      kl_reduction: str = "numel", return_components: bool = False,
                      check_target: bool = True) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """(1 - alpha) * CE(logits, target) + alpha * KD(dist_logits, teacher_logits); an fp32 scalar
    (fp64 when the torch backend is given fp64 inputs).

    logits, dist_logits, teacher_logits: (B, C), any float dtype each (fp32/fp16/bf16 on the
    kernel backends), any row stride. target: int64 (B,) classes (label_smoothing applies) or
    float (B, C) soft targets (mixup/cutmix). kind: "none" (base only; alpha, dist_logits and
    teacher_logits ignored) | "hard" (CE against argmax(teacher)) | "soft" (KL at temperature tau,
    times tau^2); kl_reduction: "numel" (official DeiT, KL sum / (B*C)) | "batchmean" (timm,
    KL sum / B). See reference.distillation_loss.

    return_components=True returns (loss, base, distill): the two terms before the alpha mix,
    detached (for logging; distill is 0 for kind "none"), from the same pass on the kernel path.

    check_target=False skips the range check of int64 targets, which reads them back from the
    device: a host sync on every call, which stalls a training loop's run-ahead. An out-of-range
    class then gives a nan loss on the kernel backends, without a read outside the row (the torch
    backend's cross_entropy reports it itself). The trainer passes False: its labels come from the
    dataset its model was sized for.

    Gradients flow to logits and dist_logits only: on the kernel backends a target or
    teacher_logits that requires grad (with grad enabled) is refused, rather than left without.
    The kernel backends compute them in the forward: they are saved in the head's dtype (fp32 for fp16
    heads, whose range the 1/B-scaled grads underflow) and the backward only rescales them.
    """
    check(logits, dist_logits, target, teacher_logits, kind, alpha, tau, label_smoothing,
          kl_reduction, check_target)
    # refusals before the empty shortcut: they don't depend on B
    backend = _backend.fit("distillation_loss", logits.device, lambda b: check_kernel(
        b, logits, dist_logits, target, teacher_logits, kind))
    if backend == "torch" or logits.numel() == 0:  # an empty batch: the reference's nan, no launch
        if return_components:
            return _reference_with_components(logits, dist_logits, target, teacher_logits, kind,
                                              alpha, tau, label_smoothing, kl_reduction)
        return reference.distillation_loss(logits, dist_logits, target, teacher_logits, kind, alpha,
                                           tau, label_smoothing, kl_reduction)
    if kind == "none":
        dist_logits = teacher_logits = None
    grad = torch.is_grad_enabled()
    loss, parts, _, _ = dispatch(_fused, logits, dist_logits, target, teacher_logits, kind,
                                 kl_reduction, [float(alpha), float(tau), float(label_smoothing)],
                                 [grad and logits.requires_grad,
                                  grad and dist_logits is not None and dist_logits.requires_grad],
                                 backend)
    if return_components:
        base, distill = parts.unbind()
        return loss, base, distill
    return loss
