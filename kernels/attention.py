"""Self-attention, flash style: softmax(q k^T * scale) v without the N x N matrix in memory.

Sized for ViT sequence lengths (N = 197/198 at 224 px, 577/578 at 384 px), not long text. At
head dims up to 64 these loops are bound by instruction issue rather than by their MMAs: a
score's softmax (scale, max, exp2, sum, convert) and the accumulator's rescaling cost more issue
slots than its 2 D multiply-adds on the tensor cores. So the loops take the fewest instructions
per score: only the last key tile is masked (a uniform branch), the scale rides in the FFMA of
the max subtraction, K and V pointers advance by one add a tile, and the forward's key tiles are
64 wide (the rescaling of the 64-column accumulator is paid per 64 keys, not 32), though
N = 197 then streams 256 keys instead of 224: SASS instructions a thread issues per full tile at
D=64, sm_90, triton 3.6, fwd 268 per 64x32 -> 327 per 64x64 (-39 % per score), dq 207 -> 169,
dk/dv 293 -> 261 (`python tests/aot/compile_triton.py attention`, loop_instructions).
Not yet timed on a GPU (bench.tune). Head dims that are not a power of two (CaiT's 48) use one
masked 64-wide block or two exact ones (32 + 16): SPLIT_HEAD_DIM below.

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
import torch
import triton
import triton.language as tl

from . import cdiv, next_pow2

FWD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
BWD_KV = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)   # key tile owns dk, dv
BWD_Q = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)    # query tile owns dq
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)


# Head dims that are not a power of two: one masked block (48 -> 64, a quarter of the MMA work
# and loads wasted) or two exact blocks (48 -> 32 + 16: twice the MMA instructions, each smaller).
# Which is faster is a question for the GPU benchmark (bench/ops/attention.py, impl
# triton_split); until it has answered, the masked block, the simpler code, is the default.
SPLIT_HEAD_DIM = False


def _blocks(D: int, split: bool):
    """(BLOCK_D, BLOCK_D2) covering head dim D: one power-of-two block, masked past D, or with
    `split` the largest power of two below D plus the rest where that is a power of two >= 16
    (tl.dot's smallest K): 48 = 32 + 16, 80 = 64 + 16, 96 = 64 + 32."""
    whole = next_pow2(D)
    rest = D - whole // 2
    if split and whole != D and rest >= 16 and rest & (rest - 1) == 0:
        return whole // 2, rest
    return whole, 0


def _config(cfg: dict, blocks) -> dict:
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
    64-bit multiplies per row (the loops are bound by instruction issue, see the top)."""
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
def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, 0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        q2 = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    kp, vp, kp2, vp2, k_step, v_step = _streams(K, skb, skh, skn, V, svb, svh, svn, off_b, off_h,
                                                BLOCK_N, BLOCK_D, BLOCK_D2)
    for start in range(0, N, BLOCK_N):
        k = _load_rows(kp, N - start, D, 0, BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            k2 = _load_rows(kp2, N - start, D, BLOCK_D, BLOCK_N, BLOCK_D2)
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        # Issue-bound (see the top): mask only the last tile, and scale in one FFMA with the max
        # subtraction (max(s) * scale == max(s * scale) as scale > 0).
        if start + BLOCK_N > N:
            s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = _load_rows(vp, N - start, D, 0, BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            v2 = _load_rows(vp2, N - start, D, BLOCK_D, BLOCK_N, BLOCK_D2)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)
            kp2 += k_step
            vp2 += v_step
        m = m_new
        kp += k_step
        vp += v_step
    rmask = rows < N
    out = O + off_b * sob + off_h * soh + rows.to(tl.int64)[:, None] * son
    d = tl.arange(0, BLOCK_D)
    tl.store(out + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty), mask=rmask[:, None] & (d[None, :] < D))
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        tl.store(out + d2[None, :], (acc2 / l[:, None]).to(O.dtype.element_ty),
                 mask=rmask[:, None] & (d2[None, :] < D))
    # lse in log2 units (m + log2 l), the form the backward's exp2 wants
    tl.store(LSE + bh.to(tl.int64) * N + rows, m + tl.log2(l), mask=rmask)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, scale, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                   PRECISION: tl.constexpr):
    # DQ, DK and DV share one layout, strides (sgb, sgh, sgn): contiguous, or the slices of one
    # packed (B, N, 3, H, D) grad (ops.attention_qkv).
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, 0, BLOCK_D)
    v = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, 0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        k2 = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        v2 = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    qk_scale = scale * 1.4426950408889634
    qp, dop, qp2, dop2, q_step, do_step = _streams(Q, sqb, sqh, sqn, DO, sdb, sdh, sdn, off_b, off_h,
                                                   BLOCK_M, BLOCK_D, BLOCK_D2)
    stats = bh.to(tl.int64) * N + tl.arange(0, BLOCK_M)
    for start in range(0, N, BLOCK_M):
        q = _load_rows(qp, N - start, D, 0, BLOCK_M, BLOCK_D)
        do = _load_rows(dop, N - start, D, 0, BLOCK_M, BLOCK_D)
        rmask = tl.arange(0, BLOCK_M) < N - start
        # lse = +inf past N: P^T is exactly 0 for padded queries (exp2(-inf)), without a select
        # on every score, so they add nothing to dk, dv
        lse = tl.load(LSE + stats + start, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + stats + start, mask=rmask, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            q2 = _load_rows(qp2, N - start, D, BLOCK_D, BLOCK_M, BLOCK_D2)
            do2 = _load_rows(dop2, N - start, D, BLOCK_D, BLOCK_M, BLOCK_D2)
            st += tl.dot(k2, tl.trans(q2), input_precision=PRECISION)
            dpt += tl.dot(v2, tl.trans(do2), input_precision=PRECISION)
            qp2 += q_step
            dop2 += do_step
        pt = tl.exp2(st * qk_scale - lse[None, :])
        dst = pt * (dpt - delta[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dv2 += tl.dot(pt.to(do2.dtype), do2, input_precision=PRECISION)
            dk2 += tl.dot(dst.to(q2.dtype), q2, input_precision=PRECISION)
        qp += q_step
        dop += do_step
    _store(DK, cols, sgb, sgh, sgn, off_b, off_h, N, D, dk * scale, 0, BLOCK_D)
    _store(DV, cols, sgb, sgh, sgn, off_b, off_h, N, D, dv, 0, BLOCK_D)
    if BLOCK_D2 > 0:
        _store(DK, cols, sgb, sgh, sgn, off_b, off_h, N, D, dk2 * scale, BLOCK_D, BLOCK_D2)
        _store(DV, cols, sgb, sgh, sgn, off_b, off_h, N, D, dv2, BLOCK_D, BLOCK_D2)


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                 sob, soh, son, sdb, sdh, sdn, sgb, sgh, sgn, H, N, D, scale, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                 PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    # Runs before _attn_bwd_dkdv: stores delta = rowsum(dO * O) of its rows for it.
    q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, 0, BLOCK_D)
    do = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, 0, BLOCK_D)
    o = _tile(O, rows, sob, soh, son, off_b, off_h, N, D, 0, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        q2 = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        do2 = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        o2 = _tile(O, rows, sob, soh, son, off_b, off_h, N, D, BLOCK_D, BLOCK_D2)
        delta += tl.sum(o2.to(tl.float32) * do2.to(tl.float32), axis=1)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, delta, mask=rmask)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
    qk_scale = scale * 1.4426950408889634
    kp, vp, kp2, vp2, k_step, v_step = _streams(K, skb, skh, skn, V, svb, svh, svn, off_b, off_h,
                                                BLOCK_N, BLOCK_D, BLOCK_D2)
    for start in range(0, N, BLOCK_N):
        k = _load_rows(kp, N - start, D, 0, BLOCK_N, BLOCK_D)
        v = _load_rows(vp, N - start, D, 0, BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if BLOCK_D2 > 0:
            k2 = _load_rows(kp2, N - start, D, BLOCK_D, BLOCK_N, BLOCK_D2)
            v2 = _load_rows(vp2, N - start, D, BLOCK_D, BLOCK_N, BLOCK_D2)
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
            dp += tl.dot(do2, tl.trans(v2), input_precision=PRECISION)
            kp2 += k_step
            vp2 += v_step
        p = tl.exp2(s * qk_scale - lse[:, None])
        # Keys past N are zero rows of k, so they add nothing to dq, but their p = exp2(-lse) can
        # overflow to inf (and inf * 0 is NaN): zero them, on the last tile only (as the forward)
        if start + BLOCK_N > N:
            p = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < N, p, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds.to(k2.dtype), k2, input_precision=PRECISION)
        kp += k_step
        vp += v_step
    _store(DQ, rows, sgb, sgh, sgn, off_b, off_h, N, D, dq * scale, 0, BLOCK_D)
    if BLOCK_D2 > 0:
        _store(DQ, rows, sgb, sgh, sgn, off_b, off_h, N, D, dq2 * scale, BLOCK_D, BLOCK_D2)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


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
    cfg = _config(FWD, blocks)
    grid = (cdiv(N, cfg["BLOCK_M"]), B * H)
    _attn_fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                    H, N, D, scale, BLOCK_D=blocks[0], BLOCK_D2=blocks[1], PRECISION=_precision(q.dtype),
                    **cfg)
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
    qkv, grads = (*_strides(q), *_strides(k), *_strides(v)), (*_strides(do), *_strides(dq))
    consts = dict(BLOCK_D=blocks[0], BLOCK_D2=blocks[1], PRECISION=precision)
    _attn_bwd_dq[(cdiv(N, BWD_Q["BLOCK_M"]), B * H)](  # first: it writes delta
        q, k, v, o, do, lse, delta, dq, *qkv, *_strides(o), *grads, H, N, D, scale, **consts,
        **_config(BWD_Q, blocks))
    _attn_bwd_dkdv[(cdiv(N, BWD_KV["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *qkv, *grads, H, N, D, scale, **consts,
        **_config(BWD_KV, blocks))
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
    for blocks in variants:
        for kernel, base in ((_attn_fwd, FWD), (_attn_bwd_dkdv, BWD_KV), (_attn_bwd_dq, BWD_Q)):
            cfg = _config(base, blocks)
            sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
            constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            constexprs.update(BLOCK_D=blocks[0], BLOCK_D2=blocks[1], PRECISION="tf32")
            yield dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"], aligned=(*strides, "D"), matmul=True)
