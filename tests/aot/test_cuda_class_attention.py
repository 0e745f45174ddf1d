"""Tier 2 for csrc/class_attention.cu (DESIGN.md section 6), no GPU needed: the built extension
registers the class-attention schemas, its Meta kernels (which run the same input checks as the
CUDA ones) give the right output shapes, dtypes and dk/dv layouts and pass opcheck, bad input
raises an error naming the argument, and CPU tensors are refused instead of crashing. The cubins'
register use is checked for every kernel by test_cuda_extension.test_no_register_spills; here,
that the class-attention kernels are among them. The prefetching kernels copy K and V by
cp.async with the right waits (their SASS), and deit_fast.ops.class_attention passes its
CUDA_PREFETCH to both ops."""
import importlib
import re

import pytest
import torch

from tests.aot.extension import ARCHS, flag_values, prefetch_kernels

pytestmark = pytest.mark.aot
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
HEAD_DIMS = (32, 48, 64, 80, 96, 128)


@pytest.fixture(scope="module")
def ops(ops, so_path):
    """tests/aot/conftest.py's ops (its so_path skips when deit_fast._C was not built:
    test_cuda_extension.test_extension_is_built decides whether that fails), with class attention."""
    assert hasattr(ops, "class_attention_forward"), (
        f"{so_path} has no class_attention ops: it predates csrc/class_attention.cu, rebuild it "
        "(pip install --no-build-isolation -e .)")
    return ops


def meta(shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_kernels_are_built_for_both_archs(ops, resource_usage):
    for arch in ARCHS:
        names = [k for k in resource_usage[arch] if "class_attn" in k]
        for kind in ("fwd_kernel", "bwd_kernel", "fwd_combine_kernel", "dq_combine_kernel"):
            assert any(f"class_attn_{kind}" in k for k in names), (arch, kind, names[:5])
        # 3 dtypes x 6 head dims x (split, whole) x (vector, vector with prefetch, element-wise),
        # per direction
        assert sum("class_attn_fwd_kernel" in k for k in names) == 108, arch
        assert sum("class_attn_bwd_kernel" in k for k in names) == 108, arch


def test_prefetch_kernels_copy_ahead_asynchronously(so_path, cuobjdump):
    """The prefetching key loop as compiled (sm_90 SASS): its K/V rows come by cp.async (LDGSTS),
    one commit group per pass (the prologue's and the loop's: two LDGDEPBAR), waited for with the
    next pass's group still in flight (DEPBAR.LE SB0, 0x1) and drained before the merge (0x0).
    Plain loads let ptxas sink the next pass's requests below this pass's math (it did, CUDA
    13.0), and a wait off by one computes on rows still landing: wrong numbers, no error."""
    found = prefetch_kernels(so_path, cuobjdump,
                             r"class_attn_(fwd|bwd)_kernelI\w+?ELb(?P<vec>\d)ELb\dELb(?P<pf>\d)E", {0, 1})
    for m, body in found:
        assert not re.search(r"\bLDG\.E\.(64|128)\b", body), f"{m.string}: K/V loaded into registers"
    seen = len(found)
    assert seen == 72  # 2 directions x 3 dtypes x 6 head dims x (split, whole)


def test_the_op_module_passes_prefetch(ops, monkeypatch):
    """deit_fast.ops.class_attention's CUDA_PREFETCH is what both extension ops get."""
    op_module = importlib.import_module("deit_fast.ops.class_attention")  # the package shadows it
    q, k = meta((2, 3, 1, 48), BF16), meta((2, 3, 7, 48), BF16)

    def both():
        out, lse, out_f32 = op_module._cuda_forward(q, k, k, 0.1)
        op_module._cuda_backward(out, q, k, k, out_f32, lse, 0.1)
    for flag in (False, True):
        monkeypatch.setattr(op_module, "CUDA_PREFETCH", flag)
        assert flag_values("prefetch", both) == [("deit_fast_C.class_attention_forward.default", flag),
                                                 ("deit_fast_C.class_attention_backward.default", flag)]


def test_schemas(ops):
    assert str(ops.class_attention_forward.default._schema) == (
        "deit_fast_C::class_attention_forward(Tensor q, Tensor k, Tensor v, float scale, "
        "bool prefetch=False) -> (Tensor, Tensor, Tensor)")
    assert str(ops.class_attention_backward.default._schema) == (
        "deit_fast_C::class_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, float scale, bool prefetch=False) -> (Tensor, Tensor, Tensor)")


def test_cpu_tensors_raise_instead_of_crashing(ops):
    q, k = torch.randn(2, 3, 1, 48), torch.randn(2, 3, 7, 48)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.class_attention_forward(q, k, k, 0.1)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.class_attention_backward(q, q, k, k, q.float(), torch.zeros(2, 3), 0.1)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("B,H,N", [(2, 3, 7), (1, 1, 1), (4, 8, 577), (0, 2, 5)], ids=str)
def test_output_metadata_and_opcheck(ops, B, H, N, D, dtype):
    q, k, v = meta((B, H, 1, D), dtype), meta((B, H, N, D), dtype), meta((B, H, N, D), dtype)
    out, lse, out_f32 = ops.class_attention_forward(q, k, v, D ** -0.5)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((B, H, 1, D), dtype, (B, H), F32)
    assert (out_f32.shape, out_f32.dtype) == ((B, H, 1, D), F32)
    assert out.is_contiguous() and lse.is_contiguous() and out_f32.is_contiguous()
    dq, dk, dv = ops.class_attention_backward(meta((B, H, 1, D), dtype), q, k, v, out_f32, lse,
                                              0.5)
    assert (dq.shape, dk.shape, dv.shape) == ((B, H, 1, D), (B, H, N, D), (B, H, N, D))
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    torch.library.opcheck(ops.class_attention_forward.default, (q, k, v, 0.3))
    torch.library.opcheck(ops.class_attention_backward.default,
                          (out, q, k, v, out_f32, lse, 0.3))


def test_projection_views_give_token_major_grads(ops):
    """q a transposed (B, 1, H, D); k, v head-split views of one (B, N, 2, H, D) projection: dk
    and dv come back (B, N, H, D) in memory, as the Triton backend and the custom op's fake give."""
    from deit_fast.ops.class_attention import _grad_layout_fake
    B, H, N, D = 2, 4, 197, 48
    q = meta((B, 1, H, D), BF16).transpose(1, 2)
    kv = meta((B, N, 2, H, D), BF16).permute(2, 0, 3, 1, 4)
    out, lse, out_f32 = ops.class_attention_forward(q, kv[0], kv[1], 0.1)
    assert out.is_contiguous() and out.shape == (B, H, 1, D)
    dq, dk, dv = ops.class_attention_backward(out, q, kv[0], kv[1], out_f32, lse, 0.1)
    fake = _grad_layout_fake(kv[0])
    assert dk.stride() == dv.stride() == fake.stride() == (N * H * D, D, H * D, 1)
    assert dq.is_contiguous()
    torch.library.opcheck(ops.class_attention_backward.default,
                          (out, q, kv[0], kv[1], out_f32, lse, 0.1))


Q, K = meta((2, 3, 1, 48), BF16), meta((2, 3, 7, 48), BF16)


@pytest.mark.parametrize("change,arg", [
    (dict(q=meta((2, 3, 48), BF16)), "q must be"),
    (dict(q=meta((2, 3, 2, 48), BF16)), "q must be"),
    (dict(q=meta((2, 3, 1, 48), torch.float64), k=meta((2, 3, 7, 48), torch.float64),
          v=meta((2, 3, 7, 48), torch.float64)), "q dtype"),
    (dict(q=meta((2, 3, 1, 16), BF16), k=meta((2, 3, 7, 16), BF16), v=meta((2, 3, 7, 16), BF16)),
     "head dim D"),
    (dict(k=meta((2, 4, 7, 48), BF16)), "k must be"),
    (dict(k=meta((2, 3, 7, 32), BF16)), "k must be"),
    (dict(k=meta((2, 3, 0, 48), BF16), v=meta((2, 3, 0, 48), BF16)), "k must hold at least one key"),
    (dict(k=meta((2, 3, 7, 48), F16)), "k dtype"),
    (dict(v=meta((2, 3, 6, 48), BF16)), "v must have shape"),
    (dict(v=meta((2, 3, 7, 48), F32)), "v dtype"),
    (dict(scale=0.0), "scale"),
    (dict(scale=float("nan")), "scale"),
])
def test_bad_input_names_the_argument(ops, change, arg):
    args = dict(q=Q, k=K, v=K, scale=0.1)
    args.update(change)
    with pytest.raises(RuntimeError, match=arg):
        ops.class_attention_forward(*args.values())
    with pytest.raises(RuntimeError, match=arg):
        ops.class_attention_backward(args["q"], args["q"], args["k"], args["v"],
                                     meta(args["q"].shape), meta((2, 3)), args["scale"])


@pytest.mark.parametrize("change,arg", [
    (dict(dout=meta((2, 3, 1, 32), BF16)), "dout must have shape"),
    (dict(dout=meta((2, 3, 1, 48), F32)), "dout dtype"),
    (dict(out=meta((2, 3, 2, 48))), "out must have shape"),
    (dict(out=meta((2, 3, 1, 48), BF16)), "out dtype must be float32"),
    (dict(lse=meta((2, 4))), "lse must have shape"),
    (dict(lse=meta((2, 3), BF16)), "lse dtype"),
])
def test_bad_backward_input_names_the_argument(ops, change, arg):
    args = dict(dout=Q, q=Q, k=K, v=K, out=meta((2, 3, 1, 48)), lse=meta((2, 3)), scale=0.1)
    args.update(change)
    with pytest.raises(RuntimeError, match=arg):
        ops.class_attention_backward(*args.values())
