"""layerscale_residual_layernorm and layer_norm on the `cuda` backend (deit_fast._C,
csrc/layerscale_layernorm.cu), on a GPU only: outputs and all five grads against the fp64 reference
with FlashAttention's tolerance rule in fp32/fp16/bf16 and mixed dtypes, at 1, 7 and 197 * 3 rows
of C = 192, 288, 768, 33 and wide rows (the vector path, the element-wise path, rows over several
warps), strided and misaligned views, with and without gamma and DropPath, eps, bitwise-
deterministic column grads, agreement with the Triton backend, the backward's prefetching
variant (CUDA_PREFETCH) against the plain one bitwise and against the reference, the custom-op
checks, and a compute-sanitizer memcheck / racecheck run (with and without the prefetch)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from deit_fast import ops
from tests.ops.sanitizer import TOOLS, run_sanitizer
from tests.ops.streams import on_a_side_stream
from tests.ops.test_layerscale_layernorm import check_layer_norm, run
from tests.ops.tolerance import assert_rule, poisoned_empty

op_module = importlib.import_module("deit_fast.ops.layerscale")  # CUDA_PREFETCH
pytestmark = pytest.mark.gpu
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# 1, 7 and 197 * 3 rows at the widths the task names, then rows the backward spreads over 2 to
# 16 warps (C = 1024, 4104, 8192) and an odd wide one (element-wise path, 16 warps).
SHAPES = [(1, 1, C) for C in (192, 288, 768, 33)] + [(1, 7, C) for C in (192, 288, 768, 33)] + \
         [(3, 197, C) for C in (192, 288, 768, 33)] + [(2, 50, 1024), (2, 3, 4104), (1, 2, 8192), (2, 8191)]
# (x, y, gamma): fp32; autocast's half branch + fp32 gamma (fp32 result); all half; an fp32
# residual stream with a half branch; a half stream with an fp32 branch; mixed halves.
DTYPES = [(F32, F32, F32), (BF16, BF16, F32), (F16, F16, F32), (BF16, BF16, BF16), (F16, F16, F16),
          (F32, BF16, F32), (BF16, F32, F32), (F16, BF16, F16)]


def dtype_id(d):
    return "-".join(str(t)[6:] for t in d)


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    for op in ("layerscale_residual_layernorm", "layer_norm"):
        why = ops._backend.unavailable(op, "cuda", "cuda")
        if why is not None:
            pytest.fail(f"the cuda backend cannot run {op} here: {why} (bench/gpu_check.sh builds it)")


def make(shape, dtypes, gamma=True, drop=True):
    xd, yd, gd = dtypes
    C = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=xd)
    y = torch.randn(shape, device="cuda", dtype=yd)
    g = torch.randn(C, device="cuda", dtype=gd) if gamma else None
    mask = (torch.rand(shape[0], device="cuda") > 0.4) if drop else None
    w = torch.randn(C, device="cuda") * 0.5 + 1
    b = torch.randn(C, device="cuda")
    return x, y, g, w, b, mask


def check(x, y, g, w, b, mask, keep_prob=0.6, eps=1e-6):
    d_out, d_norm = (torch.randn(x.shape, device="cuda", dtype=torch.float64) for _ in range(2))
    ours, ours_g = run("cuda", x, y, g, w, b, mask, keep_prob, d_out, d_norm, eps)
    same, same_g = run("torch", x, y, g, w, b, mask, keep_prob, d_out, d_norm, eps)
    up = [t.double() if t is not None else None for t in (x, y, g, w, b)]
    ref, ref_g = run("torch", *up, mask, keep_prob, d_out, d_norm, eps)
    for name, a, r, s in zip(("out", "normed"), ours, ref, same):
        assert a.dtype == s.dtype and a.is_contiguous(), name
        assert_rule(name, a, r, s)
    names = ("dx", "dy", "dgamma", "dweight", "dbias") if g is not None else ("dx", "dy", "dweight", "dbias")
    for name, a, r, s in zip(names, ours_g, ref_g, same_g):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        assert_rule(name, a, r, s, ulps=16)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
def test_matches_reference(shape, dtypes, monkeypatch):
    poisoned_empty(monkeypatch)  # Python-side allocations; the C++ ones are checked by the rule
    check(*make(shape, dtypes))


@pytest.mark.parametrize("gamma,drop", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[1], DTYPES[3]], ids=dtype_id)
@pytest.mark.parametrize("C", [192, 33])
def test_without_gamma_or_droppath(gamma, drop, dtypes, C):
    check(*make((3, 65, C), dtypes, gamma=gamma, drop=drop))


@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_eps(eps):
    check(*make((3, 197, 192), DTYPES[1]), eps=eps)


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetch"])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[1], DTYPES[5]], ids=dtype_id)
@pytest.mark.parametrize("C", [33, 192, 768])
def test_strided_views(C, dtypes, prefetch, monkeypatch):
    """q/k/v-style inputs read in place: x a column slice of a wider tensor, y a (B, N)
    transposed view; at C = 192 / 768 both stay on the vector path (with a 16-bit y, the one
    the backward's CUDA_PREFETCH copies ahead from its strided rows)."""
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", prefetch)
    B, N = 2, 65
    xd, yd, gd = dtypes
    x = torch.randn(B, N, 3 * C, device="cuda", dtype=xd)[..., C:2 * C]
    y = torch.randn(N, B, C, device="cuda", dtype=yd).transpose(0, 1)
    _, _, g, w, b, mask = make((B, N, C), dtypes)
    assert not x.is_contiguous() and not y.is_contiguous()
    check(x, y, g, w, b, mask)


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[3]], ids=dtype_id)
def test_misaligned_and_uncollapsible_views(dtypes):
    """Views that defeat the vector path (a base one element off 16 B, an odd row stride,
    misaligned parameters) or any (B, N, C) view (permuted 4-D, non-unit last stride)."""
    xd, yd, gd = dtypes
    B, N, C = 3, 17, 192
    _, _, g, w, b, mask = make((B, N, C), dtypes)
    off = torch.randn(B * N * C + 1, device="cuda", dtype=xd)[1:].view(B, N, C)
    odd_rows = torch.randn(B, N, C + 1, device="cuda", dtype=yd)[..., :C]
    check(off, odd_rows, g, w, b, mask)
    four_d = torch.randn(B, 5, 4, C, device="cuda", dtype=xd).transpose(1, 2)  # (B, 4, 5, C)
    last = torch.randn(B, 4, 5, 2 * C, device="cuda", dtype=yd)[..., ::2]
    check(four_d, last, g, w, b, mask)
    odd_w = torch.randn(C + 1, device="cuda")[1:]  # 4 B off the 32 B the vector loads need
    strided_g = torch.randn(2 * C, device="cuda", dtype=gd)[::2]
    check(*make((B, N, C), dtypes)[:2], strided_g, odd_w, b, mask)


@pytest.mark.parametrize("shape", [(1, 1, 192), (1, 7, 288), (3, 197, 768), (3, 197, 33), (2, 3, 8192),
                                   (5, 4104)], ids=str)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("param_dtype", [F32, BF16], ids=str)
def test_plain_layer_norm(shape, dtype, param_dtype, monkeypatch):
    if param_dtype != F32 and dtype != param_dtype:
        pytest.skip("a model cast to half has half parameters and activations")
    poisoned_empty(monkeypatch)
    C = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3 + 1
    w = torch.randn(C, device="cuda", dtype=param_dtype)
    b = torch.randn(C, device="cuda", dtype=param_dtype)
    dn = torch.randn(shape, device="cuda", dtype=torch.float64)
    check_layer_norm("cuda", x, w, b, dn)


def test_plain_layer_norm_of_a_strided_view():
    C = 192
    base = torch.randn(2, 65, 3 * C, device="cuda", dtype=BF16)
    for x in (base[..., C:2 * C], base[..., 1:C + 1]):  # vector path, element-wise path
        w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        with ops.use_backend("cuda"):
            y = ops.layer_norm(*leaves, 1e-6)
        dn = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dn)
        ref = [t.detach().float().requires_grad_() for t in (x, w, b)]
        y_ref = F.layer_norm(ref[0], (C,), ref[1], ref[2], 1e-6)
        grads_ref = torch.autograd.grad(y_ref, ref, dn.float())
        torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)
        for a, r in zip(grads, grads_ref):
            torch.testing.assert_close(a.float(), r, atol=5e-2, rtol=2e-2)


def test_rows_far_from_zero_and_constant_rows():
    """A large common offset (two-pass variance keeps its accuracy) and rows of one value
    (variance 0: normed is the bias, no NaN)."""
    x = torch.randn(4, 33, 384, device="cuda") + 1000.0
    x[1, 3] = 7.0
    y = torch.zeros_like(x)
    w, b = torch.randn(384, device="cuda"), torch.randn(384, device="cuda")
    with ops.use_backend("cuda"):
        out, normed = ops.layerscale_residual_layernorm(x, y, None, w, b, 1e-6)
    ref = F.layer_norm(x.double(), (384,), w.double(), b.double(), 1e-6)
    assert torch.equal(out, x)
    torch.testing.assert_close(normed.double(), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(normed[1, 3], b)


def test_column_grads_are_bitwise_deterministic():
    x, y, g, w, b, mask = make((8, 197, 384), DTYPES[1])
    d = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    first = run("cuda", x, y, g, w, b, mask, 0.7, d, d)
    for _ in range(3):
        again = run("cuda", x, y, g, w, b, mask, 0.7, d, d)
        for a, b_ in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b_)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    with ops.use_backend("cuda"):
        grads = [torch.autograd.grad(ops.layer_norm(*leaves), leaves, d.to(x.dtype)) for _ in range(3)]
    for again in grads[1:]:
        assert all(torch.equal(a, b_) for a, b_ in zip(grads[0], again))


# Shapes where a thread of the backward walks two rows (rows > 1024 strips x TY rows a block), so
# the prefetch of its next row runs inside the loop, into a slot it used for the row before; the
# last two also end in a partial strip. Every other shape here gives each thread one row.
PREFETCH_ROWS_AHEAD = [(64, 197, 384), (88, 197, 192), (1, 1025, 4096)]


@pytest.mark.parametrize("gamma,drop", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(3, 197, 192), (8, 197, 384), (1, 7, 768), (2, 50, 1024),
                                   (2, 3, 4096), (1, 2, 8192), (2, 7, 33), (5, 3, 288)]
                         + PREFETCH_ROWS_AHEAD, ids=str)
def test_prefetch_gives_the_same_results(shape, dtypes, gamma, drop, monkeypatch):
    """CUDA_PREFETCH changes when the backward reads dout and y, not what it computes: the same
    outputs and grads (torch.equal) wherever it applies (vector rows up to C = 4096 in 256
    threads, 16-bit y) and wherever it does not (C = 8192, C = 33, fp32 y)."""
    x, y, g, w, b, mask = make(shape, dtypes, gamma, drop)
    d_out, d_norm = (torch.randn(x.shape, device="cuda", dtype=torch.float64) for _ in range(2))
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", False)
    plain = run("cuda", x, y, g, w, b, mask, 0.8, d_out, d_norm)
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", True)
    ahead = run("cuda", x, y, g, w, b, mask, 0.8, d_out, d_norm)
    for a, p in zip(ahead[0] + ahead[1], plain[0] + plain[1]):
        assert torch.equal(a, p)


@pytest.mark.parametrize("shape", [(3, 197, 192), (1, 7, 768), (2, 3, 4096), (64, 197, 384)], ids=str)
@pytest.mark.parametrize("dtypes", [DTYPES[1], DTYPES[3], DTYPES[5]], ids=dtype_id)
def test_prefetch_matches_reference(shape, dtypes, monkeypatch):
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", True)
    check(*make(shape, dtypes))


@pytest.mark.parametrize("shape", [(3, 197, 192), (2, 7, 33), (1, 7, 768)], ids=str)
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[1], DTYPES[3], DTYPES[5]], ids=dtype_id)
def test_matches_triton(shape, dtypes):
    x, y, g, w, b, mask = make(shape, dtypes)
    d_out, d_norm = (torch.randn(x.shape, device="cuda", dtype=torch.float64) for _ in range(2))
    cuda_o, cuda_g = run("cuda", x, y, g, w, b, mask, 0.8, d_out, d_norm)
    tri_o, tri_g = run("triton", x, y, g, w, b, mask, 0.8, d_out, d_norm)
    torch.testing.assert_close(cuda_o[0], tri_o[0])  # out: the same fp32 expression
    # normed: row statistics summed in another order.
    tol = dict(atol=1e-4, rtol=1e-4) if cuda_o[1].dtype == F32 else {}
    torch.testing.assert_close(cuda_o[1], tri_o[1], **tol)
    rows = x.numel() // x.shape[-1]
    for name, a, t in zip(("dx", "dy", "dgamma", "dweight", "dbias"), cuda_g, tri_g):
        # Row sums and column sums in other orders: compare at fp32 summation accuracy.
        tol = dict(rtol=1e-4, atol=1e-4 * rows ** 0.5) if a.dtype == F32 else {}
        torch.testing.assert_close(a, t, **tol, msg=lambda m: f"{name}: {m}")


def test_dropped_samples_normalise_x():
    x, y, g, w, b, _ = make((3, 7, 192), (F32, F32, F32))
    mask = torch.tensor([True, False, True], device="cuda")
    with ops.use_backend("cuda"):
        out, normed = ops.layerscale_residual_layernorm(x, y, g, w, b, 1e-6, mask, 0.5)
    assert torch.equal(out[1], x[1])
    torch.testing.assert_close(normed[1], F.layer_norm(x[1], (192,), w, b, 1e-6))


@pytest.mark.parametrize("shape", [(0, 7, 192), (2, 0, 33), (2, 7, 0)], ids=str)
def test_empty_tensors(shape):
    x, y, g, w, b, mask = make(shape, (BF16, BF16, F32))
    d = torch.zeros(shape, device="cuda", dtype=torch.float64)
    (out, normed), (dx, dy, dg, dw, db) = run("cuda", x, y, g, w, b, mask, 0.5, d, d)
    assert out.shape == normed.shape == dx.shape == dy.shape == x.shape
    assert dg.shape == dw.shape == db.shape == (shape[-1],)
    assert not dg.any() and not dw.any() and not db.any()
    torch.cuda.synchronize()


def test_custom_ops_pass_opcheck():
    x, y, g, w, b, _ = make((2, 7, 33), (F32, F32, F32))
    s = torch.tensor([2.0, 0.0], device="cuda")
    args = [t.requires_grad_() for t in (x, y, g)]
    torch.library.opcheck(torch.ops.deit_fast.layerscale_residual_layernorm.default,
                          (*args, s, w.requires_grad_(), b.requires_grad_(), 1e-6, "cuda"))
    torch.library.opcheck(torch.ops.deit_fast.layer_norm.default, (x, w, b, 1e-6, "cuda"))


def test_extension_ops_on_cuda_pass_opcheck():
    import deit_fast._C  # noqa: F401
    C = torch.ops.deit_fast_C
    x, y, g, w, b, _ = make((2, 9, 64), (BF16, BF16, F32))
    s = torch.tensor([2.0, 0.0], device="cuda")
    out, normed, mean, rstd = C.layerscale_residual_layernorm_forward(x, y, g, s, w, b, 1e-6, F32)
    torch.library.opcheck(C.layerscale_residual_layernorm_forward.default, (x, y, g, s, w, b, 1e-6, F32))
    torch.library.opcheck(C.layerscale_residual_layernorm_backward.default,
                          (torch.randn_like(out), torch.randn_like(out), out, y, g, s, w, mean, rstd, BF16))
    torch.library.opcheck(C.layerscale_residual_layernorm_backward.default,
                          (torch.randn_like(out), torch.randn_like(out), out, y, None, None, w, mean, rstd,
                           BF16))
    normed, mean, rstd = C.layer_norm_forward(x, w, b, 1e-6)
    torch.library.opcheck(C.layer_norm_forward.default, (x, w, b, 1e-6))
    torch.library.opcheck(C.layer_norm_backward.default, (torch.randn_like(x), x, w, mean, rstd))


def test_inputs_on_two_devices_raise():
    import deit_fast._C  # noqa: F401
    x, y, g, w, b, _ = make((2, 7, 33), (F32, F32, F32))
    with pytest.raises(RuntimeError, match="bias is on cpu"):
        torch.ops.deit_fast_C.layerscale_residual_layernorm_forward(x, y, g, None, w, b.cpu(), 1e-6, F32)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.deit_fast_C.layer_norm_forward(x, w.cpu(), b, 1e-6)


def test_runs_on_the_current_stream():
    x, y, g, w, b, mask = make((4, 197, 384), (BF16, BF16, F32))
    ones = torch.ones(x.shape, device="cuda")
    expected = run("cuda", x, y, g, w, b, mask, 0.7, ones, ones)
    got = on_a_side_stream(lambda: run("cuda", x, y, g, w, b, mask, 0.7, ones, ones))
    for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert torch.equal(a, e)


@pytest.mark.slow
def test_int64_offsets_past_2_to_the_31():
    """B * N * C > 2**31 elements: offsets and the last rows must not wrap around."""
    B, N, C = 2, 1_048_577, 1024  # 2**31 + 2048 elements per tensor, 4 GiB in bf16
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    x = torch.randn(B, N, C, device="cuda", dtype=BF16)
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    normed, mean, rstd = torch.ops.deit_fast_C.layer_norm_forward(x, w, b, 1e-6)
    for idx in ((0, 0), (1, N - 1), (1, N // 2)):
        torch.testing.assert_close(normed[idx].float(), F.layer_norm(x[idx].float(), (C,), w, b, 1e-6),
                                   atol=2e-2, rtol=2e-2)
    dn = torch.ones_like(x)
    dx, dw, db = torch.ops.deit_fast_C.layer_norm_backward(dn, x, w, mean, rstd)
    torch.testing.assert_close(db, torch.full((C,), float(B * N), device="cuda"), rtol=1e-5, atol=0)
    assert torch.isfinite(dx[1, N - 1].float()).all() and torch.isfinite(dw).all()


SANITIZER_SCRIPT = """
import importlib, itertools
import torch
from deit_fast import ops
layerscale = importlib.import_module("deit_fast.ops.layerscale")
cases = [((2, 7, 33), torch.float32, True), ((3, 9, 192), torch.bfloat16, True),
         ((1, 3, 1024), torch.float16, False), ((2, 5000), torch.bfloat16, True),
         ((2, 3, 8191), torch.float32, True),
         ((1, 1025, 2056), torch.bfloat16, True)]  # backward: a thread walks two rows (TY = 1)
for prefetch, (shape, dt, gamma) in itertools.product((False, True), cases):
    layerscale.CUDA_PREFETCH = prefetch
    C = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dt)
    y = torch.randn(*shape[:-1], C + 1, device="cuda", dtype=dt)[..., 1:]  # misaligned view
    for yy in (y, y.contiguous()):
        leaves = [x.clone().requires_grad_(), yy.detach().requires_grad_(),
                  torch.randn(C, device="cuda").requires_grad_() if gamma else None,
                  torch.randn(C, device="cuda").requires_grad_(),
                  torch.randn(C, device="cuda").requires_grad_()]
        with ops.use_backend("cuda"):
            keep = torch.rand(shape[0], device="cuda") > 0.5
            out, normed = ops.layerscale_residual_layernorm(*leaves, 1e-6, keep, 0.5)
            ln = ops.layer_norm(yy, leaves[3], leaves[4])
        (out.float().square().sum() + normed.float().sum() + ln.float().square().sum()).backward()
torch.cuda.synchronize()
print("sanitizer script done")
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_compute_sanitizer(tool):
    run_sanitizer(tool, "lsln_", SANITIZER_SCRIPT)
