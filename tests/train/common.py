"""Helpers of the trainer tests: tiny student configs at 16 px and the argv that runs them for a
few CPU steps plus one pass over the 360 test digits."""
import json

import torch

from deit_fast.train import parse_args

SIZE = 16
# 16 tokens of 4x4 pixels, one or two blocks, 32 wide: a few milliseconds a step on a CPU.
KWARGS = {
    "deit_tiny_patch16_224": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "deit_tiny_distilled_patch16_224": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "cait_xxs24_224": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "depth_token_only": 1},
}
TEACHER = {"teacher_model": "resnet10t", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}}


def tiny_argv(out, digits: str, model: str = "deit_tiny_patch16_224", *extra: str) -> list:
    return ["--model", model, "--model-kwargs", json.dumps(KWARGS[model]), "--input-size", str(SIZE),
            "--data-set", "DIGITS", "--data-path", digits, "--batch-size", "16", "--epochs", "1",
            "--steps-per-epoch", "3", "--num_workers", "0", "--precision", "fp32", "--no-model-ema",
            "--lr", "4e-3", "--warmup-epochs", "0", "--output_dir", str(out), "--print-freq", "2",
            "--teacher-model", TEACHER["teacher_model"], "--teacher-kwargs", json.dumps(TEACHER["kwargs"]),
            *extra]


def tiny_args(out, digits: str, model: str = "deit_tiny_patch16_224", *extra: str):
    return parse_args(tiny_argv(out, digits, model, *extra))


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
