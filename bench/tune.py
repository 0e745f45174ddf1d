"""Tile configs of the Triton self-attention kernels, timed on the GPU: which to ship.

    python -m bench.tune                                   # all three kernels, default shapes, bf16
    python -m bench.tune --kernels FWD --shapes deit_small_224 --out out/tune

kernels/attention.py ships one config per kernel (FWD, BWD_Q, BWD_KV) and SPLIT_HEAD_DIM; the
forward was the one that missed (0.78x cuDNN at DeiT-S on the H200, 2026-11-26). For each
kernel this times its direction (the forward; or the whole backward with one of its two kernels
at the candidate config and the other at the shipped one) for every candidate of a small grid,
and, for head dims that are not a power of two, with one masked block and with split blocks.
Before timing, a candidate's outputs are checked against an fp32 reference: its error may be at
most twice the shipped config's, plus a floor (the FlashAttention rule of tests/ops). It prints,
per kernel and shape, the candidates by time with the shipped one marked; one that does not
compile or run (shared memory, registers) is listed with its error.

Timing: triton.testing.do_bench (median, L2 flushed) of the kernel module's own forward or
backward, not the op: no autograd or checks. At these shapes the GPU time of one call is several
times the host's, so the queue stays full and the time is the GPU's.
Changing a shipped config: edit the dict in kernels/attention.py; the AOT tier (tests/aot) then
checks that it compiles at sm_90 without spills.
On CPU it runs one tiny shape and two candidates under the interpreter: a test of the plumbing.
"""
import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch

from bench import common  # first: turns the interpreter on when there is no GPU
from bench.ops.attention import SHAPES
from deit_fast.ops import reference
from deit_fast.kernels import attention as kernels

DEFAULT_SHAPES = ("deit_small_224", "d48_h8_n197")
TOLERANCE_FLOOR = 1e-3


def candidates(kernel: str) -> List[dict]:
    """The grid tried for one kernel (16 configs), the shipped config first."""
    if kernel == "BWD_KV":  # the key tile (BLOCK_N) owns dk, dv and loops over query tiles
        tiles = [dict(BLOCK_M=m, BLOCK_N=n) for n in (64, 128) for m in (32, 64)]
    else:  # the query tile (BLOCK_M) owns o or dq and loops over key tiles
        tiles = [dict(BLOCK_M=m, BLOCK_N=n) for m in (64, 128) for n in (32, 64)]
    grid = [dict(t, num_warps=w, num_stages=s) for t in tiles for w in (4, 8) for s in (2, 3)]
    shipped = getattr(kernels, kernel)
    return [dict(shipped)] + [c for c in grid if c != shipped]


def _inputs(shape, dtype, device, seed=0):
    B, H, N, D = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    # q, k, v as the strided views of one (B, N, 3, H, D) projection, as the models pass them
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def _reference(q, k, v, do, scale):
    """fp32 (o, dq, dk, dv) of the plain softmax attention."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    o = reference.attention(*leaves, scale)
    return (o.detach(), *torch.autograd.grad(o, leaves, do.float()))


def _error(got, want) -> float:
    return max((g.float() - w).abs().max().item() for g, w in zip(got, want))


def _run(kernel: str, q, k, v, do, scale, split):
    """The timed call of one kernel's direction, and what it outputs (to check)."""
    if kernel == "FWD":
        return lambda: kernels.forward(q, k, v, scale, split=split)[0], lambda out: (out,)
    o, lse = kernels.forward(q, k, v, scale, split=split)
    return (lambda: kernels.backward(do, q, k, v, o, lse, scale, split=split)), (lambda out: out)


def measure(kernel: str, config: dict, split: bool, inputs, want, shipped_error, args) -> dict:
    """One candidate: checked, then timed; kernels.<kernel> is the shipped config again after."""
    row = dict(kernel=kernel, config=config, split=split)
    saved = getattr(kernels, kernel)
    setattr(kernels, kernel, config)
    try:
        call, outputs = _run(kernel, *inputs, split)
        got = outputs(call())
        row["error"] = _error(got, want[:1] if kernel == "FWD" else want[1:])
        if shipped_error is not None and row["error"] > 2 * shipped_error + TOLERANCE_FLOOR:
            row["status"] = f"wrong: error {row['error']:.3g} vs shipped {shipped_error:.3g}"
            return row
        row["us"] = common.time_us(common.Timed(call), args.device, args.warmup_ms, args.rep_ms)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (a candidate that does not fit is a result, not a crash)
        row["status"] = f"failed: {type(e).__name__}: {str(e).strip()[:200]}"
    finally:
        setattr(kernels, kernel, saved)
    return row


def tune(kernel: str, shape_name: str, shape, args) -> List[dict]:
    q, k, v, do = _inputs(shape, args.dtype, args.device)
    scale = shape[3] ** -0.5
    want = _reference(q, k, v, do, scale)
    splits = (False, True) if shape[3] & (shape[3] - 1) else (False,)
    cands = candidates(kernel)[:args.limit] if args.limit else candidates(kernel)
    rows, shipped_error = [], None
    for split, config in itertools.product(splits, cands):
        if time.monotonic() > args.deadline:
            row = dict(kernel=kernel, config=config, split=split, status="not run (time budget)")
        else:
            row = measure(kernel, config, split, (q, k, v, do, scale), want, shipped_error, args)
        row.update(shape=shape_name, dims="x".join(map(str, shape)),
                   shipped=config == getattr(kernels, kernel) and split == kernels.SPLIT_HEAD_DIM)
        if row["shipped"]:
            shipped_error = row.get("error")
        rows.append(row)
        print(_line(row), flush=True)
    base = next((r["us"] for r in rows if r["shipped"] and "us" in r), None)
    for r in rows:
        if base and "us" in r:
            r["speedup"] = base / r["us"]
    return rows


def _config_text(config: dict) -> str:
    return " ".join(f"{k.replace('BLOCK_', '').lower()}{v}" if k.startswith("BLOCK") else
                    f"{k.replace('num_', '')[0]}{v}" for k, v in config.items())


def _line(r: dict) -> str:
    us = f"{r['us']:.1f} us" if "us" in r else r["status"]
    return f"{r['kernel']} {r['shape']} {_config_text(r['config'])} split={r['split']}: {us}"


def report(rows: List[dict]) -> str:
    lines = []
    for (kernel, shape), group in itertools.groupby(rows, key=lambda r: (r["kernel"], r["shape"])):
        group = sorted(group, key=lambda r: r.get("us", math.inf))
        lines += [f"### {kernel} at {shape} ({group[0]['dims']})", "",
                  "| config | split | us | speedup vs shipped | max error | status |", "|---|---|---|---|---|---|"]
        for r in group:
            cells = [_config_text(r["config"]) + (" (shipped)" if r["shipped"] else ""), str(r["split"]),
                     f"{r['us']:.1f}" if "us" in r else "", f"{r['speedup']:.2f}" if "speedup" in r else "",
                     f"{r['error']:.3g}" if "error" in r else "", r["status"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="FWD,BWD_Q,BWD_KV", help="comma list out of FWD, BWD_Q, BWD_KV")
    p.add_argument("--shapes", help=f"comma list out of {','.join(SHAPES)} (default {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtype", choices=("bf16", "fp16"),
                   help="default bf16; fp16 on CPU (the interpreter's tl.dot cannot do bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=0, help="only the first N candidates per kernel (0: all)")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; candidates after it are listed as not run (0: no limit)")
    p.add_argument("--out", help="also write OUT.jsonl and OUT.md")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("fp16" if args.device.type == "cpu" else "bf16")]
    selected = args.kernels.split(",")
    if set(selected) - {"FWD", "BWD_Q", "BWD_KV"}:
        raise SystemExit(f"--kernels: unknown {sorted(set(selected) - {'FWD', 'BWD_Q', 'BWD_KV'})}")
    if args.device.type == "cpu":  # the interpreter: one tiny shape, two candidates
        shapes: Dict[str, tuple] = {"smoke": (1, 2, 9, 48)}
        args.limit, args.rep_ms = args.limit or 2, min(args.rep_ms, 1)
    else:
        names = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES
        if set(names) - set(SHAPES):
            raise SystemExit(f"--shapes: unknown {sorted(set(names) - set(SHAPES))}; choose from {list(SHAPES)}")
        shapes = {n: SHAPES[n] for n in names}
    args.deadline = time.monotonic() + (args.time_budget or math.inf)
    env = common.environment(args.device)
    rows = [r for kernel in selected for name, shape in shapes.items() for r in tune(kernel, name, shape, args)]
    text = (f"# bench.tune: {env['device']}, {env['date']}, torch {env['torch']}, triton {env['triton']}, "
            f"git {env['git']}\n\n"
            + report(rows))
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{args.out}.jsonl", "w") as f:
            f.write(json.dumps(env) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in rows)
        Path(f"{args.out}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
