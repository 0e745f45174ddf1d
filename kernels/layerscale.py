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

from . import DTYPES, cdiv, launch, next_pow2

BLOCK_R, BLOCK_C, NUM_WARPS = 16, 256, 8  # 4096-element tiles, 16 per thread; 256 columns = 512 B of bf16
MAX_C = 65535 * BLOCK_C  # column tiles are the grid's second axis, which CUDA caps at 65535
BWD_PROGRAMS = 1024  # row strips in the backward: enough to fill 132 SMs a few times over
# Row tiles a backward strip has in flight (tl.range's software pipeline: cp.async copies of the
# next tiles' loads while this one computes). On an H100 (2026-11-26) the residual + LayerNorm
# backward, then without it, ran at 29-42 % of the HBM roofline: its SASS loaded a tile, waited,
# computed and stored, with nothing in flight across iterations. At 3 stages the 192-wide bf16
# variant's loop holds 21 LDGSTS, and it needs 80 registers instead of 98 (3 programs of 8 warps
# per SM, not 2) for 33 KB of shared memory. Not yet timed: bench.tune's layerscale.ln_bwd tries
# 1 (no pipeline), 2 and 4. _stages caps it where a tile's copies would not fit.
BWD_STAGES = 3
SHARED_BUDGET = 96 * 1024  # bytes of pipeline buffers a backward program may take


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


def _stages(block_r: int, block_c: int, *element_sizes: int) -> int:
    """BWD_STAGES, less where that many copies of one iteration's loads (a block_r x block_c tile
    of each tensor, element_sizes bytes per element) would pass SHARED_BUDGET; at least 1 (no
    pipeline)."""
    return max(1, min(BWD_STAGES, SHARED_BUDGET // (block_r * block_c * sum(element_sizes))))


@triton.jit
def _layerscale_bwd(DO, Y, G, S, DY, PARTIAL, rows, N, C, sdb, sdn, syb, syn, rows_per_prog,
                    HAS_GAMMA: tl.constexpr, HAS_DROP: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_GAMMA:
        g = tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in tl.range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_R,
                          num_stages=STAGES):
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
        tl.store(PARTIAL + pid.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=cmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a (B, N, C) view with unit column stride; copies only when no such view exists."""
    t = t.unsqueeze(1) if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(x, y, gamma, scale, out_dtype):
    """x, y: (B, ..., C); gamma: (C,) or None; scale: fp32 (B,) DropPath factors or None."""
    x3, y3 = _rows(x), _rows(y)
    B, N, C = x3.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    grid = (cdiv(B * N, BLOCK_R), cdiv(C, BLOCK_C))
    launch(_layerscale_fwd, grid, x3, y3, gamma, scale, out, B * N, N, C, x3.stride(0),
           x3.stride(1), y3.stride(0), y3.stride(1), HAS_GAMMA=gamma is not None,
           HAS_DROP=scale is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    return out


def backward(dout, y, gamma, scale):
    """Returns (dy, dgamma); dgamma is fp32-accumulated, cast to gamma's dtype, or None."""
    d3, y3 = _rows(dout), _rows(y)
    B, N, C = d3.shape
    rows = B * N
    rows_per_prog = cdiv(cdiv(rows, BWD_PROGRAMS), BLOCK_R) * BLOCK_R
    programs = cdiv(rows, rows_per_prog)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    partial = (torch.empty((programs, C), dtype=torch.float32, device=y.device)
               if gamma is not None else None)
    launch(_layerscale_bwd, (programs, cdiv(C, BLOCK_C)),
        d3, y3, gamma, scale, dy, partial, rows, N, C, d3.stride(0), d3.stride(1),
        y3.stride(0), y3.stride(1), rows_per_prog, HAS_GAMMA=gamma is not None,
        HAS_DROP=scale is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        STAGES=_stages(BLOCK_R, BLOCK_C, d3.element_size(), y3.element_size()),
        num_warps=NUM_WARPS)
    dgamma = partial.sum(0).to(gamma.dtype) if gamma is not None else None
    return dy, dgamma


# --- layerscale_residual_layernorm: the residual above, then the next LayerNorm, in one pass ---
# A program owns BLOCK_R whole rows (BLOCK_C = next power of two >= C) so the row statistics
# stay in registers. The forward saves mean and rstd (fp32, one each per row) and the block
# output; the backward recomputes x_hat from them. HAS_RESIDUAL=False is a plain LayerNorm.


@triton.jit
def _residual_ln_fwd(X, Y, G, S, W, Bias, OUT, NORMED, MEAN, RSTD, rows, N, C, sxb, sxn, syb, syn,
                     eps, HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     HAS_DROP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask, cmask = r < rows, c < C
    mask = rmask[:, None] & cmask[None, :]
    b, n = (r // N).to(tl.int64), (r % N).to(tl.int64)
    rc = r.to(tl.int64)[:, None] * C + c[None, :]
    out = tl.load(X + (b * sxb + n * sxn)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + (b * syb + n * syn)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            y = y * tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_DROP:
            y = y * tl.load(S + b, mask=rmask, other=0.0)[:, None]
        out = (out + y).to(OUT.dtype.element_ty)
        tl.store(OUT + rc, out, mask=mask)
        out = out.to(tl.float32)  # normalise the stored (rounded) value, as eager code would
    mean = tl.sum(out, axis=1) / C
    diff = tl.where(mask, out - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + c, mask=cmask, other=0.0).to(tl.float32)
    normed = diff * rstd[:, None] * w[None, :] + bias[None, :]
    tl.store(NORMED + rc, normed.to(NORMED.dtype.element_ty), mask=mask)
    tl.store(MEAN + r, mean, mask=rmask)
    tl.store(RSTD + r, rstd, mask=rmask)


@triton.jit
def _residual_ln_bwd(DOUT, DNORM, OUT, Y, G, S, W, MEAN, RSTD, DX, DY, PARTIAL, rows, N, C,
                     sob, son, snb, snn, syb, syn, rows_per_prog, programs,
                     HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr,
                     HAS_DROP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     STAGES: tl.constexpr):
    # PARTIAL is (3, programs, C): this program's column sums for dgamma, dweight, dbias.
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + c, mask=cmask, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in tl.range(pid * rows_per_prog, (pid + 1) * rows_per_prog, BLOCK_R,
                          num_stages=STAGES):
        r = start + tl.arange(0, BLOCK_R)
        rmask = r < rows
        mask = rmask[:, None] & cmask[None, :]
        b, n = (r // N).to(tl.int64), (r % N).to(tl.int64)
        rc = r.to(tl.int64)[:, None] * C + c[None, :]
        v = tl.load(OUT + rc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + r, mask=rmask, other=0.0)
        x_hat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
        dn = tl.load(DNORM + (b * snb + n * snn)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc_w += dn * x_hat
        acc_b += dn
        dxh = dn * w[None, :]
        m1 = tl.sum(dxh, axis=1) / C
        m2 = tl.sum(dxh * x_hat, axis=1) / C
        d = tl.where(mask, (dxh - m1[:, None] - x_hat * m2[:, None]) * rstd[:, None], 0.0)
        if HAS_RESIDUAL:
            d += tl.load(DOUT + (b * sob + n * son)[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = d
            if HAS_DROP:
                dy = dy * tl.load(S + b, mask=rmask, other=0.0)[:, None]
            if HAS_GAMMA:
                y = tl.load(Y + (b * syb + n * syn)[:, None] + c[None, :], mask=mask, other=0.0)
                acc_g += dy * y.to(tl.float32)
                dy = dy * g[None, :]
            tl.store(DY + rc, dy.to(DY.dtype.element_ty), mask=mask)
        tl.store(DX + rc, d.to(DX.dtype.element_ty), mask=mask)
    if HAS_GAMMA:
        tl.store(PARTIAL + pid * C + c, tl.sum(acc_g, axis=0), mask=cmask)
    tl.store(PARTIAL + (programs + pid) * C + c, tl.sum(acc_w, axis=0), mask=cmask)
    tl.store(PARTIAL + (2 * programs + pid) * C + c, tl.sum(acc_b, axis=0), mask=cmask)


@triton.jit
def _column_sums(PARTIAL, DG, DW, DB, programs, C, HAS_GAMMA: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (cdiv(C, BLOCK_N), 3 or 2 without gamma): grad[c] = sum over p of PARTIAL[a, p, c]
    # for a = dgamma, dweight, dbias, in a fixed order, cast to the grad's dtype. One launch for
    # the three column sums of _residual_ln_bwd: three torch sums were three launches, a fixed
    # cost of a few microseconds each on a backward of some tens.
    a = tl.program_id(1)
    if not HAS_GAMMA:
        a += 1
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < C
    p = tl.arange(0, BLOCK_P)
    src = PARTIAL + a.to(tl.int64) * programs * C
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, programs, BLOCK_P):
        strip = start + p
        acc += tl.load(src + strip[:, None] * C + c[None, :],
                       mask=(strip < programs)[:, None] & cmask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if HAS_GAMMA:
        if a == 0:
            tl.store(DG + c, total.to(DG.dtype.element_ty), mask=cmask)
    if a == 1:
        tl.store(DW + c, total.to(DW.dtype.element_ty), mask=cmask)
    if a == 2:
        tl.store(DB + c, total.to(DB.dtype.element_ty), mask=cmask)


# _column_sums' tile: 32 columns (128-byte rows of fp32) by 128 strips, 16 elements a thread;
# BWD_PROGRAMS strips take at most 8 steps. Untimed on a GPU.
COLSUM_P, COLSUM_N, COLSUM_WARPS = 128, 32, 8
LN_FWD_TILE, LN_BWD_TILE = 4096, 2048  # elements per program tile
# Warps of a forward program; None: _ln_tile's (8, more for rows past 2048). A tuning knob: on
# an H200 (2026-11-27) the forward ran 5-15 % behind torch.compile's at every ViT width, and
# bench.tune's layerscale.ln_fwd now also tries smaller programs at 2 and 4 warps (never timed).
LN_FWD_WARPS = None
LN_MAX_C = 8192  # widest row a program holds in registers (32 warps, 8 elements per thread)


def _ln_tile(C: int, tile: int):
    """(BLOCK_R, BLOCK_C, num_warps) for whole rows of C. The backward tile is half the forward's:
    it keeps three fp32 column-sum tiles live, and at 4096 elements it needed 150-255 registers
    per thread at sm_90, i.e. one resident block per SM."""
    block_c = next_pow2(C)
    return max(1, tile // block_c), block_c, max(8, block_c // 256)


def _ln_fwd_tile(C: int):
    """_ln_tile of the forward, with LN_FWD_WARPS where set."""
    block_r, block_c, warps = _ln_tile(C, LN_FWD_TILE)
    return block_r, block_c, LN_FWD_WARPS or warps


def residual_layernorm_forward(x, y, gamma, scale, weight, bias, eps, out_dtype):
    """-> (out, normed, mean, rstd). y None: plain LayerNorm of x (out is then None).
    normed takes out's dtype (x's for a plain LayerNorm); mean and rstd are fp32 (rows,)."""
    x3 = _rows(x)
    y3 = _rows(y) if y is not None else x3
    B, N, C = x3.shape
    block_r, block_c, warps = _ln_fwd_tile(C)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device) if y is not None else None
    normed = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean, rstd = (torch.empty(B * N, dtype=torch.float32, device=x.device) for _ in range(2))
    launch(_residual_ln_fwd, (cdiv(B * N, block_r),),
        x3, y3, gamma, scale, weight, bias, out, normed, mean, rstd, B * N, N, C, x3.stride(0),
        x3.stride(1), y3.stride(0), y3.stride(1), eps, HAS_RESIDUAL=y is not None,
        HAS_GAMMA=gamma is not None, HAS_DROP=scale is not None, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=warps)
    return out, normed, mean, rstd


def residual_layernorm_backward(dout, dnormed, out, y, gamma, scale, weight, mean, rstd, x_dtype):
    """-> (dx, dy, dgamma, dweight, dbias). For a plain LayerNorm pass out = x and y = dout = None:
    dy and dgamma are then None. Column sums are fp32 per-strip partials, then _column_sums."""
    n3 = _rows(dnormed)
    d3 = _rows(dout) if dout is not None else n3
    y3 = _rows(y) if y is not None else n3
    src = out.contiguous()
    B, N, C = n3.shape
    rows = B * N
    block_r, block_c, warps = _ln_tile(C, LN_BWD_TILE)
    rows_per_prog = cdiv(cdiv(rows, BWD_PROGRAMS), block_r) * block_r
    programs = cdiv(rows, rows_per_prog)
    dx = torch.empty(src.shape, dtype=x_dtype, device=src.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if y is not None else None
    partial = torch.empty((3, programs, C), dtype=torch.float32, device=src.device)
    launch(_residual_ln_bwd, (programs,),
        d3, n3, src, y3, gamma, scale, weight, mean, rstd, dx, dy, partial, rows, N, C,
        d3.stride(0), d3.stride(1), n3.stride(0), n3.stride(1), y3.stride(0), y3.stride(1),
        rows_per_prog, programs, HAS_RESIDUAL=y is not None, HAS_GAMMA=gamma is not None,
        HAS_DROP=scale is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        STAGES=_stages(block_r, block_c, *(t.element_size() for t in (n3, d3, src, y3))),
        num_warps=warps)
    has_gamma = gamma is not None
    dgamma = torch.empty(C, dtype=gamma.dtype, device=src.device) if has_gamma else None
    dweight, dbias = (torch.empty(C, dtype=weight.dtype, device=src.device) for _ in range(2))
    launch(_column_sums, (cdiv(C, COLSUM_N), 3 if has_gamma else 2),
        partial, dgamma, dweight, dbias, programs, C, HAS_GAMMA=has_gamma, BLOCK_P=COLSUM_P,
        BLOCK_N=COLSUM_N, num_warps=COLSUM_WARPS)
    return dx, dy, dgamma, dweight, dbias


def aot_configs(dtype: str):
    """Every shipped variant, for the sm_90 AOT test: dicts of kernel, signature, constexprs,
    num_warps, `aligned` (the int args the JIT would specialise as multiples of 16: all strides at
    ViT widths, none at an odd C) and `matmul` (whether the PTX must use wgmma). dtype is the
    activation type; gamma, DropPath factors and LayerNorm parameters are fp32."""
    strides = ("sxb", "sxn", "syb", "syn", "sdb", "sdn", "sob", "son", "snb", "snn")
    ints = dict.fromkeys(("rows", "N", "C", "rows_per_prog", "programs") + strides, "i32")
    ints["eps"] = "fp32"
    ptrs = dict.fromkeys(("X", "Y", "OUT", "DO", "DY", "DOUT", "DNORM", "DX", "NORMED"), f"*{dtype}")
    ptrs.update(dict.fromkeys(("G", "S", "PARTIAL", "W", "Bias", "MEAN", "RSTD", "DG", "DW", "DB"),
                              "*fp32"))
    size = DTYPES[dtype].itemsize  # bytes per activation element

    def variant(kernel, aligned, **constexprs):
        sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
        return dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=constexprs.pop("warps"),
                    aligned=("C",) + strides if aligned else (), matmul=False)

    for has_gamma in (True, False):
        for has_drop in (True, False):
            for kernel in (_layerscale_fwd, _layerscale_bwd):
                stages = (dict(STAGES=_stages(BLOCK_R, BLOCK_C, size, size))  # dout, y
                          if kernel is _layerscale_bwd else {})
                for aligned in (True, False):
                    yield variant(kernel, aligned, HAS_GAMMA=has_gamma, HAS_DROP=has_drop,
                                  BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, warps=NUM_WARPS, **stages)
    # Residual+LayerNorm: every row tile width for C up to 8192 with the full residual, plus
    # the flag combinations at ViT widths (C = 192 ... 1024).
    flag_sets = [(True, True, True), (False, False, False)]
    for C in (192, 384, 768, 2048, 4096, LN_MAX_C):
        combos = flag_sets + ([(True, False, False), (True, True, False), (True, False, True)]
                              if C <= 1024 else [])
        for has_res, has_gamma, has_drop in combos:
            for kernel in (_residual_ln_fwd, _residual_ln_bwd):
                block_r, block_c, warps = (_ln_fwd_tile(C) if kernel is _residual_ln_fwd
                                           else _ln_tile(C, LN_BWD_TILE))
                stages = (dict(STAGES=_stages(block_r, block_c, *[size] * 4))  # as the host
                          if kernel is _residual_ln_bwd else {})
                yield variant(kernel, True, HAS_RESIDUAL=has_res, HAS_GAMMA=has_gamma,
                              HAS_DROP=has_drop, BLOCK_R=block_r, BLOCK_C=block_c, warps=warps,
                              **stages)
    for has_gamma in (True, False):  # the backward's column sums
        for aligned in (True, False):
            yield variant(_column_sums, aligned, HAS_GAMMA=has_gamma, BLOCK_P=COLSUM_P,
                          BLOCK_N=COLSUM_N, warps=COLSUM_WARPS)
