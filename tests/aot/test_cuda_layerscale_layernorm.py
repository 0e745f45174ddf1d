"""Tier 2 for the residual + LayerNorm ops of the CUDA extension (csrc/layerscale_layernorm.cu), no
GPU needed: their kernels are in the build for sm_80 and sm_90 without spills, the op schemas are
registered, the Meta kernels (which run the CUDA kernels' input checks) give the right output
metadata and pass opcheck, bad input raises naming the argument, and CPU tensors are refused;
the backward's prefetch variant copies dout and y by cp.async with the right waits (its SASS), and
deit_fast.ops.layerscale passes its CUDA_PREFETCH to the op."""
import importlib

import pytest
import torch

# so_path, cuobjdump, resource_usage (cuobjdump's register and spill report of the cubins) and ops
# are tests/aot/conftest.py's, shared with the extension's own tier-2 test: so_path skips when
# deit_fast._C was not built (tests/aot/test_cuda_extension.py decides whether that is a failure).
from tests.aot.extension import ARCHS, assert_no_spills, flag_values, named, prefetch_kernels

pytestmark = pytest.mark.aot
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-6


def meta(shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_kernels_are_built_without_spills(resource_usage):
    for arch in ARCHS:
        kernels = resource_usage[arch]
        for name in ("lsln_fwd_kernel", "lsln_bwd_kernel", "lsln_colsum_kernel"):
            ours = named(kernels, name)
            assert ours, f"{arch}: no {name} among {len(kernels)} kernels: deit_fast._C predates it?"
            # The backward keeps 48 column sums per thread in registers under a 512-thread bound.
            assert_no_spills(ours, 128 if name == "lsln_bwd_kernel" else 255, f"{arch}: {name}")


def test_prefetch_backward_copies_dout_and_y_ahead(so_path, cuobjdump):
    """The backward's PF variant as compiled (sm_90 SASS): dout and y come by cp.async (LDGSTS),
    one commit group a row (the first row's before the loop, the next row's at the end of each:
    two LDGDEPBAR), and each row waits for all of its group (DEPBAR.LE SB0, 0x0) before reading
    them; no local memory. Built for the vector path only, and for 16-bit y only (see
    backward_impl). The plain kernels copy nothing."""
    found = prefetch_kernels(so_path, cuobjdump, r"lsln_bwd_kernelI(\w+?)Lb(?P<vec>\d)ELb(?P<pf>\d)E", {0})
    seen = {m.group(1) for m, _ in found}
    # (x, y, out): out fp32 with x of 3 dtypes and y fp16 or bf16; all fp16; all bf16
    assert len(seen) == 8 and "fff" not in seen, sorted(seen)


def test_the_op_module_passes_prefetch(ops, monkeypatch):
    """deit_fast.ops.layerscale's CUDA_PREFETCH is what the fused backward op gets (the plain
    LayerNorm's has no residual, so no flag)."""
    op_module = importlib.import_module("deit_fast.ops.layerscale")
    _, backward = op_module._ln_kernels("cuda")
    x, w, stat = meta((2, 7, 384), F32), meta((384,), F32), meta((14,), F32)

    def call():
        backward(x, x, x, meta((2, 7, 384), BF16), w, None, w, stat, stat, F32)
        backward(None, x, x, None, None, None, w, stat, stat, F32)
    for flag in (False, True):
        monkeypatch.setattr(op_module, "CUDA_PREFETCH", flag)
        assert flag_values("prefetch", call) == [
            ("deit_fast_C.layerscale_residual_layernorm_backward.default", flag)]


def test_schemas(ops):
    assert str(ops.layerscale_residual_layernorm_forward.default._schema) == (
        "deit_fast_C::layerscale_residual_layernorm_forward(Tensor x, Tensor y, Tensor? gamma, "
        "Tensor? scale, Tensor weight, Tensor bias, float eps, ScalarType out_dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor)")
    assert str(ops.layerscale_residual_layernorm_backward.default._schema) == (
        "deit_fast_C::layerscale_residual_layernorm_backward(Tensor dout, Tensor dnormed, Tensor out, "
        "Tensor y, Tensor? gamma, Tensor? scale, Tensor weight, Tensor mean, Tensor rstd, "
        "ScalarType x_dtype, bool prefetch=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
    assert str(ops.layer_norm_forward.default._schema) == (
        "deit_fast_C::layer_norm_forward(Tensor x, Tensor weight, Tensor bias, float eps) "
        "-> (Tensor, Tensor, Tensor)")
    assert str(ops.layer_norm_backward.default._schema) == (
        "deit_fast_C::layer_norm_backward(Tensor dnormed, Tensor x, Tensor weight, Tensor mean, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor)")


def test_cpu_tensors_raise_instead_of_crashing(ops):
    x, y, g, s = torch.randn(2, 7, 33), torch.randn(2, 7, 33), torch.randn(33), torch.ones(2)
    w, b, m = torch.ones(33), torch.zeros(33), torch.zeros(14)
    calls = [lambda: ops.layerscale_residual_layernorm_forward(x, y, g, s, w, b, EPS, F32),
             lambda: ops.layerscale_residual_layernorm_backward(x, x, x, y, g, s, w, m, m, F32),
             lambda: ops.layer_norm_forward(x, w, b, EPS),
             lambda: ops.layer_norm_backward(x, x, w, m, m)]
    for call in calls:
        with pytest.raises(NotImplementedError, match="CPU"):
            call()


SHAPES = [(2, 7, 33), (5, 1024), (2, 3, 4, 192), (1, 1, 8192), (3, 1)]
# (x, y, gamma, result): what the op produces (the promotion of x, y and gamma); gamma None: none.
DTYPES = [(F32, F32, F32, F32), (BF16, BF16, F32, F32), (BF16, BF16, BF16, BF16), (F16, F16, None, F16),
          (F32, F16, F32, F32), (F16, BF16, None, F32), (BF16, F32, BF16, F32)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_fused_metadata_and_opcheck(ops, shape, dtypes):
    xd, yd, gd, od = dtypes
    C, rows = shape[-1], 1
    for d in shape[:-1]:
        rows *= d
    x, y = meta(shape, xd), meta(shape, yd)
    g = meta((C,), gd) if gd is not None else None
    s, w, b = meta(shape[:1]), meta((C,)), meta((C,), BF16)
    out, normed, mean, rstd = ops.layerscale_residual_layernorm_forward(x, y, g, s, w, b, EPS, od)
    for t in (out, normed):
        assert t.shape == x.shape and t.dtype == od and t.is_contiguous()
    for t in (mean, rstd):
        assert t.shape == (rows,) and t.dtype == F32
    dout = meta(shape, od)
    dx, dy, dg, dw, db = ops.layerscale_residual_layernorm_backward(dout, dout, out, y, g, s, w, mean, rstd,
                                                                     xd)
    assert dx.shape == x.shape and dx.dtype == xd and dx.is_contiguous()
    assert dy.shape == y.shape and dy.dtype == yd and dy.is_contiguous()
    assert (tuple(dg.shape), dg.dtype) == (((C,), gd) if g is not None else ((0,), yd))
    for t in (dw, db):  # both in weight's dtype, as the Triton twin and the fake impl
        assert t.shape == (C,) and t.dtype == F32
    torch.library.opcheck(ops.layerscale_residual_layernorm_forward.default, (x, y, g, s, w, b, EPS, od))
    torch.library.opcheck(ops.layerscale_residual_layernorm_backward.default,
                          (dout, dout, out, y, g, s, w, mean, rstd, xd))
    torch.library.opcheck(ops.layerscale_residual_layernorm_backward.default,
                          (dout, dout, out, y, None, None, w, mean, rstd, xd))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_plain_metadata_and_opcheck(ops, shape, dtype):
    C = shape[-1]
    x, w, b = meta(shape, dtype), meta((C,)), meta((C,), dtype)
    normed, mean, rstd = ops.layer_norm_forward(x, w, b, EPS)
    assert normed.shape == x.shape and normed.dtype == dtype and normed.is_contiguous()
    assert mean.shape == rstd.shape == (x.numel() // C,) and mean.dtype == rstd.dtype == F32
    dx, dw, db = ops.layer_norm_backward(normed, x, w, mean, rstd)
    assert dx.shape == x.shape and dx.dtype == dtype and dx.is_contiguous()
    assert dw.shape == db.shape == (C,) and dw.dtype == db.dtype == F32
    torch.library.opcheck(ops.layer_norm_forward.default, (x, w, b, EPS))
    torch.library.opcheck(ops.layer_norm_backward.default, (normed, x, w, mean, rstd))


def test_strided_views_keep_contiguous_outputs(ops):
    x = meta((2, 7, 99))[..., 33:66]
    y = meta((7, 2, 33)).transpose(0, 1)
    w = meta((33,))
    out, normed, mean, rstd = ops.layerscale_residual_layernorm_forward(x, y, None, None, w, w, EPS, F32)
    assert out.shape == normed.shape == (2, 7, 33) and out.is_contiguous() and normed.is_contiguous()
    dx, dy, _, _, _ = ops.layerscale_residual_layernorm_backward(x, y, out, y, None, None, w, mean, rstd, F32)
    assert dx.is_contiguous() and dy.is_contiguous()
    normed, mean, rstd = ops.layer_norm_forward(x, w, w, EPS)
    assert normed.shape == (2, 7, 33) and normed.is_contiguous() and mean.shape == (14,)
    dx, _, _ = ops.layer_norm_backward(y, x, w, mean, rstd)
    assert dx.shape == (2, 7, 33) and dx.is_contiguous()


def test_empty_rows_and_channels(ops):
    for shape in [(0, 7, 16), (2, 0, 16), (2, 3, 0)]:
        x, w = meta(shape), meta(shape[-1:])
        out, normed, mean, rstd = ops.layerscale_residual_layernorm_forward(x, x, w, None, w, w, EPS, F32)
        rows = shape[0] * shape[1]
        assert out.shape == normed.shape == shape and mean.shape == rstd.shape == (rows,)
        dx, dy, dg, dw, db = ops.layerscale_residual_layernorm_backward(x, x, out, x, w, None, w, mean, rstd,
                                                                         F32)
        assert dx.shape == dy.shape == shape and dg.shape == dw.shape == db.shape == shape[-1:]


def fused_args(**change):
    args = dict(x=meta((2, 7, 33)), y=meta((2, 7, 33), BF16), gamma=meta((33,)), scale=meta((2,)),
                weight=meta((33,)), bias=meta((33,)), eps=EPS, out_dtype=F32)
    args.update(change)
    return args


@pytest.mark.parametrize("change,arg", [
    (dict(x=meta((33,))), "x must be"),
    (dict(x=meta((2, 7, 33), torch.float64)), "x dtype"),
    (dict(x=meta((2, 7, 8193)), y=meta((2, 7, 8193)), gamma=None, weight=meta((8193,)), bias=meta((8193,))),
     "C=8193"),
    (dict(y=meta((2, 7, 32))), "y must have x's shape"),
    (dict(y=meta((2, 7, 33), torch.int32)), "y dtype"),
    (dict(gamma=meta((32,))), "gamma must have shape"),
    (dict(gamma=meta((33,), torch.float64)), "gamma dtype"),
    (dict(scale=meta((3,))), "scale must have shape"),
    (dict(scale=meta((2,), F16)), "scale dtype"),
    (dict(weight=meta((2, 33))), "weight must have shape"),
    (dict(weight=meta((33,), torch.float64)), "weight dtype"),
    (dict(bias=meta((34,))), "bias must have shape"),
    (dict(eps=-1.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(out_dtype=torch.float64), "out_dtype dtype"),
    (dict(out_dtype=BF16), "out_dtype must be float32, or the dtype of both x and y"),
])
def test_fused_forward_bad_input_names_the_argument(ops, change, arg):
    with pytest.raises(RuntimeError, match=arg):
        ops.layerscale_residual_layernorm_forward(*fused_args(**change).values())


def bwd_args(**change):
    rows = (2, 7)
    args = dict(dout=meta((*rows, 33)), dnormed=meta((*rows, 33)), out=meta((*rows, 33)),
                y=meta((*rows, 33), BF16), gamma=meta((33,)), scale=meta((2,)), weight=meta((33,)),
                mean=meta((14,)), rstd=meta((14,)), x_dtype=BF16)
    args.update(change)
    return args


@pytest.mark.parametrize("change,arg", [
    (dict(out=meta((33,))), "out must be"),
    (dict(dout=meta((2, 7, 32))), "dout must have out's shape"),
    (dict(dout=meta((2, 7, 33), BF16)), "dout dtype must be out's"),
    (dict(dnormed=meta((2, 7, 33), F16)), "dnormed dtype must be out's"),
    (dict(y=meta((2, 6, 33))), "y must have out's shape"),
    (dict(gamma=meta((32,))), "gamma must have shape"),
    (dict(scale=meta((7,))), "scale must have shape"),
    (dict(weight=meta((32,))), "weight must have shape"),
    (dict(mean=meta((13,))), "mean must have shape"),
    (dict(rstd=meta((14,), F16)), "rstd dtype"),
    (dict(x_dtype=torch.int64), "x_dtype dtype"),
    (dict(dout=meta((2, 7, 33), F16), dnormed=meta((2, 7, 33), F16), out=meta((2, 7, 33), F16)),
     "out's dtype must be float32, or the dtype of both x and y"),
])
def test_fused_backward_bad_input_names_the_argument(ops, change, arg):
    with pytest.raises(RuntimeError, match=arg):
        ops.layerscale_residual_layernorm_backward(*bwd_args(**change).values())


@pytest.mark.parametrize("fn,args,arg", [
    ("layer_norm_forward", (meta((5,)), meta((5,)), meta((5,)), EPS), "x must be"),
    ("layer_norm_forward", (meta((2, 5)), meta((4,)), meta((5,)), EPS), "weight must have shape"),
    ("layer_norm_forward", (meta((2, 5)), meta((5,)), meta((5,), torch.int32), EPS), "bias dtype"),
    ("layer_norm_forward", (meta((2, 5)), meta((5,)), meta((5,)), -1.0), "eps must be"),
    ("layer_norm_forward", (meta((2, 9000)), meta((9000,)), meta((9000,)), EPS), "C=9000"),
    ("layer_norm_backward", (meta((2, 4)), meta((2, 5)), meta((5,)), meta((2,)), meta((2,))),
     "dnormed must have x's shape"),
    ("layer_norm_backward", (meta((2, 5), F16), meta((2, 5)), meta((5,)), meta((2,)), meta((2,))),
     "dnormed dtype must be x's"),
    ("layer_norm_backward", (meta((2, 5)), meta((2, 5)), meta((5,)), meta((3,)), meta((2,))),
     "mean must have shape"),
    ("layer_norm_backward", (meta((2, 5)), meta((2, 5)), meta((5,)), meta((2,)), meta((2,), BF16)),
     "rstd dtype"),
])
def test_plain_bad_input_names_the_argument(ops, fn, args, arg):
    with pytest.raises(RuntimeError, match=arg):
        getattr(ops, fn)(*args)


def test_inputs_on_two_devices_raise(ops):
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on meta"):
        ops.layerscale_residual_layernorm_forward(*fused_args(weight=torch.ones(33)).values())
    with pytest.raises(RuntimeError, match="mean is on cpu but out is on meta"):
        ops.layerscale_residual_layernorm_backward(*bwd_args(mean=torch.ones(14)).values())
