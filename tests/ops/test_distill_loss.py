"""distillation_loss: the Triton kernel vs the fp64 reference (interpreter on CPU, real on a GPU):
loss, components and both head grads for every kind x target type, C from 10 to 21841; grads not
asked for are not written; custom-op registration, torch.compile, determinism and input checks."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from deit_fast import ops
from deit_fast.kernels import distill_loss as kernel
from deit_fast.ops import distill_loss as op
from deit_fast.ops import reference
from tests.conftest import DEVICE
from tests.ops.tolerance import assert_rule, poisoned_empty

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
KINDS = ("none", "hard", "soft")
TARGETS = ("int", "int-smooth", "soft")  # class indices (smoothing 0 / 0.1), mixup soft targets
UPSTREAM = 0.7  # d(whatever follows) / d loss: the backward must scale the saved grads by it


class Count(TorchDispatchMode):
    """The names of the torch ops run inside it, in order."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def make(B, C, dtype, target, device=DEVICE, dist_dtype=None):
    s, d, t = (3 * torch.randn(B, C, device=device) for _ in range(3))
    s, t = s.to(dtype), t.to(dtype)
    d = d.to(dist_dtype or dtype)
    y = torch.randint(0, C, (B,), device=device)
    if target == "soft":  # what timm's Mixup makes: smoothed one-hots of two samples, mixed
        lam, smooth = 0.7, 0.1
        one_hot = lambda i: F.one_hot(i, C).float() * (1 - smooth) + smooth / C
        return s, d, t, lam * one_hot(y) + (1 - lam) * one_hot(y.flip(0))
    return s, d, t, y


def run(backend, s, d, t, target, **kw):
    """(loss, base, distill), (dlogits, ddist) of the op on `backend`, inputs as given."""
    leaves = [s.detach().requires_grad_(), d.detach().requires_grad_()]
    with ops.use_backend(backend):
        out = ops.distillation_loss(leaves[0], leaves[1], target, t, return_components=True, **kw)
    grads = torch.autograd.grad(out[0], leaves, torch.tensor(UPSTREAM, dtype=out[0].dtype),
                                allow_unused=True)
    return out, grads


def check_against_reference(s, d, t, target, backend="triton", **kw):
    """The op on `backend` (also test_distill_loss_cuda.py's, on "cuda") against the fp64 reference
    under the tolerance rule: loss, components and both head grads."""
    ours, ours_g = run(backend, s, d, t, target, **kw)
    same, same_g = run("torch", s, d, t, target, **kw)
    up = lambda x: x.double() if x.is_floating_point() else x
    ref, ref_g = run("torch", up(s), up(d), up(t), up(target), **kw)
    assert ours[0].dtype == F32 and ours[0].shape == ()
    for name, a, r, m in zip(("loss", "base", "distill"), ours, ref, same):
        assert_rule(name, a, r, m)
    for name, a, r, m, x in zip(("dlogits", "ddist"), ours_g, ref_g, same_g, (s, d)):
        if r is None:  # kind "none": dist_logits is not used
            assert a is None and m is None
            continue
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_rule(name, a, r, m)


def case_params():
    """kind x target x C x dtype, with B, tau and the KL reduction cycled through."""
    params, i = [], 0
    for kind in KINDS:
        for target in TARGETS:
            for C in (10, 100, 1000):
                for dtype in (F32, F16):
                    B, tau, kl = (1, 3, 8)[i % 3], (1.0, 3.0)[i // 3 % 2], ("numel", "batchmean")[i // 2 % 2]
                    i += 1
                    params.append(pytest.param(kind, target, B, C, dtype, tau, kl, id=(
                        f"{kind}-{target}-B{B}-C{C}-{str(dtype)[6:]}-tau{tau:g}-{kl}")))
    return params


@pytest.mark.parametrize("kind,target,B,C,dtype,tau,kl", case_params())
def test_matches_reference(kind, target, B, C, dtype, tau, kl, monkeypatch):
    poisoned_empty(monkeypatch)
    s, d, t, y = make(B, C, dtype, target)
    check_against_reference(s, d, t, y, kind=kind, alpha=0.5, tau=tau, kl_reduction=kl,
                            label_smoothing=0.1 if target == "int-smooth" else 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_imagenet21k_classes_two_sweeps(kind, target, monkeypatch):
    """C = 21841 is past a register tile: the chunked two-sweep path."""
    poisoned_empty(monkeypatch)
    B = 2 if kind == "soft" else 1
    assert not kernel.tile(21841)[1]
    s, d, t, y = make(B, 21841, F32, target)
    check_against_reference(s, d, t, y, kind=kind, alpha=0.5, tau=3.0, kl_reduction="batchmean",
                            label_smoothing=0.1 if target == "int-smooth" else 0.0)


def test_imagenet21k_fp16_soft():
    s, d, t, y = make(1, 21841, F16, "int-smooth")
    check_against_reference(s, d, t, y, kind="soft", tau=1.0, label_smoothing=0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_two_sweeps_of_whole_chunks(kind, monkeypatch):
    """C a multiple of CHUNK_C (8192 classes: 4 whole chunks, none partial): the second sweep,
    last chunk first, starts at the last chunk, not one past it."""
    poisoned_empty(monkeypatch)
    C = 4 * kernel.CHUNK_C
    assert not kernel.tile(C)[1]
    s, d, t, y = make(1, C, F32, "int-smooth")
    check_against_reference(s, d, t, y, kind=kind, alpha=0.5, tau=2.0, label_smoothing=0.1)


@pytest.mark.parametrize("kind,alpha,tau", [(k, a, tau) for k in ("hard", "soft") for a in (0.0, 0.5, 1.0)
                                            for tau in ((1.0, 3.0) if k == "soft" else (1.0,))])
def test_alpha_and_tau(kind, alpha, tau):
    s, d, t, y = make(3, 100, F32, "int")
    check_against_reference(s, d, t, y, kind=kind, alpha=alpha, tau=tau)


def test_unnormalised_soft_target_and_wide_logits():
    """Soft targets need not sum to 1 (the spec is sum(-q * log_softmax)); logits far from 0."""
    s, d, t, _ = make(3, 300, F32, "int")
    q = torch.rand(3, 300, device=DEVICE)
    check_against_reference(s * 10 + 50, d * 10 - 40, t * 5, q, kind="soft", tau=2.0)


def test_mixed_dtypes_and_strided_rows():
    """fp16 class head, fp32 distillation head (strided rows), fp16 teacher whose columns are
    not contiguous (copied once); loss in fp32, each grad in its head's dtype."""
    B, C = 3, 65
    s = (3 * torch.randn(B, 2 * C, device=DEVICE)).half()[:, C:]
    d = (3 * torch.randn(B, C + 7, device=DEVICE))[:, :C]
    t = (3 * torch.randn(C, B, device=DEVICE)).half().t()
    assert s.stride(0) != C and d.stride(0) != C and t.stride(1) != 1
    y = torch.randint(0, C, (B,), device=DEVICE)
    for kind in ("hard", "soft"):
        check_against_reference(s, d, t, y, kind=kind, tau=2.0, label_smoothing=0.1)


@pytest.mark.parametrize("C", [10, 5000], ids=["one-chunk", "chunked"])
def test_teacher_argmax_ties_take_the_first_index(C):
    t = torch.zeros(2, C, device=DEVICE)
    t[:, [C // 2, 3, C - 1]] = 5.0  # ties within and (C = 5000) across chunks
    d = torch.randn(2, C, device=DEVICE).requires_grad_()
    s, y = torch.randn(2, C, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE)
    with ops.use_backend("triton"):
        loss = ops.distillation_loss(s, d, y, t, "hard", alpha=1.0)
    loss.backward()
    assert d.grad.argmin(dim=1).tolist() == [3, 3]  # softmax - onehot(argmax): the one negative
    torch.testing.assert_close(loss, F.cross_entropy(d.detach(), t.argmax(dim=1)))


@pytest.mark.parametrize("C", [300, 5000], ids=["one-chunk", "chunked"])
def test_teacher_nan_is_its_argmax_as_in_torch(C):
    """torch.argmax ranks NaN above every value and takes the first NaN; the hardware max drops
    NaN. Rows: a NaN after a larger finite value (in a later chunk when chunked), two NaNs (the
    first wins), a NaN before a larger finite value."""
    t = torch.randn(3, C, device=DEVICE)
    t[0, 5], t[0, C - 2] = 100.0, float("nan")
    t[1, C - 1], t[1, C // 2] = float("nan"), float("nan")
    t[2, 1], t[2, C - 3] = float("nan"), 100.0
    d = torch.randn(3, C, device=DEVICE).requires_grad_()
    s, y = torch.randn(3, C, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    with ops.use_backend("triton"):
        loss = ops.distillation_loss(s, d, y, t, "hard", alpha=1.0)
    loss.backward()
    assert d.grad.argmin(dim=1).tolist() == t.argmax(dim=1).tolist() == [C - 2, C // 2, 1]
    torch.testing.assert_close(loss, F.cross_entropy(d.detach(), t.argmax(dim=1)))


def test_grads_not_required_are_not_written(monkeypatch):
    """Heads that need no grad: the kernel gets the flags off and returns empty grad buffers;
    everything it does write is written (poisoned outputs)."""
    poisoned_empty(monkeypatch)
    calls = []
    real = kernel.forward

    def spy(*args):
        out = real(*args)
        calls.append((args[9:11], out[3].numel(), out[4].numel()))
        return out
    monkeypatch.setattr(kernel, "forward", spy)
    s, d, t, y = make(3, 100, F32, "int")
    with ops.use_backend("triton"):
        loss = ops.distillation_loss(s, d, y, t, "soft")
        with torch.no_grad():
            ops.distillation_loss(s.requires_grad_(), d, y, t, "soft")
        d.requires_grad_()
        s.requires_grad_(False)
        partial = ops.distillation_loss(s, d, y, t, "soft")
        partial.backward()
    assert calls == [((False, False), 0, 0), ((False, False), 0, 0), ((False, True), 0, 300)]
    assert s.grad is None and torch.isfinite(d.grad).all()
    torch.testing.assert_close(loss, reference.distillation_loss(s, d.detach(), y, t, "soft"))
    torch.testing.assert_close(partial, loss, rtol=0, atol=0)


def test_saved_grad_dtypes():
    """bf16/fp32 heads keep their dtype; fp16 grads are saved in fp32 (the 1/B-scaled values
    underflow fp16's range); the fake impl agrees with the kernel."""
    for dtype, saved in ((F32, F32), (BF16, BF16), (F16, F32)):
        assert kernel.grad_dtype(dtype) == op._grad_dtype(dtype) == saved
    s, d, t, y = make(2, 10, F16, "int")
    out = torch.ops.deit_fast.distillation_loss(s, d.float(), y, t, "hard", "numel", [0.5, 1.0, 0.0],
                                                [True, True])
    assert out[2].dtype == F32 and out[3].dtype == F32 and out[2].shape == (2, 10)


@pytest.mark.parametrize("dtype,dist_dtype", [(F32, F32), (F16, F16), (F16, F32)], ids=str)
def test_backward_is_one_launch_for_both_heads(dtype, dist_dtype, monkeypatch):
    """The loss's upstream scalar (here a GradScaler-like 1024) times both saved grads in one
    launch, whatever the heads' dtypes (torch's multi-tensor multiply takes one only where
    they match the fp32 upstream grad); no torch op but the outputs' allocations. Bitwise
    what torch's multiply of the saved grads gives: fp32 products, rounded once."""
    s, d, t, y = make(4, 30, dtype, "int", dist_dtype=dist_dtype)
    leaves = [x.detach().requires_grad_() for x in (s, d)]
    with ops.use_backend("triton"):
        loss = ops.distillation_loss(*leaves, y, t, "soft", tau=2.0)
    upstream = torch.tensor(1024.0, device=DEVICE)
    launches, real = [], kernel._scale_grads
    # The launch runs after the count: the interpreter's host copies are torch ops too.
    monkeypatch.setattr(kernel, "_scale_grads", {(2,): lambda *a, **k: launches.append((a, k))})
    with Count() as counted:
        got = torch.autograd.grad(loss, leaves, upstream, retain_graph=True)
    assert len(launches) == 1 and set(counted.ops) == {"empty"}, counted.ops
    real[(2,)](*launches[0][0], **launches[0][1])  # 120 + 120 elements: one program each
    saved = loss.grad_fn.saved_tensors
    for g, x, keep in zip(got, leaves, saved):
        assert g.dtype == x.dtype and keep.dtype == kernel.grad_dtype(x.dtype)
        assert torch.equal(g, torch.mul(keep, upstream).to(x.dtype))


def test_backward_of_one_head():
    """A head without a grad gets none, and the other head's is scaled alone."""
    s, d, t, y = make(3, 20, F32, "int")
    d.requires_grad_()
    with ops.use_backend("triton"):
        loss = ops.distillation_loss(s, d, y, t, "hard")
    (got,) = torch.autograd.grad(loss * 3.0, [d])
    with ops.use_backend("torch"):
        (want,) = torch.autograd.grad(ops.distillation_loss(s, d, y, t, "hard") * 3.0, [d])
    torch.testing.assert_close(got, want)


def test_differentiable_backward_scales_by_the_upstream_grad():
    """create_graph=True with an upstream grad that itself requires grad (a learned loss weight,
    a gradient penalty) takes the differentiable form of the backward: the saved grads times the
    upstream grad there too, and differentiable in it."""
    s, d, t, y = make(4, 10, F32, "int")
    leaves = [s.detach().requires_grad_(), d.detach().requires_grad_()]
    upstream = torch.tensor(UPSTREAM, device=DEVICE, requires_grad=True)
    with ops.use_backend("triton"):
        loss = ops.distillation_loss(*leaves, y, t, "soft", tau=2.0)
    grads = torch.autograd.grad(loss, leaves, upstream, create_graph=True)
    _, want = run("torch", s, d, t, y, kind="soft", tau=2.0)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    (dup,) = torch.autograd.grad(sum(g.square().sum() for g in grads), upstream)
    torch.testing.assert_close(dup, sum(2 * w.square().sum() / UPSTREAM for w in want))


def test_backward_kernel_spans_blocks(monkeypatch):
    """Heads of several program blocks each, the last ones partial: every element scaled."""
    monkeypatch.setattr(kernel, "SCALE_BLOCK", 64)
    ds, dd = torch.randn(5, 37, device=DEVICE), torch.randn(7, 41, device=DEVICE)  # 3 and 5 blocks
    for a, b in ((ds, dd), (ds, dd.new_empty(0)), (ds.new_empty(0), dd)):
        g = torch.tensor(-0.37, device=DEVICE)
        out_a, out_b = kernel.backward(a, b, g, F16, F32)
        assert out_a.dtype == F16 and out_b.dtype == F32
        assert torch.equal(out_a, (a * g).to(F16)) and torch.equal(out_b, b * g)


@pytest.mark.parametrize("name", ["teacher_logits", "target"])
def test_distillation_grads_the_kernels_do_not_give_are_refused(name):
    """The kernel backends differentiate the student's heads only; a teacher or soft target that
    requires grad got none, silently (the torch backend gives one)."""
    logits, dist, teacher = (torch.randn(4, 10, device=DEVICE) for _ in range(3))
    args = dict(logits=logits.requires_grad_(), dist_logits=dist, teacher_logits=teacher,
                target=torch.rand(4, 10, device=DEVICE).softmax(-1), kind="soft")
    args[name] = args[name].requires_grad_()
    with ops.use_backend("triton"), pytest.raises(ValueError, match=f"{name} requires grad"):
        ops.distillation_loss(**args)
    with ops.use_backend("triton"), torch.no_grad():
        ops.distillation_loss(**args)  # nothing to differentiate: fine


def test_components_sum_to_the_loss():
    s, d, t, y = make(4, 50, F32, "int-smooth")
    for backend in ("triton", "torch"):
        with ops.use_backend(backend):
            loss, base, distill = ops.distillation_loss(s, d, y, t, "hard", alpha=0.3,
                                                        label_smoothing=0.1, return_components=True)
        torch.testing.assert_close(loss, 0.7 * base + 0.3 * distill)
        assert not base.requires_grad and not distill.requires_grad
    with ops.use_backend("torch"):  # the torch path is the reference, bit for bit
        assert torch.equal(loss, reference.distillation_loss(s, d, y, t, "hard", 0.3, label_smoothing=0.1))


def test_bitwise_deterministic():
    s, d, t, q = make(8, 1000, F32, "soft")
    first = run("triton", s, d, t, q, kind="soft", tau=2.0)
    second = run("triton", s, d, t, q, kind="soft", tau=2.0)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_empty_batch_gives_the_reference_nan_without_launch(monkeypatch):
    monkeypatch.setattr(kernel, "forward", lambda *a: pytest.fail("kernel launched"))
    e = torch.empty(0, 10, device=DEVICE)
    with ops.use_backend("triton"):
        assert torch.isnan(ops.distillation_loss(e, e, torch.empty(0, dtype=torch.long), e, "hard"))


@pytest.mark.parametrize("kind,target", [("hard", "int-smooth"), ("soft", "soft"), ("none", "int")])
def test_custom_op_passes_opcheck(kind, target):
    s, d, t, y = make(2, 33, F32, target)
    torch.library.opcheck(torch.ops.deit_fast.distillation_loss.default,
                          (s.requires_grad_(), d.requires_grad_() if kind != "none" else None, y,
                           t if kind != "none" else None, kind, "numel", [0.3, 2.0, 0.1],
                           [True, kind != "none"]))


def test_backward_custom_op_passes_opcheck():
    ds, dd = torch.randn(3, 33, device=DEVICE), torch.randn(3, 33, device=DEVICE)
    for args in ((ds, dd, F16, F32), (ds, dd.new_empty(0), F32, F16)):
        torch.library.opcheck(torch.ops.deit_fast.distillation_loss_backward.default,
                              (args[0], args[1], torch.tensor(0.5, device=DEVICE), *args[2:], "triton"))


def check_compiled_matches_eager(backend, device=DEVICE):
    """torch.compile(fullgraph) of the op on `backend` gives eager's loss, components and grads
    (also test_distill_loss_cuda.py's, on "cuda")."""
    s, d, t, q = make(3, 40, F32, "soft", device=device)

    def step(s, d):
        loss, base, distill = ops.distillation_loss(s, d, q, t, "soft", 0.5, 2.0, return_components=True)
        return loss * 2.0, base, distill
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with ops.use_backend(backend):
        leaves = [x.clone().requires_grad_() for x in (s, d)]
        got = compiled(*leaves)
        got[0].backward()
        eager = [x.clone().requires_grad_() for x in (s, d)]
        want = step(*eager)
        want[0].backward()
    for a, b in zip(got + tuple(x.grad for x in leaves), want + tuple(x.grad for x in eager)):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_matches_eager():
    check_compiled_matches_eager("triton")


def test_torch_compile_fullgraph_with_class_targets():
    """The class-range check is a data-dependent branch: compiled code skips it."""
    s, d, t, y = make(3, 40, F32, "int-smooth")
    step = lambda s: ops.distillation_loss(s, d, y, t, "hard", label_smoothing=0.1)
    with ops.use_backend("triton"):
        torch.testing.assert_close(torch.compile(step, backend="aot_eager", fullgraph=True)(s), step(s))


def test_out_of_range_class_in_the_kernel_is_nan_not_a_stray_read():
    """What compiled code (which skips the check) gets from a bad class index."""
    s, d, t, _ = make(3, 40, F32, "int")
    y = torch.tensor([1, 40, -1], device=DEVICE)
    loss, parts, rows, ds, _ = kernel.forward(s, d, y, t, "hard", 0.5, 1.0, 0.0, "numel", True,
                                              False, op._tickets(s.device))
    assert torch.isfinite(rows[0]).all() and torch.isnan(rows[1:, :2]).all()
    assert torch.isfinite(rows[:, 2]).all() and torch.isfinite(ds).all()
    assert torch.isnan(loss) and torch.isnan(parts[0]) and torch.isfinite(parts[1])


@pytest.mark.parametrize("B", [1, 37])
def test_the_last_program_sums_the_rows(B, monkeypatch):
    """The launch's batch sums: loss and components are the sums of the rows' shares (here in
    3 steps of a 16-row block, the last one masked), and the ticket counter is back at 0."""
    monkeypatch.setattr(kernel, "SUM_BLOCK_B", 16)
    s, d, t, q = make(B, 30, F32, "soft")
    tickets = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second launch starts from the counter the first one left
        loss, parts, rows, _, _ = kernel.forward(s, d, q, t, "soft", 0.4, 2.0, 0.0, "batchmean",
                                                 False, False, tickets)
        assert tickets.item() == 0
        torch.testing.assert_close(loss, rows[:, 0].sum(), rtol=1e-6, atol=0)
        torch.testing.assert_close(parts, rows[:, 1:].sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, reference.distillation_loss(s, d, q, t, "soft", 0.4, 2.0,
                                                                 kl_reduction="batchmean"))


def test_one_counter_per_device_and_stream():
    """The op's ticket counters: one per (device, stream), kept and reused, at 0 between calls."""
    first = op._tickets(torch.device(DEVICE))
    assert op._tickets(torch.device(DEVICE)) is first and first.dtype == torch.int32
    s, d, t, y = make(5, 20, F32, "int")
    with ops.use_backend("triton"):
        ops.distillation_loss(s, d, y, t, "hard")
    assert first.item() == 0
    if DEVICE == "cuda":
        with torch.cuda.stream(torch.cuda.Stream()):
            assert op._tickets(torch.device(DEVICE)) is not first


def test_the_forward_is_the_kernel_alone(monkeypatch):
    """No torch reduction after the kernel (the batch sums are the kernel's): allocations only."""
    s, d, t, y = make(4, 30, F32, "int")
    launches = []
    with ops.use_backend("triton"):
        ops.distillation_loss(s, d, y, t, "hard", check_target=False)  # the counter exists now
        # the launch itself stands aside: the interpreter's host copies are torch ops too
        monkeypatch.setattr(kernel, "_distill_loss_fwd",
                            {(4,): lambda *a, **k: launches.append(len(a))})
        with Count() as counted:
            ops.distillation_loss(s.requires_grad_(), d.requires_grad_(), y, t, "hard",
                                  return_components=True, check_target=False)
    assert len(launches) == 1 and set(counted.ops) == {"empty", "unbind"}, counted.ops


def test_check_target_false_skips_the_range_check():
    """check_target=False (the trainer's: no host sync per step): a bad class is not reported but
    makes that row's loss nan; the default raises, naming the argument."""
    s, d, t, _ = make(3, 40, F32, "int")
    y = torch.tensor([1, 40, 2], device=DEVICE)
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match="target"):
            ops.distillation_loss(s, d, y, t, "hard")
        assert torch.isnan(ops.distillation_loss(s, d, y, t, "hard", check_target=False))
        y[1] = 3
        torch.testing.assert_close(ops.distillation_loss(s, d, y, t, "hard", check_target=False),
                                   ops.distillation_loss(s, d, y, t, "hard"))


L, Y = torch.randn(4, 10), torch.tensor([0, 3, 9, 1])


@pytest.mark.parametrize("kwargs,arg", [
    (dict(target=torch.tensor([0, 3, 10, 1])), "target"),
    (dict(target=torch.tensor([0, -1, 2, 1])), "target"),
    (dict(target=Y.int()), "target"),
    (dict(target=torch.rand(4, 9)), "target"),
    (dict(target=[0, 3, 9, 1]), "target"),
    (dict(teacher_logits=None), "teacher_logits"),
    (dict(teacher_logits=torch.randn(4, 10, device="meta")), "teacher_logits"),
    (dict(dist_logits=torch.randn(4, 9)), "dist_logits"),
    (dict(dist_logits=torch.randn(40)), "dist_logits"),
    (dict(kind="medium"), "kind"),
    (dict(kl_reduction="mean"), "kl_reduction"),
    (dict(alpha=1.5), "alpha"),
    (dict(tau=0.0), "tau"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(logits=torch.randn(4, 10, 1)), "logits"),
    (dict(logits=torch.randint(0, 3, (4, 10))), "logits"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input_names_the_argument_before_launch(kwargs, arg, backend, monkeypatch):
    monkeypatch.setattr(kernel, "forward", lambda *a: pytest.fail("kernel launched"))
    args = dict(logits=L, dist_logits=L, target=Y, teacher_logits=L)
    args.update(kwargs)
    with ops.use_backend(backend), pytest.raises(ValueError, match=arg):
        ops.distillation_loss(**args)


@pytest.mark.parametrize("arg", ["logits", "dist_logits", "teacher_logits", "target"])
def test_fp64_is_refused_by_the_kernel_but_runs_on_torch(arg, monkeypatch):
    monkeypatch.setattr(kernel, "forward", lambda *a: pytest.fail("kernel launched"))
    args = dict(logits=L, dist_logits=L, target=torch.softmax(L, -1), teacher_logits=L, kind="soft")
    args[arg] = args[arg].double()
    with ops.use_backend("triton"), pytest.raises(ValueError, match=f"{arg} dtype"):
        ops.distillation_loss(**args)
    with ops.use_backend("torch"):
        assert torch.isfinite(ops.distillation_loss(**args))


def test_kind_none_ignores_the_distillation_inputs():
    s, _, _, y = make(3, 20, F16, "int")
    with ops.use_backend("triton"):
        got = ops.distillation_loss(s, None, y, kind="none", alpha=0.9, label_smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(s.float(), y, label_smoothing=0.1))


def test_auto_runs_the_kernel_on_cuda_and_torch_on_cpu():
    from deit_fast.ops import _backend
    assert _backend.resolve("distillation_loss", torch.device("cpu")) == "torch"
    assert "triton" not in ops.backend_report()["distillation_loss"]["cpu"]["unavailable"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("C", [1000, 21841])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_gpu_bf16_fp16(target, kind, C, dtype):
    s, d, t, y = make(256, C, dtype, target, device="cuda")
    check_against_reference(s, d, t, y, kind=kind, tau=2.0 if kind == "soft" else 1.0,
                            label_smoothing=0.1 if target == "int-smooth" else 0.0)


@pytest.mark.gpu
def test_gpu_mixed_heads_bf16_fp32():
    s, d, t, y = make(256, 1000, BF16, "soft", device="cuda", dist_dtype=F32)
    check_against_reference(s, d, t, y, kind="soft", kl_reduction="batchmean")


@pytest.mark.parametrize("kind", ["none", "hard"])
def test_masked_class_without_smoothing(kind):
    """A logit of -inf (a class masked out) with label_smoothing 0: the loss and grads stay finite
    and match the reference, as F.cross_entropy's do (0 * inf in the smoothing term made NaN)."""
    s, d, t, y = make(5, 11, F32, "int")
    s[:, 3], d[:, 3], t[:, 3] = float("-inf"), float("-inf"), -30.0
    y = torch.where(y == 3, 4, y)
    (ours, *_), ours_g = run("triton", s, d, t, y, kind=kind)
    (ref, *_), ref_g = run("torch", s.double(), d.double(), t.double(), y, kind=kind)
    assert torch.isfinite(ours) and torch.isfinite(ref)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(ours_g, ref_g):
        if r is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)
