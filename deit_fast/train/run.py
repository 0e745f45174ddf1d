"""`deit-fast train` and `deit-fast eval`: DeiT's main.py, top to bottom.

    setup (processes, backend, seed) -> data -> student (+ EMA) -> AdamW, GradScaler, cosine lr
    -> teacher -> DDP / compile -> resume -> for each epoch: train, evaluate, log, checkpoint
    -> safetensors export of the final weights.

The lr schedule is timm's CosineLRScheduler stepped per iteration (t_in_epochs=False), not per
epoch as the official code: the same curve at 300 epochs, and a smooth warmup on short runs.
"""
import functools
import json
import os
import resource
import sys
from argparse import Namespace
from typing import List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import deit_fast
from deit_fast import ops

from . import checkpoint, distributed, graphs
from .args import build_parser, parse_args
from .data import (DATA_SETS, SyntheticLoader, build_dataset, build_loaders, build_mixup,
                   seed_everything)
from .engine import (NonFiniteLossError, State, StopTraining, eager_step, evaluate, forward_flops,
                     peak_flops, train_one_epoch)
from .teacher import CompiledTeacher, build_teacher


def build_model(args, nb_classes: int) -> torch.nn.Module:
    """A deit_fast model by name (img_size = --input-size), else any timm model (e.g. a convnet
    teacher trained by this same script). --model-kwargs override both."""
    kwargs = dict(num_classes=nb_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  **args.model_kwargs)
    if args.model in deit_fast.list_models():
        kwargs.setdefault("img_size", args.input_size)
        return deit_fast.create_model(args.model, **kwargs)
    import timm
    return timm.create_model(args.model, pretrained=False, **kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """timm's rule: no weight decay on norms and biases (ndim <= 1) nor on what the model names in
    no_weight_decay() (pos_embed, cls_token, dist_token)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def load_finetune(model: torch.nn.Module, path: str) -> None:
    """Start from other weights (official, timm or our checkpoints): pos_embed resampled, heads
    that do not fit the number of classes dropped (they train from scratch), as main.py."""
    from deit_fast.models.checkpoint import _weights, adapt_state_dict, drop_unfit_heads, read_file
    sd = drop_unfit_heads(model, adapt_state_dict(model, _weights(read_file(path))), f"finetune {path}")
    result = model.load_state_dict(sd, strict=False)
    print(f"finetune: loaded {path}; missing {result.missing_keys}, unexpected {result.unexpected_keys}")


# The flags that define a run's steps: a resume continues the checkpoint's run, so these must not
# change (its lr schedule is restored whole, in the steps of its own batch count; another seed
# draws other batches; another distillation setting trains another objective).
RECIPE = ("model", "model_kwargs", "input_size", "epochs", "lr", "unscale_lr", "min_lr", "warmup_lr",
          "warmup_epochs", "weight_decay", "seed", "distillation_type", "distillation_alpha",
          "distillation_tau", "kl_reduction", "teacher_model", "mixup", "cutmix", "smoothing",
          "drop_path", "repeated_aug")


def check_resume(resume: dict, args: Namespace, steps_per_epoch: int, total_batch: int) -> None:
    """Refuse, naming each, a resume whose flags or batch arithmetic differ from the checkpoint's."""
    saved = resume["args"]
    now = dict(vars(args), steps_per_epoch=steps_per_epoch, total_batch=total_batch)
    was = dict(saved, steps_per_epoch=resume.get("steps_per_epoch"), total_batch=resume.get("total_batch"))
    differ = [f"{k}: checkpoint {was[k]!r}, now {now[k]!r}"
              for k in RECIPE + ("steps_per_epoch", "total_batch")
              if was.get(k) is not None and k in now and was[k] != now[k]]
    if differ:
        raise checkpoint.CheckpointError(
            f"--resume {args.resume} continues a run with other settings ({'; '.join(differ)}). "
            "Resume with the checkpoint's flags (steps_per_epoch: --steps-per-epoch and the data; "
            "total_batch: --batch-size x processes), or start a new run from its weights with "
            "--finetune.")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def train(args: Namespace) -> dict:
    """Run (or resume, or only evaluate) a training; returns the last epoch's log record plus
    the loss curve of the steps this call ran (`step_losses`)."""
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    dist, device = distributed.init(args.device)
    benchmark = torch.backends.cudnn.benchmark  # a process-wide flag: restored on the way out
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    try:
        return _train(args, dist, device)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if not was_initialised:
            distributed.shutdown()


def _train(args: Namespace, dist: distributed.Dist, device: torch.device) -> dict:
    graphs.check(args, device, dist.world)  # before any work
    say = print if dist.main else (lambda *a, **k: None)
    ops.set_backend(args.backend)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth") if args.output_dir else ""
    if ckpt_path and not args.eval:
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoint.guard_output(ckpt_path, args.resume, args.overwrite)  # before any work
    resume = checkpoint.load(args.resume) if args.resume else None  # a bad file fails here
    seed_everything(args.seed)  # the same initial weights on every rank

    # ---- data ------------------------------------------------------------------------------
    if args.synthetic:
        nb_classes = args.nb_classes or 1000
        train_loader = SyntheticLoader(args, nb_classes, device, args.steps_per_epoch or 100)
        val_loader = None
    else:
        train_loader, val_loader, nb_classes = build_loaders(args, dist.rank, dist.world,
                                                             args.pin_mem and device.type == "cuda")
        if args.nb_classes and args.nb_classes != nb_classes:
            raise ValueError(f"--nb-classes {args.nb_classes} but the dataset has {nb_classes} classes")
    steps_per_epoch = len(train_loader.batch_sampler)
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    mixup = build_mixup(args, nb_classes)
    if resume is not None and not args.eval:  # before the model and teacher are built
        check_resume(resume, args, steps_per_epoch, args.batch_size * dist.world)

    # ---- student, EMA, optimiser, schedule ---------------------------------------------------
    model = build_model(args, nb_classes)
    distilled = hasattr(model, "set_distilled_training")
    if args.distillation_type != "none":
        if distilled:
            model.set_distilled_training(True)  # forward returns (class head, distillation head)
        else:
            say(f"note: {args.model} has no distillation token: distilling through its class head")
    if args.finetune:
        load_finetune(model, args.finetune)
    model.to(device)
    raw_model = model
    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(raw_model, decay=args.model_ema_decay)
    total_batch = args.batch_size * dist.world
    lr = args.lr if args.unscale_lr else args.lr * total_batch / 512.0  # the linear scaling rule
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=lr,
                                  betas=tuple(args.opt_betas or (0.9, 0.999)), eps=args.opt_eps,
                                  fused=cuda,  # one kernel per step (apex's FusedAdam)
                                  capturable=args.cuda_graph and cuda)  # step count on the GPU
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    from timm.scheduler import CosineLRScheduler
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=args.min_lr,
                                  warmup_t=round(args.warmup_epochs * steps_per_epoch),
                                  warmup_lr_init=args.warmup_lr, t_in_epochs=False)

    teacher = None
    if args.distillation_type != "none" and not args.eval:
        teacher = build_teacher(args, nb_classes, device)
    elif args.teacher_path and not args.eval:
        say(f"note: --teacher-path {args.teacher_path} is unused: --distillation-type is none")

    # ---- wrappers: DDP on the student only; compile after DDP, as timm -------------------------
    if dist.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = raw_model  # eval without DDP: ranks may hold unequal numbers of val batches
    if args.compile:
        compile_ = functools.partial(torch.compile, mode=args.compile_mode)
        model, eval_model = compile_(model), compile_(raw_model)
    if teacher is not None and (args.compile or args.compile_teacher):
        teacher = CompiledTeacher(teacher, args.compile_mode)

    s = State(args=args, device=device, dist=dist, model=model, raw_model=raw_model,
              optimizer=optimizer, scaler=scaler, scheduler=scheduler, steps_per_epoch=steps_per_epoch,
              teacher=teacher, model_ema=model_ema, mixup=mixup)
    if args.cuda_graph:
        s.graphed = graphs.GraphedStep(functools.partial(eager_step, s), optimizer)

    # ---- resume -------------------------------------------------------------------------------
    start_epoch, start_step, max_accuracy = 0, 0, 0.0
    if resume is not None:
        raw_model.load_state_dict(resume["model"])
        if model_ema is not None:
            # A checkpoint without an EMA (--no-model-ema): start it from the resumed weights,
            # not from the initial ones it was built from above.
            if resume.get("model_ema") is None:
                say(f"note: {args.resume} holds no EMA; it starts from the resumed weights")
            model_ema.module.load_state_dict(resume.get("model_ema") or raw_model.state_dict())
        if not args.eval:
            optimizer.load_state_dict(resume["optimizer"])
            if resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
            scheduler.load_state_dict(resume["lr_scheduler"])
            s.global_step, s.meters = resume["global_step"], dict(resume["meters"])
            start_epoch, start_step = resume["epoch"], resume["step_in_epoch"]
            max_accuracy = resume.get("max_accuracy", 0.0)
            if start_step >= steps_per_epoch:  # an epoch-end checkpoint: the next epoch starts
                start_epoch, start_step = start_epoch + 1, 0
                s.meters = {"loss": 0.0, "base": 0.0, "distill": 0.0, "steps": 0}
            scheduler.step_update(num_updates=s.global_step)
            if resume.get("rng"):
                checkpoint.set_rng_state(resume["rng"])
        s.last_checkpoint = args.resume
        say(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}")

    if args.eval:
        if val_loader is None:
            raise ValueError("--eval needs a dataset (not --synthetic)")
        stats = evaluate(eval_model, val_loader, device, args.precision)
        say(json.dumps(stats))
        return stats

    def save(epoch: int, step_in_epoch: int) -> None:
        if not (ckpt_path and dist.main):
            return
        checkpoint.save({
            "format": checkpoint.FORMAT, "model": raw_model.state_dict(),
            "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_step": s.global_step, "meters": dict(s.meters), "max_accuracy": max_accuracy,
            "rng": checkpoint.rng_state(), "args": dict(vars(args), lr_scaled=lr),
            "steps_per_epoch": steps_per_epoch, "total_batch": total_batch,
        }, ckpt_path)
        s.last_checkpoint = ckpt_path

    # ---- logging: JSON lines, tqdm, optional TensorBoard ----------------------------------------
    build = lambda: build_model(args, nb_classes)  # noqa: E731
    flops = forward_flops(build, args.input_size) if device.type == "cuda" else None
    if flops is not None and teacher is not None:
        import timm
        t_flops = forward_flops(lambda: timm.create_model(args.teacher_model, num_classes=nb_classes,
                                                          **args.teacher_kwargs), args.input_size)
        flops = None if t_flops is None else 3 * flops + t_flops  # fwd + bwd (2x) + teacher fwd
    elif flops is not None:
        flops = 3 * flops
    peak = peak_flops(device, args.precision)
    log_path = os.path.join(args.output_dir, "log.jsonl") if args.output_dir else ""
    if log_path and dist.main and resume is None and os.path.exists(log_path):
        os.remove(log_path)  # a fresh run (guard_output allowed it) starts a fresh log
    writer = None
    if args.tensorboard and dist.main and args.output_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))
        except ImportError:
            say("note: --tensorboard ignored: tensorboard is not installed")
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    say(f"{args.model}: {n_params:,} parameters, {nb_classes} classes, {steps_per_epoch} steps/epoch "
        f"of {total_batch} images, lr {lr:.3g}, {args.precision} on {device}, "
        f"{dist.world} process(es), distillation {args.distillation_type}")

    # ---- the loop -----------------------------------------------------------------------------
    record = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            first = start_step if epoch == start_epoch else 0
            bar = None
            if tqdm is not None and dist.main:  # disable=None: no bar when stderr is not a terminal
                bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch}", disable=None,
                           leave=False, dynamic_ncols=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                speed = train_one_epoch(s, train_loader, epoch, first, lambda k: save(epoch, k), bar)
            finally:
                if bar is not None:
                    bar.close()
            m = s.meters
            record = {"epoch": epoch, "global_step": s.global_step, "model": args.model,
                      "train_loss": m["loss"] / max(m["steps"], 1),
                      "train_loss_base": m["base"] / max(m["steps"], 1),
                      "train_loss_distill": m["distill"] / max(m["steps"], 1),
                      "lr": optimizer.param_groups[0]["lr"], **speed}
            if val_loader is not None:
                record.update(evaluate(eval_model, val_loader, device, args.precision))
                max_accuracy = max(max_accuracy, record["val_top1"])
                if model_ema is not None:
                    ema = evaluate(model_ema.module, val_loader, device, args.precision)
                    record.update(val_top1_ema=ema["val_top1"], val_top5_ema=ema["val_top5"])
            record.update(
                max_accuracy=max_accuracy,
                mfu=(flops * record["train_img_s"] / (peak * dist.world)) if flops and peak else None,
                peak_mem_gib=peak_memory_gib(device), n_parameters=n_params, world_size=dist.world,
                backends={op: r[device.type]["runs"] for op, r in ops.backend_report().items()})
            s.meters = {"loss": 0.0, "base": 0.0, "distill": 0.0, "steps": 0}
            if dist.main and log_path:  # before the checkpoint: its resume goes on past this epoch
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            save(epoch, steps_per_epoch)
            if dist.main:
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)):
                            writer.add_scalar(k, v, epoch)
                acc = f", val top-1 {record['val_top1']:.2f}%" if "val_top1" in record else ""
                say(f"epoch {epoch}: loss {record['train_loss']:.4f}{acc}, "
                    f"{record['train_img_s']:.0f} img/s, lr {record['lr']:.2e}")
    except StopTraining:
        say(f"stopped after global step {s.global_step} (--stop-after-steps)")
        record = {"stopped": True, "global_step": s.global_step}
    finally:
        if writer is not None:
            writer.close()
    if dist.main and args.output_dir and not record.get("stopped"):
        meta = {"model": args.model, "model_kwargs": json.dumps(args.model_kwargs),
                "nb_classes": nb_classes, "input_size": args.input_size}
        for name, module in (("model", raw_model), ("model_ema", model_ema and model_ema.module)):
            if module is not None:
                checkpoint.export_safetensors(module.state_dict(),
                                              os.path.join(args.output_dir, f"{name}.safetensors"), meta)
    record["step_losses"] = list(s.step_losses)
    return record


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (NonFiniteLossError, checkpoint.CheckpointError, graphs.CannotCapture) as e:
        sys.exit(f"error: {e}")


# ---------------------------------------------------------------------------------------------
# deit-fast eval
# ---------------------------------------------------------------------------------------------

def evaluate_checkpoint(path: str, overrides: Optional[dict] = None, ema: bool = False) -> dict:
    """Top-1/top-5 of a training checkpoint on its val set. The model, its kwargs, the input
    size and the dataset come from the args stored in the checkpoint; `overrides` (data_path,
    data_set, batch_size, device, precision, backend, num_workers) replace them."""
    ckpt = checkpoint.load(path)
    args = build_parser().parse_args([])  # defaults for keys an older checkpoint lacks
    args.__dict__.update({k: v for k, v in ckpt["args"].items() if k in vars(args)})
    args.__dict__.update({k: v for k, v in (overrides or {}).items() if v is not None})
    dist, device = distributed.init(args.device)
    ops.set_backend(args.backend)
    val_set, nb_classes = build_dataset(False, args)
    from .data import ShardSampler
    loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                         sampler=ShardSampler(len(val_set), dist.rank, dist.world),
                                         pin_memory=device.type == "cuda")
    model = build_model(args, nb_classes)
    weights = ckpt["model_ema"] if ema else ckpt["model"]
    if weights is None:
        raise checkpoint.CheckpointError(f"{path} holds no EMA weights (trained with --no-model-ema)")
    model.load_state_dict(weights)
    stats = evaluate(model.to(device), loader, device, args.precision)
    stats.update(checkpoint=path, weights="ema" if ema else "model", epoch=ckpt["epoch"],
                 global_step=ckpt["global_step"], model=args.model)
    return stats


def eval_main(argv: Optional[List[str]] = None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="deit-fast eval", description=evaluate_checkpoint.__doc__)
    p.add_argument("checkpoint", help="a checkpoint.pth written by deit-fast train")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--data-path", dest="data_path")
    p.add_argument("--data-set", dest="data_set", choices=DATA_SETS)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--device")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--backend", choices=ops._backend.BACKENDS)
    p.add_argument("--num_workers", type=int)
    a = p.parse_args(argv)
    overrides = {k: v for k, v in vars(a).items() if k not in ("checkpoint", "ema")}
    try:
        stats = evaluate_checkpoint(a.checkpoint, overrides, a.ema)
    except checkpoint.CheckpointError as e:
        sys.exit(f"error: {e}")
    for k, v in stats.items():
        print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    print(json.dumps(stats))
