"""class_attention on the `cuda` backend (deit_fast._C, csrc/class_attention.cu), on a GPU only:
against the fp64 reference with FlashAttention's tolerance rule in fp32/fp16/bf16 at every head
dim and odd key counts, with one (b, h) (the split-key path) and with 256 x 8 (one block per
(b, h)); agreement with the Triton backend (out, lse and grads); strided, misaligned and
non-unit-stride views (vector and element-wise paths); the projection layout of dk and dv;
bitwise determinism; the prefetching key loop (CUDA_PREFETCH) against the plain one, bitwise, and
against the reference; the custom-op checks; and a compute-sanitizer memcheck/racecheck run
(with and without the prefetch)."""
import importlib
import math

import pytest
import torch

from deit_fast import ops
from tests.ops.sanitizer import TOOLS, run_sanitizer
from tests.ops.streams import on_a_side_stream
# run: output and (dq, dk, dv) of the public op on a backend, inputs as given
from tests.ops.test_class_attention import check_custom_ops_pass_opcheck, check_peaked_grads, run
from tests.ops.tolerance import assert_rule

# the module, which deit_fast.ops's function of the same name shadows as an attribute
op_module = importlib.import_module("deit_fast.ops.class_attention")
pytestmark = pytest.mark.gpu
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
HEAD_DIMS = (32, 48, 64, 80, 96, 128)
KEYS = (1, 7, 197, 577)


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    why = ops._backend.unavailable("class_attention", "cuda", "cuda")
    if why is not None:
        pytest.fail(f"the cuda backend cannot run here: {why} (bench/gpu_check.sh builds it)")


def make(B, H, N, D, dtype):
    return (torch.randn(B, H, 1, D, device="cuda", dtype=dtype),
            torch.randn(B, H, N, D, device="cuda", dtype=dtype),
            torch.randn(B, H, N, D, device="cuda", dtype=dtype))


def check_against_reference(q, k, v, scale=None):
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    ours, ours_g = run("cuda", q, k, v, dout, scale)
    same, same_g = run("torch", q, k, v, dout, scale)
    ref, ref_g = run("torch", q.double(), k.double(), v.double(), dout, scale)
    assert ours.dtype == q.dtype and ours.shape == q.shape and ours.is_contiguous()
    assert_rule("out", ours, ref, same)
    for name, a, r, s in zip(("dq", "dk", "dv"), ours_g, ref_g, same_g):
        assert a.dtype == q.dtype and a.shape == r.shape, name
        assert_rule(name, a, r, s)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", KEYS)
def test_one_head_matches_reference(N, D, dtype):
    """B*H = 1: the key axis is split across blocks (N > one block pass) and merged."""
    check_against_reference(*make(1, 1, N, D, dtype))


@pytest.mark.parametrize("shape", [(256, 8, 197, 48), (256, 8, 7, 64), (256, 8, 1, 32),
                                   (64, 8, 577, 48), (8, 8, 577, 48), (2, 3, 65, 96),
                                   (3, 16, 785, 48), (5, 3, 65, 128), (7, 2, 1, 80)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_batches_match_reference(shape, dtype):
    """From 256 x 8 heads (one block per head, no split) down to a few heads (split)."""
    check_against_reference(*make(*shape, dtype))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_peaked_softmax_grads_keep_their_precision(dtype):
    """delta from the forward's fp32 output (out_f32), as in the Triton backend."""
    check_peaked_grads("cuda", dtype, "cuda")


def test_scale_argument():
    check_against_reference(*make(2, 3, 65, 48, F32), scale=0.37)


@pytest.mark.parametrize("shape", [(1, 1, 577, 48), (2, 3, 65, 128), (64, 8, 197, 48)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_matches_triton(shape, dtype):
    q, k, v = make(*shape, dtype)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    cuda_out, cuda_g = run("cuda", q, k, v, dout)
    tri_out, tri_g = run("triton", q, k, v, dout)
    # fp32 sums in another order; in bf16 at most a rounding step apart (the default tolerance)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == F32 else {}
    torch.testing.assert_close(cuda_out, tri_out, **tol)
    for a, b in zip(cuda_g, tri_g):
        torch.testing.assert_close(a, b, **tol)


def test_lse_has_the_triton_convention():
    """Both backends save the log-sum-exp in log2 units, so either backward takes either lse."""
    from deit_fast import _C  # noqa: F401
    from deit_fast.kernels import class_attention as tri
    for shape in [(1, 1, 577, 48), (16, 8, 197, 64)]:
        q, k, v = make(*shape, F32)
        out_c, lse_c, f32_c = torch.ops.deit_fast_C.class_attention_forward(q, k, v, 0.2)
        out_t, lse_t, f32_t = tri.forward(q, k, v, 0.2)
        torch.testing.assert_close(lse_c, lse_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_c, out_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f32_c, f32_t, rtol=1e-4, atol=1e-5)
        s = (q.double() @ k.double().transpose(-1, -2)).squeeze(2) * 0.2
        torch.testing.assert_close(lse_c.double(), torch.logsumexp(s, -1) / math.log(2),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("heads", [1, 8])
def test_strided_views_without_copy(heads, dtype):
    """q a transposed (B, 1, H, D) slice of a wider projection; k and v head-split views of one
    (B, N, 2, H, D) projection (16-byte vector path); then a v with last stride 2 and a k one
    element off 16-byte alignment (element-wise path), and an expanded k (key stride 0)."""
    B, N, D = 2, 197, 48
    q = torch.randn(B, 1, 2, heads, D, device="cuda", dtype=dtype)[:, :, 1].transpose(1, 2)
    kv = torch.randn(B, N, 2, heads, D, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_reference(q, k, v)
    wide = torch.randn(B, heads, N, 2 * D, device="cuda", dtype=dtype)[..., ::2]
    check_against_reference(q, k, wide)
    off = torch.randn(B * heads * N * D + 1, device="cuda", dtype=dtype)[1:].view(B, heads, N, D)
    check_against_reference(q, off, v)
    expanded = torch.randn(B, heads, 1, D, device="cuda", dtype=dtype).expand(B, heads, N, D)
    check_against_reference(q, expanded, v)


def test_expanded_output_grad():
    """out.sum().backward() hands the backward a dO with all strides 0."""
    q, k, v = make(2, 3, 65, 64, F32)
    grads = []
    for backend in ("cuda", "torch"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with ops.use_backend(backend):
            ops.class_attention(*leaves).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grads_take_the_projection_layout():
    """dk, dv of a (B, N, H, D)-major view come back token-major, as on the Triton backend."""
    B, H, N, D = 2, 3, 7, 32
    q = torch.randn(B, H, 1, D, device="cuda")
    k = torch.randn(B, N, H, D, device="cuda").transpose(1, 2)
    dq, dk, dv = run("cuda", q, k, k, torch.randn(q.shape, device="cuda", dtype=torch.float64))[1]
    assert dk.transpose(1, 2).is_contiguous() and dv.transpose(1, 2).is_contiguous()
    assert dq.is_contiguous()


@pytest.mark.parametrize("shape", [(1, 1, 577, 48), (256, 8, 197, 48), (2, 3, 785, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bitwise_deterministic(shape):
    q, k, v = make(*shape, BF16)
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    first = run("cuda", q, k, v, dout)
    for _ in range(2):
        again = run("cuda", q, k, v, dout)
        assert torch.equal(first[0], again[0])
        for a, b in zip(first[1], again[1]):
            assert torch.equal(a, b)


@pytest.fixture
def prefetch(monkeypatch):
    """CUDA_PREFETCH on: the kernels' cp.async key loop (deit_fast.ops.class_attention)."""
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", True)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 577, 48), (256, 8, 197, 48), (3, 16, 785, 48),
                                   (256, 8, 7, 64), (2, 3, 1, 32), (5, 3, 65, 128), (7, 2, 41, 80),
                                   (4, 4, 200, 96)], ids=lambda s: "x".join(map(str, s)))
def test_prefetch_gives_the_same_results(shape, dtype, monkeypatch):
    """CUDA_PREFETCH changes when K and V are read, not what is computed: the same out and grads
    (torch.equal), on the split and the whole-row paths, full and partial passes, every head dim,
    with k and v as the projection's head-split views (the vector path that prefetches)."""
    B, H, N, D = shape
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    kv = torch.randn(B, N, 2, H, D, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)
    dout = torch.randn(q.shape, dtype=torch.float64, device="cuda")
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", False)
    plain = run("cuda", q, kv[0], kv[1], dout)
    monkeypatch.setattr(op_module, "CUDA_PREFETCH", True)
    ahead = run("cuda", q, kv[0], kv[1], dout)
    assert torch.equal(ahead[0], plain[0])
    for name, a, b in zip(("dq", "dk", "dv"), ahead[1], plain[1]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 577, 48), (64, 8, 197, 48), (2, 3, 7, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_prefetch_matches_reference(shape, dtype, prefetch):
    check_against_reference(*make(*shape, dtype))


def test_empty_batch():
    q, k, v = make(0, 3, 7, 32, F32)
    out, grads = run("cuda", q, k, v, torch.zeros(q.shape, device="cuda"))
    assert out.shape == (0, 3, 1, 32) and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    torch.cuda.synchronize()


def test_custom_ops_pass_opcheck():
    check_custom_ops_pass_opcheck(*make(2, 3, 7, 48, F32), "cuda")


def test_extension_ops_on_cuda_pass_opcheck():
    import deit_fast._C  # noqa: F401
    C = torch.ops.deit_fast_C
    q, k, v = make(2, 3, 9, 64, BF16)
    kt = torch.randn(2, 9, 3, 64, device="cuda", dtype=BF16).transpose(1, 2)
    torch.library.opcheck(C.class_attention_forward.default, (q, k, v, 0.125))
    out, lse, out_f32 = C.class_attention_forward(q, kt, kt, 0.125)
    torch.library.opcheck(C.class_attention_backward.default,
                          (torch.randn_like(out), q, kt, kt, out_f32, lse, 0.125))


def test_inputs_on_two_devices_raise():
    import deit_fast._C  # noqa: F401
    q, k, v = make(2, 3, 7, 32, F32)
    with pytest.raises(RuntimeError, match="v is on cpu"):
        torch.ops.deit_fast_C.class_attention_forward(q, k, v.cpu(), 0.1)


def test_runs_on_the_current_stream():
    q, k, v = make(64, 8, 197, 48, BF16)
    dout = torch.ones(q.shape, device="cuda")
    expected = run("cuda", q, k, v, dout)
    got = on_a_side_stream(lambda: run("cuda", q, k, v, dout))
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        assert torch.equal(a, b)


SANITIZER_SCRIPT = """
import importlib, itertools
import torch
from deit_fast import ops
class_attention = importlib.import_module("deit_fast.ops.class_attention")
cases = [((1, 1, 577, 48), torch.bfloat16), ((1, 2, 7, 80), torch.float32), ((3, 2, 1, 32), torch.float16),
         ((700, 1, 9, 128), torch.bfloat16), ((1, 1, 200, 96), torch.float16)]
for prefetch, ((B, H, N, D), dt) in itertools.product((False, True), cases):
    class_attention.CUDA_PREFETCH = prefetch
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dt).transpose(1, 2)
    kv = torch.randn(B, N, 2, H, D, device="cuda", dtype=dt).permute(2, 0, 3, 1, 4)
    odd = torch.randn(B * H * N * D + 1, device="cuda", dtype=dt)[1:].view(B, H, N, D)  # element path
    for k, v in ((kv[0], kv[1]), (odd, kv[1])):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with ops.use_backend("cuda"):
            out = ops.class_attention(*leaves)
        out.float().square().sum().backward()
torch.cuda.synchronize()
print("sanitizer script done")
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_compute_sanitizer(tool):
    run_sanitizer(tool, "class_attn_", SANITIZER_SCRIPT)
