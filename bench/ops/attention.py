"""Benchmark self-attention (DeiT, ViT): our Triton flash kernels and the cuda backend (the
tensor-core forward of csrc/attention.cu, Triton's backward) vs SDPA with each backend forced,
xformers where it imports, timm's eager math and torch.compile of it.

    python -m bench.ops.attention                      # DeiT/CaiT-shaped attention, bf16
    python -m bench.ops.attention --shapes deit_small_224,d48_h8_n196 --impls triton,cuda,sdpa_flash
    python -m bench.ops.attention --device cpu --quick # smoke test (Triton interpreter)

q, k, v are strided views of one (B, N, 3, H, D) projection, as the models pass them; the timed
backward ends at that projection's grad. FLOPs: 4*B*H*N^2*D forward, 2.5x that backward; bytes:
q, k, v, o forward, plus dO, dq, dk, dv and the fp32 log-sum-exp backward. At 224 px attention
sits under the ridge point, so judge microseconds and GB/s as well as TFLOP/s.

A forced SDPA backend (or xformers) that refuses a shape or dtype gets a row noted `unavailable:`
with its reason (what SDPA warned, then its error); one that refuses every case is listed as
skipped in the header. Targets (the attention issue), printed at the end and kept in the .md:
triton fwd+bwd >= 1.0x the fastest forced SDPA backend at N=197/198, D=64, and >= 1.15x at D=48
(N=196/197); fwd and bwd ratios are shown alongside, and the same ratios for cuda. The cuda impl
is timed fwd and fwd+bwd only: its backward is the Triton one. triton_masked is the Triton
backend with head dim 48 as one masked 64-wide block instead of two exact ones (32 + 16,
kernels/attention.py SPLIT_HEAD_DIM, the default since an H100 measured it faster on 2026-11-26):
the measurement that keeps the default honest. cuda_m64, cuda_m64_s4, cuda_m128_s2 and
cuda_m128_s3 are the CUDA forward's other tilings (deit_fast.ops.attention CUDA_BLOCK_M,
CUDA_STAGES; the default, 128 queries per CTA and 4 k/v tiles in shared memory, was the fastest
of five on an H200, 2026-11-27): 64 queries per CTA instead of 128 (twice the L2 reads of k and
v at N = 197), 2 or 3 k/v tiles instead of 4 (4: all of k and v requested up front at N <=
256); cuda_w32 and cuda_w32_s3: 128 queries per CTA over 4 warps of 32 (CUDA_ROWS_PER_WARP 32,
never timed), with 4 and 3 k/v tiles; forward only, as their fwd+bwd adds cuda's Triton backward.
The CUDA forward has a target of
its own (the CUDA-kernels issue): fwd >= 1.2x the fastest forced SDPA backend at head dim 48
(CaiT shapes).
"""

import importlib

import torch
import torch.nn.functional as F

from bench import common  # first: sets TRITON_INTERPRET on a machine without a GPU
from deit_fast import ops
from deit_fast.kernels import attention as attention_kernels

op_module = importlib.import_module("deit_fast.ops.attention")  # ops.attention is the function

# (B, H, N, D): DeiT-Ti/S/B at 224 px (N = 196 patches + cls, + dist for the distilled models),
# DeiT-B at 384 px, and CaiT's head dim 48 at 4 and 8 heads (XXS, S) over 196 patches or 197
# tokens, and CaiT-S at 384 px.
SHAPES = {"deit_tiny_224": (256, 3, 197, 64), "deit_small_224": (256, 6, 197, 64),
          "deit_base_224": (256, 12, 197, 64), "deit_small_distilled_224": (256, 6, 198, 64),
          "deit_base_384": (64, 12, 577, 64),
          "d48_h4_n196": (256, 4, 196, 48), "d48_h8_n196": (256, 8, 196, 48),
          "d48_h4_n197": (256, 4, 197, 48), "d48_h8_n197": (256, 8, 197, 48),
          "d48_h8_n576": (64, 8, 576, 48)}
SMOKE_SHAPES = {"smoke": (1, 2, 9, 48)}  # 48: triton_masked runs too
DTYPES = common.DTYPES
SMOKE_DTYPE = "fp32"  # the interpreter has no bf16 arithmetic (DESIGN.md section 6)
SDPA_BACKENDS = common.SDPA_BACKENDS
PROBED = (*SDPA_BACKENDS, "xformers")  # baselines that may refuse a shape: probed per case
# (head dim, token counts) -> fwd+bwd speedup over the fastest forced SDPA backend
TARGETS = {(64, (197, 198)): 1.0, (48, (196, 197)): 1.15}
CUDA_FWD_TARGETS = {48: 1.2}  # head dim -> the CUDA forward's fwd speedup over the same baseline


def _ours(backend):
    def f(q, k, v):
        with ops.use_backend(backend):  # the backward keeps the backend the forward ran on
            return ops.attention(q, k, v)
    return f


def _eager(q, k, v):
    """timm Attention with fused_attn off."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _xformers():
    import xformers.ops as xops  # optional baseline (DESIGN.md section 7)
    # xformers takes (B, N, H, D): the projection views already are, before the head transpose.
    return lambda q, k, v: xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _compiled():
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


# impl -> the CUDA forward's (queries per CTA, k/v stages, queries per warp); cuda: the op's
# defaults
CUDA_IMPLS = {"cuda": None, "cuda_m64": (64, 2, 16), "cuda_m64_s4": (64, 4, 16),
              "cuda_m128_s2": (128, 2, 16), "cuda_m128_s3": (128, 3, 16), "cuda_w32": (128, 4, 32),
              "cuda_w32_s3": (128, 3, 32)}
OURS = ("triton", "triton_masked", *CUDA_IMPLS)
IMPLS = {"triton": lambda: _ours("triton"), "triton_masked": lambda: _ours("triton"),
         **{name: (lambda: _ours("cuda")) for name in CUDA_IMPLS},
         "eager": lambda: _eager,
         "sdpa": lambda: F.scaled_dot_product_attention,
         **{name: (lambda b=b: common.sdpa_forced(b)) for name, b in SDPA_BACKENDS.items()},
         "xformers": _xformers, "compile": _compiled}


_probes = {}


def _unavailable(name: str, device: torch.device, dtype: torch.dtype, H: int, N: int, D: int):
    """Why impl `name` cannot run fwd+bwd on one image's (1, N, 3, H, D) projection, or None."""
    key = (name, str(device), dtype, H, N, D)
    if key not in _probes:
        def call():
            qkv = torch.randn(1, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)
            IMPLS[name]()(*qkv.permute(2, 0, 3, 1, 4).unbind(0)).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        _probes[key] = common.why_unavailable(call)
    return _probes[key]


def setup(case: common.Case, impl: str, args):
    (B, H, N, D), dtype = case.shape, DTYPES[case.dtype]
    device = torch.device(args.device)
    if impl in PROBED:
        why = _unavailable(impl, device, dtype, H, N, D)
        if why:
            raise common.Unavailable(why)
    f = IMPLS[impl]()
    io = B * H * N * D * dtype.itemsize
    fwd_bytes, bwd_bytes = 4 * io, 8 * io + 4 * B * H * N  # q,k,v,o ; q,k,v,o,dO,dq,dk,dv + lse
    fwd_flops = 4 * B * H * N * N * D
    bwd_flops = int(2.5 * fwd_flops)
    sets = common.rotation(fwd_bytes + bwd_bytes, device)

    def leaf(grad):
        return torch.randn(B, N, 3, H, D, device=device, dtype=dtype).requires_grad_(grad)

    def call(qkv):
        return f(*qkv.permute(2, 0, 3, 1, 4).unbind(0))

    thunks = common.directions(call, lambda grad: [leaf(grad)], sets,
                               lambda: torch.randn(B, H, N, D, device=device, dtype=dtype),
                               fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)
    if impl in CUDA_IMPLS:  # the backward is Triton's: its bwd row would repeat the triton one
        del thunks["bwd"]
        if CUDA_IMPLS[impl] is None:
            return thunks
        # A tiling variant: its fwd+bwd differs from cuda's by the forward alone
        fwd = thunks["fwd"]
        for flag, value in zip(("CUDA_BLOCK_M", "CUDA_STAGES", "CUDA_ROWS_PER_WARP"), CUDA_IMPLS[impl]):
            fwd = common.with_flag(op_module, flag, fwd, value)
        return {"fwd": fwd}
    if impl == "triton_masked":  # graphs built and every timed call run with one masked block
        if attention_kernels._blocks(D, True)[1] == 0:
            raise common.Unavailable(f"head dim {D} has no split (a power of two, or no exact second block)")
        return {d: common.with_flag(attention_kernels, "SPLIT_HEAD_DIM", t, False)
                for d, t in thunks.items()}
    return thunks


def _target(shape: str):
    """The fwd+bwd speedup wanted over the fastest forced SDPA backend at a BxHxNxD shape, or None."""
    _, _, n, d = map(int, shape.split("x"))
    return next((want for (dim, tokens), want in TARGETS.items() if d == dim and n in tokens), None)


def targets(rows, interpreted: bool):
    """Per case and our impl (triton, cuda...): it against the fastest forced SDPA backend, each
    direction; the verdict on fwd+bwd where the shape has a target, and on the CUDA forward's fwd
    at the head dims of CUDA_FWD_TARGETS."""
    best, ours = {}, {}
    for r in rows:
        if not r.get("us"):
            continue
        key = (r["shape"], r["dtype"], r["direction"])
        if r["impl"] in SDPA_BACKENDS and r["us"] < best.get(key, (float("inf"),))[0]:
            best[key] = (r["us"], r["impl"])
        elif r["impl"] in OURS:
            ours[(r["impl"], *key)] = r["us"]
    lines = ["### targets (triton and cuda fwd+bwd vs the fastest forced SDPA backend): "
             + ", ".join(f">= {want:g}x at N={'/'.join(map(str, n))} D={d}" for (d, n), want in TARGETS.items())
             + "; the CUDA forward alone: "
             + ", ".join(f"fwd >= {want:g}x at D={d}" for d, want in CUDA_FWD_TARGETS.items()),
             ""]
    for impl, shape, dtype in dict.fromkeys((i, s, t) for i, s, t, _ in ours):
        ratios = {d: (best[(shape, dtype, d)][0] / ours[(impl, shape, dtype, d)],
                      best[(shape, dtype, d)][1])
                  for d in common.DIRECTIONS if (shape, dtype, d) in best and (impl, shape, dtype, d) in ours}
        if not ratios:
            lines.append(f"- {impl} {shape} {dtype}: no forced SDPA backend ran")
            continue
        want, fb = _target(shape), ratios.get("fwd+bwd")
        if want is None:
            tail = "no target at this shape"
        elif fb is None:
            tail = f"target fwd+bwd >= {want:g}x: fwd+bwd not measured"
        else:
            tail = f"target fwd+bwd >= {want:g}x: {common.verdict(fb[0] >= want, interpreted)}"
        fwd_want, f = CUDA_FWD_TARGETS.get(int(shape.split("x")[3])), ratios.get("fwd")
        if impl in CUDA_IMPLS and fwd_want is not None and f is not None:
            tail += f"; target fwd >= {fwd_want:g}x: {common.verdict(f[0] >= fwd_want, interpreted)}"
        lines.append(f"- {impl} {shape} {dtype}: "
                     + ", ".join(f"{d} {r:.2f}x ({base})" for d, (r, base) in ratios.items()) + f"; {tail}")
    return lines


def main(argv=None):
    p = common.parser(__doc__, list(IMPLS), warmup_ms=10, rep_ms=40)
    p.add_argument("--dtypes", help=f"comma list out of {','.join(DTYPES)}")
    p.add_argument("--shapes", help=f"comma list out of {','.join(SHAPES)}, run in this order")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    shapes = SMOKE_SHAPES if smoke else {k: SHAPES[k] for k in (args.shapes or ",".join(SHAPES)).split(",")}
    dtypes = (args.dtypes or (SMOKE_DTYPE if smoke else "bf16")).split(",")
    report = ops.backend_report()["attention"].get(device.type, {}).get("unavailable", {})
    impls = {"triton": common.Impl(False, report.get("triton")),
             "triton_masked": common.Impl(False, report.get("triton")),
             **{name: common.Impl(False, report.get("cuda")) for name in CUDA_IMPLS},
             "eager": common.Impl(True),
             "sdpa": common.Impl(True), "compile": common.Impl(True)}
    wanted = args.impls.split(",")
    for name in PROBED:  # skipped outright only when it refuses every case of this run
        whys = [_unavailable(name, device, DTYPES[dt], H, N, D)
                for dt in dtypes for _, H, N, D in shapes.values()] if name in wanted else [None]
        impls[name] = common.Impl(True, whys[0] if all(whys) else None)
    cases = [common.Case("attention", shape, dtype) for dtype in dtypes for shape in shapes.values()]
    notes = {"shapes": ", ".join(f"{k} {'x'.join(map(str, v))} (BxHxNxD)" for k, v in shapes.items()),
             "layout": "q, k, v strided views of a (B,N,3,H,D) projection, as the models pass them",
             "eager": "timm Attention math (fused_attn off); sdpa: SDPA's own pick; sdpa_*: that backend "
                      "forced; xformers: memory_efficient_attention; compile: torch.compile of the eager "
                      "math (= reference.attention), static shapes",
             "flops": "4BHN^2D forward, 2.5x that backward"}
    common.run("attention", args, cases, impls, setup, {"notes": notes}, targets)


if __name__ == "__main__":
    main()
