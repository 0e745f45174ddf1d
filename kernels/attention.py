"""Self-attention, flash style: softmax(q k^T * scale) v without the N x N matrix in memory.

Sized for ViT sequence lengths (N = 197/198 at 224 px, 577/578 at 384 px), not long text. At
head dims up to 64 a score's softmax (scale, max, exp2, sum, convert) and the accumulator's
rescaling cost more issue slots than its 2 D multiply-adds on the tensor cores, so the loops
take few instructions per score (a proxy only: see the tail rows below). The scale rides in the
FFMA of the max subtraction, K and V pointers advance by one add a tile, and each loop streams
only full tiles, without masks: the last N % BLOCK_N keys (or queries) take one masked tile of
16, 32 or 64 after it (_tail), so N = 197 streams 6 x 32 + 16 keys, not 7 x 32. The dq
kernel's key tiles are the forward's width, so at ViT lengths both compute the last keys'
logits in same-shaped products: numpy (the interpreter) rounds a product by its shape, and a dq
whose logits share a large component needs the two to agree
(test_all_negative_logits_keep_grads_finite).

Tiles (FWD, BWD_Q, BWD_KV, SPLIT_HEAD_DIM) are the fastest `python -m bench.tune` found on an
H100 (2026-11-26, bench/results/2026-11-26-nvidia-h100-tune.md). What it also measured: a
second launch of 16-row one-warp programs for the last rows of a sequence (N % 64 <= 32) took
fewer SASS instructions (-22 % per (batch, head) at N = 197) but ran 4-16 % slower than one
masked program, so a program's last tile of rows stays masked.

Forward: one program per (query tile, batch*head); online softmax in fp32; saves only the
log-sum-exp (lse) per query row. Backward: FlashAttention-2's recomputation, split in two kernels
so that nothing is accumulated with atomics (bitwise-reproducible grads): one program per key
tile computes dk and dv over all queries, one program per query tile computes dq over all keys.
The dq kernel runs first and also writes delta = rowsum(dO * O) of its rows, which the dk/dv
kernel reads: no third kernel (each launch costs host time, and the small ops were host-bound
on the H200), at no register cost (sm_90, triton 3.6).
q, k, v, o, dO are addressed with (batch, head, row) strides and a unit last stride, so views of
the (B, N, 3, H, D) qkv projection go in without a copy. o is written token-major
(token_major_empty), and dq, dk, dv through one set of grad strides, so they can be the slices
of one packed (B, N, 3, H, D) grad (ops.attention_qkv).
"""
import itertools

import torch
import triton
import triton.language as tl

from . import DTYPES, cdiv, launch, next_pow2

# bench.tune on an H100, 2026-11-26, vs the tiles before (all 64 x 64 / 32 x 64 / 64 x 32, 4
# warps, 2 stages), N = 197 at D = 64 (H = 6) and D = 48 (H = 8), B = 256, each kernel alone:
# FWD 1.43x and 1.24x; BWD_Q 1.10x and 1.06x; BWD_KV 1.07x and 1.17x (split head dim).
FWD = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
BWD_KV = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3)   # key tile owns dk, dv
BWD_Q = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)   # query tile owns dq
# fp32 inputs multiply in exact fp32 (_precision): FMA dots, every operand in registers. At the
# tiles above they took 0.1-12 KB of stack per thread at sm_90 (spills), and dq at D = 128 213 KB
# of shared memory. These spill nothing up to head dim 80 (every DeiT and CaiT: 48, 64) and take
# 120-1152 bytes at 96 and 128 (triton 3.8, sm_90, 2026-11-27; chosen from 14 candidates per
# kernel by stack size alone: untimed, no GPU has run fp32 attention at any tile). The forward
# and dq share one tile, as the 16-bit ones do: dq's recomputed q k^T must round as the
# forward's did, or sum_j dS_ij drifts from 0 and k's common component leaks into dq (63-83x
# torch's fp32 error when every logit is near -290, test_all_negative_logits_keep_grads_finite,
# under the interpreter with FWD 32 x 16, 3 seeds).
FWD_FP32 = BWD_Q_FP32 = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2)
BWD_KV_FP32 = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=2)
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)


# Head dims that are not a power of two: one masked block (48 -> 64, a quarter of the MMA work
# and loads wasted) or two exact blocks (48 -> 32 + 16: twice the MMA instructions, each smaller).
# At D = 48 on an H100 (2026-11-26, bench/ops/attention.py, CUDA-graph times) the two blocks ran
# fwd+bwd 1.14-1.15x cuDNN against 1.11-1.12x for the masked block; bench.tune's backward 384 vs
# 429 us. 80 = 64 + 16 and 96 = 64 + 32 follow (untimed: no DeiT or CaiT has them).
SPLIT_HEAD_DIM = True


def _blocks(D: int, split: bool):
    """(BLOCK_D, BLOCK_D2) covering head dim D: one power-of-two block, masked past D, or with
    `split` the largest power of two below D plus the rest where that is a power of two >= 16
    (tl.dot's smallest K): 48 = 32 + 16, 80 = 64 + 16, 96 = 64 + 32."""
    whole = next_pow2(D)
    rest = D - whole // 2
    if split and whole != D and rest >= 16 and rest & (rest - 1) == 0:
        return whole // 2, rest
    return whole, 0


def _tail(N: int, block: int) -> int:
    """The tile that takes the last N % block rows of a sequence after its full tiles: the
    smallest power of two >= 16 (tl.dot's least) that holds them, 0 if none are left."""
    rest = N % block
    return max(16, next_pow2(rest)) if rest else 0


def _config(cfg: dict, fp32_cfg: dict, blocks, dtype: torch.dtype) -> dict:
    """A kernel's tiles and launch options for inputs of `dtype` (fp32_cfg for fp32)."""
    cfg = fp32_cfg if dtype == torch.float32 else cfg
    # At a 128-wide head the dk/dv kernel needed all 255 registers with 4 warps at sm_90.
    return dict(cfg, num_warps=8) if sum(blocks) >= 128 else dict(cfg)


@triton.jit
def _tile(PTR, rows, sb, sh, sn, off_b, off_h, n_rows, D, D0: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns [D0, D0 + BLOCK_D) of rows `rows` of one (batch, head), zero outside N x D."""
    d = D0 + tl.arange(0, BLOCK_D)
    ptrs = PTR + off_b * sb + off_h * sh + rows.to(tl.int64)[:, None] * sn + d[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (d[None, :] < D), other=0.0)


@triton.jit
def _store(PTR, rows, sb, sh, sn, off_b, off_h, N, D, value, D0: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns [D0, D0 + BLOCK_D) of rows `rows` of one (batch, head) of a gradient, as _tile."""
    d = D0 + tl.arange(0, BLOCK_D)
    ptrs = PTR + off_b * sb + off_h * sh + rows.to(tl.int64)[:, None] * sn + d[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=(rows[:, None] < N) & (d[None, :] < D))


@triton.jit
def _row_ptrs(PTR, sb, sh, sn, off_b, off_h, D0: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Pointers to columns [D0, D0 + BLOCK_D) of rows 0 .. BLOCK_R of one (batch, head), for a
    loop that advances them BLOCK_R rows a step: one add per step where _tile's addresses cost
    64-bit multiplies per row (see the top)."""
    r = tl.arange(0, BLOCK_R).to(tl.int64)
    return PTR + off_b * sb + off_h * sh + r[:, None] * sn + (D0 + tl.arange(0, BLOCK_D))[None, :]


@triton.jit
def _load_rows(ptrs, n_left, D, D0: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile at ptrs (_row_ptrs), zero past the n_left rows left and past column D."""
    mask = (tl.arange(0, BLOCK_R)[:, None] < n_left) & ((D0 + tl.arange(0, BLOCK_D))[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _streams(A, sab, sah, san, Bt, sbb, sbh, sbn, off_b, off_h, BLOCK_R: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """What a loop streaming two tensors BLOCK_R rows a step needs (k and v, or q and dO): their
    _row_ptrs for the head-dim blocks [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2), and each
    one's step. Without a second block (BLOCK_D2 == 0), its pointers repeat the first, unused."""
    a = _row_ptrs(A, sab, sah, san, off_b, off_h, 0, BLOCK_R, BLOCK_D)
    b = _row_ptrs(Bt, sbb, sbh, sbn, off_b, off_h, 0, BLOCK_R, BLOCK_D)
    a2, b2 = a, b
    if BLOCK_D2 > 0:
        a2 = _row_ptrs(A, sab, sah, san, off_b, off_h, BLOCK_D, BLOCK_R, BLOCK_D2)
        b2 = _row_ptrs(Bt, sbb, sbh, sbn, off_b, off_h, BLOCK_D, BLOCK_R, BLOCK_D2)
    rows = tl.full([], BLOCK_R, tl.int64)
    return a, b, a2, b2, rows * san, rows * sbn


# Every matmul kernel below covers the head dim with one block of BLOCK_D columns, plus a second
# of BLOCK_D2 columns when BLOCK_D2 > 0 (a head dim of 48 as 32 + 16: no masked-off columns).
# `if BLOCK_D2 > 0` is resolved at compile time, so the one-block variant carries no extra code.

@triton.jit
def _load_pair(ptrs, ptrs2, n_left, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_D2: tl.constexpr):
    """The tile at ptrs and the second head-dim block's at ptrs2 (_load_rows); without a second
    block, the first again (unused)."""
    t = _load_rows(ptrs, n_left, D, 0, BLOCK_R, BLOCK_D)
    t2 = t
    if BLOCK_D2 > 0:
        t2 = _load_rows(ptrs2, n_left, D, BLOCK_D, BLOCK_R, BLOCK_D2)
    return t, t2


@triton.jit
def _dot_t(a, a2, b, b2, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """a b^T over the whole head dim: both blocks."""
    out = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    if BLOCK_D2 > 0:
        out += tl.dot(a2, tl.trans(b2), input_precision=PRECISION)
    return out


@triton.jit
def _add_dot(acc, acc2, p, x, x2, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """(acc + p x, acc2 + p x2): p times both head-dim blocks of x, in x's dtype."""
    acc += tl.dot(p.to(x.dtype), x, input_precision=PRECISION)
    if BLOCK_D2 > 0:
        acc2 += tl.dot(p.to(x2.dtype), x2, input_precision=PRECISION)
    return acc, acc2


@triton.jit
def _fwd_step(q, q2, kp, vp, kp2, vp2, m, l, acc, acc2, qk_scale, n_left, D, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
              MASKED: tl.constexpr):
    """One key tile of the online softmax: (m, l, acc, acc2) updated with the BLOCK_N keys and
    values at kp, vp (kp2, vp2: the second head-dim block), of which n_left remain in the
    sequence: when MASKED, keys from n_left on are zero rows and get -inf logits."""
    k, k2 = _load_pair(kp, kp2, n_left, D, BLOCK_N, BLOCK_D, BLOCK_D2)
    s = _dot_t(q, q2, k, k2, BLOCK_D2, PRECISION)
    # Issue-bound (see the top): scale in one FFMA with the max subtraction (max(s) * scale ==
    # max(s * scale) as scale > 0), and mask only the one tile that needs it.
    if MASKED:
        s = tl.where(tl.arange(0, BLOCK_N)[None, :] < n_left, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    v, v2 = _load_pair(vp, vp2, n_left, D, BLOCK_N, BLOCK_D, BLOCK_D2)
    acc, acc2 = _add_dot(acc * alpha[:, None], acc2 * alpha[:, None], p, v, v2, BLOCK_D2, PRECISION)
    return m_new, l, acc, acc2


@triton.jit
def _head_and_block(H, N, BLOCK: tl.constexpr):
    """(batch * H + head, batch, head, block) of this program, in a 1-D grid of
    B * H * cdiv(N, BLOCK) programs.
    One axis because a grid's y stops at 65535, which B * H passes (DeiT-B's 12 heads from batch
    5462 on); the blocks of one head stay neighbours in launch order, sharing its k and v in L2,
    as in a (blocks, B * H) grid."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK)
    bh = (pid // blocks).to(tl.int64)
    return bh, bh // H, bh % H, pid % blocks


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr,
              TAIL: tl.constexpr):
    """The keys in full tiles of BLOCK_N without masks, then the last N % BLOCK_N of them in one
    masked tile of TAIL (_tail): N = 197 streams 3 x 64 + 16 keys, not 4 x 64."""
    bh, off_b, off_h, block = _head_and_block(H, N, BLOCK_M)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, 0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q2, acc2 = q, acc  # stand-ins, unused without a second head-dim block
    if BLOCK_D2 > 0:
        q2 = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    kp, vp, kp2, vp2, k_step, v_step = _streams(K, skb, skh, skn, V, svb, svh, svn, off_b, off_h,
                                                BLOCK_N, BLOCK_D, BLOCK_D2)
    full = N - N % BLOCK_N
    for start in range(0, full, BLOCK_N):
        m, l, acc, acc2 = _fwd_step(q, q2, kp, vp, kp2, vp2, m, l, acc, acc2, qk_scale, BLOCK_N, D,
                                    BLOCK_N, BLOCK_D, BLOCK_D2, PRECISION, False)
        kp, vp, kp2, vp2 = kp + k_step, vp + v_step, kp2 + k_step, vp2 + v_step
    if TAIL > 0:
        # (full * skn: within one (batch, head), so int32 is enough)
        kp, vp, kp2, vp2, _, _ = _streams(K + full * skn, skb, skh, skn, V + full * svn, svb, svh,
                                          svn, off_b, off_h, TAIL, BLOCK_D, BLOCK_D2)
        m, l, acc, acc2 = _fwd_step(q, q2, kp, vp, kp2, vp2, m, l, acc, acc2, qk_scale, N - full, D,
                                    TAIL, BLOCK_D, BLOCK_D2, PRECISION, True)
    rmask = rows < N
    out = O + off_b * sob + off_h * soh + rows.to(tl.int64)[:, None] * son
    d = tl.arange(0, BLOCK_D)
    tl.store(out + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty), mask=rmask[:, None] & (d[None, :] < D))
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        tl.store(out + d2[None, :], (acc2 / l[:, None]).to(O.dtype.element_ty),
                 mask=rmask[:, None] & (d2[None, :] < D))
    # lse in log2 units (m + log2 l), the form the backward's exp2 wants
    tl.store(LSE + bh * N + rows, m + tl.log2(l), mask=rmask)


@triton.jit
def _dkdv_step(k, k2, v, v2, qp, dop, qp2, dop2, lse_p, delta_p, dk, dv, dk2, dv2, qk_scale,
               n_left, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
               PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One query tile into this key tile's (dk, dv, dk2, dv2): the BLOCK_M queries and output
    grads at qp, dop and their lse and delta at lse_p, delta_p, of which n_left remain. When
    MASKED, queries from n_left on load zeros and lse = +inf, so their P^T is exactly 0
    (exp2(-inf)) without a select on every score, and they add nothing to dk, dv."""
    q, q2 = _load_pair(qp, qp2, n_left, D, BLOCK_M, BLOCK_D, BLOCK_D2)
    do, do2 = _load_pair(dop, dop2, n_left, D, BLOCK_M, BLOCK_D, BLOCK_D2)
    if MASKED:
        live = tl.arange(0, BLOCK_M) < n_left
        lse = tl.load(lse_p, mask=live, other=float("inf"))
        delta = tl.load(delta_p, mask=live, other=0.0)
    else:
        lse = tl.load(lse_p)
        delta = tl.load(delta_p)
    pt = tl.exp2(_dot_t(k, k2, q, q2, BLOCK_D2, PRECISION) * qk_scale - lse[None, :])
    dst = pt * (_dot_t(v, v2, do, do2, BLOCK_D2, PRECISION) - delta[None, :])
    dv, dv2 = _add_dot(dv, dv2, pt, do, do2, BLOCK_D2, PRECISION)
    dk, dk2 = _add_dot(dk, dk2, dst, q, q2, BLOCK_D2, PRECISION)
    return dk, dv, dk2, dv2


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, scale, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                   PRECISION: tl.constexpr, TAIL: tl.constexpr):
    # DQ, DK and DV share one layout, strides (sgb, sgh, sgn): contiguous, or the slices of one
    # packed (B, N, 3, H, D) grad (ops.attention_qkv). Full query tiles of BLOCK_M, then the
    # last N % BLOCK_M queries in one masked tile of TAIL (as _attn_fwd's keys).
    bh, off_b, off_h, block = _head_and_block(H, N, BLOCK_N)
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, 0, BLOCK_D)
    v = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, 0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    k2, v2, dk2, dv2 = k, v, dk, dv  # stand-ins, unused without a second head-dim block
    if BLOCK_D2 > 0:
        k2 = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        v2 = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    qk_scale = scale * 1.4426950408889634
    qp, dop, qp2, dop2, q_step, do_step = _streams(Q, sqb, sqh, sqn, DO, sdb, sdh, sdn, off_b, off_h,
                                                   BLOCK_M, BLOCK_D, BLOCK_D2)
    # lse and delta as two pointers, each stepped: one offset stepped and added to both bases
    # cost the loop 2 SASS instructions more per tile (233 vs 231, D=64, triton 3.6)
    lse_p = LSE + bh * N + tl.arange(0, BLOCK_M)
    delta_p = DELTA + bh * N + tl.arange(0, BLOCK_M)
    full = N - N % BLOCK_M
    for start in range(0, full, BLOCK_M):
        dk, dv, dk2, dv2 = _dkdv_step(k, k2, v, v2, qp, dop, qp2, dop2, lse_p, delta_p, dk, dv,
                                      dk2, dv2, qk_scale, BLOCK_M, D, BLOCK_M, BLOCK_D, BLOCK_D2,
                                      PRECISION, False)
        qp, dop, qp2, dop2 = qp + q_step, dop + do_step, qp2 + q_step, dop2 + do_step
        lse_p, delta_p = lse_p + BLOCK_M, delta_p + BLOCK_M
    if TAIL > 0:
        qp, dop, qp2, dop2, _, _ = _streams(Q + full * sqn, sqb, sqh, sqn, DO + full * sdn, sdb,
                                            sdh, sdn, off_b, off_h, TAIL, BLOCK_D, BLOCK_D2)
        at = bh * N + full + tl.arange(0, TAIL)
        dk, dv, dk2, dv2 = _dkdv_step(k, k2, v, v2, qp, dop, qp2, dop2, LSE + at, DELTA + at, dk,
                                      dv, dk2, dv2, qk_scale, N - full, D, TAIL, BLOCK_D, BLOCK_D2,
                                      PRECISION, True)
    _store(DK, cols, sgb, sgh, sgn, off_b, off_h, N, D, dk * scale, 0, BLOCK_D)
    _store(DV, cols, sgb, sgh, sgn, off_b, off_h, N, D, dv, 0, BLOCK_D)
    if BLOCK_D2 > 0:
        _store(DK, cols, sgb, sgh, sgn, off_b, off_h, N, D, dk2 * scale, BLOCK_D, BLOCK_D2)
        _store(DV, cols, sgb, sgh, sgn, off_b, off_h, N, D, dv2, BLOCK_D, BLOCK_D2)


@triton.jit
def _dq_step(q, q2, do, do2, kp, vp, kp2, vp2, dq, dq2, lse, delta, qk_scale, n_left, D,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
             PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile into this query tile's (dq, dq2): the BLOCK_N keys and values at kp, vp, of
    which n_left remain. When MASKED, keys from n_left on are zero rows of k, so they add nothing
    to dq, but their p = exp2(-lse) can overflow to inf (and inf * 0 is NaN): they are zeroed."""
    k, k2 = _load_pair(kp, kp2, n_left, D, BLOCK_N, BLOCK_D, BLOCK_D2)
    v, v2 = _load_pair(vp, vp2, n_left, D, BLOCK_N, BLOCK_D, BLOCK_D2)
    p = tl.exp2(_dot_t(q, q2, k, k2, BLOCK_D2, PRECISION) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(tl.arange(0, BLOCK_N)[None, :] < n_left, p, 0.0)
    ds = p * (_dot_t(do, do2, v, v2, BLOCK_D2, PRECISION) - delta[:, None])
    return _add_dot(dq, dq2, ds, k, k2, BLOCK_D2, PRECISION)


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                 sob, soh, son, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, TAIL: tl.constexpr):
    # Full key tiles of BLOCK_N, then the last N % BLOCK_N keys in one masked tile of TAIL.
    bh, off_b, off_h, block = _head_and_block(H, N, BLOCK_M)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    # Runs before _attn_bwd_dkdv: stores delta = rowsum(dO * O) of its rows for it.
    q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, 0, BLOCK_D)
    do = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, 0, BLOCK_D)
    o = _tile(O, rows, sob, soh, son, off_b, off_h, N, D, 0, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q2, do2, dq2 = q, do, dq  # stand-ins, unused without a second head-dim block
    if BLOCK_D2 > 0:
        q2 = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        do2 = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        o2 = _tile(O, rows, sob, soh, son, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), axis=1)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    tl.store(DELTA + bh * N + rows, delta, mask=rmask)
    lse = tl.load(LSE + bh * N + rows, mask=rmask, other=0.0)
    qk_scale = scale * 1.4426950408889634
    kp, vp, kp2, vp2, k_step, v_step = _streams(K, skb, skh, skn, V, svb, svh, svn, off_b, off_h,
                                                BLOCK_N, BLOCK_D, BLOCK_D2)
    full = N - N % BLOCK_N
    for start in range(0, full, BLOCK_N):
        dq, dq2 = _dq_step(q, q2, do, do2, kp, vp, kp2, vp2, dq, dq2, lse, delta, qk_scale, BLOCK_N,
                           D, BLOCK_N, BLOCK_D, BLOCK_D2, PRECISION, False)
        kp, vp, kp2, vp2 = kp + k_step, vp + v_step, kp2 + k_step, vp2 + v_step
    if TAIL > 0:
        kp, vp, kp2, vp2, _, _ = _streams(K + full * skn, skb, skh, skn, V + full * svn, svb, svh,
                                          svn, off_b, off_h, TAIL, BLOCK_D, BLOCK_D2)
        dq, dq2 = _dq_step(q, q2, do, do2, kp, vp, kp2, vp2, dq, dq2, lse, delta, qk_scale,
                           N - full, D, TAIL, BLOCK_D, BLOCK_D2, PRECISION, True)
    _store(DQ, rows, sgb, sgh, sgn, off_b, off_h, N, D, dq * scale, 0, BLOCK_D)
    if BLOCK_D2 > 0:
        _store(DQ, rows, sgb, sgh, sgn, off_b, off_h, N, D, dq2 * scale, BLOCK_D, BLOCK_D2)


def _strides(t):
    return t.stride()[:3]


def token_major_empty(q):
    """An empty (B, H, N, D) output like q, laid out (B, N, H, D) in memory as FlashAttention
    writes it: a block's head merge o.transpose(1, 2).reshape(B, N, H * D) is then a view, where
    a contiguous o costs a copy kernel (a read and a write of the activations) per call."""
    B, H, N, D = q.shape
    return torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype):
    # fp32 inputs get true fp32 products (the default would be TF32, ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(q, k, v, scale, split=None):
    """q, k, v: (B, H, N, D), unit last stride -> (o (B, H, N, D) token-major in memory (see
    token_major_empty), lse fp32 (B, H, N) contiguous, in log2 units).
    split: cover a non-power-of-two D with two exact blocks (default SPLIT_HEAD_DIM)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, N, D = q.shape
    o = token_major_empty(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    blocks = _blocks(D, SPLIT_HEAD_DIM if split is None else split)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    consts = dict(BLOCK_D=blocks[0], BLOCK_D2=blocks[1], PRECISION=_precision(q.dtype))
    cfg = _config(FWD, FWD_FP32, blocks, q.dtype)
    launch(_attn_fwd, (cdiv(N, cfg["BLOCK_M"]) * B * H,), q, k, v, o, lse, *strides, H, N, D, scale,
           **consts, TAIL=_tail(N, cfg["BLOCK_N"]), **cfg)
    return o, lse


def backward(do, q, k, v, o, lse, scale, split=None, out=None):
    """-> (dq, dk, dv) in the input dtype; no atomics. out: where to write them, three (B, H, N, D)
    tensors with one set of strides and a unit last stride (e.g. the q, k, v slices of one packed
    grad); default fresh contiguous tensors."""
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    B, H, N, D = q.shape
    blocks, precision = _blocks(D, SPLIT_HEAD_DIM if split is None else split), _precision(q.dtype)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dq, dk, dv = out or (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    qkv, o_strides = (*_strides(q), *_strides(k), *_strides(v)), _strides(o)
    grads = (*_strides(do), *_strides(dq))
    consts = dict(BLOCK_D=blocks[0], BLOCK_D2=blocks[1], PRECISION=precision)
    cfg = _config(BWD_Q, BWD_Q_FP32, blocks, q.dtype)
    launch(_attn_bwd_dq, (cdiv(N, cfg["BLOCK_M"]) * B * H,),  # first: it writes delta
        q, k, v, o, do, lse, delta, dq, *qkv, *o_strides, *grads, H, N, D, scale, **consts,
        TAIL=_tail(N, cfg["BLOCK_N"]), **cfg)
    cfg = _config(BWD_KV, BWD_KV_FP32, blocks, q.dtype)
    launch(_attn_bwd_dkdv, (cdiv(N, cfg["BLOCK_N"]) * B * H,),
        q, k, v, do, lse, delta, dk, dv, *qkv, *grads, H, N, D, scale, **consts,
        TAIL=_tail(N, cfg["BLOCK_M"]), **cfg)
    return dq, dk, dv


def aot_configs(dtype: str):
    """Every shipped kernel variant per head dim, for the sm_90 AOT test (see layerscale.py).
    D is `aligned` too: every head dim in HEAD_DIMS is a multiple of 16, which the JIT
    specialises on (without it the AOT variants are not the ones that run: 20 registers apart)."""
    strides = [f"s{t}{a}" for t in "qkvodg" for a in "bhn"]
    ints = dict.fromkeys(["H", "N", "D"] + strides, "i32")
    ints["scale"] = "fp32"
    ptrs = dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], f"*{dtype}")
    ptrs.update(dict.fromkeys(["LSE", "DELTA"], "*fp32"))
    variants = sorted({_blocks(d, split) for d in HEAD_DIMS for split in (False, True)})
    # the tail tiles: ViT's (16) and the widest, the streamed tile's own width
    kernels = ((_attn_fwd, FWD, FWD_FP32, "BLOCK_N"),
               (_attn_bwd_dkdv, BWD_KV, BWD_KV_FP32, "BLOCK_M"),
               (_attn_bwd_dq, BWD_Q, BWD_Q_FP32, "BLOCK_N"))
    torch_dtype = DTYPES[dtype]
    for blocks, (kernel, base, base_fp32, streamed) in itertools.product(variants, kernels):
        cfg = _config(base, base_fp32, blocks, torch_dtype)
        sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
        for tail in sorted({16, cfg[streamed]}):
            constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            constexprs.update(BLOCK_D=blocks[0], BLOCK_D2=blocks[1], TAIL=tail,
                              PRECISION=_precision(torch_dtype))
            yield dict(kernel=kernel, signature=sig, constexprs=constexprs,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                       aligned=(*strides, "D"), matmul=torch_dtype != torch.float32)  # fp32: FMA
