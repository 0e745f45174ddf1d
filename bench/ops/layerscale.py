"""layerscale_residual: x + gamma * y * keep[b] / keep_prob, fwd / bwd / fwd+bwd.

Ours (triton, cuda backends) against timm's eager sequence `x + drop_path(ls(y))` and
torch.compile of the reference; memory-bound, so judged in GB/s against the bandwidth roofline.
Bytes counted are the fewest the op needs: fwd reads x, y, gamma and writes out; bwd reads dout
and y and writes dy, dgamma, and dx only when x's dtype differs from out's (otherwise dx is dout).

    python -m bench.ops.layerscale                      # all shapes and dtypes on the GPU
    python -m bench.ops.layerscale --device cpu --quick # smoke test (Triton interpreter)
"""
from bench import common  # first: it turns on the Triton interpreter when there is no GPU

import torch
import timm.layers

from deit_fast import ops
from deit_fast.ops import reference

# (B, N, C) of a block's residual stream at training batch sizes. CaiT's self-attention blocks see
# the 196 patch tokens only; C 288 is CaiT-XS's width, here at 224 px.
SHAPES = {"deit_tiny_224": (256, 197, 192), "deit_small_224": (256, 197, 384),
          "deit_base_224": (256, 197, 768), "cait_xs_width_224": (256, 196, 288),
          "cait_s_224": (256, 196, 384), "deit_base_384": (64, 577, 768)}
SMOKE_SHAPES = {"smoke": (2, 9, 96)}  # a handful of programs under the interpreter
# x/y/gamma dtypes. Under bf16 autocast timm's residual stream is fp32 (an fp32 gamma times a
# bf16 branch promotes), so fp32/bf16/fp32 is what every block but the first sees in training.
DTYPES = {"fp32/bf16/fp32": (torch.float32, torch.bfloat16, torch.float32),
          "bf16/bf16/fp32": (torch.bfloat16, torch.bfloat16, torch.float32),
          "bf16/bf16/bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
          "fp32/fp16/fp32": (torch.float32, torch.float16, torch.float32),
          "fp16/fp16/fp32": (torch.float16, torch.float16, torch.float32)}
SMOKE_DTYPES = "fp32/fp16/fp32"  # the interpreter has no bf16 arithmetic (DESIGN.md section 6)
KEEP_PROB = 0.9  # DeiT's drop path 0.1


def _keep_mask(x, keep_prob):
    # Drawn on every call, as a training block does (timm's drop_path draws its own too).
    return torch.rand(x.shape[0], device=x.device) < keep_prob if keep_prob < 1 else None


def _ours(backend, keep_prob):
    def f(x, y, gamma):
        with ops.use_backend(backend):  # the backward keeps the backend the forward ran on
            return ops.layerscale_residual(x, y, gamma, _keep_mask(x, keep_prob), keep_prob)
    return f


def _timm_eager(keep_prob):
    return lambda x, y, gamma: x + timm.layers.drop_path(y * gamma, 1 - keep_prob, training=True)


def _compiled(keep_prob):
    torch._dynamo.reset()  # a fresh static-shape compile per case: no recompile limit, no dynamic kernel
    return torch.compile(lambda x, y, gamma: reference.layerscale_residual(
        x, y, gamma, _keep_mask(x, keep_prob), keep_prob), dynamic=False)


IMPLS = {"triton": lambda p: _ours("triton", p), "cuda": lambda p: _ours("cuda", p),
         "eager": _timm_eager, "compile": _compiled}


def setup(case: common.Case, impl: str, args):
    (B, N, C), (xd, yd, gd) = case.shape, DTYPES[case.dtype]
    keep_prob, device = case.params["keep_prob"], torch.device(args.device)
    f = IMPLS[impl](keep_prob)
    od = torch.promote_types(torch.promote_types(xd, yd), gd)
    numel, drop = B * N * C, int(keep_prob < 1)
    fwd_bytes = numel * (xd.itemsize + yd.itemsize + od.itemsize) + C * gd.itemsize
    # dx is dout itself unless x's dtype differs from the result's; then it must be written too.
    bwd_bytes = (numel * (od.itemsize + 2 * yd.itemsize + (xd.itemsize if xd != od else 0))
                 + C * gd.itemsize)
    fwd_flops, bwd_flops = numel * (2 + drop), numel * (3 + drop)
    sets = common.rotation(numel * (xd.itemsize + yd.itemsize + 2 * od.itemsize), device)

    def inputs(grad):
        x, y, gamma = (torch.randn(shape, device=device, dtype=dt)
                       for shape, dt in (((B, N, C), xd), ((B, N, C), yd), ((C,), gd)))
        # In a network dx = dout flows on to the previous layer for free; a leaf x would instead
        # make autograd copy dout into x.grad. Only a cast to x's dtype is real work to time.
        return x.requires_grad_(grad and xd != od), y.requires_grad_(grad), gamma.requires_grad_(grad)

    return common.directions(f, inputs, sets, lambda: torch.randn((B, N, C), device=device, dtype=od),
                             fwd_bytes, bwd_bytes, fwd_flops, bwd_flops)


def main(argv=None):
    p = common.parser(__doc__, list(IMPLS), warmup_ms=10, rep_ms=40)
    p.add_argument("--dtypes", help=f"comma list out of {','.join(DTYPES)} (x/y/gamma)")
    args = common.parse_args(p, argv)
    device = torch.device(args.device)
    smoke = args.quick and device.type == "cpu"
    shapes = SMOKE_SHAPES if smoke else SHAPES
    dtypes = (args.dtypes or (SMOKE_DTYPES if smoke else ",".join(DTYPES))).split(",")
    report = ops.backend_report()["layerscale_residual"][device.type]["unavailable"]
    impls = {"triton": common.Impl(False, report.get("triton")),
             "cuda": common.Impl(False, report.get("cuda")),
             "eager": common.Impl(True), "compile": common.Impl(True)}
    cases = [common.Case(op, shape, dtype, {"keep_prob": keep_prob})
             for dtype in dtypes
             for op, keep_prob in (("layerscale_residual", 1.0), ("layerscale_residual+droppath", KEEP_PROB))
             for shape in shapes.values()]
    notes = {"dtype": "x/y/gamma storage dtypes; the result has their promoted dtype",
             "shapes": ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items()),
             "eager": "timm's x + drop_path(ls(y)); compile: torch.compile of the reference, static shapes",
             "droppath": f"keep_prob {KEEP_PROB}, per-sample mask drawn on every forward"}
    common.run("layerscale_residual", args, cases, impls, setup, {"notes": notes})


if __name__ == "__main__":
    main()
