"""The trainer: DeiT's recipe (main.py, engine.py, losses.py) on deit_fast models and ops.

    deit-fast train --model deit_small_patch16_224 --data-path /imagenet ...   (or torchrun ...)
    deit-fast eval OUTPUT_DIR/checkpoint.pth
    deit-fast demo                  (CPU, no download: teacher, student, distilled student)

Files: args.py (flags), data.py (datasets, seeded sampling), teacher.py, engine.py (step, epoch,
eval), checkpoint.py, distributed.py, run.py (main loop), demo.py.
"""
from .args import build_parser, parse_args
from .checkpoint import CheckpointError
from .engine import NonFiniteLossError
from .run import evaluate_checkpoint, train

__all__ = ["build_parser", "parse_args", "train", "evaluate_checkpoint", "CheckpointError",
           "NonFiniteLossError"]
