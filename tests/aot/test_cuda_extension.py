"""Tier 2 for the CUDA extension (DESIGN.md section 6), no GPU needed: deit_fast._C is built
(CI builds it wherever torch has CUDA and nvcc is present), holds sm_80 and sm_90 cubins with no
register spills, registers its op schemas, checks its inputs (through the Meta kernels, which run
the same checks as the CUDA ones) and refuses CPU tensors with an error instead of crashing."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.aot.extension import (ARCHS, archs_per_source, assert_no_spills, cubin_listing, cuda_home,
                                 why_not_built)

pytestmark = pytest.mark.aot
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _must_be_built():
    """Why this machine must have built the extension (as setup.py decides it), or None."""
    mode = os.environ.get("DEIT_FAST_BUILD_CUDA", "")
    if mode == "1":
        return "DEIT_FAST_BUILD_CUDA=1"
    nvcc = os.path.join(cuda_home(), "bin", "nvcc")
    if mode != "0" and torch.version.cuda and os.access(nvcc, os.X_OK):
        return f"torch has CUDA {torch.version.cuda} and {nvcc} exists, so setup.py builds it"
    return None


# The fixtures so_path, cuobjdump, resource_usage and ops are tests/aot/conftest.py's. so_path
# skips when deit_fast._C was not built: test_extension_is_built decides whether that is a failure.
def test_extension_is_built():
    why = why_not_built()
    if why is not None:
        must = _must_be_built()
        if must:
            pytest.fail(f"deit_fast._C was not built ({why}), but it should be: {must}")
        pytest.skip(f"deit_fast._C was not built: {why}")
    spec = importlib.util.find_spec("deit_fast._C")
    assert spec is not None and Path(spec.origin).is_file(), "_build_info says built, but no deit_fast._C"


def test_holds_sm80_and_sm90_cubins_for_every_source(so_path, cuobjdump):
    listing = cubin_listing(so_path, cuobjdump)
    per_source = archs_per_source(listing)
    assert "layerscale" in per_source, listing
    missing = {stem: sorted(ARCHS - archs) for stem, archs in per_source.items() if not ARCHS <= archs}
    assert not missing, f"sources without a cubin for some arch: {missing}\n{listing}"


def test_no_register_spills(resource_usage):
    assert ARCHS <= set(resource_usage), f"cubins found for {sorted(resource_usage)} only"
    for arch in ARCHS:
        kernels = resource_usage[arch]
        assert any("layerscale_fwd_kernel" in k for k in kernels), sorted(kernels)
        assert any("layerscale_bwd_kernel" in k for k in kernels), sorted(kernels)
        assert_no_spills(kernels, 255, arch)


# ---- the registered ops (the ops fixture: tests/aot/conftest.py) ----------------------------

def test_schemas(ops):
    assert str(ops.layerscale_residual_forward.default._schema) == (
        "deit_fast_C::layerscale_residual_forward(Tensor x, Tensor y, Tensor? gamma, Tensor? scale, "
        "ScalarType out_dtype) -> Tensor")
    assert str(ops.layerscale_residual_backward.default._schema) == (
        "deit_fast_C::layerscale_residual_backward(Tensor dout, Tensor y, Tensor? gamma, "
        "Tensor? scale) -> (Tensor, Tensor)")


def test_the_cuda_backend_sees_the_extension(so_path):
    from deit_fast.ops import _backend
    assert _backend._cuda_unavailable("cuda") in (None, "no CUDA device")


def test_cpu_tensors_raise_instead_of_crashing(ops):
    x, y, g, s = torch.randn(2, 7, 33), torch.randn(2, 7, 33), torch.randn(33), torch.ones(2)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.layerscale_residual_forward(x, y, g, s, F32)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.layerscale_residual_backward(x, y, g, s)


def meta(shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("shape", [(2, 7, 33), (5, 1024), (2, 3, 4, 16)], ids=str)
@pytest.mark.parametrize("dtypes", [(F32, F32, F32, F32), (BF16, BF16, F32, F32),
                                    (BF16, BF16, BF16, BF16), (F32, F16, F32, F32),
                                    (F16, BF16, None, F32), (F32, F32, BF16, F32)], ids=str)
def test_output_metadata_and_opcheck(ops, shape, dtypes):
    xd, yd, gd, od = dtypes
    x, y = meta(shape, xd), meta(shape, yd)
    g = meta(shape[-1:], gd) if gd is not None else None
    s = meta(shape[:1])
    out = ops.layerscale_residual_forward(x, y, g, s, od)
    assert out.shape == x.shape and out.dtype == od and out.is_contiguous()
    dy, dgamma = ops.layerscale_residual_backward(meta(shape, od), y, g, s)
    assert dy.shape == y.shape and dy.dtype == yd and dy.is_contiguous()
    assert (tuple(dgamma.shape), dgamma.dtype) == (((shape[-1],), gd) if g is not None else ((0,), yd))
    torch.library.opcheck(ops.layerscale_residual_forward.default, (x, y, g, s, od))
    torch.library.opcheck(ops.layerscale_residual_backward.default, (meta(shape, od), y, g, s))


def test_strided_views_keep_contiguous_outputs(ops):
    x = meta((2, 7, 99))[..., 33:66]
    y = meta((7, 2, 33)).transpose(0, 1)
    out = ops.layerscale_residual_forward(x, y, None, None, F32)
    assert out.shape == (2, 7, 33) and out.is_contiguous()
    dy, _ = ops.layerscale_residual_backward(x, y, None, None)
    assert dy.shape == (2, 7, 33) and dy.is_contiguous()


@pytest.mark.parametrize("change,arg", [
    (dict(x=meta((33,))), "x must be"),
    (dict(y=meta((2, 7, 32))), "y must have"),
    (dict(x=meta((2, 7, 33), torch.float64)), "x dtype"),
    (dict(y=meta((2, 7, 33), torch.int32)), "y dtype"),
    (dict(gamma=meta((32,))), "gamma must have shape"),
    (dict(gamma=meta((2, 33))), "gamma must have shape"),
    (dict(gamma=meta((33,), torch.float64)), "gamma dtype"),
    (dict(scale=meta((3,))), "scale must have shape"),
    (dict(scale=meta((2,), F16)), "scale dtype"),
    (dict(out_dtype=torch.float64), "out_dtype dtype"),
])
def test_bad_input_names_the_argument(ops, change, arg):
    args = dict(x=meta((2, 7, 33)), y=meta((2, 7, 33), BF16), gamma=meta((33,)), scale=meta((2,)),
                out_dtype=F32)
    args.update(change)
    with pytest.raises(RuntimeError, match=arg):
        ops.layerscale_residual_forward(*args.values())
    if "out_dtype" not in change:
        bwd = dict(args, dout=args["x"])
        with pytest.raises(RuntimeError, match=arg.replace("x ", "dout ")):
            ops.layerscale_residual_backward(bwd["dout"], bwd["y"], bwd["gamma"], bwd["scale"])
