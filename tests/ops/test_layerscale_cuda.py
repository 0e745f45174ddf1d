"""layerscale_residual on the `cuda` backend (deit_fast._C, csrc/layerscale.cu), on a GPU only:
against the fp64 reference with FlashAttention's tolerance rule in fp32/fp16/bf16 and mixed
x/y dtypes, odd and ViT widths, strided and misaligned views (vector and scalar paths), with and
without gamma and DropPath, bitwise-deterministic dgamma, agreement with the Triton backend, the
custom-op checks, int64 offsets, and a compute-sanitizer memcheck/racecheck run."""

import pytest
import torch

from deit_fast import ops
from tests.ops.sanitizer import TOOLS, run_sanitizer
from tests.ops.streams import on_a_side_stream
from tests.ops.tolerance import assert_rule, poisoned_empty

pytestmark = pytest.mark.gpu
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SHAPES = [(2, 7, 33), (3, 65, 192), (2, 197, 288), (2, 197, 384), (1, 198, 768), (2, 50, 1024),
          (7, 1024), (1, 1, 1), (4, 9, 2056)]
# (x, y, gamma): fp32; autocast's half branch + fp32 gamma (fp32 result); all half; an fp32
# residual stream with a half branch; a half stream with an fp32 branch; a gamma of a third dtype.
DTYPES = [(F32, F32, F32), (F16, F16, F32), (BF16, BF16, F32), (F16, F16, F16), (BF16, BF16, BF16),
          (F32, BF16, F32), (F32, F16, F16), (BF16, F32, F32), (F16, F16, BF16)]


def dtype_id(d):
    return "-".join(str(t)[6:] for t in d)


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    why = ops._backend.unavailable("layerscale_residual", "cuda", "cuda")
    if why is not None:
        pytest.fail(f"the cuda backend cannot run here: {why} (bench/gpu_check.sh builds it)")


def make(shape, dtypes, gamma=True, drop=True):
    xd, yd, gd = dtypes
    x = torch.randn(shape, device="cuda", dtype=xd)
    y = torch.randn(shape, device="cuda", dtype=yd)
    g = torch.randn(shape[-1], device="cuda", dtype=gd) if gamma else None
    mask = (torch.rand(shape[0], device="cuda") > 0.4) if drop else None
    return x, y, g, mask


def run(backend, x, y, g, mask, keep_prob, dout):
    """Output and (x, y, gamma) grads of the public op on `backend`."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, y, g)]
    with ops.use_backend(backend):
        out = ops.layerscale_residual(*leaves, mask, keep_prob)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.to(out.dtype))
    return out, grads


def check_against_reference(x, y, g, mask, keep_prob=0.6):
    dout = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    ours, ours_g = run("cuda", x, y, g, mask, keep_prob, dout)
    same, same_g = run("torch", x, y, g, mask, keep_prob, dout)
    up = [t.double() if t is not None else None for t in (x, y, g)]
    ref, ref_g = run("torch", *up, mask, keep_prob, dout)
    assert ours.dtype == same.dtype and ours.shape == x.shape and ours.is_contiguous()
    assert_rule("out", ours, ref, same)
    for name, a, r, s in zip(("dx", "dy", "dgamma"), ours_g, ref_g, same_g):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        assert_rule(name, a, r, s)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
def test_matches_reference(shape, dtypes, monkeypatch):
    poisoned_empty(monkeypatch)  # Python-side allocations; the C++ ones are checked by the rule
    check_against_reference(*make(shape, dtypes))


@pytest.mark.parametrize("gamma,drop", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2], DTYPES[4]], ids=dtype_id)
def test_without_gamma_or_droppath(gamma, drop, dtypes):
    check_against_reference(*make((3, 65, 192), dtypes, gamma=gamma, drop=drop))


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2], DTYPES[5]], ids=dtype_id)
@pytest.mark.parametrize("C", [33, 192, 768])
def test_strided_views(C, dtypes):
    """q/k/v-style inputs read in place: x a column slice of a wider tensor, y a (B, N)
    transposed view; at C = 192/768 both stay on the vector path."""
    B, N = 2, 65
    xd, yd, gd = dtypes
    x = torch.randn(B, N, 3 * C, device="cuda", dtype=xd)[..., C:2 * C]
    y = torch.randn(N, B, C, device="cuda", dtype=yd).transpose(0, 1)
    g = torch.randn(C, device="cuda", dtype=gd)
    assert not x.is_contiguous() and not y.is_contiguous()
    check_against_reference(x, y, g, torch.rand(B, device="cuda") > 0.5)


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[4]], ids=dtype_id)
def test_misaligned_and_uncollapsible_views(dtypes):
    """Views that defeat the vector path (a base one element off 16 B, an odd row stride) or
    any (B, N, C) view (permuted 4-D, non-unit last stride): scalar path or a copy, same result."""
    xd, yd, gd = dtypes
    B, N, C = 3, 17, 192
    g = torch.randn(C, device="cuda", dtype=gd)
    mask = torch.rand(B, device="cuda") > 0.5
    off = torch.randn(B * N * C + 1, device="cuda", dtype=xd)[1:].view(B, N, C)
    odd_rows = torch.randn(B, N, C + 1, device="cuda", dtype=yd)[..., :C]
    check_against_reference(off, odd_rows, g, mask)
    four_d = torch.randn(B, 5, 4, C, device="cuda", dtype=xd).transpose(1, 2)  # (B, 4, 5, C)
    last = torch.randn(B, 4, 5, 2 * C, device="cuda", dtype=yd)[..., ::2]
    check_against_reference(four_d, last, g, mask)
    strided_gamma = torch.randn(2 * C, device="cuda", dtype=gd)[::2]
    check_against_reference(*make((B, N, C), dtypes, gamma=False)[:2], strided_gamma, mask)


def test_grads_are_bitwise_deterministic():
    x, y, g, mask = make((8, 197, 384), (BF16, BF16, F32))
    dout = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    first = run("cuda", x, y, g, mask, 0.7, dout)[1]
    for _ in range(3):
        again = run("cuda", x, y, g, mask, 0.7, dout)[1]
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(3, 65, 192), (2, 197, 768), (2, 7, 33)], ids=str)
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2], DTYPES[4], DTYPES[5]], ids=dtype_id)
def test_matches_triton(shape, dtypes):
    x, y, g, mask = make(shape, dtypes)
    dout = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    cuda_out, cuda_g = run("cuda", x, y, g, mask, 0.8, dout)
    tri_out, tri_g = run("triton", x, y, g, mask, 0.8, dout)
    torch.testing.assert_close(cuda_out, tri_out)
    torch.testing.assert_close(cuda_g[0], tri_g[0])  # dx: dout itself
    torch.testing.assert_close(cuda_g[1], tri_g[1])
    # dgamma: fp32 sums over all rows in a different order; compare at fp32 summation accuracy
    rows = x.numel() // x.shape[-1]
    tol = dict(rtol=1e-5, atol=1e-5 * rows ** 0.5) if g.dtype == F32 else {}
    torch.testing.assert_close(cuda_g[2], tri_g[2], **tol)


def test_dropped_samples_pass_x_through():
    x, y, g, _ = make((3, 7, 192), (F32, F32, F32))
    mask = torch.tensor([True, False, True], device="cuda")
    with ops.use_backend("cuda"):
        out = ops.layerscale_residual(x, y, g, mask, 0.5)
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(out[0], x[0] + 2 * g * y[0])


@pytest.mark.parametrize("shape", [(0, 7, 192), (2, 0, 33), (2, 7, 0)], ids=str)
def test_empty_tensors(shape):
    x, y, g, mask = make(shape, (BF16, BF16, F32))
    out, (dx, dy, dg) = run("cuda", x, y, g, mask, 0.5, torch.zeros(shape, device="cuda"))
    assert out.shape == x.shape and dy.shape == y.shape and dg.shape == g.shape
    assert not dg.any()
    torch.cuda.synchronize()


def test_custom_ops_pass_opcheck():
    x, y, g, _ = make((2, 7, 33), (F32, F32, F32))
    scale = torch.tensor([2.0, 0.0], device="cuda")
    torch.library.opcheck(torch.ops.deit_fast.layerscale_residual.default,
                          (x.requires_grad_(), y.requires_grad_(), g.requires_grad_(), scale, "cuda"))
    torch.library.opcheck(torch.ops.deit_fast.layerscale_residual_backward.default,
                          (torch.randn_like(x), y.detach(), g.detach(), scale, "cuda"))


def test_extension_ops_on_cuda_pass_opcheck():
    import deit_fast._C  # noqa: F401
    C = torch.ops.deit_fast_C
    x, y, g, _ = make((2, 9, 64), (BF16, BF16, F32))
    scale = torch.tensor([2.0, 0.0], device="cuda")
    torch.library.opcheck(C.layerscale_residual_forward.default, (x, y, g, scale, F32))
    torch.library.opcheck(C.layerscale_residual_backward.default, (torch.randn_like(x), y, g, scale))
    torch.library.opcheck(C.layerscale_residual_backward.default, (torch.randn_like(x), y, None, None))


def test_inputs_on_two_devices_raise():
    import deit_fast._C  # noqa: F401
    x, y, g, _ = make((2, 7, 33), (F32, F32, F32))
    with pytest.raises(RuntimeError, match="scale is on cpu"):
        torch.ops.deit_fast_C.layerscale_residual_forward(x, y, g, torch.ones(2), F32)


def test_runs_on_the_current_stream():
    x, y, g, mask = make((4, 197, 384), (BF16, BF16, F32))
    expected = run("cuda", x, y, g, mask, 0.7, torch.ones(x.shape, device="cuda"))[0]
    out = on_a_side_stream(lambda: run("cuda", x, y, g, mask, 0.7, torch.ones(x.shape, device="cuda"))[0])
    assert torch.equal(out, expected)


@pytest.mark.slow
def test_int64_offsets_past_2_to_the_31():
    """B * N * C > 2**31 elements: offsets and the last row must not wrap around."""
    B, N, C = 2, 1_048_577, 1024  # 2**31 + 2048 elements per tensor, 4 GiB in bf16
    if torch.cuda.mem_get_info()[0] < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    x = torch.ones(B, N, C, device="cuda", dtype=BF16)
    y = torch.full((B, N, C), 2.0, device="cuda", dtype=BF16)
    y[-1, -1] = 3.0
    g = torch.full((C,), 0.5, device="cuda")
    with ops.use_backend("cuda"):
        out = ops.layerscale_residual(x, y, g, torch.tensor([True, True], device="cuda"), 0.5)
    assert out[-1, -1].eq(4.0).all() and out[-1, -2].eq(3.0).all() and out[0, 0].eq(3.0).all()
    del out
    dy, dg = torch.ops.deit_fast_C.layerscale_residual_backward(x, y, g, None)
    assert dy[-1, -1].eq(0.5).all() and dy[0, 0].eq(0.5).all()
    torch.testing.assert_close(dg, torch.full((C,), 2.0 * (B * N - 1) + 3.0, device="cuda"),
                               rtol=1e-5, atol=0)


@pytest.mark.slow
def test_more_rows_than_2_to_the_32():
    """B * N > 2**32 rows: the kernels' 64-bit (b, n) split (C = 1 takes the scalar path)."""
    B, N = 2, 2**31 + 1
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    x = torch.ones(B, N, 1, device="cuda", dtype=BF16)
    y = torch.full((B, N, 1), 2.0, device="cuda", dtype=BF16)
    marks = [(0, 12345, 5.0), (1, 2**31 - 7, 7.0), (1, N - 1, 3.0)]
    for b, n, v in marks:
        y[b, n] = v
    with ops.use_backend("cuda"):
        out = ops.layerscale_residual(x, y, None)
    for b, n, v in marks:
        assert out[b, n].item() == v + 1
    assert out[0, N - 1].item() == 3.0 and out[1, 0].item() == 3.0
    del out
    dy, _ = torch.ops.deit_fast_C.layerscale_residual_backward(
        x, y, None, torch.tensor([2.0, 0.5], device="cuda"))
    assert dy[0, N - 1].item() == 2.0 and dy[1, N - 1].item() == 0.5 and dy[1, 0].item() == 0.5


SANITIZER_SCRIPT = """
import torch
from deit_fast import ops
for shape, dt, g_dt in [((2, 7, 33), torch.float32, torch.float32), ((3, 9, 192), torch.bfloat16, torch.float32),
                        ((2, 5, 2056), torch.float16, torch.float16), ((5, 40), torch.bfloat16, torch.bfloat16)]:
    x = torch.randn(shape, device="cuda", dtype=dt)
    y = torch.randn(*shape[:-1], shape[-1] + 1, device="cuda", dtype=dt)[..., 1:]  # misaligned view
    for yy in (y, y.contiguous()):
        leaves = [x.clone().requires_grad_(), yy.detach().requires_grad_(),
                  torch.randn(shape[-1], device="cuda", dtype=g_dt).requires_grad_()]
        with ops.use_backend("cuda"):
            out = ops.layerscale_residual(*leaves, torch.rand(shape[0], device="cuda") > 0.5, 0.5)
        out.float().square().sum().backward()
torch.cuda.synchronize()
print("sanitizer script done")
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_compute_sanitizer(tool):
    run_sanitizer(tool, "layerscale", SANITIZER_SCRIPT)
