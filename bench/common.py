"""Shared benchmark machinery (DESIGN.md section 7): timing, peaks, rows, writers.

A bench module (bench/ops/<op>.py, bench/models.py) lists its cases and writes one setup
function; run() times every case x impl x direction, streams rows to <out>.jsonl, then rewrites it
with speedups and writes <out>.md and a bar chart, <out>.svg (bench/plot.py). On CUDA the timer
is triton.testing.do_bench (median, L2 flushed before every call); on CPU a perf_counter loop
stands in, so every script smoke-tests here.

On CUDA each row is timed twice: eagerly ("us"), as a user's loop runs it, and replayed from a
CUDA graph ("graph us"), which is the GPU's time alone. An eager call also waits for its host
work (Python, dispatch, launches) whenever that is slower than its kernels: on the H200 of
2026-11-26 every small op was, ours and the baselines alike. Targets are judged on both.
"""
import argparse
import dataclasses
import datetime
import gc
import importlib
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench import plot

# Without a GPU the Triton kernels run in the interpreter, which must be on before triton.jit
# decorates them, i.e. before deit_fast is imported: every bench imports this module first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --dtypes names
# What the H100 of these machines measured (.library/device/KINDS.md, 2026-11-13): an 8192^3 bf16
# matmul on random data, and a large device-to-device copy counting bytes read plus written.
H100_PEAK_TFLOPS = 798.0
H100_PEAK_GBPS = 3000.0
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Case:
    op: str
    shape: Tuple[int, ...]
    dtype: str
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.dtype}"


@dataclasses.dataclass
class Timed:
    """One unit of work to time: fn() does it once."""
    fn: Callable[[], object]
    bytes: int = 0  # the fewest bytes it must move through memory (each input read, output written once)
    flops: int = 0
    items: int = 0  # images per call (models): gives img/s and MFU
    grad_to_none: Sequence[torch.Tensor] = ()  # leaves whose .grad is cleared before each call


@dataclasses.dataclass
class Impl:
    baseline: bool  # speedups are measured against the best baseline
    unavailable: Optional[str] = None  # why it cannot run here, or None


class Unavailable(Exception):
    """Raised by a setup when its impl cannot run this case here (a backend that rejects the
    shape or dtype): the row says `unavailable: <message>` instead of an error."""


# A setup returns, per direction, a thunk that allocates the inputs and returns what to time:
# allocation happens inside the runner's error handling, one direction at a time.
Setup = Callable[[Case, str, argparse.Namespace], Dict[str, Callable[[], Timed]]]


def parser(description: str, impls: Sequence[str], warmup_ms: float, rep_ms: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions; on CPU tiny shapes (smoke test)")
    p.add_argument("--impls", default=",".join(impls), help=f"comma list out of {','.join(impls)}")
    p.add_argument("--out", help="output prefix for .jsonl and .md (default out/<bench>)")
    p.add_argument("--time-budget", type=float,
                   help="seconds; cases after the first not started by then are listed as not run")
    p.add_argument("--warmup-ms", type=float, default=warmup_ms)
    p.add_argument("--rep-ms", type=float, default=rep_ms)
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, also time each call replayed from a CUDA graph (default: on)")
    p.add_argument("--peak-tflops", help="roofline FLOP rate: a number or 'measured' "
                   f"(default {H100_PEAK_TFLOPS:g} on an H100, else measured)")
    p.add_argument("--peak-gbps", help="roofline bandwidth in GB/s: a number or 'measured' "
                   f"(default {H100_PEAK_GBPS:g} on an H100, else measured)")
    return p


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.quick:  # a quarter of the warm-up and repetitions; the CPU loop still takes 3 samples
        args.warmup_ms, args.rep_ms = args.warmup_ms / 4, args.rep_ms / 4
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # a missing module is worth a line in the report, not a crash
        return f"unavailable ({type(e).__name__})"


def environment(device: torch.device) -> dict:
    """What every result file starts with: when, on what, with which software."""
    # DEIT_FAST_COMMIT first: a copy of the tree (the GPU machine's) can carry a stale .git.
    commit = os.environ.get("DEIT_FAST_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                          text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "timm": _version("timm"), "git": commit or "unknown",
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), "argv": sys.argv[1:]}


def time_us(t: Timed, device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median microseconds of t.fn()."""
    grads = list(t.grad_to_none)
    if device.type == "cuda":
        import triton.testing
        return 1e3 * triton.testing.do_bench(t.fn, warmup=warmup_ms, rep=rep_ms,
                                             grad_to_none=grads or None, return_mode="median")
    samples: List[float] = []
    end = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 3 or time.perf_counter() < end:  # a median needs a few samples
        for g in grads:
            g.grad = None
        start = time.perf_counter()
        t.fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def probe(t: Timed, device: torch.device) -> Tuple[float, Optional[float]]:
    """One synchronised call: its milliseconds, and on CUDA the MiB it allocated on top of what
    was already there (inputs, weights)."""
    for g in t.grad_to_none:
        g.grad = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    t.fn()
    if cuda:
        torch.cuda.synchronize(device)
    ms = 1e3 * (time.perf_counter() - start)
    return ms, (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None


def graph_us(thunk: Callable[[], Timed], device: torch.device, warmup_ms: float, rep_ms: float) -> float:
    """Median microseconds of one call replayed from a CUDA graph: the GPU's time, without the
    host's. The thunk builds its inputs again on a side stream, which then captures the call:
    autograd runs a backward on its forward's stream, so the bwd direction's graphs must be
    made on the capturing stream too."""
    import triton.testing
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        t = thunk()
        for _ in range(3):  # warm-up off the default stream, as torch.cuda.graph asks
            clear_grads(t)
            t.fn()
        clear_grads(t)  # the captured backward then allocates its grads in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            t.fn()
    torch.cuda.current_stream(device).wait_stream(side)
    try:
        return 1e3 * triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    finally:
        del graph, t


def clear_grads(t: Timed) -> None:
    for g in t.grad_to_none:
        g.grad = None


def rotation(set_bytes: int, device: torch.device) -> int:
    """How many input sets to cycle through so consecutive calls never find theirs in L2 (do_bench
    also flushes L2; the CPU loop does not)."""
    cache = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 64 << 20
    return max(2, min(8, math.ceil(2 * cache / max(set_bytes, 1))))


def rotating(sets: Sequence[tuple], fn: Callable) -> Callable[[], object]:
    """A no-argument callable that applies fn to the next input set on each call."""
    cycle = itertools.cycle(sets)
    return lambda: fn(*next(cycle))


def directions(call: Callable, leaves: Callable, sets: int, douts: Callable, fwd_bytes: int,
               bwd_bytes: int, fwd_flops: int = 0, bwd_flops: int = 0) -> Dict[str, Callable[[], Timed]]:
    """An op bench's setup thunks for "fwd", "bwd" and "fwd+bwd", over `sets` input sets.

    call(*inputs) -> a tensor or a tuple of tensors; leaves(grad) -> the inputs (those to
    differentiate requiring grad when grad); douts() -> the upstream grads of one call's outputs
    (None for a scalar loss). fwd runs under no_grad; bwd replays one backward of graphs built
    once per set (retain_graph); fwd+bwd runs both.
    """
    def fwd():
        return Timed(rotating([leaves(False) for _ in range(sets)], torch.no_grad()(call)),
                     fwd_bytes, fwd_flops)

    def bwd():
        graphs = []  # forward once per input set; each timed call replays one backward
        for _ in range(sets):
            inputs = leaves(True)
            graphs.append((call(*inputs), douts(), inputs))
        return Timed(rotating(graphs, lambda out, d, _: torch.autograd.backward(out, d, retain_graph=True)),
                     bwd_bytes, bwd_flops, grad_to_none=[t for g in graphs for t in g[2]])

    def fwd_bwd():
        sets_ = [(leaves(True), douts()) for _ in range(sets)]
        return Timed(rotating(sets_, lambda inputs, d: torch.autograd.backward(call(*inputs), d)),
                     fwd_bytes + bwd_bytes, fwd_flops + bwd_flops,
                     grad_to_none=[t for inputs, _ in sets_ for t in inputs])

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def measure_peaks(device: torch.device) -> dict:
    """A large copy (bytes read + written) and a large bf16 matmul, on random data."""
    cuda = device.type == "cuda"
    n = 1 << (28 if cuda else 24)  # 1 GiB of fp32 on the GPU: far past L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = Timed(lambda: dst.copy_(src))
    copy_us = time_us(copy, device, 10, 100 if cuda else 50)
    m = 8192 if cuda else 1024
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    mm_us = time_us(Timed(lambda: a @ b), device, 10, 100 if cuda else 50)
    return {"copy_gbps": 2 * src.nbytes / copy_us / 1e3, "matmul_tflops": 2 * m**3 / mm_us / 1e6}


def resolve_peaks(args, device: torch.device, measured: dict) -> Tuple[float, float]:
    on_h100 = device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)

    def pick(arg, nominal, measured_value):
        if arg is None:
            return nominal if on_h100 else measured_value
        return measured_value if arg == "measured" else float(arg)
    return (pick(args.peak_tflops, H100_PEAK_TFLOPS, measured["matmul_tflops"]),
            pick(args.peak_gbps, H100_PEAK_GBPS, measured["copy_gbps"]))


def add_speedups(rows: List[dict]) -> None:
    """speedup = best baseline time / this time, within each (op, shape, dtype, direction); the
    same from the graph replays as graph_speedup."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["direction"])  # noqa: E731
    for us, speedup in (("us", "speedup"), ("graph_us", "graph_speedup")):
        best: Dict[tuple, float] = {}
        for r in rows:
            if r.get("baseline") and r.get(us):
                best[key(r)] = min(best.get(key(r), math.inf), r[us])
        for r in rows:
            if r.get(us) and key(r) in best:
                r[speedup] = best[key(r)] / r[us]


GRAPH_FIELDS = ("us", "tflops", "gbps", "pct_roofline", "img_s", "mfu_pct", "speedup")


def graph_view(rows: List[dict]) -> List[dict]:
    """The rows as the CUDA-graph replays measured them (us and what derives from it), for
    judging targets on GPU time; a row without a replay has no us there."""
    return [{**r, **{k: r.get("graph_" + k) for k in GRAPH_FIELDS}} for r in rows]


def _row(case: Case, impl: str, direction: str, baseline: bool) -> dict:
    return {"op": case.op, "shape": "x".join(map(str, case.shape)), "dtype": case.dtype,
            "direction": direction, "impl": impl, "baseline": baseline}


def _rates(row: dict, t: Timed, us: float, peaks: Tuple[float, float], prefix: str = "") -> None:
    peak_tflops, peak_gbps = peaks
    if t.flops:
        row[prefix + "tflops"] = t.flops / us / 1e6
    if t.bytes:  # memory-bound ops: how close to the slower of the two ceilings
        row[prefix + "gbps"] = t.bytes / us / 1e3
        floor_us = max(t.flops / peak_tflops / 1e6, t.bytes / peak_gbps / 1e3)
        row[prefix + "pct_roofline"] = 100 * floor_us / us
    if t.items:  # models: img/s and model FLOPs utilisation
        row[prefix + "img_s"] = t.items / us * 1e6
        row[prefix + "mfu_pct"] = 100 * row.get(prefix + "tflops", 0.0) / peak_tflops


def _measure(row: dict, thunk: Callable[[], Timed], args, device, peaks: Tuple[float, float]) -> None:
    t = thunk()
    t.fn()  # warm-up: compilation, autotuning, lazy initialisation, the allocator
    call_ms, row["peak_mib"] = probe(t, device)
    # do_bench repeats for rep_ms, at least once: long calls (a model step) need a longer window.
    rep_ms = max(args.rep_ms, (3 if args.quick else 10) * call_ms)
    row["us"] = time_us(t, device, args.warmup_ms, rep_ms)
    _rates(row, t, row["us"], peaks)
    if device.type != "cuda" or not args.graph:
        return
    counts = dataclasses.replace(t, fn=None, grad_to_none=())
    del t  # the graph run builds its own inputs: free these first
    _free(device)
    try:
        row["graph_us"] = graph_us(thunk, device, args.warmup_ms, rep_ms)
        _rates(row, counts, row["graph_us"], peaks, "graph_")
    except Exception as e:  # a call that syncs the host cannot be captured: say so, keep the row
        row["graph_note"] = _error(e)


def verdict(ok: bool, interpreted: bool) -> str:
    """A target line's verdict; timings under the Triton interpreter say nothing about a GPU."""
    return "n/a, Triton interpreter" if interpreted else ("met" if ok else "MISSED")


def roofline_targets(rows: List[dict], interpreted: bool, ours: Sequence[str], want_pct: float,
                     baseline: str, want_ratio: float, baseline_name: str) -> List[str]:
    """A memory-bound op's target lines: per row of ours (every direction), its % of the
    bandwidth roofline and its speedup over the `baseline` impl, each against its target."""
    key = lambda r: (r["shape"], r["dtype"], r["direction"])  # noqa: E731
    base = {key(r): r["us"] for r in rows if r["impl"] == baseline and r.get("us")}
    lines = [f"### targets ({', '.join(ours)}): >= {want_pct:g} % of the bandwidth roofline, "
             f">= {want_ratio:g}x {baseline_name}", ""]
    for r in rows:
        if r["impl"] not in ours or not r.get("us"):
            continue
        pct, ratio = r.get("pct_roofline"), (base[key(r)] / r["us"] if key(r) in base else None)
        cells = [f"{pct:.3g} % of roofline ({verdict(pct >= want_pct, interpreted)})" if pct else "",
                 f"{ratio:.2f}x {baseline_name} ({verdict(ratio >= want_ratio, interpreted)})" if ratio else ""]
        lines.append(f"- {r['impl']} {r['shape']} {r['dtype']} {r['direction']}: "
                     f"{', '.join(c for c in cells if c) or f'no {baseline_name} row'}")
    return lines


def _qualified(fn: Callable) -> str:
    """module:name of a module-level function, the module's real name under `python -m`."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return f"{module}:{fn.__qualname__}"


def target_lines(header: dict, rows: List[dict], fn: Optional[Callable] = None) -> List[str]:
    """The bench's target verdicts (markdown lines), computed from rows by fn or else by the
    function the header names, so that bench.report recomputes them over merged files."""
    if fn is None:
        if not header.get("targets"):
            return []
        try:
            module, name = header["targets"].split(":")
            fn = getattr(importlib.import_module(module), name)
        except Exception as e:
            return [f"- targets: {header['targets']} did not import ({type(e).__name__}: {e})"]
    interpreted = header.get("triton_interpret") == "1"
    try:
        lines = list(fn(rows, interpreted))
        if any(r.get("graph_us") for r in rows):
            lines += ["", "#### the same targets on the CUDA-graph replays (GPU time, no host time)", ""]
            lines += list(fn(graph_view(rows), interpreted))
        return lines
    except Exception as e:
        return [f"- targets: {header.get('targets')} failed ({type(e).__name__}: {e})"]


def _error(e: BaseException) -> str:
    traceback.print_exc(limit=-4)  # the innermost frames say what broke
    return f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(bench: str, args, cases: Sequence[Case], impls: Dict[str, Impl], setup: Setup,
        extra_header: Optional[dict] = None,
        targets: Optional[Callable[[List[dict], bool], List[str]]] = None) -> List[dict]:
    """Time every case x available impl x direction; write <out>.jsonl, <out>.md and <out>.svg.

    targets(rows, interpreted) -> markdown lines: the bench's target verdicts, printed at the end,
    kept in the footer and under the .md's table (bench.report recomputes them from merged rows).
    """
    start = time.monotonic()
    device = torch.device(args.device)
    wanted = [i for i in args.impls.split(",") if i]
    unknown = set(wanted) - set(impls)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {sorted(impls)}")
    measured = measure_peaks(device)
    peaks = resolve_peaks(args, device, measured)
    header = {"type": "header", "bench": bench, **environment(device), "quick": args.quick,
              "peak_tflops": peaks[0], "peak_gbps": peaks[1], "measured": measured,
              "nominal_h100": {"tflops": H100_PEAK_TFLOPS, "gbps": H100_PEAK_GBPS},
              "skipped_impls": {i: impls[i].unavailable for i in wanted if impls[i].unavailable},
              **({"targets": _qualified(targets)} if targets else {}), **(extra_header or {})}
    out = Path(args.out or f"out/{bench}")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: List[dict] = []
    not_run: List[str] = []
    with open(f"{out}.jsonl", "w") as stream:  # streamed, so a killed run still leaves its rows
        stream.write(json.dumps(header) + "\n")

        def emit(row: dict) -> None:
            rows.append(row)
            stream.write(json.dumps({"type": "row", **row}) + "\n")
            stream.flush()
            print(_progress(row), flush=True)
        for i, case in enumerate(cases):
            if i and args.time_budget is not None and time.monotonic() - start > args.time_budget:
                not_run.append(case.label)
                continue
            for impl in (i for i in wanted if not impls[i].unavailable):
                baseline = impls[impl].baseline
                try:
                    thunks = setup(case, impl, args)
                except Exception as e:
                    thunks, failed = {}, _row(case, impl, "-", baseline)
                    failed["note"] = f"unavailable: {e}" if isinstance(e, Unavailable) else _error(e)
                    emit(failed)
                for direction, thunk in thunks.items():
                    row = _row(case, impl, direction, baseline)
                    try:
                        _measure(row, thunk, args, device, peaks)
                    except Exception as e:  # one failing impl (an OOM, a compile error) must not end the run
                        row["note"] = _error(e)
                    emit(row)
                del thunks
                _free(device)
    add_speedups(rows)
    footer = {"type": "footer", "elapsed_s": time.monotonic() - start, "not_run": not_run}
    lines = target_lines(header, rows, targets) if targets else []
    if lines:
        footer["targets"] = lines
    write_jsonl(f"{out}.jsonl", header, rows, footer)
    Path(f"{out}.md").write_text(markdown(header, rows, footer, lines))
    Path(f"{out}.svg").write_text(plot.svg(header, rows))
    print("\n".join(lines + [f"wrote {out}.jsonl, {out}.md and {out}.svg"]))
    return rows


def _progress(row: dict) -> str:
    what = f"{row['op']} {row['shape']} {row['dtype']} {row['direction']} {row['impl']}"
    return f"{what}: {row['us']:.1f} us" if "us" in row else f"{what}: {row.get('note')}"


def write_jsonl(path, header: dict, rows: List[dict], footer: dict) -> None:
    with open(path, "w") as f:
        for record in [header] + [{"type": "row", **r} for r in rows] + [footer]:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> Tuple[dict, List[dict], Optional[dict]]:
    """(header, rows, footer); footer is None when the run was killed before it finished."""
    header, rows, footer = {}, [], None
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        kind = record.pop("type", "row")
        if kind == "header":
            header = record
        elif kind == "footer":
            footer = record
        else:
            rows.append(record)
    return header, rows, footer


# Markdown columns in order; a column shows only when some row has it.
COLUMNS = [("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("direction", "dir"),
           ("impl", "impl"), ("us", "us"), ("img_s", "img/s"), ("tflops", "TFLOP/s"),
           ("gbps", "GB/s"), ("pct_roofline", "% roofline"), ("mfu_pct", "MFU %"),
           ("speedup", "speedup vs best baseline"), ("graph_us", "graph us"),
           ("graph_pct_roofline", "graph % roofline"), ("graph_speedup", "graph speedup"),
           ("peak_mib", "peak MiB"), ("note", "note"), ("graph_note", "graph note")]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/")


def markdown_table(rows: List[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        impl = r["impl"] + (" (baseline)" if r.get("baseline") else "")
        lines.append("| " + " | ".join(_cell(impl if k == "impl" else r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def markdown(header: dict, rows: List[dict], footer: Optional[dict],
             targets: Optional[List[str]] = None) -> str:
    """One bench's section: what ran where, the table (one line per row), then its target
    verdicts (targets, or recomputed from rows: see target_lines)."""
    m = header.get("measured", {})
    lines = [f"## {header['bench']}", "",
             f"- {header['date']} on {header['device']}; torch {header['torch']} (CUDA {header['cuda']}), "
             f"triton {header['triton']}, timm {header['timm']}, git {header['git']}",
             f"- roofline: {header['peak_tflops']:.4g} TFLOP/s, {header['peak_gbps']:.4g} GB/s; measured "
             f"here: {m.get('matmul_tflops', 0):.4g} TFLOP/s (bf16 matmul), "
             f"{m.get('copy_gbps', 0):.4g} GB/s (copy, read + write)",
             "- us: median per call; speedup: best baseline's time / this time; peak MiB: memory "
             "allocated during one call beyond inputs and weights"]
    if any(r.get("graph_us") for r in rows):
        lines.append("- graph us: the same call replayed from a CUDA graph, i.e. the GPU's time alone; "
                     "us - graph us is host time (Python, dispatch, launches) the GPU waited for")
    lines += [f"- {k}: {v}" for k, v in header.get("notes", {}).items()]
    lines += [f"- skipped {impl}: {why}" for impl, why in header.get("skipped_impls", {}).items()]
    if footer is None:
        lines.append("- INCOMPLETE: the run ended before its footer (killed by a timeout?)")
    elif footer["not_run"]:
        lines.append(f"- not run (time budget): {', '.join(footer['not_run'])}")
    if targets is None:
        targets = target_lines(header, rows)
    return "\n".join(lines + ["", markdown_table(rows), ""] + (targets + [""] if targets else []))


SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_math": "MATH", "sdpa_cudnn": "CUDNN_ATTENTION"}


def with_flag(module, name: str, thunk: Callable[[], Timed], value=True) -> Callable[[], Timed]:
    """A setup thunk whose setup (graphs built for bwd) and every timed call run with the kernel
    module's switch `name` set to `value` (SPLIT_HEAD_DIM, TENSOR_CORE_MIXING), restored after
    each: a variant under measurement."""
    def flagged(fn):
        def call():
            previous = getattr(module, name)
            setattr(module, name, value)
            try:
                return fn()
            finally:
                setattr(module, name, previous)
        return call
    return lambda: (lambda t: dataclasses.replace(t, fn=flagged(t.fn)))(flagged(thunk)())


def why_unavailable(call: Callable[[], object]) -> Optional[str]:
    """None when call() runs; else why not: its exception, after the warnings it raised on the way
    (a forced SDPA backend says why it refused the inputs only in warnings)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
            return None
        except Exception as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())}" if str(e).strip() else type(e).__name__
    said = []
    for w in caught:
        text = " ".join(re.sub(r"\(Triggered internally at [^)]*\)", "", str(w.message)).split())
        if text and text not in said:
            said.append(text)
    why = "; ".join(said + [error])
    return why if len(why) <= 400 else why[:397] + "..."


def sdpa_forced(backend_name: str):
    """F.scaled_dot_product_attention with one SDPBackend forced (an attention baseline)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def f(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return f
