"""End-to-end training throughput: images/s and MFU of a whole DeiT/CaiT training step, with and
without distillation, ours against timm eager and timm + torch.compile.

One step = the student's forward under bf16 autocast, the teacher's forward (distilled cases:
no grad, eval mode), the loss, backward, and a fused AdamW step with timm's weight-decay groups,
on GPU-resident random images and mixup-style soft targets (what `deit-fast train --synthetic`
runs). The impls differ only in the student and its loss:
  ours          deit_fast.create_model (backend auto) + deit_fast.ops.distillation_loss;
  ours_compile  the same, student under torch.compile (our ops stay opaque custom ops);
  timm          timm.create_model of the same name (SDPA attention) + the official DeiT
                DistillationLoss with timm's SoftTargetCrossEntropy, eagerly;
  timm_compile  the same, student and loss under torch.compile.
Distillation runs each model up to three times: teacher (RegNetY-16GF by default, random weights)
in NCHW as the official code runs it, channels-last (our default), and channels-last under
torch.compile with its weights frozen (BatchNorms folded into the convolutions: `deit-fast train
--compile-teacher`), so the table shows what the layout and the folding are worth. DeiTs are
distilled through their distillation token (the *_distilled_* model), CaiTs through their class
head. FLOPs per image: the student's forward + backward (flop_counter on
timm's model, as bench.models) plus the teacher's forward; MFU against the bf16 dense peak.

    python -m bench.train                                   # every model and setting, batch 256
    python -m bench.train --models deit_small --settings none,hard_cl --impls ours,timm
    python -m bench.train --device cpu --quick              # smoke test
"""
from bench import common  # first: it turns on the Triton interpreter when there is no GPU

import functools

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from torch.utils.flop_counter import FlopCounterMode

import deit_fast
from bench.models import flops_per_image
from bench.ops.distill_loss import DistillationLoss
from deit_fast import ops
from deit_fast.train.teacher import CompiledTeacher

# name -> (plain model, distilled model): DeiTs have a distillation-token twin, CaiTs do not.
MODELS = {"deit_tiny": ("deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"),
          "deit_small": ("deit_small_patch16_224", "deit_small_distilled_patch16_224"),
          "deit_base": ("deit_base_patch16_224", "deit_base_distilled_patch16_224"),
          "cait_xxs24": ("cait_xxs24_224", "cait_xxs24_224"),
          "cait_s24": ("cait_s24_224", "cait_s24_224")}
# setting -> (distillation type, teacher channels-last, teacher compiled with its weights frozen)
SETTINGS = {"none": ("none", False, False), "hard_nchw": ("hard", False, False),
            "hard_cl": ("hard", True, False), "hard_cl_frozen": ("hard", True, True)}
IMPLS = ("ours", "timm", "ours_compile", "timm_compile")
BATCH, SIZE, CLASSES = 256, 224, 1000
ALPHA, TAU, LR, WEIGHT_DECAY = 0.5, 1.0, 5e-4, 0.05  # DeiT's recipe
SMOKE = {"models": "deit_tiny", "settings": "none,hard_cl,hard_cl_frozen", "batch": 2,
         "teacher": "resnet10t"}


@functools.lru_cache(maxsize=None)
def teacher_flops(name: str, device: torch.device) -> float:
    with torch.device(device):
        teacher = timm.create_model(name, num_classes=CLASSES).eval()
        x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher(x)
    return float(counter.get_total_flops())


def _student(impl: str, name: str, kind: str, device: torch.device):
    """(module, callable) of the student: the callable is what the step runs."""
    with torch.device(device):  # weights created where they run
        model = deit_fast.create_model(name) if impl.startswith("ours") else timm.create_model(name)
    if kind != "none" and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # train mode returns (class head, distillation head)
    model.train()
    return model, (torch.compile(model) if impl.endswith("_compile") else model)


def _loss(impl: str, kind: str):
    """loss(outputs, soft_targets, teacher_logits or None): ours, or the official DeiT one."""
    if impl.startswith("ours"):
        def ours(outputs, targets, t_logits):
            logits, dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
            return ops.distillation_loss(logits, dist, targets, t_logits, kind, ALPHA, TAU)
        return ours
    base = SoftTargetCrossEntropy()
    official = DistillationLoss(base, kind, ALPHA, TAU)

    def deit(outputs, targets, t_logits):
        if kind == "none":
            return base(outputs, targets)
        return official(t_logits, outputs if isinstance(outputs, tuple) else (outputs, outputs), targets)
    return torch.compile(deit) if impl == "timm_compile" else deit


def setup(case: common.Case, impl: str, args):
    family, setting = case.op.split(" ")
    kind, channels_last, frozen = SETTINGS[setting]
    name = MODELS[family][kind != "none"]
    (B, _, S, _), device = case.shape, torch.device(args.device)
    if impl.endswith("_compile"):
        torch._dynamo.reset()  # drop the previous case's graphs and their memory
    model, student = _student(impl, name, kind, device)
    loss_fn = _loss(impl, kind)
    # capturable: its step count lives on the GPU, so the graph-replay timing can capture the step
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=LR,
                                  fused=device.type == "cuda", capturable=device.type == "cuda")
    teacher = None
    if kind != "none":
        with torch.device(device):
            teacher = timm.create_model(args.teacher_model, num_classes=CLASSES)
        teacher.eval().requires_grad_(False)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        if frozen:  # what `deit-fast train --compile-teacher` runs
            teacher = CompiledTeacher(teacher)
    images = torch.randn(B, 3, S, S, device=device)
    targets = torch.softmax(torch.randn(B, CLASSES, device=device), dim=-1)  # mixup-like soft targets
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    flops = flops_per_image(name, device)[1] + (teacher_flops(args.teacher_model, device) if teacher else 0)

    def step():
        with autocast():
            outputs = student(images)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
                    t_logits = teacher(x)
        loss = loss_fn(outputs, targets, t_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"train step": lambda: common.Timed(step, flops=B * int(flops), items=B)}


def main(argv=None):
    p = common.parser(__doc__, IMPLS, warmup_ms=200, rep_ms=2000)
    p.add_argument("--models", help=f"comma list out of {','.join(MODELS)}")
    p.add_argument("--settings", help=f"comma list out of {','.join(SETTINGS)} (none: no distillation; "
                   "hard_nchw / hard_cl: hard distillation, teacher NCHW / channels-last; "
                   "hard_cl_frozen: channels-last, compiled with frozen weights)")
    p.add_argument("--batch-size", type=int, help=f"per step (default {BATCH})")
    p.add_argument("--teacher-model", help="timm name (default regnety_160)")
    args = common.parse_args(p, argv)
    smoke = args.quick and args.device == "cpu"
    models = (args.models or (SMOKE["models"] if smoke else ",".join(MODELS))).split(",")
    settings = (args.settings or (SMOKE["settings"] if smoke else ",".join(SETTINGS))).split(",")
    args.teacher_model = args.teacher_model or (SMOKE["teacher"] if smoke else "regnety_160")
    for value, known, flag in ((models, MODELS, "--models"), (settings, SETTINGS, "--settings")):
        if set(value) - set(known):
            raise SystemExit(f"{flag}: unknown {sorted(set(value) - set(known))}; choose from {list(known)}")
    batch = args.batch_size or (SMOKE["batch"] if smoke else BATCH)
    cases = [common.Case(f"{m} {s}", (batch, 3, SIZE, SIZE), "bf16 autocast") for m in models for s in settings]
    impls = {"ours": common.Impl(False), "timm": common.Impl(True), "ours_compile": common.Impl(False),
             "timm_compile": common.Impl(True)}
    device = torch.device(args.device)
    backends = {op: r[device.type]["runs"] for op, r in ops.backend_report().items()}
    # as `deit-fast train` (and the official main.py) runs: cuDNN times its conv algorithms
    torch.backends.cudnn.benchmark = True
    notes = {"step": "student fwd (bf16 autocast) + teacher fwd (no grad) + loss + backward + fused AdamW",
             "teacher": f"{args.teacher_model}, random weights; hard_nchw: NCHW, hard_cl: channels-last, "
                        "hard_cl_frozen: channels-last under torch.compile with frozen weights",
             "ours runs": ", ".join(f"{op}: {b}" for op, b in backends.items()),
             "cudnn": "benchmark mode, every impl",
             "FLOPs": "student fwd+bwd (flop_counter on timm's model) + teacher fwd, per image"}
    common.run("train", args, cases, impls, setup, {"notes": notes, "backends": backends})


if __name__ == "__main__":
    main()
