"""Talking-heads attention (CaiT), fused: no B x H x N x N tensor is ever written to memory.

    S[h] = scale * q_h k_h^T ;  S'[g] = sum_h w_l[g,h] S[h] + b_l[g] ;  P = softmax_keys(S')
    P'[g] = sum_h w_w[g,h] P[h] + b_w[g] ;  out[g] = P'[g] v_g

Every program holds all H heads of a tile of query rows (or, in the dk/dv backward, of key rows)
as [HP, rows, cols] register tensors, because the mixing couples every head at every (i, j). Two
kernel families: the default mixes on tensor cores (16 slots of heads x row blocks, batched 3D
dots, one block-diagonal [16, 16] product per mixing); the other (HP = H rounded up to a power
of two) runs one 2D tl.dot per head and mixes with broadcast multiply-adds on CUDA cores. H <= 16
in every CaiT.

b_l adds the same constant to a whole softmax row, so it changes nothing: the kernels ignore it
and its gradient is exactly zero. The forward makes two passes over the keys: the first for the
row statistics of the mixed logits (saved as the log-sum-exp, O(B H N)), the second for the
normalised, mixed probabilities times V. The backward recomputes everything from q, k, v and lse:
one kernel per query tile computes delta = rowsum(dP * P) (a first pass), then dq and the
weight grads (per-program partial sums, no atomics); then per key tile one kernel computes dk
and dv (the tensor-core family, FUSED_DKDV; the CUDA-core one launches it once for each).

STRATEGY "chunked" hands both directions to kernels/talking_heads_chunked.py instead (the N x N
products as batched GEMMs, a chunk of images at a time); it saves the same lse, so the two
backwards take either forward, and the default, "chunked_forward", runs its forward with the
backward here (the faster of each on an H200; see STRATEGY).
"""
import itertools
import math

import torch
import triton
import triton.language as tl

from . import DTYPES, cdiv, launch, next_pow2
from . import talking_heads_chunked as chunked
from .attention import _blocks as head_dim_blocks
from .attention import (_head_and_block, _precision, _strides, _tile, _unit_last,
                        token_major_empty)

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 48, 64)  # CaiT uses 48; wider heads would need a smaller tile to fit registers
MAX_HEADS = 16


def _tiles(heads: int):
    """Constexprs and launch options: at most 4096 fp32 per [HP, M, N] tile; 16
    is the smallest dot dimension. 8 warps: at 4, triton 3.6 (the GPU machine's) spilled up to
    1.7 KB per thread in the backward (HP 8, BLOCK_D 64: CaiT-S); at 8 it spills nothing but 32
    bytes in one forward variant (HP 16, BLOCK_D 64), nor does 3.8. Triton's default 3 stages
    (at most 25 KB of shared memory)."""
    hp = max(2, next_pow2(heads))
    block_m = 32 if hp <= 4 else 16
    return dict(HP=hp, BLOCK_M=block_m, BLOCK_N=max(16, min(32, 4096 // (hp * block_m))),
                num_warps=8, num_stages=3)


def _grid(tiles, B: int, N: int, block: str):
    """(grid, the args before H, constexprs) of a launch over blocks of tiles[block] rows: the
    tensor-core kernels take B and HP // HG blocks a program (_blocks), straddling batch
    elements where one batch element's blocks would leave more than 1 in 8 of them dead; the
    CUDA-core ones run a program per block and batch element."""
    if "HG" not in tiles:
        return (cdiv(N, tiles[block]) * B,), (), {}
    groups, blocks = tiles["HP"] // tiles["HG"], cdiv(N, tiles[block])
    straddle = 8 * (cdiv(blocks, groups) * groups - blocks) > blocks
    programs = cdiv(B * blocks, groups) if straddle else B * cdiv(blocks, groups)
    return (programs,), (B,), {"STRADDLE": straddle}


@triton.jit
def _mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N, D, qk_scale,
                  HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """[HP, M, N] mixed logits sum_h w_l[g, h] S[h], in log2 units, without b_l."""
    hh = tl.arange(0, HP)
    mixed = tl.zeros([HP, BLOCK_M, BLOCK_N], tl.float32)
    for h in range(H):
        q = _tile(Q, rows, sqb, sqh, sqn, off_b, h, N, D, 0, BLOCK_D)
        k = _tile(K, cols, skb, skh, skn, off_b, h, N, D, 0, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        w = tl.load(WL + hh * H + h, mask=hh < H, other=0.0).to(tl.float32)  # column h
        mixed += w[:, None, None] * s[None, :, :]
    return mixed


@triton.jit
def _probs(mixed, lse, rows, cols, N):
    """exp2(mixed - lse), zero past N; rows [HP or 1, M] and cols [HP or 1, N] per slot."""
    valid = (rows[:, :, None] < N) & (cols[:, None, :] < N)
    return tl.where(valid, tl.exp2(mixed - lse[:, :, None]), 0.0)


@triton.jit
def _mixed_dprobs(DO, V, WW, off_b, rows, cols, sdb, sdh, sdn, svb, svh, svn, H, N, D,
                  HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dP[h] = sum_g w_w[g, h] (dO_g v_g^T): the grad of the softmax output, [HP, M, N]."""
    hh = tl.arange(0, HP)
    dp = tl.zeros([HP, BLOCK_M, BLOCK_N], tl.float32)
    for g in range(H):
        do = _tile(DO, rows, sdb, sdh, sdn, off_b, g, N, D, 0, BLOCK_D)
        v = _tile(V, cols, svb, svh, svn, off_b, g, N, D, 0, BLOCK_D)
        dpm = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        w = tl.load(WW + g * H + hh, mask=hh < H, other=0.0).to(tl.float32)  # row g
        dp += w[:, None, None] * dpm[None, :, :]
    return dp


@triton.jit
def _stat_offsets(off_b, head, rows, H, N):
    """[HP, M] offsets into a contiguous (B, H, N) per-row statistic (lse, delta): slot s is
    head[s] at rows[s] ([HP or 1, M]) of batch off_b (a scalar, or [HP] per slot)."""
    return (off_b * H + head)[:, None] * N + rows


@triton.jit
def _load_rows(PTR, off_b, head, rows, H, N):
    """[HP, M] per-row statistics (slots as _stat_offsets), zero past H and N."""
    return tl.load(PTR + _stat_offsets(off_b, head, rows, H, N),
                   mask=(head[:, None] < H) & (rows < N), other=0.0)


@triton.jit
def _online_stats(m, l, mixed):
    """One key tile into the running row max m and sum l of exp2 (all [HP, M])."""
    m_new = tl.maximum(m, tl.max(mixed, axis=2))
    return m_new, l * tl.exp2(m - m_new) + tl.sum(tl.exp2(mixed - m_new[:, :, None]), axis=2)


@triton.jit
def _normalised(delta, psum):
    """delta / rowsum(p), 0 for rows without keys. The recomputed p carries lse's rounding: each
    row sums to 1 + e (e ~ 1e-5 where |lse| ~ 150). delta = rowsum(dP * p) carries the same
    factor, so ds = p (dP - delta) would not sum to zero over the row by about e * delta, and dq
    (which sums ds times k, whose shared component can dwarf the rest) would keep that error."""
    return tl.where(psum > 0, delta / psum, 0.0)


@triton.jit
def _store_heads(PTR, value, off_b, head, rows, sb, sh, sn, H, N, D, BLOCK_D: tl.constexpr):
    """[HP, M, BLOCK_D] into a (B, H, N, D) tensor of strides (sb, sh, sn, 1): slot s is head[s]
    at rows[s] ([HP or 1, M]) of batch off_b (a scalar, or [HP] per slot)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (PTR + (off_b * sb + head.to(tl.int64) * sh)[:, None, None]
            + rows.to(tl.int64)[:, :, None] * sn + d[None, None, :])
    mask = (head[:, None, None] < H) & (rows[:, :, None] < N) & (d[None, None, :] < D)
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _store_rows(PTR, value, off_b, head, rows, H, N):
    """[HP, M] per-row statistics into a contiguous (B, H, N) fp32 tensor (slots as _load_rows)."""
    tl.store(PTR + _stat_offsets(off_b, head, rows, H, N), value,
             mask=(head[:, None] < H) & (rows < N))


@triton.jit
def _store_parts(PART, pid, dwl, dww, dbw, HP: tl.constexpr):
    """This program's partial sums of dw_l, dw_w and db_w: PART[pid] is (3, HP, HP)."""
    hh = tl.arange(0, HP)
    sq = hh[:, None] * HP + hh[None, :]
    base = PART + pid.to(tl.int64) * 3 * HP * HP
    tl.store(base + sq, dwl)
    tl.store(base + HP * HP + sq, dww)
    tl.store(base + 2 * HP * HP + hh, dbw)


@triton.jit
def _th_fwd(Q, K, V, WL, WW, BW, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
            sob, soh, son, H, N, D, qk_scale, HP: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    off_b, _, _, block = _head_and_block(1, N, BLOCK_M)  # all heads in one program
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    hh = tl.arange(0, HP)
    m = tl.full([HP, BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([HP, BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: row statistics of the mixed logits
        cols = start + tl.arange(0, BLOCK_N)
        mixed = _mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N, D,
                              qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        mixed = tl.where(cols[None, None, :] < N, mixed, float("-inf"))
        m, l = _online_stats(m, l, mixed)
    lse = m + tl.log2(l)
    acc = tl.zeros([HP, BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 2: mixed probabilities times V
        cols = start + tl.arange(0, BLOCK_N)
        mixed = _mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N, D,
                              qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        p = _probs(mixed, lse, rows[None, :], cols[None, :], N)
        for g in range(H):
            w = tl.load(WW + g * H + hh, mask=hh < H, other=0.0).to(tl.float32)
            pg = tl.sum(w[:, None, None] * p, axis=0) + tl.load(BW + g).to(tl.float32)
            v = _tile(V, cols, svb, svh, svn, off_b, g, N, D, 0, BLOCK_D)  # zero past N
            pv = tl.dot(pg.to(v.dtype), v, input_precision=PRECISION)
            acc = tl.where(hh[:, None, None] == g, acc + pv[None, :, :], acc)
    _store_heads(O, acc, off_b, hh, rows[None, :], sob, soh, son, H, N, D, BLOCK_D)
    _store_rows(LSE, lse, off_b, hh, rows[None, :], H, N)


@triton.jit
def _th_bwd_dq(Q, K, V, DO, WL, WW, LSE, DELTA, DQ, PART, sqb, sqh, sqn, skb, skh, skn,
               svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, qk_scale, scale,
               HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # PART: (programs_total, 3, HP, HP) fp32 partial sums of dw_l, dw_w and (row 0) db_w.
    off_b, _, _, block = _head_and_block(1, N, BLOCK_M)  # all heads in one program
    pid = tl.program_id(0)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    hh = tl.arange(0, HP)
    lse = _load_rows(LSE, off_b, hh, rows[None, :], H, N)
    delta = tl.zeros([HP, BLOCK_M], tl.float32)
    psum = tl.zeros([HP, BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: delta = rowsum(dP * P) per head
        cols = start + tl.arange(0, BLOCK_N)
        p = _probs(_mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N,
                                 D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION), lse, rows[None, :], cols[None, :], N)
        dp = _mixed_dprobs(DO, V, WW, off_b, rows, cols, sdb, sdh, sdn, svb, svh, svn, H, N, D,
                           HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        delta += tl.sum(dp * p, axis=2)
        psum += tl.sum(p, axis=2)
    delta = _normalised(delta, psum)
    _store_rows(DELTA, delta, off_b, hh, rows[None, :], H, N)
    dq = tl.zeros([HP, BLOCK_M, BLOCK_D], tl.float32)
    dwl = tl.zeros([HP, HP], tl.float32)
    dww = tl.zeros([HP, HP], tl.float32)
    dbw = tl.zeros([HP], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 2: dq and the head-mixing weight grads
        cols = start + tl.arange(0, BLOCK_N)
        p = _probs(_mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N,
                                 D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION), lse, rows[None, :], cols[None, :], N)
        dp = tl.zeros([HP, BLOCK_M, BLOCK_N], tl.float32)
        for g in range(H):
            do = _tile(DO, rows, sdb, sdh, sdn, off_b, g, N, D, 0, BLOCK_D)
            v = _tile(V, cols, svb, svh, svn, off_b, g, N, D, 0, BLOCK_D)
            dpm = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP'[g]
            w = tl.load(WW + g * H + hh, mask=hh < H, other=0.0).to(tl.float32)
            dp += w[:, None, None] * dpm[None, :, :]
            dww = tl.where(hh[:, None] == g, dww + tl.sum(tl.sum(dpm[None, :, :] * p, 2), 1)[None, :], dww)
            dbw = tl.where(hh == g, dbw + tl.sum(tl.sum(dpm, 1), 0), dbw)
        ds = p * (dp - delta[:, :, None])  # grad of the mixed logits S'
        for h in range(H):
            w = tl.load(WL + hh * H + h, mask=hh < H, other=0.0).to(tl.float32)  # column h
            dsh = tl.sum(w[:, None, None] * ds, axis=0)  # grad of S[h]
            q = _tile(Q, rows, sqb, sqh, sqn, off_b, h, N, D, 0, BLOCK_D)
            k = _tile(K, cols, skb, skh, skn, off_b, h, N, D, 0, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            dwl = tl.where(hh[None, :] == h, dwl + tl.sum(tl.sum(ds * s[None, :, :], 2), 1)[:, None], dwl)
            dqh = tl.dot(dsh.to(k.dtype), k, input_precision=PRECISION)
            dq = tl.where(hh[:, None, None] == h, dq + dqh[None, :, :], dq)
    _store_heads(DQ, dq * scale, off_b, hh, rows[None, :], sgb, sgh, sgn, H, N, D, BLOCK_D)
    _store_parts(PART, pid, dwl, dww, dbw, HP)


@triton.jit
def _th_bwd_dkdv(Q, K, V, DO, WL, WW, BW, LSE, DELTA, DKO, DVO, sqb, sqh, sqn, skb, skh, skn,
                 svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, qk_scale, scale, HP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """One key tile, all heads, looping over the queries: dk into DKO when DK, dv into DVO when
    DV. backward() launches it once for each (one [HP, BLOCK_N, BLOCK_D] accumulator live, not
    two)."""
    tl.static_assert(DK != DV, "one grad per launch: the accumulator holds dk or dv")
    off_b, _, _, block = _head_and_block(1, N, BLOCK_N)  # all heads in one program
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    hh = tl.arange(0, HP)
    acc = tl.zeros([HP, BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        lse = _load_rows(LSE, off_b, hh, rows[None, :], H, N)
        p = _probs(_mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N,
                                 D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION), lse, rows[None, :], cols[None, :], N)
        if DK:
            dp = _mixed_dprobs(DO, V, WW, off_b, rows, cols, sdb, sdh, sdn, svb, svh, svn, H, N, D,
                               HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            ds = p * (dp - _load_rows(DELTA, off_b, hh, rows[None, :], H, N)[:, :, None])
            for h in range(H):
                w = tl.load(WL + hh * H + h, mask=hh < H, other=0.0).to(tl.float32)
                dsh = tl.sum(w[:, None, None] * ds, axis=0)
                q = _tile(Q, rows, sqb, sqh, sqn, off_b, h, N, D, 0, BLOCK_D)
                dkh = tl.dot(tl.trans(dsh).to(q.dtype), q, input_precision=PRECISION)
                acc = tl.where(hh[:, None, None] == h, acc + dkh[None, :, :], acc)
        if DV:
            for g in range(H):
                w = tl.load(WW + g * H + hh, mask=hh < H, other=0.0).to(tl.float32)
                pg = tl.sum(w[:, None, None] * p, axis=0) + tl.load(BW + g).to(tl.float32)
                do = _tile(DO, rows, sdb, sdh, sdn, off_b, g, N, D, 0, BLOCK_D)  # zero past N
                dvg = tl.dot(tl.trans(pg).to(do.dtype), do, input_precision=PRECISION)
                acc = tl.where(hh[:, None, None] == g, acc + dvg[None, :, :], acc)
    if DK:
        _store_heads(DKO, acc * scale, off_b, hh, cols[None, :], sgb, sgh, sgn, H, N, D, BLOCK_D)
    if DV:
        _store_heads(DVO, acc, off_b, hh, cols[None, :], sgb, sgh, sgn, H, N, D, BLOCK_D)


# ---- the same, with the head mixing on tensor cores ------------------------------------------
# Above, each head's product is its own 2D dot and the H x H mixing is a broadcast multiply-add
# (CUDA cores, O(H^2) per (i, j), plus a where-scatter per head into [HP, ...] accumulators): at
# 8 heads the backward took 7.2 ms at 256x8x196x48 on an H200, slower than timm eager (4.1 ms).
# Here every [16, rows, D] tile holds all heads of one or more row blocks (one strided load), the
# per-head products are batched 3D dots, and each mixing is one [16, 16] x [16, M*N] dot with a
# block-diagonal weight (see _tiles_tc). Instructions a thread issues per real (g, i, j) score,
# bf16, D=48 (a 64-wide block until the last row), sm_90, triton 3.6 (`python tests/aot/census.py
# [32 16]`), fwd / bwd:
#   heads                           4          8          16
#   CUDA cores                   101 / 376  208 / 893  577 / 2115
#   tensor cores, tf32 mixing     38 / 136   40 / 137   38 / 138
#   tensor cores, 16-bit mixing   36 / 113   35 / 115   35 / 117   (see _mix)
#   + dk and dv in one kernel     36 / 106   35 / 105   35 / 106   (FUSED_DKDV)
#   + head dim as 32 + 16         33 / 89    34 / 89    35 / 88    (now: SPLIT_HEAD_DIM)
# (Before the row blocks shared the 16 slots, the tensor-core kernels padded 4 heads to 16: 217 /
# 583, and 8 heads: 109 / 292; streamed pointers and masks on the last tile only took 54 / 150 to
# 44 / 138, and a forward loop of full tiles without masks 45 to 38-40. Programs that straddle
# batch elements (_blocks) cost ~2 more.) On an H100 (2026-11-26, bench.ops.talking_heads, bf16,
# tf32 mixing) the tensor-core family ran fwd+bwd at 256x8x196x48 in 3.76 ms against the CUDA-core
# family's 11.0 ms (timm eager 7.43, torch.compile of it 5.92), and at 256x4x196x48 in 1.91 ms
# (eager 6.34, compile 4.12). So tensor cores run by default at every head count
# (TENSOR_CORE_MIXING True); False forces the CUDA-core kernels. bench.ops.talking_heads times both
# families (impls triton_cuda_cores and triton_tc).
TENSOR_CORE_MIXING = True
# The tensor-core kernels' row tiles and launch options (bench.tune's talking_heads.tc times
# others); see _tiles_tc for why 8 warps and 2 stages.
TC_TILES = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2)
# Warps of the backward's dq kernel alone; None: TC_TILES'. These kernels are latency-bound (ncu on
# an H200, 2026-11-27, dq at 256x8x196x48: 8 warps an SM, one instruction per 11 cycles a warp,
# bench/results/2026-11-27-nvidia-h200-ncu.md), and at 8 warps they take 250-255 registers, so an
# SM holds one 8-warp CTA. At 16 warps the same tiles take 128 registers a thread: still one CTA an
# SM (64 K registers), but twice the warps to hide latency with, for more instructions (a thread
# owns half the scores): per real score at 16 heads, bf16, head dim 32 + 16 (`census.py 32 16
# 16`, triton 3.8), bwd 86 -> 110 and fwd 34 -> 39. Local memory at 16 warps, sm_90, triton 3.8 /
# 3.6 (the GPU machine's): none in dq's loops / one access a tile; the fused dk/dv kernel 15 / 28
# accesses a tile (120 bytes of stack under 3.6, past the AOT test's 64); none in the forward.
# Not yet timed: bench.tune's talking_heads.tc_fwd / tc_bwd try 16 warps for all the kernels, and
# tc_bwd for dq alone and for all with dk and dv in two launches (FUSED_DKDV False), which at 16
# warps take no stack (3.6 and 3.8).
TC_DQ_WARPS = None
# One tensor-core launch computes dk and dv together (_th_bwd_dkdv_tc with DK and DV): the mixed
# logits, their exp2 and the q and dO tiles once for both, not once each. SASS per score of the
# two kernels 50-51 -> 40 under triton 3.6 at a 64-wide head-dim block (backward 113-117 ->
# 105-106, table below), at the price of two live accumulators: 255 registers, and there 9 local
# loads and stores per loop step (none with SPLIT_HEAD_DIM's 32 + 16). One CTA per SM either way
# (shared memory 111 KB at 32 + 16, 143 KB at 64). Not yet timed: False gives the two launches,
# and bench.tune's talking_heads.tc_bwd times both.
FUSED_DKDV = True
# A register cap for the tensor-core forward: None lets ptxas take 250-254 (one 8-warp CTA per
# SM); 128 would let two CTAs share an SM (83 KB of shared memory each) at the price of 14 % more
# SASS per loop step and spills around the loops (triton 3.6: 4 local loads/stores per step,
# ~100 outside). The kernels issued at about a tenth of their rate on an H100, so two CTAs may
# hide more latency than the spills cost: not yet timed (bench.tune's talking_heads.tc_fwd tries
# 128). The backward kernels spill 150-180 times per step at 128: not offered.
TC_FWD_MAXNREG = None
# The tensor-core kernels cover CaiT's head dim 48 with two exact blocks, 32 + 16, as the
# self-attention kernels do (attention.SPLIT_HEAD_DIM), instead of one 64-wide block masked past
# 48: a quarter fewer MMAs and loads per dot over the head dim, and [16, rows, 32 + 16] fp32
# accumulators instead of [16, rows, 64]. SASS per score under triton 3.6 at 8 heads, fwd / bwd:
# 35 / 105 -> 34 / 89, and no spill left in the fused dk/dv loop (census.py; below). Not yet
# timed; False: one masked block.
SPLIT_HEAD_DIM = True
# Where the heads are mixed: "fused", the kernels of this file (nothing N x N in memory), or
# "chunked" (kernels/talking_heads_chunked.py): the N x N products as batched GEMMs and one
# memory-bound mixing pass each, a chunk of images at a time, within 2x q's memory; or
# "chunked_forward": the chunked forward and the fused backward (both save the same lse). On an
# H200 (2026-11-27, `python -m bench.ops.talking_heads`, bf16, CUDA-graph replays) the chunked
# forward beat the fused one at 256x8x196x48 / 256x4x196x48 / 64x16x196x48 (672 / 313 / 278 us
# against 817 / 418 / 412), but its backward lost (3683 / 1908 / 2074 us against 2126 / 1078 /
# 1091: its mixing pass, _mix_softmax_bwd, is bound by shared memory, ncu: mio_throttle, DRAM at
# 4 %), so "chunked_forward" is the default. Rows longer than chunked.MAX_KEYS (CaiT at 384 px
# and up) run fused either way. fp32 inputs take the same path (not timed).
STRATEGIES = ("fused", "chunked", "chunked_forward")
STRATEGY = "chunked_forward"


def _tiles_tc(heads: int):
    """Constexprs and launch options of the tensor-core kernels, for any H <= 16. A program's
    [HP, rows, cols] tiles hold HP = 16 slots (16 is the smallest dot dimension): HP // HG groups
    of HG = H rounded up to a power of two heads, each group its own block of BLOCK_M query rows
    (BLOCK_N key rows in dk/dv). So at 8 heads two row blocks fill the 16 slots where they used to
    be half padding, and at 4 heads four do; the mixing weights are block-diagonal (one H x H block
    per group). 8 warps: at 4, the [16, 16, 64] fp32 accumulators took 544-808 stack bytes per
    thread under triton 3.6 (the GPU machine's) at sm_90; at 8, at most 32 bytes (no spill
    stores). 2 stages: at Triton's default 3 the dq kernel at BLOCK_D 64 (CaiT's head dim 48)
    wanted 243 KB of shared memory, past the 227 KB an sm_90 block may have (it would fail to
    launch); at 2, 195 KB."""
    return dict(HP=16, HG=next_pow2(heads), **TC_TILES)


@triton.jit
def _slots(HP: tl.constexpr, HG: tl.constexpr):
    """(head, group) of each of the HP slots."""
    s = tl.arange(0, HP)
    return s % HG, s // HG


@triton.jit
def _blocks(B, N, group, HP: tl.constexpr, HG: tl.constexpr, BLOCK: tl.constexpr,
            STRADDLE: tl.constexpr):
    """(batch, rows [HP, BLOCK]) of each slot: a program's HP // HG groups take consecutive
    blocks of BLOCK rows. Without STRADDLE they are blocks of one batch element (a scalar batch),
    and a batch's last program has dead groups where HP // HG does not divide its cdiv(N, BLOCK)
    blocks: 196 rows at 4 heads are 13 blocks in 4 programs of 4, 256 rows computed. With
    STRADDLE the B * cdiv(N, BLOCK) blocks of all batch elements are dealt in order, so a
    program's groups may belong to two batch elements (the batch is then [HP], per slot, which
    costs the loops ~4 % more SASS: _grid picks it only where it saves more) and only the last
    program has dead groups. Dead groups' rows start at N: masked everywhere."""
    nb = tl.cdiv(N, BLOCK)
    if STRADDLE:
        idx = tl.program_id(0) * (HP // HG) + group
        live = idx < B * nb
        start = tl.where(live, (idx % nb) * BLOCK, N)
        batch = tl.where(live, idx // nb, 0).to(tl.int64)
    else:
        per = tl.cdiv(nb, HP // HG)  # programs per batch element
        batch = (tl.program_id(0) // per).to(tl.int64)
        start = ((tl.program_id(0) % per) * (HP // HG) + group) * BLOCK
    return batch, start[:, None] + tl.arange(0, BLOCK)[None, :]


@triton.jit
def _slot_ptrs(PTR, head, rows, sb, sh, sn, off_b, BLOCK_D: tl.constexpr):
    """Pointers of a [HP, M, BLOCK_D] tile, slot s holding head[s] at rows[s] ([HP or 1, M]) of
    batch off_b[s]. A loop streaming a tensor computes them once and adds one step per tile:
    recomputing them cost 64-bit multiplies per row."""
    d = tl.arange(0, BLOCK_D)
    return (PTR + (off_b * sb + head.to(tl.int64) * sh)[:, None, None]
            + rows.to(tl.int64)[:, :, None] * sn + d[None, None, :])


@triton.jit
def _slot_load(ptrs, head, rows, H, n_rows, D, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """The tile at ptrs (_slot_ptrs), zero past H and D, and past n_rows when MASKED (a full
    tile of a loop needs no row mask)."""
    d = tl.arange(0, BLOCK_D)
    if MASKED:
        mask = (head[:, None, None] < H) & (rows[:, :, None] < n_rows) & (d[None, None, :] < D)
    else:
        mask = (head[:, None, None] < H) & (d[None, None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _pair_ptrs(PTR, head, rows, sb, sh, sn, off_b, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """_slot_ptrs of the head-dim blocks [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2) (the unit
    last stride makes the second PTR + BLOCK_D); without a second block the first again, unused.
    `if BLOCK_D2 > 0` is resolved at compile time: the one-block variants carry no extra code."""
    p = _slot_ptrs(PTR, head, rows, sb, sh, sn, off_b, BLOCK_D)
    p2 = p
    if BLOCK_D2 > 0:
        p2 = _slot_ptrs(PTR + BLOCK_D, head, rows, sb, sh, sn, off_b, BLOCK_D2)
    return p, p2


@triton.jit
def _pair_load(p, p2, head, rows, H, n_rows, D, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
               MASKED: tl.constexpr):
    """Both head-dim blocks' tiles (_slot_load); without a second block the first again."""
    t = _slot_load(p, head, rows, H, n_rows, D, BLOCK_D, MASKED)
    t2 = t
    if BLOCK_D2 > 0:
        t2 = _slot_load(p2, head, rows, H, n_rows, D - BLOCK_D, BLOCK_D2, MASKED)
    return t, t2


@triton.jit
def _pair_heads(PTR, head, rows, sb, sh, sn, off_b, H, n_rows, D, BLOCK_D: tl.constexpr,
                BLOCK_D2: tl.constexpr):
    """Both head-dim blocks of a [HP, M, D] tile (slots as _slot_ptrs), zero past H and n_rows."""
    p, p2 = _pair_ptrs(PTR, head, rows, sb, sh, sn, off_b, BLOCK_D, BLOCK_D2)
    return _pair_load(p, p2, head, rows, H, n_rows, D, BLOCK_D, BLOCK_D2, True)


@triton.jit
def _pair_zeros(HP: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """fp32 accumulators of both head-dim blocks; without a second block the first again."""
    acc = tl.zeros([HP, R, BLOCK_D], tl.float32)
    acc2 = acc
    if BLOCK_D2 > 0:
        acc2 = tl.zeros([HP, R, BLOCK_D2], tl.float32)
    return acc, acc2


@triton.jit
def _pair_dot_t(a, a2, b, b2, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """a b^T per slot over the whole head dim, [HP, M, N] fp32: both blocks' products."""
    out = tl.dot(a, tl.permute(b, (0, 2, 1)), input_precision=PRECISION)
    if BLOCK_D2 > 0:
        out += tl.dot(a2, tl.permute(b2, (0, 2, 1)), input_precision=PRECISION)
    return out


@triton.jit
def _pair_add_dot(acc, acc2, p, x, x2, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """(acc + p x, acc2 + p x2) per slot, p [HP, R, M] cast to x's dtype."""
    p = p.to(x.dtype)
    acc += tl.dot(p, x, input_precision=PRECISION)
    if BLOCK_D2 > 0:
        acc2 += tl.dot(p, x2, input_precision=PRECISION)
    return acc, acc2


@triton.jit
def _store_pair(PTR, acc, acc2, off_b, head, rows, sb, sh, sn, H, N, D, BLOCK_D: tl.constexpr,
                BLOCK_D2: tl.constexpr):
    _store_heads(PTR, acc, off_b, head, rows, sb, sh, sn, H, N, D, BLOCK_D)
    if BLOCK_D2 > 0:
        _store_heads(PTR + BLOCK_D, acc2, off_b, head, rows, sb, sh, sn, H, N, D - BLOCK_D, BLOCK_D2)


@triton.jit
def _weights(W, H, head, group, TRANSPOSE: tl.constexpr, DT: tl.constexpr):
    """The [HP, HP] block-diagonal mixing matrix in dtype DT (see _mix): W[head[s], head[t]] (W^T
    when TRANSPOSE) where slots s and t are in one group, zero elsewhere and past H."""
    g = head[:, None]
    h = head[None, :]
    ptrs = W + h * H + g if TRANSPOSE else W + g * H + h
    mask = (group[:, None] == group[None, :]) & (g < H) & (h < H)
    return tl.load(ptrs, mask=mask, other=0.0).to(DT)


@triton.jit
def _fold(x, group, HP: tl.constexpr, HG: tl.constexpr):
    """[HP, HP] -> [HG, HG]: the sum of the diagonal blocks, a mixing-weight grad over all the
    groups' rows (the off-diagonal blocks pair slots of different rows and mean nothing)."""
    x = tl.where(group[:, None] == group[None, :], x, 0.0)
    return tl.sum(tl.sum(tl.reshape(x, [HP // HG, HG, HP // HG, HG]), 2), 0)


@triton.jit
def _mix(w, x, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """out[s] = sum_t w[s, t] x[t] for x [HP, M, N]: one product over the slot axis, fp32 out.

    Its operands (and _contract's) are rounded to the inputs' dtype, fp16 or bf16, as timm's
    mixing Linear layers run under autocast; fp32 stays fp32. They used to enter the dot as fp32
    in tf32, and on an H100 (2026-11-26) dw_l and dw_w of fp16 inputs at 196 tokens came out 2.6x
    and 3.1x torch's own fp16 error, failing the test's 2x. The tensor cores read only an fp32
    operand's top 19 bits, i.e. truncate it, and that bias toward zero adds up over the
    B x N x N terms of a weight grad: the interpreter, made to truncate likewise, gave dw_l 2.25x
    and dq 2.96x torch's error at 4 x 8 x 196 x 48, and rounded to nearest 0.84x and 0.95x. fp16
    rounds to nearest with tf32's 11 significant bits, in one conversion per two values (an
    integer rounding of fp32 cost two instructions per value), and its MMAs take twice the k per
    instruction. bf16 keeps 8 bits, timm's own under autocast (not yet run on a GPU).
    """
    flat = tl.dot(w, tl.reshape(x, [HP, M * N]).to(w.dtype), input_precision=PRECISION)
    return tl.reshape(flat, [HP, M, N])


@triton.jit
def _contract(a, b, DT: tl.constexpr, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
              PRECISION: tl.constexpr):
    """[HP, HP] fp32 sum over (i, j) of a[s] * b[t], operands in DT (see _mix): the grad of a
    mixing matrix (before _fold)."""
    return tl.dot(tl.reshape(a, [HP, M * N]).to(DT), tl.trans(tl.reshape(b, [HP, M * N])).to(DT),
                  input_precision=PRECISION)


@triton.jit
def _logits_tc(q, q2, k, k2, wl, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
               BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """(q k^T, sum_h w_l[g, h] q_h k_h^T), both [HP, M, N] and unscaled (mixing is linear: the
    caller applies scale or scale * log2(e)); q2, k2: the second head-dim blocks."""
    s = _pair_dot_t(q, q2, k, k2, BLOCK_D2, PRECISION)
    return s, _mix(wl, s, HP, M, N, PRECISION)


# Padding in the loops below, without per-score masks where the zeros make them harmless (each
# mask costs instructions per score): rows past N and slots past H load zero q, k, v and dO, so
# their logits are 0, their lse (loaded as 0) finite, their dP' and ds zero, and nothing of
# theirs is stored.
# Keys past N need a mask only on the last key tile: -inf in the row statistics, and p = 0, not
# exp2(-lse), which overflows to inf for lse < -128 (inf times a zero row of V, or a zero mixing
# weight, is NaN). The forward's loops stream only full tiles, with no row mask on their loads
# either, and then the partial tile (if any) as one MASKED step after the loop: SASS per tile
# over both passes 716 -> 604 (8 heads, BLOCK_D 64, sm_90, triton 3.6). The backward loops mask
# their loads every tile and their scores on the last one: a MASKED copy of the step after the
# loop pushed dq and dk, already at 255 registers, to 232 and 136 bytes of stack.

@triton.jit
def _stats_tc(q, q2, kp, kp2, wl, m, l, head, keys, H, n_left, D, qk_scale, HP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """The forward's first pass on the key tile at kp, kp2 (n_left keys left when MASKED): the
    running max m and sum l of exp2 of the scaled mixed logits."""
    k, k2 = _pair_load(kp, kp2, head, keys, H, n_left, D, BLOCK_D, BLOCK_D2, MASKED)
    mixed = _logits_tc(q, q2, k, k2, wl, HP, BLOCK_M, BLOCK_N, BLOCK_D2, PRECISION)[1]  # unscaled
    if MASKED:
        mixed = tl.where(keys[:, None, :] < n_left, mixed, float("-inf"))
    # the scale rides in the exponent's FFMA: max(x) * scale == max(x * scale), scale > 0
    m_new = tl.maximum(m, tl.max(mixed, axis=2) * qk_scale)
    l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(mixed * qk_scale - m_new[:, :, None]), axis=2)
    return m_new, l


@triton.jit
def _out_tc(q, q2, kp, kp2, vp, vp2, wl, ww, bw, lse, acc, acc2, head, keys, H, n_left, D, qk_scale,
            HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """The forward's second pass on the key tile at kp, vp (and kp2, vp2): acc += P' v."""
    k, k2 = _pair_load(kp, kp2, head, keys, H, n_left, D, BLOCK_D, BLOCK_D2, MASKED)
    mixed = _logits_tc(q, q2, k, k2, wl, HP, BLOCK_M, BLOCK_N, BLOCK_D2, PRECISION)[1]
    p = tl.exp2(mixed * qk_scale - lse[:, :, None])
    if MASKED:
        p = tl.where(keys[:, None, :] < n_left, p, 0.0)
    pm = _mix(ww, p, HP, BLOCK_M, BLOCK_N, PRECISION) + bw[:, None, None]  # P'
    v, v2 = _pair_load(vp, vp2, head, keys, H, n_left, D, BLOCK_D, BLOCK_D2, MASKED)
    return _pair_add_dot(acc, acc2, pm, v, v2, BLOCK_D2, PRECISION)


@triton.jit
def _th_fwd_tc(Q, K, V, WL, WW, BW, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
               sob, soh, son, B, H, N, D, qk_scale, HP: tl.constexpr, HG: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, STRADDLE: tl.constexpr):
    head, group = _slots(HP, HG)
    off_b, rows = _blocks(B, N, group, HP, HG, BLOCK_M, STRADDLE)
    keys = tl.arange(0, BLOCK_N)[None, :]  # the same keys in every slot, from `start`
    wl = _weights(WL, H, head, group, False, Q.dtype.element_ty)
    ww = _weights(WW, H, head, group, False, Q.dtype.element_ty)
    bw = tl.load(BW + head, mask=head < H, other=0.0).to(tl.float32)
    q, q2 = _pair_heads(Q, head, rows, sqb, sqh, sqn, off_b, H, N, D, BLOCK_D, BLOCK_D2)
    m = tl.full([HP, BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([HP, BLOCK_M], tl.float32)
    full = N - N % BLOCK_N
    kp, kp2 = _pair_ptrs(K, head, keys, skb, skh, skn, off_b, BLOCK_D, BLOCK_D2)
    for start in range(0, full, BLOCK_N):  # pass 1: row statistics of the mixed logits
        m, l = _stats_tc(q, q2, kp, kp2, wl, m, l, head, keys, H, BLOCK_N, D, qk_scale, HP,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, PRECISION, False)
        kp, kp2 = kp + BLOCK_N * skn, kp2 + BLOCK_N * skn
    if full < N:  # (pointers made afresh: the loop's, live past it, cost adds in every step)
        kp, kp2 = _pair_ptrs(K, head, keys + full, skb, skh, skn, off_b, BLOCK_D, BLOCK_D2)
        m, l = _stats_tc(q, q2, kp, kp2, wl, m, l, head, keys, H, N - full, D, qk_scale, HP,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, PRECISION, True)
    lse = m + tl.log2(l)
    acc, acc2 = _pair_zeros(HP, BLOCK_M, BLOCK_D, BLOCK_D2)
    kp, kp2 = _pair_ptrs(K, head, keys, skb, skh, skn, off_b, BLOCK_D, BLOCK_D2)
    vp, vp2 = _pair_ptrs(V, head, keys, svb, svh, svn, off_b, BLOCK_D, BLOCK_D2)
    for start in range(0, full, BLOCK_N):  # pass 2: mixed probabilities times V
        acc, acc2 = _out_tc(q, q2, kp, kp2, vp, vp2, wl, ww, bw, lse, acc, acc2, head, keys, H,
                            BLOCK_N, D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2,
                            PRECISION, False)
        kp, kp2 = kp + BLOCK_N * skn, kp2 + BLOCK_N * skn
        vp, vp2 = vp + BLOCK_N * svn, vp2 + BLOCK_N * svn
    if full < N:
        kp, kp2 = _pair_ptrs(K, head, keys + full, skb, skh, skn, off_b, BLOCK_D, BLOCK_D2)
        vp, vp2 = _pair_ptrs(V, head, keys + full, svb, svh, svn, off_b, BLOCK_D, BLOCK_D2)
        acc, acc2 = _out_tc(q, q2, kp, kp2, vp, vp2, wl, ww, bw, lse, acc, acc2, head, keys, H,
                            N - full, D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2,
                            PRECISION, True)
    _store_pair(O, acc, acc2, off_b, head, rows, sob, soh, son, H, N, D, BLOCK_D, BLOCK_D2)
    _store_rows(LSE, lse, off_b, head, rows, H, N)


@triton.jit
def _th_bwd_dq_tc(Q, K, V, DO, WL, WW, LSE, DELTA, DQ, PART, sqb, sqh, sqn, skb, skh, skn,
                  svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, B, H, N, D, qk_scale, scale,
                  HP: tl.constexpr, HG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
                  STRADDLE: tl.constexpr):
    # PART: (programs, 3, HG, HG) fp32 partial sums of dw_l, dw_w and (row 0) db_w.
    pid = tl.program_id(0)
    head, group = _slots(HP, HG)
    off_b, rows = _blocks(B, N, group, HP, HG, BLOCK_M, STRADDLE)
    keys = tl.arange(0, BLOCK_N)[None, :]
    wl = _weights(WL, H, head, group, False, Q.dtype.element_ty)
    wl_t = _weights(WL, H, head, group, True, Q.dtype.element_ty)
    ww_t = _weights(WW, H, head, group, True, Q.dtype.element_ty)
    lse = _load_rows(LSE, off_b, head, rows, H, N)
    q, q2 = _pair_heads(Q, head, rows, sqb, sqh, sqn, off_b, H, N, D, BLOCK_D, BLOCK_D2)
    do, do2 = _pair_heads(DO, head, rows, sdb, sdh, sdn, off_b, H, N, D, BLOCK_D, BLOCK_D2)
    delta = tl.zeros([HP, BLOCK_M], tl.float32)
    psum = tl.zeros([HP, BLOCK_M], tl.float32)
    kp, kp2 = _pair_ptrs(K, head, keys, skb, skh, skn, off_b, BLOCK_D, BLOCK_D2)
    vp, vp2 = _pair_ptrs(V, head, keys, svb, svh, svn, off_b, BLOCK_D, BLOCK_D2)
    for start in range(0, N, BLOCK_N):  # pass 1: delta = rowsum(dP * P) per head
        k, k2 = _pair_load(kp, kp2, head, keys, H, N - start, D, BLOCK_D, BLOCK_D2, True)
        v, v2 = _pair_load(vp, vp2, head, keys, H, N - start, D, BLOCK_D, BLOCK_D2, True)
        mixed = _logits_tc(q, q2, k, k2, wl, HP, BLOCK_M, BLOCK_N, BLOCK_D2, PRECISION)[1]
        p = tl.exp2(mixed * qk_scale - lse[:, :, None])
        if start + BLOCK_N > N:
            p = tl.where(keys[:, None, :] < N - start, p, 0.0)
        dpm = _pair_dot_t(do, do2, v, v2, BLOCK_D2, PRECISION)  # dP'
        delta += tl.sum(_mix(ww_t, dpm, HP, BLOCK_M, BLOCK_N, PRECISION) * p, axis=2)
        psum += tl.sum(p, axis=2)
        kp, kp2 = kp + BLOCK_N * skn, kp2 + BLOCK_N * skn
        vp, vp2 = vp + BLOCK_N * svn, vp2 + BLOCK_N * svn
    delta = _normalised(delta, psum)
    _store_rows(DELTA, delta, off_b, head, rows, H, N)
    dq, dq2 = _pair_zeros(HP, BLOCK_M, BLOCK_D, BLOCK_D2)
    dwl = tl.zeros([HP, HP], tl.float32)
    dww = tl.zeros([HP, HP], tl.float32)
    dbw = tl.zeros([HP], tl.float32)
    kp, kp2 = _pair_ptrs(K, head, keys, skb, skh, skn, off_b, BLOCK_D, BLOCK_D2)
    vp, vp2 = _pair_ptrs(V, head, keys, svb, svh, svn, off_b, BLOCK_D, BLOCK_D2)
    for start in range(0, N, BLOCK_N):  # pass 2: dq and the head-mixing weight grads
        k, k2 = _pair_load(kp, kp2, head, keys, H, N - start, D, BLOCK_D, BLOCK_D2, True)
        v, v2 = _pair_load(vp, vp2, head, keys, H, N - start, D, BLOCK_D, BLOCK_D2, True)
        s, mixed = _logits_tc(q, q2, k, k2, wl, HP, BLOCK_M, BLOCK_N, BLOCK_D2, PRECISION)
        p = tl.exp2(mixed * qk_scale - lse[:, :, None])
        if start + BLOCK_N > N:
            p = tl.where(keys[:, None, :] < N - start, p, 0.0)
        dpm = _pair_dot_t(do, do2, v, v2, BLOCK_D2, PRECISION)
        dww += _contract(dpm, p, Q.dtype.element_ty, HP, BLOCK_M, BLOCK_N, PRECISION)
        dbw += tl.sum(tl.sum(dpm, 2), 1)
        ds = p * (_mix(ww_t, dpm, HP, BLOCK_M, BLOCK_N, PRECISION) - delta[:, :, None])
        # scaled once, below
        dwl += _contract(ds, s, Q.dtype.element_ty, HP, BLOCK_M, BLOCK_N, PRECISION)
        dsh = _mix(wl_t, ds, HP, BLOCK_M, BLOCK_N, PRECISION)  # grad of S[h]
        dq, dq2 = _pair_add_dot(dq, dq2, dsh, k, k2, BLOCK_D2, PRECISION)
        kp, kp2 = kp + BLOCK_N * skn, kp2 + BLOCK_N * skn
        vp, vp2 = vp + BLOCK_N * svn, vp2 + BLOCK_N * svn
    _store_pair(DQ, dq * scale, dq2 * scale, off_b, head, rows, sgb, sgh, sgn, H, N, D, BLOCK_D,
                BLOCK_D2)
    _store_parts(PART, pid, _fold(dwl * scale, group, HP, HG), _fold(dww, group, HP, HG),
                 tl.sum(tl.reshape(dbw, [HP // HG, HG]), 0), HG)


@triton.jit
def _th_bwd_dkdv_tc(Q, K, V, DO, WL, WW, BW, LSE, DELTA, DKO, DVO, sqb, sqh, sqn, skb, skh, skn,
                    svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, B, H, N, D, qk_scale, scale,
                    HP: tl.constexpr, HG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
                    DK: tl.constexpr, DV: tl.constexpr, STRADDLE: tl.constexpr):
    """One key block per group (_blocks), all heads, looping over the queries: dk into DKO when
    DK, dv into DVO when DV (both: one recomputation of the logits for the two, FUSED_DKDV).
    Queries past N and slots past H load lse = +inf, so their p is exactly 0. Keys past N are
    masked in the programs that have any (a uniform branch): their exp2(-lse) may be inf, and the
    block-diagonal mixing would spread inf * 0 = NaN to every slot."""
    head, group = _slots(HP, HG)
    off_b, cols = _blocks(B, N, group, HP, HG, BLOCK_N, STRADDLE)
    queries = tl.arange(0, BLOCK_M)[None, :]  # the same queries in every slot, from `start`
    wl = _weights(WL, H, head, group, False, Q.dtype.element_ty)
    k, k2 = _pair_heads(K, head, cols, skb, skh, skn, off_b, H, N, D, BLOCK_D, BLOCK_D2)
    if DK:
        wl_t = _weights(WL, H, head, group, True, Q.dtype.element_ty)
        ww_t = _weights(WW, H, head, group, True, Q.dtype.element_ty)
        v, v2 = _pair_heads(V, head, cols, svb, svh, svn, off_b, H, N, D, BLOCK_D, BLOCK_D2)
        dk, dk2 = _pair_zeros(HP, BLOCK_N, BLOCK_D, BLOCK_D2)
    if DV:
        ww = _weights(WW, H, head, group, False, Q.dtype.element_ty)
        bw = tl.load(BW + head, mask=head < H, other=0.0).to(tl.float32)
        dv, dv2 = _pair_zeros(HP, BLOCK_N, BLOCK_D, BLOCK_D2)
    qp, qp2 = _pair_ptrs(Q, head, queries, sqb, sqh, sqn, off_b, BLOCK_D, BLOCK_D2)
    dop, dop2 = _pair_ptrs(DO, head, queries, sdb, sdh, sdn, off_b, BLOCK_D, BLOCK_D2)
    stats = _stat_offsets(off_b, head, queries, H, N)  # into LSE and DELTA, a step per tile
    tail = tl.max(tl.max(cols, axis=1), axis=0) >= N
    for start in range(0, N, BLOCK_M):
        q, q2 = _pair_load(qp, qp2, head, queries, H, N - start, D, BLOCK_D, BLOCK_D2, True)
        do, do2 = _pair_load(dop, dop2, head, queries, H, N - start, D, BLOCK_D, BLOCK_D2, True)
        live = (head[:, None] < H) & (queries < N - start)
        lse = tl.load(LSE + stats, mask=live, other=float("inf"))
        mixed = _logits_tc(q, q2, k, k2, wl, HP, BLOCK_M, BLOCK_N, BLOCK_D2, PRECISION)[1]
        p = tl.exp2(mixed * qk_scale - lse[:, :, None])
        if tail:
            p = tl.where(cols[:, None, :] < N, p, 0.0)
        if DK:
            dpm = _pair_dot_t(do, do2, v, v2, BLOCK_D2, PRECISION)
            dp = _mix(ww_t, dpm, HP, BLOCK_M, BLOCK_N, PRECISION)
            ds = p * (dp - tl.load(DELTA + stats, mask=live, other=0.0)[:, :, None])
            dsh = _mix(wl_t, ds, HP, BLOCK_M, BLOCK_N, PRECISION)
            dk, dk2 = _pair_add_dot(dk, dk2, tl.permute(dsh, (0, 2, 1)), q, q2, BLOCK_D2, PRECISION)
        if DV:
            pm = _mix(ww, p, HP, BLOCK_M, BLOCK_N, PRECISION) + bw[:, None, None]
            dv, dv2 = _pair_add_dot(dv, dv2, tl.permute(pm, (0, 2, 1)), do, do2, BLOCK_D2, PRECISION)
        qp, qp2 = qp + BLOCK_M * sqn, qp2 + BLOCK_M * sqn
        dop, dop2 = dop + BLOCK_M * sdn, dop2 + BLOCK_M * sdn
        stats += BLOCK_M
    if DK:
        _store_pair(DKO, dk * scale, dk2 * scale, off_b, head, cols, sgb, sgh, sgn, H, N, D, BLOCK_D,
                    BLOCK_D2)
    if DV:
        _store_pair(DVO, dv, dv2, off_b, head, cols, sgb, sgh, sgn, H, N, D, BLOCK_D, BLOCK_D2)


def _dq_warps(tiles: dict) -> int:
    """The dq kernel's num_warps: TC_DQ_WARPS where set (tensor-core family only), else the tiles'."""
    return TC_DQ_WARPS if TC_DQ_WARPS and "HG" in tiles else tiles["num_warps"]


def _head_dim(tiles: dict, D: int) -> dict:
    """The head-dim constexprs of a family's kernels: BLOCK_D and, for the tensor-core ones,
    BLOCK_D2 (0, or the second exact block: SPLIT_HEAD_DIM)."""
    if "HG" not in tiles:
        return dict(BLOCK_D=next_pow2(D))
    block_d, block_d2 = head_dim_blocks(D, SPLIT_HEAD_DIM)
    return dict(BLOCK_D=block_d, BLOCK_D2=block_d2)


def _family(heads: int, tc, dtype: torch.dtype):
    """((fwd, dq, dkdv kernels), tiles) of a mixing strategy at `heads` heads for q, k, v of
    `dtype`: tensor cores when tc (None: TENSOR_CORE_MIXING) and the inputs are 16-bit, else CUDA
    cores. fp32 inputs get exact fp32 products (_precision), which no tensor core computes: the
    tensor-core kernels' dots would be FMA loops all the same, and their fp32 tiles need 264-347 KB
    of shared memory at BLOCK_D 64, past the 227 KB of an sm_90 block, so they would not launch
    (compiled for sm_90 by triton 3.6 and 3.8, 2026-11-27); the CUDA-core kernels need 16-41 KB."""
    if tc and dtype == torch.float32:
        raise ValueError("tc=True (tensor-core head mixing) needs fp16 or bf16 q, k, v, got "
                         "float32: fp32 inputs run the CUDA-core kernels (tc=None or False)")
    if (TENSOR_CORE_MIXING if tc is None else tc) and dtype != torch.float32:
        return (_th_fwd_tc, _th_bwd_dq_tc, _th_bwd_dkdv_tc), _tiles_tc(heads)
    return (_th_fwd, _th_bwd_dq, _th_bwd_dkdv), _tiles(heads)


def _chunked(strategy: str, heads: int, n: int, backward: bool) -> bool:
    """Whether a forward (or backward) call runs kernels/talking_heads_chunked.py: STRATEGY (or
    the call's strategy) picks it for that direction and its tiles fit (chunked.supported), else
    the fused kernels here."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    picked = strategy == "chunked" or (strategy == "chunked_forward" and not backward)
    return picked and chunked.supported(heads, n)


def forward(q, k, v, w_l, w_w, b_w, scale, tc=None, strategy=None):
    """q, k, v: (B, H, N, D) -> (out (B, H, N, D) token-major in memory, as the attention
    kernels write it, lse fp32 (B, H, N) in log2 units).
    tc: mix the heads on tensor cores (default: _family's choice; the fused kernels only);
    strategy: one of STRATEGIES (default STRATEGY)."""
    B, H, N, D = q.shape
    if _chunked(strategy or STRATEGY, H, N, backward=False):
        return chunked.forward(q, k, v, w_l, w_w, b_w, scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    (fwd, _, _), tiles = _family(H, tc, q.dtype)
    o = token_major_empty(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    grid, batch, straddle = _grid(tiles, B, N, "BLOCK_M")
    cap = {"maxnreg": TC_FWD_MAXNREG} if TC_FWD_MAXNREG and "HG" in tiles else {}
    launch(fwd, grid, q, k, v, w_l, w_w, b_w, o, lse, *_strides(q), *_strides(k), *_strides(v),
           *_strides(o), *batch, H, N, D, scale * LOG2E, **_head_dim(tiles, D),
           PRECISION=_precision(q.dtype), **tiles, **straddle, **cap)
    return o, lse


def backward(do, q, k, v, w_l, w_w, b_w, lse, scale, tc=None, out=None, strategy=None):
    """-> (dq, dk, dv, dw_l, dw_w, db_w); db_l is zero (see the module docstring). out: where to
    write dq, dk, dv, as in attention.backward (one set of strides, unit last stride). Either
    strategy's backward takes either's lse."""
    B, H, N, D = q.shape
    if _chunked(strategy or STRATEGY, H, N, backward=True):
        return chunked.backward(do, q, k, v, w_l, w_w, b_w, lse, scale, out=out)
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    (_, dq_kernel, dkdv_kernel), tiles = _family(H, tc, q.dtype)
    meta = dict(tiles, **_head_dim(tiles, D), PRECISION=_precision(q.dtype))
    hg = tiles.get("HG", tiles["HP"])  # the weight grads' partial sums are [hg, hg]
    dq, dk, dv = out or (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    grid, batch, straddle = _grid(tiles, B, N, "BLOCK_M")
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), *batch, H, N,
            D, scale * LOG2E, scale)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    part = torch.empty((math.prod(grid), 3, hg, hg), dtype=torch.float32, device=q.device)
    launch(dq_kernel, grid, q, k, v, do, w_l, w_w, lse, delta, dq, part, *args,
           **dict(meta, num_warps=_dq_warps(tiles)), **straddle)
    grid, _, straddle = _grid(tiles, B, N, "BLOCK_N")
    fused = FUSED_DKDV and "HG" in tiles  # the CUDA-core kernel sums one grad at a time
    for which in ((True, True),) if fused else ((True, False), (False, True)):
        launch(dkdv_kernel, grid, q, k, v, do, w_l, w_w, b_w, lse, delta, dk, dv, *args,
               DK=which[0], DV=which[1], **meta, **straddle)
    sums = part.sum(0)  # fixed-order sum over programs: deterministic
    dw_l, dw_w, db_w = (t.to(w.dtype, copy=True) for t, w in (
        (sums[0, :H, :H], w_l), (sums[1, :H, :H], w_w), (sums[2, 0, :H], b_w)))
    return dq, dk, dv, dw_l, dw_w, db_w


def aot_configs(dtype: str):
    """Every shipped variant (head counts 4, 8, 16 of CaiT, in both mixing families, fp32 in the
    CUDA-core one alone (_family); head-dim tiles 32 and 64, and 32 + 16 in the tensor-core
    family) for the sm_90 AOT test. The products
    are dots of 16-32 rows: mma.sync, not wgmma. D is aligned as in attention.aot_configs."""
    torch_dtype = DTYPES[dtype]
    strides = [f"s{t}{a}" for t in "qkvodg" for a in "bhn"]
    ints = dict.fromkeys(["B", "H", "N", "D"] + strides, "i32")
    ints.update(qk_scale="fp32", scale="fp32")
    ptrs = dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DKO", "DVO"], f"*{dtype}")
    ptrs.update(dict.fromkeys(["WL", "WW", "BW", "LSE", "DELTA", "PART"], "*fp32"))
    for heads in (4, 8, 16):
        tcs = (False,) if dtype == "fp32" else (False, True)
        for (fwd, dq, dkdv), tiles in (_family(heads, tc, torch_dtype) for tc in tcs):
            consts = {k: v for k, v in tiles.items() if not k.startswith("num_")}
            straddles = [{"STRADDLE": s} for s in (False, True)] if "HG" in tiles else [{}]
            # head-dim blocks: 32, 64, and for the tensor-core kernels 48 as 32 + 16
            blocks = [{"BLOCK_D": 32}, {"BLOCK_D": 64}]
            if "HG" in tiles:
                blocks = [dict(b, BLOCK_D2=0) for b in blocks] + [{"BLOCK_D": 32, "BLOCK_D2": 16}]
            for block, straddle in itertools.product(blocks, straddles):
                base = dict(consts, **block, PRECISION=_precision(torch_dtype), **straddle)
                dkdv_modes = [(True, False), (False, True)] + ([(True, True)] if "HG" in tiles else [])
                for kernel, extra in ((fwd, {}), (dq, {}),
                                      *((dkdv, {"DK": a, "DV": b}) for a, b in dkdv_modes)):
                    sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
                    warps = _dq_warps(tiles) if kernel is dq else tiles["num_warps"]
                    yield dict(kernel=kernel, signature=sig, constexprs=dict(base, **extra),
                               num_warps=warps, num_stages=tiles["num_stages"],
                               aligned=(*strides, "D"), matmul=False)
