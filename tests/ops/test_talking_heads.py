"""Talking-heads attention: the fused Triton kernels vs the fp64 reference (interpreter on CPU,
real on a GPU): output and the grads of q, k, v and all four head-mixing parameters."""
import pytest
import torch

from deit_fast import ops
from deit_fast.kernels import talking_heads as kernels
from deit_fast.ops import reference
from deit_fast.ops.attention import split_qkv
from tests.conftest import DEVICE
from tests.ops.test_attention import qkv_views
from tests.ops.tolerance import assert_rule, poisoned_empty

# (B, H, N, D): CaiT has H = 4 (XXS), 8 (S), 16 (M) and D = 48.
SHAPES = [(1, 1, 1, 32), (2, 3, 7, 48), (1, 4, 65, 48), (1, 8, 20, 32), (1, 16, 17, 16), (2, 2, 33, 64)]
# The tensor-core kernels' two program layouts (kernels.talking_heads._grid): at (3, 8, 40, 48)
# programs straddle batch elements and the last is half dead; at (2, 8, 130, 16) each batch
# element's last program is.
TC_LAYOUTS = [(3, 8, 40, 48), (2, 8, 130, 16)]


def mixing(H, device=DEVICE):
    """Head-mixing parameters shaped like CaiT's proj_l / proj_w Linear layers (fp32)."""
    return (torch.randn(H, H, device=device) / H ** 0.5, torch.randn(H, device=device),
            torch.randn(H, H, device=device) / H ** 0.5, torch.randn(H, device=device) * 0.1)


def run(fn, inputs, do):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, do.to(out.dtype))


def fused(*args):
    with ops.use_backend("triton"):
        return ops.talking_heads_attention(*args)


def check(q, k, v, w):
    do = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    ours = run(fused, (q, k, v, *w), do)
    same = run(reference.talking_heads_attention, (q, k, v, *w), do)
    ref = run(reference.talking_heads_attention, [t.double() for t in (q, k, v, *w)], do)
    assert ours[0].transpose(1, 2).is_contiguous()  # token-major, as ops.attention's o
    names = ("out", "dq", "dk", "dv", "dw_l", "db_l", "dw_w", "db_w")
    for name, a, r, s in zip(names, ours, ref, same):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        if name == "db_l":  # mathematically zero; the fused op returns exact zeros
            assert torch.equal(a, torch.zeros_like(a))
        else:
            assert_rule(name, a, r, s, ulps=16)


@pytest.fixture(autouse=True)
def fused_strategy(monkeypatch):
    """This file's subject is the fused kernels, so both directions run them here; the default
    STRATEGY's chunked forward is tested in test_talking_heads_chunked.py."""
    monkeypatch.setattr(kernels, "STRATEGY", "fused")


# Both kernel families, forced: head mixing on CUDA cores and on tensor cores.
MIXING = pytest.mark.parametrize("tc", [False, True], ids=["mix_cuda_cores", "mix_tensor_cores"])
# The family and input dtype pairs that run: fp32 inputs take the CUDA-core family whatever
# TENSOR_CORE_MIXING says (kernels.talking_heads._family).
FAMILY_DTYPES = pytest.mark.parametrize("tc,dtype", [
    (False, torch.float32), (False, torch.float16), (True, torch.float16)],
    ids=["mix_cuda_cores-fp32", "mix_cuda_cores-fp16", "mix_tensor_cores-fp16"])


def test_default_family_is_tensor_cores_with_row_blocks_filling_the_slots():
    """TENSOR_CORE_MIXING True (the default) at every head count: its 16 slots hold 16 // HG row
    blocks of HG >= H heads (census.py: fewer SASS instructions per score than the CUDA-core
    family at 2 to 16 heads). Programs straddle batch elements where that saves dead blocks."""
    assert kernels.TENSOR_CORE_MIXING is True
    family = lambda heads: kernels._family(heads, None, torch.bfloat16)  # noqa: E731
    assert kernels._grid(family(4)[1], 256, 196, "BLOCK_M")[2] == {"STRADDLE": True}
    assert kernels._grid(family(8)[1], 256, 196, "BLOCK_M")[2] == {"STRADDLE": False}
    for (B, H, N, _), straddle in zip(TC_LAYOUTS, (True, False)):
        assert kernels._grid(family(H)[1], B, N, "BLOCK_N")[2] == {"STRADDLE": straddle}
    for heads in range(1, kernels.MAX_HEADS + 1):
        for dtype in (torch.float16, torch.bfloat16):
            (fwd, _, _), tiles = kernels._family(heads, None, dtype)
            assert fwd is kernels._th_fwd_tc and tiles["HP"] == 16
            assert heads <= tiles["HG"] < 2 * heads and 16 % tiles["HG"] == 0


def test_fp32_inputs_run_the_cuda_core_family(monkeypatch):
    """fp32 products are exact (no tensor core computes them), and the tensor-core kernels' fp32
    tiles need more shared memory than an sm_90 block may have: fp32 runs the CUDA-core kernels
    even with TENSOR_CORE_MIXING on, and asking for tensor cores outright is an error named
    before any launch."""
    for heads in (1, 4, 8, 16):
        assert kernels._family(heads, None, torch.float32)[0][0] is kernels._th_fwd
    monkeypatch.setattr(kernels, "_th_fwd_tc", lambda *a: pytest.fail("tensor-core kernel launched"))
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", True)
    q, k, v = qkv_views(1, 4, 9, 48, torch.float32)
    w_l, b_l, w_w, b_w = mixing(4)
    out, _ = kernels.forward(q, k, v, w_l, w_w, b_w, 48 ** -0.5)
    ref = reference.talking_heads_attention(*(t.double() for t in (q, k, v, w_l, b_l, w_w, b_w)))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="tc=True.*float32"):
        kernels.forward(q, k, v, w_l, w_w, b_w, 48 ** -0.5, tc=True)


@FAMILY_DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, tc, monkeypatch):
    poisoned_empty(monkeypatch)
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", tc)
    check(*qkv_views(*shape, dtype), mixing(shape[1]))


@pytest.mark.parametrize("shape", TC_LAYOUTS, ids=str)
def test_tensor_core_program_layouts_match_reference(shape, monkeypatch):
    poisoned_empty(monkeypatch)
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", True)
    check(*qkv_views(*shape, torch.float16), mixing(shape[1]))


@pytest.mark.parametrize("split", [True, False], ids=["32+16", "masked64"])
def test_head_dim_48_both_ways_match_reference(split, monkeypatch):
    """The tensor-core kernels take CaiT's head dim 48 as two exact blocks (SPLIT_HEAD_DIM, the
    default) or as one 64-wide block masked past 48."""
    assert kernels.SPLIT_HEAD_DIM is True
    tiles = kernels._family(8, True, torch.float16)[1]
    monkeypatch.setattr(kernels, "SPLIT_HEAD_DIM", split)
    assert kernels._head_dim(tiles, 48) == ({"BLOCK_D": 32, "BLOCK_D2": 16} if split else
                                            {"BLOCK_D": 64, "BLOCK_D2": 0})
    poisoned_empty(monkeypatch)
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", True)
    check(*qkv_views(3, 8, 40, 48, torch.float16), mixing(8))


@MIXING
def test_all_negative_logits_keep_grads_finite(tc, monkeypatch):
    """Every mixed logit near -110 (-160 in log2 units): lse is far below 0, so a padded key's exp2(-lse) overflows
    fp32 unless the last key tile masks it (N=40 leaves a partial tile in every kernel)."""
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", tc)
    dtype = torch.float16 if tc else torch.float32  # the tensor-core family's inputs are 16-bit
    q, k, v = qkv_views(1, 4, 40, 48, dtype)
    u = torch.randn(48, device=DEVICE, dtype=dtype)
    w_l, b_l, w_w, b_w = mixing(4)
    check(0.1 * q + 4 * u, 0.1 * k - 4 * u, v, (torch.eye(4, device=DEVICE) + 0.05 * w_l, b_l, w_w, b_w))


def test_all_negative_logits_with_a_dkdv_program_ending_at_key_n(monkeypatch):
    """The tensor-core dk/dv kernel masks keys past N only in programs that hold one (`tail`). At
    (2, 8, 47, 48) its programs straddle batch elements: the second holds keys 32..47 of image 0
    and 0..15 of image 1, so its last key is N itself, which must be masked too: with lse far
    below 0 that key's exp2(-lse) is inf, and the block-diagonal mixing (0 * inf) would spread NaN
    to image 1's keys."""
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", True)
    B, H, N, D = 2, 8, 47, 48
    assert kernels._grid(kernels._family(H, True, torch.float16)[1], B, N, "BLOCK_N")[2] == {"STRADDLE": True}
    q, k, v = qkv_views(B, H, N, D, torch.float16)
    u = torch.randn(D, device=DEVICE, dtype=torch.float16)
    w_l, b_l, w_w, b_w = mixing(H)
    check(0.1 * q + 4 * u, 0.1 * k - 4 * u, v, (torch.eye(H, device=DEVICE) + 0.05 * w_l, b_l, w_w, b_w))


@MIXING
def test_grads_are_bitwise_deterministic(tc, monkeypatch):
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", tc)
    q, k, v = qkv_views(2, 4, 40, 48, torch.float16)
    w = mixing(4)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    first, second = run(fused, (q, k, v, *w), do), run(fused, (q, k, v, *w), do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("shape", TC_LAYOUTS, ids=str)
def test_fused_dkdv_equals_two_launches(shape, monkeypatch):
    """FUSED_DKDV (one tensor-core kernel for dk and dv, the default) against one launch for each:
    the same products summed in the same order, so bitwise equal grads."""
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", True)
    q, k, v = qkv_views(*shape, torch.float16)
    w = mixing(shape[1])
    do = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    launches = []
    real_launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, *a, **kw: (
        launches.append((kernel, kw.get("DK"), kw.get("DV"))), real_launch(kernel, *a, **kw)))
    assert kernels.FUSED_DKDV is True
    fused_grads = run(fused, (q, k, v, *w), do)
    monkeypatch.setattr(kernels, "FUSED_DKDV", False)
    split_grads = run(fused, (q, k, v, *w), do)
    dkdv = [(dk, dv) for kernel, dk, dv in launches if kernel is kernels._th_bwd_dkdv_tc]
    assert dkdv == [(True, True), (True, False), (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(fused_grads, split_grads))


def test_dq_warps_reach_the_dq_launch_alone(monkeypatch):
    """TC_DQ_WARPS (a tune candidate: 16 warps, 128 registers) sets the dq kernel's num_warps and
    no other launch's, and the AOT list compiles dq with it. The interpreter ignores warps, so
    the grads are bitwise those of the default."""
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", True)
    q, k, v = qkv_views(1, 4, 20, 48, torch.float16)
    w = mixing(4)
    do = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    launches = []
    real_launch = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, *a, **kw: (
        launches.append((kernel, kw["num_warps"])), real_launch(kernel, *a, **kw)))
    assert kernels.TC_DQ_WARPS is None
    default = run(fused, (q, k, v, *w), do)
    monkeypatch.setattr(kernels, "TC_DQ_WARPS", 16)
    assert all(torch.equal(a, b) for a, b in zip(default, run(fused, (q, k, v, *w), do)))
    warps = kernels.TC_TILES["num_warps"]
    fwd, dq, dkdv = kernels._th_fwd_tc, kernels._th_bwd_dq_tc, kernels._th_bwd_dkdv_tc
    assert [(kn, n) for kn, n in launches if kn in (fwd, dq, dkdv)] == \
        [(fwd, warps), (dq, warps), (dkdv, warps), (fwd, warps), (dq, 16), (dkdv, warps)]
    aot = {(c["kernel"], c["num_warps"]) for c in kernels.aot_configs("bf16") if "HG" in c["constexprs"]}
    assert aot == {(fwd, warps), (dq, 16), (dkdv, warps)}


def packed_matches_unpacked(B, H, N, D, dtype, device=DEVICE):
    """talking_heads_attention_qkv against talking_heads_attention on the views of the same
    packed projection: the same kernels, so output and every grad are bitwise equal; the packed
    grad is one contiguous tensor."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=torch.float64).to(dtype)
    do = torch.randn(B, H, N, D, device=device, dtype=dtype)
    w = mixing(H, device)
    packed, unpacked = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    w_a, w_b = ([t.clone().requires_grad_() for t in w] for _ in range(2))
    with ops.use_backend("triton"):
        o = ops.talking_heads_attention_qkv(packed, *w_a)
        o.backward(do)
        o_ref = ops.talking_heads_attention(*split_qkv(unpacked), *w_b)
        o_ref.backward(do)
    assert torch.equal(o, o_ref) and torch.equal(packed.grad, unpacked.grad)
    assert packed.grad.is_contiguous()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(w_a, w_b))


@FAMILY_DTYPES
def test_packed_qkv_matches_unpacked(dtype, tc, monkeypatch):
    shape = (1, 4, 33, 32) if dtype == torch.float32 else (2, 3, 7, 48)
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", tc)
    packed_matches_unpacked(*shape, dtype)


def test_packed_qkv_custom_ops_pass_opcheck_and_compile():
    qkv = torch.randn(1, 7, 3, 2, 16, requires_grad=True, device=DEVICE)
    w = [t.requires_grad_() for t in mixing(2)]
    torch.library.opcheck(torch.ops.deit_fast.talking_heads_attention_qkv.default, (qkv, *w, 0.25, "triton"))
    compiled = torch.compile(lambda *a: ops.talking_heads_attention_qkv(*a).square().sum(),
                             backend="aot_eager", fullgraph=True)
    with ops.use_backend("triton"):
        a = [t.detach().clone().requires_grad_() for t in (qkv, *w)]
        compiled(*a).backward()
        e = [t.detach().clone().requires_grad_() for t in (qkv, *w)]
        ops.talking_heads_attention_qkv(*e).square().sum().backward()
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad)


def test_custom_ops_pass_opcheck():
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv_views(1, 2, 7, 16, torch.float32))
    w_l, b_l, w_w, b_w = (t.requires_grad_() for t in mixing(2))
    torch.library.opcheck(torch.ops.deit_fast.talking_heads_attention.default,
                          (q, k, v, w_l, b_l, w_w, b_w, 0.25, "triton"))


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = qkv_views(1, 2, 9, 16, torch.float32)
    w = mixing(2)

    def step(*args):
        return ops.talking_heads_attention(*args).square().sum()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.use_backend("triton"):
        a = [t.clone().requires_grad_() for t in (q, k, v, *w)]
        compiled(*a).backward()
        e = [t.clone().requires_grad_() for t in (q, k, v, *w)]
        step(*e).backward()
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("H,D,arg", [(17, 16, "H=17"), (2, 128, "head dim")])
def test_kernel_limits_are_named_before_launch(H, D, arg, monkeypatch):
    from deit_fast.kernels import talking_heads
    monkeypatch.setattr(talking_heads, "forward", lambda *a: pytest.fail("kernel launched"))
    with ops.use_backend("triton"), pytest.raises(ValueError, match=arg):
        ops.talking_heads_attention(*qkv_views(1, H, 3, D, torch.float32), *mixing(H))


@pytest.mark.gpu
@MIXING
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 4, 196, 48), (4, 8, 196, 48), (2, 16, 576, 48), (2, 8, 784, 48),
                                   (3, 4, 1, 48), (2, 3, 7, 32)], ids=str)
def test_gpu_bf16_fp16(shape, dtype, tc, monkeypatch):
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", tc)
    check(*qkv_views(*shape, dtype, device="cuda"), mixing(shape[1], device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 8, 196, 48), (2, 16, 197, 48), (3, 4, 1, 48)], ids=str)
def test_gpu_fp32(shape):
    """fp32 inputs (the CUDA-core family): the tensor-core tiles did not fit an sm_90 block."""
    check(*qkv_views(*shape, torch.float32, device="cuda"), mixing(shape[1], device="cuda"))


@pytest.mark.gpu
@MIXING
@pytest.mark.parametrize("shape", [(8, 4, 196, 48), (4, 8, 196, 48)], ids=str)
def test_gpu_packed_qkv_matches_unpacked(shape, tc, monkeypatch):
    monkeypatch.setattr(kernels, "TENSOR_CORE_MIXING", tc)
    packed_matches_unpacked(*shape, torch.bfloat16, device="cuda")
