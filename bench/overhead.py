"""Host overhead per op call: wall time of the public deit_fast.ops calls at tiny shapes.

At these shapes the kernels take a few microseconds, so a loop of calls without a sync is bound by
the host: Python checks, backend resolution, the custom-op and autograd machinery, and the kernel
launches. On the H200 (2026-11-26) our ops' fwd+bwd took 200-400 us more than their fwd plus
their bwd while SDPA's did not; this bench says where that time goes, per backend and direction.

    python -m bench.overhead                 # every op, every backend that can run here
    python -m bench.overhead --calls 200 --out out/overhead
    python -m bench.overhead --stub-kernels  # the host path alone, also on a CPU (see below)
    TRITON_INTERPRET=0 python -m bench.overhead --stub-driver  # + Triton's dispatch, on a CPU
    python -m bench.overhead --ops attention --profile  # + where one op's triton forward spends it

fwd: under no_grad; fwd(grad): inputs that require grad, no backward; fwd+bwd: forward, then
backward of the output against a fixed grad. Prints one markdown table; --out also writes .jsonl.
--stub-kernels replaces every Triton kernel of deit_fast.kernels by one that launches nothing:
the triton rows are then the host path alone (checks, dispatch, autograd, allocations, grid
arithmetic), which a CPU can time too, where the interpreter would otherwise dominate.
--stub-driver (a machine without a GPU, interpreter off): Triton's own dispatch too (binding,
specialisation, cache key: bench/stub_driver.py compiles for sm_90 and launches nothing), in
bf16 as on a GPU (--dtype fp32 to set the torch rows beside them: the CPU computes those).
Where Triton really launches (a GPU, or --stub-driver), the triton backend gets a second row,
"triton raw_pointers": kernels.RAW_POINTERS on, the launcher given addresses, not tensors (see
bench/launch_cost.py).
--profile: cProfile of --calls forward calls of each op on the triton backend, the functions
with the most own time. On an H100 (2026-11-26) one Triton launch cost the distillation loss
about 130 us more host time than its CUDA-extension twin behind the same op layer; this says
which of Triton's launch steps (binding, specialisation, cache key, launcher) it is.
"""
import argparse
import cProfile
import importlib
import io
import pstats
import json
import pkgutil
from pathlib import Path
from typing import Callable, Dict

import torch

from bench import common  # first: turns the interpreter on when there is no GPU (unless set)
from deit_fast import kernels, ops
from deit_fast.cli import _time_steps
from deit_fast.ops import _backend


PACKED = {"attention_qkv": "attention", "talking_heads_attention_qkv": "talking_heads_attention"}


def _inputs(device, dtype) -> Dict[str, Callable[[bool], tuple]]:
    """Per op: grad -> (call, inputs): call(*inputs) returns the output to differentiate."""
    def t(*shape, grad=False, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt).requires_grad_(grad)

    w = lambda: torch.ones(64, device=device)  # noqa: E731  (LayerNorm params, fp32)
    return {
        "attention": lambda g: (ops.attention, (t(1, 2, 16, 64, grad=g), t(1, 2, 16, 64, grad=g),
                                                t(1, 2, 16, 64, grad=g))),
        "attention_qkv": lambda g: (ops.attention_qkv, (t(1, 16, 3, 2, 64, grad=g),)),
        "class_attention": lambda g: (ops.class_attention, (t(1, 2, 1, 48, grad=g),
                                                            t(1, 2, 16, 48, grad=g), t(1, 2, 16, 48, grad=g))),
        "talking_heads_attention": lambda g: (ops.talking_heads_attention, (
            t(1, 4, 16, 48, grad=g), t(1, 4, 16, 48, grad=g), t(1, 4, 16, 48, grad=g),
            t(4, 4, grad=g, dt=torch.float32), t(4, grad=g, dt=torch.float32),
            t(4, 4, grad=g, dt=torch.float32), t(4, grad=g, dt=torch.float32))),
        "talking_heads_attention_qkv": lambda g: (ops.talking_heads_attention_qkv, (
            t(1, 16, 3, 4, 48, grad=g), t(4, 4, grad=g, dt=torch.float32), t(4, grad=g, dt=torch.float32),
            t(4, 4, grad=g, dt=torch.float32), t(4, grad=g, dt=torch.float32))),
        "layerscale_residual": lambda g: (ops.layerscale_residual, (
            t(2, 16, 64, grad=g), t(2, 16, 64, grad=g), t(64, grad=g, dt=torch.float32))),
        "layerscale_residual_layernorm": lambda g: (
            lambda *a: ops.layerscale_residual_layernorm(*a)[1],
            (t(2, 16, 64, grad=g), t(2, 16, 64, grad=g), t(64, grad=g, dt=torch.float32),
             w().requires_grad_(g), w().requires_grad_(g))),
        "layer_norm": lambda g: (ops.layer_norm, (t(2, 16, 64, grad=g), w().requires_grad_(g),
                                                  w().requires_grad_(g))),
        "distillation_loss": lambda g: (
            lambda s, d, y, te: ops.distillation_loss(s, d, y, te, "soft", 0.5, 2.0),
            (t(8, 10, grad=g), t(8, 10, grad=g), torch.randint(0, 10, (8,), device=device), t(8, 10))),
    }


class _NoLaunch:
    """kernel[grid](*args) that does nothing."""
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> int:
    """Every @triton.jit function in deit_fast.kernels' modules launches nothing from now on;
    returns how many were replaced."""
    count = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, obj in list(vars(module).items()):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(module, name, _NoLaunch())
                count += 1
    return count


def _us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    return _time_steps(fn, calls, device) * 1e6


def measure(op: str, make: Callable[[bool], tuple], backend: str, calls: int, device) -> Dict[str, float]:
    call, args = make(False)
    with torch.no_grad(), ops.use_backend(backend):
        fwd = _us(lambda: call(*args), calls, device)
    call, args = make(True)
    leaves = [a for a in args if a.requires_grad]
    dout = torch.ones_like(call(*args))

    def fwd_bwd():
        torch.autograd.grad(call(*args), leaves, dout)
    with ops.use_backend(backend):
        fwd_grad = _us(lambda: call(*args), calls, device)
        both = _us(fwd_bwd, calls, device)
    return {"fwd": fwd, "fwd(grad)": fwd_grad, "fwd+bwd": both}


def profile(op: str, make: Callable[[bool], tuple], calls: int, device, top: int = 15) -> str:
    """The `top` functions by own time over `calls` no-grad triton forwards of op (after one)."""
    call, args = make(False)
    with torch.no_grad(), ops.use_backend("triton"):
        call(*args)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            call(*args)
        prof.disable()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return f"### {op}: cProfile of {calls} triton forwards, by own time\n{text.getvalue()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=200, help="calls per measurement (after one warm-up)")
    p.add_argument("--ops", help="comma list (default: all)")
    p.add_argument("--out", help="also write <out>.jsonl")
    p.add_argument("--stub-kernels", action="store_true",
                   help="Triton kernels launch nothing: the triton rows time the host path alone")
    p.add_argument("--stub-driver", action="store_true",
                   help="no GPU, TRITON_INTERPRET=0: real Triton dispatch compiling for sm_90, "
                        "launching nothing (bench/stub_driver.py)")
    p.add_argument("--dtype", choices=list(common.DTYPES),
                   help="inputs (default bf16; fp32 under the interpreter). With --stub-driver the "
                        "torch rows run on the CPU, which computes bf16 slowly: fp32 compares them")
    p.add_argument("--profile", action="store_true",
                   help="after the table, cProfile each op's triton forward (own time per function)")
    args = p.parse_args(argv)
    if args.stub_kernels and args.stub_driver:
        p.error("--stub-kernels and --stub-driver exclude each other")
    stubbed = f", {stub_kernels()} Triton kernels stubbed out" if args.stub_kernels else ""
    device = torch.device(args.device)
    if args.stub_driver:
        if device.type != "cpu":
            p.error("--stub-driver replaces the GPU: use it with --device cpu")
        from bench import stub_driver
        stub_driver.install()
        stubbed = ", Triton compiling for sm_90 and launching nothing"
    # the interpreter has no bf16; real Triton (a GPU, or the stub driver) has
    dtype = common.DTYPES.get(args.dtype, torch.float32 if kernels.INTERPRETED else torch.bfloat16)
    makers = _inputs(device, dtype)
    names = args.ops.split(",") if args.ops else list(makers)
    rows = []
    print(f"host overhead per call, us ({common.device_name(device)}, {dtype}, {args.calls} calls{stubbed})\n")
    print("| op | backend | fwd | fwd(grad) | fwd+bwd |\n|---|---|---|---|---|")
    # Real Triton launches (a GPU, or the stub driver) are timed both ways: kernels.launch
    # passing tensors to Triton's launcher, and passing addresses (kernels.RAW_POINTERS).
    raw_ok, shipped = not kernels.INTERPRETED and not args.stub_kernels, kernels.RAW_POINTERS
    for op in names:
        kernels_of = PACKED.get(op, op)  # a packed op runs on its unpacked op's backends
        for backend in ("torch",) + _backend.KERNELS[kernels_of]:
            why = _backend.unavailable(kernels_of, backend, device.type)
            if why is not None:
                print(f"| {op} | {backend} | unavailable: {why} | | |")
                continue
            raw = (False, True) if backend == "triton" and raw_ok else (False,)
            for kernels.RAW_POINTERS in raw:
                us = measure(op, makers[op], backend, args.calls, device)
                label = backend + (" raw_pointers" if kernels.RAW_POINTERS else "")
                rows.append({"op": op, "backend": label, "stub_driver": args.stub_driver,
                             "stubbed": args.stub_kernels and backend == "triton", **us})
                print(f"| {op} | {label} | {us['fwd']:.1f} | {us['fwd(grad)']:.1f} | {us['fwd+bwd']:.1f} |")
            kernels.RAW_POINTERS = shipped
    for op in names if args.profile else ():
        if _backend.unavailable(PACKED.get(op, op), "triton", device.type) is None:
            print("\n" + profile(op, makers[op], args.calls, device))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{args.out}.jsonl", "w") as f:
            f.write(json.dumps({"header": common.environment(device)}) + "\n")
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
