"""Benchmark talking-heads attention (CaiT): our Triton kernels vs timm's TalkingHeadAttn
math (eager, which materialises B x H x N x N logits twice) and torch.compile of it.

    python -m bench.ops.talking_heads                      # CaiT XXS/S/M at 224 and 384 px, bf16
    python -m bench.ops.talking_heads --device cpu --quick # smoke test (Triton interpreter)

q, k, v are strided views of one (B, N, 3, H, D) projection; the head-mixing weights are fp32
(H, H) matrices and (H,) biases, as proj_l / proj_w under autocast. Targets (the attention issue):
fwd+bwd >= 2.5x timm eager and >= 1.5x torch.compile of it, with peak memory O(B*H*N*D); the run
appends the speedups to the .md, and peak_mib is in every CUDA row. triton is the triton backend
with the head mixing on CUDA cores, triton_tc with it on tensor cores (each forced through
kernels.talking_heads.TENSOR_CORE_MIXING); the backend's default is tensor cores at every head
count for fp16/bf16 inputs, from SASS counts this bench is to confirm; fp32 inputs always run
the CUDA-core family (triton_tc: unavailable). triton_chunked is the triton backend with
kernels.talking_heads.STRATEGY "chunked" (kernels/talking_heads_chunked.py: the N x N products
as batched GEMMs and one memory-bound mixing pass each, a chunk of images at a time); rows past its
MAX_KEYS (the 384 px shapes) run the fused kernels there too, so it equals triton_tc there.
"""

import torch

from bench import common  # first: sets TRITON_INTERPRET on a machine without a GPU
from deit_fast import ops
from deit_fast.kernels import talking_heads as th_kernels

# (B, H, N, D): CaiT's self-attention runs on the patch tokens only, head dim 48.
# CaiT-S first: 8 heads is where the two mixing strategies differ most (gpu_check's time cap
# reaches the first shapes only).
SHAPES = {"cait_s_224": (256, 8, 196, 48), "cait_xxs_224": (256, 4, 196, 48),
          "cait_m_224": (64, 16, 196, 48), "cait_xxs_384": (64, 4, 576, 48),
          "cait_s_384": (64, 8, 576, 48), "cait_m_384": (16, 16, 576, 48)}
SMOKE_SHAPES = {"smoke": (1, 2, 9, 16)}
DTYPES = common.DTYPES
TARGET_VS_EAGER, TARGET_VS_COMPILE = 2.5, 1.5


def mixing(H: int, device, generator=None):
    """CaiT-like fp32 head-mixing parameters [w_l, b_l, w_w, b_w] (proj_l / proj_w)."""
    scaled = (((H, H), H ** -0.5), ((H,), 1.0), ((H, H), H ** -0.5), ((H,), 0.1))
    return [(torch.randn(*shape, generator=generator) * f).to(device) for shape, f in scaled]


def _ours(q, k, v, w_l, b_l, w_w, b_w):
    with ops.use_backend("triton"):
        return ops.talking_heads_attention(q, k, v, w_l, b_l, w_w, b_w)


def _eager(q, k, v, w_l, b_l, w_w, b_w):
    """timm TalkingHeadAttn: Linear layers over the head axis around the softmax."""
    mix = lambda s, w, b: torch.nn.functional.linear(s.permute(0, 2, 3, 1), w.to(s.dtype), b.to(s.dtype)).permute(0, 3, 1, 2)  # noqa: E731
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return mix(mix(s, w_l, b_l).softmax(dim=-1), w_w, b_w) @ v


def _compiled():
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


OURS = ("triton", "triton_tc", "triton_chunked")
# The default family (tensor cores) and the baselines its targets name first, so that a run cut
# short by gpu_check's cap still judges it; the CUDA-core family last, for comparison.
IMPLS = {"triton_tc": lambda: _ours, "triton_chunked": lambda: _ours, "eager": lambda: _eager,
         "compile": _compiled, "triton": lambda: _ours}


def setup(case: common.Case, impl: str, args):
    (B, H, N, D), dtype = case.shape, DTYPES[case.dtype]
    if impl == "triton_tc" and dtype == torch.float32:
        raise common.Unavailable("fp32 inputs run the CUDA-core kernels (kernels.talking_heads._family)")
    device = torch.device(args.device)
    f = IMPLS[impl]()
    io = B * H * N * D * dtype.itemsize
    fwd_bytes, bwd_bytes = 4 * io, 8 * io
    # q k^T and P' v per head, plus the two H x H mixes of every (i, j)
    fwd_flops = 4 * B * H * N * N * D + 4 * B * H * H * N * N
    bwd_flops = int(2.5 * fwd_flops)
    sets = common.rotation(fwd_bytes + bwd_bytes, device)

    def leaves(grad):
        return [torch.randn(B, N, 3, H, D, device=device, dtype=dtype).requires_grad_(grad)] + \
            [m.requires_grad_(grad) for m in mixing(H, device)]

    def call(qkv, *mixing):
        return f(*qkv.permute(2, 0, 3, 1, 4).unbind(0), *mixing)

    thunks = common.directions(call, leaves, sets, lambda: torch.randn(B, H, N, D, device=device, dtype=dtype),
                               fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)
    if impl == "triton_chunked":
        return {d: common.with_flag(th_kernels, "STRATEGY", t, "chunked") for d, t in thunks.items()}
    if impl in OURS:  # each fused mixing family forced, whichever the default picks at this H
        tc = impl == "triton_tc"
        return {d: common.with_flag(th_kernels, "TENSOR_CORE_MIXING", t, tc) for d, t in thunks.items()}
    return thunks


def targets(rows, interpreted: bool):
    """Per case and direction: triton against timm eager and torch.compile of it, each with its
    target, and the peak memory beside eager's (the B x H x N x N tensors it must not allocate)."""
    key = lambda r: (r["shape"], r["dtype"], r["direction"])  # noqa: E731
    base = {(key(r), r["impl"]): r for r in rows if r["impl"] not in OURS and r.get("us")}
    lines = [f"### targets (triton, triton_tc): >= {TARGET_VS_EAGER:g}x timm eager, >= {TARGET_VS_COMPILE:g}x "
             "torch.compile of it (fwd+bwd), peak memory O(B*H*N*D)", ""]
    for r in rows:
        if r["impl"] not in OURS or not r.get("us"):
            continue
        cells = []
        for impl, want in (("eager", TARGET_VS_EAGER), ("compile", TARGET_VS_COMPILE)):
            if (key(r), impl) in base:
                ratio = base[(key(r), impl)]["us"] / r["us"]
                verdict = common.verdict(ratio >= want, interpreted) if r["direction"] == "fwd+bwd" else "no target"
                cells.append(f"{ratio:.2f}x {impl} ({verdict})")
        eager = base.get((key(r), "eager"), {})
        if r.get("peak_mib") is not None and eager.get("peak_mib"):
            cells.append(f"peak {r['peak_mib']:.0f} MiB vs eager {eager['peak_mib']:.0f} MiB")
        lines.append(f"- {r['impl']} {r['shape']} {r['dtype']} {r['direction']}: "
                     f"{', '.join(cells) or 'no baseline ran'}")
    return lines


def main(argv=None):
    p = common.parser(__doc__, list(IMPLS), warmup_ms=10, rep_ms=40)
    p.add_argument("--dtypes", help=f"comma list out of {','.join(DTYPES)}")
    p.add_argument("--shapes", help=f"comma list out of {','.join(SHAPES)}")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    shapes = SMOKE_SHAPES if smoke else {k: SHAPES[k] for k in (args.shapes or ",".join(SHAPES)).split(",")}
    # smoke: fp16, the interpreter's 16-bit type (it has no bf16) and the tensor-core family's
    dtypes = (args.dtypes or ("fp16" if smoke else "bf16")).split(",")
    report = ops.backend_report()["talking_heads_attention"].get(device.type, {}).get("unavailable", {})
    impls = {"triton_tc": common.Impl(False, report.get("triton")),
             "triton_chunked": common.Impl(False, report.get("triton")), "eager": common.Impl(True),
             "compile": common.Impl(True), "triton": common.Impl(False, report.get("triton"))}
    cases = [common.Case("talking_heads_attention", shape, dtype) for dtype in dtypes for shape in shapes.values()]
    notes = {"shapes": ", ".join(f"{k} {'x'.join(map(str, v))} (BxHxNxD)" for k, v in shapes.items()),
             "eager": "timm TalkingHeadAttn math; compile: torch.compile of it, static shapes",
             "flops": "4BHN^2D for the two products plus 4BH^2N^2 for the two head mixes; bwd 2.5x"}
    common.run("talking_heads_attention", args, cases, impls, setup, {"notes": notes}, targets)

if __name__ == "__main__":
    main()
