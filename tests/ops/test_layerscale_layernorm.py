"""layerscale_residual_layernorm and layer_norm: the Triton kernels vs the fp64 reference
(interpreter on CPU, real on a GPU), all five grads, determinism, registration and checks."""
import pytest
import torch
import torch.nn.functional as F

from deit_fast import ops
from tests.conftest import DEVICE
from tests.ops.test_layerscale import BF16, DTYPES, F16, F32, make
from tests.ops.tolerance import assert_rule, poisoned_empty

SHAPES = [(1, 1, 8), (2, 7, 33), (3, 65, 192), (2, 197, 288), (1, 198, 768), (5, 1024), (1, 3, 5000)]


def run(backend, x, y, g, w, b, mask, keep_prob, d_out, d_norm, eps=1e-6):
    """(out, normed) and the grads of (x, y[, gamma], weight, bias) of the public op on `backend`."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, y, g, w, b)]
    with ops.use_backend(backend):
        out, normed = ops.layerscale_residual_layernorm(*leaves, eps, mask, keep_prob)
    grads = torch.autograd.grad((out, normed), [t for t in leaves if t is not None],
                                (d_out.to(out.dtype), d_norm.to(normed.dtype)))
    return (out, normed), grads


def check(x, y, g, mask, keep_prob=0.6):
    C = x.shape[-1]
    w = torch.randn(C, device=x.device) * 0.5 + 1
    b = torch.randn(C, device=x.device)
    d_out, d_norm = (torch.randn(x.shape, device=x.device, dtype=torch.float64) for _ in range(2))
    ours, ours_g = run("triton", x, y, g, w, b, mask, keep_prob, d_out, d_norm)
    same, same_g = run("torch", x, y, g, w, b, mask, keep_prob, d_out, d_norm)
    up = [t.double() if t is not None else None for t in (x, y, g, w, b)]
    ref, ref_g = run("torch", *up, mask, keep_prob, d_out, d_norm)
    # The kernel's normed output takes out's dtype; the eager LayerNorm output does too here.
    for name, a, r, s in zip(("out", "normed"), ours, ref, same):
        assert a.dtype == s.dtype, name
        assert_rule(name, a, r, s)
    names = ("dx", "dy", "dgamma", "dweight", "dbias") if g is not None else ("dx", "dy", "dweight", "dbias")
    for name, a, r, s in zip(names, ours_g, ref_g, same_g):
        assert a.dtype == s.dtype, name
        assert_rule(name, a, r, s, ulps=16)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_matches_reference(shape, dtypes, monkeypatch):
    poisoned_empty(monkeypatch)
    check(*make(shape, dtypes, drop=True))


@pytest.mark.parametrize("gamma,drop", [(False, False), (False, True), (True, False)])
def test_without_gamma_or_droppath(gamma, drop):
    check(*make((3, 65, 192), (F16, F16, F32), gamma=gamma, drop=drop))


@pytest.mark.parametrize("gamma", [True, False])
def test_column_sums_over_several_steps(gamma, monkeypatch):
    """The backward's second kernel adds the strips' partial column sums a block of strips at a
    time: here 4 strips a step, so 2 steps (5 strips: the second masked) and 2 column blocks
    (C = 45: the second masked); with and without the gamma grad."""
    from deit_fast.kernels import layerscale as kernel
    monkeypatch.setattr(kernel, "COLSUM_P", 4)
    monkeypatch.setattr(kernel, "BWD_PROGRAMS", 5)  # 5 strips of 8 rows: 1-row tiles
    monkeypatch.setattr(kernel, "LN_BWD_TILE", 64)
    check(*make((2, 19, 45), (F32, F32, F32), gamma=gamma, drop=True))


def test_forward_warps_reach_the_forward_launch_alone(monkeypatch):
    """LN_FWD_WARPS (a tune candidate) sets the forward kernel's num_warps and no other launch's,
    and the AOT list compiles the forward with it. The interpreter ignores warps, so the results
    are bitwise those of the default."""
    from deit_fast.kernels import layerscale as kernel
    x, y, g, _ = make((2, 9, 192), (F32, BF16, F32))
    w, b = torch.randn(192, device=DEVICE), torch.randn(192, device=DEVICE)
    launches = []
    real_launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda fn, *a, **kw: (
        launches.append((fn, kw["num_warps"])), real_launch(fn, *a, **kw)))
    assert kernel.LN_FWD_WARPS is None
    default = kernel.residual_layernorm_forward(x, y, g, None, w, b, 1e-6, torch.float32)
    monkeypatch.setattr(kernel, "LN_FWD_WARPS", 2)
    assert all(torch.equal(a, c) for a, c in zip(
        default, kernel.residual_layernorm_forward(x, y, g, None, w, b, 1e-6, torch.float32)))
    assert launches == [(kernel._residual_ln_fwd, 8), (kernel._residual_ln_fwd, 2)]
    aot = {c["num_warps"] for c in kernel.aot_configs("bf16") if c["kernel"] is kernel._residual_ln_fwd}
    assert aot == {2}


def test_strided_inputs():
    B, N, C = 2, 65, 96
    x = torch.randn(B, N, 3 * C, device=DEVICE)[..., C:2 * C]
    y = torch.randn(N, B, C, device=DEVICE).transpose(0, 1)
    check(x, y, torch.randn(C, device=DEVICE), torch.rand(B, device=DEVICE) > 0.5)


def check_layer_norm(backend, x, w, b, dn):
    """layer_norm on `backend` (also test_layerscale_layernorm_cuda.py's, on "cuda") against the
    fp64 reference under the tolerance rule: normed and the grads of (x, weight, bias) for `dn`."""
    def go(on, *ts):
        leaves = [t.detach().requires_grad_() for t in ts]
        with ops.use_backend(on):
            y = ops.layer_norm(*leaves, 1e-6)
        return (y,) + torch.autograd.grad(y, leaves, dn.to(y.dtype))
    ours, same = go(backend, x, w, b), go("torch", x, w, b)
    ref = go("torch", x.double(), w.double(), b.double())
    for name, a, r, s in zip(("normed", "dx", "dweight", "dbias"), ours, ref, same):
        assert a.dtype == s.dtype, name
        assert_rule(name, a, r, s, ulps=16)


@pytest.mark.parametrize("shape", [(2, 7, 33), (3, 197, 192), (4, 768)], ids=str)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_plain_layer_norm(shape, dtype, monkeypatch):
    poisoned_empty(monkeypatch)
    C = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3 + 1
    w, b = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    dn = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    check_layer_norm("triton", x, w, b, dn)


def test_column_grads_are_bitwise_deterministic():
    x, y, g, mask = make((3, 197, 192), DTYPES[1], drop=True)
    d = torch.randn(x.shape, device=DEVICE, dtype=torch.float64)
    w, b = torch.ones(192, device=DEVICE), torch.zeros(192, device=DEVICE)
    first = run("triton", x, y, g, w, b, mask, 0.7, d, d)[1]
    second = run("triton", x, y, g, w, b, mask, 0.7, d, d)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_custom_ops_pass_opcheck():
    x, y, g, _ = make((2, 7, 33), DTYPES[0])
    w, b, s = torch.randn(33, device=DEVICE), torch.randn(33, device=DEVICE), torch.tensor([2.0, 0.0], device=DEVICE)
    args = [t.requires_grad_() for t in (x, y, g)]
    torch.library.opcheck(torch.ops.deit_fast.layerscale_residual_layernorm.default,
                          (*args, s, w.requires_grad_(), b.requires_grad_(), 1e-6, "triton"))
    torch.library.opcheck(torch.ops.deit_fast.layer_norm.default, (x, w, b, 1e-6, "triton"))


def test_torch_compile_fullgraph_matches_eager():
    x, y, g, mask = make((2, 7, 33), DTYPES[0], drop=True)
    w, b = torch.randn(33, device=DEVICE), torch.randn(33, device=DEVICE)

    def step(x, y, g):
        out, normed = ops.layerscale_residual_layernorm(x, y, g, w, b, 1e-6, mask, 0.8)
        return (out * normed).sum() + ops.layer_norm(out, w, b).square().sum()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.use_backend("triton"):
        leaves = [t.clone().requires_grad_() for t in (x, y, g)]
        compiled(*leaves).backward()
        eager = [t.clone().requires_grad_() for t in (x, y, g)]
        step(*eager).backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad)


def test_too_wide_rows_are_refused_by_the_kernel_backend():
    x = torch.randn(2, 8193)
    w, b = torch.ones(8193), torch.zeros(8193)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="C=8193"):
        ops.layer_norm(x, w, b)
    torch.testing.assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (8193,), w, b, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [(BF16, BF16, F32), (F32, BF16, F32), (F16, F16, F32)],
                         ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("shape", [(2, 197, 192), (3, 577, 768), (4, 196, 288), (7, 1024)], ids=str)
def test_gpu_bf16_fp16(shape, dtypes):
    check(*make(shape, dtypes, drop=True, device="cuda"))
