"""ops/_dispatch.py: eager calls run the custom ops' autograd.Function twins (less host time),
torch.compile and tensor subclasses the custom ops; both give the same values and grads."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deit_fast
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


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "cait_xxs24_224"])
def test_a_training_step_materialises_no_statistics_grads_and_copies_nothing(name):
    # lse, mean and rstd are outputs nothing differentiates: autograd must not hand each op call
    # a zero grad for them (a launch apiece). DeiT's one zero grad is its last block's residual
    # stream, which the head does not read. No copy either: o is token-major, the packed qkv
    # grad needs no stack, CaiT's patch tokens enter the blocks contiguous.
    extra = {"depth_token_only": 1} if name.startswith("cait") else {}
    model = deit_fast.create_model(name, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                   **extra).to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with ops.use_backend("triton"), _CountOps() as mode:
        model(x).sum().backward()
    zeros = {"deit_small_patch16_224": 1, "cait_xxs24_224": 0}[name]
    assert mode.counts["aten.zeros.default"] == zeros, mode.counts
    # (copy_ itself is not counted: the Triton interpreter moves its tensors with it.)
    for copy in ("aten.clone.default", "aten.stack.default"):
        assert mode.counts[copy] == 0, (copy, mode.counts)
