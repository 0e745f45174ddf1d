"""Host time of one Triton launch by its number of tensor arguments: Triton's Python dispatch
and its C launcher apart, beside a launch from C++ and the driver call that Triton's launcher
makes for every tensor argument.

    python -m bench.launch_cost                                   # on a GPU
    TRITON_INTERPRET=0 python -m bench.launch_cost --stub-driver  # the Python side, on a CPU

Why. On an H100 (2026-11-26) a Triton launch cost 47-128 us more host time than its
CUDA-extension twin behind the same op layer (bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md:
layerscale_residual fwd 86.5 vs 39.1 us, 5 tensor arguments; distillation loss fwd 141.8 vs
13.2 us, 6 non-empty tensors), about 10-20 us a tensor. On a 2-core CPU with bench/stub_driver.py
Triton's whole Python dispatch is about 7 us. Triton's launcher (triton 3.6 and 3.8,
backends/nvidia/driver.py, getPointer) checks every tensor argument with cuPointerGetAttribute,
one driver call per tensor per launch; an integer pointer skips it. The rows, us per call:
- jit K: kernel[grid](K tensors), Triton's whole launch path;
- launcher K: the compiled kernel's launcher called directly with the K tensors (what jit does
  after binding, specialisation and its cache lookup);
- launcher_int K: the same launcher given the tensors' data_ptr() integers: no pointer checks;
- cuPointerGetAttribute: that driver call alone, through ctypes;
- torch add_: x.add_(1), a launch from C++, for scale.
If launcher K - launcher_int K grows with K at several us a tensor, the pointer checks are the
cost, and a launch path that passes integer pointers (after Triton's specialisation, which reads
the tensors' alignment) removes it.
"""
import argparse
import ctypes
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from bench import common  # first: turns the interpreter on when there is no GPU (unless set)

COUNTS = (1, 2, 4, 8)
CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3  # cuda.h


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def touch(P0, P1, P2, P3, P4, P5, P6, P7):
        # Stores one zero through each pointer given: the tensors are real arguments of the
        # launch; a None is a compile-time constant, not an argument.
        for p in tl.static_range(8):
            ptr = (P0, P1, P2, P3, P4, P5, P6, P7)[p]
            if ptr is not None:
                tl.store(ptr, 0.0)
    return touch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_us(f: Callable[[], object], calls: int, device: torch.device) -> float:
    """Host time per call of a loop of calls: the GPU work of these launches is a few us a call,
    so the loop is bound by the host, and the final sync only drains the queue."""
    f()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        f()
    elapsed = time.perf_counter() - start
    _sync(device)
    return 1e6 * elapsed / calls


def _pointer_check(device: torch.device, calls: int):
    """us per cuPointerGetAttribute call on a CUDA tensor, or why it cannot be timed here."""
    if device.type != "cuda":
        return "unavailable: needs a CUDA tensor"
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"unavailable: {e}"
    tensor = torch.empty(1, device=device)  # alive while its address is looked up
    ptr = ctypes.c_uint64(tensor.data_ptr())
    out = ctypes.c_uint64()
    call = libcuda.cuPointerGetAttribute
    status = call(ctypes.byref(out), CU_POINTER_ATTRIBUTE_DEVICE_POINTER, ptr)
    if status != 0:
        return f"unavailable: cuPointerGetAttribute returned {status}"
    return per_call_us(lambda: call(ctypes.byref(out), CU_POINTER_ATTRIBUTE_DEVICE_POINTER, ptr),
                       calls, device)


def rows(device: torch.device, calls: int):
    from triton.runtime import driver
    touch = _kernel()
    for k in COUNTS:
        tensors = [torch.zeros(1, device=device) for _ in range(k)]
        args = tensors + [None] * (8 - k)
        compiled = touch[(1,)](*args)  # compiles; the launches below reuse it
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        launcher, function, meta = compiled.run, compiled.function, compiled.packed_metadata
        ints = [t.data_ptr() for t in tensors] + [None] * (8 - k)
        yield f"jit {k}", per_call_us(lambda: touch[(1,)](*args), calls, device)
        yield f"launcher {k}", per_call_us(
            lambda: launcher(1, 1, 1, stream, function, meta, None, None, None, *args), calls, device)
        yield f"launcher_int {k}", per_call_us(
            lambda: launcher(1, 1, 1, stream, function, meta, None, None, None, *ints), calls, device)
    yield "cuPointerGetAttribute", _pointer_check(device, calls)
    x = torch.zeros(1, device=device)
    yield "torch add_", per_call_us(lambda: x.add_(1.0), calls, device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--stub-driver", action="store_true",
                   help="no GPU: bench/stub_driver.py stands in for Triton's driver (needs "
                        "TRITON_INTERPRET=0); the launcher rows then time a no-op launcher")
    p.add_argument("--out", help="also write <out>.jsonl")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.launch_cost times Triton's launch path, which the interpreter "
                         "replaces: run it on a GPU, or with TRITON_INTERPRET=0 --stub-driver")
    if args.stub_driver:
        from bench import stub_driver
        stub_driver.install()
    print(f"host time per call, us ({common.device_name(device)}, {args.calls} calls"
          f"{', stand-in driver: nothing launched' if args.stub_driver else ''})\n")
    print("| what | us |\n|---|---|")
    results = []
    for name, us in rows(device, args.calls):
        results.append({"what": name, "us": us})
        print(f"| {name} | {us if isinstance(us, str) else f'{us:.2f}'} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
