"""Talking-heads attention, chunked: the N x N products as batched GEMMs, the head mixing and the
softmax in one memory-bound Triton pass per product, a few images at a time.

    S[h] = q_h k_h^T (_gemm)  ->  P'[f] = sum_g w_w[f,g] softmax(scale sum_h w_l[g,h] S[h]) + b_w[f]
    (one kernel, in place over S)  ->  out[f] = P'[f] v_f (_gemm)

Why: the fused kernels (kernels/talking_heads.py) hold every head of a query tile at once, which
leaves 16 x 16 tiles and two passes over the keys that issue at a tenth of their rate (an H100,
2026-11-26: 3.76 ms fwd+bwd at 256 x 8 x 196 x 48, the target needed 2.97). Here every product
is a plain batched GEMM, and what couples the heads is elementwise along a row of N keys, which
a program holds whole (all heads of one query row): one read and one write of each N x N tensor
per pass. Counted at that shape (157 MB per bf16 N x N tensor): forward 4 of them through
memory (the GEMMs write S and read P', the kernel reads S and writes P'), backward about 10,
~2.2 GB in all: ~0.7 ms at 3 TB/s. Timed on an H200 (2026-11-27) the forward won and the
backward lost, its mixing pass ~70 % of it: one program a group of query rows, 16 warps, most of
its ~1100 SASS instructions a thread on costs paid once a program (the mixing matrices' loads;
the weight grads' reductions across warps: 160 shuffles), ncu: mio_throttle, DRAM at 4 %, and
2-byte accesses (rows N apart). Since 2026-11-28 a program loops over GROUPS_PER_PROGRAM groups
and pays those once, loads the next group's rows while one computes, and rows are a multiple
of 16 elements apart (_nn_buffer): 16-byte accesses, in the GEMMs that write or read the N x N
buffers too (stores and cp.async copies of 16 bytes where they took 2: _gemm's padded bounds).
SASS a thread per real score, bf16, 8 heads, forward / backward mixing pass: 62 / 178 before,
36 / 86 now (triton 3.8; 3.6: 35 / 84; `python tests/aot/census.py`, its last lines), against
the fused kernels' 34 / 89, which also hold the products. Not yet timed.

Memory: the N x N tensors (rows padded to 16 elements) exist for `chunk` images at a time, so
their buffers stay within CHUNK_BUDGET x the size of q (peak memory O(B H N D), as for the fused
kernels), and nothing N x N is saved for the backward: it recomputes S = q k^T and dP' = dO v^T
per chunk, then one kernel writes P' over S and dS over dP' (in place: each program owns its
rows), then three GEMMs give dv = P'^T dO, dq = dS k, dk = dS^T q. The GEMMs (_gemm, wgmma on
sm_90) read q, k, v and dO and write o, dq, dk and dv where the model keeps them (views of the packed projection,
token-major o): cuBLAS's bmm needs one batch stride, and the copies that would give it one add
~0.85 GB of traffic at 256 x 8 x 196 x 48 to the ~2.2 GB above. The weight grads are
per-program partial sums, added in a fixed order: deterministic, like the GEMMs. The saved
statistic is the same log-sum-exp (log2 units, without b_l) as the fused kernels', so either
family's backward runs on either's forward. S, P', dP' and dS are kept in the inputs' dtype, as
timm's eager math rounds them.
"""
import torch
import triton
import triton.language as tl

from . import DTYPES, cdiv, launch, next_pow2
from . import talking_heads as fused  # its slot helpers (jit functions, looked up at compile time)
from .attention import _precision, token_major_empty

LOG2E = 1.4426950408889634
SLOTS = 16  # of a program's [HP, NP] tiles: HP // HG query rows of HG heads each (see _meta)
# The N x N buffers of one chunk (1 forward, 2 backward) take at most this many times q's bytes.
CHUNK_BUDGET = 2.0
# A program holds [16, NP] tiles (about six live in the backward): up to NP = 256 they fit in
# registers at 16 warps (at 512 the backward spilled a KB a thread, triton 3.8); longer rows
# (CaiT at 384 px and up) run the fused kernels instead.
MAX_KEYS = 256
# Offsets inside one image's (H, N, N) slice are 32-bit (a [16, NP] tile of 64-bit pointers
# would take two registers an element); the image's base is a 64-bit scalar.
MAX_IMAGE = 2 ** 31
# Row groups a mixing program loops over (the per-program costs are paid once for them all). 4:
# in CaiT-M's backward (16 heads: a group is one query row; chunks of 13 images) 637 programs of
# 16 warps, ~5 waves of one per SM on 132 SMs. Not yet timed.
GROUPS_PER_PROGRAM = 4


def supported(heads: int, n: int) -> bool:
    return heads <= SLOTS and n <= MAX_KEYS and heads * n * n < MAX_IMAGE


def chunk_images(B: int, H: int, N: int, D: int, buffers: int) -> int:
    """Images per chunk: `buffers` (c, H, N, N) tensors (rows padded: _row_stride) within
    CHUNK_BUDGET x q's (B, H, N, D), spread evenly over the chunks (at least one image)."""
    most = max(1, min(B, int(CHUNK_BUDGET * B * D // (buffers * _row_stride(N)))))
    return cdiv(B, cdiv(B, most))


# The heads are mixed on tensor cores, as in the fused tensor-core kernels: a program's tiles
# are [HP = 16, NP] (16 is the smallest dot dimension), slot s holding head s % HG of query row
# s // HG of the current group of rows (HG = H rounded up to a power of two), so each mixing is
# one [16, 16] x [16, NP] dot with a block-diagonal weight (fused._weights), a weight grad one
# [16, NP] x [NP, 16] dot folded to [HG, HG] (fused._fold), and the softmax statistics are
# per-slot row reductions: no per-head loop, where one (with a cross-thread reduction per head
# for each weight grad) took ~3500 SASS instructions a row under triton 3.8 at 8 heads. Operands
# are rounded to the inputs' dtype as there (fused._mix says why); fp32 stays fp32.

@triton.jit
def _group(g, head, group, H, N, NS, HP: tl.constexpr, HG: tl.constexpr, NP: tl.constexpr):
    """(rows [HP], 32-bit offsets [HP, NP] into one image's (H, N, NS) rows, their load / store
    mask, live slots [HP]) of row group g: HP // HG query rows. The mask admits the row's padding
    past N (up to NS, a multiple of 16), so that it is constant over 16 keys and the accesses are
    16-byte vectors; the padding's values are the kernels' to ignore (or to zero: _keys)."""
    rows = g * (HP // HG) + group
    jj = tl.arange(0, NP)
    live = (head < H) & (rows < N)
    offs = (head[:, None] * N + rows[:, None]) * NS + jj[None, :]
    return rows, offs, live[:, None] & (jj[None, :] < NS), live


@triton.jit
def _keys(x, N, NP: tl.constexpr):
    """x [HP, NP] with the keys at or past N (padding read from memory: anything, NaN included)
    set to zero."""
    return tl.where(tl.arange(0, NP)[None, :] < N, x, 0.0)


@triton.jit
def _mix_softmax_fwd(S, LSE, WL, WW, BW, H, N, NS, groups_per_prog, qk_scale, HP: tl.constexpr,
                     HG: tl.constexpr, NP: tl.constexpr, PRECISION: tl.constexpr):
    """groups_per_prog groups of HP // HG query rows (program 1) of image pid0 of S (c, H, N, N),
    rows NS apart: P' over S in place, the mixed logits' log-sum-exp (log2 units, without b_l)
    into LSE (c, H, N). The mixing matrices are loaded once for all the groups."""
    b = tl.program_id(0).to(tl.int64)
    S += b * H * N * NS
    LSE += b * H * N
    DT = S.dtype.element_ty
    head, group = fused._slots(HP, HG)
    wl = fused._weights(WL, H, head, group, False, DT)
    ww = fused._weights(WW, H, head, group, False, DT)
    bw = tl.load(BW + head, mask=head < H, other=0.0).to(tl.float32)
    first = tl.program_id(1) * groups_per_prog
    for g in tl.range(first, tl.minimum(first + groups_per_prog, tl.cdiv(N, HP // HG))):
        rows, offs, mask, live = _group(g, head, group, H, N, NS, HP, HG, NP)
        s = tl.load(S + offs, mask=mask, other=0.0)
        x = tl.dot(wl, s, input_precision=PRECISION)
        x = tl.where(tl.arange(0, NP)[None, :] < N, x * qk_scale, float("-inf"))
        m = tl.max(x, axis=1)
        p = tl.exp2(x - m[:, None])
        l = tl.sum(p, axis=1)
        tl.store(LSE + head * N + rows, m + tl.log2(l), mask=live)
        out = tl.dot(ww, (p / l[:, None]).to(DT), input_precision=PRECISION)
        # In place: every warp's loads of S are done before any warp overwrites them. The dots'
        # operand staging through shared memory orders them already; this does not rest on that
        # (the interpreter runs a program in lockstep and would never show such a race).
        tl.debug_barrier()
        tl.store(S + offs, (out + bw[:, None]).to(DT), mask=mask)


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    """Two sums in one tl.reduce: their partials cross warps through shared memory together (two
    barriers a group fewer than two tl.sum)."""
    return a0 + b0, a1 + b1


@triton.jit
def _contract(a, b, acc, HP: tl.constexpr, NP: tl.constexpr, STRIPS: tl.constexpr,
              PRECISION: tl.constexpr):
    """acc + sum_j a[s, j] b[t, j], acc [STRIPS, HP, HP]: a mixing weight's grad before the strips
    of acc are added (tl.sum over axis 0) and fused._fold. As one [HP, NP] x [NP, HP] dot every
    warp held both whole operands (a 16 x 16 result leaves the K axis unsplit) and the kernel
    spilled; batched per strip of 16 keys, each warp holds one strip's. With STRIPS = NP // 16 the
    strips' sums stay in the dot's accumulator across a program's row groups; with STRIPS = 1
    they are added at once (fp32 operands: their FMA dots left no registers for the former)."""
    a3 = tl.permute(tl.reshape(a, [HP, NP // 16, 16]), (1, 0, 2))
    b3 = tl.permute(tl.reshape(b, [HP, NP // 16, 16]), (1, 2, 0))
    if STRIPS == 1:
        acc += tl.sum(tl.dot(a3, b3, input_precision=PRECISION), axis=0, keep_dims=True)
    else:
        acc = tl.dot(a3, b3, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _mix_softmax_bwd(S, DP, LSE, WL, WW, BW, PART, H, N, NS, groups_per_prog, qk_scale, scale,
                     HP: tl.constexpr, HG: tl.constexpr, NP: tl.constexpr, STRIPS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Row groups as _mix_softmax_fwd, from S = q k^T and DP = dO v^T (both (c, H, N, N), rows NS
    apart): P' over S and scale * dS over DP, in place;
    this program's sums of dw_l, dw_w and db_w into PART[pid] (3, HG, HG) fp32. With p_g the
    softmax of the mixed logits, dP_g = sum_f w_w[f,g] dP'_f, dM_g = p_g (dP_g - rowsum(p_g dP_g)
    / rowsum(p_g)) and dS_h = sum_g w_l[g,h] dM_g.

    A program loops over several row groups so that what does not depend on the rows is paid
    once: the four mixing matrices' loads, and the weight grads' reductions across warps (their
    strip sums stay in dot accumulators; a program of one group, as before 2026-11-28, spent
    most of its SASS on those reductions, 160 of its ~1100 instructions a thread shuffles, and
    an H200's ncu showed it mio_throttle-bound with DRAM at 4 %). Each iteration loads the next
    group's S, dP' and lse into registers, so that those loads are in flight while this group
    computes: one 16-warp program an SM (128 registers a thread) leaves no other to hide them,
    and tl.range's pipeline did not take these loads."""
    b = tl.program_id(0).to(tl.int64)
    S += b * H * N * NS
    DP += b * H * N * NS
    LSE += b * H * N
    DT = S.dtype.element_ty
    head, group = fused._slots(HP, HG)
    wl = fused._weights(WL, H, head, group, False, DT)
    wl_t = fused._weights(WL, H, head, group, True, DT)
    ww = fused._weights(WW, H, head, group, False, DT)
    ww_t = fused._weights(WW, H, head, group, True, DT)
    bw = tl.load(BW + head, mask=head < H, other=0.0).to(tl.float32)
    acc_wl = tl.zeros([STRIPS, HP, HP], tl.float32)
    acc_ww = tl.zeros([STRIPS, HP, HP], tl.float32)
    acc_bw = tl.zeros([HP, NP], tl.float32)
    first = tl.program_id(1) * groups_per_prog
    last = tl.minimum(first + groups_per_prog, tl.cdiv(N, HP // HG))
    # This group's S, dP' and lse were loaded during the group before (registers, two stages).
    rows, offs, mask, live = _group(first, head, group, H, N, NS, HP, HG, NP)
    s_next = tl.load(S + offs, mask=mask, other=0.0)
    dpp_next = tl.load(DP + offs, mask=mask, other=0.0)
    lse_next = tl.load(LSE + head * N + rows, mask=live, other=0.0)
    for g in tl.range(first, last):
        s, dpp, lse = _keys(s_next, N, NP), _keys(dpp_next, N, NP), lse_next
        rows, offs, mask, live = _group(g, head, group, H, N, NS, HP, HG, NP)
        ahead, _, mask_ahead, live_ahead = _group(g + 1, head, group, H, N, NS, HP, HG, NP)
        s_next = tl.load(S + offs + (HP // HG) * NS, mask=mask_ahead & (g + 1 < last), other=0.0)
        dpp_next = tl.load(DP + offs + (HP // HG) * NS, mask=mask_ahead & (g + 1 < last), other=0.0)
        lse_next = tl.load(LSE + head * N + ahead, mask=live_ahead & (g + 1 < last), other=0.0)
        x = tl.dot(wl, s, input_precision=PRECISION)
        x = tl.where(tl.arange(0, NP)[None, :] < N, x * qk_scale, float("-inf"))
        p = tl.exp2(x - lse[:, None])  # 0 past N (not exp2(-lse), which overflows for lse < -128)
        dp = tl.dot(ww_t, dpp, input_precision=PRECISION)  # dpp: dP'
        # rowsum(p dP) / rowsum(p): the recomputed p carries lse's rounding (rows sum to 1 + e,
        # e ~ 1e-5 where |lse| ~ 150); dividing it out makes dM sum to zero over the row, which
        # dq (a sum of dS times k, whose shared component can dwarf the rest) needs
        # (fused._normalised). rowsum(p) >= 1 / N in every slot, dead ones included: never 0.
        delta, psum = tl.reduce((p * dp, p), 1, _add_pairs)  # one exchange across warps for both
        dm = (p * (dp - (delta / psum)[:, None])).to(DT)
        pd = p.to(DT)
        acc_ww = _contract(dpp, pd, acc_ww, HP, NP, STRIPS, PRECISION)
        acc_bw += dpp.to(tl.float32)
        acc_wl = _contract(dm, s, acc_wl, HP, NP, STRIPS, PRECISION)
        ds = tl.dot(wl_t, dm, input_precision=PRECISION)
        out = tl.dot(ww, pd, input_precision=PRECISION)
        tl.debug_barrier()  # every warp's loads of S and DP before the in-place stores (as forward)
        tl.store(DP + offs, (ds * scale).to(DT), mask=mask)
        tl.store(S + offs, (out + bw[:, None]).to(DT), mask=mask)
    pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    fused._store_parts(PART, pid, fused._fold(tl.sum(acc_wl, axis=0) * scale, group, HP, HG),
                       fused._fold(tl.sum(acc_ww, axis=0), group, HP, HG),
                       tl.sum(tl.reshape(tl.sum(acc_bw, axis=1), [HP // HG, HG]), 0), HG)


@triton.jit
def _gemm(A, B, C, H, M, N, K, MA, KA, NC, sab, sah, sam, sak, sbb, sbh, sbk, sbn, scb, sch, scm,
          scn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          PRECISION: tl.constexpr):
    """C[z] = A[z] @ B[z] for z = b * H + h (program 0, as a grid's y stops at 65535; the tile of
    C is program 1), every operand through its own (batch, head, row, column) strides: q, k, v,
    dO and o, dq, dk, dv where the model keeps them (views of the packed projection, token-major
    o) with no copy, and transposes by swapped strides.

    MA >= M and KA >= K bound A's reads, NC >= N C's writes: an N x N buffer's padded rows
    (_nn_buffer) are read and written up to a multiple of 16, so that the masks are constant
    over 16 elements and the accesses 16-byte vectors. What that reads past M only reaches rows
    of C that are not stored; past K it meets B's rows past K, which read as zero, so the
    padding read must be finite (the mixing passes write P' and dS there: b_w and zero); what it
    writes past N is padding."""
    z = tl.program_id(0)
    b, h = (z // H).to(tl.int64), (z % H).to(tl.int64)
    A += b * sab + h * sah
    B += b * sbb + h * sbh
    C += b * scb + h * sch
    n_tiles = tl.cdiv(N, BLOCK_N)
    rm = (tl.program_id(1) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(1) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * sam + (k0 + rk)[None, :] * sak,
                    mask=(rm[:, None] < MA) & (k0 + rk[None, :] < KA), other=0.0)
        bt = tl.load(B + (k0 + rk)[:, None] * sbk + rn[None, :] * sbn,
                     mask=(k0 + rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    tl.store(C + rm[:, None] * scm + rn[None, :] * scn, acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < NC))


GEMM_TILES = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)


def _bmm(a, b, c, pad_a: int = 0, pad_c: int = 0):
    """c = a @ b over the leading (batch, head) dims of (n, H, x, y), (n, H, y, z) and (n, H, x,
    z) tensors of any strides (one launch). pad_a: a is an N x N buffer (or its transpose), its
    reads may take its rows' padding up to that many columns; pad_c: c's writes may (_gemm)."""
    n, H, M, K = a.shape
    N = b.shape[-1]
    ma = max(M, pad_a) if pad_a and a.stride(-2) == 1 else M  # transposed: rows are a's columns
    ka = max(K, pad_a) if pad_a and a.stride(-1) == 1 else K
    grid = (n * H, cdiv(M, GEMM_TILES["BLOCK_M"]) * cdiv(N, GEMM_TILES["BLOCK_N"]))
    launch(_gemm, grid, a, b, c, H, M, N, K, ma, ka, max(N, pad_c), *a.stride(), *b.stride(),
           *c.stride(), PRECISION=_precision(a.dtype), **GEMM_TILES)
    return c


def _meta(H: int, N: int, dtype: torch.dtype, backward: bool) -> dict:
    """Constexprs and launch options: HP slots, HG heads a row (so a program takes HP // HG query
    rows), NP keys a row (at least 16, the smallest dot dimension). Warps: a [16, NP] fp32 tile
    is 16 * NP / (32 * warps) registers a thread; the backward keeps about twice the forward's
    tiles live (at 8 warps and NP 256 it took 255 registers and spilled, triton 3.8)."""
    np_ = max(16, next_pow2(N))
    meta = dict(HP=SLOTS, HG=next_pow2(H), NP=np_, PRECISION=_precision(dtype),
                num_warps=max(4, min(16, np_ // (16 if backward else 32))), num_stages=1)
    if backward:  # the weight grads' accumulators (_contract)
        meta["STRIPS"] = 1 if dtype == torch.float32 else np_ // 16
    return meta


def _programs(N: int, meta: dict) -> int:
    """Mixing programs per image: GROUPS_PER_PROGRAM groups of query rows each."""
    return cdiv(cdiv(N, SLOTS // meta["HG"]), GROUPS_PER_PROGRAM)


def _row_stride(N: int) -> int:
    """Elements between the rows of an N x N buffer: N rounded up to 16 (196: 208, 6 % more
    bytes), so the mixing passes read and write 16-byte vectors; rows N apart, 2-byte aligned,
    took one load or store per element."""
    return cdiv(N, 16) * 16


def _nn_buffer(c: int, H: int, N: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (c, H, N, N) view of rows _row_stride(N) apart."""
    return torch.empty((c, H, N, _row_stride(N)), dtype=like.dtype, device=like.device)[..., :N]


def forward(q, k, v, w_l, w_w, b_w, scale):
    """As kernels.talking_heads.forward: (out (B, H, N, D) token-major, lse (B, H, N) fp32)."""
    B, H, N, D = q.shape
    o = token_major_empty(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    c = chunk_images(B, H, N, D, 1)
    buf = _nn_buffer(c, H, N, q)
    meta = _meta(H, N, q.dtype, backward=False)
    for b0 in range(0, B, c):
        at = slice(b0, min(B, b0 + c))
        s = _bmm(q[at], k[at].transpose(-1, -2), buf[:at.stop - b0], pad_c=buf.stride(2))
        launch(_mix_softmax_fwd, (at.stop - b0, _programs(N, meta)), s, lse[at], w_l, w_w, b_w,
               H, N, s.stride(2), GROUPS_PER_PROGRAM, scale * LOG2E, **meta)
        _bmm(s, v[at], o[at], pad_a=s.stride(2))
    return o, lse


def backward(do, q, k, v, w_l, w_w, b_w, lse, scale, out=None):
    """As kernels.talking_heads.backward: (dq, dk, dv, dw_l, dw_w, db_w); out: where to write
    dq, dk, dv (any strides)."""
    B, H, N, D = q.shape
    dq, dk, dv = out or (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    c = chunk_images(B, H, N, D, 2)
    s_buf, dp_buf = _nn_buffer(c, H, N, q), _nn_buffer(c, H, N, q)
    pad = s_buf.stride(2)  # the GEMMs read and write the rows' padding (_gemm)
    meta = _meta(H, N, q.dtype, backward=True)
    programs = _programs(N, meta)
    # The weight-grad partials of one chunk's programs (3 KB each at 16 heads), summed per chunk:
    # for the whole batch they would be 2x q's bytes at CaiT-M's shape.
    part = torch.empty((c * programs, 3, meta["HG"], meta["HG"]), dtype=torch.float32, device=q.device)
    chunk_sums = []
    for b0 in range(0, B, c):
        at = slice(b0, min(B, b0 + c))
        s = _bmm(q[at], k[at].transpose(-1, -2), s_buf[:at.stop - b0], pad_c=pad)
        dp = _bmm(do[at], v[at].transpose(-1, -2), dp_buf[:at.stop - b0], pad_c=pad)
        launch(_mix_softmax_bwd, (at.stop - b0, programs), s, dp, lse[at], w_l, w_w, b_w, part, H,
               N, s.stride(2), GROUPS_PER_PROGRAM, scale * LOG2E, scale, **meta)
        chunk_sums.append(part[:(at.stop - b0) * programs].sum(0))
        _bmm(s.transpose(-1, -2), do[at], dv[at], pad_a=pad)  # dv = P'^T dO
        _bmm(dp, k[at], dq[at], pad_a=pad)  # dq = (scale dS) k
        _bmm(dp.transpose(-1, -2), q[at], dk[at], pad_a=pad)  # dk = (scale dS)^T q
    sums = torch.stack(chunk_sums).sum(0)  # fixed orders over programs and chunks: deterministic
    dw_l, dw_w, db_w = (t.to(w.dtype, copy=True) for t, w in (
        (sums[0, :H, :H], w_l), (sums[1, :H, :H], w_w), (sums[2, 0, :H], b_w)))
    return dq, dk, dv, dw_l, dw_w, db_w


def aot_configs(dtype: str):
    """The two mixing kernels at CaiT's head counts (4, 8, 16) and 196 tokens, at 8 heads and the
    longest rows taken (MAX_KEYS), and at the shortest (16 keys); and the GEMM; for the sm_90
    AOT test."""
    ints = dict.fromkeys(["H", "N", "NS", "groups_per_prog"], "i32")
    ints.update(qk_scale="fp32", scale="fp32")
    ptrs = dict.fromkeys(["S", "DP"], f"*{dtype}")
    ptrs.update(dict.fromkeys(["LSE", "WL", "WW", "BW", "PART"], "*fp32"))
    for heads, n in ((4, 196), (8, 196), (16, 196), (8, MAX_KEYS), (3, 7)):
        for kernel in (_mix_softmax_fwd, _mix_softmax_bwd):
            meta = _meta(heads, n, DTYPES[dtype], backward=kernel is _mix_softmax_bwd)
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages")}
            sig = {a: ptrs.get(a) or ints.get(a) or "constexpr" for a in kernel.arg_names}
            yield dict(kernel=kernel, signature=sig, constexprs=meta, **options, aligned=("NS",),
                       matmul=False)
    consts = {k: v for k, v in GEMM_TILES.items() if not k.startswith("num_")}
    consts["PRECISION"] = _precision(DTYPES[dtype])
    sig = {a: "constexpr" if a in consts else f"*{dtype}" if a in ("A", "B", "C") else "i32"
           for a in _gemm.arg_names}
    yield dict(kernel=_gemm, signature=sig, constexprs=consts, num_warps=GEMM_TILES["num_warps"],
               num_stages=GEMM_TILES["num_stages"], aligned=(), matmul=dtype != "fp32")  # fp32: exact FMAs
