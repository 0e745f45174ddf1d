"""One training step, one training epoch, one evaluation (DeiT's engine.py on deit_fast ops).

The step: mixup on the device batch -> student forward (and the frozen teacher on the very same
mixed batch) under autocast -> deit_fast.ops.distillation_loss -> backward (GradScaler in fp16)
-> optional clipping -> AdamW -> per-iteration lr -> EMA. With --cuda-graph, forward to AdamW is
one CUDA-graph replay (graphs.py). Losses stay on the device and are read back every
--print-freq steps (one sync, not one per step); a non-finite value stops the run before
anything else is saved.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deit_fast import ops

from . import distributed
from .data import mix_seed, prefetch, seed_everything
from .teacher import teacher_logits

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


class NonFiniteLossError(RuntimeError):
    pass


class StopTraining(Exception):
    """--stop-after-steps reached: end the run as a kill would (no epoch-end work)."""


def autocast(device: torch.device, precision: str, cache: bool = True):
    """cache=False in a step that is captured into a CUDA graph, as torch.cuda.graph asks."""
    dtype = AMP_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                          cache_enabled=cache)


@dataclass
class State:
    """Everything a step touches; run.py builds it, checkpoints save it."""
    args: object
    device: torch.device
    dist: distributed.Dist
    model: nn.Module          # what the step calls: DDP- and/or compile-wrapped
    raw_model: nn.Module      # the bare module: its state_dict has clean keys
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: object         # timm CosineLRScheduler, stepped per iteration
    steps_per_epoch: int
    teacher: Optional[nn.Module] = None
    model_ema: Optional[nn.Module] = None
    mixup: Optional[Callable] = None
    graphed: Optional[Callable] = None  # --cuda-graph: graphs.GraphedStep over eager_step
    global_step: int = 0
    meters: dict = field(default_factory=lambda: {"loss": 0.0, "base": 0.0, "distill": 0.0, "steps": 0})
    step_losses: List[float] = field(default_factory=list)  # the loss curve of this process's run
    last_checkpoint: str = ""  # named when a non-finite loss stops the run


def compute_loss(model, teacher, samples, targets, args, device):
    """(loss, base, distill) of a batch; the teacher sees exactly `samples`."""
    kind = args.distillation_type
    with autocast(device, args.precision, cache=not args.cuda_graph):
        outputs = model(samples)
        t_logits = teacher_logits(teacher, samples, args.channels_last_teacher) if kind != "none" else None
    # A distilled DeiT returns (class head, distillation head). A student without a distillation
    # token (DeiT without one, CaiT) is distilled through its class head: the paper's "usual
    # distillation" row.
    logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
    smoothing = 0.0 if targets.is_floating_point() else args.smoothing  # mixup has it inside
    return ops.distillation_loss(logits, dist_logits, targets, t_logits, kind,
                                 args.distillation_alpha, args.distillation_tau, smoothing,
                                 args.kl_reduction, return_components=True,
                                 check_target=False)  # labels < nb_classes by construction: no sync


def optimizer_step(s: State, loss: torch.Tensor) -> None:
    s.scaler.scale(loss).backward()  # scale() is the identity when the scaler is disabled
    if s.args.clip_grad:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), s.args.clip_grad)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)


def eager_step(s: State, samples: torch.Tensor, targets: torch.Tensor):
    """Loss, backward and optimizer step of one batch; returns (loss, base, distill)."""
    loss, base, distill = compute_loss(s.model, s.teacher, samples, targets, s.args, s.device)
    optimizer_step(s, loss)
    return loss, base, distill


def _check_and_log(s: State, window: List[torch.Tensor], epoch: int):
    """Reduce the window's (loss, base, distill) rows over ranks, stop on a non-finite loss,
    add them to the epoch's meters. One host sync per window."""
    rows = distributed.all_reduce_sum(torch.stack(window).float()).div_(s.dist.world).tolist()
    first = s.global_step - len(rows) + 1
    for i, (loss, base, distill) in enumerate(rows):
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss} at epoch {epoch}, global step {first + i} (base {base}, distill "
                f"{distill}): stopping. Nothing was saved after the last finite step"
                + (f"; the last checkpoint is {s.last_checkpoint}" if s.last_checkpoint else "")
                + ". Try a lower --lr, --clip-grad, or --precision bf16/fp32.")
        s.meters["loss"] += loss
        s.meters["base"] += base
        s.meters["distill"] += distill
        s.meters["steps"] += 1
        s.step_losses.append(loss)
    return rows[-1][0]


def train_one_epoch(s: State, loader, epoch: int, start_step: int, save: Callable[[int], None],
                    bar=None) -> dict:
    """Train steps start_step .. steps_per_epoch-1 of `epoch`; save(step_in_epoch) writes a
    checkpoint (--save-every-steps). Returns throughput figures."""
    args, device = s.args, s.device
    s.model.train()
    loader.batch_sampler.set_epoch(epoch, start_step, s.steps_per_epoch)
    window, images = [], 0
    start = time.perf_counter()
    for step, (samples, targets) in enumerate(prefetch(loader, device), start=start_step):
        # Per-step RNG streams (drop path, mixup): a function of the step alone, so a resumed
        # run draws what the uninterrupted one drew. Ranks differ, as the official seed + rank.
        seed_everything(mix_seed(args.seed, s.dist.rank, s.global_step))
        if s.mixup is not None:
            samples, targets = s.mixup(samples, targets)
        if s.graphed is not None:
            loss, base, distill = s.graphed(samples, targets)
        else:
            loss, base, distill = eager_step(s, samples, targets)
        s.global_step += 1
        s.scheduler.step_update(num_updates=s.global_step)
        if s.model_ema is not None:
            s.model_ema.update(s.raw_model, step=s.global_step)
        images += samples.shape[0] * s.dist.world
        window.append(torch.stack([loss.detach().float(), base.float(), distill.float()]))

        last = step + 1 == s.steps_per_epoch
        save_now = (args.save_every_steps > 0 and s.global_step % args.save_every_steps == 0
                    and not last)  # the epoch-end checkpoint follows the last step anyway
        stop = args.stop_after_steps and s.global_step >= args.stop_after_steps
        if len(window) >= args.print_freq or last or save_now or stop:
            loss_now = _check_and_log(s, window, epoch)
            window = []
            if bar is not None:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{s.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{images / (now - start):.0f}")
        if bar is not None:
            bar.update(1)
        if save_now:
            save(step + 1)
        if stop:
            raise StopTraining
        if last:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"train_img_s": images / elapsed if elapsed > 0 else 0.0, "train_time_s": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str) -> dict:
    """Loss, top-1 and top-5 (%) over the whole val set, exact across ranks (counts summed)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    start = time.perf_counter()
    for images, target in prefetch(loader, device):
        with autocast(device, precision):
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        correct = output.topk(k, dim=1).indices.eq(target[:, None])
        sums += torch.stack([F.cross_entropy(output, target, reduction="sum").double(),
                             correct[:, :1].sum().double(), correct.sum().double(),
                             torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
    distributed.all_reduce_sum(sums)
    elapsed = time.perf_counter() - start
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1)
    return {"val_loss": loss / n, "val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n,
            "val_images": int(n), "eval_img_s": n / elapsed if elapsed > 0 else 0.0}


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------

# Dense bf16/fp16 tensor-core peaks from the vendors' data sheets (SXM parts), FLOP/s per GPU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
              "L4": 121e12}


def forward_flops(build: Callable[[], nn.Module], input_size: int) -> Optional[float]:
    """FLOPs of one image's forward, counted by torch's FlopCounterMode on a meta-device copy
    (no memory, no compute), with the torch backend so every matmul is visible to it."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        with torch.device("meta"):
            model = build()
        with ops.use_backend("torch"), FlopCounterMode(display=False) as counter:
            model.eval()(torch.empty(1, 3, input_size, input_size, device="meta"))
        return float(counter.get_total_flops())
    except Exception:  # a model that cannot run on meta: no MFU, not a failed run
        return None


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
