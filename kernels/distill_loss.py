"""Token-distillation loss (DeiT) with its gradients, in one pass over each row of logits.

One program owns one row b of the (B, C) class-head logits s, distillation-head logits d and
teacher logits t (and of a soft target q) and computes, in fp32 from any float storage:

    base_b    int64 target y, smoothing eps:  (1 - eps) * (lse(s) - s_y) + eps * mean_c(lse(s) - s_c)
              float target q (mixup):         sum_c q_c * (lse(s) - s_c)
    distill_b hard: lse(d) - d_a,  a = argmax(t) (first index among ties, as torch.argmax)
              soft: sum_c pt_c * (lt_c - ld_c),  lt = log_softmax(t / tau), ld = log_softmax(d / tau)

It writes the row's share of the loss, total_b = w_base * base_scale * base_b + w_dist * dist_scale
* distill_b (base_scale = 1/B; dist_scale = 1/B for hard, tau^2/(B*C) or tau^2/B for soft), the
components base_scale * base_b and dist_scale * distill_b (for logging), and, when asked, the
gradients d total_b / d s_b and d total_b / d d_b:

    ds = w_base / B * (softmax(s) - (1 - eps) * onehot(y) - eps / C)      int target
    ds = w_base / B * (softmax(s) * sum(q) - q)                          soft target
    dd = w_dist / B * (softmax(d) - onehot(a))                           hard
    dd = w_dist * dist_scale / tau * (softmax(d / tau) - softmax(t / tau)) soft

with kind "none": w_base = 1, w_dist = 0; else w_base = 1 - alpha, w_dist = alpha. Those are the
whole backward: `backward` later only multiplies them by the upstream gradient of the loss.
The program that finishes last also sums the rows' shares into the loss and its two components
(_sum_rows_if_last), so the whole forward is one launch.
log_softmax is formed as (x - max) - log(sum), never x - lse, so its rounding is that of torch's.

Rows up to MAX_BLOCK_C classes are held in registers and read once. Wider rows (ImageNet-21k,
C = 21841) take two sweeps in CHUNK_C chunks: an online max / log-sum-exp sweep (and the teacher's
argmax), then a sweep, last chunk first, that re-reads the row (mostly from L2) to sum the loss
terms and write the gradients. Not yet measured on a GPU: at B = 256 only 256 programs run, two
per SM; splitting a row over programs is the next step if the bench shows it latency-bound.
"""
import torch
import triton
import triton.language as tl

from . import cdiv, launch, next_pow2

MAX_BLOCK_C = 4096  # widest row held in registers (8 warps: 16 fp32 per thread per tensor)
CHUNK_C = 2048  # chunk width of the two-sweep path for wider rows
SUM_BLOCK_B = 1024  # rows per step of the last program's batch sum
NONE, HARD, SOFT = 0, 1, 2
KIND_IDS = {"none": NONE, "hard": HARD, "soft": SOFT}


@triton.jit
def _lse_update(m, z, x):
    """Online log-sum-exp: fold the chunk x (masked lanes at -inf) into the running (max, sum)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _load(S, D, T, Q, s_off, d_off, t_off, q_off, cols, mask,
          KIND: tl.constexpr, SOFT_TARGET: tl.constexpr, LOAD_T: tl.constexpr):
    s = tl.load(S + s_off + cols, mask=mask, other=0.0).to(tl.float32)
    d = s
    t = s
    q = s
    if KIND != 0:
        d = tl.load(D + d_off + cols, mask=mask, other=0.0).to(tl.float32)
    if LOAD_T:
        t = tl.load(T + t_off + cols, mask=mask, other=0.0).to(tl.float32)
    if SOFT_TARGET:
        q = tl.load(Q + q_off + cols, mask=mask, other=0.0).to(tl.float32)
    return s, d, t, q


@triton.jit
def _sweep_stats(s, d, t, q, cols, mask, tau, m_s, z_s, m_d, z_d, m_t, z_t, t_best, t_arg, q_sum,
                 KIND: tl.constexpr, SOFT_TARGET: tl.constexpr):
    """First sweep over one chunk: running log-sum-exps, teacher argmax, sum of the soft target."""
    m_s, z_s = _lse_update(m_s, z_s, tl.where(mask, s, float("-inf")))
    if KIND == 1:
        m_d, z_d = _lse_update(m_d, z_d, tl.where(mask, d, float("-inf")))
        # torch.argmax's order: NaN above everything (the hardware max drops NaN, so it is kept
        # apart), then the larger value, then the smaller index
        tm = tl.where(mask, t, float("-inf"))
        is_nan = tm != tm
        has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
        chunk_best = tl.max(tl.where(is_nan, float("-inf"), tm), axis=0)
        at_best = tl.where(has_nan, is_nan, tm == chunk_best)
        chunk_arg = tl.min(tl.where(at_best, cols, 2147483647), axis=0)  # first index of the max
        chunk_best = tl.where(has_nan, float("nan"), chunk_best)
        best_nan = t_best != t_best
        # strict: an earlier chunk wins ties, and an earlier NaN beats a later one
        t_arg = tl.where((chunk_best > t_best) | (has_nan & ~best_nan), chunk_arg, t_arg)
        t_best = tl.where(has_nan | best_nan, float("nan"), tl.maximum(t_best, chunk_best))
    if KIND == 2:
        m_d, z_d = _lse_update(m_d, z_d, tl.where(mask, d / tau, float("-inf")))
        m_t, z_t = _lse_update(m_t, z_t, tl.where(mask, t / tau, float("-inf")))
    if SOFT_TARGET:
        q_sum += tl.sum(q, axis=0)
    return m_s, z_s, m_d, z_d, m_t, z_t, t_best, t_arg, q_sum


@triton.jit
def _log_z(z_s, z_d, z_t, KIND: tl.constexpr):
    """log of the softmax denominators; lse = m + log z, but the kernel never forms that sum:
    log_softmax(x) = (x - m) - log z keeps the rounding at the size of log z (as torch's
    log_softmax does), not at the size of the logits (~eps * 100 for logits near 100)."""
    lz_s = tl.log(z_s)
    lz_d = z_d
    lz_t = z_t
    if KIND != 0:
        lz_d = tl.log(z_d)
    if KIND == 2:
        lz_t = tl.log(z_t)
    return lz_s, lz_d, lz_t


@triton.jit
def _sweep_terms(s, d, t, q, cols, mask, DS, DD, g_off, C, y, t_arg, m_s, m_d, m_t, lz_s, lz_d,
                 lz_t, q_sum, smoothing, tau, gs, gd, acc_base, acc_kl,
                 KIND: tl.constexpr, SOFT_TARGET: tl.constexpr, GRAD_S: tl.constexpr,
                 GRAD_D: tl.constexpr):
    """Second sweep over one chunk: the summed loss terms, and the gradients, stored."""
    ls = (s - m_s) - lz_s  # log_softmax(s)
    if SOFT_TARGET:
        acc_base -= tl.sum(tl.where(mask, q * ls, 0.0), axis=0)
    else:
        acc_base -= tl.sum(tl.where(mask, ls, 0.0), axis=0)  # the smoothing term's sum
    if GRAD_S:
        p = tl.exp(ls)
        if SOFT_TARGET:
            g = p * q_sum - q
        else:
            g = p - smoothing / C - tl.where(cols == y, 1.0 - smoothing, 0.0)
        tl.store(DS + g_off + cols, (gs * g).to(DS.dtype.element_ty), mask=mask)
    if KIND == 1:
        if GRAD_D:
            g = tl.exp((d - m_d) - lz_d) - tl.where(cols == t_arg, 1.0, 0.0)
            tl.store(DD + g_off + cols, (gd * g).to(DD.dtype.element_ty), mask=mask)
    if KIND == 2:
        ld = (d / tau - m_d) - lz_d
        lt = (t / tau - m_t) - lz_t
        pt = tl.exp(lt)
        acc_kl += tl.sum(tl.where(mask, pt * (lt - ld), 0.0), axis=0)
        if GRAD_D:
            tl.store(DD + g_off + cols, (gd * (tl.exp(ld) - pt)).to(DD.dtype.element_ty), mask=mask)
    return acc_base, acc_kl


@triton.jit
def _distill_loss_fwd(S, D, T, Y, Q, ROWS, LOSS, PARTS, TICKETS, DS, DD, B, C, s_stride, d_stride,
                      t_stride, q_stride, w_base, w_dist, base_scale, dist_scale, gs, gd, smoothing,
                      tau, KIND: tl.constexpr, SOFT_TARGET: tl.constexpr, GRAD_S: tl.constexpr,
                      GRAD_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    # KIND: 0 none (base only), 1 hard, 2 soft. Y (int64 classes) is read when not SOFT_TARGET,
    # Q (float soft targets) when SOFT_TARGET. Grads are written contiguous (B, C).
    row = tl.program_id(0).to(tl.int64)  # int64: B * C passes 2**31 at B = 100k, C = 21841
    s_off, d_off, t_off, q_off, g_off = (row * s_stride, row * d_stride, row * t_stride,
                                         row * q_stride, row * C)
    cols = tl.arange(0, BLOCK_C)
    y = 0
    y_ok = True
    if not SOFT_TARGET:  # a class outside [0, C) (only unchecked under torch.compile): nan, no stray read
        y = tl.load(Y + row)
        y_ok = (y >= 0) & (y < C)
        y = tl.where(y_ok, y, -1).to(tl.int32)
    m_s = tl.full([], float("-inf"), tl.float32)
    z_s = tl.zeros([], tl.float32)
    m_d, z_d, m_t, z_t, t_best, q_sum = m_s, z_s, m_s, z_s, m_s, z_s
    t_arg = tl.zeros([], tl.int32)
    acc_base = tl.zeros([], tl.float32)
    acc_kl = tl.zeros([], tl.float32)
    if ONE_CHUNK:  # the whole row in registers: one read
        mask = cols < C
        s, d, t, q = _load(S, D, T, Q, s_off, d_off, t_off, q_off, cols, mask, KIND, SOFT_TARGET,
                           KIND != 0)
        m_s, z_s, m_d, z_d, m_t, z_t, t_best, t_arg, q_sum = _sweep_stats(
            s, d, t, q, cols, mask, tau, m_s, z_s, m_d, z_d, m_t, z_t, t_best, t_arg, q_sum,
            KIND, SOFT_TARGET)
        lz_s, lz_d, lz_t = _log_z(z_s, z_d, z_t, KIND)
        acc_base, acc_kl = _sweep_terms(
            s, d, t, q, cols, mask, DS, DD, g_off, C, y, t_arg, m_s, m_d, m_t, lz_s, lz_d, lz_t,
            q_sum, smoothing, tau, gs, gd, acc_base, acc_kl, KIND, SOFT_TARGET, GRAD_S, GRAD_D)
    else:
        for start in range(0, C, BLOCK_C):
            c = start + cols
            mask = c < C
            s, d, t, q = _load(S, D, T, Q, s_off, d_off, t_off, q_off, c, mask, KIND, SOFT_TARGET,
                               KIND != 0)
            m_s, z_s, m_d, z_d, m_t, z_t, t_best, t_arg, q_sum = _sweep_stats(
                s, d, t, q, c, mask, tau, m_s, z_s, m_d, z_d, m_t, z_t, t_best, t_arg, q_sum,
                KIND, SOFT_TARGET)
        lz_s, lz_d, lz_t = _log_z(z_s, z_d, z_t, KIND)
        # Last chunk first: what the first sweep read last is the likeliest still in L2 (at
        # B = 256, C = 21841 the rows in flight are about L2's size). The teacher's argmax is
        # all that hard distillation needs of it: the second sweep reads it only for soft.
        last = (C - 1) // BLOCK_C * BLOCK_C
        for i in range(0, C, BLOCK_C):
            c = (last - i) + cols
            mask = c < C
            s, d, t, q = _load(S, D, T, Q, s_off, d_off, t_off, q_off, c, mask, KIND, SOFT_TARGET,
                               KIND == 2)
            acc_base, acc_kl = _sweep_terms(
                s, d, t, q, c, mask, DS, DD, g_off, C, y, t_arg, m_s, m_d, m_t, lz_s, lz_d, lz_t,
                q_sum, smoothing, tau, gs, gd, acc_base, acc_kl, KIND, SOFT_TARGET, GRAD_S, GRAD_D)
    if SOFT_TARGET:
        base = acc_base
    else:
        s_y = tl.load(S + s_off + y, mask=y_ok, other=float("nan")).to(tl.float32)
        base = (1.0 - smoothing) * (lz_s - (s_y - m_s))
        # acc_base is +inf when a logit is -inf (a masked class): 0 * inf would make the loss NaN
        # where F.cross_entropy without smoothing is finite.
        base += tl.where(smoothing != 0.0, smoothing * (acc_base / C), 0.0)
    base = base * base_scale
    total = w_base * base
    distill = 0.0
    if KIND == 1:
        distill = (lz_d - (tl.load(D + d_off + t_arg).to(tl.float32) - m_d)) * dist_scale
    if KIND == 2:
        distill = acc_kl * dist_scale
    if KIND != 0:
        total += w_dist * distill
    tl.store(ROWS + 3 * row, total)
    tl.store(ROWS + 3 * row + 1, base)
    tl.store(ROWS + 3 * row + 2, distill)
    _sum_rows_if_last(ROWS, LOSS, PARTS, TICKETS, B, BLOCK_B)


@triton.jit
def _sum_rows_if_last(ROWS, LOSS, PARTS, TICKETS, B, BLOCK_B: tl.constexpr):
    """The batch sums in the launch that wrote the rows (a torch sum would be one more launch
    per step, at a size where launches are most of the time): every program takes a ticket
    after its row's stores, and the one that takes the last sums all rows in a fixed order, so
    the loss is deterministic. TICKETS is 0 at entry and left at 0 (see forward)."""
    tl.debug_barrier()  # the row's stores (whichever thread made them) before the ticket
    ticket = tl.atomic_add(TICKETS, 1, sem="acq_rel")  # release the row, acquire the others
    if ticket == B - 1:
        r = tl.arange(0, BLOCK_B)
        total = tl.zeros([BLOCK_B], tl.float32)
        base = tl.zeros([BLOCK_B], tl.float32)
        distill = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, B, BLOCK_B):
            at = ROWS + 3 * (start + r)
            live = start + r < B
            # .cg: read from L2, where the other programs' rows are, not from this SM's L1
            total += tl.load(at, mask=live, other=0.0, cache_modifier=".cg")
            base += tl.load(at + 1, mask=live, other=0.0, cache_modifier=".cg")
            distill += tl.load(at + 2, mask=live, other=0.0, cache_modifier=".cg")
        tl.store(LOSS, tl.sum(total, axis=0))
        tl.store(PARTS, tl.sum(base, axis=0))
        tl.store(PARTS + 1, tl.sum(distill, axis=0))
        tl.atomic_xchg(TICKETS, 0)  # ready for the next launch on this stream


SCALE_BLOCK = 2048  # elements per program of the backward (8 bf16 / 16 fp32 per thread)
SCALE_WARPS = 8


@triton.jit
def _scale_grads(GS, GD, OS, OD, DLOSS, n_s, n_d, BLOCK: tl.constexpr):
    """The whole backward, both heads in one launch: out = saved grad * d(upstream)/d loss,
    computed in fp32 and stored in the head's dtype. The first cdiv(n_s, BLOCK) programs take
    the class head (GS -> OS), the rest the distillation head (GD -> OD). The upstream grad is
    read here, on the device: no host sync, and a CUDA graph replays it with new values."""
    pid = tl.program_id(0).to(tl.int64)  # int64: B * C may pass 2**31
    g = tl.load(DLOSS).to(tl.float32)
    first = tl.cdiv(n_s, BLOCK)
    if pid < first:
        at = pid * BLOCK + tl.arange(0, BLOCK)
        live = at < n_s
        x = tl.load(GS + at, mask=live).to(tl.float32)
        tl.store(OS + at, (x * g).to(OS.dtype.element_ty), mask=live)
    else:
        at = (pid - first) * BLOCK + tl.arange(0, BLOCK)
        live = at < n_d
        x = tl.load(GD + at, mask=live).to(tl.float32)
        tl.store(OD + at, (x * g).to(OD.dtype.element_ty), mask=live)


def tile(C: int):
    """(BLOCK_C, ONE_CHUNK, num_warps) for rows of C classes."""
    if C <= MAX_BLOCK_C:
        block = max(16, next_pow2(C))
        return block, True, min(8, max(1, block // 256))
    return CHUNK_C, False, 8


def grad_dtype(head_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of a head's saved gradient. The grads are written already scaled by 1/B
    (and 1/C for soft "numel"): ~1e-7 at B = 256, C = 21841, under fp16's smallest normal
    (6e-5) before GradScaler's factor could lift them. So fp16 heads get fp32 grads; bf16 and
    fp32 heads (fp32's exponent range) keep their own dtype, which halves the bytes for bf16."""
    return torch.float32 if head_dtype == torch.float16 else head_dtype


def _cols_unit(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def forward(logits, dist_logits, target, teacher_logits, kind: str, alpha: float, tau: float,
            smoothing: float, kl_reduction: str, grad_logits: bool, grad_dist: bool, tickets):
    """-> (loss () fp32, parts (2,) fp32, rows (B, 3) fp32, dlogits, ddist).

    loss is the batch's loss and parts its (base, distill) components, each summed in a fixed
    order; rows[b] is row b's share of (loss, base, distill). dlogits / ddist: d loss /
    d logits (resp. dist_logits), (B, C) contiguous in grad_dtype(...), or empty when not asked
    for (or kind "none" for ddist). Inputs: (B, C) with any row stride; target int64 (B,) or
    float (B, C). tickets: an int32 (1,) tensor on the logits' device holding 0, which no other
    launch uses until this one ends (one per stream, see deit_fast.ops.distill_loss); the launch
    leaves it at 0."""
    s = _cols_unit(logits)
    B, C = s.shape
    kid = KIND_IDS[kind]
    d = _cols_unit(dist_logits) if kid else None
    t = _cols_unit(teacher_logits) if kid else None
    soft_target = target.is_floating_point()
    q = _cols_unit(target) if soft_target else None
    y = None if soft_target else target.contiguous()
    grad_dist = grad_dist and kid != NONE
    dev = s.device
    rows = torch.empty((B, 3), dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    parts = torch.empty(2, dtype=torch.float32, device=dev)
    ds = (torch.empty((B, C), dtype=grad_dtype(s.dtype), device=dev) if grad_logits
          else s.new_empty(0))
    dd = (torch.empty((B, C), dtype=grad_dtype(d.dtype), device=dev) if grad_dist
          else s.new_empty(0))
    w_base, w_dist = (1.0, 0.0) if kid == NONE else (1.0 - alpha, alpha)
    base_scale = 1.0 / B
    if kid == SOFT:
        dist_scale = tau * tau / (B * C if kl_reduction == "numel" else B)
        gd = w_dist * dist_scale / tau
    else:
        dist_scale = 1.0 / B
        gd = w_dist * dist_scale
    gs = w_base * base_scale
    block, one_chunk, warps = tile(C)
    if B == 0:  # the mean over no rows, as the reference gives it
        return loss.fill_(float("nan")), parts.fill_(float("nan")), rows, ds, dd
    launch(_distill_loss_fwd, (B,),
        s, d, t, y, q, rows, loss, parts, tickets, ds, dd, B, C, s.stride(0),
        d.stride(0) if kid else 0, t.stride(0) if kid else 0, q.stride(0) if soft_target else 0,
        w_base, w_dist, base_scale, dist_scale, gs, gd, smoothing, tau,
        KIND=kid, SOFT_TARGET=soft_target, GRAD_S=grad_logits, GRAD_D=grad_dist,
        ONE_CHUNK=one_chunk, BLOCK_C=block, BLOCK_B=SUM_BLOCK_B, num_warps=warps)
    return loss, parts, rows, ds, dd


def backward(ds, dd, dloss, logits_dtype: torch.dtype, dist_dtype: torch.dtype):
    """-> (dlogits, ddist): forward's saved grads ds, dd (contiguous, or empty for a head that
    needs none: its result is empty too) times dloss (the loss's upstream grad, a 0-dim fp32
    tensor on their device), in logits_dtype and dist_dtype. One launch for both heads: torch's
    multi-tensor multiply takes one only when the saved grads and dloss share a dtype (fp32
    heads), else it multiplies each tensor on its own."""
    out_s = torch.empty(ds.shape, dtype=logits_dtype, device=ds.device)
    out_d = torch.empty(dd.shape, dtype=dist_dtype, device=dd.device)
    n_s, n_d = ds.numel(), dd.numel()
    if n_s + n_d == 0:
        return out_s, out_d
    # A head without a grad still needs a pointer of a live tensor: the other head's (unread).
    gs, gd = (ds if n_s else dd), (dd if n_d else ds)
    out_gs, out_gd = (out_s if n_s else out_d), (out_d if n_d else out_s)
    launch(_scale_grads, (cdiv(n_s, SCALE_BLOCK) + cdiv(n_d, SCALE_BLOCK),),
           gs, gd, out_gs, out_gd, dloss, n_s, n_d, BLOCK=SCALE_BLOCK, num_warps=SCALE_WARPS)
    return out_s, out_d


def aot_configs(dtype: str):
    """Every shipped variant for the sm_90 AOT test (see kernels/layerscale.py): logits of
    `dtype` for all three heads, fp32 soft targets (timm's Mixup), int64 class targets. The
    class counts cover every register tile (C = 10 ... 4096) and the two-sweep path."""
    ints = dict.fromkeys(("B", "C", "s_stride", "d_stride", "t_stride", "q_stride"), "i32")
    floats = dict.fromkeys(("w_base", "w_dist", "base_scale", "dist_scale", "gs", "gd",
                            "smoothing", "tau"), "fp32")
    ptrs = dict.fromkeys(("S", "D", "T"), f"*{dtype}")
    ptrs.update(Y="*i64", Q="*fp32", ROWS="*fp32", LOSS="*fp32", PARTS="*fp32", TICKETS="*i32",
                DS=f"*{dtype}" if dtype != "fp16" else "*fp32")
    ptrs["DD"] = ptrs["DS"]
    kernel = _distill_loss_fwd

    def variant(C, aligned, **constexprs):
        block, one_chunk, warps = tile(C)
        sig = {a: ptrs.get(a) or ints.get(a) or floats.get(a) or "constexpr" for a in kernel.arg_names}
        return dict(kernel=kernel, signature=sig, num_warps=warps, matmul=False,
                    constexprs=dict(constexprs, ONE_CHUNK=one_chunk, BLOCK_C=block,
                                    BLOCK_B=SUM_BLOCK_B),
                    aligned=("C", "s_stride", "d_stride", "t_stride", "q_stride") if aligned else ())

    for C in (10, 100, 1000, MAX_BLOCK_C, 21841):
        for kind in (NONE, HARD, SOFT):
            for soft_target in (False, True):
                for grads in ((True, True), (False, False)):
                    yield variant(C, C % 16 == 0, KIND=kind, SOFT_TARGET=soft_target,
                                  GRAD_S=grads[0], GRAD_D=grads[1] and kind != NONE)
    # The backward: saved grads (fp32 for fp16 heads) scaled into the heads' dtype.
    saved = ptrs["DS"]
    for aligned in (("n_s", "n_d"), ()):  # B * C a multiple of 16 (C = 1000) or not (C = 10)
        yield dict(kernel=_scale_grads, num_warps=SCALE_WARPS, matmul=False,
                   signature=dict(GS=saved, GD=saved, OS=f"*{dtype}", OD=f"*{dtype}",
                                  DLOSS="*fp32", n_s="i32", n_d="i32", BLOCK="constexpr"),
                   constexprs=dict(BLOCK=SCALE_BLOCK), aligned=aligned)
