"""Command line of `deit-fast train`: the official DeiT main.py flag names and recipe defaults
(DESIGN.md section 5), plus deit_fast's own (precision, backend, compile, synthetic data ...).

--config FILE.yaml holds the same keys (dashes or underscores); flags given on the command line
win over the file, the file wins over the defaults.
"""
import argparse
import json
from typing import List, Optional

import deit_fast
from deit_fast.ops import _backend

from .data import DATA_SETS


def _json_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _flag_pair(p, name: str, default: bool, help: str) -> None:
    """--name / --no-name, as the official --repeated-aug / --no-repeated-aug."""
    dest = name.replace("-", "_")
    p.add_argument(f"--{name}", dest=dest, action="store_true", help=help)
    p.add_argument(f"--no-{name}", dest=dest, action="store_false")
    p.set_defaults(**{dest: default})


def build_parser(prog: str = "deit-fast train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="", help="YAML file of these options (keys as the flags)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224",
                   help=f"a deit_fast model ({', '.join(deit_fast.list_models())}) or any timm model")
    g.add_argument("--model-kwargs", type=_json_dict, default={},
                   help='extra create_model arguments, JSON: \'{"embed_dim": 96, "depth": 4}\'')
    g.add_argument("--input-size", type=int, default=224, help="image side in pixels")
    g.add_argument("--nb-classes", type=int, default=None, help="default: from the dataset (1000 synthetic)")
    g.add_argument("--drop", type=float, default=0.0, help="dropout before the head")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--finetune", default="",
                   help="start from these weights (heads dropped if they do not fit)")
    _flag_pair(g, "model-ema", True, "keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="per process (GPU)")
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--lr", type=float, default=5e-4, help="at a total batch of 512; scaled linearly")
    g.add_argument("--unscale-lr", action="store_true", help="use --lr as given, not scaled by batch")
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--warmup-epochs", type=float, default=5)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--opt-eps", type=float, default=1e-8)
    g.add_argument("--opt-betas", type=float, nargs=2, default=None, help="AdamW betas (default 0.9 0.999)")
    g.add_argument("--clip-grad", type=float, default=None, help="max grad norm (off by default)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help='RandAugment policy ("none": off)')
    g.add_argument("--color-jitter", type=float, default=0.3, help="(unused when --aa is set, as timm)")
    g.add_argument("--train-interpolation", default="bicubic")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    _flag_pair(g, "repeated-aug", True, "repeated augmentation x3 (timm RepeatAugSampler)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))

    g = p.add_argument_group("distillation")
    g.add_argument("--distillation-type", default="none", choices=("none", "soft", "hard"))
    g.add_argument("--distillation-alpha", type=float, default=0.5)
    g.add_argument("--distillation-tau", type=float, default=1.0)
    g.add_argument("--kl-reduction", default="numel", choices=("numel", "batchmean"),
                   help="soft KD: KL sum / (B*C) (official DeiT) or / B (timm)")
    g.add_argument("--teacher-model", default="regnety_160", help="any timm model")
    g.add_argument("--teacher-kwargs", type=_json_dict, default={},
                   help="extra timm.create_model arguments, JSON")
    g.add_argument("--teacher-path", default="", help="teacher weights (torch.load, weights_only)")
    _flag_pair(g, "channels-last-teacher", True, "run the teacher in channels-last memory format")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default="", help="root holding train/ and val/ (ImageFolder layout)")
    g.add_argument("--data-set", default="IMNET", choices=DATA_SETS,
                   help="IMNET, FOLDER (any ImageFolder), DIGITS (bundled, via scikit-learn)")
    g.add_argument("--synthetic", action="store_true", help="random batches resident on the device")
    g.add_argument("--eval-crop-ratio", type=float, default=0.875)
    g.add_argument("--num_workers", type=int, default=10)
    _flag_pair(g, "pin-mem", True, "pinned host memory for faster copies to the GPU")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="checkpoints and logs ('' saves nothing)")
    g.add_argument("--resume", default="", help="continue from this checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a checkpoint in --output_dir "
                   "that this run did not start from (otherwise refused)")
    g.add_argument("--eval", action="store_true", help="evaluate (--resume or --finetune weights) and exit")
    g.add_argument("--device", default="", help="default: cuda when available, else cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="autocast dtype (fp16 with a GradScaler)")
    g.add_argument("--backend", default="auto", choices=_backend.BACKENDS, help="deit_fast.ops backend")
    g.add_argument("--compile", action="store_true", help="torch.compile the student (and teacher)")
    g.add_argument("--compile-teacher", action="store_true",
                   help="torch.compile the teacher alone (the student stays eager), its BatchNorms "
                        "folded into its convolutions (inductor's freezing); --compile does it too")
    _flag_pair(g, "cudnn-benchmark", True,
               "let cuDNN time its algorithms once per conv shape, as the official main.py does: the "
               "teacher's convolutions and the patch embedding get the fastest it has; off, it "
               "picks by heuristics (the choice by timing can differ between processes)")
    g.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode with --compile; reduce-overhead replays the compiled "
                        "forward and backward as CUDA graphs, for models whose steps are host-bound")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole step (forward, teacher, loss, backward, AdamW) into a CUDA "
                        "graph after a few eager steps and replay it: for host-bound steps; one "
                        "process, bf16 or fp32, without --compile")
    g.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--steps-per-epoch", type=int, default=0, help="cap on steps per epoch (0: all)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after this optimizer step as if killed (tests, time-boxed runs)")
    g.add_argument("--print-freq", type=int, default=10, help="log and check the loss every N steps")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    return p


def _apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of option: value")
    actions = {a.dest: a for a in parser._actions}
    defaults, unknown = {}, []
    for key, value in config.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            unknown.append(str(key))
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):  # the option's value itself; "false" would be truthy
                raise SystemExit(f"error: --config {path}: {key}={value!r} must be true or false")
        elif isinstance(value, bool) and action.type in (int, float):
            raise SystemExit(f"error: --config {path}: {key}={value!r} must be a number")
        elif isinstance(value, str) and action.type is not None:
            value = action.type(value)  # PyYAML reads 5e-4 (no dot) as a string
        elif isinstance(value, int) and action.type is float:
            value = float(value)
        elif isinstance(value, float) and action.type is int:
            raise SystemExit(f"error: --config {path}: {key}={value!r} must be an integer")
        if action.choices is not None and value not in action.choices:
            raise SystemExit(f"error: --config {path}: {key}={value!r} is not one of {action.choices}")
        defaults[dest] = value
    if unknown:
        raise SystemExit(f"error: --config {path}: unknown keys {', '.join(unknown)}")
    parser.set_defaults(**defaults)


def parse_args(argv: Optional[List[str]] = None, prog: str = "deit-fast train") -> argparse.Namespace:
    parser = build_parser(prog)
    config, _ = _config_only().parse_known_args(argv)  # --config first: it sets the defaults
    if config.config:
        _apply_config(parser, config.config)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.epochs < 1:
        parser.error("--batch-size and --epochs must be at least 1")
    if args.batch_size % 2 and (args.mixup > 0 or args.cutmix > 0):
        parser.error("mixup/cutmix mix each batch with its reverse: --batch-size must be even")
    _check_ranges(parser, args)
    return args


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values the recipe cannot mean, refused by name. Each was taken silently: a negative
    --clip-grad flipped the gradient (clip_grad_norm_ scales by max_norm / norm), a decay or a
    smoothing past 1 extrapolated, a crop ratio past 1 padded the eval images with zeros."""
    bad = []
    if args.clip_grad is not None and not args.clip_grad > 0:
        bad.append(f"--clip-grad must be positive (or left out), got {args.clip_grad}")
    for flag, value, ok in (
            ("--model-ema-decay", args.model_ema_decay, 0.0 <= args.model_ema_decay <= 1.0),
            ("--smoothing", args.smoothing, 0.0 <= args.smoothing < 1.0),
            ("--eval-crop-ratio", args.eval_crop_ratio, 0.0 < args.eval_crop_ratio <= 1.0),
            ("--distillation-alpha", args.distillation_alpha, 0.0 <= args.distillation_alpha <= 1.0),
            ("--distillation-tau", args.distillation_tau, args.distillation_tau > 0),
            ("--drop-path", args.drop_path, 0.0 <= args.drop_path < 1.0),
            ("--drop", args.drop, 0.0 <= args.drop < 1.0)):
        if not ok:
            bad.append(f"{flag} is out of range, got {value}")
    for flag in ("steps_per_epoch", "stop_after_steps", "save_every_steps", "num_workers"):
        if getattr(args, flag) < 0:
            bad.append(f"--{flag.replace('_', '-') if flag != 'num_workers' else flag} must be >= 0, "
                       f"got {getattr(args, flag)}")
    if args.print_freq < 1:
        bad.append(f"--print-freq must be at least 1, got {args.print_freq}")
    if args.eval and not (args.resume or args.finetune):
        bad.append("--eval evaluates the weights of --resume or --finetune: give one of them")
    if bad:
        parser.error("; ".join(bad))


def _config_only() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default="")
    return p
