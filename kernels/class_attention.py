"""Class-attention (CaiT): one query per (batch, head) against N keys, softmax(q k^T * scale) v.

Pure bandwidth: every key and value is used once, so the kernels read K and V exactly once with
coalesced row loads and do the arithmetic on CUDA cores (elementwise product + tl.sum over the
head dim). Nothing is padded to a 64-row MMA tile, as a generic attention kernel does with the
single query.

Forward: program (bh, split) streams the keys of its split in BLOCK_N x BLOCK_D tiles. The
softmax is online *per row slot* of the tile: slot r keeps its own running max m[r], sum l[r]
and accumulator acc[r, :] over keys r, r + BLOCK_N, ..., so the loop has no cross-warp
reduction (only the D-reduction of q.k inside a warp); slots are merged once at the end.
When B*H alone cannot fill the GPU (CaiT-S24 at B=8: 64 programs for 132 SMs), the key axis is
split across programs, each writes (m, l, acc) in fp32 and a small kernel merges them in a fixed
order. The forward saves the log-sum-exp per (b, h) (log2 units) and the output in fp32 (D floats
per (b, h), ~0.5 % of the K/V read at CaiT shapes) for the backward.

Backward (with delta = sum(dO * O), P_j = exp(s_j - lse), dP_j = dO . v_j, dS_j = P_j (dP_j - delta)):
delta comes from the fp32 output, not the one rounded to the input dtype: where one key takes
nearly all the weight (P ~ 0.999, common in a trained class-attention layer) dP_j - delta cancels,
and delta's rounding error (2^-8 of it in bf16) was then many times that key's true dk.
dv_j = P_j dO and dk_j = scale dS_j q belong to one key each, so the program owning key j writes
them directly; dq = scale sum_j dS_j k_j is summed per split in fp32 and the per-split partials are
summed in a fixed order by a second small kernel. No atomics: grads are bitwise reproducible.

q, k, v and dO are addressed with all their strides (a stride of 1 is specialised by the JIT),
so views of a (B, N, 2, H, D) projection or a transposed (B, 1, H, D) query go in without a copy.
Head dims that are not a power of two (CaiT's 48) use one masked BLOCK_D = next_pow2(D) tile.
"""
import functools

import torch
import triton
import triton.language as tl

from . import cdiv, launch, next_pow2

HEAD_DIMS = (32, 48, 64, 80, 96, 128)
# Elements per K (and V) tile: 4096 = 32 per thread at 4 warps, 8 KB of bf16 per tensor in flight
# (BLOCK_N = 128/64/32 keys at D <= 32/64/128). sm_90 AOT: 80-96 registers, no spills. The
# backward also holds dq's accumulator and stores dk, dv tiles: at 4096 it hit 128 registers, at
# 2048 it needs 92-96, so 5 programs of 4 warps fit an SM in either direction.
FWD_TILE, BWD_TILE, NUM_WARPS = 4096, 2048, 4
MAX_SPLITS = 32  # the combine kernels load all splits of one (b, h) as one 32-row tile
# Programs to aim for when splitting the key axis: SMs x PROGRAMS_PER_SM, i.e. one wave of 4
# resident programs per SM (~64 KB of K/V loads in flight per SM). Not measured on a GPU yet.
PROGRAMS_PER_SM = 4
# K/V tiles in flight per program (tl.range's software pipeline: cp.async copies of the next
# tiles while this one computes). The unpipelined loop, which an H100 ran at 40-63 % of the HBM
# roofline in the forward (2026-11-26), loaded a tile, waited and computed. At 3 stages the sm_90
# loops hold 24 (fwd) / 12 (bwd) LDGSTS for 32 / 16 KB of shared memory and 96-120 registers
# (80-96 before). Not yet timed: bench.tune's class_attention.* try 1 (no pipeline) and 2.
STAGES = 3
TARGET_PROGRAMS = None  # overrides SMs x PROGRAMS_PER_SM; tests force (large) or forbid (1) splits
LOG2E = 1.4426950408889634


@triton.jit
def _kv_tile(k_base, v_base, n0, end, d, dmask, skn, skd, svn, svd, BLOCK_N: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N of K and V (zero past `end`) in fp32, their row mask and the
    (row, col) mask of the tile."""
    rows = n0 + tl.arange(0, BLOCK_N)
    rmask = rows < end
    mask = rmask[:, None] & dmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    k = tl.load(k_base + r64 * skn + d[None, :] * skd, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_base + r64 * svn + d[None, :] * svd, mask=mask, other=0.0).to(tl.float32)
    return k, v, r64, rmask, mask


@triton.jit
def _ca_fwd(Q, K, V, O, OF, LSE, PM, PL, PACC,
            sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, sod,
            H, N, D, BH, chunk, qk_scale,
            SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            STAGES: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    # scale and log2(e) folded into q once: the scores come out in log2 units for exp2
    q = tl.load(Q + b * sqb + h * sqh + d * sqd, mask=dmask, other=0.0).to(tl.float32) * qk_scale
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        k, v, _, rmask, _ = _kv_tile(k_base, v_base, n0, end, d, dmask, skn, skd, svn, svd, BLOCK_N)
        s = tl.where(rmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a slot with no key yet: no NaN
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    # merge the row slots; the split holds >= 1 key, so m_max is finite
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(l * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0)
    if SPLIT:
        part = split.to(tl.int64) * BH + bh
        tl.store(PM + part, m_max)
        tl.store(PL + part, l_sum)
        tl.store(PACC + part * D + d, o, mask=dmask)
    else:
        o = o / l_sum
        tl.store(O + b * sob + h * soh + d * sod, o.to(O.dtype.element_ty), mask=dmask)
        tl.store(OF + bh.to(tl.int64) * D + d, o, mask=dmask)
        tl.store(LSE + bh, m_max + tl.log2(l_sum))


@triton.jit
def _ca_fwd_combine(PM, PL, PACC, O, OF, LSE, sob, soh, sod, H, D, BH, splits,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask, dmask = s < splits, d < D
    part = s.to(tl.int64) * BH + bh
    m = tl.load(PM + part, mask=smask, other=float("-inf"))
    l = tl.load(PL + part, mask=smask, other=0.0)
    acc = tl.load(PACC + part[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(l * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / l_sum
    tl.store(O + b * sob + h * soh + d * sod, o.to(O.dtype.element_ty), mask=dmask)
    tl.store(OF + bh.to(tl.int64) * D + d, o, mask=dmask)
    tl.store(LSE + bh, m_max + tl.log2(l_sum))


@triton.jit
def _ca_bwd(Q, K, V, OF, DO, LSE, DQ, DK, DV,
            sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdd,
            sgb, sgh, sgn, H, N, D, BH, chunk, scale, qk_scale,
            SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            STAGES: tl.constexpr):
    # DK and DV share one layout (strides sgb, sgh, sgn; unit last stride). DQ is (B*H, D)
    # contiguous in q's dtype, or (splits, B*H, D) fp32 partials when SPLIT. OF: the forward's
    # fp32 output, (B*H, D) contiguous.
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * sqb + h * sqh + d * sqd, mask=dmask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + d * sdd, mask=dmask, other=0.0).to(tl.float32)
    o = tl.load(OF + bh.to(tl.int64) * D + d, mask=dmask, other=0.0)
    delta = tl.sum(do * o, axis=0)  # recomputed per split: 2 x D loads, no extra kernel
    lse = tl.load(LSE + bh)
    q2 = q * qk_scale
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    g_base = b * sgb + h * sgh
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        k, v, r64, rmask, mask = _kv_tile(k_base, v_base, n0, end, d, dmask, skn, skd, svn, svd, BLOCK_N)
        p = tl.where(rmask, tl.exp2(tl.sum(k * q2[None, :], axis=1) - lse), 0.0)
        dp = tl.sum(v * do[None, :], axis=1)
        ds = p * (dp - delta)
        g_ptrs = g_base + r64 * sgn + d[None, :]
        tl.store(DV + g_ptrs, (p[:, None] * do[None, :]).to(DV.dtype.element_ty), mask=mask)
        tl.store(DK + g_ptrs, ((ds * scale)[:, None] * q[None, :]).to(DK.dtype.element_ty), mask=mask)
        dq += ds[:, None] * k
    dq_sum = tl.sum(dq, axis=0) * scale
    if SPLIT:
        tl.store(DQ + (split.to(tl.int64) * BH + bh) * D + d, dq_sum, mask=dmask)
    else:
        tl.store(DQ + bh.to(tl.int64) * D + d, dq_sum.to(DQ.dtype.element_ty), mask=dmask)


@triton.jit
def _ca_bwd_dq_combine(PDQ, DQ, D, BH, splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    part = s.to(tl.int64) * BH + bh
    pdq = tl.load(PDQ + part[:, None] * D + d[None, :], mask=(s < splits)[:, None] & dmask[None, :],
                  other=0.0)
    tl.store(DQ + bh.to(tl.int64) * D + d, tl.sum(pdq, axis=0).to(DQ.dtype.element_ty), mask=dmask)


def _block_n(block_d: int, tile: int) -> int:
    return max(16, min(128, tile // block_d))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    return PROGRAMS_PER_SM * sms


def split_plan(bh: int, n: int, block_n: int, device: torch.device):
    """(splits, chunk): split the N keys into `splits` chunks of `chunk` keys (a multiple of
    block_n, every chunk non-empty) so that bh x splits programs come close to the target (but do
    not pass it: a second partial wave costs more than it hides)."""
    tiles = cdiv(n, block_n)
    want = max(1, min(tiles, MAX_SPLITS, _target_programs(device) // max(bh, 1)))
    tiles_per = cdiv(tiles, want)
    return cdiv(tiles, tiles_per), tiles_per * block_n


def _grad_layout(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor for t's gradient, token-major (B, N, H, D) in memory when t is
    a head-split view of a (B, N, H*D) projection (timm's reshape + permute): the view's backward
    then needs no copy."""
    B, H, N, D = t.shape
    if t.stride(1) < t.stride(2):
        return torch.empty((B, N, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty((B, H, N, D), dtype=t.dtype, device=t.device)


def forward(q, k, v, scale: float):
    """q (B, H, 1, D); k, v (B, H, N, D), any strides -> (out (B, H, 1, D) in q's dtype,
    lse (B, H) fp32 in log2 units, out_f32 (B, H, 1, D) the same output in fp32, contiguous)."""
    B, H, N, D = k.shape
    BH, block_d = B * H, next_pow2(D)
    block_n = _block_n(block_d, FWD_TILE)
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H), dtype=torch.float32, device=q.device)
    out_f32 = torch.empty((B, H, 1, D), dtype=torch.float32, device=q.device)
    if BH == 0:
        return out, lse, out_f32
    splits, chunk = split_plan(BH, N, block_n, q.device)
    split = splits > 1
    if split:
        pm, pl = (torch.empty((splits, BH), dtype=torch.float32, device=q.device) for _ in range(2))
        pacc = torch.empty((splits, BH, D), dtype=torch.float32, device=q.device)
    else:
        pm = pl = pacc = None
    launch(_ca_fwd, (BH, splits),
        q, k, v, out, out_f32, lse, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        out.stride(0), out.stride(1), out.stride(3), H, N, D, BH, chunk, scale * LOG2E,
        SPLIT=split, BLOCK_N=block_n, BLOCK_D=block_d, STAGES=STAGES, num_warps=NUM_WARPS)
    if split:
        launch(_ca_fwd_combine, (BH,), pm, pl, pacc, out, out_f32, lse, out.stride(0),
               out.stride(1), out.stride(3), H, D, BH, splits, BLOCK_S=MAX_SPLITS,
               BLOCK_D=block_d, num_warps=NUM_WARPS)
    return out, lse, out_f32


def backward(do, q, k, v, out_f32, lse, scale: float):
    """out_f32, lse: from forward. -> (dq, dk, dv) in the inputs' dtype; dk, dv share one layout
    (see _grad_layout)."""
    B, H, N, D = k.shape
    BH, block_d = B * H, next_pow2(D)
    block_n = _block_n(block_d, BWD_TILE)
    dq = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    dk, dv = _grad_layout(k), _grad_layout(k)
    if BH == 0:
        return dq, dk, dv
    splits, chunk = split_plan(BH, N, block_n, q.device)
    split = splits > 1
    pdq = torch.empty((splits, BH, D), dtype=torch.float32, device=q.device) if split else dq
    launch(_ca_bwd, (BH, splits),
        q, k, v, out_f32.contiguous(), do, lse, pdq, dk, dv,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        do.stride(0), do.stride(1), do.stride(3),
        dk.stride(0), dk.stride(1), dk.stride(2), H, N, D, BH, chunk, scale, scale * LOG2E,
        SPLIT=split, BLOCK_N=block_n, BLOCK_D=block_d, STAGES=STAGES, num_warps=NUM_WARPS)
    if split:
        launch(_ca_bwd_dq_combine, (BH,), pdq, dq, D, BH, splits, BLOCK_S=MAX_SPLITS,
               BLOCK_D=block_d, num_warps=NUM_WARPS)
    return dq, dk, dv


def aot_configs(dtype: str):
    """Every shipped variant, for the sm_90 AOT test (see layerscale.py): per power-of-two head
    block, the split and non-split forward and backward and the two combine kernels. Unit
    last strides are constexpr 1 (as the JIT specialises them); the other strides, N, D and the
    chunk are multiples of 16 at CaiT shapes (D = 48, rows of H*D or 2*H*D elements)."""
    unit = ("sqd", "skd", "svd", "sod", "sdd")
    strides = ("sqb", "sqh", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "sdb", "sdh",
               "sgb", "sgh", "sgn")
    ints = dict.fromkeys(("H", "N", "D", "BH", "chunk", "splits") + strides, "i32")
    ints.update(scale="fp32", qk_scale="fp32")
    ptrs = dict.fromkeys(("Q", "K", "V", "O", "DO", "DK", "DV"), f"*{dtype}")
    ptrs.update(dict.fromkeys(("OF", "LSE", "PM", "PL", "PACC", "PDQ"), "*fp32"))

    def variant(kernel, **constexprs):
        constexprs.update({a: 1 for a in unit if a in kernel.arg_names})
        sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
        if kernel is _ca_bwd:  # DQ: q's dtype, or the fp32 partials
            sig["DQ"] = "*fp32" if constexprs["SPLIT"] else f"*{dtype}"
        if kernel is _ca_bwd_dq_combine:
            sig["DQ"] = f"*{dtype}"
        return dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=NUM_WARPS,
                    aligned=("D", "chunk") + strides, matmul=False)

    for block_d in sorted({next_pow2(d) for d in HEAD_DIMS}):
        for split in (False, True):
            yield variant(_ca_fwd, SPLIT=split, BLOCK_N=_block_n(block_d, FWD_TILE),
                          BLOCK_D=block_d, STAGES=STAGES)
            yield variant(_ca_bwd, SPLIT=split, BLOCK_N=_block_n(block_d, BWD_TILE),
                          BLOCK_D=block_d, STAGES=STAGES)
        yield variant(_ca_fwd_combine, BLOCK_S=MAX_SPLITS, BLOCK_D=block_d)
        yield variant(_ca_bwd_dq_combine, BLOCK_S=MAX_SPLITS, BLOCK_D=block_d)
