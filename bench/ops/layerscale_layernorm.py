"""Benchmark layerscale_residual_layernorm (the end of a block branch + the next LayerNorm in one
pass) and the plain layer_norm, ours on the triton and cuda backends, against timm's eager
sequence, torch.compile of the reference and apex FusedLayerNorm where apex imports. Memory-bound:
judged in GB/s against the roofline.

    python -m bench.ops.layerscale_layernorm                      # DeiT/CaiT widths, training dtypes
    python -m bench.ops.layerscale_layernorm --device cpu --quick # smoke test (Triton interpreter)

Bytes: fwd reads x, y (and gamma, weight, bias) and writes out and normed; bwd reads dout, dnormed,
out, y and writes dx, dy (row statistics and the C-sized grads are negligible). Targets (the
residual+LayerNorm issue): fwd and bwd >= 85 % of the HBM roofline and >= 1.1x torch.compile.
cuda_prefetch is the cuda backend with deit_fast.ops.layerscale.CUDA_PREFETCH on (the backward
requests a row's dout and y a row ahead): bwd and fwd+bwd only, the measurement that decides it.
"""
import torch
import torch.nn.functional as F
import timm.layers

from bench import common  # first: sets TRITON_INTERPRET on a machine without a GPU
from bench.ops.layerscale import DTYPES, SHAPES, SMOKE_DTYPES, SMOKE_SHAPES
from deit_fast import ops
from deit_fast.ops import layerscale as op_module  # CUDA_PREFETCH
from deit_fast.ops import reference

KEEP_PROB = 0.9
TARGET_PCT_ROOFLINE, TARGET_VS_COMPILE = 85.0, 1.1


def _mask(x):
    return torch.rand(x.shape[0], device=x.device) < KEEP_PROB


def _ours(backend):
    def f(x, y, g, w, b):
        with ops.use_backend(backend):  # the backward keeps the backend the forward ran on
            return ops.layerscale_residual_layernorm(x, y, g, w, b, 1e-6, _mask(x), KEEP_PROB)
    return f


def _eager(x, y, g, w, b):
    out = x + timm.layers.drop_path(y * g, 1 - KEEP_PROB, training=True)
    return out, F.layer_norm(out, (out.shape[-1],), w, b, 1e-6)


def _apex(x, y, g, w, b):
    from apex.normalization import fused_layer_norm_affine  # optional baseline
    out = x + timm.layers.drop_path(y * g, 1 - KEEP_PROB, training=True)
    return out, fused_layer_norm_affine(out, w, b, (out.shape[-1],), 1e-6)


def _compiled():
    torch._dynamo.reset()
    return torch.compile(lambda x, y, g, w, b: reference.layerscale_residual_layernorm(
        x, y, g, w, b, 1e-6, _mask(x), KEEP_PROB), dynamic=False)


IMPLS = {"triton": lambda: _ours("triton"), "cuda": lambda: _ours("cuda"),
         "cuda_prefetch": lambda: _ours("cuda"), "eager": lambda: _eager,
         "apex": lambda: _apex, "compile": _compiled}
OURS = ("triton", "cuda", "cuda_prefetch")


def setup(case: common.Case, impl: str, args):
    (B, N, C), (xd, yd, gd) = case.shape, DTYPES[case.dtype]
    device = torch.device(args.device)
    f = IMPLS[impl]()
    od = torch.promote_types(torch.promote_types(xd, yd), gd)
    numel = B * N * C
    fwd_bytes = numel * (xd.itemsize + yd.itemsize + 2 * od.itemsize)
    bwd_bytes = numel * (3 * od.itemsize + 2 * yd.itemsize + xd.itemsize)
    fwd_flops, bwd_flops = 10 * numel, 16 * numel
    sets = common.rotation(fwd_bytes + bwd_bytes, device)

    def leaves(grad):
        return [torch.randn(s, device=device, dtype=dt).requires_grad_(grad) for s, dt in
                (((B, N, C), xd), ((B, N, C), yd), ((C,), gd), ((C,), torch.float32), ((C,), torch.float32))]

    def douts():  # out and normed both have the promoted dtype
        return tuple(torch.randn(B, N, C, device=device, dtype=od) for _ in range(2))

    thunks = common.directions(f, leaves, sets, douts, fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)
    if impl == "cuda_prefetch":  # the backward's variant: its fwd row would repeat cuda's
        del thunks["fwd"]
        return {d: common.with_flag(op_module, "CUDA_PREFETCH", t, True) for d, t in thunks.items()}
    return thunks


def targets(rows, interpreted: bool):
    """Ours per case and direction: % of the bandwidth roofline and speedup over torch.compile."""
    return common.roofline_targets(rows, interpreted, OURS, TARGET_PCT_ROOFLINE,
                                   "compile", TARGET_VS_COMPILE, "torch.compile")


def main(argv=None):
    p = common.parser(__doc__, list(IMPLS), warmup_ms=10, rep_ms=40)
    p.add_argument("--dtypes", help=f"comma list out of {','.join(DTYPES)} (x/y/gamma)")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    shapes = SMOKE_SHAPES if smoke else SHAPES
    dtypes = (args.dtypes or (SMOKE_DTYPES if smoke else "fp32/bf16/fp32,bf16/bf16/fp32")).split(",")
    report = ops.backend_report()["layerscale_residual_layernorm"].get(device.type, {}).get("unavailable", {})
    try:
        import apex.normalization  # noqa: F401
        apex_why = None
    except ImportError as e:
        apex_why = f"apex does not import ({e})"
    impls = {"triton": common.Impl(False, report.get("triton")),
             "cuda": common.Impl(False, report.get("cuda")),
             "cuda_prefetch": common.Impl(False, report.get("cuda")), "eager": common.Impl(True),
             "apex": common.Impl(True, apex_why), "compile": common.Impl(True)}
    cases = [common.Case("layerscale_residual_layernorm", shape, dtype) for dtype in dtypes for shape in shapes.values()]
    notes = {"dtype": "x/y/gamma storage dtypes; out and normed take their promoted dtype; LayerNorm params fp32",
             "eager": "timm's x + drop_path(gamma * y), then F.layer_norm; apex: the same with FusedLayerNorm",
             "droppath": f"keep_prob {KEEP_PROB}, per-sample mask drawn on every forward"}
    common.run("layerscale_residual_layernorm", args, cases, impls, setup, {"notes": notes}, targets)

if __name__ == "__main__":
    main()
