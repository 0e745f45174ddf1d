"""Where a model's training step spends its time: torch.profiler over a few fwd+bwd steps (bf16
autocast, cross-entropy, no optimizer), ours or timm, kernels sorted by their own GPU time.

It also prints how busy the GPU was: the kernels' summed time over the step's wall time. Well
under 100 % means the step is host-bound (Python, dispatch, launches): the GPU waits for work.
On CPU the same runs with CPU activities only (a smoke test; the interpreter is not a profile).

    python -m bench.profile --model deit_tiny_patch16_224 --impl ours        # batch 256 on a GPU
    python -m bench.profile --model cait_xxs24_224 --impl timm --rows 40 --out out/profile.txt
"""
from bench import common  # first: it turns on the Triton interpreter when there is no GPU

import argparse
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import deit_fast
from bench.models import BATCH, image_size


def step_fn(model, images, target):
    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            out = model(images)
        F.cross_entropy((out[0] if isinstance(out, tuple) else out).float(), target).backward()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224", choices=deit_fast.list_models())
    p.add_argument("--impl", default="ours", choices=("ours", "timm"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, help="default: bench.models' batch (256 at 224 px); 2 on CPU")
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after two warm-up steps")
    p.add_argument("--rows", type=int, default=25, help="table rows")
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = image_size(args.model)
    batch = args.batch_size or (BATCH[size] if cuda else 2)
    with torch.device(device):
        model = (deit_fast.create_model if args.impl == "ours" else timm.create_model)(args.model).train()
    images = torch.randn(batch, 3, size, size, device=device)
    step = step_fn(model, images, torch.randint(0, 1000, (batch,), device=device))
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6 / args.steps
    events = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = [f"{args.model}, {args.impl}, batch {batch}, {common.device_name(device)}: "
             f"{wall_us / 1e3:.2f} ms per step (wall, under the profiler)"]
    if cuda:  # the kernel rows only: an op's device time repeats its kernels'
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(e.self_device_time_total for e in kernels) / args.steps
        lines.append(f"GPU busy {100 * gpu_us / wall_us:.0f} % of the step ({gpu_us / 1e3:.2f} ms of kernels)")
    lines.append(events.table(sort_by=key, row_limit=args.rows))
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
