"""Talking-heads attention, chunked strategy (kernels/talking_heads_chunked.py: batched GEMMs and
one mixing pass per N x N product) vs the fp64 reference, through the op as models call it; its
chunking, its interchangeability with the fused kernels, where it hands over to them, and the
default strategy that pairs its forward with the fused backward."""
import pytest
import torch

from deit_fast.kernels import talking_heads as kernels
from deit_fast.kernels import talking_heads_chunked as chunked
from deit_fast.ops import reference
from tests.conftest import DEVICE
from tests.ops.test_attention import qkv_views
from tests.ops.test_talking_heads import SHAPES, check, fused, mixing, packed_matches_unpacked, run
from tests.ops.tolerance import assert_rule, poisoned_empty


@pytest.fixture
def chunked_strategy(monkeypatch):
    """Every op call on the triton backend runs the chunked path; anything else fails."""
    monkeypatch.setattr(kernels, "STRATEGY", "chunked")
    for name in ("_th_fwd", "_th_fwd_tc", "_th_bwd_dq", "_th_bwd_dq_tc"):
        monkeypatch.setattr(kernels, name, None)  # a launch of a fused kernel would raise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
# (1, 3, 16, 16), (2, 16, 48, 16): rows a multiple of 16, so the buffers have no padding
@pytest.mark.parametrize("shape", SHAPES + [(3, 8, 40, 48), (2, 4, 196, 48), (1, 3, 16, 16), (2, 16, 48, 16)],
                         ids=str)
def test_matches_reference(shape, dtype, chunked_strategy, monkeypatch):
    poisoned_empty(monkeypatch)
    check(*qkv_views(*shape, dtype), mixing(shape[1]))


def test_all_negative_logits_keep_grads_finite(chunked_strategy):
    """Mixed logits near -110 (lse far below 0): padded keys must stay at p = 0, not exp2(-lse)."""
    q, k, v = qkv_views(1, 4, 40, 48, torch.float32)
    u = torch.randn(48, device=DEVICE)
    w_l, b_l, w_w, b_w = mixing(4)
    check(0.1 * q + 4 * u, 0.1 * k - 4 * u, v, (torch.eye(4, device=DEVICE) + 0.05 * w_l, b_l, w_w, b_w))


def test_chunks_give_the_whole_batch_result(monkeypatch):
    """One image per chunk or the whole batch in one: each image's products and mixing are the
    same arithmetic, so the same output and q, k, v grads; the weight grads are summed per chunk,
    then over chunks, so they agree to fp32 rounding of a different order."""
    q, k, v = qkv_views(5, 4, 23, 32, torch.float32)
    w = mixing(4)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    monkeypatch.setattr(kernels, "STRATEGY", "chunked")
    results = []
    for budget, expect in ((1e-9, 1), (1e9, 5)):
        monkeypatch.setattr(chunked, "CHUNK_BUDGET", budget)
        assert chunked.chunk_images(5, 4, 23, 32, 2) == expect
        results.append(run(fused, (q, k, v, *w), do))
    names = ("out", "dq", "dk", "dv", "dw_l", "db_l", "dw_w", "db_w")
    for name, a, b in zip(names, *results):
        tol = 1e-6 if name in ("out", "dq", "dk", "dv") else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_groups_per_program_change_only_the_weight_grads_order(dtype, chunked_strategy, monkeypatch):
    """A mixing program loops over GROUPS_PER_PROGRAM groups of query rows: 1, 3 (the last
    program of 10 groups takes one) and more groups than an image has (one program an image) give
    every row the same arithmetic, so bitwise the same output and q, k, v grads; the weight grads'
    per-program partials are summed in another grouping, equal to fp32 rounding. fp16 keeps the
    weight grads' per-strip sums across groups (_contract's STRIPS), fp32 adds them each group."""
    poisoned_empty(monkeypatch)
    q, k, v = qkv_views(2, 3, 37, 32, dtype)  # 3 heads in 4 slots: 4 rows a group, 10 groups
    w = mixing(3)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    results = []
    for groups in (1, 3, 64):
        monkeypatch.setattr(chunked, "GROUPS_PER_PROGRAM", groups)
        results.append(run(fused, (q, k, v, *w), do))
    names = ("out", "dq", "dk", "dv", "dw_l", "db_l", "dw_w", "db_w")
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            if name in ("out", "dq", "dk", "dv"):
                assert torch.equal(a, b), name
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                           msg=lambda m, name=name: f"{name}: {m}")


def test_nn_buffers_rows_are_16_elements_apart():
    """The N x N buffers' rows are a multiple of 16 elements apart: what lets the mixing passes
    and the GEMMs on them use 16-byte accesses."""
    q = torch.empty(1, 2, 196, 48, dtype=torch.float16)
    buf = chunked._nn_buffer(3, 2, 196, q)
    assert buf.shape == (3, 2, 196, 196) and buf.stride() == (2 * 196 * 208, 196 * 208, 208, 1)
    assert chunked._nn_buffer(1, 1, 7, q).stride(2) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strided_gemm_reads_and_writes_in_place(dtype):
    """chunked._bmm on the operands as the chunked path passes them (views of the packed
    projection, transposes by strides, N x N buffers, the packed grad and token-major o as
    outputs) against torch.matmul, at sizes off the tiles; nothing beside the output is written."""
    B, H, N, D = 2, 3, 70, 48
    q, k, v = qkv_views(B, H, N, D, dtype)
    s = torch.randn(B, H, N, N, device=DEVICE).to(dtype)
    packed = torch.full((B, N, 3, H, D), 7.0, device=DEVICE, dtype=dtype)
    dq, dk, dv = packed.permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.full((B, N, H, D), 7.0, device=DEVICE, dtype=dtype).transpose(1, 2)
    buf = torch.empty(B, H, N, N, device=DEVICE, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-2)
    for a, b, c in ((q, k.transpose(-1, -2), buf), (s, v, o), (s.transpose(-1, -2), q, dv), (s, k, dq)):
        assert chunked._bmm(a, b, c) is c
        torch.testing.assert_close(c.float(), a.float() @ b.float(), **tol)
    assert torch.all(packed[:, :, 1] == 7)  # dk, written by none of them, untouched


def test_gemm_reads_and_writes_the_rows_padding():
    """On an N x N buffer with padded rows (as _nn_buffer's): with pad_c the GEMM writes the
    padding too (zeros, as B's columns past N read as zero) and nothing past it; with pad_a it
    reads A's padding (here finite junk, 5), which leaves the product unchanged, whether A is
    the buffer or its transpose."""
    B, H, N, D, pad = 2, 3, 37, 16, 48
    q, k, v = qkv_views(B, H, N, D, torch.float16)
    # Rows N .. pad past the buffer: NaN, so that a read along the wrong axis fails every head.
    base = torch.full((B, H, pad, pad), float("nan"), device=DEVICE, dtype=torch.float16)
    s = base[:, :, :N, :N]
    assert chunked._bmm(q, k.transpose(-1, -2), s, pad_c=pad) is s
    tol = dict(rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(s.float(), q.float() @ k.float().transpose(-1, -2), **tol)
    assert torch.all(base[:, :, :N, N:] == 0) and base[:, :, N:].isnan().all()
    base[:, :, :N, N:] = 5.0
    for a, b in ((s, v), (s.transpose(-1, -2), q)):
        c = torch.empty(B, H, N, D, device=DEVICE, dtype=torch.float16)
        torch.testing.assert_close(chunked._bmm(a, b, c, pad_a=pad).float(), a.float() @ b.float(), **tol)


def test_chunk_buffers_stay_within_the_budget():
    """CaiT-S training shape: the N x N buffers of a chunk within CHUNK_BUDGET x q's bytes, so peak
    memory is O(B H N D); chunks spread evenly over the batch."""
    B, H, N, D = 256, 8, 196, 48
    for buffers, expect in ((1, 86), (2, 52)):
        c = chunked.chunk_images(B, H, N, D, buffers)
        assert c == expect and buffers * c * 208 <= chunked.CHUNK_BUDGET * B * D  # rows 208 apart
    assert chunked.chunk_images(1, 8, 784, 16, 2) == 1  # at least one image


def test_grads_are_bitwise_deterministic(chunked_strategy):
    q, k, v = qkv_views(2, 4, 40, 48, torch.float16)
    w = mixing(4)
    do = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    first, second = run(fused, (q, k, v, *w), do), run(fused, (q, k, v, *w), do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("forward_by,backward_by", [("fused", "chunked"), ("chunked", "fused")])
def test_either_backward_takes_either_forward(forward_by, backward_by):
    """Both save the same log-sum-exp (log2 units, without b_l)."""
    B, H, N, D = 2, 4, 33, 32
    q, k, v = qkv_views(B, H, N, D, torch.float32)
    w_l, b_l, w_w, b_w = mixing(H)
    do = torch.randn(q.shape, device=DEVICE)
    out, lse = kernels.forward(q, k, v, w_l, w_w, b_w, D ** -0.5, tc=False, strategy=forward_by)
    other = kernels.forward(q, k, v, w_l, w_w, b_w, D ** -0.5, tc=False, strategy=backward_by)
    torch.testing.assert_close(lse, other[1], rtol=1e-5, atol=1e-5)
    grads = kernels.backward(do, q, k, v, w_l, w_w, b_w, lse, D ** -0.5, tc=False, strategy=backward_by)
    leaves = [t.double().requires_grad_() for t in (q, k, v, w_l, w_w, b_w)]
    ref = reference.talking_heads_attention(*leaves[:3], leaves[3], b_l.double(), *leaves[4:], D ** -0.5)
    same = reference.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w, D ** -0.5)
    assert_rule("out", out, ref, same, ulps=16)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    same_leaves = [t.detach().requires_grad_() for t in (q, k, v, w_l, w_w, b_w)]
    same_out = reference.talking_heads_attention(*same_leaves[:3], same_leaves[3], b_l, *same_leaves[4:], D ** -0.5)
    same_grads = torch.autograd.grad(same_out, same_leaves, do)
    for name, a, r, s in zip(("dq", "dk", "dv", "dw_l", "dw_w", "db_w"), grads, ref_grads, same_grads):
        assert_rule(name, a, r, s, ulps=16)


def test_packed_qkv_matches_unpacked(chunked_strategy):
    packed_matches_unpacked(2, 3, 7, 48, torch.float16)


def test_rows_past_the_limit_run_the_fused_kernels(monkeypatch):
    """Rows longer than MAX_KEYS (CaiT at 384 px: 576 tokens) would not fit a program's registers:
    STRATEGY "chunked" still runs the fused kernels there."""
    assert chunked.supported(16, 196) and chunked.supported(8, 256) and not chunked.supported(8, 257)
    for backward in (False, True):
        assert kernels._chunked("chunked", 8, 196, backward) and not kernels._chunked("chunked", 8, 577, backward)
        assert not kernels._chunked("fused", 8, 196, backward)
        assert kernels._chunked("chunked_forward", 8, 196, backward) is not backward
        assert not kernels._chunked("chunked_forward", 8, 577, backward)
    monkeypatch.setattr(kernels, "STRATEGY", "chunked")
    monkeypatch.setattr(chunked, "MAX_KEYS", 8)  # so that a small shape is past it
    monkeypatch.setattr(chunked, "forward", lambda *a: pytest.fail("chunked path taken"))
    q, k, v = qkv_views(1, 2, 9, 16, torch.float32)
    w_l, b_l, w_w, b_w = mixing(2)
    out, _ = kernels.forward(q, k, v, w_l, w_w, b_w, 0.25)
    ref = reference.talking_heads_attention(*(t.double() for t in (q, k, v, w_l, b_l, w_w, b_w)), 0.25)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture
def default_strategy(monkeypatch):
    """The shipped STRATEGY: the chunked forward, the fused tensor-core (or, for fp32, CUDA-core)
    backward; a fused forward or a chunked backward would fail."""
    assert kernels.STRATEGY == "chunked_forward"
    monkeypatch.setattr(kernels, "_th_fwd", None)
    monkeypatch.setattr(kernels, "_th_fwd_tc", None)
    monkeypatch.setattr(chunked, "backward", lambda *a, **kw: pytest.fail("chunked backward ran"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 48), (3, 8, 40, 48), (1, 16, 17, 16)], ids=str)
def test_default_strategy_matches_reference(shape, dtype, default_strategy, monkeypatch):
    poisoned_empty(monkeypatch)
    check(*qkv_views(*shape, dtype), mixing(shape[1]))


def test_default_strategy_packed_qkv_matches_unpacked(default_strategy):
    packed_matches_unpacked(2, 4, 9, 48, torch.float16)


def test_an_unknown_strategy_is_named():
    q, k, v = qkv_views(1, 2, 9, 16, torch.float32)
    w_l, _, w_w, b_w = mixing(2)
    with pytest.raises(ValueError, match="strategy must be one of.*'flash'"):
        kernels.forward(q, k, v, w_l, w_w, b_w, 0.25, strategy="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 4, 196, 48), (4, 8, 196, 48), (2, 16, 196, 48), (2, 8, 250, 48),
                                   (3, 4, 1, 48), (2, 3, 7, 32)], ids=str)
def test_gpu(shape, dtype, chunked_strategy):
    check(*qkv_views(*shape, dtype, device="cuda"), mixing(shape[1], device="cuda"))


@pytest.mark.gpu
def test_gpu_packed_qkv_matches_unpacked(chunked_strategy):
    packed_matches_unpacked(4, 8, 196, 48, torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 4, 196, 48), (4, 8, 196, 48), (2, 16, 196, 48)], ids=str)
def test_gpu_default_strategy(shape, dtype, default_strategy):
    check(*qkv_views(*shape, dtype, device="cuda"), mixing(shape[1], device="cuda"))


@pytest.mark.gpu
def test_gpu_default_strategy_packed_qkv_matches_unpacked(default_strategy):
    packed_matches_unpacked(4, 8, 196, 48, torch.bfloat16, device="cuda")
