"""Compile every shipped variant of one kernels/ module for sm_90, without a GPU.

Run as a script in a fresh process (TRITON_INTERPRET unset), since the test process decorates
the kernels as interpreted functions. Prints one JSON line per variant: kernel, dtype, constexprs,
registers, spill bytes (from cuobjdump on the cubin) and whether the PTX uses wgmma.
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


def main(module_name: str) -> None:
    module = importlib.import_module(f"deit_fast.kernels.{module_name}")
    for dtype in ("fp16", "bf16"):
        for cfg in module.aot_configs(dtype):
            kernel, signature = cfg["kernel"], cfg["signature"]
            # As the JIT does at run time: pointers and 16-multiples get tt.divisibility=16.
            attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                     if signature[name].startswith("*") or name in cfg["aligned"]}
            compiled = triton.compile(ASTSource(kernel, signature, cfg["constexprs"], attrs),
                                      target=TARGET, options={"num_warps": cfg["num_warps"],
                                                     "num_stages": cfg.get("num_stages", 3)})
            row = {"kernel": kernel.__name__, "dtype": dtype, "num_warps": cfg["num_warps"],
                   "constexprs": cfg["constexprs"], "aligned": bool(cfg["aligned"]),
                   "matmul": cfg["matmul"], "wgmma": "wgmma" in compiled.asm["ptx"]}
            row.update(resource_usage(compiled.asm["cubin"]))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
