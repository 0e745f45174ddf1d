// Token-distillation loss (DeiT), the CUDA backend of deit_fast.ops.distillation_loss: the twin
// of kernels/distill_loss.py, with the same inputs, outputs and formulas (its docstring has the
// math). Per row b of the (B, C) class-head logits s, distillation-head logits d, teacher logits
// t (and soft target q), in fp32 from fp32/fp16/bf16 storage, one kernel writes the row's share
// of the loss, its two components (base, distill), and the gradients of that share w.r.t. s_b and
// d_b: the backward then only scales them (deit_fast/ops/distill_loss.py). The block that
// finishes last sums the rows' shares into the loss and its components, in a fixed order
// (sum_rows_if_last): one launch for the whole forward, and deterministic.
//
// Two kernels, chosen by C:
//  * C <= kTileCols (4096): the row lives in registers, read from memory once, 8 classes per
//    thread: a warp per row for C <= 256 (8 rows per block), else ceil(C / 8) threads rounded
//    to whole warps (256 / that many rows per block, at least one).
//  * wider rows (ImageNet-21k): a block of 512 threads streams the row in tiles of 4096 classes,
//    keeping the max / log-sum-exp / argmax statistics online, and stashes the raw tiles in
//    shared memory as it goes; the second sweep (the loss terms and the gradients, which need
//    the row's final log-sum-exps) reads the stash, not memory. A row that does not fit in the
//    device's shared memory (fp32 logits, or A100's smaller shared memory at C = 21841) stashes
//    its first tiles; the rest is read again, last tile first, while it is likeliest in L2.
//
// Every thread holds the same columns of s, d, t and q (and writes those of both grads):
// columns col0 + (j * nthr + tid) * VEC + v, j < 8 / VEC, v < VEC, i.e. whole VEC-vectors,
// coalesced for each j. VEC = 16 B / element size where the host finds every row aligned, else 1.
//
// Statistics are merged in a fixed pattern (warp butterfly, then warps in order) with operations
// that commute bitwise, so every thread of a row sees the same bits, run after run. All three
// heads must share one dtype; other mixes are read as fp32 copies (see forward_cuda).
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <math_constants.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <tuple>
#include <type_traits>

namespace deit_fast {
namespace {

enum Kind : int { kNone = 0, kHard = 1, kSoft = 2 };

constexpr int kPer = 8;                         // columns of each tensor a thread holds per tile
// Threads per block. The kernels' __launch_bounds__(kMaxThreads, 1) lets ptxas use 128 registers;
// without the explicit 1 block per SM, ptxas 13 aimed at a higher occupancy and spilled.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kTileCols = kPer * kMaxThreads;   // widest row held in registers; streamed tile
constexpr int kRowBlockThreads = 256;           // block size of the register kernel below 512
constexpr int64_t kMaxClasses = std::numeric_limits<int32_t>::max() - kTileCols;  // int32 columns

// Saved gradients of fp16 heads are fp32: scaled by 1/B (and 1/C) they underflow fp16.
template <typename T> struct GradOf { using type = T; };
template <> struct GradOf<__half> { using type = float; };

template <typename T>
struct Args {
  using G = typename GradOf<T>::type;
  const T* s;  // (B, C) rows of the class head, distillation head, teacher: unit column stride
  const T* d;
  const T* t;
  const int64_t* y;  // (B,) class targets, or null
  const float* q;    // (B, C) soft targets, or null
  float* rows;       // (B, 3) the row's share of the loss, of base and of distill (scaled)
  float* loss;       // () the sum of rows[:, 0]
  float* parts;      // (2,) the sums of rows[:, 1] and rows[:, 2]
  int* tickets;      // 0 at entry, no other launch's meanwhile; left at 0
  G* ds;             // (B, C) contiguous d row / d s, or null when not asked for
  G* dd;             // (B, C) contiguous d row / d d, or null
  int64_t B, ss, sd, st, sq;  // row strides in elements
  int C;
  float w_base, w_dist, base_scale, dist_scale, gs, gd, smoothing;
  float eps_c, inv_c, inv_tau;  // smoothing / C, 1 / C, 1 / tau: no division on the device
};

// ---- device helpers ------------------------------------------------------------------------

// VEC elements at p, as 16-byte accesses when VEC > 1 (the host checked the alignment; 8 fp32
// soft-target elements are two accesses). Works on global and shared memory alike.
template <int VEC, typename T>
__device__ __forceinline__ void load_elems(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    constexpr int K = 16 / sizeof(T);
    static_assert(VEC % K == 0, "vectors are whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < VEC / K; ++c) {
      const Vec<T, K> v = *reinterpret_cast<const Vec<T, K>*>(p + c * K);
#pragma unroll
      for (int k = 0; k < K; ++k) out[c * K + k] = to_float(v.v[k]);
    }
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store_elems(T* p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(in[0]);
  } else {
    constexpr int K = 16 / sizeof(T);
    static_assert(VEC % K == 0, "vectors are whole 16-byte accesses");
#pragma unroll
    for (int c = 0; c < VEC / K; ++c) {
      Vec<T, K> v;
#pragma unroll
      for (int k = 0; k < K; ++k) v.v[k] = from_float<T>(in[c * K + k]);
      *reinterpret_cast<Vec<T, K>*>(p + c * K) = v;
    }
  }
}

template <int VEC>
struct Tile {
  static constexpr int NV = kPer / VEC;
  float s[NV][VEC], d[NV][VEC], t[NV][VEC], q[NV][VEC];
};

template <int VEC>
__device__ __forceinline__ int col_of(int col0, int j, int tid, int nthr) {
  return col0 + (j * nthr + tid) * VEC;
}

// Which tensors besides s a load or stash touches.
struct Want {
  bool d, t, q;
};

// Columns at or past C are neither read nor used: every consumer tests c < C (with VEC > 1,
// C % VEC == 0, so a vector is all in or all out).
template <int VEC, typename T>
__device__ __forceinline__ void load_tile(Tile<VEC>& x, const T* s, const T* d, const T* t,
                                          const float* q, Want w, int col0, int tid, int nthr,
                                          int C) {
#pragma unroll
  for (int j = 0; j < Tile<VEC>::NV; ++j) {
    const int c = col_of<VEC>(col0, j, tid, nthr);
    if (c >= C) continue;
    load_elems<VEC>(s + c, x.s[j]);
    if (w.d) load_elems<VEC>(d + c, x.d[j]);
    if (w.t) load_elems<VEC>(t + c, x.t[j]);
    if (w.q) load_elems<VEC>(q + c, x.q[j]);
  }
}

// The raw tile into the shared-memory stash (same layout: each thread reads back its own).
template <int VEC, typename T>
__device__ __forceinline__ void stash_tile(const Tile<VEC>& x, T* s, T* d, T* t, float* q, Want w,
                                           int col0, int tid, int nthr, int C) {
#pragma unroll
  for (int j = 0; j < Tile<VEC>::NV; ++j) {
    const int c = col_of<VEC>(col0, j, tid, nthr);
    if (c >= C) continue;
    store_elems<VEC>(s + c, x.s[j]);
    if (w.d) store_elems<VEC>(d + c, x.d[j]);
    if (w.t) store_elems<VEC>(t + c, x.t[j]);
    if (w.q) store_elems<VEC>(q + c, x.q[j]);
  }
}

// Soft distillation works on d / tau and t / tau, taken as x * (1 / tau) as torch does on CUDA
// for a division by a Python scalar (an IEEE division would also bring a slow-path call).
template <int VEC>
__device__ __forceinline__ void scale_tile(Tile<VEC>& x, float inv_tau) {
#pragma unroll
  for (int j = 0; j < Tile<VEC>::NV; ++j) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      x.d[j][v] *= inv_tau;
      x.t[j][v] *= inv_tau;
    }
  }
}

struct Stats {
  float ms, zs;  // class head: running max, sum of exp(s - ms)
  float md, zd;  // distillation head (d / tau for soft)
  float mt, zt;  // teacher / tau (soft)
  float tbest;   // teacher's max (hard) ...
  float dat;     // ... the distillation logit at its argmax ...
  int targ;      // ... and that argmax
  float qsum;    // sum of the soft target
};

__device__ __forceinline__ Stats stats_init() {
  Stats st;
  st.ms = st.md = st.mt = st.tbest = -CUDART_INF_F;
  st.zs = st.zd = st.zt = st.qsum = 0.f;
  st.dat = CUDART_NAN_F;
  st.targ = INT_MAX;
  return st;
}

// torch.argmax's order: larger value first, NaN above everything, then the smaller index.
__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) {
  if (isnan(a)) return !isnan(b) || ia < ib;
  if (isnan(b)) return false;
  return a > b || (a == b && ia < ib);
}

// z, a sum of exp(x - m), re-expressed against the new max mm >= m. Equal maxima (both -inf
// included: an empty sum stays 0) skip the exp.
__device__ __forceinline__ float rescale(float z, float m, float mm) {
  return m == mm ? z : z * expf(m - mm);
}

__device__ __forceinline__ void merge_lse(float& m, float& z, float m2, float z2) {
  const float mm = fmaxf(m, m2);
  z = rescale(z, m, mm) + rescale(z2, m2, mm);  // commutes bitwise: both lanes get the same
  m = mm;
}

// Fold one tile into a thread's running statistics: tile max first, then one rescale and the
// sum of exps against it (per thread exactly torch's max-then-sum on a single tile).
template <int KIND, int VEC>
__device__ __forceinline__ void tile_stats(Stats& st, const Tile<VEC>& x, bool soft_q, int col0,
                                           int tid, int nthr, int C) {
  float ms = st.ms, md = st.md, mt = st.mt;
#pragma unroll
  for (int j = 0; j < Tile<VEC>::NV; ++j) {
    const int c = col_of<VEC>(col0, j, tid, nthr);
    if (c >= C) continue;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ms = fmaxf(ms, x.s[j][v]);
      if constexpr (KIND != kNone) md = fmaxf(md, x.d[j][v]);
      if constexpr (KIND == kSoft) mt = fmaxf(mt, x.t[j][v]);
      if constexpr (KIND == kHard) {
        if (beats(x.t[j][v], c + v, st.tbest, st.targ)) {
          st.tbest = x.t[j][v];
          st.targ = c + v;
          st.dat = x.d[j][v];
        }
      }
      if (soft_q) st.qsum += x.q[j][v];
    }
  }
  float zs = rescale(st.zs, st.ms, ms), zd = 0.f, zt = 0.f;
  if constexpr (KIND != kNone) zd = rescale(st.zd, st.md, md);
  if constexpr (KIND == kSoft) zt = rescale(st.zt, st.mt, mt);
#pragma unroll
  for (int j = 0; j < Tile<VEC>::NV; ++j) {
    if (col_of<VEC>(col0, j, tid, nthr) >= C) continue;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      zs += expf(x.s[j][v] - ms);
      if constexpr (KIND != kNone) zd += expf(x.d[j][v] - md);
      if constexpr (KIND == kSoft) zt += expf(x.t[j][v] - mt);
    }
  }
  st.ms = ms;
  st.zs = zs;
  if constexpr (KIND != kNone) st.md = md, st.zd = zd;
  if constexpr (KIND == kSoft) st.mt = mt, st.zt = zt;
}

// The row reductions' two operations on Stats (and on Terms below), as functors.
template <int KIND>
struct StatsOps {
  static __device__ __forceinline__ void merge(Stats& a, const Stats& b) {
    merge_lse(a.ms, a.zs, b.ms, b.zs);
    if constexpr (KIND != kNone) merge_lse(a.md, a.zd, b.md, b.zd);
    if constexpr (KIND == kSoft) merge_lse(a.mt, a.zt, b.mt, b.zt);
    if constexpr (KIND == kHard) {
      if (beats(b.tbest, b.targ, a.tbest, a.targ)) {
        a.tbest = b.tbest, a.targ = b.targ, a.dat = b.dat;
      }
    }
    a.qsum += b.qsum;
  }

  static __device__ __forceinline__ Stats shfl(const Stats& a, int off) {
    constexpr unsigned kAll = 0xffffffffu;
    Stats b = a;
    b.ms = __shfl_xor_sync(kAll, a.ms, off);
    b.zs = __shfl_xor_sync(kAll, a.zs, off);
    if constexpr (KIND != kNone) {
      b.md = __shfl_xor_sync(kAll, a.md, off);
      b.zd = __shfl_xor_sync(kAll, a.zd, off);
    }
    if constexpr (KIND == kSoft) {
      b.mt = __shfl_xor_sync(kAll, a.mt, off);
      b.zt = __shfl_xor_sync(kAll, a.zt, off);
    }
    if constexpr (KIND == kHard) {
      b.tbest = __shfl_xor_sync(kAll, a.tbest, off);
      b.dat = __shfl_xor_sync(kAll, a.dat, off);
      b.targ = __shfl_xor_sync(kAll, a.targ, off);
    }
    b.qsum = __shfl_xor_sync(kAll, a.qsum, off);
    return b;
  }
};

struct Terms {
  float base;  // sum of -q * log_softmax(s) (soft target) or of -log_softmax(s) (smoothing)
  float kl;    // sum of pt * (lt - ld)
  float sy;    // s at the target class (the one nonzero addend)
};

struct TermsOps {
  static __device__ __forceinline__ void merge(Terms& a, const Terms& b) {
    a.base += b.base;
    a.kl += b.kl;
    a.sy += b.sy;
  }

  static __device__ __forceinline__ Terms shfl(const Terms& a, int off) {
    constexpr unsigned kAll = 0xffffffffu;
    return Terms{__shfl_xor_sync(kAll, a.base, off), __shfl_xor_sync(kAll, a.kl, off),
                 __shfl_xor_sync(kAll, a.sy, off)};
  }
};

// Reduce over the blockDim.x threads of this row (row threadIdx.y of the block); every one of
// them gets the result. A butterfly within each warp, then the row's warps in order through
// `smem` (one slot per warp of the block). The barrier is taken by the whole block or by none
// of it (blockDim.x is uniform), so rows past the batch must still call this.
template <typename Ops, typename R>
__device__ __forceinline__ R row_reduce(R v, R* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) Ops::merge(v, Ops::shfl(v, off));
  const int nw = blockDim.x / 32;
  if (nw > 1) {
    const int first = threadIdx.y * nw;
    if ((threadIdx.x & 31) == 0) smem[first + threadIdx.x / 32] = v;
    __syncthreads();
    v = smem[first];
    for (int w = 1; w < nw; ++w) Ops::merge(v, smem[first + w]);
  }
  return v;
}

// The row's softmax constants once the statistics are complete.
struct Final {
  float ms, lzs, md, lzd, mt, lzt, qsum;
  int y, targ;  // target class (-1: soft target or out of range), teacher argmax
};

template <int KIND>
__device__ __forceinline__ Final finish(const Stats& st, int y) {
  // log_softmax(x) = (x - m) - log z, never x - (m + log z): rounding at the size of log z
  // (as torch's log_softmax), not of the logits.
  Final f;
  f.ms = st.ms;
  f.lzs = logf(st.zs);
  f.md = st.md;
  f.lzd = KIND != kNone ? logf(st.zd) : 0.f;
  f.mt = st.mt;
  f.lzt = KIND == kSoft ? logf(st.zt) : 0.f;
  f.qsum = st.qsum;
  f.y = y;
  f.targ = st.targ;
  return f;
}

// Second sweep over one tile: the summed loss terms, and the gradients, stored.
template <int KIND, int VEC, typename T>
__device__ __forceinline__ void tile_terms(Terms& acc, const Tile<VEC>& x, const Final& f,
                                           const Args<T>& a, typename Args<T>::G* ds,
                                           typename Args<T>::G* dd, bool soft_q, int col0, int tid,
                                           int nthr, int C) {
  const float eps_c = a.eps_c, keep = 1.f - a.smoothing;
#pragma unroll
  for (int j = 0; j < Tile<VEC>::NV; ++j) {
    const int c = col_of<VEC>(col0, j, tid, nthr);
    if (c >= C) continue;
    float gs[VEC], gd[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int cv = c + v;
      const float s = x.s[j][v];
      const float ls = (s - f.ms) - f.lzs;
      if (soft_q) {
        acc.base -= x.q[j][v] * ls;
      } else {
        acc.base -= ls;
        if (cv == f.y) acc.sy += s;
      }
      if (ds != nullptr) {
        const float p = expf(ls);
        const float g = soft_q ? p * f.qsum - x.q[j][v]
                               : (p - eps_c) - (cv == f.y ? keep : 0.f);
        gs[v] = a.gs * g;
      }
      if constexpr (KIND == kHard) {
        if (dd != nullptr) {
          const float p = expf((x.d[j][v] - f.md) - f.lzd);
          gd[v] = a.gd * (p - (cv == f.targ ? 1.f : 0.f));
        }
      }
      if constexpr (KIND == kSoft) {
        const float ld = (x.d[j][v] - f.md) - f.lzd;
        const float lt = (x.t[j][v] - f.mt) - f.lzt;
        const float pt = expf(lt);
        acc.kl += pt * (lt - ld);
        if (dd != nullptr) gd[v] = a.gd * (expf(ld) - pt);
      }
    }
    if (ds != nullptr) store_elems<VEC>(ds + c, gs);
    if constexpr (KIND != kNone) {
      if (dd != nullptr) store_elems<VEC>(dd + c, gd);
    }
  }
}

template <int KIND, typename T>
__device__ __forceinline__ void write_row(const Args<T>& a, int64_t row, const Stats& st,
                                          const Final& f, const Terms& acc, bool soft_q, int C) {
  float base;
  if (soft_q) {
    base = acc.base;
  } else {  // an out-of-range class (only unchecked under torch.compile) gives nan, no stray read
    const float sy = f.y >= 0 ? acc.sy : CUDART_NAN_F;
    base = (1.f - a.smoothing) * (f.lzs - (sy - f.ms));
    // Without smoothing the sum over all classes is not part of the loss: a -inf logit
    // (a masked class) makes it inf, and 0 * inf would turn a finite loss into nan.
    if (a.smoothing != 0.f) base += a.smoothing * (acc.base * a.inv_c);
  }
  base = base * a.base_scale;
  float total = a.w_base * base, distill = 0.f;
  if constexpr (KIND == kHard) distill = (f.lzd - (st.dat - f.md)) * a.dist_scale;
  if constexpr (KIND == kSoft) distill = acc.kl * a.dist_scale;
  if constexpr (KIND != kNone) total += a.w_dist * distill;
  a.rows[3 * row] = total;
  a.rows[3 * row + 1] = base;
  a.rows[3 * row + 2] = distill;
}

// The batch sums in the launch that wrote the rows, as kernels/distill_loss._sum_rows_if_last
// (a torch sum would be one more launch per step, at a size where launches are most of the
// time). Every thread of every block calls it after its rows are stored. Each block fences its
// stores and takes a ticket; the block that takes the last one sums all rows in a fixed order
// (a strided sum per thread, the warp butterfly, warps in order), so the loss is deterministic,
// and puts the counter back to 0 for the next launch.
template <typename T>
__device__ __forceinline__ void sum_rows_if_last(const Args<T>& a) {
  __shared__ bool last;
  __shared__ float red[kMaxWarps][3];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;  // warps: blockDim.x is whole warps
  const int nthr = blockDim.x * blockDim.y;
  __threadfence();  // this block's rows are visible device-wide before its ticket is
  __syncthreads();
  if (tid == 0) last = atomicAdd(a.tickets, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // the other blocks' rows, seen through the ticket, before they are read
  float v[3] = {0.f, 0.f, 0.f};
  for (int64_t r = tid; r < a.B; r += nthr) {
#pragma unroll
    for (int k = 0; k < 3; ++k) v[k] += __ldcg(a.rows + 3 * r + k);  // from L2, not this L1
  }
#pragma unroll
  for (int k = 0; k < 3; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if ((tid & 31) == 0) {
#pragma unroll
    for (int k = 0; k < 3; ++k) red[tid / 32][k] = v[k];
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < nthr / 32; ++w) {
#pragma unroll
      for (int k = 0; k < 3; ++k) v[k] += red[w][k];
    }
    *a.loss = v[0];
    a.parts[0] = v[1];
    a.parts[1] = v[2];
    *a.tickets = 0;
  }
}

template <typename T>
__device__ __forceinline__ int target_class(const Args<T>& a, int64_t row, bool live) {
  if (a.y == nullptr || !live) return -1;
  const int64_t y = a.y[row];
  return y >= 0 && y < a.C ? static_cast<int>(y) : -1;
}

// ---- kernels -----------------------------------------------------------------------------

// C <= kTileCols. Block (TX, TY): TX threads (whole warps, TX * 8 >= C) per row, TY rows.
template <typename T, int KIND, int VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) distill_loss_rows_kernel(const Args<T> a) {
  __shared__ Stats red_stats[kMaxWarps];
  __shared__ Terms red_terms[kMaxWarps];
  const int tid = threadIdx.x, nthr = blockDim.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < a.B;
  const int C = live ? a.C : 0;  // a row past the batch touches no memory but joins the barriers
  const bool soft_q = a.q != nullptr;
  const int y = target_class(a, row, live);
  const int64_t g = row * a.C;
  auto* ds = a.ds != nullptr ? a.ds + g : nullptr;
  auto* dd = KIND != kNone && a.dd != nullptr ? a.dd + g : nullptr;

  Tile<VEC> x;
  load_tile<VEC>(x, a.s + row * a.ss, KIND != kNone ? a.d + row * a.sd : nullptr,
                 KIND != kNone ? a.t + row * a.st : nullptr, soft_q ? a.q + row * a.sq : nullptr,
                 Want{KIND != kNone, KIND != kNone, soft_q}, 0, tid, nthr, C);
  if constexpr (KIND == kSoft) scale_tile(x, a.inv_tau);
  Stats st = stats_init();
  tile_stats<KIND>(st, x, soft_q, 0, tid, nthr, C);
  st = row_reduce<StatsOps<KIND>>(st, red_stats);
  const Final f = finish<KIND>(st, y);

  Terms acc{0.f, 0.f, 0.f};
  tile_terms<KIND>(acc, x, f, a, ds, dd, soft_q, 0, tid, nthr, C);
  acc = row_reduce<TermsOps>(acc, red_terms);
  if (live && tid == 0) write_row<KIND>(a, row, st, f, acc, soft_q, C);
  sum_rows_if_last(a);
}

// C > kTileCols. One block of kMaxThreads per row; `stash` holds the row's first stash_cols
// columns of what the second sweep reads (q fp32, then s, d, t in T): all of them when
// stash_cols >= C, else a whole number of tiles.
template <typename T, int KIND, int VEC>
__global__ void __launch_bounds__(kMaxThreads, 1) distill_loss_stream_kernel(const Args<T> a,
                                                                          int stash_cols) {
  extern __shared__ __align__(16) unsigned char stash[];
  __shared__ Stats red_stats[kMaxWarps];
  __shared__ Terms red_terms[kMaxWarps];
  constexpr int nthr = kMaxThreads, W = kTileCols;  // the launch's block size
  const int tid = threadIdx.x, C = a.C;
  const int64_t row = blockIdx.x;
  const bool soft_q = a.q != nullptr;
  const int y = target_class(a, row, true);
  const int64_t g = row * C;
  auto* ds = a.ds != nullptr ? a.ds + g : nullptr;
  auto* dd = KIND != kNone && a.dd != nullptr ? a.dd + g : nullptr;
  // The second sweep reads d for soft, or for hard's gradient; t for soft only.
  const Want second{KIND == kSoft || (KIND == kHard && dd != nullptr), KIND == kSoft, soft_q};

  const T* s = a.s + row * a.ss;
  const T* d = KIND != kNone ? a.d + row * a.sd : nullptr;
  const T* t = KIND != kNone ? a.t + row * a.st : nullptr;
  const float* q = soft_q ? a.q + row * a.sq : nullptr;
  float* q_st = reinterpret_cast<float*>(stash);
  T* s_st = reinterpret_cast<T*>(q_st + (soft_q ? stash_cols : 0));
  T* d_st = s_st + stash_cols;
  T* t_st = d_st + (second.d ? stash_cols : 0);

  Stats st = stats_init();
  for (int col0 = 0; col0 < C; col0 += W) {
    Tile<VEC> x;
    load_tile<VEC>(x, s, d, t, q, Want{KIND != kNone, KIND != kNone, soft_q}, col0, tid, nthr, C);
    if (col0 < stash_cols) stash_tile<VEC>(x, s_st, d_st, t_st, q_st, second, col0, tid, nthr, C);
    if constexpr (KIND == kSoft) scale_tile(x, a.inv_tau);
    tile_stats<KIND>(st, x, soft_q, col0, tid, nthr, C);
  }
  st = row_reduce<StatsOps<KIND>>(st, red_stats);
  const Final f = finish<KIND>(st, y);

  // Last tile first: of what is not stashed, what the first sweep read last is likeliest in L2.
  Terms acc{0.f, 0.f, 0.f};
  for (int col0 = (C - 1) / W * W; col0 >= 0; col0 -= W) {
    Tile<VEC> x;
    if (col0 < stash_cols) {
      load_tile<VEC>(x, s_st, d_st, t_st, q_st, second, col0, tid, nthr, C);
    } else {
      load_tile<VEC>(x, s, d, t, q, second, col0, tid, nthr, C);
    }
    if constexpr (KIND == kSoft) scale_tile(x, a.inv_tau);
    tile_terms<KIND>(acc, x, f, a, ds, dd, soft_q, col0, tid, nthr, C);
  }
  acc = row_reduce<TermsOps>(acc, red_terms);
  if (tid == 0) write_row<KIND>(a, row, st, f, acc, soft_q, C);
  sum_rows_if_last(a);
}

// ---- backward: the saved grads times the loss's upstream grad -------------------------------

// Element types of the backward's tensors, chosen at run time: the two heads may differ, and one
// launch serves both (a template per dtype pair would need nine instantiations).
enum Elem : int { kElemF32 = 0, kElemF16 = 1, kElemBF16 = 2 };

__device__ __forceinline__ float load_elem(const void* p, int64_t i, int type) {
  switch (type) {
    case kElemF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kElemBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_elem(void* p, int64_t i, int type, float v) {
  switch (type) {
    case kElemF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kElemBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

struct ScaleHead {
  const void* in;  // the saved grad, contiguous
  void* out;       // its product with the upstream grad, contiguous, in the head's dtype
  int64_t n;
  int in_type, out_type;  // Elem
};

constexpr int kScaleThreads = 256;
constexpr int kScalePer = 8;  // elements per thread
constexpr int64_t kScaleBlock = kScaleThreads * kScalePer;

// The first ceil(s.n / kScaleBlock) blocks scale the class head, the rest the distillation head.
// The upstream grad is read on the device: no host sync, and a captured graph replays new values.
__global__ void __launch_bounds__(kScaleThreads)
    distill_loss_scale_kernel(ScaleHead s, ScaleHead d, const float* __restrict__ dloss) {
  const int64_t first = (s.n + kScaleBlock - 1) / kScaleBlock;
  const bool is_s = blockIdx.x < first;
  const void* in = is_s ? s.in : d.in;
  void* out = is_s ? s.out : d.out;
  const int64_t n = is_s ? s.n : d.n;
  const int in_type = is_s ? s.in_type : d.in_type, out_type = is_s ? s.out_type : d.out_type;
  const int64_t base = (is_s ? blockIdx.x : blockIdx.x - first) * kScaleBlock + threadIdx.x;
  // Every load before the first store: in and out are untyped, so the compiler cannot tell that
  // they never alias, and a load-multiply-store per element made each load wait for the last
  // store (an H200's ncu, 2026-11-27: 52 cycles a warp instruction, 41 of them long_scoreboard;
  // 5.95 us at 2 x 256 x 1000 bf16 where Triton's twin took 2.62).
  float x[kScalePer];
#pragma unroll
  for (int j = 0; j < kScalePer; ++j) {  // coalesced: the block's threads take neighbours
    const int64_t i = base + static_cast<int64_t>(j) * kScaleThreads;
    x[j] = i < n ? load_elem(in, i, in_type) : 0.f;
  }
  const float g = *dloss;
#pragma unroll
  for (int j = 0; j < kScalePer; ++j) {
    const int64_t i = base + static_cast<int64_t>(j) * kScaleThreads;
    if (i < n) store_elem(out, i, out_type, x[j] * g);
  }
}

// ---- input checks (shared by the CUDA and Meta kernels) ----------------------------------

constexpr const char* kOp = "distillation_loss_forward";

void check_device(const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), kOp, ": ", name, " is on ", t.device(),
              " but logits is on ", logits.device());
}

at::ScalarType grad_dtype(at::ScalarType head) {
  return head == at::kHalf ? at::kFloat : head;
}

struct Checked {
  int kind;
  bool soft_q, grad_s, grad_d;
};

Checked check_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& dist,
                     const at::Tensor& target, const std::optional<at::Tensor>& teacher,
                     c10::string_view kind, double alpha, double tau, double smoothing,
                     c10::string_view kl_reduction, bool grad_logits, bool grad_dist,
                     const at::Tensor& tickets) {
  const int k = kind == "none" ? kNone : kind == "hard" ? kHard : kind == "soft" ? kSoft : -1;
  TORCH_CHECK(k >= 0, kOp, ": kind must be \"none\", \"hard\" or \"soft\", got \"", kind, "\"");
  TORCH_CHECK(kl_reduction == "numel" || kl_reduction == "batchmean", kOp,
              ": kl_reduction must be \"numel\" or \"batchmean\", got \"", kl_reduction, "\"");
  TORCH_CHECK(logits.dim() == 2, kOp, ": logits must be (B, C), got shape ", logits.sizes());
  check_float(kOp, "logits", logits.scalar_type());
  TORCH_CHECK(logits.size(1) <= kMaxClasses, kOp, ": logits has ", logits.size(1),
              " classes, more than the kernel's ", kMaxClasses);
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), kOp, ": logits has ",
              logits.size(0), " rows, more than a grid holds");
  if (k != kNone) {
    auto head = [&](const char* name, const std::optional<at::Tensor>& h) {
      TORCH_CHECK(h.has_value(), kOp, ": ", name, " is required for kind \"", kind, "\"");
      TORCH_CHECK(h->sizes() == logits.sizes(), kOp, ": ", name, " must have logits' shape ",
                  logits.sizes(), ", got ", h->sizes());
      check_float(kOp, name, h->scalar_type());
      check_device(name, *h, logits);
    };
    head("dist_logits", dist);
    head("teacher_logits", teacher);
  }
  const bool soft_q = target.is_floating_point();
  if (soft_q) {
    TORCH_CHECK(target.sizes() == logits.sizes(), kOp,
                ": target must have logits' shape (soft targets) ", logits.sizes(), ", got ",
                target.sizes());
    check_float(kOp, "target", target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, kOp,
                ": target must be int64 class indices or float soft targets, got ",
                target.scalar_type());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), kOp,
                ": target must have shape (", logits.size(0), ",) (one class per row), got ",
                target.sizes());
  }
  check_device("target", target, logits);
  TORCH_CHECK(tickets.scalar_type() == at::kInt && tickets.numel() == 1 && tickets.is_contiguous(),
              kOp, ": tickets must be one contiguous int32, got ", tickets.scalar_type(), " of shape ",
              tickets.sizes());
  check_device("tickets", tickets, logits);
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, kOp, ": alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(tau > 0.0, kOp, ": tau must be positive, got ", tau);
  TORCH_CHECK(smoothing >= 0.0 && smoothing < 1.0, kOp,
              ": label_smoothing must be in [0, 1), got ", smoothing);
  return Checked{k, soft_q, grad_logits, grad_dist && k != kNone};
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (loss () fp32, parts (2,) fp32, rows (B, 3) fp32, ds, dd): a grad not asked for is an empty
// (0,) tensor of logits' dtype, as the Triton kernel and the op's fake impl return.
Outputs make_outputs(const at::Tensor& logits, const std::optional<at::Tensor>& dist,
                     const Checked& c) {
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  auto grad = [&](bool want, const at::Tensor& head) {
    return want ? at::empty({B, C}, logits.options().dtype(grad_dtype(head.scalar_type())))
                : at::empty({0}, logits.options());
  };
  return {at::empty({}, f32), at::empty({2}, f32), at::empty({B, 3}, f32), grad(c.grad_s, logits),
          grad(c.grad_d, c.grad_d ? *dist : logits)};
}

Outputs forward_meta(const at::Tensor& logits, const std::optional<at::Tensor>& dist,
                     const at::Tensor& target, const std::optional<at::Tensor>& teacher,
                     c10::string_view kind, double alpha, double tau, double smoothing,
                     c10::string_view kl_reduction, bool grad_logits, bool grad_dist,
                     const at::Tensor& tickets) {
  const Checked c = check_inputs(logits, dist, target, teacher, kind, alpha, tau, smoothing,
                                 kl_reduction, grad_logits, grad_dist, tickets);
  return make_outputs(logits, dist, c);
}

// ---- launch ------------------------------------------------------------------------------

// Unit column stride (a transposed head is copied once); any row stride is read in place.
at::Tensor cols_unit(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t;
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; }

// VEC-wide access is legal: 16-byte aligned base, rows a whole number of vectors apart.
bool vec_ok(const at::Tensor& t, int vec) {
  return !t.defined() || t.numel() == 0 ||
         (ptr_aligned(t.const_data_ptr(), 16) && row_stride(t) % vec == 0);
}

struct Scalars {
  float w_base, w_dist, base_scale, dist_scale, gs, gd, smoothing, eps_c, inv_c, inv_tau;
};

// As kernels/distill_loss.forward computes them (in double, handed to the kernel as fp32).
Scalars scalars(int kind, int64_t B, int64_t C, double alpha, double tau, double smoothing,
                bool batchmean) {
  const double w_base = kind == kNone ? 1.0 : 1.0 - alpha, w_dist = kind == kNone ? 0.0 : alpha;
  const double base_scale = 1.0 / static_cast<double>(B);
  double dist_scale, gd;
  if (kind == kSoft) {
    dist_scale = tau * tau / static_cast<double>(batchmean ? B : B * C);
    gd = w_dist * dist_scale / tau;
  } else {
    dist_scale = 1.0 / static_cast<double>(B);
    gd = w_dist * dist_scale;
  }
  return Scalars{static_cast<float>(w_base), static_cast<float>(w_dist),
                 static_cast<float>(base_scale), static_cast<float>(dist_scale),
                 static_cast<float>(w_base * base_scale), static_cast<float>(gd),
                 static_cast<float>(smoothing),
                 static_cast<float>(smoothing) / static_cast<float>(C),  // fp32, as Triton's
                 static_cast<float>(1.0 / static_cast<double>(C)),
                 1.f / static_cast<float>(tau)};  // torch's reciprocal for x / tau on CUDA
}

template <typename T, int KIND, int VEC>
void launch(const Args<T>& a, cudaStream_t stream) {
  if (a.C <= kTileCols) {
    const int tx = (((a.C + kPer - 1) / kPer + 31) / 32) * 32;  // whole warps, tx * 8 >= C
    const int ty = std::max(1, kRowBlockThreads / tx);
    const int64_t blocks = (a.B + ty - 1) / ty;
    distill_loss_rows_kernel<T, KIND, VEC>
        <<<static_cast<unsigned>(blocks), dim3(tx, ty), 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto kernel = distill_loss_stream_kernel<T, KIND, VEC>;
  // Bytes per stashed column: what the second sweep reads (see the kernel's `second`).
  const bool soft_q = a.q != nullptr, d2 = KIND == kSoft || (KIND == kHard && a.dd != nullptr);
  const int64_t per_col = static_cast<int64_t>(sizeof(T)) * (1 + d2 + (KIND == kSoft)) +
                          (soft_q ? static_cast<int64_t>(sizeof(float)) : 0);
  int device = 0, optin = 0, per_block = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlock, device));
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  // Every limit bounds static + dynamic bytes: the static reduction slots (832 B) count too.
  const int64_t fixed = static_cast<int64_t>(attr.sharedSizeBytes);
  const int64_t all = (a.C + 7) / 8 * 8;  // whole 16-byte vectors per region
  const int64_t budget = std::max<int64_t>(0, optin - fixed);
  const int64_t stash_cols =
      all * per_col <= budget ? all : budget / per_col / kTileCols * kTileCols;
  const int64_t bytes = stash_cols * per_col;
  // Opt in past the default 48 KiB per block, static bytes included: a stash of exactly 48 KiB
  // (C = 8192 fp16 soft with class targets) plus the static slots is refused otherwise
  // (cudaErrorInvalidValue). No try-and-fall-back: compute-sanitizer reports a failed call even
  // when it is recovered from.
  if (fixed + bytes > per_block || bytes > attr.maxDynamicSharedSizeBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  kernel<<<static_cast<unsigned>(a.B), kMaxThreads, static_cast<size_t>(bytes), stream>>>(
      a, static_cast<int>(stash_cols));
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, kOp, ": streamed kernel launch failed: ",
              cudaGetErrorString(err), " (B = ", a.B, ", C = ", a.C, ", ", kMaxThreads,
              " threads, ", bytes, " B dynamic + ", fixed, " B static shared memory, limits ",
              per_block, " B / ", optin, " B opt-in, ", attr.numRegs, " registers)");
}

template <typename T>
void dispatch(const Args<T>& a, int kind, bool vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);  // 8 halves or 4 floats: one 16-byte access per vector
  auto go = [&](auto kind_c) {
    constexpr int K = decltype(kind_c)::value;
    if (vec) launch<T, K, kVec>(a, stream);
    else launch<T, K, 1>(a, stream);
  };
  switch (kind) {
    case kNone: go(std::integral_constant<int, kNone>{}); break;
    case kHard: go(std::integral_constant<int, kHard>{}); break;
    default: go(std::integral_constant<int, kSoft>{}); break;
  }
}

Outputs forward_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& dist_opt,
                     const at::Tensor& target, const std::optional<at::Tensor>& teacher_opt,
                     c10::string_view kind, double alpha, double tau, double smoothing,
                     c10::string_view kl_reduction, bool grad_logits, bool grad_dist,
                     const at::Tensor& tickets) {
  const Checked c = check_inputs(logits, dist_opt, target, teacher_opt, kind, alpha, tau,
                                 smoothing, kl_reduction, grad_logits, grad_dist, tickets);
  TORCH_CHECK(logits.is_cuda(), kOp, ": logits must be a CUDA tensor, got device ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  Outputs out = make_outputs(logits, dist_opt, c);
  at::Tensor &loss = std::get<0>(out), &parts = std::get<1>(out), &rows = std::get<2>(out),
             &ds = std::get<3>(out), &dd = std::get<4>(out);
  const int64_t B = logits.size(0), C = logits.size(1);
  if (B == 0 || C == 0) {  // a mean over no rows or a softmax over no classes: nan, no launch
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
    parts.fill_(std::numeric_limits<double>::quiet_NaN());
    rows.fill_(std::numeric_limits<double>::quiet_NaN());
    return out;
  }

  at::Tensor s = cols_unit(logits), d, t;
  if (c.kind != kNone) d = cols_unit(*dist_opt), t = cols_unit(*teacher_opt);
  // One dtype for all three heads (what autocast and a cast model give); a mix is read as fp32
  // copies, and fp32 grads are cast back to the grad dtype of each head afterwards.
  const bool mixed = c.kind != kNone &&
                     (d.scalar_type() != s.scalar_type() || t.scalar_type() != s.scalar_type());
  at::Tensor ks = ds, kd = dd;  // the grads as the kernel writes them
  if (mixed) {
    s = s.to(at::kFloat), d = d.to(at::kFloat), t = t.to(at::kFloat);
    const auto f32 = ds.options().dtype(at::kFloat);
    if (c.grad_s && ds.scalar_type() != at::kFloat) ks = at::empty({B, C}, f32);
    if (c.grad_d && dd.scalar_type() != at::kFloat) kd = at::empty({B, C}, f32);
  }
  const at::Tensor q = c.soft_q ? cols_unit(target.to(at::kFloat)) : at::Tensor();
  const at::Tensor y = c.soft_q ? at::Tensor() : target.contiguous();
  const Scalars k = scalars(c.kind, B, C, alpha, tau, smoothing, kl_reduction == "batchmean");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(s.scalar_type(), "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using G = typename Args<T>::G;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = C % kVec == 0 && vec_ok(s, kVec) && vec_ok(d, kVec) && vec_ok(t, kVec) &&
                     vec_ok(q, kVec) && vec_ok(ks, kVec) && vec_ok(kd, kVec);
    Args<T> a{};
    a.s = static_cast<const T*>(s.const_data_ptr());
    a.d = d.defined() ? static_cast<const T*>(d.const_data_ptr()) : nullptr;
    a.t = t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
    a.y = y.defined() ? y.const_data_ptr<int64_t>() : nullptr;
    a.q = q.defined() ? q.const_data_ptr<float>() : nullptr;
    a.rows = rows.data_ptr<float>();
    a.loss = loss.data_ptr<float>();
    a.parts = parts.data_ptr<float>();
    a.tickets = tickets.data_ptr<int>();
    a.ds = c.grad_s ? static_cast<G*>(ks.data_ptr()) : nullptr;
    a.dd = c.grad_d ? static_cast<G*>(kd.data_ptr()) : nullptr;
    a.B = B;
    a.C = static_cast<int>(C);
    a.ss = row_stride(s);
    a.sd = d.defined() ? row_stride(d) : 0;
    a.st = t.defined() ? row_stride(t) : 0;
    a.sq = q.defined() ? row_stride(q) : 0;
    a.w_base = k.w_base, a.w_dist = k.w_dist, a.base_scale = k.base_scale;
    a.dist_scale = k.dist_scale, a.gs = k.gs, a.gd = k.gd, a.smoothing = k.smoothing;
    a.eps_c = k.eps_c, a.inv_c = k.inv_c, a.inv_tau = k.inv_tau;
    dispatch<T>(a, c.kind, vec, stream);
  });
  if (!ks.is_same(ds)) ds.copy_(ks);
  if (!kd.is_same(dd)) dd.copy_(kd);
  return out;
}


// ---- backward (host) ---------------------------------------------------------------------

constexpr const char* kBwdOp = "distillation_loss_backward";

int elem_of(const char* name, at::ScalarType t) {
  check_float(kBwdOp, name, t);
  return t == at::kHalf ? kElemF16 : t == at::kBFloat16 ? kElemBF16 : kElemF32;
}

using Grads = std::tuple<at::Tensor, at::Tensor>;

// The Meta kernel: the checks and outputs the CUDA kernel shares. A saved grad is the forward's
// (B, C) contiguous one, or empty for a head that needs no grad (its output is empty too).
Grads backward_meta(const at::Tensor& grad_logits, const at::Tensor& grad_dist,
                    const at::Tensor& dloss, at::ScalarType logits_dtype,
                    at::ScalarType dist_dtype) {
  TORCH_CHECK(dloss.numel() == 1 && dloss.scalar_type() == at::kFloat, kBwdOp,
              ": dloss must be one fp32 element (the loss's upstream grad), got ",
              dloss.scalar_type(), " of shape ", dloss.sizes());
  auto head = [&](const char* name, const at::Tensor& g, at::ScalarType out,
                  const char* out_name) {
    elem_of(name, g.scalar_type());
    elem_of(out_name, out);
    TORCH_CHECK(g.is_contiguous(), kBwdOp, ": ", name, " must be contiguous (the forward's)");
    TORCH_CHECK(g.device() == dloss.device(), kBwdOp, ": ", name, " is on ", g.device(),
                " but dloss is on ", dloss.device());
    return at::empty(g.sizes(), g.options().dtype(out));
  };
  return {head("grad_logits", grad_logits, logits_dtype, "logits_dtype"),
          head("grad_dist", grad_dist, dist_dtype, "dist_dtype")};
}

Grads backward_cuda(const at::Tensor& grad_logits, const at::Tensor& grad_dist,
                    const at::Tensor& dloss, at::ScalarType logits_dtype,
                    at::ScalarType dist_dtype) {
  TORCH_CHECK(dloss.is_cuda(), kBwdOp, ": dloss must be a CUDA tensor, got device ",
              dloss.device());
  const c10::cuda::CUDAGuard guard(dloss.device());
  Grads out = backward_meta(grad_logits, grad_dist, dloss, logits_dtype, dist_dtype);
  const at::Tensor &os = std::get<0>(out), &od = std::get<1>(out);
  auto head = [](const at::Tensor& g, const at::Tensor& o) {
    return ScaleHead{g.numel() ? g.const_data_ptr() : nullptr, o.numel() ? o.data_ptr() : nullptr,
                     g.numel(), elem_of("grad", g.scalar_type()), elem_of("out", o.scalar_type())};
  };
  const ScaleHead s = head(grad_logits, os), d = head(grad_dist, od);
  const int64_t blocks =
      (s.n + kScaleBlock - 1) / kScaleBlock + (d.n + kScaleBlock - 1) / kScaleBlock;
  if (blocks == 0) return out;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kBwdOp, ": ", s.n + d.n,
              " elements, more than a grid holds");
  distill_loss_scale_kernel<<<static_cast<unsigned>(blocks), kScaleThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
      s, d, dloss.const_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_C, m) {
  // kernels/distill_loss.forward's contract: -> (loss () fp32, parts (2,) fp32: base and
  // distill, rows (B, 3) fp32: each row's share of the three, dlogits, ddist). dlogits, ddist:
  // d loss / d logits (resp. dist_logits), (B, C) contiguous, fp32 for fp16 heads and the
  // head's dtype otherwise, or empty (0,) when not asked for (ddist also for kind "none").
  // logits, dist_logits, teacher_logits: (B, C) fp32/fp16/bf16, any row stride; target: int64
  // (B,) (out-of-range classes give a nan row, unchecked: no device sync) or float (B, C) soft
  // targets. tickets: one int32 at 0 that no concurrent launch shares; left at 0.
  m.def("distillation_loss_forward(Tensor logits, Tensor? dist_logits, Tensor target, "
        "Tensor? teacher_logits, str kind, float alpha, float tau, float label_smoothing, "
        "str kl_reduction, bool grad_logits, bool grad_dist, Tensor(a!) tickets) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The op's backward, one launch for both heads: (grad_logits * dloss as logits_dtype,
  // grad_dist * dloss as dist_dtype), computed in fp32. grad_logits, grad_dist: the forward's
  // saved grads (contiguous), either empty for a head that needs none (its result is empty);
  // dloss: the loss's upstream grad, one fp32 element on their device.
  m.def("distillation_loss_backward(Tensor grad_logits, Tensor grad_dist, Tensor dloss, "
        "ScalarType logits_dtype, ScalarType dist_dtype) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deit_fast_C, CUDA, m) {
  m.impl("distillation_loss_forward", &forward_cuda);
  m.impl("distillation_loss_backward", &backward_cuda);
}

// Shapes and dtypes without data: input checks and output metadata testable on any machine.
TORCH_LIBRARY_IMPL(deit_fast_C, Meta, m) {
  m.impl("distillation_loss_forward", &forward_meta);
  m.impl("distillation_loss_backward", &backward_meta);
}

}  // namespace deit_fast
