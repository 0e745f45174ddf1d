"""Run whole models through Triton's real launch path, compiling for sm_90 (or sm_80),
launching nothing.

A stand-in for Triton's CUDA driver reports an H100 (sm_90, 227 KB of shared memory a block;
with --arch 80 an A100, 163 KB) and turns each launch into a no-op, so the ops' host code picks
its tiles, Triton's JIT specialises and compiles every kernel exactly as on a GPU, and the CPU
does the rest of the model (its tensors stay on the CPU; the kernels' outputs are left
unwritten, which only the numbers after them see). This checks what compile_triton.py's
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
import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import compiler
from triton.runtime import driver

import compile_triton
from deit_fast import ops
from deit_fast.models.registry import create_model
from deit_fast.ops import _backend

MAX_SHARED = {90: 232448, 80: 166912}  # bytes a block may have (opt-in), per arch


class _Utils:
    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED[self.arch], "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads


class GpuWithoutLaunches:
    """The parts of triton.runtime.driver.active that compiling and launching touch."""
    def __init__(self, arch: int):
        self.arch, self.utils = arch, _Utils(arch)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return driver.default.map_python_to_cpp_type(ty)

    def launcher_cls(self, src, metadata):
        return lambda *args: None


def _record(model: str, seen: set):
    """CompiledKernel._init_handles (run once per compiled kernel before its first launch):
    print the kernel's resources, then leave it a launcher that does nothing."""
    def init_handles(self):
        if self.hash not in seen:
            seen.add(self.hash)
            usage = compile_triton.resource_usage(self.kernel)
            print(json.dumps({"kernel": self.name, "model": model, "shared": self.metadata.shared,
                              "registers": usage["registers"], "stack": usage["stack"],
                              "spill_bytes": usage["spill_bytes"], "triton": triton.__version__}),
                  flush=True)
        self.module, self._run = 1, lambda *args: None
    return init_handles


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


def main(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, choices=sorted(MAX_SHARED), default=90)
    p.add_argument("dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("models", nargs="+")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    driver.set_active(GpuWithoutLaunches(args.arch))
    print(json.dumps({"arch": args.arch, "max_shared": MAX_SHARED[args.arch]}), flush=True)
    _backend._availability[("triton", "cpu")] = None  # CPU tensors, real (not interpreted) Triton
    seen = set()
    for name in args.models:
        compiler.CompiledKernel._init_handles = _record(name, seen)
        step(name, dtype)
        print(json.dumps({"done": name}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
