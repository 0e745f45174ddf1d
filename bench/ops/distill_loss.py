"""distillation_loss: CE on the class head + hard or soft KD on the distillation head, fwd / bwd /
fwd+bwd, at DeiT's training batch (256 per GPU).

Ours (the triton and cuda backends) against the official DeiT DistillationLoss run eagerly
(losses.py, with timm's SoftTargetCrossEntropy as base criterion: the official recipe trains on
mixup targets), under bf16 autocast on CUDA as the DeiT trainer runs it, and torch.compile of
the reference.
Memory-bound, so judged in GB/s against the bandwidth roofline; the targets are >= 3x eager and
>= 1.3x torch.compile (fwd+bwd) for each of ours, shown at the end of the output and of the .md.
Bytes counted are the fewest the op needs: fwd reads logits, dist_logits, teacher_logits and the
soft target once; bwd writes the two head grads once.

    python -m bench.ops.distill_loss                      # every case on the GPU
    python -m bench.ops.distill_loss --device cpu --quick # smoke test (Triton interpreter)
"""
from bench import common  # first: it turns on the Triton interpreter when there is no GPU

import contextlib

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from deit_fast import ops
from deit_fast.ops import reference

BATCH = 256  # DeiT's per-GPU batch
CLASSES = {"imagenet1k": 1000, "imagenet21k": 21841, "cifar100": 100}
SMOKE_CLASSES = {"smoke": 100}
KINDS = ("hard", "soft")  # DeiT-B distilled was trained with hard distillation
DTYPES = common.DTYPES
SMOKE_DTYPE = "fp32"  # the interpreter has no bf16 arithmetic (DESIGN.md section 6)
ALPHA, TAU = 0.5, 1.0  # DeiT main.py defaults
TARGETS = {"eager": 3.0, "compile": 1.3}  # fwd+bwd speedup of ours over each baseline
OURS = ("triton", "cuda")


class DistillationLoss(torch.nn.Module):
    """facebookresearch/deit losses.py, teacher outputs passed in (the teacher is not timed)."""

    def __init__(self, base_criterion, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion, self.distillation_type = base_criterion, distillation_type
        self.alpha, self.tau = alpha, tau

    def forward(self, teacher_outputs, outputs, labels):
        outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(F.log_softmax(outputs_kd / T, dim=1),
                                         F.log_softmax(teacher_outputs / T, dim=1),
                                         reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def _ours(backend, kind):
    def f(s, d, t, q):
        with ops.use_backend(backend):
            return ops.distillation_loss(s, d, q, t, kind, ALPHA, TAU)
    return f


def _eager(kind, device):
    loss = DistillationLoss(SoftTargetCrossEntropy(), kind, ALPHA, TAU)

    def f(s, d, t, q):  # the DeiT trainer computes the loss inside its autocast region
        half = device.type == "cuda" and s.dtype != torch.float32
        with torch.autocast(device.type, dtype=s.dtype) if half else contextlib.nullcontext():
            return loss(t, (s, d), q)
    return f


def _compiled(kind, device):
    torch._dynamo.reset()  # a fresh static-shape compile per case
    return torch.compile(lambda s, d, t, q: reference.distillation_loss(s, d, q, t, kind, ALPHA, TAU),
                         dynamic=False)


IMPLS = {"triton": lambda kind, device: _ours("triton", kind),
         "cuda": lambda kind, device: _ours("cuda", kind), "eager": _eager, "compile": _compiled}


def setup(case: common.Case, impl: str, args):
    (B, C), dtype = case.shape, DTYPES[case.dtype]
    device = torch.device(args.device)
    f = IMPLS[impl](case.params["kind"], device)
    numel = B * C
    fwd_bytes = numel * (3 * dtype.itemsize + 4)  # three heads' logits + an fp32 mixup target
    bwd_bytes = numel * 2 * dtype.itemsize  # the two head grads
    fwd_flops, bwd_flops = 16 * numel, 6 * numel  # a rough count; the op is memory-bound
    sets = common.rotation(fwd_bytes + bwd_bytes, device)

    def inputs(grad):
        s, d, t = ((3 * torch.randn(B, C, device=device)).to(dtype) for _ in range(3))
        y = torch.randint(0, C, (B,), device=device)
        lam = 0.7  # a mixup target as timm's Mixup makes it (smoothing 0.1)
        one_hot = lambda i: F.one_hot(i, C).float() * 0.9 + 0.1 / C
        q = lam * one_hot(y) + (1 - lam) * one_hot(y.flip(0))
        return s.requires_grad_(grad), d.requires_grad_(grad), t, q

    return common.directions(f, inputs, sets, lambda: None, fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)


def targets(rows, interpreted: bool):
    """One markdown bullet per case and backend of ours: its fwd+bwd speedup over each baseline
    vs its target. (Bullets, not a table: the .md keeps exactly one table, one line per row.)"""
    by_case = {}
    for r in rows:
        if r.get("us") and r["direction"] == "fwd+bwd":
            by_case.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["impl"]] = r["us"]
    lines = []
    for (op, shape, dtype), us in by_case.items():
        for ours in (o for o in OURS if o in us):
            parts = []
            for b, target in TARGETS.items():
                if b not in us:
                    parts.append(f"{b} not run")
                    continue
                ratio = us[b] / us[ours]
                parts.append(f"{ratio:.2f}x {b} (target >= {target:g}x: "
                             f"{common.verdict(ratio >= target, interpreted)})")
            lines.append(f"- target, fwd+bwd, {op} {shape} {dtype}: {ours} {us[ours]:.1f} us; "
                         + ", ".join(parts))
    return lines


def main(argv=None):
    p = common.parser(__doc__, list(IMPLS), warmup_ms=10, rep_ms=40)
    p.add_argument("--dtypes", help=f"comma list out of {','.join(DTYPES)} (logits of all three heads)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma list out of hard,soft")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    classes = SMOKE_CLASSES if smoke else CLASSES
    batch = 4 if smoke else BATCH
    dtypes = (args.dtypes or (SMOKE_DTYPE if smoke else "bf16")).split(",")
    kinds = args.kinds.split(",")[:1] if smoke else args.kinds.split(",")
    report = ops.backend_report()["distillation_loss"][device.type]["unavailable"]
    impls = {"triton": common.Impl(False, report.get("triton")),
             "cuda": common.Impl(False, report.get("cuda")),
             "eager": common.Impl(True), "compile": common.Impl(True)}
    cases = [common.Case(f"distillation_loss_{kind}", (batch, C), dtype, {"kind": kind})
             for dtype in dtypes for C in classes.values() for kind in kinds]
    notes = {"shapes": f"(B, C); B = {batch}; " + ", ".join(f"{k} C={v}" for k, v in classes.items()),
             "dtype": "logits of the class, distillation and teacher heads; mixup targets fp32; loss fp32",
             "eager": "official DeiT DistillationLoss + timm SoftTargetCrossEntropy (bf16/fp16 under "
                      "autocast on CUDA); compile: torch.compile of the reference, static shapes",
             "params": f"alpha {ALPHA}, tau {TAU}, kl_reduction numel (official DeiT)",
             "targets": ", ".join(f">= {t:g}x {b}" for b, t in TARGETS.items()) + " (fwd+bwd)"}
    common.run("distillation_loss", args, cases, impls, setup, {"notes": notes}, targets)

if __name__ == "__main__":
    main()
