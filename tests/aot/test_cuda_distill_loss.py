"""Tier 2 for csrc/distill_loss.cu (DESIGN.md section 6), no GPU needed: the built extension
holds the distillation-loss kernels for sm_80 and sm_90 without spills or stack frames,
registers the op's schema, checks its inputs (through the Meta kernel, which runs the same checks
as the CUDA one), gives the outputs the Triton kernel gives (shapes, dtypes) and refuses CPU
tensors with an error instead of crashing."""
import pytest
import torch

# so_path, resource_usage and ops are tests/aot/conftest.py's: so_path skips when deit_fast._C was
# not built (tests/aot/test_cuda_extension.py decides whether that is a failure).
from tests.aot.extension import ARCHS, assert_no_spills, named

pytestmark = pytest.mark.aot
F32, F16, BF16, I64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
KERNELS = ("distill_loss_rows_kernel", "distill_loss_stream_kernel")


def test_kernels_for_both_archs_without_spills(resource_usage):
    """Every instantiation (3 dtypes x 3 kinds x vector/scalar x 2 kernels) on sm_80 and sm_90:
    no local memory, no stack frame, at most the 128 registers of a 512-thread block."""
    for a in ARCHS:
        kernels = named(resource_usage[a], *KERNELS)
        for k in KERNELS:
            assert sum(k in name for name in kernels) == 18, (a, k, sorted(kernels))
        assert_no_spills(kernels, 128, a)
        scale = named(resource_usage[a], "distill_loss_scale_kernel")  # the backward
        assert len(scale) == 1, (a, sorted(scale))
        assert_no_spills(scale, 255, a)


def test_schema(ops):
    assert str(ops.distillation_loss_forward.default._schema) == (
        "deit_fast_C::distillation_loss_forward(Tensor logits, Tensor? dist_logits, Tensor target, "
        "Tensor? teacher_logits, str kind, float alpha, float tau, float label_smoothing, "
        "str kl_reduction, bool grad_logits, bool grad_dist, Tensor(a!) tickets) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)")
    assert str(ops.distillation_loss_backward.default._schema) == (
        "deit_fast_C::distillation_loss_backward(Tensor grad_logits, Tensor grad_dist, "
        "Tensor dloss, ScalarType logits_dtype, ScalarType dist_dtype) -> (Tensor, Tensor)")


def test_the_op_picks_the_extension_for_the_cuda_backend(so_path):
    from deit_fast.ops import distill_loss
    assert distill_loss._kernels("cuda") == (torch.ops.deit_fast_C.distillation_loss_forward,
                                             torch.ops.deit_fast_C.distillation_loss_backward)


def meta(shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def tickets():
    return meta((1,), torch.int32)


def args(B=4, C=37, dtype=F32, dist_dtype=None, target="int", kind="hard", grads=(True, True)):
    heads = kind != "none"
    y = meta((B,), I64) if target == "int" else meta((B, C), target)
    return [meta((B, C), dtype), meta((B, C), dist_dtype or dtype) if heads else None, y,
            meta((B, C), dtype) if heads else None, kind, 0.5, 2.0, 0.1, "numel", *grads,
            tickets()]


@pytest.mark.parametrize("B,C", [(1, 10), (3, 37), (256, 1000), (3, 4096), (2, 4097), (3, 21841)],
                         ids=str)
@pytest.mark.parametrize("kind", ["none", "hard", "soft"])
@pytest.mark.parametrize("dtype,dist_dtype,target", [(F32, F32, "int"), (F16, F16, F32),
                                                     (BF16, BF16, "int"), (BF16, F32, BF16)], ids=str)
def test_output_metadata_and_opcheck(ops, B, C, kind, dtype, dist_dtype, target):
    a = args(B, C, dtype, dist_dtype, target, kind)
    loss, parts, rows, ds, dd = ops.distillation_loss_forward(*a)
    assert [(x.shape, x.dtype) for x in (loss, parts, rows)] == [((), F32), ((2,), F32),
                                                                 ((B, 3), F32)]
    grad_dtype = lambda t: F32 if t == F16 else t  # the op's _grad_dtype
    assert (ds.shape, ds.dtype) == ((B, C), grad_dtype(dtype)) and ds.is_contiguous()
    if kind == "none":
        assert (dd.shape, dd.dtype) == ((0,), dtype)
    else:
        assert (dd.shape, dd.dtype) == ((B, C), grad_dtype(dist_dtype)) and dd.is_contiguous()
    torch.library.opcheck(ops.distillation_loss_forward.default, a)


@pytest.mark.parametrize("grads", [(False, False), (True, False), (False, True)], ids=str)
def test_grads_not_asked_for_are_empty(ops, grads):
    _, _, _, ds, dd = ops.distillation_loss_forward(*args(dtype=BF16, grads=grads))
    assert ds.shape == ((4, 37) if grads[0] else (0,))
    assert dd.shape == ((4, 37) if grads[1] else (0,))
    assert ds.dtype == dd.dtype == BF16


def test_matches_the_fake_impl_of_the_op(ops):
    """The custom op's fake impl (what torch.compile sees) and the extension's Meta kernel agree."""
    from deit_fast.ops import distill_loss  # noqa: F401  (registers deit_fast::distillation_loss)
    a = args(3, 37, F16, F32, "int", "soft")
    fake = torch.ops.deit_fast.distillation_loss(*a[:4], "soft", "numel", [0.5, 2.0, 0.1],
                                                 [True, True], "cuda")  # meta: the fake impl
    loss, parts, _, ds, dd = ops.distillation_loss_forward(*a)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in (loss, parts, ds, dd)]


def test_strided_and_transposed_heads(ops):
    s = meta((3, 80))[:, 5:42]
    t = meta((37, 3)).t()
    _, _, _, ds, dd = ops.distillation_loss_forward(s, s, meta((3,), I64), t, "soft", 0.5, 1.0,
                                                    0.0, "batchmean", True, True, tickets())
    assert ds.shape == dd.shape == (3, 37) and ds.is_contiguous() and dd.is_contiguous()


def test_kind_none_ignores_the_other_heads(ops):
    out = ops.distillation_loss_forward(meta((2, 10)), meta((5,)), meta((2,), I64), None, "none",
                                        0.5, 1.0, 0.0, "numel", True, True, tickets())
    assert out[4].shape == (0,)


@pytest.mark.parametrize("change,match", [
    (dict(kind="medium"), "kind must be"),
    (dict(kl_reduction="mean"), "kl_reduction must be"),
    (dict(logits=meta((4, 37, 1))), "logits must be"),
    (dict(logits=meta((4, 37), torch.float64)), "logits dtype"),
    (dict(dist_logits=None), "dist_logits is required"),
    (dict(teacher_logits=None), "teacher_logits is required"),
    (dict(dist_logits=meta((4, 36))), "dist_logits must have"),
    (dict(teacher_logits=meta((3, 37))), "teacher_logits must have"),
    (dict(dist_logits=meta((4, 37), torch.int32)), "dist_logits dtype"),
    (dict(teacher_logits=meta((4, 37), torch.float64)), "teacher_logits dtype"),
    (dict(target=meta((4,), torch.int32)), "target must be int64"),
    (dict(target=meta((5,), I64)), "target must have shape"),
    (dict(target=meta((4, 36))), "target must have"),
    (dict(target=meta((4, 37), torch.float64)), "target dtype"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(tau=0.0), "tau"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(tickets=meta((1,), I64)), "tickets must be one contiguous int32"),
    (dict(tickets=meta((2,), torch.int32)), "tickets must be one contiguous int32"),
])
def test_bad_input_names_the_argument(ops, change, match):
    a = dict(logits=meta((4, 37)), dist_logits=meta((4, 37)), target=meta((4,), I64),
             teacher_logits=meta((4, 37)), kind="hard", alpha=0.5, tau=1.0, label_smoothing=0.0,
             kl_reduction="numel", grad_logits=True, grad_dist=True, tickets=tickets())
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.distillation_loss_forward(*a.values())


def test_inputs_on_two_devices_raise(ops):
    with pytest.raises(RuntimeError, match="teacher_logits is on cpu"):
        ops.distillation_loss_forward(meta((2, 10)), meta((2, 10)), meta((2,), I64),
                                      torch.randn(2, 10), "hard", 0.5, 1.0, 0.0, "numel", True, True,
                                      tickets())


def test_cpu_tensors_raise_instead_of_crashing(ops):
    s = torch.randn(2, 10)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.distillation_loss_forward(s, s, torch.tensor([1, 2]), s, "hard", 0.5, 1.0, 0.0, "numel",
                                      True, True, torch.zeros(1, dtype=torch.int32))


# ---- the backward: the saved grads times the loss's upstream grad, one launch ----

@pytest.mark.parametrize("saved,heads", [((F32, F32), (F32, F32)), ((BF16, BF16), (BF16, BF16)),
                                         ((F32, F32), (F16, F16)), ((F32, BF16), (F16, BF16))],
                         ids=str)
def test_backward_outputs_and_opcheck(ops, saved, heads):
    """Each head's result has its saved grad's shape in the head's dtype; an empty saved grad
    (a head that needs none) gives an empty result."""
    for shapes in (((4, 37), (4, 37)), ((4, 37), (0,)), ((0,), (4, 37))):
        a = [meta(shapes[0], saved[0]), meta(shapes[1], saved[1]), meta((), F32), *heads]
        out = ops.distillation_loss_backward(*a)
        assert [(o.shape, o.dtype) for o in out] == list(zip(shapes, heads))
        torch.library.opcheck(ops.distillation_loss_backward.default, a)


def test_backward_matches_the_fake_impl_of_the_op(ops):
    from deit_fast.ops import distill_loss  # noqa: F401  (registers the custom ops)
    a = [meta((3, 37)), meta((0,)), meta((), F32), F16, BF16]
    fake = torch.ops.deit_fast.distillation_loss_backward(*a, "cuda")  # meta: the fake impl
    real = ops.distillation_loss_backward(*a)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@pytest.mark.parametrize("change,match", [
    (dict(dloss=meta((), BF16)), "dloss must be one fp32 element"),
    (dict(dloss=meta((2,), F32)), "dloss must be one fp32 element"),
    (dict(grad_logits=meta((4, 37), torch.float64)), "grad_logits dtype"),
    (dict(grad_dist=meta((37, 4)).t()), "grad_dist must be contiguous"),
    (dict(logits_dtype=torch.int32), "logits_dtype dtype"),
    (dict(dist_dtype=torch.float64), "dist_dtype dtype"),
    (dict(grad_dist=torch.empty(4, 37)), "grad_dist is on cpu but dloss is on meta"),
])
def test_backward_bad_input_names_the_argument(ops, change, match):
    a = dict(grad_logits=meta((4, 37)), grad_dist=meta((4, 37)), dloss=meta((), F32),
             logits_dtype=BF16, dist_dtype=BF16)
    a.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.distillation_loss_backward(*a.values())


def test_backward_on_cpu_tensors_raises_instead_of_crashing(ops):
    g = torch.randn(2, 10)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.distillation_loss_backward(g, g, torch.tensor(1.0), F32, F32)
