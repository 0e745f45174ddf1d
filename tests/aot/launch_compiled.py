"""Run whole models through Triton's real launch path, compiling for sm_90 (or sm_80),
launching nothing (bench/stub_driver.py), and print what every launched kernel needs.

The ops' host code picks its tiles and Triton's JIT specialises and compiles every kernel exactly
as on a GPU, while the CPU does the rest of the model. This checks what compile_triton.py's
hand-listed variants cannot: that the variants real models launch are the ones that fit. fp32
talking-heads attention was such a case: its tiles needed 264-347 KB of shared memory, and no
GPU test had run it.

Run as a script in a fresh process (TRITON_INTERPRET unset):

    python tests/aot/launch_compiled.py [--arch 80] bf16 deit_small_patch16_224 cait_s24_224

Prints the arch and its shared-memory limit, then one JSON line per distinct compiled kernel
(name, model, shared bytes, registers, stack bytes from cuobjdump) and one per model (`done`).
Inputs: batch 1 at the model's own image size, under CPU autocast for bf16 and fp16; the loss
is ops.distillation_loss (soft for distilled models), so every op's forward and backward runs.
"""
import argparse
import importlib
import json
import pkgutil
import sys

import torch
import triton
from triton.compiler.compiler import LazyDict

import compile_triton
from bench import stub_driver
from deit_fast import kernels, ops
from deit_fast.models.registry import create_model


class Recorder:
    """stub_driver's on_compiled: prints each distinct kernel's resources once, tagged with the
    model that first launched it."""

    def __init__(self):
        self.model, self.seen = None, set()

    def __call__(self, kernel) -> None:
        if kernel.hash in self.seen:
            return
        self.seen.add(kernel.hash)
        usage = compile_triton.resource_usage(kernel.kernel)
        print(json.dumps({"kernel": kernel.name, "model": self.model,
                          "shared": kernel.metadata.shared, "registers": usage["registers"],
                          "stack": usage["stack"], "spill_bytes": usage["spill_bytes"],
                          "triton": triton.__version__}), flush=True)


def step(name: str, dtype: torch.dtype) -> None:
    model = create_model(name)
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with ops.use_backend("triton"), autocast:
        out = model(x)
        target = torch.tensor([3])
        if isinstance(out, tuple):  # class and distillation heads
            loss = ops.distillation_loss(out[0], out[1], target, torch.randn_like(out[0]), "soft",
                                         0.5, 3.0, check_target=False)
        else:
            loss = ops.distillation_loss(out, None, target, None, "none", check_target=False)
    loss.backward()


class RawPointersCheck:
    """--raw-pointers: every launch of the kernel wrappers made twice, by Triton's own path and
    by kernels.launch with RAW_POINTERS, and the two calls of the launcher compared: the same
    compiled kernel must get the same arguments, the tensors as their addresses. Counts the
    launches per kernel."""

    def __init__(self):
        self.calls, self.launches = [], {}
        for info in pkgutil.iter_modules(kernels.__path__):  # every kernel file, later ones too
            module = importlib.import_module(f"{kernels.__name__}.{info.name}")
            if getattr(module, "launch", None) is kernels.launch:
                module.launch = self.twice

    def on_launch(self, kernel, args) -> None:
        self.calls.append((kernel, args))

    def twice(self, kernel, grid, *args, **kwargs):
        first = len(self.calls)
        kernels.RAW_POINTERS = False
        compiled = kernels.launch(kernel, grid, *args, **kwargs)
        kernels.RAW_POINTERS = True
        try:
            kernels.launch(kernel, grid, *args, **kwargs)
        finally:
            kernels.RAW_POINTERS = False
        (jit, jit_args), (raw, raw_args) = self.calls[first:]
        # Argument 6 is the launch metadata, a new LazyDict per launch: compared by its data.
        unpack = lambda a: a.data if isinstance(a, LazyDict) else a  # noqa: E731
        addresses = tuple(unpack(a.data_ptr() if isinstance(a, torch.Tensor) else a)
                          for a in jit_args)
        if raw is not jit or tuple(map(unpack, raw_args)) != addresses:
            raise AssertionError(f"{jit.name}: Triton's launcher got {addresses}, "
                                 f"launch(RAW_POINTERS) gave {raw.name} {raw_args}")
        self.launches[jit.name] = self.launches.get(jit.name, 0) + 1
        return compiled


def main(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, choices=sorted(stub_driver.MAX_SHARED), default=90)
    p.add_argument("--raw-pointers", action="store_true",
                   help="check kernels.launch's RAW_POINTERS path against Triton's (see "
                        "RawPointersCheck); prints {\"raw_pointers\": launches per kernel}")
    p.add_argument("dtype", choices=sorted(kernels.DTYPES))
    p.add_argument("models", nargs="+")
    args = p.parse_args(argv)
    dtype = kernels.DTYPES[args.dtype]
    recorder = Recorder()
    raw = RawPointersCheck() if args.raw_pointers else None
    stub_driver.install(args.arch, recorder, raw.on_launch if raw else None)
    print(json.dumps({"arch": args.arch, "max_shared": stub_driver.MAX_SHARED[args.arch]}),
          flush=True)
    for name in args.models:
        recorder.model = name
        step(name, dtype)
        print(json.dumps({"done": name}), flush=True)
    if raw:
        print(json.dumps({"raw_pointers": raw.launches}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
