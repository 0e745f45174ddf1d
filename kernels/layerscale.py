"""LayerScale residual with per-sample DropPath: out = x + gamma * y * (keep[b] / keep_prob).

Memory-bound: the forward reads x and y once and writes out; the backward reads dout (and y when
gamma needs a grad) and writes dy. dx is dout itself, so no kernel produces it. Rows are addressed
as (b, n) with two strides, so q/k/v-style strided views of a (B, N, C) tensor need no copy.

The gamma grad is a column sum over all rows. For bitwise-reproducible results each program sums a
fixed strip of rows in fp32 into its own slot of `partial`; a plain torch sum over the (few
hundred) slots finishes it: no atomics, so the order never depends on scheduling.
"""
import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C, NUM_WARPS = 16, 256, 8  # 4096-element tiles, 16 per thread; 256 columns = 512 B of bf16
BWD_PROGRAMS = 1024  # row strips in the backward: enough to fill 132 SMs a few times over


@triton.jit
def _layerscale_fwd(X, Y, G, S, OUT, rows, N, C, sxb, sxn, syb, syn,
                    HAS_GAMMA: tl.constexpr, HAS_DROP: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask, cmask = r < rows, c < C
    mask = rmask[:, None] & cmask[None, :]
    b, n = (r // N).to(tl.int64), (r % N).to(tl.int64)  # int64: B*N*C can pass 2**31
    x = tl.load(X + (b * sxb + n * sxn)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + (b * syb + n * syn)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        y = y * tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_DROP:
        y = y * tl.load(S + b, mask=rmask, other=0.0)[:, None]
    out = x + y
    tl.store(OUT + r.to(tl.int64)[:, None] * C + c[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _layerscale_bwd(DO, Y, G, S, DY, PARTIAL, rows, N, C, sdb, sdn, syb, syn, rows_per_prog,
                    HAS_GAMMA: tl.constexpr, HAS_DROP: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_GAMMA:
        g = tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        rmask = r < rows
        mask = rmask[:, None] & cmask[None, :]
        b, n = (r // N).to(tl.int64), (r % N).to(tl.int64)
        do = tl.load(DO + (b * sdb + n * sdn)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DROP:
            do = do * tl.load(S + b, mask=rmask, other=0.0)[:, None]
        if HAS_GAMMA:
            y = tl.load(Y + (b * syb + n * syn)[:, None] + c[None, :], mask=mask, other=0.0)
            acc += do * y.to(tl.float32)
            dy = do * g[None, :]
        else:
            dy = do
        tl.store(DY + r.to(tl.int64)[:, None] * C + c[None, :], dy.to(DY.dtype.element_ty), mask=mask)
    if HAS_GAMMA:
        tl.store(PARTIAL + pid * C + c, tl.sum(acc, axis=0), mask=cmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a (B, N, C) view with unit column stride; copies only when no such view exists."""
    t = t.unsqueeze(1) if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(x, y, gamma, scale, out_dtype):
    """x, y: (B, ..., C); gamma: (C,) or None; scale: fp32 (B,) DropPath factors or None."""
    x3, y3 = _rows(x), _rows(y)
    B, N, C = x3.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(B * N, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _layerscale_fwd[grid](x3, y3, gamma, scale, out, B * N, N, C, x3.stride(0), x3.stride(1),
                          y3.stride(0), y3.stride(1), HAS_GAMMA=gamma is not None,
                          HAS_DROP=scale is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                          num_warps=NUM_WARPS)
    return out


def backward(dout, y, gamma, scale):
    """Returns (dy, dgamma); dgamma is fp32-accumulated, cast to gamma's dtype, or None."""
    d3, y3 = _rows(dout), _rows(y)
    B, N, C = d3.shape
    rows = B * N
    rows_per_prog = triton.cdiv(triton.cdiv(rows, BWD_PROGRAMS), BLOCK_R) * BLOCK_R
    programs = triton.cdiv(rows, rows_per_prog)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    partial = (torch.empty((programs, C), dtype=torch.float32, device=y.device)
               if gamma is not None else None)
    _layerscale_bwd[(programs, triton.cdiv(C, BLOCK_C))](
        d3, y3, gamma, scale, dy, partial, rows, N, C, d3.stride(0), d3.stride(1),
        y3.stride(0), y3.stride(1), rows_per_prog, HAS_GAMMA=gamma is not None,
        HAS_DROP=scale is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    dgamma = partial.sum(0).to(gamma.dtype) if gamma is not None else None
    return dy, dgamma


def aot_configs(dtype: str):
    """Every shipped variant, for the sm_90 AOT test: dicts of kernel, signature, constexprs,
    num_warps, `aligned` (the int args the JIT would specialise as multiples of 16: all strides at
    ViT widths, none at an odd C) and `matmul` (whether the PTX must use wgmma). dtype is the
    activation type; gamma and DropPath factors are fp32."""
    strides = ("sxb", "sxn", "syb", "syn", "sdb", "sdn")
    ints = dict.fromkeys(("rows", "N", "C", "rows_per_prog") + strides, "i32")
    ptrs = dict.fromkeys(("X", "Y", "OUT", "DO", "DY"), f"*{dtype}")
    ptrs.update(dict.fromkeys(("G", "S", "PARTIAL"), "*fp32"))
    for has_gamma in (True, False):
        for has_drop in (True, False):
            flags = dict(HAS_GAMMA=has_gamma, HAS_DROP=has_drop, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
            for kernel in (_layerscale_fwd, _layerscale_bwd):
                sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
                for aligned in (("C",) + strides, ()):
                    yield dict(kernel=kernel, signature=sig, constexprs=flags, num_warps=NUM_WARPS,
                               aligned=aligned, matmul=False)
