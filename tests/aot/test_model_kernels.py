"""Tier 2, from the call sites: every Triton kernel that whole DeiT and CaiT models launch, in
each input dtype, compiled for sm_90 as the JIT would on an H100 (launch_compiled.py), fits an
sm_90 block and spills nothing; in bf16 and fp32 also for sm_80 (an A100's 163 KB). No GPU
needed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.aot.test_triton_compile import GPU_MACHINE_TRITON, MAX_STACK, gpu_machine_triton

pytestmark = pytest.mark.aot
ROOT = Path(__file__).resolve().parents[2]
# Each op and head count once: DeiT with the distillation token (the loss's soft path), CaiT with
# 4 heads at 577 tokens and 8 heads at 197 (talking heads, class attention, LayerScale).
MODELS = ["deit_tiny_distilled_patch16_224", "cait_xxs24_384", "cait_s24_224"]
# Name prefixes of each op's kernels: every one must be launched by MODELS.
OP_KERNELS = ("_attn_", "_th_", "_ca_", "_residual_ln_", "_layerscale_", "_distill_loss")


# Each input dtype with this machine's triton, bf16 with the GPU machine's, whose register
# allocation differs (test_triton_compile.py), and bf16 and fp32 for an A100.
PARAMS = [("bf16", None, 90), ("fp16", None, 90), ("fp32", None, 90),  # (dtype, triton, arch)
          ("bf16", GPU_MACHINE_TRITON, 90), ("bf16", None, 80), ("fp32", None, 80)]


def launch_compiled(dtype: str, version, arch: int, *flags: str):
    """launch_compiled.py's JSON lines for MODELS, run with this machine's triton (version None)
    or the GPU machine's: (its header, the other lines)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(gpu_machine_triton())] if version else []
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths + [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("launch_compiled.py")),
                           "--arch", str(arch), *flags, dtype, *MODELS], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    header, *rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert header["arch"] == arch
    assert {r["triton"] for r in rows if "kernel" in r} == {version or triton.__version__}
    return header, rows


@pytest.fixture(scope="module", params=PARAMS,
                ids=lambda p: f"{p[0]}-sm{p[2]}" + (f"-triton{p[1]}" if p[1] else ""))
def launched(request):
    header, rows = launch_compiled(*request.param)
    return header["max_shared"], rows


@pytest.mark.parametrize("version", [None, GPU_MACHINE_TRITON], ids=["this-triton", "gpu-triton"])
def test_raw_pointer_launches_hand_the_launcher_what_triton_does(version):
    """kernels.launch with RAW_POINTERS, against Triton's own launch path, for every launch of
    the models' forward and backward (launch_compiled.py's RawPointersCheck fails the run on the
    first difference): the same compiled kernel, the same arguments, tensors as addresses."""
    _, rows = launch_compiled("bf16", version, 90, "--raw-pointers")
    counts = next(r["raw_pointers"] for r in rows if "raw_pointers" in r)
    for prefix in OP_KERNELS + ("_column_sums",):
        assert any(n.startswith(prefix) for n in counts), (prefix, counts)


def test_every_model_ran_and_launched_each_op(launched):
    _, launched = launched
    assert [r["done"] for r in launched if "done" in r] == MODELS
    names = {r["kernel"] for r in launched if "kernel" in r}
    for prefix in OP_KERNELS:
        assert any(n.startswith(prefix) for n in names), (prefix, names)


def test_launched_kernels_fit_a_block(launched):
    max_shared, launched = launched
    too_big = [r for r in launched if r.get("shared", 0) > max_shared]
    assert not too_big, too_big


def test_launched_kernels_do_not_spill(launched):
    _, launched = launched
    spilled = [r for r in launched
               if "kernel" in r and (r["spill_bytes"] or r["stack"] > MAX_STACK)]
    assert not spilled, spilled
