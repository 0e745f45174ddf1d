"""Legal but unusual input to the kernel backends: strided parameters, empty batches, second
derivatives. Each case was silently wrong or failed with a foreign error before (an audit,
2026-11-28)."""
import pytest
import torch

from deit_fast import ops
from deit_fast.ops import reference

from ..conftest import DEVICE

KERNEL_BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _strided(*shape):
    """A non-contiguous view with the values of randn(*shape): every other column of a wider
    tensor (1-D: stride 2; 2-D: its transpose's transpose of a strided slice)."""
    return torch.randn(*shape, 2, device=DEVICE)[..., 0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_layerscale_parameters(backend):
    """gamma, LayerNorm weight and bias as strided or expanded views: the kernels read them as
    flat arrays, so the ops hand them over dense (max error was 5.6 for a stride-2 gamma)."""
    x, y = (torch.randn(2, 3, 40, device=DEVICE) for _ in range(2))
    g, w, b = _strided(40), _strided(40), _strided(40)
    expanded = torch.tensor(0.5, device=DEVICE).expand(40)  # stride 0: read past its storage
    with ops.use_backend(backend):
        got = [ops.layerscale_residual(x, y, g), ops.layerscale_residual(x, y, expanded),
               *ops.layerscale_residual_layernorm(x, y, g, w, b), ops.layer_norm(x, w, b)]
    want = [reference.layerscale_residual(x, y, g), reference.layerscale_residual(x, y, expanded),
            *reference.layerscale_residual_layernorm(x, y, g, w, b), reference.layer_norm(x, w, b)]
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_strided_talking_heads_weights():
    """Transposed mixing matrices and a strided b_w (max error 16.9 before), with their grads."""
    H = 4
    q, k, v = (torch.randn(1, H, 5, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    w_l, w_w = (torch.randn(H, H, device=DEVICE).t().requires_grad_() for _ in range(2))
    b_l, b_w = torch.randn(H, device=DEVICE), _strided(H).requires_grad_()
    grads = []
    for run in (lambda: reference.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w),
                lambda: ops.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w)):
        with ops.use_backend("triton"):
            out = run()
        grads.append([out] + list(torch.autograd.grad(out.square().sum(), (q, w_l, w_w, b_w))))
    for a, r in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, r, atol=2e-4, rtol=2e-4)


def _x(*shape):
    return torch.randn(*shape, device=DEVICE, requires_grad=True)


EMPTY = {
    "attention": lambda: ops.attention(_x(0, 2, 5, 32), _x(0, 2, 5, 32), _x(0, 2, 5, 32)),
    "attention_qkv": lambda: ops.attention_qkv(_x(0, 5, 3, 2, 32)),
    "class_attention": lambda: ops.class_attention(_x(0, 2, 1, 32), _x(0, 2, 5, 32), _x(0, 2, 5, 32)),
    "talking_heads_attention": lambda: ops.talking_heads_attention(
        _x(0, 2, 5, 32), _x(0, 2, 5, 32), _x(0, 2, 5, 32), _x(2, 2), _x(2), _x(2, 2), _x(2)),
    "talking_heads_attention_qkv": lambda: ops.talking_heads_attention_qkv(
        _x(0, 5, 3, 2, 32), _x(2, 2), _x(2), _x(2, 2), _x(2)),
    "layerscale_residual": lambda: ops.layerscale_residual(_x(0, 3, 8), _x(0, 3, 8), _x(8)),
    "layerscale_residual tokens": lambda: ops.layerscale_residual(_x(2, 0, 8), _x(2, 0, 8), _x(8)),
    "layerscale_residual_layernorm": lambda: ops.layerscale_residual_layernorm(
        _x(0, 3, 8), _x(0, 3, 8), _x(8), _x(8), _x(8))[1],
    "layer_norm": lambda: ops.layer_norm(_x(0, 3, 8), _x(8), _x(8)),
}


@pytest.mark.parametrize("op", list(EMPTY))
def test_empty_batch(op):
    """An empty batch gives empty outputs and grads on the kernel backends, as on torch (it was a
    reshape error or a ZeroDivisionError in the launch arithmetic)."""
    with ops.use_backend("triton"):
        out = EMPTY[op]()
    with ops.use_backend("torch"):
        want = EMPTY[op]()
    assert out.shape == want.shape and out.numel() == 0
    out.sum().backward()


def _x64(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64)


# (call, the argument the refusal names): what the kernel backends refuse at B > 0, at B = 0.
REFUSED_EMPTY = {
    "attention D=0": (lambda: ops.attention(*(_x(2, 2, 5, 0),) * 3), "q has head dim D=0"),
    "attention D=24": (lambda: ops.attention(*(_x(0, 2, 5, 24),) * 3), "q has head dim D=24"),
    "attention Nq != N": (lambda: ops.attention(_x(0, 2, 4, 32), _x(0, 2, 5, 32), _x(0, 2, 5, 32)),
                          "q has 4 queries"),
    "attention_qkv D=0": (lambda: ops.attention_qkv(_x(2, 5, 3, 2, 0)), "qkv has head dim D=0"),
    "class_attention D=0": (lambda: ops.class_attention(_x(2, 2, 1, 0), _x(2, 2, 5, 0),
                                                        _x(2, 2, 5, 0)), "q has head dim D=0"),
    "class_attention fp64": (lambda: ops.class_attention(_x64(0, 2, 1, 32), _x64(0, 2, 5, 32),
                                                         _x64(0, 2, 5, 32)), "q dtype"),
    "layerscale_residual fp64": (lambda: ops.layerscale_residual(_x64(0, 3, 8), _x64(0, 3, 8),
                                                                 _x64(8)), "x dtype"),
    "layerscale_residual_layernorm fp64": (lambda: ops.layerscale_residual_layernorm(
        _x64(0, 3, 8), _x64(0, 3, 8), _x64(8), _x64(8), _x64(8)), "x dtype"),
    "layer_norm fp64": (lambda: ops.layer_norm(_x64(0, 3, 8), _x64(8), _x64(8)), "x dtype"),
    "distillation_loss teacher with grad": (lambda: ops.distillation_loss(
        _x(0, 10), _x(0, 10), torch.zeros(0, dtype=torch.long, device=DEVICE), _x(0, 10),
        kind="hard"), "teacher_logits requires grad"),
}


@pytest.mark.parametrize("case", list(REFUSED_EMPTY))
def test_kernel_refusals_do_not_depend_on_the_batch(case):
    """The empty-input shortcut came before the kernel backends' checks: D = 0 (an empty tensor
    at any B) and every other refusal passed when B = 0."""
    call, message = REFUSED_EMPTY[case]
    with ops.use_backend("triton"), pytest.raises(ValueError, match=message):
        call()


DOUBLE = {
    "layerscale_residual": lambda x, w: ops.layerscale_residual(x, x * 2, w),
    "layerscale_residual_layernorm": lambda x, w: ops.layerscale_residual_layernorm(x, x, w, w, w)[1],
    "layer_norm": lambda x, w: ops.layer_norm(x, w, w),
    "attention": lambda x, w: ops.attention(*(x.view(1, 1, 2, 32) * w[:1],) * 3),
}


@pytest.mark.parametrize("op", list(DOUBLE))
def test_second_derivative_raises(op):
    """A gradient penalty through a fused op: the kernels' grads are not differentiable, so the
    second derivative raises (it was partial and silent: the kernel grads came back as constants,
    the torch ops around them differentiable)."""
    x, w = _x(2, 32), _x(32)
    with ops.use_backend("triton"):
        out = DOUBLE[op](x, w)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        gx.square().sum().backward()


def test_layerscale_residual_width_past_the_grid_is_refused():
    """Column tiles are the launch grid's second axis (at most 65535 on CUDA)."""
    from deit_fast.kernels.layerscale import MAX_C
    x = torch.zeros(1, device=DEVICE).expand(2, MAX_C + 1)  # no memory behind it
    with ops.use_backend("triton"), pytest.raises(ValueError, match=f"C={MAX_C + 1}"):
        ops.layerscale_residual(x, x, None)


def _huge_stride_view(tmp_path, shape, strides, values):
    """A view whose strides span more than 2^31 elements, over a sparse file: only the elements
    the view holds take memory."""
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(extent * 4)
    view = torch.from_file(str(path), shared=True, size=extent, dtype=torch.float32).as_strided(shape, strides)
    view.copy_(values)
    return view


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors under the interpreter (a GPU would need the 8 GB)")
@pytest.mark.parametrize("op", ["attention", "class_attention", "talking_heads_attention"])
def test_views_spanning_past_int32_are_read_right(tmp_path, op):
    """k with a row stride of 2^27 elements (a sequence-major view of a huge batch): the kernels
    address within a batch element in int32, so the op hands them a copy (an out-of-bounds read
    before: a segfault under the interpreter)."""
    H, N, D = 2, 17, 32
    k_values = torch.randn(1, H, N, D)
    k = _huge_stride_view(tmp_path, (1, H, N, D), (0, D, 2 ** 27, 1), k_values)
    q = torch.randn(1, H, 1 if op == "class_attention" else N, D)
    v = torch.randn(1, H, N, D)
    mix = [torch.randn(H, H), torch.randn(H), torch.randn(H, H), torch.randn(H)] if "talking" in op else []
    with ops.use_backend("triton"):
        got = getattr(ops, op)(q, k, v, *mix)
    want = getattr(reference, op)(q, k_values, v, *mix)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_int32_slices_copies_only_what_overflows():
    from deit_fast.ops import _checks
    base = torch.empty(2 ** 33, device="meta")
    wide = base.as_strided((3, 2, 17, 32), (2 ** 31, 32, 2 ** 27, 1))  # a batch element spans 2^31
    narrow = base.as_strided((3, 2, 17, 32), (2 ** 31, 32, 2 ** 20, 1))  # huge batch stride only
    assert _checks.int32_slices(wide).is_contiguous() and _checks.int32_slices(narrow) is narrow
