"""distillation_loss on the `cuda` backend (deit_fast._C, csrc/distill_loss.cu), on a GPU only:
loss, components and both head grads against the fp64 reference with FlashAttention's tolerance
rule, for every kind x target type, B = 1, 3, 256 and C = 10, 37, 100, 1000, 21841 (and the
register / streamed boundary), fp32 / fp16 / bf16; agreement with the Triton backend; vector and
scalar paths (aligned, misaligned and strided rows, transposed and mixed-dtype heads); rows
wider than the shared-memory stash; teacher argmax ties; bitwise determinism; the custom-op and
extension-op checks; and a compute-sanitizer memcheck / racecheck run."""

import pytest
import torch
import torch.nn.functional as F

from deit_fast import ops
from deit_fast.ops import distill_loss as op
from tests.ops import test_distill_loss
from tests.ops.test_distill_loss import KINDS, TARGETS, make, run
from tests.ops.sanitizer import TOOLS, run_sanitizer
from tests.ops.streams import on_a_side_stream
from tests.ops.tolerance import poisoned_empty

pytestmark = pytest.mark.gpu
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CLASSES = (10, 37, 100, 1000, 21841)
WIDEST_IN_REGISTERS = 4096  # csrc/distill_loss.cu kTileCols: wider rows take the streamed kernel


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    why = ops._backend.unavailable("distillation_loss", "cuda", "cuda")
    if why is not None:
        pytest.fail(f"the cuda backend cannot run here: {why} (bench/gpu_check.sh builds it)")


def smoothing(target):
    return 0.1 if target == "int-smooth" else 0.0


def check_against_reference(s, d, t, target, **kw):
    """test_distill_loss's check against the fp64 reference, on the cuda backend."""
    test_distill_loss.check_against_reference(s, d, t, target, backend="cuda", **kw)


def case_params():
    """kind x target x C, with B, dtype, tau and the KL reduction cycled through."""
    params, i = [], 0
    for C in CLASSES:
        for kind in KINDS:
            for target in TARGETS:
                B, dtype = (1, 3, 256)[i % 3], (F32, F16, BF16)[i // 3 % 3]
                tau, kl = (1.0, 3.0)[i % 2], ("numel", "batchmean")[i // 2 % 2]
                i += 1
                params.append(pytest.param(kind, target, B, C, dtype, tau, kl, id=(
                    f"{kind}-{target}-B{B}-C{C}-{str(dtype)[6:]}-tau{tau:g}-{kl}")))
    return params


@pytest.mark.parametrize("kind,target,B,C,dtype,tau,kl", case_params())
def test_matches_reference(kind, target, B, C, dtype, tau, kl, monkeypatch):
    poisoned_empty(monkeypatch)  # Python-side allocations; the C++ ones are checked by the rule
    s, d, t, y = make(B, C, dtype, target, device="cuda")
    check_against_reference(s, d, t, y, kind=kind, alpha=0.5, tau=tau, kl_reduction=kl,
                            label_smoothing=smoothing(target))


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("C", [1000, 21841])
@pytest.mark.parametrize("kind", KINDS)
def test_training_batch_every_dtype(kind, C, dtype):
    """DeiT's batch (256) with timm's mixup targets, the training case, in every dtype."""
    s, d, t, q = make(256, C, dtype, "soft", device="cuda")
    check_against_reference(s, d, t, q, kind=kind, tau=2.0 if kind == "soft" else 1.0)


@pytest.mark.parametrize("C", [WIDEST_IN_REGISTERS - 1, WIDEST_IN_REGISTERS, WIDEST_IN_REGISTERS + 1,
                               8192, 50000])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_register_and_streamed_boundary(C, dtype):
    """Both kernels around their boundary; C = 8192 streams on the vector path; fp32 soft rows of
    50000 classes (and of 21841 below) do not fit the shared-memory stash and re-read tiles."""
    for kind, target in (("soft", "soft"), ("hard", "int-smooth")):
        s, d, t, y = make(3, C, dtype, target, device="cuda")
        check_against_reference(s, d, t, y, kind=kind, tau=2.0, label_smoothing=smoothing(target))


@pytest.mark.parametrize("C", [21841, 30000])
def test_fp32_soft_rows_past_the_stash(C):
    """fp32 soft distillation with soft targets stashes 16 B per class: 350 KB at C = 21841,
    more than any GPU's shared memory, so the last tiles are read again."""
    s, d, t, q = make(4, C, F32, "soft", device="cuda")
    check_against_reference(s, d, t, q, kind="soft", tau=3.0, kl_reduction="batchmean")


@pytest.mark.parametrize("kind,C,dtype", [("soft", 8048, F16), ("soft", 8056, BF16),
                                          ("soft", 8192, F16), ("none", 12288, F32)], ids=str)
def test_stash_at_the_48_kib_default_limit(kind, C, dtype):
    """Stashes of 48 KiB or just under (6 B per class for fp16 / bf16 soft with class targets,
    4 B for fp32 "none"): with the kernel's 832 B of static shared memory, past 48 KiB - 832 B
    the launch needs the opt-in (it was refused with cudaErrorInvalidValue); C = 8048 fits."""
    s, d, t, y = make(2, C, dtype, "int", device="cuda")
    check_against_reference(s, d, t, y, kind=kind, tau=2.0)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("C", [10, 37, 1000, 21841])
@pytest.mark.parametrize("kind,target", [("none", "int-smooth"), ("hard", "soft"), ("soft", "int")])
def test_matches_triton(kind, target, C, dtype):
    s, d, t, y = make(256, C, dtype, target, device="cuda")
    kw = dict(kind=kind, tau=2.0, label_smoothing=smoothing(target))
    (cuda, cuda_g), (tri, tri_g) = run("cuda", s, d, t, y, **kw), run("triton", s, d, t, y, **kw)
    for a, b in zip(cuda + cuda_g, tri + tri_g):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        # Same formulas, different summation orders: a few fp32 ulps; grads to their dtype.
        tol = dict(rtol=1e-5, atol=1e-6) if a.dtype == F32 else {}
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("C", [64, 1000, 8192])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_misaligned_and_strided_views_take_the_scalar_path(C, dtype):
    """A base one element off 16 B, an odd row stride: the scalar path, same results as the
    vector path on contiguous copies (up to summation order) and within the rule of the spec."""
    B = 3
    off = lambda: (3 * torch.randn(B * C + 1, device="cuda")).to(dtype)[1:].view(B, C)
    odd = (3 * torch.randn(B, C + 3, device="cuda")).to(dtype)[:, :C]
    s, d, t = off(), odd, off()
    q = torch.softmax(torch.randn(B, C + 1, device="cuda"), -1)[:, 1:]  # unaligned soft target
    for kind, target in (("soft", q), ("hard", torch.randint(0, C, (B,), device="cuda"))):
        check_against_reference(s, d, t, target, kind=kind, tau=2.0)
        strided, _ = run("cuda", s, d, t, target, kind=kind, tau=2.0)
        contiguous, _ = run("cuda", s.contiguous(), d.contiguous(), t.contiguous(),
                            target.contiguous(), kind=kind, tau=2.0)
        for a, b in zip(strided, contiguous):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_and_transposed_teacher():
    """fp16 class head, fp32 distillation head (strided rows), fp16 teacher with non-unit column
    stride: read as fp32 copies; each grad in its head's grad dtype."""
    B, C = 3, 65
    s = (3 * torch.randn(B, 2 * C, device="cuda")).half()[:, C:]
    d = (3 * torch.randn(B, C + 7, device="cuda"))[:, :C]
    t = (3 * torch.randn(C, B, device="cuda")).half().t()
    y = torch.randint(0, C, (B,), device="cuda")
    for kind in ("hard", "soft"):
        check_against_reference(s, d, t, y, kind=kind, tau=2.0, label_smoothing=0.1)


def test_mixed_heads_bf16_fp32_and_bf16_targets():
    s, d, t, q = make(256, 1000, BF16, "soft", device="cuda", dist_dtype=F32)
    check_against_reference(s, d, t, q, kind="soft", kl_reduction="batchmean")
    check_against_reference(s, d, t, q.bfloat16(), kind="hard")


@pytest.mark.parametrize("C", [10, 37, 5000, 21841])
def test_teacher_argmax_ties_take_the_first_index(C):
    t = torch.zeros(2, C, device="cuda")
    t[:, [C // 2, 3, C - 1]] = 5.0  # ties within a thread, across threads, warps and tiles
    d = torch.randn(2, C, device="cuda").requires_grad_()
    s, y = torch.randn(2, C, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
    with ops.use_backend("cuda"):
        loss = ops.distillation_loss(s, d, y, t, "hard", alpha=1.0)
    loss.backward()
    assert d.grad.argmin(dim=1).tolist() == [3, 3]  # softmax - onehot(argmax): the one negative
    torch.testing.assert_close(loss, F.cross_entropy(d.detach(), t.argmax(dim=1)))


def test_teacher_nan_is_its_argmax_as_in_torch():
    t = torch.randn(2, 300, device="cuda")
    t[0, 7], t[0, 200], t[1, 299] = float("nan"), float("nan"), float("nan")
    s, d = torch.randn(2, 300, device="cuda"), torch.randn(2, 300, device="cuda")
    y = torch.zeros(2, dtype=torch.long, device="cuda")
    with ops.use_backend("cuda"):
        loss = ops.distillation_loss(s, d, y, t, "hard", alpha=1.0)
    torch.testing.assert_close(loss, F.cross_entropy(d, t.argmax(dim=1)))


@pytest.mark.parametrize("C", [1000, 21841])
def test_bitwise_deterministic(C):
    s, d, t, q = make(256, C, BF16, "soft", device="cuda")
    first = run("cuda", s, d, t, q, kind="soft", tau=2.0)
    for _ in range(3):
        again = run("cuda", s, d, t, q, kind="soft", tau=2.0)
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b)


def extension_forward(*args):
    """The extension's forward with the op's ticket counter for the current stream."""
    import deit_fast._C  # noqa: F401
    return torch.ops.deit_fast_C.distillation_loss_forward(*args, op._tickets(args[0].device))


def test_extension_op_outputs_and_grads_not_asked_for():
    s, d, t, y = make(5, 37, BF16, "int", device="cuda")
    loss, parts, rows, ds, dd = extension_forward(s, d, y, t, "soft", 0.5, 2.0, 0.1, "numel",
                                                  False, False)
    assert loss.shape == () and parts.shape == (2,) and rows.shape == (5, 3)
    assert ds.shape == dd.shape == (0,)
    with_grads = extension_forward(s, d, y, t, "soft", 0.5, 2.0, 0.1, "numel", True, True)
    for a, b in zip((loss, parts, rows), with_grads):
        assert torch.equal(a, b)
    assert with_grads[3].dtype == with_grads[4].dtype == BF16
    torch.testing.assert_close(loss, 0.5 * parts[0] + 0.5 * parts[1])


@pytest.mark.parametrize("heads", [(BF16, BF16), (F16, F16), (F32, F32), (F16, BF16)], ids=str)
def test_backward_kernel_is_the_fp32_product_rounded_once(heads):
    """The backward (csrc distillation_loss_backward, and Triton's twin): each saved grad times
    the upstream grad in fp32, stored in its head's dtype, bitwise torch's product; several
    blocks a head, the last partial; a head without a grad gets an empty result."""
    from deit_fast.kernels import distill_loss as triton_kernel
    import deit_fast._C  # noqa: F401
    g = torch.tensor(-0.37, device="cuda")
    ds = torch.randn(256, 1000, device="cuda").to(op._grad_dtype(heads[0]))
    dd = torch.randn(7, 4097, device="cuda").to(op._grad_dtype(heads[1]))
    for a, b in ((ds, dd), (ds, dd.new_empty(0)), (ds.new_empty(0), dd)):
        want = [(x.float() * g).to(h) for x, h in zip((a, b), heads)]
        for backward in (torch.ops.deit_fast_C.distillation_loss_backward, triton_kernel.backward):
            got = backward(a, b, g, *heads)
            assert all(x.dtype == w.dtype and torch.equal(x, w) for x, w in zip(got, want))


@pytest.mark.parametrize("B,C", [(1, 10), (300, 37), (5000, 100), (3, 21841)], ids=str)
def test_the_last_block_sums_the_rows(B, C):
    """The launch's batch sums (one block, several row blocks, many, the streamed kernel): the
    rows' shares summed, the ticket counter back at 0, and bitwise the same on every run."""
    s, d, t, q = make(B, C, F32, "soft", device="cuda")
    tickets = torch.zeros(1, dtype=torch.int32, device="cuda")
    import deit_fast._C  # noqa: F401
    runs = [torch.ops.deit_fast_C.distillation_loss_forward(
        s, d, q, t, "soft", 0.4, 2.0, 0.0, "batchmean", False, False, tickets) for _ in range(3)]
    loss, parts, rows, _, _ = runs[0]
    assert tickets.item() == 0
    torch.testing.assert_close(loss, rows[:, 0].sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(parts, rows[:, 1:].sum(0), rtol=1e-6, atol=0)
    for other in runs[1:]:
        assert torch.equal(other[0], loss) and torch.equal(other[1], parts)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_captured_launches_get_counters_of_their_own(backend):
    """A loss captured into a CUDA graph takes a counter from the device's slab, not the
    capturing stream's: replayed on the default stream while eager losses run there and on the
    capturing stream, every loss is right and every counter ends at 0."""
    s, d, t, y = make(512, 1000, BF16, "int", device="cuda")
    with ops.use_backend(backend):
        want = ops.distillation_loss(s, d, y, t, "hard", check_target=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops.distillation_loss(s, d, y, t, "hard", check_target=False)  # warm-up, eager
            graph = torch.cuda.CUDAGraph()
            slab, handed = op._SLABS[s.device]
            with torch.cuda.graph(graph, stream=side):
                got = ops.distillation_loss(s, d, y, t, "hard", check_target=False)
            assert op._SLABS[s.device][1] == handed + 1
        torch.cuda.current_stream().wait_stream(side)
        for _ in range(20):
            graph.replay()
            with torch.cuda.stream(side):
                eager_side = ops.distillation_loss(s, d, y, t, "hard", check_target=False)
            eager = ops.distillation_loss(s, d, y, t, "hard", check_target=False)
            torch.cuda.synchronize()
            assert torch.equal(got, want) and torch.equal(eager, want) and torch.equal(eager_side, want)
    assert not slab.any() and all(not c.any() for c in op._TICKETS.values())


def test_out_of_range_class_in_the_kernel_is_nan_not_a_stray_read():
    """What compiled code (which skips the Python range check) gets from a bad class index."""
    import deit_fast._C  # noqa: F401
    for C in (40, 5000):
        s, d, t, _ = make(3, C, F32, "int", device="cuda")
        y = torch.tensor([1, C, -1], device="cuda")
        loss, _, rows, ds, _ = extension_forward(s, d, y, t, "hard", 0.5, 1.0, 0.0, "numel", True,
                                                 False)
        assert torch.isfinite(rows[0]).all() and torch.isnan(rows[1:, :2]).all()
        assert torch.isnan(loss) and torch.isfinite(ds).all()


def test_out_of_range_class_raises_before_launch():
    s, d, t, _ = make(3, 40, F32, "int", device="cuda")
    with ops.use_backend("cuda"), pytest.raises(ValueError, match="target holds class indices"):
        ops.distillation_loss(s, d, torch.tensor([1, 40, 0], device="cuda"), t, "hard")


def test_empty_inputs():
    e = torch.empty(0, 10, device="cuda")
    loss, parts, rows, ds, dd = extension_forward(e, e, torch.empty(0, dtype=torch.long,
                                                                   device="cuda"),
                                                  e, "hard", 0.5, 1.0, 0.0, "numel", True, True)
    assert rows.shape == (0, 3) and ds.shape == dd.shape == (0, 10)
    assert torch.isnan(loss) and torch.isnan(parts).all()
    z = torch.empty(2, 0, device="cuda")
    loss, parts, rows, _, _ = extension_forward(z, z, torch.zeros(2, dtype=torch.long, device="cuda"),
                                                z, "soft", 0.5, 1.0, 0.0, "numel", True, True)
    assert torch.isnan(loss) and torch.isnan(parts).all() and torch.isnan(rows).all()
    with ops.use_backend("cuda"):  # the op itself: the reference's nan, no launch
        assert torch.isnan(ops.distillation_loss(e, e, torch.empty(0, dtype=torch.long, device="cuda"),
                                                 e, "hard"))
    torch.cuda.synchronize()


@pytest.mark.parametrize("kind,target", [("hard", "int-smooth"), ("soft", "soft"), ("none", "int")])
def test_custom_op_passes_opcheck(kind, target):
    s, d, t, y = make(2, 33, F32, target, device="cuda")
    torch.library.opcheck(torch.ops.deit_fast.distillation_loss.default,
                          (s.requires_grad_(), d.requires_grad_() if kind != "none" else None, y,
                           t if kind != "none" else None, kind, "numel", [0.3, 2.0, 0.1],
                           [True, kind != "none"], "cuda"))


def test_extension_op_on_cuda_passes_opcheck():
    import deit_fast._C  # noqa: F401
    ext = torch.ops.deit_fast_C.distillation_loss_forward.default
    s, d, t, q = make(3, 37, BF16, "soft", device="cuda")
    tickets = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.library.opcheck(ext, (s, d, q, t, "soft", 0.5, 2.0, 0.0, "batchmean", True, True, tickets))
    y = torch.randint(0, 37, (3,), device="cuda")
    torch.library.opcheck(ext, (s, None, y, None, "none", 0.5, 1.0, 0.1, "numel", True, False,
                                tickets))


def test_torch_compile_fullgraph_matches_eager():
    test_distill_loss.check_compiled_matches_eager("cuda", device="cuda")


def test_inputs_on_two_devices_raise():
    s, d, t, y = make(2, 10, F32, "int", device="cuda")
    with pytest.raises(RuntimeError, match="target is on cpu"):
        extension_forward(s, d, y.cpu(), t, "hard", 0.5, 1.0, 0.0, "numel", True, True)
    with pytest.raises(RuntimeError, match="tickets is on cpu"):
        torch.ops.deit_fast_C.distillation_loss_forward(s, d, y, t, "hard", 0.5, 1.0, 0.0, "numel",
                                                        True, True, op._tickets(torch.device("cpu")))


def test_runs_on_the_current_stream():
    s, d, t, q = make(256, 21841, BF16, "soft", device="cuda")
    expected = run("cuda", s, d, t, q, kind="hard")
    got = on_a_side_stream(lambda: run("cuda", s, d, t, q, kind="hard"))
    for a, b in zip(expected[0] + expected[1], got[0] + got[1]):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_int64_offsets_past_2_to_the_31():
    """B * C > 2**31: row offsets and the grads' row * C must not wrap around."""
    B, C = 98_400, 21841  # 2**31 + 3.4M elements per head, 4.3 GB in bf16
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    s = torch.zeros(B, C, device="cuda", dtype=BF16)
    s[-1, 5] = 4.0
    y = torch.full((B,), 5, dtype=torch.long, device="cuda")
    _, _, row, ds, _ = extension_forward(s, None, y, None, "none", 0.5, 1.0, 0.0, "numel", True,
                                         False)
    row = row[:, 0]
    lse0 = torch.tensor(float(C), dtype=torch.float64).log()
    lse1 = torch.tensor(C - 1 + torch.e ** 4, dtype=torch.float64).log()
    torch.testing.assert_close(row[0].double().cpu() * B, lse0, rtol=1e-5, atol=0)
    torch.testing.assert_close(row[-1].double().cpu() * B, lse1 - 4.0, rtol=1e-5, atol=0)
    assert ds[-1, 5].float() < 0 and ds[-1, 6].float() > 0 and ds[0, 5].float() < 0


SANITIZER_SCRIPT = """
import sys
import torch
from deit_fast import ops
from tests.ops.test_distill_loss import make
for B, C, dt in [(3, 10, torch.float32), (5, 37, torch.bfloat16), (2, 1000, torch.float16),
                 (2, 8192, torch.float16), (2, 21841, torch.float32)]:
    for kind, target in (("none", "int"), ("hard", "soft"), ("soft", "int")):
        s, d, t, y = make(B, C, dt, target, device="cuda")
        for views in (False, True):  # contiguous (vector path) and misaligned (scalar path)
            if views:
                s, d = (torch.cat([x, x[:, :1]], 1)[:, 1:] for x in (s, d))
            leaves = [s.detach().requires_grad_(), d.detach().requires_grad_()]
            # On stderr, which the failure message ends with: the last case named is the one
            # that failed (the sanitizer's report only names the kernel).
            print(f"case B={B} C={C} {dt} {kind}/{target} views={views}", file=sys.stderr,
                  flush=True)
            with ops.use_backend("cuda"):
                loss = ops.distillation_loss(*leaves, y, t, kind, 0.5, 2.0, label_smoothing=0.1)
            loss.backward()
torch.cuda.synchronize()
print("sanitizer script done")
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_compute_sanitizer(tool):
    run_sanitizer(tool, "distill_loss", SANITIZER_SCRIPT)
