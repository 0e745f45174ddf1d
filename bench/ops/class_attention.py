"""Benchmark class_attention (CaiT): our Triton and CUDA kernels vs timm's eager ClassAttn math, SDPA
with each backend forced, and torch.compile of the eager math, at CaiT's class-attention shapes.

    python -m bench.ops.class_attention                      # CaiT XXS/S/M at 224 and 384 px, bf16
    python -m bench.ops.class_attention --device cpu --quick # smoke test (Triton interpreter)

q, k and v are laid out as timm's ClassAttn makes them: q a transposed (B, 1, H, D), k and v
head-split views of (B, N, H*D) projections; the timed backward ends at those projections' grads.
The op is bandwidth-bound (4 FLOP per byte of K and V read), so the columns to judge are GB/s and
% of the bandwidth roofline. Targets (DESIGN.md section 1): >= 80 % of the HBM roofline and >= 3x
timm eager; the run appends both, per case, to the .md. cuda_prefetch is the cuda backend with
deit_fast.ops.class_attention.CUDA_PREFETCH on (the kernels' cp.async key loop): the measurement
that decides it.
"""
import importlib

import torch
import torch.nn.functional as F

from bench import common  # first: sets TRITON_INTERPRET on a machine without a GPU
from deit_fast import ops

op_module = importlib.import_module("deit_fast.ops.class_attention")  # CUDA_PREFETCH; ops shadows it

# CaiT's class-attention blocks: head dim 48, keys = cls + patches. (B, H, N, D)
SHAPES = {"cait_xxs_224": (256, 4, 197, 48), "cait_s_224": (256, 8, 197, 48),
          "cait_m_224": (256, 16, 197, 48), "cait_xxs_384": (64, 4, 577, 48),
          "cait_s_384": (64, 8, 577, 48), "cait_m_384": (64, 16, 577, 48)}
SMOKE_SHAPES = {"smoke": (1, 2, 9, 32)}  # a handful of programs under the interpreter
DTYPES = common.DTYPES
SMOKE_DTYPE = "fp32"  # the interpreter has no bf16 arithmetic (DESIGN.md section 6)
TARGET_PCT_ROOFLINE, TARGET_VS_EAGER = 80.0, 3.0
OURS = ("triton", "cuda", "cuda_prefetch")
SDPA_BACKENDS = common.SDPA_BACKENDS


def _ours(backend):
    def f(q, k, v):
        with ops.use_backend(backend):  # the backward keeps the backend the forward ran on
            return ops.class_attention(q, k, v)
    return f


def _timm_eager(q, k, v):
    """timm ClassAttn with fused_attn off."""
    q = q * q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def _compiled():
    torch._dynamo.reset()  # a fresh static-shape compile per case: no recompile limit
    return torch.compile(_timm_eager, dynamic=False)


IMPLS = {"triton": lambda: _ours("triton"), "cuda": lambda: _ours("cuda"),
         "cuda_prefetch": lambda: _ours("cuda"),
         "eager": lambda: _timm_eager,
         "sdpa": lambda: F.scaled_dot_product_attention,  # timm's default (fused_attn): SDPA's pick
         **{name: (lambda b=b: common.sdpa_forced(b)) for name, b in SDPA_BACKENDS.items()},
         "compile": _compiled}


def op_bytes(B, H, N, D, itemsize):
    """The fewest bytes each direction moves: fwd reads q, k, v and writes o; bwd reads q, k, v, o,
    dO and the fp32 lse and writes dq, dk, dv."""
    kv, vec = B * H * N * D * itemsize, B * H * D * itemsize
    return 2 * kv + 2 * vec, 4 * kv + 5 * vec + 4 * B * H


def setup(case: common.Case, impl: str, args):
    (B, H, N, D), dtype = case.shape, DTYPES[case.dtype]
    device = torch.device(args.device)
    f = IMPLS[impl]()
    fwd_bytes, bwd_bytes = op_bytes(B, H, N, D, dtype.itemsize)
    # q.k and p.v: 2 FLOP per element of K and V each; the backward recomputes s and adds dp, dv,
    # dk and dq: 10 per element (FlashAttention's 2.5x the forward).
    fwd_flops, bwd_flops = 4 * B * H * N * D, 10 * B * H * N * D
    sets = common.rotation(fwd_bytes + bwd_bytes, device)

    def leaves(grad):
        """The (B, 1, H*D) and (B, N, H*D) projection outputs ClassAttn splits into heads."""
        return [torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad)
                for shape in ((B, 1, H, D), (B, N, H, D), (B, N, H, D))]

    def call(q, k, v):
        return f(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    thunks = common.directions(call, leaves, sets,
                               lambda: torch.randn((B, H, 1, D), device=device, dtype=dtype),
                               fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)
    if impl == "cuda_prefetch":  # graphs built and every timed call run with the cp.async key loop
        return {d: common.with_flag(op_module, "CUDA_PREFETCH", t, True) for d, t in thunks.items()}
    return thunks


def _sdpa_unavailable(name: str, device: torch.device, dtype: torch.dtype):
    """Why SDPA with `name` forced cannot run one query per head at D=48 fwd+bwd here, or None."""
    import warnings
    try:
        q = torch.randn(2, 2, 1, 48, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 9, 48, device=device, dtype=dtype, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "kernel not used because" chatter
            IMPLS[name]()(q, k, k).sum().backward()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return None


def targets(rows, interpreted: bool):
    """Ours per case and direction: % of the bandwidth roofline and speedup over timm eager."""
    return common.roofline_targets(rows, interpreted, OURS, TARGET_PCT_ROOFLINE, "eager",
                                   TARGET_VS_EAGER, "timm eager")


def main(argv=None):
    p = common.parser(__doc__, list(IMPLS), warmup_ms=10, rep_ms=40)
    p.add_argument("--dtypes", help=f"comma list out of {','.join(DTYPES)}")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    shapes = SMOKE_SHAPES if smoke else SHAPES
    dtypes = (args.dtypes or (SMOKE_DTYPE if smoke else "bf16")).split(",")
    report = ops.backend_report()["class_attention"].get(device.type, {}).get("unavailable", {})
    impls = {"triton": common.Impl(False, report.get("triton")),
             "cuda": common.Impl(False, report.get("cuda")),
             "cuda_prefetch": common.Impl(False, report.get("cuda")), "eager": common.Impl(True),
             "sdpa": common.Impl(True), "compile": common.Impl(True)}
    wanted = args.impls.split(",")
    for name in SDPA_BACKENDS:  # probed once, in the first dtype: a backend refuses the op or not
        why = _sdpa_unavailable(name, device, DTYPES[dtypes[0]]) if name in wanted else None
        impls[name] = common.Impl(True, why)
    cases = [common.Case("class_attention", shape, dtype) for dtype in dtypes for shape in shapes.values()]
    notes = {"shapes": ", ".join(f"{k} {'x'.join(map(str, v))} (BxHxNxD)" for k, v in shapes.items()),
             "layout": "q (B,1,H,D) and k, v (B,N,H,D) projections transposed to (B,H,*,D), as timm's ClassAttn",
             "eager": "timm ClassAttn math (fused_attn off); sdpa: timm's default; sdpa_*: that backend "
                      "forced; compile: torch.compile of the eager math, static shapes",
             "targets": f">= {TARGET_PCT_ROOFLINE:g} % of the bandwidth roofline, >= {TARGET_VS_EAGER:g}x timm eager"}
    common.run("class_attention", args, cases, impls, setup, {"notes": notes}, targets)

if __name__ == "__main__":
    main()
