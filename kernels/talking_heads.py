"""Talking-heads attention (CaiT), fused: no B x H x N x N tensor is ever written to memory.

    S[h] = scale * q_h k_h^T ;  S'[g] = sum_h w_l[g,h] S[h] + b_l[g] ;  P = softmax_keys(S')
    P'[g] = sum_h w_w[g,h] P[h] + b_w[g] ;  out[g] = P'[g] v_g

Every program holds all H heads of a tile of query rows (or, in the dk/dv backward, of key rows)
as [HP, rows, cols] register tensors (HP = H rounded up to a power of two), because the mixing
couples every head at every (i, j). The per-head products are ordinary 2D tl.dot calls; the
mixing is a broadcast multiply-add over the head axis (H <= 16 in every CaiT).

b_l adds the same constant to a whole softmax row, so it changes nothing: the kernels ignore it
and its gradient is exactly zero. The forward makes two passes over the keys: the first for the
row statistics of the mixed logits (saved as the log-sum-exp, O(B H N)), the second for the
normalised, mixed probabilities times V. The backward recomputes everything from q, k, v and lse:
one kernel per query tile computes delta = rowsum(dP * P) (a first pass), then dq and the
weight grads (per-program partial sums, no atomics); two kernels per key tile compute dv and dk.
"""
import torch
import triton
import triton.language as tl

from .attention import _precision, _strides, _tile, _unit_last, token_major_empty

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 48, 64)  # CaiT uses 48; wider heads would need a smaller tile to fit registers
MAX_HEADS = 16


def _tiles(heads: int):
    """(HP, BLOCK_M, BLOCK_N, num_warps, num_stages): at most 4096 fp32 per [HP, M, N] tile; 16
    is the smallest dot dimension. 8 warps: at 4, triton 3.6 (the GPU machine's) spilled up to
    1.7 KB per thread in the backward (HP 8, BLOCK_D 64: CaiT-S); at 8 it spills nothing but 32
    bytes in one forward variant (HP 16, BLOCK_D 64), nor does 3.8. Triton's default 3 stages
    (at most 25 KB of shared memory)."""
    hp = max(2, triton.next_power_of_2(heads))
    block_m = 32 if hp <= 4 else 16
    return hp, block_m, max(16, min(32, 4096 // (hp * block_m))), 8, 3


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
    valid = (rows[None, :, None] < N) & (cols[None, None, :] < N)
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
def _load_rows(PTR, off_b, rows, H, N, HP: tl.constexpr):
    hh = tl.arange(0, HP)
    ptrs = PTR + (off_b * H + hh)[:, None] * N + rows[None, :]
    return tl.load(ptrs, mask=(hh[:, None] < H) & (rows[None, :] < N), other=0.0)


@triton.jit
def _online_stats(m, l, mixed):
    """One key tile into the running row max m and sum l of exp2 (all [HP, M])."""
    m_new = tl.maximum(m, tl.max(mixed, axis=2))
    return m_new, l * tl.exp2(m - m_new) + tl.sum(tl.exp2(mixed - m_new[:, :, None]), axis=2)


@triton.jit
def _store_heads(PTR, value, off_b, rows, sb, sh, sn, H, N, D, HP: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """[HP, rows, BLOCK_D] of every head into a (B, H, N, D) tensor of strides (sb, sh, sn, 1)."""
    hh = tl.arange(0, HP)
    d = tl.arange(0, BLOCK_D)
    ptrs = (PTR + off_b * sb + hh.to(tl.int64)[:, None, None] * sh
            + rows.to(tl.int64)[None, :, None] * sn + d[None, None, :])
    mask = (hh[:, None, None] < H) & (rows[None, :, None] < N) & (d[None, None, :] < D)
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _store_rows(PTR, value, off_b, rows, H, N, HP: tl.constexpr):
    """[HP, rows] per-row statistics into a contiguous (B, H, N) fp32 tensor."""
    hh = tl.arange(0, HP)
    tl.store(PTR + (off_b * H + hh)[:, None] * N + rows[None, :], value,
             mask=(hh[:, None] < H) & (rows[None, :] < N))


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
    off_b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
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
        p = _probs(mixed, lse, rows, cols, N)
        for g in range(H):
            w = tl.load(WW + g * H + hh, mask=hh < H, other=0.0).to(tl.float32)
            pg = tl.sum(w[:, None, None] * p, axis=0) + tl.load(BW + g).to(tl.float32)
            v = _tile(V, cols, svb, svh, svn, off_b, g, N, D, 0, BLOCK_D)  # zero past N
            pv = tl.dot(pg.to(v.dtype), v, input_precision=PRECISION)
            acc = tl.where(hh[:, None, None] == g, acc + pv[None, :, :], acc)
    _store_heads(O, acc, off_b, rows, sob, soh, son, H, N, D, HP, BLOCK_D)
    _store_rows(LSE, lse, off_b, rows, H, N, HP)


@triton.jit
def _th_bwd_dq(Q, K, V, DO, WL, WW, LSE, DELTA, DQ, PART, sqb, sqh, sqn, skb, skh, skn,
               svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, qk_scale, scale, programs,
               HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # PART: (programs_total, 3, HP, HP) fp32 partial sums of dw_l, dw_w and (row 0) db_w.
    off_b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hh = tl.arange(0, HP)
    lse = _load_rows(LSE, off_b, rows, H, N, HP)
    delta = tl.zeros([HP, BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: delta = rowsum(dP * P) per head
        cols = start + tl.arange(0, BLOCK_N)
        p = _probs(_mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N,
                                 D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION), lse, rows, cols, N)
        dp = _mixed_dprobs(DO, V, WW, off_b, rows, cols, sdb, sdh, sdn, svb, svh, svn, H, N, D,
                           HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        delta += tl.sum(dp * p, axis=2)
    _store_rows(DELTA, delta, off_b, rows, H, N, HP)
    dq = tl.zeros([HP, BLOCK_M, BLOCK_D], tl.float32)
    dwl = tl.zeros([HP, HP], tl.float32)
    dww = tl.zeros([HP, HP], tl.float32)
    dbw = tl.zeros([HP], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 2: dq and the head-mixing weight grads
        cols = start + tl.arange(0, BLOCK_N)
        p = _probs(_mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N,
                                 D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION), lse, rows, cols, N)
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
    _store_heads(DQ, dq * scale, off_b, rows, sgb, sgh, sgn, H, N, D, HP, BLOCK_D)
    _store_parts(PART, pid, dwl, dww, dbw, HP)


@triton.jit
def _th_bwd_dkdv(Q, K, V, DO, WL, WW, BW, LSE, DELTA, DKV, sqb, sqh, sqn, skb, skh, skn,
                 svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, qk_scale, scale, HP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, DK: tl.constexpr):
    """One key tile, all heads, looping over the queries: dk when DK else dv (two launches keep
    one [HP, BLOCK_N, BLOCK_D] accumulator live instead of two)."""
    off_b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hh = tl.arange(0, HP)
    acc = tl.zeros([HP, BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        lse = _load_rows(LSE, off_b, rows, H, N, HP)
        p = _probs(_mixed_logits(Q, K, WL, off_b, rows, cols, sqb, sqh, sqn, skb, skh, skn, H, N,
                                 D, qk_scale, HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION), lse, rows, cols, N)
        if DK:
            dp = _mixed_dprobs(DO, V, WW, off_b, rows, cols, sdb, sdh, sdn, svb, svh, svn, H, N, D,
                               HP, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            ds = p * (dp - _load_rows(DELTA, off_b, rows, H, N, HP)[:, :, None])
            for h in range(H):
                w = tl.load(WL + hh * H + h, mask=hh < H, other=0.0).to(tl.float32)
                dsh = tl.sum(w[:, None, None] * ds, axis=0)
                q = _tile(Q, rows, sqb, sqh, sqn, off_b, h, N, D, 0, BLOCK_D)
                dkh = tl.dot(tl.trans(dsh).to(q.dtype), q, input_precision=PRECISION)
                acc = tl.where(hh[:, None, None] == h, acc + dkh[None, :, :], acc)
        else:
            for g in range(H):
                w = tl.load(WW + g * H + hh, mask=hh < H, other=0.0).to(tl.float32)
                pg = tl.sum(w[:, None, None] * p, axis=0) + tl.load(BW + g).to(tl.float32)
                do = _tile(DO, rows, sdb, sdh, sdn, off_b, g, N, D, 0, BLOCK_D)  # zero past N
                dvg = tl.dot(tl.trans(pg).to(do.dtype), do, input_precision=PRECISION)
                acc = tl.where(hh[:, None, None] == g, acc + dvg[None, :, :], acc)
    if DK:
        acc = acc * scale
    _store_heads(DKV, acc, off_b, cols, sgb, sgh, sgn, H, N, D, HP, BLOCK_D)


# ---- the same, with the head mixing on tensor cores ------------------------------------------
# Above, each head's product is its own 2D dot and the H x H mixing is a broadcast multiply-add
# (CUDA cores, O(H^2) per (i, j), plus a where-scatter per head into [HP, ...] accumulators): at
# 8 heads the backward took 7.2 ms at 256x8x196x48 on an H200, slower than timm eager (4.1 ms).
# Here every [HP, rows, D] tile holds all heads (one strided load), the per-head products are
# batched 3D dots, and each mixing is one [HP, HP] x [HP, M*N] dot; HP = 16 (the smallest dot
# dimension), the padded heads being zero weights.
# Which family runs: TENSOR_CORE_MIXING True or False forces one; None (the default) picks tensor
# cores above TC_ABOVE_HEADS heads. The choice rests on SASS, not yet on GPU time (both families
# do far more CUDA-core work per score than MMA work): instructions a thread issues per real
# (g, i, j) score, bf16,
# D=48 (a 64-wide block), sm_90, triton 3.6 (`python tests/aot/census.py`), forward / backward:
#   H=4:  CUDA cores 101 / 365,   tensor cores 217 / 583  (three quarters of HP = 16 is padding)
#   H=8:  CUDA cores 208 / 882,   tensor cores 109 / 292
#   H=16: CUDA cores 577 / 2104,  tensor cores  54 / 146
# From H=4 to H=8 (2x the scores) the CUDA-core kernels' H200 times grew 2.8x (fwd) and 3.0x
# (bwd), where these counts predict 4.1x and 4.8x: issue is not the whole cost, but the counts
# order the two shapes as the clock did. bench.ops.talking_heads times both families (impls
# triton: CUDA cores, triton_tc: tensor cores).
TENSOR_CORE_MIXING = None
TC_ABOVE_HEADS = 4


def _tiles_tc():
    """(HP, BLOCK_M, BLOCK_N, num_warps, num_stages) of the tensor-core kernels, for any H <= 16.
    8 warps: at 4, the [16, 16, 64] fp32 accumulators took 544-808 stack bytes per thread under
    triton 3.6 (the GPU machine's) at sm_90; at 8, 161-252 registers and no stack (3.8: at most
    16 bytes). 2 stages: at Triton's default 3 the dq kernel at BLOCK_D 64 (CaiT's head dim 48)
    wanted 243 KB of shared memory, past the 227 KB an sm_90 block may have (it would fail to
    launch); at 2 it takes 179 KB, with the same SASS count per tile."""
    return 16, 16, 16, 8, 2


@triton.jit
def _heads(PTR, rows, sb, sh, sn, off_b, H, n_rows, D, HP: tl.constexpr, BLOCK_D: tl.constexpr):
    """[HP, rows, BLOCK_D] tile of every head of one batch, zero past H, n_rows and D."""
    hh = tl.arange(0, HP)
    d = tl.arange(0, BLOCK_D)
    ptrs = (PTR + off_b * sb + hh.to(tl.int64)[:, None, None] * sh
            + rows.to(tl.int64)[None, :, None] * sn + d[None, None, :])
    mask = (hh[:, None, None] < H) & (rows[None, :, None] < n_rows) & (d[None, None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _weights(W, H, HP: tl.constexpr, TRANSPOSE: tl.constexpr):
    """The [HP, HP] fp32 mixing matrix W (or W^T), zero past H."""
    g = tl.arange(0, HP)[:, None]
    h = tl.arange(0, HP)[None, :]
    ptrs = W + h * H + g if TRANSPOSE else W + g * H + h
    return tl.load(ptrs, mask=(g < H) & (h < H), other=0.0).to(tl.float32)


@triton.jit
def _mix(w, x, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """out[g] = sum_h w[g, h] x[h] for x [HP, M, N]: one product over the head axis."""
    flat = tl.dot(w, tl.reshape(x, [HP, M * N]), input_precision=PRECISION)
    return tl.reshape(flat, [HP, M, N])


@triton.jit
def _contract(a, b, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """[HP, HP] sum over (i, j) of a[g] * b[h]: the grad of a mixing matrix."""
    return tl.dot(tl.reshape(a, [HP, M * N]), tl.trans(tl.reshape(b, [HP, M * N])),
                  input_precision=PRECISION)


@triton.jit
def _logits_tc(q, k, wl, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """(q k^T, sum_h w_l[g, h] q_h k_h^T), both [HP, M, N] and unscaled (mixing is linear: the
    caller applies scale or scale * log2(e))."""
    s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision=PRECISION)
    return s, _mix(wl, s, HP, M, N, PRECISION)


@triton.jit
def _th_fwd_tc(Q, K, V, WL, WW, BW, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
               sob, soh, son, H, N, D, qk_scale, HP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    off_b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hh = tl.arange(0, HP)
    wl = _weights(WL, H, HP, False)
    ww = _weights(WW, H, HP, False)
    bw = tl.load(BW + hh, mask=hh < H, other=0.0).to(tl.float32)
    m = tl.full([HP, BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([HP, BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: row statistics of the mixed logits
        cols = start + tl.arange(0, BLOCK_N)
        q = _heads(Q, rows, sqb, sqh, sqn, off_b, H, N, D, HP, BLOCK_D)
        k = _heads(K, cols, skb, skh, skn, off_b, H, N, D, HP, BLOCK_D)
        mixed = _logits_tc(q, k, wl, HP, BLOCK_M, BLOCK_N, PRECISION)[1] * qk_scale
        mixed = tl.where(cols[None, None, :] < N, mixed, float("-inf"))
        m, l = _online_stats(m, l, mixed)
    lse = m + tl.log2(l)
    acc = tl.zeros([HP, BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 2: mixed probabilities times V
        cols = start + tl.arange(0, BLOCK_N)
        q = _heads(Q, rows, sqb, sqh, sqn, off_b, H, N, D, HP, BLOCK_D)
        k = _heads(K, cols, skb, skh, skn, off_b, H, N, D, HP, BLOCK_D)
        mixed = _logits_tc(q, k, wl, HP, BLOCK_M, BLOCK_N, PRECISION)[1] * qk_scale
        p = _probs(mixed, lse, rows, cols, N)
        pm = _mix(ww, p, HP, BLOCK_M, BLOCK_N, PRECISION) + bw[:, None, None]  # P'
        v = _heads(V, cols, svb, svh, svn, off_b, H, N, D, HP, BLOCK_D)  # zero past N
        acc += tl.dot(pm.to(v.dtype), v, input_precision=PRECISION)
    _store_heads(O, acc, off_b, rows, sob, soh, son, H, N, D, HP, BLOCK_D)
    _store_rows(LSE, lse, off_b, rows, H, N, HP)


@triton.jit
def _th_bwd_dq_tc(Q, K, V, DO, WL, WW, LSE, DELTA, DQ, PART, sqb, sqh, sqn, skb, skh, skn,
                  svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, qk_scale, scale, programs,
                  HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # PART: (programs_total, 3, HP, HP) fp32 partial sums of dw_l, dw_w and (row 0) db_w.
    off_b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    wl = _weights(WL, H, HP, False)
    wl_t = _weights(WL, H, HP, True)
    ww_t = _weights(WW, H, HP, True)
    lse = _load_rows(LSE, off_b, rows, H, N, HP)
    q = _heads(Q, rows, sqb, sqh, sqn, off_b, H, N, D, HP, BLOCK_D)
    do = _heads(DO, rows, sdb, sdh, sdn, off_b, H, N, D, HP, BLOCK_D)
    delta = tl.zeros([HP, BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: delta = rowsum(dP * P) per head
        cols = start + tl.arange(0, BLOCK_N)
        k = _heads(K, cols, skb, skh, skn, off_b, H, N, D, HP, BLOCK_D)
        v = _heads(V, cols, svb, svh, svn, off_b, H, N, D, HP, BLOCK_D)
        p = _probs(_logits_tc(q, k, wl, HP, BLOCK_M, BLOCK_N, PRECISION)[1] * qk_scale, lse, rows, cols, N)
        dpm = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PRECISION)  # dP'
        delta += tl.sum(_mix(ww_t, dpm, HP, BLOCK_M, BLOCK_N, PRECISION) * p, axis=2)
    _store_rows(DELTA, delta, off_b, rows, H, N, HP)
    dq = tl.zeros([HP, BLOCK_M, BLOCK_D], tl.float32)
    dwl = tl.zeros([HP, HP], tl.float32)
    dww = tl.zeros([HP, HP], tl.float32)
    dbw = tl.zeros([HP], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 2: dq and the head-mixing weight grads
        cols = start + tl.arange(0, BLOCK_N)
        k = _heads(K, cols, skb, skh, skn, off_b, H, N, D, HP, BLOCK_D)
        v = _heads(V, cols, svb, svh, svn, off_b, H, N, D, HP, BLOCK_D)
        s, mixed = _logits_tc(q, k, wl, HP, BLOCK_M, BLOCK_N, PRECISION)
        p = _probs(mixed * qk_scale, lse, rows, cols, N)
        dpm = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PRECISION)
        dww += _contract(dpm, p, HP, BLOCK_M, BLOCK_N, PRECISION)
        dbw += tl.sum(tl.sum(dpm, 2), 1)
        ds = p * (_mix(ww_t, dpm, HP, BLOCK_M, BLOCK_N, PRECISION) - delta[:, :, None])
        dwl += _contract(ds, s * scale, HP, BLOCK_M, BLOCK_N, PRECISION)
        dsh = _mix(wl_t, ds, HP, BLOCK_M, BLOCK_N, PRECISION)  # grad of S[h]
        dq += tl.dot(dsh.to(k.dtype), k, input_precision=PRECISION)
    _store_heads(DQ, dq * scale, off_b, rows, sgb, sgh, sgn, H, N, D, HP, BLOCK_D)
    _store_parts(PART, pid, dwl, dww, dbw, HP)


@triton.jit
def _th_bwd_dkdv_tc(Q, K, V, DO, WL, WW, BW, LSE, DELTA, DKV, sqb, sqh, sqn, skb, skh, skn,
                    svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, qk_scale, scale, HP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, DK: tl.constexpr):
    """One key tile, all heads, looping over the queries: dk when DK else dv."""
    off_b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    hh = tl.arange(0, HP)
    wl = _weights(WL, H, HP, False)
    k = _heads(K, cols, skb, skh, skn, off_b, H, N, D, HP, BLOCK_D)
    if DK:
        wl_t = _weights(WL, H, HP, True)
        ww_t = _weights(WW, H, HP, True)
        v = _heads(V, cols, svb, svh, svn, off_b, H, N, D, HP, BLOCK_D)
    else:
        ww = _weights(WW, H, HP, False)
        bw = tl.load(BW + hh, mask=hh < H, other=0.0).to(tl.float32)
    acc = tl.zeros([HP, BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _heads(Q, rows, sqb, sqh, sqn, off_b, H, N, D, HP, BLOCK_D)
        do = _heads(DO, rows, sdb, sdh, sdn, off_b, H, N, D, HP, BLOCK_D)  # zero past N
        lse = _load_rows(LSE, off_b, rows, H, N, HP)
        p = _probs(_logits_tc(q, k, wl, HP, BLOCK_M, BLOCK_N, PRECISION)[1] * qk_scale, lse, rows, cols, N)
        if DK:
            dpm = tl.dot(do, tl.permute(v, (0, 2, 1)), input_precision=PRECISION)
            dp = _mix(ww_t, dpm, HP, BLOCK_M, BLOCK_N, PRECISION)
            ds = p * (dp - _load_rows(DELTA, off_b, rows, H, N, HP)[:, :, None])
            dsh = _mix(wl_t, ds, HP, BLOCK_M, BLOCK_N, PRECISION)
            acc += tl.dot(tl.permute(dsh, (0, 2, 1)).to(q.dtype), q, input_precision=PRECISION)
        else:
            pm = _mix(ww, p, HP, BLOCK_M, BLOCK_N, PRECISION) + bw[:, None, None]
            acc += tl.dot(tl.permute(pm, (0, 2, 1)).to(do.dtype), do, input_precision=PRECISION)
    if DK:
        acc = acc * scale
    _store_heads(DKV, acc, off_b, cols, sgb, sgh, sgn, H, N, D, HP, BLOCK_D)


def _family(heads: int, tc):
    """((fwd, dq, dkdv kernels), tiles) of a mixing strategy: tensor cores when tc (default
    TENSOR_CORE_MIXING, and where that is None, heads > TC_ABOVE_HEADS), else the CUDA-core
    kernels at `heads` heads."""
    tc = TENSOR_CORE_MIXING if tc is None else tc
    if heads > TC_ABOVE_HEADS if tc is None else tc:
        return (_th_fwd_tc, _th_bwd_dq_tc, _th_bwd_dkdv_tc), _tiles_tc()
    return (_th_fwd, _th_bwd_dq, _th_bwd_dkdv), _tiles(heads)


def forward(q, k, v, w_l, w_w, b_w, scale, tc=None):
    """q, k, v: (B, H, N, D) -> (out (B, H, N, D) token-major in memory, as the attention
    kernels write it, lse fp32 (B, H, N) in log2 units).
    tc: mix the heads on tensor cores (default: _family's choice)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, N, D = q.shape
    (fwd, _, _), (hp, block_m, block_n, warps, stages) = _family(H, tc)
    o = token_major_empty(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    fwd[(triton.cdiv(N, block_m), B)](
        q, k, v, w_l, w_w, b_w, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, N, D, scale * LOG2E, HP=hp, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(D), PRECISION=_precision(q.dtype), num_warps=warps,
        num_stages=stages)
    return o, lse


def backward(do, q, k, v, w_l, w_w, b_w, lse, scale, tc=None, out=None):
    """-> (dq, dk, dv, dw_l, dw_w, db_w); db_l is zero (see the module docstring). out: where to
    write dq, dk, dv, as in attention.backward (one set of strides, unit last stride)."""
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    B, H, N, D = q.shape
    (_, dq_kernel, dkdv_kernel), (hp, block_m, block_n, warps, stages) = _family(H, tc)
    meta = dict(HP=hp, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D),
                PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages)
    dq, dk, dv = out or (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), H, N, D,
            scale * LOG2E, scale)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    q_tiles = triton.cdiv(N, block_m)
    part = torch.empty((q_tiles * B, 3, hp, hp), dtype=torch.float32, device=q.device)
    dq_kernel[(q_tiles, B)](q, k, v, do, w_l, w_w, lse, delta, dq, part, *args, q_tiles, **meta)
    for dst, is_dk in ((dk, True), (dv, False)):
        dkdv_kernel[(triton.cdiv(N, block_n), B)](q, k, v, do, w_l, w_w, b_w, lse, delta, dst,
                                                  *args, DK=is_dk, **meta)
    sums = part.sum(0)  # fixed-order sum over programs: deterministic
    dw_l, dw_w, db_w = (t.to(w.dtype, copy=True) for t, w in (
        (sums[0, :H, :H], w_l), (sums[1, :H, :H], w_w), (sums[2, 0, :H], b_w)))
    return dq, dk, dv, dw_l, dw_w, db_w


def aot_configs(dtype: str):
    """Every shipped variant (head counts 4, 8, 16 of CaiT, and the tensor-core mixing kernels,
    which take any H <= 16; head-dim tiles 32 and 64) for the sm_90 AOT test. The products are
    dots of 16-32 rows: mma.sync, not wgmma. D is aligned as in attention.aot_configs."""
    strides = [f"s{t}{a}" for t in "qkvodg" for a in "bhn"]
    ints = dict.fromkeys(["H", "N", "D", "programs"] + strides, "i32")
    ints.update(qk_scale="fp32", scale="fp32")
    ptrs = dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DKV"], f"*{dtype}")
    ptrs.update(dict.fromkeys(["WL", "WW", "BW", "LSE", "DELTA", "PART"], "*fp32"))
    for kernels, tiles in [_family(heads, False) for heads in (4, 8, 16)] + [_family(16, True)]:
        hp, block_m, block_n, warps, stages = tiles
        fwd, dq, dkdv = kernels
        for block_d in (32, 64):
            base = dict(HP=hp, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION="tf32")
            for kernel, extra in ((fwd, {}), (dq, {}), (dkdv, {"DK": True}), (dkdv, {"DK": False})):
                sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
                yield dict(kernel=kernel, signature=sig, constexprs=dict(base, **extra),
                           num_warps=warps, num_stages=stages, aligned=(*strides, "D"), matmul=False)
