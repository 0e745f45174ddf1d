"""attention on the `cuda` backend, on a GPU only: the forward is csrc/attention.cu (fp16/bf16, head
dim 48/64, N <= 1024), the backward the Triton kernels on its o and lse. Against the fp64 reference
with FlashAttention's tolerance rule (out and dq/dk/dv, so the lse layout is checked by the
backward too), lse against fp64 directly, agreement with the Triton forward, ViT's odd lengths,
qkv-projection views and views the kernel must copy, bitwise determinism, the fallbacks to the
Triton forward, the custom-op checks, and a compute-sanitizer memcheck/racecheck run. The forward
has nine tilings, 64 or 128 queries per CTA (block_m) by 2 to 4 k/v tiles in shared memory
(stages), and 128 queries as 4 warps of 32 rows (rows_per_warp) by the same stages; all are
checked (bitwise equal to one another), the op's default (deit_fast.ops.attention CUDA_BLOCK_M,
CUDA_STAGES, CUDA_ROWS_PER_WARP) everywhere."""
import importlib
import math

import pytest
import torch

from deit_fast import ops
from deit_fast.kernels import attention as triton_kernels
from deit_fast.ops import reference
from tests.ops.sanitizer import TOOLS, run_sanitizer
from tests.ops.streams import on_a_side_stream
from tests.ops.tolerance import assert_rule, poisoned_empty

pytestmark = pytest.mark.gpu
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
op_module = importlib.import_module("deit_fast.ops.attention")  # ops.attention is the function

LENGTHS = [1, 7, 197, 198, 577, 1024]  # 197/198: DeiT at 224 px (cls, +dist); 577: 384 px
HEADS = [(1, 1), (3, 4), (1, 8)]  # (B, H)


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    why = ops._backend.unavailable("attention", "cuda", "cuda")
    if why is not None:
        pytest.fail(f"the cuda backend cannot run here: {why} (bench/gpu_check.sh builds it)")


@pytest.fixture
def cuda_forward_only(monkeypatch):
    """The test fails if the Triton forward runs where the CUDA kernel should."""
    monkeypatch.setattr(triton_kernels, "forward", lambda *a: pytest.fail("the Triton forward ran"))


@pytest.fixture
def triton_forward_only(monkeypatch):
    """The test fails if the CUDA kernel runs where the Triton forward should."""
    monkeypatch.setattr(op_module, "_cuda_forward", lambda *a: pytest.fail("the CUDA forward ran"))


def qkv_views(B, H, N, D, dtype):
    """q, k, v as the models pass them: strided views of one (B, N, 3, H, D) projection."""
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.float64)
    return qkv.to(dtype).permute(2, 0, 3, 1, 4).unbind(0)


def run(fn, q, k, v, do, scale=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    return (out,) + torch.autograd.grad(out, leaves, do.to(out.dtype))


def poison_outputs(q):
    """NaN into the blocks the caching allocator hands the CUDA op's o and lse next (the free block
    it picks depends on sizes and addresses, not on who freed it): a row the kernel leaves
    unwritten then reads NaN, not a stale right answer left by an earlier call on the same inputs
    (every test starts from seed 0, and one test runs several tilings)."""
    B, H, N, D = q.shape
    o = torch.full((B, N, H, D), float("nan"), device=q.device, dtype=q.dtype)
    lse = torch.full((B, H, N), float("nan"), device=q.device, dtype=torch.float32)
    del o, lse


def on(backend):
    def f(q, k, v, scale):
        poison_outputs(q)
        with ops.use_backend(backend):
            return ops.attention(q, k, v, scale)
    return f


def reference_lse(q, k, scale=None):
    """log2 sum_j exp2(q . k_j * scale * log2 e), the kernels' lse, in fp64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    return torch.logsumexp(s, dim=-1) / math.log(2)


def check_against_reference(q, k, v, scale=None):
    do = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    ours = run(on("cuda"), q, k, v, do, scale)
    same = run(reference.attention, q, k, v, do, scale)  # the plain PyTorch math, same dtype
    ref = run(reference.attention, q.double(), k.double(), v.double(), do, scale)
    assert ours[0].transpose(1, 2).is_contiguous()  # token-major, as the Triton forward writes o
    for name, a, r, s in zip(("out", "dq", "dk", "dv"), ours, ref, same):
        assert a.dtype == q.dtype and a.shape == q.shape, name
        assert_rule(name, a, r, s)


def cuda_op(q, k, v, scale, tiling=(64, 2, 16)):
    import deit_fast._C  # noqa: F401
    poison_outputs(q)
    return torch.ops.deit_fast_C.attention_forward(q, k, v, scale, *tiling)


# (block_m, stages, rows_per_warp): 16 rows a warp at 64 and 128 queries per CTA, 32 at 128
TILINGS = [(b, s, r) for b, r in ((64, 16), (128, 16), (128, 32)) for s in (2, 3, 4)]


@pytest.mark.parametrize("BH", HEADS, ids=str)
@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_matches_reference(BH, N, D, dtype, cuda_forward_only, monkeypatch):
    poisoned_empty(monkeypatch)  # Python-side allocations; the kernel's outputs are checked by the rule
    check_against_reference(*qkv_views(*BH, N, D, dtype))


DEFAULT_TILING = (op_module.CUDA_BLOCK_M, op_module.CUDA_STAGES, op_module.CUDA_ROWS_PER_WARP)
OTHER_TILINGS = [t for t in TILINGS if t != DEFAULT_TILING]


# 1, 3, 4 and 10 key tiles: fewer, as many and more than the stages; at 3 tiles of 4 stages
# (2 of 3) the epilogue stages o where q arrived. fp16 here, bf16 in the lse test below.
@pytest.mark.parametrize("N", [1, 150, 197, 577])
@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("tiling", OTHER_TILINGS, ids=str)
def test_other_tilings_match_reference(N, D, tiling, cuda_forward_only, monkeypatch):
    """Through the op and its backward, the tilings that are not the default."""
    monkeypatch.setattr(op_module, "CUDA_BLOCK_M", tiling[0])
    monkeypatch.setattr(op_module, "CUDA_STAGES", tiling[1])
    monkeypatch.setattr(op_module, "CUDA_ROWS_PER_WARP", tiling[2])
    check_against_reference(*qkv_views(3, 4, N, D, F16))


@pytest.mark.parametrize("tiling,dtype", [(DEFAULT_TILING, F16), (DEFAULT_TILING, BF16)]
                         + [(t, BF16) for t in OTHER_TILINGS], ids=str)
@pytest.mark.parametrize("N", LENGTHS)
@pytest.mark.parametrize("D", [48, 64])
def test_lse_and_output_match_fp64_and_triton(N, D, dtype, tiling):
    q, k, v = qkv_views(3, 4, N, D, dtype)
    scale = D ** -0.5
    o, lse = cuda_op(q, k, v, scale, tiling)
    assert o.dtype == dtype and o.shape == q.shape and o.transpose(1, 2).is_contiguous()
    assert lse.dtype == F32 and lse.shape == q.shape[:3] and lse.is_contiguous()
    ref = reference_lse(q, k)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-4)
    t_o, t_lse = triton_kernels.forward(q, k, v, scale)
    torch.testing.assert_close(lse, t_lse, rtol=1e-5, atol=1e-4)
    # Both round p to the input dtype before p v, at different tile boundaries: a few ulps apart.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(o, t_o, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_scale_and_contiguous_inputs(dtype, cuda_forward_only):
    q, k, v = (t.contiguous() for t in qkv_views(2, 3, 65, 48, dtype))
    check_against_reference(q, k, v, scale=0.37)


def test_large_logits_stay_finite(cuda_forward_only):
    q, k, v = qkv_views(1, 2, 197, 64, F16)
    check_against_reference(q * 8, k * 8, v)


def _misaligned(shape, dtype):
    """A view whose base is one element past a 16-byte boundary: the kernel must copy it."""
    n = math.prod(shape)
    return torch.randn(n + 1, device="cuda", dtype=dtype)[1:].view(shape)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_views_the_kernel_copies(dtype, cuda_forward_only):
    """Layouts cp.async cannot read in place (misaligned base, non-unit last stride, a row stride
    that is not a multiple of 8 elements, a huge row stride): copied first, same results."""
    B, H, N, D = 2, 3, 70, 48
    misaligned = _misaligned((B, H, N, D), dtype)
    every_other = torch.randn(B, H, N, 2 * D, device="cuda", dtype=dtype)[..., ::2]
    odd_rows = torch.randn(B, H, N, D + 3, device="cuda", dtype=dtype)[..., :D]
    for q, k, v in [(misaligned, every_other, odd_rows), (odd_rows, misaligned, every_other)]:
        assert q.data_ptr() % 16 or not q.is_contiguous()  # not a layout cp.async reads in place
        check_against_reference(q, k, v)
    # Row stride 2**24 elements (past the kernel's 32-bit in-tile offsets): two rows, 64 MiB.
    wide = torch.randn(1, 1, 2, 2**24, device="cuda", dtype=dtype)[..., :64]
    check_against_reference(wide, wide * 0.5, -wide)


def test_q_k_v_from_different_layouts(cuda_forward_only):
    B, H, N, D = 2, 4, 197, 64
    q = qkv_views(B, H, N, D, BF16)[0]
    k = torch.randn(B, N, H, D, device="cuda", dtype=BF16).transpose(1, 2)
    v = torch.randn(B, H, N, D, device="cuda", dtype=BF16)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_forward_and_grads_are_bitwise_deterministic(dtype, D, cuda_forward_only):
    q, k, v = qkv_views(2, 6, 577, D, dtype)
    do = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    first = run(on("cuda"), q, k, v, do)
    direct = [cuda_op(q, k, v, 0.2, t) for t in TILINGS]
    for _ in range(3):
        again = run(on("cuda"), q, k, v, do)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        for t, d in zip(TILINGS, direct):
            assert all(torch.equal(a, b) for a, b in zip(d, cuda_op(q, k, v, 0.2, t)))
    # Each row's keys are visited in the same order whatever the tiling: the same bits.
    for d in direct[1:]:
        assert all(torch.equal(a, b) for a, b in zip(direct[0], d))


@pytest.mark.parametrize("dtype,N,D", [(F32, 197, 64), (F32, 7, 48), (F16, 197, 32), (BF16, 65, 128),
                                       (F16, 1025, 48), (BF16, 1100, 64)], ids=str)
def test_other_cases_fall_back_to_the_triton_forward(dtype, N, D, triton_forward_only):
    assert not op_module.uses_cuda_kernel(torch.empty(1, 1, N, D, dtype=dtype, device="meta"))
    check_against_reference(*qkv_views(1, 2, N, D, dtype))


@pytest.mark.parametrize("shape", [(0, 2, 7, 48), (2, 0, 7, 64), (2, 3, 0, 48)], ids=str)
def test_empty_tensors(shape):
    q = torch.randn(shape, device="cuda", dtype=F16)
    o, lse = cuda_op(q, q, q, 0.5)
    torch.cuda.synchronize()
    assert o.shape == shape and lse.shape == shape[:3]


def test_custom_ops_pass_opcheck():
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv_views(1, 2, 7, 48, F16))
    torch.library.opcheck(torch.ops.deit_fast.attention.default, (q, k, v, 0.2, "cuda"))


def test_extension_op_on_cuda_passes_opcheck():
    for dtype, D, tiling in [(F16, 48, (64, 2, 16)), (BF16, 64, (128, 4, 16)), (BF16, 48, (128, 3, 32))]:
        q, k, v = qkv_views(2, 3, 33, D, dtype)
        torch.library.opcheck(torch.ops.deit_fast_C.attention_forward.default, (q, k, v, 0.2, *tiling))


def test_inputs_on_two_devices_raise():
    q, k, v = qkv_views(1, 2, 7, 48, F16)
    with pytest.raises(RuntimeError, match="v is on cpu"):
        cuda_op(q, k, v.cpu(), 0.2)


def test_runs_on_the_current_stream():
    q, k, v = qkv_views(4, 6, 197, 64, BF16)
    expected = cuda_op(q, k, v, 0.125)
    got = on_a_side_stream(lambda: cuda_op(q, k, v, 0.125))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = qkv_views(2, 4, 197, 48, BF16)

    def step(q, k, v):
        return ops.attention(q, k, v).float().square().sum()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.use_backend("cuda"):
        a = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        compiled(*a).backward()
        e = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        step(*e).backward()
    for x, y in zip(a, e):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.slow
def test_int64_batch_offsets_past_2_to_the_31():
    """A batch stride of 2**31 elements: the (batch, head) base offsets must not wrap."""
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    B, H, N, D = 2, 2, 70, 64
    buf = torch.zeros(2**31 + H * N * D, device="cuda", dtype=BF16)
    q = buf.as_strided((B, H, N, D), (2**31, N * D, D, 1))
    q.copy_(torch.randn(B, H, N, D, device="cuda", dtype=BF16))
    o, lse = cuda_op(q, q, q, 0.125)
    o_ref, lse_ref = cuda_op(q.contiguous(), q.contiguous(), q.contiguous(), 0.125)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


SANITIZER_SCRIPT = """
import importlib
import torch
from deit_fast import ops
op_module = importlib.import_module("deit_fast.ops.attention")
for (B, H, N, D), dt, misaligned, tiling in [((1, 2, 7, 48), torch.bfloat16, False, (64, 2, 16)),
                                             ((2, 1, 197, 64), torch.float16, False, (64, 2, 16)),
                                             ((2, 1, 197, 48), torch.bfloat16, False, (128, 2, 16)),
                                             ((2, 1, 197, 48), torch.bfloat16, False, (128, 2, 32)),
                                             ((1, 1, 1, 64), torch.bfloat16, False, (128, 4, 16)),
                                             ((1, 2, 70, 64), torch.float16, False, (128, 4, 16)),
                                             ((1, 1, 197, 48), torch.float16, False, (64, 4, 16)),
                                             ((1, 1, 330, 64), torch.bfloat16, False, (128, 4, 32)),
                                             ((1, 2, 150, 48), torch.bfloat16, False, (64, 4, 16)),
                                             ((1, 2, 100, 64), torch.float16, False, (128, 3, 16)),
                                             ((2, 1, 197, 48), torch.bfloat16, False, (64, 3, 16)),
                                             ((1, 3, 130, 48), torch.float16, True, (64, 2, 16)),
                                             ((1, 2, 150, 48), torch.float16, False, (128, 3, 32))]:
    op_module.CUDA_BLOCK_M, op_module.CUDA_STAGES, op_module.CUDA_ROWS_PER_WARP = tiling
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dt)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if misaligned:
        q = torch.randn(q.numel() + 1, device="cuda", dtype=dt)[1:].view(q.shape)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with ops.use_backend("cuda"):
        out = ops.attention(*leaves)
    out.float().square().sum().backward()
torch.cuda.synchronize()
print("sanitizer script done")
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_compute_sanitizer(tool):
    run_sanitizer(tool, "attention_fwd_kernel", SANITIZER_SCRIPT)
