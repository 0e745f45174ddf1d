"""Tile configs of the Triton attention kernels, timed on the GPU: which to ship.

    python -m bench.tune                                 # every tunable at its default shapes, bf16
    python -m bench.tune --tunables attention.FWD --shapes deit_small_224 --out out/tune

A tunable is a set of module constants of one kernel file that its host code reads at each call:
  - attention.FWD, attention.BWD_Q, attention.BWD_KV (kernels/attention.py): one kernel's tile
    dict each, 16 candidates, and for head dims that are not a power of two each with one masked
    block and with split blocks (SPLIT_HEAD_DIM). The shipped ones are this sweep's fastest on an
    H100 (2026-11-26, bench/results/2026-11-26-nvidia-h100-tune.md).
  - class_attention.fwd, class_attention.bwd (kernels/class_attention.py): the tile size, warps
    and programs per SM that set the key-axis split, and the K/V tiles in flight (STAGES: 1 is
    no pipeline), 20 candidates each.
  - talking_heads.tc_fwd, talking_heads.tc_bwd (kernels/talking_heads.py): TC_TILES, the
    tensor-core kernels' row tiles, warps (16 first: 128 registers, twice the warps an SM) and
    pipeline stages, head dim 48 as 32 + 16 or one masked block (SPLIT_HEAD_DIM), 9 candidates
    each with the shipped one; the forward capped at 128 registers (TC_FWD_MAXNREG: two CTAs per
    SM), the backward's dq kernel alone at 16 warps (TC_DQ_WARPS) and its dk and dv in one launch
    or two (FUSED_DKDV); the shipped ones were chosen from SASS counts, registers and shared
    memory, never timed.
  - talking_heads.chunked_fwd, talking_heads.chunked_bwd (kernels/talking_heads_chunked.py, the
    STRATEGY "chunked" path): the row groups a mixing program loops over (GROUPS_PER_PROGRAM:
    2, 8, 16, 1), its GEMMs' tiles and warps (GEMM_TILES, 12 candidates) and its chunk size
    (CHUNK_BUDGET: 1, 4 and 4.5, which gives one forward chunk at N = 196), never timed.
  - layerscale.ln_fwd, layerscale.ln_bwd (kernels/layerscale.py): the residual + LayerNorm's
    elements per program tile (in the forward also smaller ones at 2 and 4 warps: LN_FWD_WARPS),
    and in the backward the row strips (BWD_PROGRAMS, which the plain layerscale backward
    shares) that set how many programs stream rows and write column partials, and the tiles in
    flight per strip (BWD_STAGES: 1 is no pipeline): 8 and 18 candidates. An H100 (2026-11-26) ran the backward, then unpipelined, at 29-42 % of the HBM
    roofline, half the CUDA kernel's speed.
For each candidate it sets the constants, checks the outputs against an fp32 reference (error at
most twice the shipped config's plus a floor, the FlashAttention rule of tests/ops), times the
kernel module's own forward or backward (the backward times all its kernels, so a candidate of
one backward kernel runs beside the shipped other), and restores the shipped constants. It
prints, per tunable and shape, the candidates by time with the shipped one marked; one that does
not compile or run (shared memory, registers) is listed with its error.

Timing: triton.testing.do_bench (median, L2 flushed) of the kernel module's call, not the op: no
autograd or checks. At these shapes one call's GPU time is several times the host's, so the
queue stays full and the time is the GPU's.
Shipping a candidate: edit the constants in the kernel file; the AOT tier (tests/aot) then checks
that it compiles at sm_90 without spills.
On CPU it runs one tiny shape and two candidates per tunable under the interpreter (fp16: the
interpreter's tl.dot cannot do bf16): a test of the plumbing.
"""
import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional

import torch

from bench import common  # first: turns the interpreter on when there is no GPU
from bench.ops import attention as attention_bench
from bench.ops import class_attention as class_attention_bench
from bench.ops import layerscale as layerscale_bench
from bench.ops import talking_heads as talking_heads_bench
from deit_fast.kernels import attention as attention_kernels
from deit_fast.kernels import class_attention as class_attention_kernels
from deit_fast.kernels import layerscale as layerscale_kernels
from deit_fast.kernels import talking_heads as talking_heads_kernels
from deit_fast.kernels import talking_heads_chunked as chunked_kernels
from deit_fast.ops import reference

TOLERANCE_FLOOR = 1e-3


@dataclasses.dataclass
class Op:
    """One kernel file's op: its inputs at a shape, its fp32 reference (out, grads...), and the
    module's forward and backward on those inputs."""
    module: ModuleType
    shapes: Dict[str, tuple]
    default_shapes: tuple
    inputs: Callable[[tuple, torch.dtype, torch.device], tuple]  # -> (q, k, v, do)
    reference_fn: Callable
    smoke_shape: tuple

    def scale(self, shape: tuple):
        return shape[3] ** -0.5  # (B, H, N, D): the softmax scale

    def forward(self, q, k, v, do, scale):
        return self.module.forward(q, k, v, scale)

    def backward(self, inputs, saved, scale):
        """saved: what forward returned (o, lse)."""
        q, k, v, do = inputs
        return self.module.backward(do, q, k, v, *saved, scale)

    def reference(self, q, k, v, do, scale):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        o = self.reference_fn(*leaves, scale)
        return (o.detach(), *torch.autograd.grad(o, leaves, do.float()))


class ClassAttentionOp(Op):
    def backward(self, inputs, saved, scale):
        """saved: (o, lse, o in fp32); the backward takes the fp32 one."""
        q, k, v, do = inputs
        _, lse, out_f32 = saved
        return self.module.backward(do, q, k, v, out_f32, lse, scale)


class TalkingHeadsOp(Op):
    """Inputs (q, k, v, do, w_l, b_l, w_w, b_w): the fp32 head-mixing weights after dO. The
    kernels ignore b_l (its grad is zero), so the reference's grads leave it out too."""

    def forward(self, q, k, v, do, w_l, b_l, w_w, b_w, scale):
        return self.module.forward(q, k, v, w_l, w_w, b_w, scale)

    def backward(self, inputs, saved, scale):
        q, k, v, do, w_l, _, w_w, b_w = inputs
        return self.module.backward(do, q, k, v, w_l, w_w, b_w, saved[1], scale)

    def reference(self, q, k, v, do, w_l, b_l, w_w, b_w, scale):
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v, w_l, w_w, b_w)]
        o = self.reference_fn(*leaves[:4], b_l, *leaves[4:], scale)
        return (o.detach(), *torch.autograd.grad(o, leaves, do.float()))


class ResidualLayerNormOp(Op):
    """Inputs (x, y, gamma, drop-path scale, weight, bias, dout, dnormed) at (B, N, C): x fp32 and
    y in the tuned dtype (timm's residual stream under autocast), fp32 parameters; the scale is
    keep[b] / KEEP_PROB, as the op layer passes it. forward gives (normed, (out, mean, rstd)), in
    the (output, saved) pair measure() expects."""
    EPS, KEEP_PROB = 1e-6, 0.9  # DeiT's drop path 0.1

    def scale(self, shape: tuple):
        return None

    def forward(self, x, y, gamma, keep, weight, bias, dout, dnormed, scale):
        out, normed, mean, rstd = self.module.residual_layernorm_forward(
            x, y, gamma, keep, weight, bias, self.EPS, torch.float32)
        return normed, (out, mean, rstd)

    def backward(self, inputs, stats, scale):
        x, y, gamma, keep, weight, bias, dout, dnormed = inputs
        out, mean, rstd = stats[1]
        return self.module.residual_layernorm_backward(dout, dnormed, out, y, gamma, keep, weight,
                                                       mean, rstd, x.dtype)

    def reference(self, x, y, gamma, keep, weight, bias, dout, dnormed, scale):
        leaves = [t.detach().float().requires_grad_() for t in (x, y, gamma, weight, bias)]
        out, normed = reference.layerscale_residual_layernorm(*leaves, self.EPS, keep > 0,
                                                              self.KEEP_PROB)
        return (normed.detach(), *torch.autograd.grad((out, normed), leaves, (dout, dnormed)))


def _residual_layernorm_inputs(shape, dtype, device):
    B, N, C = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    def t(*s, dt=torch.float32, std=1.0):  # noqa: E306
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dt)
    kp = ResidualLayerNormOp.KEEP_PROB
    keep = (torch.rand(B, generator=g) < kp).float().to(device) / kp
    return (t(B, N, C), t(B, N, C, dt=dtype), t(C, std=0.1), keep, 1 + t(C, std=0.1), t(C, std=0.1),
            t(B, N, C), t(B, N, C))


def _projection_views(B, N, H, D, parts, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    packed = torch.randn(B, N, parts, H, D, generator=g).to(device=device, dtype=dtype)
    return packed.permute(2, 0, 3, 1, 4).unbind(0), g


def _attention_inputs(shape, dtype, device):
    """q, k, v as the strided views of one (B, N, 3, H, D) projection, as the models pass them."""
    B, H, N, D = shape
    (q, k, v), g = _projection_views(B, N, H, D, 3, dtype, device)
    return q, k, v, torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)


def _class_attention_inputs(shape, dtype, device):
    """q (B, H, 1, D) transposed from (B, 1, H, D), k and v views of a (B, N, 2, H, D) projection,
    as timm's ClassAttn makes them."""
    B, H, N, D = shape
    (k, v), g = _projection_views(B, N, H, D, 2, dtype, device)
    q = torch.randn(B, 1, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    return q, k, v, torch.randn(B, H, 1, D, generator=g).to(device=device, dtype=dtype)


def _talking_heads_inputs(shape, dtype, device):
    """q, k, v views of one (B, N, 3, H, D) projection, dO, and CaiT-like fp32 mixing weights."""
    H = shape[1]
    q, k, v, do = _attention_inputs(shape, dtype, device)
    return (q, k, v, do, *talking_heads_bench.mixing(H, device, torch.Generator().manual_seed(1)))


OPS = {
    "attention": Op(attention_kernels, attention_bench.SHAPES, ("deit_small_224", "d48_h8_n197"),
                    _attention_inputs, reference.attention, (1, 2, 9, 48)),
    "class_attention": ClassAttentionOp(class_attention_kernels, class_attention_bench.SHAPES,
                          ("cait_s_224", "cait_xxs_224"), _class_attention_inputs,
                          reference.class_attention, (1, 2, 9, 48)),
    "talking_heads": TalkingHeadsOp(talking_heads_kernels, talking_heads_bench.SHAPES,
                                    ("cait_s_224", "cait_xxs_224"), _talking_heads_inputs,
                                    reference.talking_heads_attention, (1, 8, 9, 48)),
    "talking_heads_chunked": TalkingHeadsOp(chunked_kernels, {k: v for k, v in talking_heads_bench.SHAPES.items()
                                                              if v[2] <= chunked_kernels.MAX_KEYS},
                                            ("cait_s_224", "cait_xxs_224"), _talking_heads_inputs,
                                            reference.talking_heads_attention, (1, 8, 9, 48)),
    "layerscale": ResidualLayerNormOp(layerscale_kernels, layerscale_bench.SHAPES,
                                      ("deit_tiny_224", "deit_small_224"), _residual_layernorm_inputs,
                                      None, (2, 9, 96)),
}


def _attention_grid(kernel: str) -> List[dict]:
    if kernel == "BWD_KV":  # the key tile (BLOCK_N) owns dk, dv and loops over query tiles
        tiles = [dict(BLOCK_M=m, BLOCK_N=n) for n in (64, 128) for m in (32, 64)]
    else:  # the query tile (BLOCK_M) owns o or dq and loops over key tiles
        tiles = [dict(BLOCK_M=m, BLOCK_N=n) for m in (64, 128) for n in (32, 64)]
    return [{kernel: dict(t, num_warps=w, num_stages=s)} for t in tiles for w in (4, 8) for s in (2, 3)]


def _class_attention_grid(tile: str) -> List[dict]:
    return [{tile: t, "NUM_WARPS": w, "PROGRAMS_PER_SM": p}
            for t in (2048, 4096, 8192) for w in (4, 8) for p in (2, 4, 8)] + \
        [{"STAGES": s} for s in (1, 2)]


def _talking_heads_grid() -> List[dict]:
    """Around the shipped tiles: one change at a time (each candidate compiles three kernels)."""
    shipped = talking_heads_kernels.TC_TILES
    # 16 warps first: twice the warps an SM at 128 registers (kernels/talking_heads.py, TC_DQ_WARPS)
    changes = [dict(num_warps=16), dict(num_stages=1), dict(num_stages=3), dict(num_warps=4),
               dict(BLOCK_M=32), dict(BLOCK_N=32), dict(BLOCK_M=32, num_stages=1)]
    return [{"TC_TILES": dict(shipped, **c)} for c in changes] + \
        [{"SPLIT_HEAD_DIM": not talking_heads_kernels.SPLIT_HEAD_DIM}]


def _talking_heads_fwd_grid() -> List[dict]:
    """The tiles' grid, and the forward capped at 128 registers: two CTAs per SM (TC_FWD_MAXNREG)."""
    return _talking_heads_grid() + [{"TC_FWD_MAXNREG": 128}]


def _talking_heads_bwd_grid() -> List[dict]:
    """The tiles' grid, 16 warps for the dq kernel alone (TC_DQ_WARPS: the fused dk/dv kernel
    takes 120 bytes of stack at 16 under triton 3.6), 16 warps everywhere with dk and dv in two
    launches (each alone has no stack at 16 warps: 128 registers, 3.6 and 3.8, sm_90, bf16, head
    dim 32 + 16; but 261 + 214 SASS a tile against the fused kernel's 341), and dk and dv in two
    launches at the shipped warps (FUSED_DKDV)."""
    grid = _talking_heads_grid()
    wide = {"TC_TILES": dict(talking_heads_kernels.TC_TILES, num_warps=16), "FUSED_DKDV": False}
    return grid[:1] + [{"TC_DQ_WARPS": 16}, wide] + grid[1:] + \
        [{"FUSED_DKDV": not talking_heads_kernels.FUSED_DKDV}]


def _chunked_grid() -> List[dict]:
    """The chunked strategy's row groups a mixing program loops over (GROUPS_PER_PROGRAM, first:
    new on 2026-11-28), its GEMM tiles (its six products), and its chunk size through
    CHUNK_BUDGET (the N x N buffers' bytes over q's)."""
    tiles = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=3)
             for m, n in ((64, 64), (128, 64), (128, 128)) for k in (16, 32) for w in (4, 8)]
    # 4.5: one forward chunk at CaiT's N = 196 up to batch 256 (a third of the launches)
    return [{"GROUPS_PER_PROGRAM": g} for g in (2, 8, 16, 1)] + [{"GEMM_TILES": t} for t in tiles] + \
        [{"CHUNK_BUDGET": b} for b in (1.0, 4.0, 4.5)]


def _layernorm_grid(direction: str) -> List[dict]:
    if direction == "fwd":
        return [{"LN_FWD_TILE": t} for t in (1024, 2048, 4096, 8192)] + \
            [{"LN_FWD_TILE": t, "LN_FWD_WARPS": w} for t, w in ((256, 2), (512, 2), (512, 4), (1024, 4))]
    return [{"LN_BWD_TILE": t, "BWD_PROGRAMS": p} for t in (1024, 2048, 4096)
            for p in (512, 1024, 2048, 4096, 8192)] + [{"BWD_STAGES": s} for s in (1, 2, 4)]


@dataclasses.dataclass
class Tunable:
    op: str
    direction: str  # "fwd" or "bwd"
    grid: List[dict]  # candidates: module constant -> value
    split: bool = False  # also try SPLIT_HEAD_DIM both ways at non-power-of-two head dims

    def candidates(self, head_dim: int) -> List[dict]:
        """The shipped constants first, then the grid's other candidates (each also split, where
        that applies)."""
        module = OPS[self.op].module
        names = sorted({name for c in self.grid for name in c})
        shipped = {name: getattr(module, name) for name in names}
        cands = [shipped] + [c for c in self.grid if c != {n: shipped[n] for n in c}]
        if self.split and head_dim & (head_dim - 1):
            return [dict(c, SPLIT_HEAD_DIM=s) for s in (module.SPLIT_HEAD_DIM, not module.SPLIT_HEAD_DIM)
                    for c in cands]
        return cands


TUNABLES = {  # in the order a time-capped run reaches them: the least measured first
    "talking_heads.chunked_fwd": Tunable("talking_heads_chunked", "fwd", _chunked_grid()),
    "talking_heads.chunked_bwd": Tunable("talking_heads_chunked", "bwd", _chunked_grid()),
    "talking_heads.tc_fwd": Tunable("talking_heads", "fwd", _talking_heads_fwd_grid()),
    "talking_heads.tc_bwd": Tunable("talking_heads", "bwd", _talking_heads_bwd_grid()),
    "layerscale.ln_bwd": Tunable("layerscale", "bwd", _layernorm_grid("bwd")),
    "layerscale.ln_fwd": Tunable("layerscale", "fwd", _layernorm_grid("fwd")),
    "class_attention.fwd": Tunable("class_attention", "fwd", _class_attention_grid("FWD_TILE")),
    "class_attention.bwd": Tunable("class_attention", "bwd", _class_attention_grid("BWD_TILE")),
    "attention.FWD": Tunable("attention", "fwd", _attention_grid("FWD"), split=True),
    "attention.BWD_Q": Tunable("attention", "bwd", _attention_grid("BWD_Q"), split=True),
    "attention.BWD_KV": Tunable("attention", "bwd", _attention_grid("BWD_KV"), split=True),
}


def _error(got, want) -> float:
    return max((g.float() - w).abs().max().item() for g, w in zip(got, want))


def measure(tunable: Tunable, candidate: dict, inputs: tuple, want: tuple, scale: float,
            shipped_error: Optional[float], args) -> dict:
    """One candidate: checked, then timed; the module's constants are the shipped ones again after."""
    op = OPS[tunable.op]
    row = dict(candidate=candidate)
    saved = {name: getattr(op.module, name) for name in candidate}
    for name, value in candidate.items():
        setattr(op.module, name, value)
    try:
        if tunable.direction == "fwd":
            call, want = (lambda: op.forward(*inputs, scale)[0]), want[:1]
        else:
            stats = op.forward(*inputs, scale)
            call, want = (lambda: op.backward(inputs, stats, scale)), want[1:]
        got = call()
        row["error"] = _error(got if isinstance(got, tuple) else (got,), want)
        if shipped_error is not None and row["error"] > 2 * shipped_error + TOLERANCE_FLOOR:
            row["status"] = f"wrong: error {row['error']:.3g} vs shipped {shipped_error:.3g}"
            return row
        row["us"] = common.time_us(common.Timed(call), args.device, args.warmup_ms, args.rep_ms)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  (a candidate that does not fit is a result, not a crash)
        row["status"] = f"failed: {type(e).__name__}: {str(e).strip()[:200]}"
    finally:
        for name, value in saved.items():
            setattr(op.module, name, value)
    return row


def tune(name: str, shape_name: str, shape: tuple, args) -> List[dict]:
    tunable = TUNABLES[name]
    op = OPS[tunable.op]
    inputs = op.inputs(shape, args.dtype, args.device)
    scale = op.scale(shape)
    want = op.reference(*inputs, scale)
    cands = tunable.candidates(shape[-1])[:args.limit or None]
    rows, shipped_error = [], None
    for i, candidate in enumerate(cands):
        if time.monotonic() > args.deadline:
            row = dict(candidate=candidate, status="not run (time budget)")
        else:
            row = measure(tunable, candidate, inputs, want, scale, shipped_error, args)
        row.update(tunable=name, shape=shape_name, dims="x".join(map(str, shape)), shipped=i == 0)
        if i == 0:
            shipped_error = row.get("error")
        rows.append(row)
        print(_line(row), flush=True)
    base = rows[0].get("us")
    for r in rows:
        if base and "us" in r:
            r["speedup"] = base / r["us"]
    return rows


def _value_text(value) -> str:
    if isinstance(value, dict):  # a kernel's tile dict
        return " ".join(f"{k.replace('BLOCK_', '').lower()}{v}" if k.startswith("BLOCK") else
                        f"{k.replace('num_', '')[0]}{v}" if k.startswith("num_") else f"{k}{v}"
                        for k, v in value.items())
    return str(value)


def _candidate_text(candidate: dict) -> str:
    return ", ".join(f"{name}={_value_text(value)}" for name, value in candidate.items())


def _line(r: dict) -> str:
    us = f"{r['us']:.1f} us" if "us" in r else r["status"]
    return f"{r['tunable']} {r['shape']} {_candidate_text(r['candidate'])}: {us}"


def report(rows: List[dict]) -> str:
    lines = []
    for (name, shape), group in itertools.groupby(rows, key=lambda r: (r["tunable"], r["shape"])):
        group = sorted(group, key=lambda r: r.get("us", math.inf))
        lines += [f"### {name} at {shape} ({group[0]['dims']})", "",
                  "| candidate | us | speedup vs shipped | max error | status |", "|---|---|---|---|---|"]
        for r in group:
            cells = [_candidate_text(r["candidate"]) + (" (shipped)" if r["shipped"] else ""),
                     f"{r['us']:.1f}" if "us" in r else "", f"{r['speedup']:.2f}" if "speedup" in r else "",
                     f"{r['error']:.3g}" if "error" in r else "", r["status"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tunables", default=",".join(TUNABLES), help=f"comma list out of {', '.join(TUNABLES)}")
    p.add_argument("--shapes", help="comma list of the ops' bench shapes (default: two per op)")
    p.add_argument("--dtype", choices=("bf16", "fp16"),
                   help="default bf16; fp16 on CPU (the interpreter's tl.dot cannot do bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=0, help="only the first N candidates per tunable (0: all)")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; candidates after it are listed as not run (0: no limit)")
    p.add_argument("--out", help="also write OUT.jsonl and OUT.md")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("fp16" if args.device.type == "cpu" else "bf16")]
    selected = args.tunables.split(",")
    if set(selected) - set(TUNABLES):
        raise SystemExit(f"--tunables: unknown {sorted(set(selected) - set(TUNABLES))}; choose from {list(TUNABLES)}")
    if args.shapes and args.device.type != "cpu":
        unknown = set(args.shapes.split(",")) - {s for op in OPS.values() for s in op.shapes}
        if unknown:
            raise SystemExit(f"--shapes: unknown {sorted(unknown)}")
    if args.device.type == "cpu":  # the interpreter: one tiny shape, two candidates
        args.limit, args.rep_ms = args.limit or 2, min(args.rep_ms, 1)
    plan = []  # (tunable, shape name, shape): each tunable at its op's shapes among --shapes
    for name in selected:
        op = OPS[TUNABLES[name].op]
        if args.device.type == "cpu":
            shapes = {"smoke": op.smoke_shape}
        else:
            names = [s for s in args.shapes.split(",") if s in op.shapes] if args.shapes else op.default_shapes
            shapes = {s: op.shapes[s] for s in names}
        plan += [(name, s, shape) for s, shape in shapes.items()]
    args.deadline = time.monotonic() + (args.time_budget or math.inf)
    env = common.environment(args.device)
    rows = [r for name, s, shape in plan for r in tune(name, s, shape, args)]
    text = (f"# bench.tune: {env['device']}, {env['date']}, torch {env['torch']}, triton {env['triton']}, "
            f"git {env['git']}\n\n" + report(rows))
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{args.out}.jsonl", "w") as f:
            f.write(json.dumps(env) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in rows)
        Path(f"{args.out}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
