"""`deit-fast demo`: the DeiT story in miniature, on a CPU, with no download.

A real dataset that ships inside scikit-learn (1797 handwritten 8x8 digits, upsampled to 32 px
and written as an ImageFolder of PNGs: the ImageNet code path) and three runs of the trainer:
  1. a small convnet teacher (timm resnet10t at a quarter of its width),
  2. a tiny DeiT student without distillation,
  3. the same DeiT with a distillation token, hard-distilled from the teacher,
then a table of test accuracy and images/s. Each run keeps its checkpoint, safetensors weights
and log.jsonl under --output_dir. The recipe is DeiT's (AdamW, cosine, warmup, RandAugment,
random erasing, mixup/cutmix, repeated augmentation, drop path, smoothing) at a scale that
trains in minutes: higher lr, fewer epochs, milder augmentation, no EMA (see RECIPE).
"""
import argparse
import json
import os
import time

import torch

from .args import parse_args
from .run import train

STUDENT_KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}  # 65 tokens, 0.46M
TEACHER = ["--teacher-model", "resnet10t", "--teacher-kwargs",
           json.dumps({"channels": [16, 32, 64, 128], "stem_width": 16})]

RECIPE = [
    "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "64",
    "--lr", "8e-3",              # x 64/512 (linear scaling) = 1e-3: short runs need a higher lr
    "--warmup-epochs", "2", "--min-lr", "1e-5", "--weight-decay", "0.05",
    "--aa", "rand-m6-mstd0.5-inc1",  # m9 translates a 32 px digit by 13 px: off the image
    "--hflip", "0",              # a mirrored digit is another glyph
    "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--smoothing", "0.1",
    "--drop-path", "0.1", "--no-model-ema",  # EMA 0.99996 means nothing over a few hundred steps
    "--distillation-alpha", "0.5", "--distillation-tau", "1.0",
]


def _run(name: str, out: str, extra: list, common: list) -> dict:
    print(f"\n=== {name} ===", flush=True)
    args = parse_args(common + extra + ["--output_dir", os.path.join(out, name), "--overwrite"])
    start = time.perf_counter()
    record = train(args)
    record["wall_s"] = time.perf_counter() - start
    record["name"] = name
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="deit-fast demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="./demo_out")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each student")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--num_workers", type=int, default=1, help="loader processes (2 cores: 1)")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    on_gpu = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    # bf16 autocast is the trainer's default; a CPU without bf16 matrix units runs it slower
    # than fp32, so the CPU demo trains in fp32.
    common = RECIPE + ["--data-path", os.path.join(a.output_dir, "digits"), "--num_workers",
                       str(a.num_workers), "--seed", str(a.seed), "--precision", "bf16" if on_gpu else "fp32"]
    if a.device:
        common += ["--device", a.device]
    start = time.perf_counter()
    teacher_dir = os.path.join(a.output_dir, "teacher")
    student = ["--model-kwargs", json.dumps(STUDENT_KWARGS), "--epochs", str(a.epochs)]
    runs = [
        _run("teacher", a.output_dir, ["--model", TEACHER[1], "--model-kwargs", TEACHER[3],
                                       "--epochs", str(a.teacher_epochs), "--drop-path", "0.05"], common),
        _run("deit_tiny", a.output_dir, ["--model", "deit_tiny_patch16_224"] + student, common),
        _run("deit_tiny_distilled_hard", a.output_dir,
             ["--model", "deit_tiny_distilled_patch16_224", "--distillation-type", "hard",
              "--teacher-path", os.path.join(teacher_dir, "checkpoint.pth")] + TEACHER + student, common),
    ]
    total = time.perf_counter() - start

    rows = [("run", "model", "params", "epochs", "test top-1 %", "train img/s", "eval img/s", "wall s")]
    for r in runs:
        rows.append((r["name"], r["model"], f"{r['n_parameters'] / 1e6:.2f}M", str(r["epoch"] + 1),
                     f"{r['val_top1']:.2f}", f"{r['train_img_s']:.0f}", f"{r['eval_img_s']:.0f}",
                     f"{r['wall_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    table = "\n".join(lines)
    print(f"\nDIGITS (scikit-learn), 1437 train / 360 test images at 32 px; img/s of the last epoch\n"
          f"{table}\ntotal wall time {total:.0f} s; outputs in {a.output_dir}")
    with open(os.path.join(a.output_dir, "results.json"), "w") as f:
        json.dump({"runs": [{k: v for k, v in r.items() if k != "step_losses"} for r in runs],
                   "total_wall_s": total}, f, indent=1)
    with open(os.path.join(a.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
