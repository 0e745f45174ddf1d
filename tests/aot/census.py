"""SASS instructions a thread issues per real (g, i, j) score of the talking-heads kernels, per
mixing family and head count: the static measure behind kernels.talking_heads' default family
(no GPU needed). A proxy, not a time: on an H100 (2026-11-26) these kernels issued at about a
tenth of the rate the counts imply (one 8-warp CTA per SM; every mix crosses warps through
shared memory).

    python tests/aot/census.py        # PYTHONPATH=<a triton 3.6 copy> for the GPU machine's
    python tests/aot/census.py 32 16 16   # CaiT's head dim 48 as 32 + 16, at 16 warps

The last lines give the same measure for the chunked strategy's mixing passes.

Per kernel: the instructions of one outer-loop iteration (a key or query tile), its inner loops
over the heads counted H times (compile_triton.loops gives each loop and its address range),
divided by the scores a thread owns in that tile, less the padded head slots (H of every HG).
"""
import sys

import torch

import compile_triton
from deit_fast.kernels import talking_heads as th


def per_tile(loops, heads: int) -> int:
    """Sum over the outermost loops of (own instructions + heads x their inner loops')."""
    def inside(a, b):
        return b[0] <= a[0] and a[1] <= b[1] and a[:2] != b[:2]
    total = 0
    for loop in loops:
        if any(inside(loop, other) for other in loops):
            continue
        inner = sum(n for (*r, n) in loops if inside((*r, n), loop))
        total += loop[2] - inner + heads * inner
    return total


def main(block_d: int = 64, block_d2: int = 0, warps: int = 0) -> None:
    """Head dim blocks: BLOCK_D (and BLOCK_D2 for the tensor-core kernels: 32 16 is CaiT's 48 as
    they run it, 64 0 the masked block); warps: the tensor-core kernels' num_warps instead of
    TC_TILES' (16: the tune's first candidate)."""
    for heads in (4, 8, 16):
        for tc in (False, True):
            (fwd, dq, dkdv), tiles = th._family(heads, tc, torch.bfloat16)
            if tc and warps:
                tiles = dict(tiles, num_warps=warps)
            hp, hg = tiles["HP"], tiles.get("HG", tiles["HP"])
            consts = {k: v for k, v in tiles.items() if not k.startswith("num_")}
            counts = {}
            kernels = [("fwd", fwd, {}), ("dq", dq, {}), ("dk", dkdv, {"DK": True, "DV": False}),
                       ("dv", dkdv, {"DK": False, "DV": True})]
            if tc:  # FUSED_DKDV: one kernel for both
                kernels.append(("dkdv", dkdv, {"DK": True, "DV": True}))
            for name, kernel, extra in kernels:
                want = dict(consts, BLOCK_D=block_d, **extra, **({"BLOCK_D2": block_d2} if tc else {}))
                cfg = next(c for c in th.aot_configs("bf16") if c["kernel"] is kernel
                           and all(c["constexprs"].get(a) == v for a, v in want.items()))
                compiled = compile_triton.compile_variant(dict(cfg, num_warps=tiles["num_warps"]))
                # real scores a thread owns: slots holding a head below H (HG of HP are heads)
                scores = hp * tiles["BLOCK_M"] * tiles["BLOCK_N"] / (32 * tiles["num_warps"]) * heads / hg
                counts[name] = per_tile(compile_triton.loops(compiled.asm["cubin"]), heads) / scores
            fused = f", fused dk+dv {counts['dkdv']:.0f}: bwd {counts['dq'] + counts['dkdv']:.0f}" if tc else ""
            print(f"H={heads} {'tensor cores' if tc else 'CUDA cores  '}: fwd {counts['fwd']:.0f}, "
                  f"bwd {counts['dq'] + counts['dk'] + counts['dv']:.0f} (dq {counts['dq']:.0f}, "
                  f"dk {counts['dk']:.0f}, dv {counts['dv']:.0f}){fused}", flush=True)

    chunked_counts()


def chunked_counts(n: int = 196) -> None:
    """The same measure for the mixing passes of kernels/talking_heads_chunked.py at N = n keys,
    per group of 16 // HG query rows: one iteration of a program's loop over its groups, plus the
    rest of its SASS (the mixing matrices' loads, the weight grads' reductions) over the
    GROUPS_PER_PROGRAM groups it takes. Its GEMMs, the products, are not counted."""
    from deit_fast.kernels import talking_heads_chunked as chunked
    for heads in (4, 8, 16):
        counts = {}
        for name, kernel in (("fwd", chunked._mix_softmax_fwd), ("bwd", chunked._mix_softmax_bwd)):
            meta = chunked._meta(heads, n, torch.bfloat16, backward=name == "bwd")
            cfg = next(c for c in chunked.aot_configs("bf16") if c["kernel"] is kernel
                       and c["constexprs"]["HG"] == meta["HG"] and c["constexprs"]["NP"] == meta["NP"])
            cubin = compile_triton.compile_variant(cfg).asm["cubin"]
            (start, end, body), = compile_triton.loops(cubin)  # the loop over row groups
            rest = sum(1 for a, _ in compile_triton._sass(cubin) if not start <= a <= end)
            scores = chunked.SLOTS // meta["HG"] * heads * n / (32 * meta["num_warps"])
            counts[name] = (body + rest / chunked.GROUPS_PER_PROGRAM) / scores
        print(f"H={heads} chunked mixing passes (N={n}, {chunked.GROUPS_PER_PROGRAM} groups a program): "
              f"fwd {counts['fwd']:.0f}, bwd {counts['bwd']:.0f}", flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
