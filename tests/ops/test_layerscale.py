"""layerscale_residual: Triton kernel vs the fp64 reference (interpreter on CPU, real on a GPU),
grads, determinism, strided inputs, custom-op registration, torch.compile and input checks."""
import pytest
import torch

from deit_fast import ops
from tests.conftest import DEVICE
from tests.ops.tolerance import assert_rule, poisoned_empty

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SHAPES = [(1, 1, 1), (2, 7, 33), (3, 65, 192), (2, 197, 288), (1, 198, 768), (5, 1024)]
# (x, y, gamma) dtypes: fp32 throughout; autocast's bf16/fp16 branch with an fp32 gamma (fp32
# result); all half; an fp32 residual stream with a half branch. The interpreter has no bf16
# arithmetic (DESIGN.md section 6), so bf16 runs in the gpu tests only.
DTYPES = [(F32, F32, F32), (F16, F16, F32), (F16, F16, F16), (F32, F16, F32)]


def make(shape, dtypes, gamma=True, drop=False, device=DEVICE):
    xd, yd, gd = dtypes
    x = torch.randn(shape, device=device, dtype=xd)
    y = torch.randn(shape, device=device, dtype=yd)
    g = torch.randn(shape[-1], device=device, dtype=gd) if gamma else None
    mask = (torch.rand(shape[0], device=device) > 0.4) if drop else None
    return x, y, g, mask


def run(backend, x, y, g, mask, keep_prob, dout):
    """Forward and (x, y, gamma) grads of the op on `backend`, inputs as given (any dtype)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, y, g)]
    with ops.use_backend(backend):
        out = ops.layerscale_residual(*leaves, mask, keep_prob)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.to(out.dtype))
    return out, grads


def check_against_reference(x, y, g, mask, keep_prob=0.6):
    dout = torch.randn(x.shape, device=x.device, dtype=torch.float64)
    ours, ours_g = run("triton", x, y, g, mask, keep_prob, dout)
    same, same_g = run("torch", x, y, g, mask, keep_prob, dout)
    up = [t.double() if t is not None else None for t in (x, y, g)]
    ref, ref_g = run("torch", *up, mask, keep_prob, dout)
    assert ours.dtype == same.dtype and ours.shape == x.shape and ours.is_contiguous()
    assert_rule("out", ours, ref, same)
    for name, a, r, s in zip(("dx", "dy", "dgamma"), ours_g, ref_g, same_g):
        assert a.dtype == s.dtype
        assert_rule(name, a, r, s)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_matches_reference(shape, dtypes, monkeypatch):
    poisoned_empty(monkeypatch)
    check_against_reference(*make(shape, dtypes, drop=True))


@pytest.mark.parametrize("gamma,drop", [(False, False), (False, True), (True, False)])
def test_without_gamma_or_droppath(gamma, drop, monkeypatch):
    poisoned_empty(monkeypatch)
    check_against_reference(*make((3, 65, 192), (F16, F16, F32), gamma=gamma, drop=drop))


def test_float_keep_mask_and_keep_prob_one():
    x, y, g, _ = make((4, 9, 48), DTYPES[0])
    check_against_reference(x, y, g, torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEVICE), keep_prob=1.0)


def test_gamma_grad_sums_every_row_tile_of_a_strip(monkeypatch):
    """The backward's BWD_PROGRAMS strips each sum their rows' gamma grads over as many row tiles
    as they hold: one at every shape above, several past BWD_PROGRAMS * BLOCK_R rows (16384:
    DeiT-S training at batch 84 and up). Here 2 strips of 7 tiles of 16 rows, the last partial."""
    from deit_fast.kernels import layerscale
    monkeypatch.setattr(layerscale, "BWD_PROGRAMS", 2)
    poisoned_empty(monkeypatch)
    check_against_reference(*make((3, 65, 192), (F16, F16, F32), drop=True))


def test_strided_views_without_copy():
    """q/k/v-style inputs: x a column slice of a wider tensor, y a (B, N) transposed view."""
    B, N, C = 2, 65, 96
    x = torch.randn(B, N, 3 * C, device=DEVICE)[..., C:2 * C]
    y = torch.randn(N, B, C, device=DEVICE).transpose(0, 1)
    g = torch.randn(C, device=DEVICE)
    assert not x.is_contiguous() and not y.is_contiguous()
    check_against_reference(x, y, g, torch.rand(B, device=DEVICE) > 0.5)


def test_gamma_grad_is_bitwise_deterministic():
    x, y, g, mask = make((3, 197, 192), DTYPES[1], drop=True)
    dout = torch.randn(x.shape, device=DEVICE, dtype=torch.float64)
    first = run("triton", x, y, g, mask, 0.7, dout)[1]
    second = run("triton", x, y, g, mask, 0.7, dout)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dropped_samples_pass_x_through():
    x, y, g, _ = make((3, 7, 33), DTYPES[0])
    mask = torch.tensor([True, False, True], device=DEVICE)
    with ops.use_backend("triton"):
        out = ops.layerscale_residual(x, y, g, mask, 0.5)
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(out[0], x[0] + 2 * g * y[0])


def test_custom_ops_pass_opcheck():
    x, y, g, _ = make((2, 7, 33), DTYPES[0])
    scale = torch.tensor([2.0, 0.0], device=DEVICE)
    torch.library.opcheck(torch.ops.deit_fast.layerscale_residual.default,
                          (x.requires_grad_(), y.requires_grad_(), g.requires_grad_(), scale, "triton"))
    torch.library.opcheck(torch.ops.deit_fast.layerscale_residual_backward.default,
                          (torch.randn_like(x), y.detach(), g.detach(), scale, "triton"))


def test_torch_compile_fullgraph_matches_eager():
    x, y, g, mask = make((2, 7, 33), DTYPES[0], drop=True)

    def step(x, y, g):
        return (ops.layerscale_residual(x, y, g, mask, 0.8) ** 2).sum()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.use_backend("triton"):
        leaves = [t.clone().requires_grad_() for t in (x, y, g)]
        compiled(*leaves).backward()
        eager = [t.clone().requires_grad_() for t in (x, y, g)]
        step(*eager).backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(y=torch.randn(2, 7, 32)), "y"),
    (dict(gamma=torch.randn(32)), "gamma"),
    (dict(gamma=torch.randn(2, 33)), "gamma"),
    (dict(x=torch.randn(33)), "x"),
    (dict(x=torch.randint(0, 3, (2, 7, 33))), "x"),
    (dict(keep_mask=torch.ones(3)), "keep_mask"),
    (dict(keep_mask=torch.ones(2), keep_prob=0.0), "keep_prob"),
    (dict(x="not a tensor"), "x"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument_before_launch(kwargs, arg, backend, monkeypatch):
    from deit_fast.kernels import layerscale
    monkeypatch.setattr(layerscale, "forward", lambda *a: pytest.fail("kernel launched"))
    args = dict(x=torch.randn(2, 7, 33), y=torch.randn(2, 7, 33), gamma=torch.randn(33),
                keep_mask=None, keep_prob=1.0)
    args.update(kwargs)
    with ops.use_backend(backend), pytest.raises(ValueError, match=arg):
        ops.layerscale_residual(**args)


def test_fp64_is_refused_by_kernels_but_runs_on_torch():
    x, y, g = (torch.randn(2, 3, 8, dtype=torch.float64) for _ in range(3))
    g = g[0, 0]
    with ops.use_backend("triton"), pytest.raises(ValueError, match="x dtype"):
        ops.layerscale_residual(x, y, g)
    with ops.use_backend("torch"):
        torch.testing.assert_close(ops.layerscale_residual(x, y, g), x + g * y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [(BF16, BF16, F32), (F32, BF16, F32), (BF16, BF16, BF16),
                                    (F16, F16, F32)], ids=lambda d: "-".join(str(t)[6:] for t in d))
@pytest.mark.parametrize("shape", [(2, 197, 192), (3, 577, 768), (4, 196, 288), (7, 1024)], ids=str)
def test_gpu_triton_bf16_fp16(shape, dtypes):
    check_against_reference(*make(shape, dtypes, drop=True, device="cuda"))
