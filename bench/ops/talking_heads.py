"""Benchmark talking-heads attention (CaiT): our Triton kernels vs timm's TalkingHeadAttn
math (eager, which materialises B x H x N x N logits twice) and torch.compile of it.

    python -m bench.ops.talking_heads                      # CaiT XXS/S/M at 224 and 384 px, bf16
    python -m bench.ops.talking_heads --device cpu --quick # smoke test (Triton interpreter)

The inputs are one (B, N, 3, H, D) projection and fp32 (H, H) / (H,) head-mixing weights, as
proj_l / proj_w under autocast. Ours run ops.talking_heads_attention_qkv on it, as CaiT's layer
does (the kernels read q, k, v through strides and write one packed grad); the baselines take
q, k, v as timm does, views from permute + unbind, so their backward also pays autograd's stack of
dq, dk, dv into the projection's grad. Targets (the attention issue): fwd+bwd >= 2.5x timm eager
and >= 1.5x torch.compile of it, with peak memory O(B*H*N*D); the run appends the speedups to the
.md, and peak_mib is in every CUDA row. Ours, each forced through kernels.talking_heads' switches:
triton is the backend as shipped (STRATEGY "chunked_forward": the chunked forward, the fused
tensor-core backward); triton_tc the fused kernels with the head mixing on tensor cores both
ways; triton_chunked kernels/talking_heads_chunked.py both ways (the N x N products as batched
GEMMs and one memory-bound mixing pass each, a chunk of images at a time); triton_cuda_cores the
fused kernels mixing on CUDA cores (what fp32 inputs run in the fused kernels; triton_tc is
unavailable for them). Rows past chunked.MAX_KEYS (the 384 px shapes) run the fused kernels in
every strategy, so triton and triton_chunked equal triton_tc there.
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


def _ours(qkv, w_l, b_l, w_w, b_w):
    with ops.use_backend("triton"):
        return ops.talking_heads_attention_qkv(qkv, w_l, b_l, w_w, b_w)


def _eager(q, k, v, w_l, b_l, w_w, b_w):
    """timm TalkingHeadAttn: Linear layers over the head axis around the softmax."""
    mix = lambda s, w, b: torch.nn.functional.linear(s.permute(0, 2, 3, 1), w.to(s.dtype), b.to(s.dtype)).permute(0, 3, 1, 2)  # noqa: E731
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return mix(mix(s, w_l, b_l).softmax(dim=-1), w_w, b_w) @ v


def _compiled():
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


# Each of ours as kernels.talking_heads' switches (STRATEGY, TENSOR_CORE_MIXING); None: as shipped.
OURS = {"triton": (None, None), "triton_tc": ("fused", True), "triton_chunked": ("chunked", None),
        "triton_cuda_cores": ("fused", False)}
# The default and the baselines its targets name first, so that a run cut short by gpu_check's
# cap still judges it; then each strategy alone, the CUDA-core family last.
IMPLS = {"triton": lambda: _ours, "eager": lambda: _eager, "compile": _compiled,
         "triton_tc": lambda: _ours, "triton_chunked": lambda: _ours, "triton_cuda_cores": lambda: _ours}


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
        return f(qkv, *mixing) if impl in OURS else f(*qkv.permute(2, 0, 3, 1, 4).unbind(0), *mixing)

    thunks = common.directions(call, leaves, sets, lambda: torch.randn(B, H, N, D, device=device, dtype=dtype),
                               fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)
    for name, value in zip(("STRATEGY", "TENSOR_CORE_MIXING"), OURS.get(impl, (None, None))):
        if value is not None:
            thunks = {d: common.with_flag(th_kernels, name, t, value) for d, t in thunks.items()}
    return thunks


def targets(rows, interpreted: bool):
    """Per case and direction: each of ours against timm eager and torch.compile of it, each with its
    target, and the peak memory beside eager's (the B x H x N x N tensors it must not allocate)."""
    key = lambda r: (r["shape"], r["dtype"], r["direction"])  # noqa: E731
    base = {(key(r), r["impl"]): r for r in rows if r["impl"] not in OURS and r.get("us")}
    lines = [f"### targets (ours: {', '.join(OURS)}): >= {TARGET_VS_EAGER:g}x timm eager, >= {TARGET_VS_COMPILE:g}x "
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
    impls = {impl: common.Impl(impl not in OURS, report.get("triton") if impl in OURS else None)
             for impl in IMPLS}
    cases = [common.Case("talking_heads_attention", shape, dtype) for dtype in dtypes for shape in shapes.values()]
    notes = {"shapes": ", ".join(f"{k} {'x'.join(map(str, v))} (BxHxNxD)" for k, v in shapes.items()),
             "eager": "timm TalkingHeadAttn math; compile: torch.compile of it, static shapes",
             "flops": "4BHN^2D for the two products plus 4BH^2N^2 for the two head mixes; bwd 2.5x"}
    common.run("talking_heads_attention", args, cases, impls, setup, {"notes": notes}, targets)

if __name__ == "__main__":
    main()
