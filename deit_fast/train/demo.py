"""`deit-fast demo`: the DeiT story in miniature, on a CPU, with no download.

A real dataset that ships inside scikit-learn (1797 handwritten 8x8 digits, upsampled to 32 px
and written as an ImageFolder of PNGs: the ImageNet code path) and four runs of the trainer:
  1. a small convnet teacher (timm resnet10t at a quarter of its width),
  2. a tiny DeiT student without distillation,
  3. the same DeiT with a distillation token, hard-distilled from the teacher (DeiT's choice),
  4. the same, soft-distilled (KL at temperature 2; --no-soft skips it),
then a table of test accuracy and images/s. Each run keeps its checkpoint, safetensors weights
and log.jsonl under --output_dir. The recipe is DeiT's (AdamW, cosine lr with warmup,
RandAugment, random erasing, mixup, drop path, label smoothing) at a scale that trains in
minutes: higher lr, 30 epochs, milder augmentation, no repeated augmentation, no EMA (RECIPE).
"""
import argparse
import json
import os
import time

import torch

from .args import parse_args
from .run import train

# DeiT-Ti (192 wide, 3 heads) cut to 4 blocks, on 32 px images in 8 px patches (16 tokens + cls
# (+ dist)): 1.8M parameters. A 4 px patch is one pixel of the 8x8 original, 4x the tokens and
# time, and learns slower still.
STUDENT_KWARGS = {"patch_size": 8, "depth": 4}
TEACHER = ["--teacher-model", "resnet10t", "--teacher-kwargs",
           json.dumps({"channels": [16, 32, 64, 128], "stem_width": 16})]  # resnet10t at 1/4 width

RECIPE = [
    "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "32",
    "--lr", "8e-3",              # x 32/512 (linear scaling) = 5e-4: short runs need a higher lr
    "--warmup-epochs", "2", "--min-lr", "1e-5", "--weight-decay", "0.05",
    "--drop-path", "0.1", "--smoothing", "0.1",
    # Milder than ImageNet's, measured on these runs (30 epochs, no distillation: 88 % vs 73 %
    # with rand-m6 + mixup 0.8 / cutmix 1.0): at m9 RandAugment translates a 32 px digit by
    # 13 px, i.e. off the image, and strong mixing slows a short run down more than it regularises.
    "--aa", "rand-m4-mstd0.5-inc1", "--reprob", "0.1", "--mixup", "0.2", "--cutmix", "0",
    "--hflip", "0",              # a mirrored digit is another glyph
    "--no-repeated-aug",         # x3 repeats = a third of the distinct images per epoch
    "--no-model-ema",            # EMA 0.99996 means nothing over a few hundred steps
    "--distillation-alpha", "0.5", "--distillation-tau", "1.0",
]


def _run(name: str, out: str, extra: list, common: list) -> dict:
    print(f"\n=== {name} ===", flush=True)
    args = parse_args(common + extra + ["--output_dir", os.path.join(out, name), "--overwrite"])
    start = time.perf_counter()
    record = train(args)
    record.update(wall_s=time.perf_counter() - start, name=name, distillation=args.distillation_type)
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="deit-fast demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="./demo_out")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each student")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--no-soft", dest="soft", action="store_false", help="skip the soft-distilled run")
    p.add_argument("--num_workers", type=int, default=1, help="loader processes (2 cores: 1)")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap (smoke tests); 0: whole epochs")
    a = p.parse_args(argv)
    # The loader workers need cores of their own: on 2 cores, one computes and one decodes and
    # augments. Oversubscribed OpenMP threads spin against the workers and run several times slower.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - a.num_workers))
    on_gpu = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    # bf16 autocast is the trainer's default; a CPU without bf16 matrix units runs it slower
    # than fp32, so the CPU demo trains in fp32.
    common = RECIPE + ["--data-path", os.path.join(a.output_dir, "digits"), "--num_workers",
                       str(a.num_workers), "--seed", str(a.seed), "--precision", "bf16" if on_gpu else "fp32"]
    if a.device:
        common += ["--device", a.device]
    if a.steps_per_epoch:
        common += ["--steps-per-epoch", str(a.steps_per_epoch)]
    start = time.perf_counter()
    teacher_dir = os.path.join(a.output_dir, "teacher")
    student = ["--model-kwargs", json.dumps(STUDENT_KWARGS), "--epochs", str(a.epochs)]
    distilled = ["--model", "deit_tiny_distilled_patch16_224", "--teacher-path",
                 os.path.join(teacher_dir, "checkpoint.pth")] + TEACHER + student
    runs = [
        _run("teacher", a.output_dir, ["--model", TEACHER[1], "--model-kwargs", TEACHER[3],
                                       "--epochs", str(a.teacher_epochs)], common),
        _run("deit_tiny", a.output_dir, ["--model", "deit_tiny_patch16_224"] + student, common),
        _run("deit_tiny_distilled_hard", a.output_dir, distilled + ["--distillation-type", "hard"], common),
    ]
    if a.soft:
        # batchmean: the KL per image, as textbook KD and timm. The official "numel" also divides
        # by the number of classes (10 here, 1000 on ImageNet): a far weaker term.
        runs.append(_run("deit_tiny_distilled_soft", a.output_dir, distilled + [
            "--distillation-type", "soft", "--distillation-tau", "2", "--kl-reduction", "batchmean"], common))
    total = time.perf_counter() - start

    rows = [("run", "model", "distillation", "params", "epochs", "test top-1 %", "train img/s",
             "eval img/s", "wall s")]
    for r in runs:
        rows.append((r["name"], r["model"], r["distillation"], f"{r['n_parameters'] / 1e6:.2f}M",
                     str(r["epoch"] + 1),
                     f"{r['val_top1']:.2f}", f"{r['train_img_s']:.0f}", f"{r['eval_img_s']:.0f}",
                     f"{r['wall_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
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
