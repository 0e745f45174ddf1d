"""Model throughput: img/s and MFU of every DeiT and CaiT, fwd and fwd+bwd, under bf16 autocast.

Ours (deit_fast.create_model, backend auto), eager and under torch.compile (our ops stay opaque
nodes; inductor fuses what lies between them), against timm eager (timm.create_model of the same
name: SDPA wherever timm uses it) and timm + torch.compile, on random images and random weights;
batch 256 at 224 px, 64 at 384, 32 at 448. FLOPs per image are counted once per model on timm's
module at batch 1 (torch.utils.flop_counter, SDPA forced onto its math path so attention is
counted as the matmuls it is): one yardstick for every impl's MFU. fwd+bwd is a training step
without the optimizer: forward, cross-entropy on random labels, backward.

    python -m bench.models                                          # every model, every impl
    python -m bench.models --models 'deit_small*,cait_xxs24_224' --impls ours,timm
    python -m bench.models --device cpu --quick                     # smoke test
"""
from bench import common  # first: it turns on the Triton interpreter when there is no GPU

import fnmatch
import functools

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import deit_fast

BATCH = {224: 256, 384: 64, 448: 32}
SMOKE_MODELS = "deit_tiny_patch16_224,cait_xxs24_224"
SMOKE_BATCH = 2
IMPLS = ("ours", "timm", "ours_compile", "timm_compile")


def image_size(name: str) -> int:
    return int(name.rsplit("_", 1)[1])  # timm's DeiT and CaiT names end in the resolution


def _loss(out, target):
    # Distilled models in training may return (cls logits, distillation logits).
    return sum(F.cross_entropy(o.float(), target) for o in (out if isinstance(out, tuple) else (out,)))


@functools.lru_cache(maxsize=None)
def flops_per_image(name: str, device: torch.device):
    """(forward, forward + backward) FLOPs of one image through timm's model, batch 1. Not on the
    meta device: older timm calls .item() while building a ViT."""
    with torch.device(device):
        model = timm.create_model(name)
        x = torch.randn(1, 3, image_size(name), image_size(name))
        label = torch.zeros(1, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH):
        model.eval()
        with FlopCounterMode(display=False) as fwd:
            model(x)
        model.train()
        out = model(x)
        with FlopCounterMode(display=False) as bwd:
            _loss(out, label).backward()
    return fwd.get_total_flops(), fwd.get_total_flops() + bwd.get_total_flops()


def setup(case: common.Case, impl: str, args):
    name, (B, _, S, _) = case.op, case.shape
    device = torch.device(args.device)
    with torch.device(device):  # weights created where they run: fast init of the big CaiTs
        model = deit_fast.create_model(name) if impl.startswith("ours") else timm.create_model(name)
    call = model
    if impl.endswith("_compile"):
        torch._dynamo.reset()  # drop the previous model's graphs and their memory
        call = torch.compile(model)
    images = torch.randn(B, 3, S, S, device=device)
    target = torch.randint(0, 1000, (B,), device=device)
    fwd_flops, train_flops = flops_per_image(name, device)
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)

    def fwd():
        model.eval()

        @torch.no_grad()
        def step():
            with autocast():
                call(images)
        return common.Timed(step, flops=B * fwd_flops, items=B)

    def fwd_bwd():
        model.train()

        def step():
            with autocast():
                out = call(images)
            _loss(out, target).backward()
        return common.Timed(step, flops=B * train_flops, items=B, grad_to_none=list(model.parameters()))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main(argv=None):
    p = common.parser(__doc__, IMPLS, warmup_ms=100, rep_ms=1000)
    p.add_argument("--models", help="comma list of names or globs, run in this order "
                   "(default: every deit_fast.list_models() name)")
    p.add_argument("--batch-size", type=int, help="default: 256 at 224 px, 64 at 384, 32 at 448")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    available = deit_fast.list_models()
    patterns = (args.models or (SMOKE_MODELS if smoke else "*")).split(",")
    names = [n for pat in patterns for n in fnmatch.filter(available, pat)]
    names = list(dict.fromkeys(names))  # a name matched by two patterns runs once
    if not names:
        raise SystemExit(f"--models {args.models!r} matches none of {available}")
    cases = []
    for name in names:
        batch = args.batch_size or (SMOKE_BATCH if smoke else BATCH[image_size(name)])
        cases.append(common.Case(name, (batch, 3, image_size(name), image_size(name)), "bf16 autocast"))
    impls = {"ours": common.Impl(False), "timm": common.Impl(True), "ours_compile": common.Impl(False),
             "timm_compile": common.Impl(True)}
    backends = {op: r[device.type]["runs"] for op, r in deit_fast.ops.backend_report().items()}
    # as `deit-fast train` (and the official main.py) runs: cuDNN times its conv algorithms
    torch.backends.cudnn.benchmark = True
    notes = {"ours runs": ", ".join(f"{op}: {b}" for op, b in backends.items()),
             "cudnn": "benchmark mode, every impl",
             "FLOPs": "per image from torch.utils.flop_counter on timm's model (matmuls, convs, attention)",
             "fwd+bwd": "forward, cross-entropy, backward; no optimizer step"}
    common.run("models", args, cases, impls, setup, {"notes": notes, "backends": backends})


if __name__ == "__main__":
    main()
