"""Self-attention, flash style: softmax(q k^T * scale) v without the N x N matrix in memory.

Tuned for ViT sequence lengths (N = 197/198 at 224 px, 577/578 at 384 px), not long text: key
tiles are 32 wide, so N = 197 streams 224 keys (88 % useful) where a 64-wide tile streams 256
(77 %). Head dims that are not a power of two (CaiT's 48) use one masked 64-wide block.

Forward: one program per (query tile, batch*head); online softmax in fp32; saves only the
log-sum-exp (lse) per query row. Backward: FlashAttention-2's recomputation, split in two kernels
so that nothing is accumulated with atomics (bitwise-reproducible grads): one program per key
tile computes dk and dv over all queries, one program per query tile computes dq over all keys.
delta = rowsum(dO * O) is precomputed by a small kernel.
q, k, v, o, dO are addressed with (batch, head, row) strides and a unit last stride, so views of
the (B, N, 3, H, D) qkv projection go in without a copy.
"""
import torch
import triton
import triton.language as tl

FWD = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
BWD_KV = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)   # key tile owns dk, dv
BWD_Q = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)    # query tile owns dq
DELTA = dict(BLOCK_M=32, num_warps=4)
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)


def _config(cfg: dict, block_d: int) -> dict:
    # At a 128-wide head the dk/dv kernel needed all 255 registers with 4 warps at sm_90.
    return dict(cfg, num_warps=8) if block_d >= 128 else dict(cfg)


@triton.jit
def _tile(PTR, rows, sb, sh, sn, off_b, off_h, n_rows, D, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    ptrs = PTR + off_b * sb + off_h * sh + rows.to(tl.int64)[:, None] * sn + d[None, :]
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (d[None, :] < D), other=0.0)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              H, N, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, BLOCK_D)
        v = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    acc = acc / l[:, None]
    d = tl.arange(0, BLOCK_D)
    rmask = rows < N
    o_ptrs = O + off_b * sob + off_h * soh + rows.to(tl.int64)[:, None] * son + d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=rmask[:, None] & (d[None, :] < D))
    # lse in log2 units (m + log2 l), the form the backward's exp2 wants
    tl.store(LSE + bh.to(tl.int64) * N + rows, m + tl.log2(l), mask=rmask)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, N, D,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _tile(O, rows, sob, soh, son, off_b, off_h, N, D, BLOCK_D).to(tl.float32)
    do = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, axis=1), mask=rows < N)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdb, sdh, sdn, H, N, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, BLOCK_D)
    v = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, BLOCK_D)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < N
        q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D)
        do = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, BLOCK_D)
        lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
        # P^T (keys x queries), zero for padded queries so they add nothing to dk, dv
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.where(rmask[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_D)
    mask = (cols[:, None] < N) & (d[None, :] < D)
    offs = bh.to(tl.int64) * N * D + cols.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                 sdb, sdh, sdn, H, N, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(1)
    off_b, off_h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    q = _tile(Q, rows, sqb, sqh, sqn, off_b, off_h, N, D, BLOCK_D)
    do = _tile(DO, rows, sdb, sdh, sdn, off_b, off_h, N, D, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=rmask, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(K, cols, skb, skh, skn, off_b, off_h, N, D, BLOCK_D)
        v = _tile(V, cols, svb, svh, svn, off_b, off_h, N, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(cols[None, :] < N, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    d = tl.arange(0, BLOCK_D)
    offs = bh.to(tl.int64) * N * D + rows.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(DQ + offs, (dq * scale).to(DQ.dtype.element_ty), mask=rmask[:, None] & (d[None, :] < D))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype):
    # fp32 inputs get true fp32 products (the default would be TF32, ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"


def forward(q, k, v, scale):
    """q, k, v: (B, H, N, D), unit last stride -> (o contiguous, lse fp32 (B, H, N) in log2 units)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, N, D = q.shape
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(D)
    cfg = _config(FWD, block_d)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * H)
    _attn_fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                    H, N, D, scale, BLOCK_D=block_d, PRECISION=_precision(q.dtype), **cfg)
    return o, lse


def backward(do, q, k, v, o, lse, scale):
    """-> (dq, dk, dv), contiguous (B, H, N, D) in the input dtype; no atomics."""
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    B, H, N, D = q.shape
    block_d, precision = triton.next_power_of_2(D), _precision(q.dtype)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _attn_bwd_delta[(triton.cdiv(N, DELTA["BLOCK_M"]), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, N, D, BLOCK_D=block_d, **DELTA)
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), H, N, D, scale)
    _attn_bwd_dkdv[(triton.cdiv(N, BWD_KV["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, BLOCK_D=block_d, PRECISION=precision,
        **_config(BWD_KV, block_d))
    _attn_bwd_dq[(triton.cdiv(N, BWD_Q["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, BLOCK_D=block_d, PRECISION=precision,
        **_config(BWD_Q, block_d))
    return dq, dk, dv


def aot_configs(dtype: str):
    """Every shipped kernel variant per head dim, for the sm_90 AOT test (see layerscale.py)."""
    strides = [f"s{t}{a}" for t in "qkvod" for a in "bhn"]
    ints = dict.fromkeys(["H", "N", "D"] + strides, "i32")
    ints["scale"] = "fp32"
    ptrs = dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], f"*{dtype}")
    ptrs.update(dict.fromkeys(["LSE", "DELTA"], "*fp32"))
    kernels = [(_attn_fwd, FWD, True), (_attn_bwd_dkdv, BWD_KV, True), (_attn_bwd_dq, BWD_Q, True),
               (_attn_bwd_delta, DELTA, False)]
    for block_d in sorted({triton.next_power_of_2(d) for d in HEAD_DIMS}):
        for kernel, base, matmul in kernels:
            cfg = _config(base, block_d) if matmul else base
            sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
            constexprs = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            constexprs["BLOCK_D"] = block_d
            if matmul:
                constexprs["PRECISION"] = "tf32"
            yield dict(kernel=kernel, signature=sig, constexprs=constexprs, num_warps=cfg["num_warps"],
                       num_stages=cfg.get("num_stages", 3), aligned=tuple(strides), matmul=matmul)
