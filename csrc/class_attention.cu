// Class-attention (CaiT, DESIGN.md section 3), the CUDA backend of deit_fast.ops.class_attention:
// one query per (b, h) against N keys, out = softmax(q k^T * scale) v. Schemas: the
// TORCH_LIBRARY_FRAGMENT at the end.
//
// Pure bandwidth (every key and value is read once, 4 FLOP per element), so there is no MMA and
// no query tile: a group of L lanes owns one key row at a time, each lane VPT 16-byte vectors of
// it (vector j * L + lane, so one load instruction of the group reads L * 16 contiguous bytes in
// whole 32-byte sectors). The lanes' q.k partial sums meet in shuffles that leave bitwise the
// same score in every lane of the group. L is the largest divisor of the row's vector count up
// to 10: D = 48 in bf16 is 6 vectors, one per lane of a 6-lane group, 5 groups to a warp (2
// lanes idle); nothing is padded to 64. Each group keeps its own online softmax (running max m,
// sum l, accumulator over its lanes' columns) over the keys it sees, U keys at a time; the
// groups of a 128-thread block are merged once, through shared memory, in a fixed order. With
// the ops' prefetch flag (kernel template PF) the key loop is a two-stage cp.async pipeline: a
// pass requests the next pass's rows into shared memory before it computes (Staging).
//
// When B*H blocks cannot fill the GPU the key axis is split: block (bh, split) streams keys
// [split * chunk, + chunk) and writes fp32 (m, l, acc) partials that a second kernel merges in
// split order. The split count is a function of B*H, N and the SM count only, so a shape on a
// given GPU always takes the same path and gives the same bits. The forward saves one fp32
// log-sum-exp per (b, h), in log2 units, and the output in fp32 (out_f32), as the Triton kernels
// do (the two backends' forward and backward are interchangeable).
//
// Backward, with s_j = log2(e) scale q.k_j, P_j = exp2(s_j - lse), delta = dO . O, dP_j = dO . v_j
// and dS_j = P_j (dP_j - delta): dv_j = P_j dO and dk_j = scale dS_j q belong to key j alone, so
// the lane group that owns key j stores them; dq = scale sum_j dS_j k_j is merged across groups
// in shared memory and across splits by a second kernel, both in a fixed order. No atomics
// anywhere. delta comes from the fp32 output: where one key takes nearly all the weight
// (P ~ 0.999) dP_j - delta cancels, and the output rounded to T (2^-8 in bf16) made delta's
// error many times that key's true dk.
//
// q and dO (one row per block) are read with all their strides. k and v take the 16-byte vector
// path when their last stride is 1 and base and other strides are 16-byte multiples (q/k/v views
// of timm's projections always are); otherwise the same kernel reads them element by element
// with their strides, never copying. out, lse, dq, dk and dv are fresh tensors: dk, dv
// token-major (B, N, H, D) in memory when k is a head-split projection view, as the Triton
// backend and the custom op's fake give them.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace deit_fast {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxSplits = 64;  // the combine kernels loop over the splits of a (b, h)
// The split aims at one wave of this many blocks per SM: ~30 KB of K/V loads in flight per SM
// either way, as the backward's lanes hold half the forward's keys per pass (Cfg::UB).
constexpr int kFwdBlocksPerSm = 4, kBwdBlocksPerSm = 8;
constexpr double kLog2e = 1.4426950408889634;

// Lanes per key row: the largest divisor of the row's vector count up to 10, so that every lane
// holds 4 to 16 columns (few registers) and at most 2 of a warp's 32 lanes idle (L = 6 and 10).
constexpr int lanes_per_key(int nv) {
  for (int l = 10; l > 1; --l)
    if (nv % l == 0) return l;
  return 1;
}

constexpr int pow2_above(int x) { return x <= 1 ? 1 : 2 * pow2_above((x + 1) / 2); }

// Work split of one key row of D elements of T. Host and device agree on it (KB sizes the split).
template <typename T, int D>
struct Cfg {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  static_assert(D % VEC == 0, "head dim must be a whole number of 16-byte vectors");
  static_assert(D <= kThreads, "the group merge gives each column one thread");
  static constexpr int NV = D / VEC;            // vectors per row
  static constexpr int L = lanes_per_key(NV);   // lanes per key group
  static constexpr int VPT = NV / L;            // vectors per lane
  static constexpr int E = VPT * VEC;           // columns per lane
  static constexpr int GPW = 32 / L;            // key groups per warp (a group never straddles two)
  static constexpr int G = kThreads / 32 * GPW; // key groups per block
  // Keys per group per pass (64 B+ of K and V in flight a lane), and per block pass. The backward
  // also holds q, dO and dq's accumulator, so it takes half as many (more made ptxas spill).
  static constexpr int U = E >= 16 ? 1 : 16 / E;
  static constexpr int KB = G * U;
  static constexpr int UB = U > 2 ? U / 2 : 1;
  static constexpr int KBB = G * UB;
};

// ---- device helpers ----------------------------------------------------------------------

// Where this thread sits: lane li of key group g (lanes base .. base + L - 1 of its warp).
// Lanes past the warp's last whole group (2 at L = 6 or 10) are inactive: they take part in the
// shuffles and read a valid row like the others, but their results are masked and never stored
// or merged.
template <typename C>
struct Lane {
  int g, li, base;
  bool active;
  __device__ __forceinline__ Lane() {
    const int wl = threadIdx.x % 32, gw = wl / C::L;
    base = gw * C::L;
    li = wl - base;
    active = gw < C::GPW;
    g = threadIdx.x / 32 * C::GPW + gw;
  }
};

// Sum over the L lanes of a group; every lane of the group gets bitwise the same value.
template <int L>
__device__ __forceinline__ float group_sum(float x, int li, int base) {
  if constexpr ((L & (L - 1)) == 0) {
    // Butterfly: each add is commutative, so all lanes end with identical bits.
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  } else {
    // Tree into lane 0 of the group (only partners inside the group count), then broadcast.
#pragma unroll
    for (int o = pow2_above(L) / 2; o > 0; o >>= 1) {
      const float y = __shfl_down_sync(0xffffffffu, x, o);
      if (li + o < L) x += y;
    }
    x = __shfl_sync(0xffffffffu, x, base);
  }
  return x;
}

// This lane's E columns of one row: vector j covers columns (j * L + li) * VEC + [0, VEC), so
// one load instruction of a group reads L * 16 contiguous bytes.
// VL: 16-byte vectors (unit last stride, host-checked alignment); else one element at a time.
template <typename C, bool VL, typename T>
__device__ __forceinline__ void load_cols(const T* __restrict__ row, int64_t sd, int li,
                                          float (&out)[C::E]) {
#pragma unroll
  for (int j = 0; j < C::VPT; ++j) {
    const int c = (j * C::L + li) * C::VEC;
    float v[C::VEC];
    if constexpr (VL) {
      load_vec<C::VEC>(row + c, v);
    } else {
#pragma unroll
      for (int e = 0; e < C::VEC; ++e) v[e] = to_float(row[(c + e) * sd]);
    }
#pragma unroll
    for (int e = 0; e < C::VEC; ++e) out[j * C::VEC + e] = v[e];
  }
}

template <typename C, typename T>
__device__ __forceinline__ void store_cols(T* __restrict__ row, int li, const float (&in)[C::E]) {
#pragma unroll
  for (int j = 0; j < C::VPT; ++j) {
    float v[C::VEC];
#pragma unroll
    for (int e = 0; e < C::VEC; ++e) v[e] = in[j * C::VEC + e];
    store_vec<C::VEC>(row + (j * C::L + li) * C::VEC, v);
  }
}

// Key row u of the pass at n0 for this lane's group: its index and whether it holds a real key.
// Keys past the end (and idle lanes) read the split's first key again instead of branching
// around the loads; the callers mask what they compute from it.
template <typename C, typename L>
__device__ __forceinline__ int64_t key_row(const L& ln, int n0, int u, int start, int end,
                                           bool& valid) {
  const int n = n0 + u * C::G + ln.g;
  valid = ln.active && n < end;
  return valid ? n : start;
}

// PF: a block's K/V staging for a two-stage cp.async pipeline, U rows of K and of V per thread
// and stage. Each thread reads back only the vectors it copied itself, so the only waits are its
// own cp.async.wait_group: no barrier. [stage][u][k|v][vector j][thread]: a warp's 16-byte
// accesses are contiguous.
template <typename C, int U, typename T>
struct Staging {
  Vec<T, C::VEC> v[2][U][2][C::VPT][kThreads];
};
struct NoStaging {};

// Requests the K and V rows of the pass at n0 into stage st, as one commit group. Rows past the
// end (and idle lanes) read nothing and land as zeros (their results are masked), so the pass
// after the last one, which the loops request too instead of branching, costs no memory traffic.
template <typename C, int U, typename T, typename L>
__device__ __forceinline__ void stage_pass(Staging<C, U, T>& sm, int st, const T* kb,
                                           const T* vb, int64_t skn, int64_t svn, const L& ln,
                                           int n0, int start, int end) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    bool valid;
    const int64_t n = key_row<C>(ln, n0, u, start, end, valid);
    const int bytes = valid ? 16 : 0;
#pragma unroll
    for (int j = 0; j < C::VPT; ++j) {
      const int c = (j * C::L + ln.li) * C::VEC;
      cp_async_16(smem_addr(&sm.v[st][u][0][j][threadIdx.x]), kb + n * skn + c, bytes);
      cp_async_16(smem_addr(&sm.v[st][u][1][j][threadIdx.x]), vb + n * svn + c, bytes);
    }
  }
  cp_async_commit();
}

// This thread's columns of row u of stage st (k or v): as load_cols gives them.
template <typename C, int U, typename T>
__device__ __forceinline__ void unstage(const Staging<C, U, T>& sm, int st, int u, int kv,
                                        float (&out)[C::E]) {
#pragma unroll
  for (int j = 0; j < C::VPT; ++j) {
    const Vec<T, C::VEC> x = sm.v[st][u][kv][j][threadIdx.x];
#pragma unroll
    for (int e = 0; e < C::VEC; ++e) out[j * C::VEC + e] = to_float(x.v[e]);
  }
}

// This lane's columns into row g of a [G][D] shared-memory table.
template <typename C, int D>
__device__ __forceinline__ void stash_cols(float (&table)[C::G][D], int g, int li,
                                           const float (&in)[C::E]) {
#pragma unroll
  for (int j = 0; j < C::VPT; ++j)
#pragma unroll
    for (int e = 0; e < C::VEC; ++e) table[g][(j * C::L + li) * C::VEC + e] = in[j * C::VEC + e];
}

// Strides of a (B, H, *, D) tensor, in elements.
struct S4 {
  int64_t b, h, n, d;
};

// This lane's K and V rows of the pass at n0 (U of each) into kf / vf, and which of them are real
// keys. PF: from stage st, after requesting the pass at n0 + step into the other stage and
// waiting for this one's copies; then st flips. Else loaded now, with a wait.
template <typename C, bool VL, bool PF, int U, typename Stage, typename T, typename L>
__device__ __forceinline__ void pass_rows(Stage& stage, int& st, const T* __restrict__ kb,
                                          const T* __restrict__ vb, const S4& sk, const S4& sv,
                                          const L& ln, int n0, int step, int start, int end,
                                          float (&kf)[U][C::E], float (&vf)[U][C::E],
                                          bool (&valid)[U]) {
  if constexpr (PF) {
    stage_pass<C>(stage, st ^ 1, kb, vb, sk.n, sv.n, ln, n0 + step, start, end);
    cp_async_wait<1>();  // this pass's group has landed
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t n = key_row<C>(ln, n0, u, start, end, valid[u]);
    if constexpr (PF) {
      unstage<C>(stage, st, u, 0, kf[u]);
      unstage<C>(stage, st, u, 1, vf[u]);
    } else {
      load_cols<C, VL>(kb + n * sk.n, sk.d, ln.li, kf[u]);
      load_cols<C, VL>(vb + n * sv.n, sv.d, ln.li, vf[u]);
    }
  }
  st ^= 1;
}

// ---- forward -----------------------------------------------------------------------------

// Grid (B*H, splits), block kThreads. With SPLIT the block leaves its merged (m, l, acc) in
// pm / pl / pacc [split, bh]; otherwise it writes out (B*H, D), out32 (the same in fp32) and
// lse (B*H) itself.
// PF (vector path only): each pass requests the next pass's K and V (cp.async, Staging) before it
// computes, the same arithmetic in the same order (the same results) with two passes' loads
// overlapping.
template <typename T, int D, bool VL, bool SPLIT, bool PF>
__global__ void __launch_bounds__(kThreads) class_attn_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ out32, float* __restrict__ lse, float* __restrict__ pm,
    float* __restrict__ pl, float* __restrict__ pacc, S4 sq, S4 sk, S4 sv, int H, int N,
    int64_t BH, int chunk, float qk_scale) {
  using C = Cfg<T, D>;
  __shared__ float red_acc[C::G][D];
  __shared__ float red_m[C::G], red_l[C::G], red_w[C::G];
  __shared__ std::conditional_t<PF, Staging<C, C::U, T>, NoStaging> stage;

  const int64_t bh = blockIdx.x, split = blockIdx.y;
  const int64_t b = bh / H, h = bh - b * H;
  const Lane<C> ln;

  float qf[C::E], acc[C::E];
  load_cols<C, false>(q + b * sq.b + h * sq.h, sq.d, ln.li, qf);
#pragma unroll
  for (int e = 0; e < C::E; ++e) acc[e] = 0.f;
  float m = -INFINITY, l = 0.f;

  const T* kb = k + b * sk.b + h * sk.h;
  const T* vb = v + b * sv.b + h * sv.h;
  const int start = static_cast<int>(split) * chunk;  // the host keeps N <= 2^30: no overflow
  const int end = min(start + chunk, N);
  static_assert(VL || !PF, "prefetch takes the vector path");
  int st = 0;  // PF: the stage this pass reads
  if constexpr (PF) stage_pass<C>(stage, 0, kb, vb, sk.n, sv.n, ln, start, start, end);
  // Bounds are block-uniform: every lane runs every pass, as the shuffles need.
  for (int n0 = start; n0 < end; n0 += C::KB) {
    float kf[C::U][C::E], vf[C::U][C::E], s[C::U];
    bool valid[C::U];
    // rows past the end: scores masked to -inf below
    pass_rows<C, VL, PF>(stage, st, kb, vb, sk, sv, ln, n0, C::KB, start, end, kf, vf, valid);
    float m_new = m;
#pragma unroll
    for (int u = 0; u < C::U; ++u) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < C::E; ++e) dot = fmaf(qf[e], kf[u][e], dot);
      dot = group_sum<C::L>(dot, ln.li, ln.base) * qk_scale;  // log2 units: exp2 below
      s[u] = valid[u] ? dot : -INFINITY;
      m_new = fmaxf(m_new, s[u]);
    }
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key yet: keep exp2 away from NaN
    const float alpha = exp2f(m - m_use);
    l *= alpha;
#pragma unroll
    for (int e = 0; e < C::E; ++e) acc[e] *= alpha;
#pragma unroll
    for (int u = 0; u < C::U; ++u) {
      const float p = exp2f(s[u] - m_use);
      l += p;
#pragma unroll
      for (int e = 0; e < C::E; ++e) acc[e] = fmaf(p, vf[u][e], acc[e]);
    }
    m = m_new;
  }
  if constexpr (PF) cp_async_wait<0>();  // the zero-byte group past the end: none left in flight

  // Merge the groups in group order. A group that saw no key holds m = -inf and gets weight 0;
  // the split holds at least one key, so the block maximum is finite.
  if (ln.active) {
    if (ln.li == 0) red_m[ln.g] = m, red_l[ln.g] = l;
    stash_cols<C>(red_acc, ln.g, ln.li, acc);
  }
  __syncthreads();
  float m_max = -INFINITY;
#pragma unroll 8
  for (int i = 0; i < C::G; ++i) m_max = fmaxf(m_max, red_m[i]);
  if (threadIdx.x < C::G) red_w[threadIdx.x] = exp2f(red_m[threadIdx.x] - m_max);
  __syncthreads();
  const int c = threadIdx.x;
  if (c >= D) return;
  float o = 0.f, l_sum = 0.f;
#pragma unroll 8
  for (int i = 0; i < C::G; ++i) {
    o = fmaf(red_w[i], red_acc[i][c], o);
    l_sum = fmaf(red_w[i], red_l[i], l_sum);
  }
  if constexpr (SPLIT) {
    const int64_t part = split * BH + bh;
    pacc[part * D + c] = o;
    if (c == 0) pm[part] = m_max, pl[part] = l_sum;
  } else {
    const float of = o / l_sum;
    out[bh * D + c] = from_float<T>(of);
    out32[bh * D + c] = of;
    if (c == 0) lse[bh] = m_max + log2f(l_sum);
  }
}

// out / out32 / lse from the split partials, splits merged in order. One thread per (bh, column).
template <typename T>
__global__ void __launch_bounds__(kThreads) class_attn_fwd_combine_kernel(
    const float* __restrict__ pm, const float* __restrict__ pl, const float* __restrict__ pacc,
    T* __restrict__ out, float* __restrict__ out32, float* __restrict__ lse, int64_t BH, int D,
    int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= BH * D) return;
  const int64_t bh = i / D;
  float m_max = -INFINITY;
  for (int s = 0; s < splits; ++s) m_max = fmaxf(m_max, pm[s * BH + bh]);
  float o = 0.f, l_sum = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float w = exp2f(pm[s * BH + bh] - m_max);
    l_sum = fmaf(w, pl[s * BH + bh], l_sum);
    o = fmaf(w, pacc[s * BH * D + i], o);
  }
  const float of = o / l_sum;
  out[i] = from_float<T>(of);
  out32[i] = of;
  if (i == bh * D) lse[bh] = m_max + log2f(l_sum);
}

// ---- backward ----------------------------------------------------------------------------

// Grid (B*H, splits), block kThreads. dk, dv: strides sg (unit last stride, 16-byte aligned:
// allocated here). dq: (B*H, D) in T, or with SPLIT fp32 partials [split, bh, D]. o32: the
// forward's out32, (B*H, D) contiguous. PF as in the forward.
template <typename T, int D, bool VL, bool SPLIT, bool PF>
__global__ void __launch_bounds__(kThreads) class_attn_bwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ o32, const T* __restrict__ dout, const float* __restrict__ lse,
    T* __restrict__ dq, float* __restrict__ pdq, T* __restrict__ dk, T* __restrict__ dv, S4 sq,
    S4 sk, S4 sv, S4 sdo, S4 sg, int H, int N, int64_t BH, int chunk, float scale,
    float qk_scale) {
  using C = Cfg<T, D>;
  __shared__ float red[C::G][D];
  __shared__ std::conditional_t<PF, Staging<C, C::UB, T>, NoStaging> stage;

  const int64_t bh = blockIdx.x, split = blockIdx.y;
  const int64_t b = bh / H, h = bh - b * H;
  const Lane<C> ln;

  float qf[C::E], dof[C::E], dqa[C::E];
  load_cols<C, false>(q + b * sq.b + h * sq.h, sq.d, ln.li, qf);
  load_cols<C, false>(dout + b * sdo.b + h * sdo.h, sdo.d, ln.li, dof);
  float delta = 0.f;  // dO . O, recomputed per block: 2 D loads instead of a kernel
  {
    float of[C::E];
    load_cols<C, false>(o32 + bh * D, 1, ln.li, of);
#pragma unroll
    for (int e = 0; e < C::E; ++e) delta = fmaf(dof[e], of[e], delta);
    delta = group_sum<C::L>(delta, ln.li, ln.base);
  }
#pragma unroll
  for (int e = 0; e < C::E; ++e) dqa[e] = 0.f;
  const float row_lse = lse[bh];

  const T* kb = k + b * sk.b + h * sk.h;
  const T* vb = v + b * sv.b + h * sv.h;
  T* dkb = dk + b * sg.b + h * sg.h;
  T* dvb = dv + b * sg.b + h * sg.h;
  const int start = static_cast<int>(split) * chunk;  // the host keeps N <= 2^30: no overflow
  const int end = min(start + chunk, N);
  static_assert(VL || !PF, "prefetch takes the vector path");
  int st = 0;  // PF: the stage this pass reads
  if constexpr (PF) stage_pass<C>(stage, 0, kb, vb, sk.n, sv.n, ln, start, start, end);
  for (int n0 = start; n0 < end; n0 += C::KBB) {
    float kf[C::UB][C::E], vf[C::UB][C::E];
    bool valid[C::UB];  // p = 0 where not
    pass_rows<C, VL, PF>(stage, st, kb, vb, sk, sv, ln, n0, C::KBB, start, end, kf, vf, valid);
#pragma unroll
    for (int u = 0; u < C::UB; ++u) {
      const int n = n0 + u * C::G + ln.g;
      float sdot = 0.f, pdot = 0.f;
#pragma unroll
      for (int e = 0; e < C::E; ++e) {
        sdot = fmaf(qf[e], kf[u][e], sdot);
        pdot = fmaf(dof[e], vf[u][e], pdot);
      }
      sdot = group_sum<C::L>(sdot, ln.li, ln.base);
      pdot = group_sum<C::L>(pdot, ln.li, ln.base);
      const float p = valid[u] ? exp2f(sdot * qk_scale - row_lse) : 0.f;
      const float ds = p * (pdot - delta);
      if (valid[u]) {
        float grad[C::E];
#pragma unroll
        for (int e = 0; e < C::E; ++e) grad[e] = p * dof[e];
        store_cols<C>(dvb + n * sg.n, ln.li, grad);
        const float dss = ds * scale;
#pragma unroll
        for (int e = 0; e < C::E; ++e) grad[e] = dss * qf[e];
        store_cols<C>(dkb + n * sg.n, ln.li, grad);
      }
#pragma unroll
      for (int e = 0; e < C::E; ++e) dqa[e] = fmaf(ds, kf[u][e], dqa[e]);
    }
  }
  if constexpr (PF) cp_async_wait<0>();  // the zero-byte group past the end: none left in flight

  // dq: the groups' partial sums added in group order.
  if (ln.active) stash_cols<C>(red, ln.g, ln.li, dqa);
  __syncthreads();
  const int c = threadIdx.x;
  if (c >= D) return;
  float sum = 0.f;
#pragma unroll 8
  for (int i = 0; i < C::G; ++i) sum += red[i][c];
  sum *= scale;
  if constexpr (SPLIT) {
    pdq[(split * BH + bh) * D + c] = sum;
  } else {
    dq[bh * D + c] = from_float<T>(sum);
  }
}

// dq from the split partials, summed in split order. One thread per (bh, column).
template <typename T>
__global__ void __launch_bounds__(kThreads) class_attn_dq_combine_kernel(
    const float* __restrict__ pdq, T* __restrict__ dq, int64_t BHD, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= BHD) return;
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += pdq[s * BHD + i];
  dq[i] = from_float<T>(sum);
}

// ---- input checks (shared by the CUDA and Meta kernels) ----------------------------------

constexpr const char* kFwd = "class_attention_forward";
constexpr const char* kBwd = "class_attention_backward";

bool head_dim_ok(int64_t d) {
  return d == 32 || d == 48 || d == 64 || d == 80 || d == 96 || d == 128;
}

void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " dtype must be q's (",
              q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              q.device());
}

// q (B, H, 1, D); k, v (B, H, N, D) with N >= 1; one dtype (fp32/fp16/bf16) and device.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, op, ": q must be (B, H, 1, D), got shape ", q.sizes());
  TORCH_CHECK(is_kernel_float(q.scalar_type()), op,
              ": q dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(head_dim_ok(q.size(3)), op, ": q head dim D must be 32, 48, 64, 80, 96 or 128, got ",
              q.size(3));
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              op, ": k must be (B, H, N, D) matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1, op, ": k must hold at least one key (N >= 1), got ", k.sizes());
  check_same(op, "k", k, q, k.sizes());
  check_same(op, "v", v, q, k.sizes());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a positive float, got ", scale);
}

void check_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_qkv(kBwd, q, k, v, scale);
  check_same(kBwd, "dout", dout, q, q.sizes());
  // out: the forward's out_f32
  TORCH_CHECK(out.sizes() == q.sizes(), kBwd, ": out must have shape ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == at::kFloat, kBwd,
              ": out dtype must be float32 (the forward's out_f32), got ", out.scalar_type());
  TORCH_CHECK(out.device() == q.device(), kBwd, ": out is on ", out.device(), " but q is on ",
              q.device());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1), kBwd,
              ": lse must have shape (", q.size(0), ", ", q.size(1), "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, kBwd, ": lse dtype must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), kBwd, ": lse is on ", lse.device(), " but q is on ",
              q.device());
}

void check_cuda(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
}

// The gradient of k or v: token-major (B, N, H, D) in memory when k is a head-split view of a
// (B, N, H*D) projection (so the view's backward needs no copy), else (B, H, N, D) contiguous.
at::Tensor grad_layout(const at::Tensor& k) {
  const int64_t B = k.size(0), H = k.size(1), N = k.size(2), D = k.size(3);
  if (k.stride(1) < k.stride(2)) return at::empty({B, N, H, D}, k.options()).transpose(1, 2);
  return at::empty({B, H, N, D}, k.options());
}

// ---- launch helpers ----------------------------------------------------------------------

S4 strides(const at::Tensor& t) {
  // Size-1 dims: stride 0, so that it never spoils the alignment test (it is never multiplied
  // by anything but 0).
  auto s = [&](int d) { return t.size(d) > 1 ? t.stride(d) : 0; };
  return S4{s(0), s(1), s(2), s(3)};
}

// 16-byte vector loads are legal for every key row of t (D is a multiple of `vec` already).
bool vec_rows(const at::Tensor& t, int64_t vec) {
  const S4 s = strides(t);
  return t.stride(3) == 1 && s.b % vec == 0 && s.h % vec == 0 && s.n % vec == 0 &&
         ptr_aligned(t.const_data_ptr(), 16);
}

template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 48: f(std::integral_constant<int, 48>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 80: f(std::integral_constant<int, 80>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "class_attention: unsupported head dim ", d);
  }
}

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// Split the N keys into `count` chunks of `chunk` keys (whole block passes, none empty) so that
// BH * count blocks come close to one wave of blocks_per_sm per SM without passing it (a second,
// partial wave costs more than it hides).
struct Split {
  int count, chunk;
};

Split split_plan(const char* op, int64_t BH, int64_t N, int keys_per_pass, int blocks_per_sm,
                 int device) {
  // The kernels index keys with 32-bit ints (64-bit index math cost spills) and (b, h) by grid x.
  TORCH_CHECK(N <= (int64_t{1} << 30), op, ": k holds N = ", N, " keys, more than 2^30");
  TORCH_CHECK(BH <= INT32_MAX, op, ": B*H = ", BH, " is more than 2^31 - 1");
  const int64_t passes = (N + keys_per_pass - 1) / keys_per_pass;
  const int64_t target = static_cast<int64_t>(blocks_per_sm) * sm_count(device);
  const int64_t want = std::max<int64_t>(1, std::min({target / BH, passes, kMaxSplits}));
  const int64_t per = (passes + want - 1) / want;
  return Split{static_cast<int>((passes + per - 1) / per), static_cast<int>(per * keys_per_pass)};
}

// ---- forward -----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_meta(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v, double scale,
                                                            bool) {
  check_qkv(kFwd, q, k, v, scale);
  const auto f32 = q.options().dtype(at::kFloat);
  return {at::empty(q.sizes(), q.options()), at::empty({q.size(0), q.size(1)}, f32),
          at::empty(q.sizes(), f32)};
}

template <typename T, int D, bool VL, bool PF>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& out32, at::Tensor& lse, double scale, cudaStream_t stream) {
  using C = Cfg<T, D>;
  const int64_t BH = k.size(0) * k.size(1);
  const int H = static_cast<int>(k.size(1)), N = static_cast<int>(k.size(2));
  const Split sp = split_plan(kFwd, BH, k.size(2), C::KB, kFwdBlocksPerSm, q.get_device());
  const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>(sp.count));
  const float qk_scale = static_cast<float>(scale * kLog2e);
  const auto* qp = static_cast<const T*>(q.const_data_ptr());
  const auto* kp = static_cast<const T*>(k.const_data_ptr());
  const auto* vp = static_cast<const T*>(v.const_data_ptr());
  if (sp.count == 1) {
    class_attn_fwd_kernel<T, D, VL, false, PF><<<grid, kThreads, 0, stream>>>(
        qp, kp, vp, static_cast<T*>(out.data_ptr()), static_cast<float*>(out32.data_ptr()),
        static_cast<float*>(lse.data_ptr()), nullptr, nullptr, nullptr, strides(q), strides(k),
        strides(v), H, N, BH, sp.chunk, qk_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor pm = at::empty({sp.count, BH}, f32), pl = at::empty({sp.count, BH}, f32);
  at::Tensor pacc = at::empty({sp.count, BH, D}, f32);
  class_attn_fwd_kernel<T, D, VL, true, PF><<<grid, kThreads, 0, stream>>>(
      qp, kp, vp, nullptr, nullptr, nullptr, static_cast<float*>(pm.data_ptr()),
      static_cast<float*>(pl.data_ptr()), static_cast<float*>(pacc.data_ptr()), strides(q),
      strides(k), strides(v), H, N, BH, sp.chunk, qk_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = (BH * D + kThreads - 1) / kThreads;
  class_attn_fwd_combine_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const float*>(pm.const_data_ptr()), static_cast<const float*>(pl.const_data_ptr()),
      static_cast<const float*>(pacc.const_data_ptr()), static_cast<T*>(out.data_ptr()),
      static_cast<float*>(out32.data_ptr()), static_cast<float*>(lse.data_ptr()), BH, D,
      sp.count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q,
                                                            const at::Tensor& k,
                                                            const at::Tensor& v, double scale,
                                                            bool prefetch) {
  check_qkv(kFwd, q, k, v, scale);
  check_cuda(kFwd, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, f32);
  at::Tensor out32 = at::empty(q.sizes(), f32);
  if (out.numel() == 0) return {out, lse, out32};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vl = vec_rows(k, 16 / sizeof(T)) && vec_rows(v, 16 / sizeof(T));
    dispatch_head_dim(q.size(3), [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      if (vl && prefetch)
        launch_forward<T, D, true, true>(q, k, v, out, out32, lse, scale, stream);
      else if (vl)
        launch_forward<T, D, true, false>(q, k, v, out, out32, lse, scale, stream);
      else
        launch_forward<T, D, false, false>(q, k, v, out, out32, lse, scale, stream);
    });
  });
  return {out, lse, out32};
}

// ---- backward ----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool) {
  check_bwd(dout, q, k, v, out, lse, scale);
  return {at::empty(q.sizes(), q.options()), grad_layout(k), grad_layout(k)};
}

template <typename T, int D, bool VL, bool PF>
void launch_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, double scale,
                     cudaStream_t stream) {
  using C = Cfg<T, D>;
  const int64_t BH = k.size(0) * k.size(1);
  const int H = static_cast<int>(k.size(1)), N = static_cast<int>(k.size(2));
  const Split sp = split_plan(kBwd, BH, k.size(2), C::KBB, kBwdBlocksPerSm, q.get_device());
  const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>(sp.count));
  at::Tensor pdq;
  if (sp.count > 1) pdq = at::empty({sp.count, BH, D}, q.options().dtype(at::kFloat));
  const at::Tensor lse_c = lse.contiguous(), out_c = out.contiguous();
  // dk and dv come from grad_layout(k) alike: one set of strides serves both.
  auto launch = [&](auto split_tag) {
    class_attn_bwd_kernel<T, D, VL, decltype(split_tag)::value, PF><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k.const_data_ptr()),
        static_cast<const T*>(v.const_data_ptr()),
        static_cast<const float*>(out_c.const_data_ptr()),
        static_cast<const T*>(dout.const_data_ptr()),
        static_cast<const float*>(lse_c.const_data_ptr()), static_cast<T*>(dq.data_ptr()),
        pdq.defined() ? static_cast<float*>(pdq.data_ptr()) : nullptr,
        static_cast<T*>(dk.data_ptr()), static_cast<T*>(dv.data_ptr()), strides(q), strides(k),
        strides(v), strides(dout), strides(dk), H, N, BH, sp.chunk,
        static_cast<float>(scale), static_cast<float>(scale * kLog2e));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (sp.count == 1) {
    launch(std::false_type{});
    return;
  }
  launch(std::true_type{});
  const int64_t BHD = BH * D, blocks = (BHD + kThreads - 1) / kThreads;
  class_attn_dq_combine_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const float*>(pdq.const_data_ptr()), static_cast<T*>(dq.data_ptr()), BHD,
      sp.count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool prefetch) {
  check_bwd(dout, q, k, v, out, lse, scale);
  check_cuda(kBwd, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = grad_layout(k), dv = grad_layout(k);
  if (dq.numel() == 0) return {dq, dk, dv};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vl = vec_rows(k, 16 / sizeof(T)) && vec_rows(v, 16 / sizeof(T));
    dispatch_head_dim(q.size(3), [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      if (vl && prefetch)
        launch_backward<T, D, true, true>(dout, q, k, v, out, lse, dq, dk, dv, scale, stream);
      else if (vl)
        launch_backward<T, D, true, false>(dout, q, k, v, out, lse, dq, dk, dv, scale, stream);
      else
        launch_backward<T, D, false, false>(dout, q, k, v, out, lse, dq, dk, dv, scale, stream);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_C, m) {
  // (out, lse, out_f32) = class attention of q (B, H, 1, D) over k, v (B, H, N >= 1, D): one
  // dtype out of fp32/fp16/bf16, D in {32, 48, 64, 80, 96, 128}, any strides. out (B, H, 1, D)
  // contiguous in q's dtype; lse (B, H) fp32 log-sum-exp of the scaled scores in log2 units;
  // out_f32 the output in fp32, for the backward. prefetch: the kernels' PF variant where k and
  // v take the vector path (the same results).
  m.def("class_attention_forward(Tensor q, Tensor k, Tensor v, float scale, bool prefetch=False) "
        "-> (Tensor, Tensor, Tensor)");
  // (dq, dk, dv), deterministic (no atomics), with out the forward's out_f32; dq contiguous;
  // dk, dv token-major (B, N, H, D) in memory when k.stride(1) < k.stride(2), else contiguous.
  m.def("class_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale, bool prefetch=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deit_fast_C, CUDA, m) {
  m.impl("class_attention_forward", &forward_cuda);
  m.impl("class_attention_backward", &backward_cuda);
}

// Shapes and dtypes without data: input checks and output metadata testable on any machine.
TORCH_LIBRARY_IMPL(deit_fast_C, Meta, m) {
  m.impl("class_attention_forward", &forward_meta);
  m.impl("class_attention_backward", &backward_meta);
}

}  // namespace deit_fast
