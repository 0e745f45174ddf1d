"""ops/_dispatch.py: eager calls run the custom ops' autograd.Function twins (less host time),
torch.compile and tensor subclasses the custom ops; both give the same values and grads."""
import torch

from deit_fast import ops
from tests.conftest import DEVICE


def layer_norm_and_grads(fn, x, w, b):
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, torch.ones_like(out))


def test_eager_twin_and_custom_op_agree():
    x = torch.randn(3, 7, 64, device=DEVICE)
    w, b = torch.rand(64, device=DEVICE), torch.randn(64, device=DEVICE)
    eager = lambda *t: ops.layer_norm(*t)  # noqa: E731
    with ops.use_backend("triton"):
        out = ops.layer_norm(x.requires_grad_(), w, b)
        assert "_eager" in type(out.grad_fn).__name__  # the twin, not the custom op's autograd
        compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
        for a, c in zip(layer_norm_and_grads(eager, x, w, b), layer_norm_and_grads(compiled, x, w, b)):
            assert torch.equal(a, c)


def test_twin_runs_below_autocast_as_the_custom_op_does():
    x, y = torch.randn(2, 5, 64, device=DEVICE), torch.randn(2, 5, 64, device=DEVICE)
    g, w, b = torch.rand(64, device=DEVICE), torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    fn = lambda *t: ops.layerscale_residual_layernorm(*t)  # noqa: E731
    with ops.use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager, compiled = fn(x, y, g, w, b), torch.compile(fn, backend="aot_eager", fullgraph=True)(x, y, g, w, b)
    assert [t.dtype for t in eager] == [t.dtype for t in compiled] == [torch.float32] * 2
    assert all(torch.equal(e, c) for e, c in zip(eager, compiled))
