"""compute-sanitizer (memcheck, racecheck) over one small case of a CUDA extension kernel.

Shared by the tests/ops/test_*_cuda.py files: each passes a script that runs its op and prints
"sanitizer script done", and a kernel-name substring so that only our kernels are checked
(torch's own are not under test and make the run much slower)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ["memcheck", "racecheck"]


def _binary() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for c in (os.path.join(home, "bin", "compute-sanitizer"), shutil.which("compute-sanitizer")):
        if c and os.access(c, os.X_OK):
            return c
    pytest.skip("compute-sanitizer not found")


def run_sanitizer(tool: str, kernels: str, script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # One allocation per tensor, so that reading past one is caught, not hidden in a cached block.
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    cmd = [_binary(), "--tool", tool, "--error-exitcode", "1", "--kernel-name", f"kns={kernels}",
           sys.executable, "-c", script]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if "Device not supported" in out:  # sandboxed GPUs (gVisor) refuse the sanitizer outright
        pytest.skip("compute-sanitizer cannot attach to this device: " + out[-300:])
    assert proc.returncode == 0 and "sanitizer script done" in out, out[-6000:]
    assert "ERROR SUMMARY: 0 errors" in out or "RACECHECK SUMMARY: 0 hazards" in out, out[-6000:]
