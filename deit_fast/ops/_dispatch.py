"""The fused ops' custom ops, and the eager path around them.

Each fused op is a torch.library custom op pair (forward, backward) with fake impls and an
autograd formula: what torch.compile needs, one opaque node per call. In eager mode that
dispatch is host time the kernels do not need: with empty kernels, a class-attention fwd+bwd
took 161 us through the custom ops and 42 us through an autograd.Function holding the same
pieces (2 CPU cores, 2026-11-26; `python -m bench.overhead` measures the real ops). On the H200
our small ops were host-bound (README, Performance). So custom_op() keeps the plain function,
register_autograd() builds an autograd.Function twin from the same forward body, setup_context
and backward formula, and dispatch() calls the twin on plain tensors outside torch.compile.
"""
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str):
    """@custom_op("deit_fast::x") on a typed function: torch.library.custom_op(name), with the
    function kept as op.plain."""
    def wrap(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.plain, op.opname = fn, name
        return op
    return wrap


def register_autograd(op, backward: Callable, setup_context: Callable, stats: int = 0,
                      double_backward: bool = False) -> None:
    """op.register_autograd, and op.eager: an autograd.Function.apply with the same pieces.
    backward calls its backward op through backward_call(ctx, ...).

    double_backward: whether backward is itself differentiable (only the distillation loss's is).
    Otherwise the eager twin's backward is once_differentiable, so that a second derivative
    (create_graph=True) raises, as the custom op's does: the kernels' grads would otherwise come
    back as constants and the torch ops around them differentiable, a silently partial result.

    stats: how many trailing outputs are saved statistics (lse, mean, rstd) that nothing
    differentiates. Autograd would hand backward a zero tensor for each (a launch and an
    allocation per call, 5 per DeiT block); backward gets None for them instead, and zeros only
    for a main output nothing used (the last block's residual stream)."""
    if stats:
        setup_context, backward = _without_stat_grads(setup_context, backward, stats)
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):
        device = args[0].device.type
        if torch.is_autocast_enabled(device):  # a custom op's body runs below autocast too
            with torch.autocast(device, enabled=False):
                output = op.plain(*args)
        else:
            output = op.plain(*args)
        setup_context(ctx, args, output)
        ctx.eager = True
        return output

    # Named after the op, so that a grad_fn reads e.g. deit_fast_attention_eagerBackward.
    name = op.opname.replace("::", "_") + "_eager"
    twin = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(
                                                        backward if double_backward
                                                        else once_differentiable(backward))})
    op.eager = twin.apply


def _without_stat_grads(setup_context: Callable, backward: Callable, stats: int):
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)
        ctx.main_outputs = [(o.shape, o.dtype, o.device) for o in output[:len(output) - stats]]

    def grad(ctx, *grads):
        main = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                for g, (shape, dtype, device) in zip(grads, ctx.main_outputs)]
        return backward(ctx, *main, *grads[len(main):])
    return setup, grad


def dispatch(op, first: torch.Tensor, *args):
    """op(first, *args): the custom op while torch.compile traces or on tensor subclasses (fake,
    functional: other tracers), its eager twin on plain tensors."""
    if torch.compiler.is_compiling() or type(first) not in _PLAIN:
        return op(first, *args)
    return op.eager(first, *args)


def backward_call(ctx, op) -> Callable:
    """What a backward formula calls for its backward op: the plain function under the eager
    twin, the custom op under the custom op's own autograd (torch.compile, opcheck)."""
    return op.plain if getattr(ctx, "eager", False) else op
