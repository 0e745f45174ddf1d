"""`deit-fast` command line.

`deit-fast train`: train (or distil) a model, DeiT's main.py flags (deit_fast/train/args.py);
`deit-fast eval CHECKPOINT`: top-1/top-5 of a training checkpoint on its val set;
`deit-fast demo`: teacher, DeiT and distilled DeiT on a bundled dataset, on a CPU, in minutes.
Each has its own --help.

`deit-fast throughput`: forward (eval) and forward+backward (train) images per second of a
deit_fast model on synthetic input, beside timm's model of the same name carrying the same
weights, with the largest output difference between the two as a correctness check.
"""
import argparse
import json
import sys
import time

import torch

import deit_fast
from deit_fast import ops


def _time_steps(step, steps: int, device: torch.device) -> float:
    step()  # warm-up: allocator, autotuning, lazy init
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def throughput(args) -> dict:
    import timm

    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    ours = deit_fast.create_model(args.model).to(device)
    theirs = timm.create_model(args.model).to(device)
    theirs.load_state_dict(ours.state_dict())
    images = torch.randn(args.batch_size, 3, *ours.patch_embed.img_size, device=device)
    result = {"model": args.model, "device": str(device), "precision": args.precision,
              "batch_size": args.batch_size, "backend": args.backend}

    def fwd(model):
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(images)

    def train_step(model):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()

    with ops.use_backend(args.backend):
        for name, model in (("deit_fast", ours), ("timm", theirs)):
            model.eval()
            result[f"{name}_eval_img_s"] = args.batch_size / _time_steps(lambda: fwd(model), args.steps, device)
            model.train()
            result[f"{name}_train_img_s"] = args.batch_size / _time_steps(lambda: train_step(model), args.steps, device)
        ours.eval(), theirs.eval()
        result["max_abs_diff_vs_timm"] = (fwd(ours).float() - fwd(theirs).float()).abs().max().item()
        result["backends"] = {op: r[device.type]["runs"] for op, r in ops.backend_report().items()}
    return result


def _trainer_command(name: str):
    """The trainer's subcommands parse their own flags (--config files included): imported on use."""
    from deit_fast.train import demo, run
    return {"train": run.main, "eval": run.eval_main, "demo": demo.main}[name]


TRAINER_COMMANDS = {"train": "train or distil a model (DeiT's main.py flags; --help lists them)",
                    "eval": "evaluate a training checkpoint on its val set",
                    "demo": "teacher, DeiT and distilled DeiT on a bundled dataset, CPU, minutes"}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        return _trainer_command(argv[0])(argv[1:])
    parser = argparse.ArgumentParser(prog="deit-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in TRAINER_COMMANDS.items():  # listed in --help; dispatched above
        sub.add_parser(name, help=text, add_help=False)
    p = sub.add_parser("throughput", help="img/s of a model vs timm on synthetic input")
    p.add_argument("--model", default="deit_tiny_patch16_224", choices=deit_fast.list_models())
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--backend", choices=ops._backend.BACKENDS, default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        parser.error("--batch-size and --steps must be at least 1")
    result = throughput(args)
    for key, value in result.items():
        print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
