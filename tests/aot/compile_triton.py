"""Compile every shipped variant of one kernels/ module for sm_90, without a GPU.

Run as a script in a fresh process (TRITON_INTERPRET unset), since the test process decorates
the kernels as interpreted functions. Prints one JSON line per variant: kernel, dtype, constexprs,
registers, spill bytes (from cuobjdump on the cubin), shared memory bytes, whether the PTX uses
wgmma, its tf32 MMA instructions (`tf32_mma`), and `loop_instructions`: per loop of the SASS (in
address order), the instructions a thread runs in one iteration that takes no forward branch
(for the attention kernels: a full, unmasked tile).
In the kernels whose softmax work outweighs their MMAs that count is the static measure of
speed this machine has; a proxy only: on an H100 (2026-11-26) a change that cut it 22 % ran
4-16 % slower, and the talking-heads kernels ran at about a tenth of the issue rate it implies.

    python tests/aot/compile_triton.py attention     # (PYTHONPATH=<triton 3.6> for the GPU's)
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TARGET = GPUTarget("cuda", 90, 32)
# Every input dtype the ops take: fp32 has its own tiles in places (twice the bytes per
# element), and the fp32 talking-heads tensor-core tiles needed 264-347 KB of shared memory,
# which no sm_90 block may have, while only 16-bit inputs were compiled here.
DTYPES = ("fp16", "bf16", "fp32")


def resource_usage(cubin: bytes) -> dict:
    """REG and spill bytes of the kernel, as cuobjdump --dump-resource-usage reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    usage = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    if usage is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {"registers": int(usage.group(1)), "stack": int(usage.group(2)),
            "local": int(usage.group(3)), "spill_bytes": sum(map(int, spills))}


def _sass(cubin: bytes):
    """[(address, instruction text)] of the cubin's only kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    return [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", text)]


def loop_instructions(cubin: bytes) -> list:
    """Per loop (a backward BRA), its instructions less those a taken forward branch inside it
    skips: what one iteration of the straight path issues per thread."""
    return [count for _, _, count in loops(cubin)]


def loops(cubin: bytes) -> list:
    """[(start, end, instructions)] per loop, as loop_instructions counts them, with the address
    range that tells which loops nest in which."""
    sass = _sass(cubin)
    target = lambda t: re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", t)  # noqa: E731
    counts = []
    for end, text in sass:
        jump = target(text)
        if not jump or int(jump.group(1), 16) >= end:
            continue
        start = int(jump.group(1), 16)
        body = [(a, t) for a, t in sass if start <= a <= end]
        skipped = set()
        for a, t in body:
            fwd = target(t) if re.match(r"@!?P\d+\s+BRA", t) else None
            if fwd and a < int(fwd.group(1), 16) <= end:
                skipped.update(a2 for a2, _ in body if a < a2 < int(fwd.group(1), 16))
        counts.append((start, end, len(body) - len(skipped)))
    return counts


def compile_variant(cfg: dict):
    """One aot_configs() variant compiled for sm_90, as the JIT would at run time: pointers and
    the `aligned` ints get tt.divisibility=16."""
    kernel, signature = cfg["kernel"], cfg["signature"]
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in cfg["aligned"]}
    return triton.compile(ASTSource(kernel, signature, cfg["constexprs"], attrs), target=TARGET,
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)})


def main(module_name: str) -> None:
    module = importlib.import_module(f"deit_fast.kernels.{module_name}")
    for dtype in DTYPES:
        for cfg in module.aot_configs(dtype):
            kernel, compiled = cfg["kernel"], compile_variant(cfg)
            row = {"kernel": kernel.__name__, "triton": triton.__version__, "dtype": dtype,
                   "num_warps": cfg["num_warps"],
                   "constexprs": cfg["constexprs"], "aligned": bool(cfg["aligned"]),
                   "matmul": cfg["matmul"], "wgmma": "wgmma" in compiled.asm["ptx"],
                   "tf32_mma": len(re.findall(r"^\s*(?:wgmma|mma)\S*\.tf32", compiled.asm["ptx"], re.M))}
            row.update(resource_usage(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                       loop_instructions=loop_instructions(compiled.asm["cubin"]))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
