"""Self-attention: the Triton flash kernels vs the fp64 reference (interpreter on CPU, real on a
GPU), forward and dq/dk/dv, at ViT's odd sequence lengths and head dims, with strided qkv views."""

import pytest
import torch

from deit_fast import ops
from deit_fast.ops import reference
from deit_fast.ops.attention import split_qkv
from tests.conftest import DEVICE
from tests.ops.tolerance import assert_rule, poisoned_empty

# (B, H, N, D): N = 197/198 are DeiT's 224 px lengths, 48 is CaiT's head dim.
# Every kernel streams 32-wide tiles of keys (or queries) and takes the last N % 32 in one masked
# tile of 16 or 32 (kernels.attention._tail): N = 90 and 128 reach the 32-wide tail and no tail
# at all. A program owns 128 rows (forward, dq) or 64 keys (dk/dv): N = 197 leaves 69 and 5.
SHAPES = [(1, 1, 1, 32), (2, 3, 7, 48), (3, 1, 65, 64), (1, 4, 197, 48), (2, 1, 198, 64),
          (1, 3, 197, 32), (1, 1, 577, 64), (1, 1, 33, 128), (1, 2, 40, 80), (1, 2, 90, 64),
          (1, 1, 128, 32)]


def qkv_views(B, H, N, D, dtype, device=DEVICE):
    """q, k, v as the model takes them: strided views of one (B, N, 3, H, D) projection."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=torch.float64)
    return qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)


def run(fn, q, k, v, do, scale=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    return (out,) + torch.autograd.grad(out, leaves, do.to(out.dtype))


def triton_attention(q, k, v, scale):
    with ops.use_backend("triton"):
        return ops.attention(q, k, v, scale)


def check(q, k, v, scale=None):
    do = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    ours = run(triton_attention, q, k, v, do, scale)
    same = run(reference.attention, q, k, v, do, scale)  # the plain PyTorch math, same dtype
    ref = run(reference.attention, q.double(), k.double(), v.double(), do, scale)
    assert ours[0].transpose(1, 2).is_contiguous()  # token-major: see test_head_merge_is_a_view
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), ours, ref, same):
        assert a.dtype == q.dtype and a.shape == q.shape, name
        assert_rule(name, a, r, s)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(shape, dtype, monkeypatch):
    poisoned_empty(monkeypatch)
    check(*qkv_views(*shape, dtype))


@pytest.mark.parametrize("shape", [(2, 3, 7, 48), (1, 2, 197, 48), (1, 2, 40, 80), (1, 1, 33, 96)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_head_dim_matches_reference(shape, dtype, monkeypatch):
    """Head dims 48/80/96 as two exact blocks (32 + 16 ...) instead of one masked block."""
    from deit_fast.kernels import attention
    monkeypatch.setattr(attention, "SPLIT_HEAD_DIM", True)
    assert attention._blocks(shape[-1], True)[1] > 0
    poisoned_empty(monkeypatch)
    check(*qkv_views(*shape, dtype))


@pytest.mark.parametrize("shape", [(2, 3, 7, 48), (1, 2, 40, 80)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_head_dim_matches_reference(shape, dtype, monkeypatch):
    """SPLIT_HEAD_DIM False (a tune setting; the GPU tests run both): head dims 48 and 80 as one
    block of 64 / 128 columns masked past D. q, k, v are views of a projection whose heads are
    padded to the block with NaN, so that a load past D (in either operand of a product) or a
    store past D (into the next head of the token-major o) shows."""
    from deit_fast.kernels import attention
    monkeypatch.setattr(attention, "SPLIT_HEAD_DIM", False)
    B, H, N, D = shape
    block = attention._blocks(D, False)[0]
    assert block > D
    qkv = torch.full((B, N, 3, H, block), float("nan"), device=DEVICE, dtype=torch.float64)
    qkv[..., :D] = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=torch.float64)
    q, k, v = qkv.to(dtype)[..., :D].permute(2, 0, 3, 1, 4).unbind(0)
    poisoned_empty(monkeypatch)
    check(q, k, v)


def test_scale_and_contiguous_inputs():
    q, k, v = (t.contiguous() for t in qkv_views(2, 3, 65, 48, torch.float32))
    check(q, k, v, scale=0.37)


@pytest.mark.parametrize("D", [48, 64])
def test_k_and_v_with_different_strides(D):
    """Every other case gives k and v the same row strides (one projection, or both contiguous):
    here k is contiguous (B, H, N, D), v a token-major view of a wider projection and q a view
    with a non-unit head stride, so reading one with the other's strides shows."""
    B, H, N = 2, 3, 65
    q, k, v = qkv_views(B, H, N, D, torch.float32)
    wide = torch.randn(B, N, H, D + 16, device=DEVICE, dtype=torch.float64).float()
    v = wide[..., 16:].transpose(1, 2)
    k = k.contiguous()
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    check(q, k, v)


def test_head_merge_is_a_view():
    # o comes out (B, N, H, D) in memory, as FlashAttention writes it, so the blocks' head merge
    # o.transpose(1, 2).reshape(B, N, H * D) runs no copy kernel; the fake (torch.compile) agrees.
    q, k, v = qkv_views(2, 3, 7, 32, torch.float32)
    with ops.use_backend("triton"):
        o = ops.attention(q, k, v)
    merged = o.transpose(1, 2).reshape(2, 7, 3 * 32)
    assert merged.data_ptr() == o.data_ptr() and merged.is_contiguous()
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.deit_fast.attention.default(*(mode.from_tensor(t) for t in (q, k, v)), 0.2, "triton")
    assert fake[0].stride() == o.stride()


def test_large_logits_stay_finite():
    q, k, v = qkv_views(1, 2, 65, 64, torch.float16)
    check(q * 8, k * 8, v)


def all_negative_logits(device=DEVICE):
    """Every score near -290: lse is far below 0, so a padded key's exp2(-lse) overflows fp32
    unless the last key tile masks it (N=65 leaves a partial tile in every kernel). dq also
    needs the forward's and its own q k^T to round alike (kernels/attention.py, FWD_FP32)."""
    q, k, v = qkv_views(1, 2, 65, 64, torch.float32, device)
    u = torch.randn(64, device=device, dtype=torch.float32)
    check(0.1 * q + 6 * u, 0.1 * k - 6 * u, v)


def test_all_negative_logits_keep_grads_finite():
    all_negative_logits()


def test_grads_are_bitwise_deterministic():
    q, k, v = qkv_views(2, 3, 197, 48, torch.float16)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    first, second = run(triton_attention, q, k, v, do), run(triton_attention, q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_custom_ops_pass_opcheck():
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv_views(1, 2, 7, 32, torch.float32))
    torch.library.opcheck(torch.ops.deit_fast.attention.default, (q, k, v, 0.2, "triton"))


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = qkv_views(1, 2, 9, 32, torch.float32)

    def step(q, k, v):
        return ops.attention(q, k, v).square().sum()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.use_backend("triton"):
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        compiled(*a).backward()
        e = [t.clone().requires_grad_() for t in (q, k, v)]
        step(*e).backward()
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad)


def packed_matches_unpacked(B, H, N, D, dtype, device=DEVICE, backend="triton"):
    """ops.attention_qkv against ops.attention on the views of the same packed projection: the
    same kernels, so output and grads are bitwise equal; the packed grad is one contiguous tensor
    (no stack and reshape copies behind it)."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=torch.float64).to(dtype)
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)
    packed, unpacked = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    with ops.use_backend(backend):
        o = ops.attention_qkv(packed)
        o.backward(do)
        o_ref = ops.attention(*split_qkv(unpacked))
        o_ref.backward(do)
    assert torch.equal(o, o_ref) and o.stride() == o_ref.stride()
    assert torch.equal(packed.grad, unpacked.grad) and packed.grad.is_contiguous()


@pytest.mark.parametrize("shape,dtype", [((2, 3, 197, 48), torch.float16), ((1, 4, 65, 64), torch.float32),
                                         ((3, 1, 7, 32), torch.float32)], ids=str)
def test_packed_qkv_matches_unpacked(shape, dtype):
    packed_matches_unpacked(*shape, dtype)


def test_packed_qkv_custom_ops_pass_opcheck_and_compile():
    qkv = torch.randn(1, 7, 3, 2, 32, requires_grad=True, device=DEVICE)
    torch.library.opcheck(torch.ops.deit_fast.attention_qkv.default, (qkv, 0.2, "triton"))
    compiled = torch.compile(lambda t: ops.attention_qkv(t).square().sum(), backend="aot_eager",
                             fullgraph=True)
    with ops.use_backend("triton"):
        a, e = qkv.detach().clone().requires_grad_(), qkv.detach().clone().requires_grad_()
        compiled(a).backward()
        ops.attention_qkv(e).square().sum().backward()
    torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("shape,dtype,scale,arg", [
    ((2, 7, 3, 32), torch.float32, None, "qkv must have 5 dims"),
    ((2, 7, 2, 2, 32), torch.float32, None, "packed on dim 2"),
    ((2, 0, 3, 2, 32), torch.float32, None, "at least one token"),
    ((2, 7, 3, 2, 24), torch.float32, None, "qkv has head dim"),
    ((2, 7, 3, 2, 32), torch.float64, None, "qkv dtype"),
    ((2, 7, 3, 2, 32), torch.float32, -1.0, "scale"),
])
def test_packed_qkv_bad_inputs_are_named_before_launch(shape, dtype, scale, arg, monkeypatch):
    from deit_fast.kernels import attention
    monkeypatch.setattr(attention, "forward", lambda *a: pytest.fail("kernel launched"))
    with ops.use_backend("triton"), pytest.raises(ValueError, match=arg):
        ops.attention_qkv(torch.randn(shape, device=DEVICE, dtype=dtype), scale)


@pytest.mark.parametrize("args,arg", [
    (dict(D=24), "head dim"),
    (dict(dtype=torch.float64), "q dtype"),
    (dict(Nq=5), "queries"),
])
def test_kernel_limits_are_named_before_launch(args, arg, monkeypatch):
    from deit_fast.kernels import attention
    monkeypatch.setattr(attention, "forward", lambda *a: pytest.fail("kernel launched"))
    D, dtype = args.get("D", 32), args.get("dtype", torch.float32)
    q, k, v = qkv_views(1, 2, 7, D, dtype)
    q = q[:, :, :args["Nq"]] if "Nq" in args else q
    with ops.use_backend("triton"), pytest.raises(ValueError, match=arg):
        ops.attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 3, 197, 64), (8, 6, 198, 64), (4, 8, 196, 48), (2, 12, 577, 64),
                                   (2, 16, 785, 48), (3, 4, 1, 64), (3, 4, 7, 128)], ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["masked", "split"])
def test_gpu_bf16_fp16(shape, dtype, split, monkeypatch):
    from deit_fast.kernels import attention
    monkeypatch.setattr(attention, "SPLIT_HEAD_DIM", split)
    check(*qkv_views(*shape, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 6, 197, 64), (4, 8, 196, 48), (3, 4, 7, 128), (2, 3, 65, 96)],
                         ids=str)
def test_gpu_fp32(shape):
    """fp32 inputs: exact products on their own tiles (FWD_FP32 ...), spilling at 96 and 128."""
    check(*qkv_views(*shape, torch.float32, device="cuda"))


@pytest.mark.gpu
def test_gpu_all_negative_logits_keep_grads_finite():
    all_negative_logits("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(8, 6, 197, 64), (4, 8, 196, 48), (2, 3, 7, 32)], ids=str)
def test_gpu_packed_qkv_matches_unpacked(shape, backend):
    if ops._backend.unavailable("attention", backend, "cuda"):
        pytest.skip(f"no {backend} backend here")  # cuda: tests/ops/test_attention_cuda.py fails then
    packed_matches_unpacked(*shape, torch.bfloat16, device="cuda", backend=backend)

