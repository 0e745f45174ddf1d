"""Nsight Compute profiles of the kernels behind the targets still missed: what the profile shows.

    python -m bench.ncu --out out/ncu                  # every profile below: out/ncu.md, out/ncu.csv
    python -m bench.ncu --profiles talking_heads,attention_fwd --ncu /path/to/ncu

The issues ask that a missed target's note say what the profile shows. This runs one process
under `ncu` (clocks left alone, `--clock-control none`, as .library/device/METHOD.md asks) and
profiles one call of each case, taken from the op benches' own setups (bench/ops/*.py), after a
warm-up call outside the profiled range: Triton compiles, cuDNN plans and allocations are not
profiled. Before each case a marker kernel with a grid of (case number) programs is profiled, so
the kernels between two markers are that case's, in launch order.

The table per kernel: duration; SM, memory and DRAM throughput as % of peak; L2 hit rate;
achieved / theoretical occupancy, registers per thread and waves per SM; issue slots busy; the
tensor pipe's busy %; warp cycles per issued instruction and the top stall reasons (cycles per
issued instruction each). The whole raw page (every metric of the sections) is the .csv.

ncu is looked up as --ncu, $NCU, `ncu` on the PATH, then /opt/nvidia/nsight-compute/*/ncu and
/usr/local/cuda/bin/ncu. Without it, or without access to the counters (gVisor machines: see
.library/device/KINDS.md), it says so and exits 2.
"""
import argparse
import contextlib
import csv
import glob
import importlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from bench import common  # first: sets TRITON_INTERPRET on a machine without a GPU

# Sections: stable names across ncu versions, unlike single metric names (the .csv keeps them all).
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats", "ComputeWorkloadAnalysis",
            "MemoryWorkloadAnalysis")
MARKER = "_ncu_case_marker"
ROOT = Path(__file__).resolve().parents[1]  # `-m bench.ncu` runs from here: bench is not installed
OPS = {"talking_heads": "talking_heads_attention", "layerscale_layernorm": "layerscale_residual_layernorm",
       "distill_loss": "distillation_loss_hard"}

# name -> (bench module, shape, dtype, impl, direction, params): one profiled call each, at the
# shapes of the targets that were missed on the H100 (2026-11-26).
CASES = {
    "th_fwd": ("talking_heads", (256, 8, 196, 48), "bf16", "triton_tc", "fwd", {}),
    "th_bwd": ("talking_heads", (256, 8, 196, 48), "bf16", "triton_tc", "bwd", {}),
    "th_fwd_chunked": ("talking_heads", (256, 8, 196, 48), "bf16", "triton_chunked", "fwd", {}),
    "th_bwd_chunked": ("talking_heads", (256, 8, 196, 48), "bf16", "triton_chunked", "bwd", {}),
    "attn_fwd_cuda": ("attention", (256, 8, 197, 48), "bf16", "cuda", "fwd", {}),
    "attn_fwd_cuda_m128_s3": ("attention", (256, 8, 197, 48), "bf16", "cuda_m128_s3", "fwd", {}),
    "attn_fwd_cuda_w32": ("attention", (256, 8, 197, 48), "bf16", "cuda_w32", "fwd", {}),
    "attn_fwd_cudnn": ("attention", (256, 8, 197, 48), "bf16", "sdpa_cudnn", "fwd", {}),
    "attn_fwd_triton": ("attention", (256, 8, 197, 48), "bf16", "triton", "fwd", {}),
    "class_attn_fwd_cuda": ("class_attention", (256, 8, 197, 48), "bf16", "cuda", "fwd", {}),
    "class_attn_bwd_cuda": ("class_attention", (256, 8, 197, 48), "bf16", "cuda", "bwd", {}),
    "class_attn_fwd_prefetch": ("class_attention", (256, 8, 197, 48), "bf16", "cuda_prefetch", "fwd", {}),
    "class_attn_bwd_prefetch": ("class_attention", (256, 8, 197, 48), "bf16", "cuda_prefetch", "bwd", {}),
    "ln_fwd_cuda": ("layerscale_layernorm", (256, 197, 384), "fp32/bf16/fp32", "cuda", "fwd", {}),
    "ln_bwd_cuda": ("layerscale_layernorm", (256, 197, 384), "fp32/bf16/fp32", "cuda", "bwd", {}),
    "ln_bwd_prefetch": ("layerscale_layernorm", (256, 197, 384), "fp32/bf16/fp32", "cuda_prefetch", "bwd", {}),
    # fwd+bwd: the whole step's kernels, ours against torch.compile's (its 1.3x was missed)
    "loss_triton": ("distill_loss", (256, 1000), "bf16", "triton", "fwd+bwd", {"kind": "hard"}),
    "loss_cuda": ("distill_loss", (256, 1000), "bf16", "cuda", "fwd+bwd", {"kind": "hard"}),
    "loss_compile": ("distill_loss", (256, 1000), "bf16", "compile", "fwd+bwd", {"kind": "hard"}),
}
PROFILES = {  # named groups of cases, by the gap to their target (distill_loss last: it compiles)
    "talking_heads": ("th_fwd", "th_bwd", "th_fwd_chunked", "th_bwd_chunked"),
    "attention_fwd": ("attn_fwd_cuda", "attn_fwd_cuda_m128_s3", "attn_fwd_cuda_w32", "attn_fwd_cudnn",
                      "attn_fwd_triton"),
    "class_attention": ("class_attn_fwd_cuda", "class_attn_bwd_cuda", "class_attn_fwd_prefetch",
                        "class_attn_bwd_prefetch"),
    "layernorm": ("ln_fwd_cuda", "ln_bwd_cuda", "ln_bwd_prefetch"),
    "distill_loss": ("loss_triton", "loss_cuda", "loss_compile"),  # last: the compile takes a while
}

# (column, metric names tried in order, scale): the summary table. Durations are converted by unit.
COLUMNS = [
    ("us", ("gpu__time_duration.sum",), None),
    ("SM %", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",), 1),
    ("mem %", ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",), 1),
    ("DRAM %", ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                "dram__throughput.avg.pct_of_peak_sustained_elapsed"), 1),
    ("L2 hit %", ("lts__t_sector_hit_rate.pct",), 1),
    ("occ. %", ("sm__warps_active.avg.pct_of_peak_sustained_active",), 1),
    ("max occ. %", ("sm__maximum_warps_per_active_cycle_pct",), 1),
    ("regs", ("launch__registers_per_thread",), 1),
    ("waves", ("launch__waves_per_multiprocessor",), 1),
    ("issue %", ("sm__inst_issued.avg.pct_of_peak_sustained_active",), 1),
    ("tensor %", ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                  "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                  "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"), 1),
    ("cyc/issue", ("smsp__average_warp_latency_per_inst_issued.ratio",), 1),
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}


# ---- the profiled process ---------------------------------------------------------------------

@triton.jit
def _ncu_case_marker(X):
    """Launched over n programs before case n: the case boundary in the profile (MARKER)."""
    tl.store(X + tl.program_id(0), tl.program_id(0))


def run_cases(names: Sequence[str], device: str, overrides: Optional[Dict[str, Tuple[tuple, str]]] = None,
              window=contextlib.nullcontext) -> List[str]:
    """Each case: build it with its bench's setup, call it once (warm-up), then, inside window(),
    the marker and one more call. overrides: case name -> (shape, dtype) instead of its own (the
    CPU smoke test). Returns the names run, in order."""
    args = common.parse_args(common.parser("", [], 1, 1), ["--device", device])
    cuda = torch.device(device).type == "cuda"
    done = []
    for number, name in enumerate(names, 1):
        module, shape, dtype, impl, direction, params = CASES[name]
        bench = importlib.import_module(f"bench.ops.{module}")
        shape, dtype = (overrides or {}).get(name, (shape, dtype))
        case = common.Case(OPS.get(module, module), shape, dtype, dict(params))
        timed = bench.setup(case, impl, args)[direction]()
        timed.fn()
        common.clear_grads(timed)  # as the benches time it: no accumulation into old grads
        if cuda:
            torch.cuda.synchronize()
        with window():
            if cuda:
                _ncu_case_marker[(number,)](torch.empty(number, device=device, dtype=torch.int32))
            timed.fn()
            if cuda:
                torch.cuda.synchronize()
        del timed
        done.append(name)
        print(f"ran {name}", flush=True)
    return done


@contextlib.contextmanager
def cuda_profiler_range() -> Iterator[None]:
    """What ncu --profile-from-start off profiles: cudaProfilerStart .. cudaProfilerStop."""
    torch.cuda.profiler.start()
    try:
        yield
    finally:
        torch.cuda.profiler.stop()


# ---- the driver and the report ------------------------------------------------------------------

def find_ncu(explicit: Optional[str] = None) -> Optional[str]:
    """The ncu to run: `explicit` (--ncu) if given, else the first of $NCU, PATH and the usual
    install places that is an executable file."""
    candidates = (explicit,) if explicit else (
        os.environ.get("NCU"), shutil.which("ncu"),
        *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True), "/usr/local/cuda/bin/ncu")
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def ncu_command(ncu: str, csv_path: str, names: Sequence[str]) -> List[str]:
    sections = [arg for s in SECTIONS for arg in ("--section", s)]
    return [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
            *sections, "--csv", "--page", "raw", "--log-file", csv_path,
            sys.executable, "-m", "bench.ncu", "--target", ",".join(names)]


def _number(text: str) -> Optional[float]:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_raw(text: str) -> List[dict]:
    """The kernels of ncu's `--csv --page raw` output, in launch order: each a dict of its
    identifying cells ("Kernel Name", "Grid Size", ...) and "metrics" {name: (value, unit)}.
    Lines before the CSV header (==PROF== messages) and the units row are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    rows = list(csv.reader(lines[start:]))
    header, units = rows[0], [""] * len(rows[0])
    kernels = []
    for row in rows[1:]:
        if not row or not row[0].strip().isdigit():  # the units row (ID empty), blank lines
            if row and len(row) == len(header):
                units = row
            continue
        cells = dict(zip(header, row))
        metrics = {name: (_number(value), unit) for name, value, unit in zip(header, row, units)
                   if "__" in name or name.startswith("launch")}
        kernels.append({"id": int(row[0]), "name": cells.get("Kernel Name", "?"),
                        "grid": cells.get("Grid Size", ""), "block": cells.get("Block Size", ""),
                        "metrics": metrics})
    return kernels


def by_case(kernels: List[dict], names: Sequence[str]) -> List[Tuple[str, List[dict]]]:
    """Split at the marker kernels: marker n (grid n) opens case names[n - 1]."""
    cases: List[Tuple[str, List[dict]]] = []
    for k in kernels:
        if MARKER in k["name"]:
            n = int(_number(re.split(r"[(, )]+", k["grid"].strip("() "))[0]) or 0)
            cases.append((names[n - 1] if 0 < n <= len(names) else f"case {n}", []))
        elif cases:
            cases[-1][1].append(k)
        else:
            cases.append(("before the first marker", [k]))
    return cases


def _cell(kernel: dict, names: Sequence[str], scale) -> str:
    for name in names:
        value, unit = kernel["metrics"].get(name, (None, ""))
        if value is not None:
            if scale is None:  # a duration
                value *= TO_US.get(unit, 1.0)
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return ""


def stalls(kernel: dict, top: int = 4) -> str:
    found = [(m.group(1), v) for name, (v, _) in kernel["metrics"].items()
             if (m := STALL.match(name)) and v is not None and m.group(1) != "selected"]
    found.sort(key=lambda item: -item[1])
    return ", ".join(f"{reason} {value:.2g}" for reason, value in found[:top])


def _short(name: str, width: int = 60) -> str:
    name = re.sub(r"^void ", "", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def markdown(cases: List[Tuple[str, List[dict]]], device: str, command: str) -> str:
    lines = [f"# Nsight Compute, {device}", "", f"`{command}`", "",
             "Per kernel: ncu's own timing (replayed, clocks not locked), throughputs as % of peak, "
             "and the stall reasons with the most warp cycles per issued instruction.", ""]
    head = ["kernel", "grid", "block", *[c for c, _, _ in COLUMNS], "top stalls"]
    for name, kernels in cases:
        lines += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in kernels:
            cells = [_short(k["name"]).replace("|", "/"), k["grid"], k["block"],
                     *[_cell(k, names, scale) for _, names, scale in COLUMNS], stalls(k)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"comma list out of {','.join(PROFILES)}")
    p.add_argument("--cases", help=f"comma list out of {','.join(CASES)} (instead of --profiles)")
    p.add_argument("--out", default="out/ncu", help="prefix of the .md and .csv written")
    p.add_argument("--ncu", help="the ncu executable")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the profiled process")
    p.add_argument("--target", help=argparse.SUPPRESS)  # the profiled process itself
    args = p.parse_args(argv)
    if args.target:
        run_cases(args.target.split(","), "cuda", window=cuda_profiler_range)
        return
    names = args.cases.split(",") if args.cases else [c for prof in args.profiles.split(",") for c in PROFILES[prof]]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    ncu = find_ncu(args.ncu)
    if ncu is None:
        where = f"--ncu {args.ncu} is not an executable file" if args.ncu else "give --ncu or $NCU"
        print(f"ncu (Nsight Compute) not found: {where}", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = str(Path(f"{out}.csv").resolve())  # ncu runs from ROOT
    command = ncu_command(ncu, csv_path, names)
    # Its own process group: at the time limit ncu and the process it profiles stop together.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout)
        status = f"ncu exited {proc.returncode}"
    except subprocess.TimeoutExpired:  # report what was profiled before the limit
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"ncu stopped after {args.timeout:g} s"
    raw = Path(csv_path).read_text(errors="replace") if Path(csv_path).exists() else ""
    kernels = parse_raw(raw)
    if proc.returncode != 0 or not kernels:
        tail = "\n".join((output + raw).splitlines()[-30:])
        print(f"{status} with {len(kernels)} kernels profiled:\n{tail}", file=sys.stderr)
        if not kernels:
            raise SystemExit(2)
    report = markdown(by_case(kernels, names), torch.cuda.get_device_name(), " ".join(command[1:]))
    Path(f"{out}.md").write_text(report)
    print(report)
    print(f"wrote {out}.md and {out}.csv")
    if proc.returncode != 0:
        raise SystemExit(1)  # a partial profile: the report holds what ran


if __name__ == "__main__":
    main()
