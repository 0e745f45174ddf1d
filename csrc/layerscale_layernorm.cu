// The LayerScale residual fused with the LayerNorm that follows it, and a plain LayerNorm on the
// same kernels (DESIGN.md section 3): the CUDA backend of deit_fast.ops.layerscale_residual_layernorm
// and deit_fast.ops.layer_norm. Schemas: the TORCH_LIBRARY_FRAGMENT at the end.
//
//   forward   out    = x + (gamma * y) * scale[b]    (stored in out's dtype, normalised as stored)
//             normed = (out - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)
//   backward  x_hat  = (out - mean) * rstd,   g = dnormed * weight
//             dx     = (g - sum(g) / C - x_hat * sum(g * x_hat) / C) * rstd + dout
//             dy     = dx * scale[b] * gamma;     dgamma  = sum over rows of dx * scale[b] * y
//             dweight = sum over rows of dnormed * x_hat;   dbias = sum over rows of dnormed
// The plain LayerNorm is the same with out = x and no residual terms (no y, dout, dy, dgamma).
// mean and rstd are saved per row in fp32; all math is fp32, parameters are read as fp32.
//
// A row lives in registers: a group of G threads (a power of two, 1 ... 512) owns it, thread
// `lane` its 8-column vectors lane, lane + G, ... Vectors are one 16 B access (fp16/bf16; two for
// fp32) wherever the host finds every pointer and row stride aligned and C % 8 == 0, else eight
// element accesses with the row's tail masked (odd C, misaligned views). Row sums are butterfly
// shuffles inside a warp (every lane ends with the same bits), plus one shared-memory step when
// a row spans warps. Rows are addressed as (B, N, C) with two strides: strided views are read in
// place; the outputs are contiguous.
//
// The column grads are deterministic without atomics: block p of the backward owns a fixed strip
// of rows, each thread keeps fp32 sums for its fixed columns, the block adds its thread rows in a
// fixed order into partial[a, p, :], and a second kernel adds the strips per column in a fixed
// order. The strip count depends on the shape only. With the backward op's prefetch flag (kernel
// template PF) a row's dout and y come by cp.async, requested a row ahead.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace deit_fast {
namespace {

constexpr int kVec = 8;
constexpr int kFwdVecs = 4;    // vectors per thread in the forward (32 row elements)
constexpr int kBwdVecs = 2;    // fewer in the backward: it also keeps 3 column sums per element
constexpr int kThreads = 256;  // per block, unless one row needs more (the backward at C > 4096)
constexpr int kMaxC = 8192;    // 256 forward / 512 backward threads per row at most
constexpr int kMaxWarps = 2 * kThreads / 32;
constexpr int64_t kRowBlocks = 1024;  // at most this many row strips in the backward

// ---- kernels -----------------------------------------------------------------------------

// PF: one 8-element vector global -> shared by cp.async (16 B at a time), and back as floats.
template <typename T>
__device__ __forceinline__ void cp_async_vec(Vec<T, kVec>* dst, const T* __restrict__ src) {
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(Vec<T, kVec>)) / 16; ++k)
    cp_async_16(smem_addr(reinterpret_cast<char*>(dst) + 16 * k),
                reinterpret_cast<const char*>(src) + 16 * k, 16);
}

template <typename T>
__device__ __forceinline__ void unstage8(const Vec<T, kVec>& v, float (&out)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(v.v[j]);
}

// The 8 elements of a row from column c on, `left` = C - c of them in the row: one vector access
// when ALIGNED, else element-wise with the tail read as 0 and never written.
template <bool ALIGNED, typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int left, float (&out)[kVec]) {
  if constexpr (ALIGNED) {
    load_vec<kVec>(p, out);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = j < left ? to_float(p[j]) : 0.f;
  }
}

template <bool ALIGNED, typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, int left, const float (&in)[kVec]) {
  if constexpr (ALIGNED) {
    store_vec<kVec>(p, in);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j < left) p[j] = from_float<T>(in[j]);
    }
  }
}

// Sums K values over the G = blockDim.x threads of a row group; every thread of the group gets
// the same bits. All threads of the block must call it (it may synchronise the block).
template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], float (*scratch)[K]) {
  const int G = blockDim.x;
  for (int off = (G < 32 ? G : 32) >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if (G <= 32) return;  // uniform across the block
  const int warps = G >> 5;
  float (*row)[K] = scratch + threadIdx.y * warps;
  __syncthreads();  // the previous call's readers are done with scratch
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) row[threadIdx.x >> 5][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += row[w][k];
    v[k] = s;
  }
}

// Grid ceil(rows / TY), block (G, TY): row group ty of block i owns row i * TY + ty. Without y
// (plain LayerNorm) x is normalised and out is not written; without gamma / scale those factors
// are 1. Min 1 block per SM in the bounds: with none, ptxas 13 capped these at 64 registers and
// spilled.
template <typename XT, typename YT, typename OT, bool ALIGNED>
__global__ void __launch_bounds__(kThreads, 1) lsln_fwd_kernel(
    const XT* __restrict__ x, const YT* __restrict__ y, const float* __restrict__ gamma,
    const float* __restrict__ scale, const float* __restrict__ weight, const float* __restrict__ bias,
    OT* __restrict__ out, OT* __restrict__ normed, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int64_t rows, int64_t N, int C, int64_t sxb, int64_t sxn,
    int64_t syb, int64_t syn, float eps) {
  constexpr int NV = kFwdVecs;
  __shared__ float scratch[kThreads / 32][1];
  const int G = blockDim.x, lane = threadIdx.x;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool row_ok = r < rows;  // no early exit: group_sum may synchronise the block
  const int width = row_ok ? C : 0;  // columns this row group touches
  int64_t b = 0, n = 0;
  if (row_ok) split_row(r, rows, N, b, n);
  const float drop = scale != nullptr && row_ok ? scale[b] : 1.f;

  float v[NV][kVec];
  float sum[1] = {0.f};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (lane + i * G) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[i][j] = 0.f;
    if (c >= width) continue;
    load8<ALIGNED>(x + b * sxb + n * sxn + c, C - c, v[i]);
    if (y != nullptr) {
      float yv[kVec], g[kVec];
      load8<ALIGNED>(y + b * syb + n * syn + c, C - c, yv);
      if (gamma != nullptr) {
        load8<ALIGNED>(gamma + c, C - c, g);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) g[j] = 1.f;
      }
      // Normalise out as stored (rounded to OT), as the eager sequence does. The masked tail
      // stays 0: y and x read as 0 there.
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[i][j] = to_float(from_float<OT>(v[i][j] + (g[j] * yv[j]) * drop));
      store8<ALIGNED>(out + r * C + c, C - c, v[i]);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum[0] += v[i][j];
  }
  group_sum<1>(sum, scratch);
  const float mean = sum[0] / C;

  // Two-pass variance from the registers: no cancellation, whatever the row's offset.
  float sq[1] = {0.f};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (lane + i * G) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float d = c + j < width ? v[i][j] - mean : 0.f;
      sq[0] += d * d;
    }
  }
  group_sum<1>(sq, scratch);
  const float rstd = 1.f / sqrtf(sq[0] / C + eps);

#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = (lane + i * G) * kVec;
    if (c >= width) continue;
    float w[kVec], bi[kVec], o[kVec];
    load8<ALIGNED>(weight + c, C - c, w);
    load8<ALIGNED>(bias + c, C - c, bi);
#pragma unroll
    for (int j = 0; j < kVec; ++j) o[j] = (v[i][j] - mean) * rstd * w[j] + bi[j];
    store8<ALIGNED>(normed + r * C + c, C - c, o);
  }
  if (row_ok && lane == 0) {
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// Writes this block's column sums acc (TY row groups) to dst[0, C) in a fixed order, through
// colbuf (TY x G * NV * kVec floats).
template <int NV>
__device__ __forceinline__ void store_column_sums(const float (&acc)[NV][kVec], float* colbuf,
                                                  float* __restrict__ dst, int C) {
  const int G = blockDim.x, TY = blockDim.y, width = G * NV * kVec;
  __syncthreads();  // the previous call's readers are done with colbuf
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) colbuf[threadIdx.y * width + (threadIdx.x + i * G) * kVec + j] = acc[i][j];
  }
  __syncthreads();
  for (int q = threadIdx.y * G + threadIdx.x; q < C; q += G * TY) {  // C <= width
    float s = 0.f;
    for (int k = 0; k < TY; ++k) s += colbuf[k * width + q];
    dst[q] = s;
  }
}

// Grid (P row strips), block (G, TY), dynamic shared memory TY * G * kBwdVecs * kVec floats:
// block p walks rows [p * rows_per_block, (p + 1) * rows_per_block), writes dx (and dy), and
// leaves its column sums in partial (3, P, C): [0] dgamma (with gamma), [1] dweight, [2] dbias.
// `src` is the saved out (x for a plain LayerNorm); without dout there is no residual (no y,
// dy, dgamma). Up to 512 threads: at most 128 registers.
// PF (vector path, residual, 16-bit y, 256 threads): a row's dout and y are requested by cp.async
// into shared memory (after colbuf) at the end of the row before, so they arrive while this
// row's src and dnormed are loaded and summed, where the plain kernel loads them only after the
// row sums: one memory round trip a row instead of two, without the registers that holding them
// would take (the kernel is at its 128). The same arithmetic in the same order.
template <typename XT, typename YT, typename OT, bool ALIGNED, bool PF>
__global__ void __launch_bounds__(2 * kThreads, 1) lsln_bwd_kernel(
    const OT* __restrict__ dout, const OT* __restrict__ dnormed, const OT* __restrict__ src,
    const YT* __restrict__ y, const float* __restrict__ gamma, const float* __restrict__ scale,
    const float* __restrict__ weight, const float* __restrict__ mean, const float* __restrict__ rstd,
    XT* __restrict__ dx, YT* __restrict__ dy, float* __restrict__ partial, int64_t rows, int64_t N,
    int C, int64_t sdb, int64_t sdn, int64_t snb, int64_t snn, int64_t ssb, int64_t ssn,
    int64_t syb, int64_t syn, int64_t rows_per_block) {
  constexpr int NV = kBwdVecs;
  extern __shared__ __align__(32) float colbuf[];  // 32: PF's fp32 vectors after it
  __shared__ float scratch[kMaxWarps][2];
  const int G = blockDim.x, TY = blockDim.y, lane = threadIdx.x;
  const bool residual = dout != nullptr, has_gamma = residual && gamma != nullptr;
  static_assert(ALIGNED || !PF, "prefetch takes the vector path");
  // PF: this thread's vector i of dout and of y in shared memory, after colbuf (offsets
  // recomputed at each use, not held: the kernel is at 128 registers).
  auto dout_slot = [&](int i) {
    return reinterpret_cast<Vec<OT, kVec>*>(colbuf + TY * G * NV * kVec) +
           (i * TY + threadIdx.y) * G + lane;
  };
  auto y_slot = [&](int i) {
    constexpr int kDoutFloats = NV * sizeof(Vec<OT, kVec>) / sizeof(float);  // per thread
    return reinterpret_cast<Vec<YT, kVec>*>(colbuf + TY * G * (NV * kVec + kDoutFloats)) +
           (i * TY + threadIdx.y) * G + lane;
  };
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  // PF: requests the dout and y vectors of this thread's row k of the strip (none past the end).
  auto stage_row = [&](int64_t k) {
    const int64_t r = r0 + k;
    if (k < rows_per_block && r < rows) {
      int64_t b, n;
      split_row(r, rows, N, b, n);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int c = (lane + i * G) * kVec;
        if (c >= C) continue;  // phase 2 skips these too
        cp_async_vec(dout_slot(i), dout + b * sdb + n * sdn + c);
        if (has_gamma) cp_async_vec(y_slot(i), y + b * syb + n * syn + c);
      }
    }
    cp_async_commit();
  };
  if constexpr (PF) stage_row(threadIdx.y);

  float acc_g[NV][kVec], acc_w[NV][kVec], acc_b[NV][kVec];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc_g[i][j] = acc_w[i][j] = acc_b[i][j] = 0.f;
  }

  for (int64_t k = threadIdx.y; k < rows_per_block; k += TY) {  // the same trip count for all
    const int64_t r = r0 + k;
    const bool row_ok = r < rows;
    const int width = row_ok ? C : 0;
    int64_t b = 0, n = 0;
    if (row_ok) split_row(r, rows, N, b, n);
    const float mu = row_ok ? mean[r] : 0.f, rs = row_ok ? rstd[r] : 0.f;

    // x_hat, and g = dnormed * weight in place of dnormed once dweight and dbias have it. The
    // masked tail has dnormed = 0, so it adds nothing anywhere.
    float xh[NV][kVec], g[NV][kVec];
    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = (lane + i * G) * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) xh[i][j] = g[i][j] = 0.f;
      if (c >= width) continue;
      float w[kVec];
      load8<ALIGNED>(src + b * ssb + n * ssn + c, C - c, xh[i]);
      load8<ALIGNED>(dnormed + b * snb + n * snn + c, C - c, g[i]);
      load8<ALIGNED>(weight + c, C - c, w);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        xh[i][j] = (xh[i][j] - mu) * rs;
        acc_w[i][j] += g[i][j] * xh[i][j];
        acc_b[i][j] += g[i][j];
        g[i][j] *= w[j];
        sums[0] += g[i][j];
        sums[1] += g[i][j] * xh[i][j];
      }
    }
    group_sum<2>(sums, scratch);
    const float m1 = sums[0] / C, m2 = sums[1] / C;

    const float drop = residual && scale != nullptr && row_ok ? scale[b] : 1.f;
    if constexpr (PF) cp_async_wait<0>();  // this row's dout and y have landed
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = (lane + i * G) * kVec;
      if (c >= width) continue;
      float d[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) d[j] = (g[i][j] - m1 - xh[i][j] * m2) * rs;
      if (residual) {
        float e[kVec];
        if constexpr (PF) unstage8(*dout_slot(i), e);
        else load8<ALIGNED>(dout + b * sdb + n * sdn + c, C - c, e);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          d[j] += e[j];
          e[j] = d[j] * drop;
        }
        if (has_gamma) {
          float yv[kVec], gm[kVec];
          if constexpr (PF) unstage8(*y_slot(i), yv);
          else load8<ALIGNED>(y + b * syb + n * syn + c, C - c, yv);
          load8<ALIGNED>(gamma + c, C - c, gm);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            acc_g[i][j] += e[j] * yv[j];
            e[j] *= gm[j];
          }
        }
        store8<ALIGNED>(dy + r * C + c, C - c, e);
      }
      store8<ALIGNED>(dx + r * C + c, C - c, d);
    }
    // PF: the next row's dout and y, in flight through its src / dnormed loads and row sums. Its
    // slots held this row's, which the stores above have consumed.
    if constexpr (PF) stage_row(k + TY);
  }

  const int64_t p = blockIdx.x, P = gridDim.x;
  if (has_gamma) store_column_sums(acc_g, colbuf, partial + p * C, C);
  store_column_sums(acc_w, colbuf, partial + (P + p) * C, C);
  store_column_sums(acc_b, colbuf, partial + (2 * P + p) * C, C);
}

// grad_a[c] = sum over p of partial[a, p, c] (column_sum), for a = dgamma, dweight, dbias.
// Grid (ceil(C / 32), 3), block (32, kColsumRows); a null grad (no gamma) is skipped.
__global__ void __launch_bounds__(32 * kColsumRows) lsln_colsum_kernel(
    const float* __restrict__ partial, float* __restrict__ dgamma, float* __restrict__ dweight,
    float* __restrict__ dbias, int64_t P, int C) {
  const int a = blockIdx.y;
  float* dst = a == 0 ? dgamma : a == 1 ? dweight : dbias;
  if (dst == nullptr) return;  // uniform across the block
  column_sum(partial + a * P * C, dst, P, C);
}

// ---- input checks (shared by the CUDA and Meta kernels) ----------------------------------

constexpr const char* kFusedFwd = "layerscale_residual_layernorm_forward";
constexpr const char* kFusedBwd = "layerscale_residual_layernorm_backward";
constexpr const char* kLnFwd = "layer_norm_forward";
constexpr const char* kLnBwd = "layer_norm_backward";

// Rows of a (B, ..., C) tensor: the product of all but the last dim (also when C == 0).
int64_t row_count(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// The (rows, C) or (B, ..., C) tensor that fixes the shape; C within the register budget.
void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2, op, ": ", name, " must be (rows, C) or (B, ..., C), got shape ", t.sizes());
  check_float(op, name, t.scalar_type());
  TORCH_CHECK(t.size(-1) <= kMaxC, op, ": ", name, " has C=", t.size(-1),
              " channels; the kernels hold a row in registers and take C <= ", kMaxC);
}

// t has ref's shape (and dtype when same_dtype) and device; ref is named ref_name.
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref, bool same_dtype) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have ", ref_name, "'s shape ", ref.sizes(),
              ", got ", t.sizes());
  check_float(op, name, t.scalar_type());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), op, ": ", name, " dtype must be ",
              ref_name, "'s ", ref.scalar_type(), ", got ", t.scalar_type());
  check_device(op, name, t, ref_name, ref);
}

void check_param(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                 const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == ref.size(-1), op, ": ", name, " must have shape (",
              ref.size(-1), ",), got ", t.sizes());
  check_float(op, name, t.scalar_type());
  check_device(op, name, t, ref_name, ref);
}

void check_residual(const char* op, const char* ref_name, const at::Tensor& ref, const at::Tensor& y,
                    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& scale) {
  check_like(op, "y", y, ref_name, ref, false);
  if (gamma.has_value()) check_param(op, "gamma", *gamma, ref_name, ref);
  if (scale.has_value()) {
    const at::Tensor& s = *scale;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == ref.size(0), op, ": scale must have shape (", ref.size(0),
                ",) (one DropPath factor per sample), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": scale dtype must be float32, got ", s.scalar_type());
    check_device(op, "scale", s, ref_name, ref);
  }
}

void check_stat(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == row_count(ref), op, ": ", name, " must have shape (",
              row_count(ref), ",) (one per row of ", ref_name, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " dtype must be float32, got ", t.scalar_type());
  check_device(op, name, t, ref_name, ref);
}

// The dtype triples the kernels are built for, which are the ones the op produces (out is the
// promotion of x, y and gamma): an fp32 result from any x and y, or one half type throughout.
void check_dtypes(const char* op, const char* what, at::ScalarType x, at::ScalarType y, at::ScalarType o) {
  TORCH_CHECK(o == at::kFloat || (x == o && y == o), op, ": ", what, " must be float32, or the dtype of "
              "both x and y (their promotion), got x ", x, ", y ", y, ", result ", o);
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// ---- launches ----------------------------------------------------------------------------

// Row group size G (threads per row) and TY (rows per block): the fewest threads that hold a row
// of C as `per_thread` 8-column vectors each. 256 threads per block, or one row of 512.
struct Geometry {
  int g, ty;
};

Geometry geometry(int64_t C, int per_thread) {
  TORCH_INTERNAL_ASSERT(C > 0 && C <= kMaxC);
  const int64_t vectors = (C + kVec - 1) / kVec;
  int g = 1;
  while (g * per_thread < vectors) g *= 2;
  return Geometry{g, g >= kThreads ? 1 : kThreads / g};
}

// Parameters as the kernels read them: fp32, contiguous, 32-B aligned for vector loads.
at::Tensor param_f32(const at::Tensor& t) {
  at::Tensor p = t.to(at::kFloat).contiguous();
  return ptr_aligned(p.const_data_ptr(), kVec * sizeof(float)) ? p : p.clone();
}

const float* f32_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const float*>(t.const_data_ptr()) : nullptr;
}

// f(Tag<XT>, Tag<YT>, Tag<OT>) over the triples check_dtypes admits.
template <typename F>
void dispatch_triple(at::ScalarType x, at::ScalarType y, at::ScalarType o, F&& f) {
  if (o == at::kFloat) {
    dispatch_float(x, "x", [&](auto xt) {
      dispatch_float(y, "y", [&](auto yt) { f(xt, yt, Tag<float>{}); });
    });
  } else {
    dispatch_float(o, "out", [&](auto t) { f(t, t, t); });
  }
}

// normed (and out when y is given), mean and rstd of the rows of x.
void forward_impl(const char* op, const at::Tensor& x, const at::Tensor* y,
                  const std::optional<at::Tensor>& gamma_opt, const std::optional<at::Tensor>& scale_opt,
                  const at::Tensor& weight_in, const at::Tensor& bias_in, double eps, at::Tensor* out,
                  at::Tensor& normed, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t C = x.size(-1);
  if (normed.numel() == 0) {
    if (mean.numel() != 0) {  // C == 0: the statistics of an empty row
      mean.zero_();
      rstd.fill_(1.0 / std::sqrt(eps));
    }
    return;
  }
  const RowView xv = row_view(x, "x");
  RowView yv{};
  if (y != nullptr) yv = row_view(*y, "y");
  const at::Tensor weight = param_f32(weight_in), bias = param_f32(bias_in);
  const at::Tensor gamma = y != nullptr && gamma_opt.has_value() ? param_f32(*gamma_opt) : at::Tensor();
  const at::Tensor scale = y != nullptr && scale_opt.has_value() ? scale_opt->contiguous() : at::Tensor();
  const bool vec = vec_ok(xv, kVec) && (y == nullptr || vec_ok(yv, kVec));  // outputs are fresh
  const Geometry geo = geometry(C, kFwdVecs);
  const int64_t rows = xv.rows(), blocks = (rows + geo.ty - 1) / geo.ty;
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many rows: ", rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType yt = y != nullptr ? y->scalar_type() : x.scalar_type();

  dispatch_triple(x.scalar_type(), yt, normed.scalar_type(), [&](auto xt_, auto yt_, auto ot_) {
    using XT = typename decltype(xt_)::type;
    using YT = typename decltype(yt_)::type;
    using OT = typename decltype(ot_)::type;
    auto kernel = vec ? lsln_fwd_kernel<XT, YT, OT, true> : lsln_fwd_kernel<XT, YT, OT, false>;
    kernel<<<static_cast<unsigned>(blocks), dim3(geo.g, geo.ty), 0, stream>>>(
        static_cast<const XT*>(xv.t.const_data_ptr()),
        y != nullptr ? static_cast<const YT*>(yv.t.const_data_ptr()) : nullptr, f32_or_null(gamma),
        f32_or_null(scale), f32_or_null(weight), f32_or_null(bias),
        out != nullptr ? static_cast<OT*>(out->data_ptr()) : nullptr, static_cast<OT*>(normed.data_ptr()),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, xv.N, static_cast<int>(C), xv.sb, xv.sn,
        y != nullptr ? yv.sb : 0, y != nullptr ? yv.sn : 0, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dx (and dy, dgamma with dout) plus dweight and dbias. `src` is the saved out (x for a plain
// LayerNorm). The column grads are written in their tensors' dtypes.
void backward_impl(const at::Tensor* dout, const at::Tensor& dnormed, const at::Tensor& src,
                   const at::Tensor* y, const std::optional<at::Tensor>& gamma_opt,
                   const std::optional<at::Tensor>& scale_opt, const at::Tensor& weight_in,
                   const at::Tensor& mean_in, const at::Tensor& rstd_in, at::Tensor& dx, at::Tensor* dy,
                   at::Tensor* dgamma, at::Tensor& dweight, at::Tensor& dbias, bool prefetch) {
  const int64_t C = src.size(-1);
  if (dx.numel() == 0) {  // sums over no rows (or of no columns)
    if (dgamma != nullptr) dgamma->zero_();
    dweight.zero_();
    dbias.zero_();
    return;
  }
  const RowView nv = row_view(dnormed, "dnormed"), sv = row_view(src, "out");
  RowView dv{}, yv{};
  if (dout != nullptr) dv = row_view(*dout, "dout"), yv = row_view(*y, "y");
  const at::Tensor weight = param_f32(weight_in);
  const at::Tensor gamma = dgamma != nullptr ? param_f32(*gamma_opt) : at::Tensor();
  const at::Tensor scale = dout != nullptr && scale_opt.has_value() ? scale_opt->contiguous() : at::Tensor();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const bool vec = vec_ok(nv, kVec) && vec_ok(sv, kVec) &&
                   (dout == nullptr || (vec_ok(dv, kVec) && vec_ok(yv, kVec)));
  const Geometry geo = geometry(C, kBwdVecs);
  const int64_t rows = sv.rows();
  int64_t rows_per_block = (rows + kRowBlocks - 1) / kRowBlocks;
  rows_per_block = (rows_per_block + geo.ty - 1) / geo.ty * geo.ty;
  const int64_t strips = (rows + rows_per_block - 1) / rows_per_block;  // in [1, kRowBlocks]
  const size_t threads = static_cast<size_t>(geo.g) * geo.ty;
  const size_t smem = threads * kBwdVecs * kVec * sizeof(float);  // colbuf, <= 32 KiB
  // The kernel's PF staging (dout and y, kBwdVecs vectors a thread) fits beside colbuf in the
  // 48 KiB a launch gets without opting in at 256 threads (C <= 4096): PF runs only there.
  const bool pf = prefetch && vec && dout != nullptr && threads <= kThreads;
  const auto f32 = dx.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({3, strips, C}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType yt = y != nullptr ? y->scalar_type() : dx.scalar_type();

  dispatch_triple(dx.scalar_type(), yt, src.scalar_type(), [&](auto xt_, auto yt_, auto ot_) {
    using XT = typename decltype(xt_)::type;
    using YT = typename decltype(yt_)::type;
    using OT = typename decltype(ot_)::type;
    auto kernel = vec ? lsln_bwd_kernel<XT, YT, OT, true, false> : lsln_bwd_kernel<XT, YT, OT, false, false>;
    size_t stage = 0;
    // PF is built where y is 16-bit (mixed precision, 16-bit training): with fp32 y and out its
    // staging and colbuf fill the 48 KiB a launch gets without opting in, leaving none for the
    // static scratch (and with x fp32 too ptxas 13.0 spilled a register).
    if constexpr (sizeof(YT) == 2) {
      if (pf) {
        kernel = lsln_bwd_kernel<XT, YT, OT, true, true>;
        stage = threads * kBwdVecs * (sizeof(Vec<OT, kVec>) + sizeof(Vec<YT, kVec>));
      }
    }
    kernel<<<static_cast<unsigned>(strips), dim3(geo.g, geo.ty), smem + stage, stream>>>(
        dout != nullptr ? static_cast<const OT*>(dv.t.const_data_ptr()) : nullptr,
        static_cast<const OT*>(nv.t.const_data_ptr()), static_cast<const OT*>(sv.t.const_data_ptr()),
        y != nullptr ? static_cast<const YT*>(yv.t.const_data_ptr()) : nullptr, f32_or_null(gamma),
        f32_or_null(scale), f32_or_null(weight), f32_or_null(mean), f32_or_null(rstd),
        static_cast<XT*>(dx.data_ptr()), dy != nullptr ? static_cast<YT*>(dy->data_ptr()) : nullptr,
        partial.data_ptr<float>(), rows, sv.N, static_cast<int>(C), dv.sb, dv.sn, nv.sb, nv.sn, sv.sb,
        sv.sn, yv.sb, yv.sn, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // fp32 grads are summed in place; others through an fp32 buffer and a cast.
  auto f32_target = [&](at::Tensor& g) { return g.scalar_type() == at::kFloat ? g : at::empty({C}, f32); };
  at::Tensor gw = f32_target(dweight), gb = f32_target(dbias);
  at::Tensor gg = dgamma != nullptr ? f32_target(*dgamma) : at::Tensor();
  const dim3 grid(static_cast<unsigned>((C + 31) / 32), 3), block(32, kColsumRows);
  lsln_colsum_kernel<<<grid, block, 0, stream>>>(partial.const_data_ptr<float>(),
                                                gg.defined() ? gg.data_ptr<float>() : nullptr,
                                                gw.data_ptr<float>(), gb.data_ptr<float>(), strips,
                                                static_cast<int>(C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!gw.is_same(dweight)) dweight.copy_(gw);
  if (!gb.is_same(dbias)) dbias.copy_(gb);
  if (gg.defined() && !gg.is_same(*dgamma)) dgamma->copy_(gg);
}

// ---- the ops: Meta (checks + metadata) and CUDA --------------------------------------------

using Two = std::tuple<at::Tensor, at::Tensor>;
using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Two empty_stats(const at::Tensor& x) {
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({row_count(x)}, f32), at::empty({row_count(x)}, f32)};
}

void check_fused_forward(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                         const std::optional<at::Tensor>& scale, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
  check_rows(kFusedFwd, "x", x);
  check_residual(kFusedFwd, "x", x, y, gamma, scale);
  check_param(kFusedFwd, "weight", weight, "x", x);
  check_param(kFusedFwd, "bias", bias, "x", x);
  check_eps(kFusedFwd, eps);
  check_float(kFusedFwd, "out_dtype", out_dtype);
  check_dtypes(kFusedFwd, "out_dtype", x.scalar_type(), y.scalar_type(), out_dtype);
}

Four fused_forward_meta(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                        const std::optional<at::Tensor>& scale, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
  check_fused_forward(x, y, gamma, scale, weight, bias, eps, out_dtype);
  auto [mean, rstd] = empty_stats(x);
  const auto opts = x.options().dtype(out_dtype);
  return {at::empty(x.sizes(), opts), at::empty(x.sizes(), opts), mean, rstd};
}

Four fused_forward_cuda(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                        const std::optional<at::Tensor>& scale, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, at::ScalarType out_dtype) {
  check_fused_forward(x, y, gamma, scale, weight, bias, eps, out_dtype);
  check_cuda(kFusedFwd, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [mean, rstd] = empty_stats(x);
  const auto opts = x.options().dtype(out_dtype);
  at::Tensor out = at::empty(x.sizes(), opts), normed = at::empty(x.sizes(), opts);
  forward_impl(kFusedFwd, x, &y, gamma, scale, weight, bias, eps, &out, normed, mean, rstd);
  return {out, normed, mean, rstd};
}

void check_fused_backward(const at::Tensor& dout, const at::Tensor& dnormed, const at::Tensor& out,
                          const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                          const std::optional<at::Tensor>& scale, const at::Tensor& weight,
                          const at::Tensor& mean, const at::Tensor& rstd, at::ScalarType x_dtype) {
  check_rows(kFusedBwd, "out", out);
  check_like(kFusedBwd, "dout", dout, "out", out, true);
  check_like(kFusedBwd, "dnormed", dnormed, "out", out, true);
  check_residual(kFusedBwd, "out", out, y, gamma, scale);
  check_param(kFusedBwd, "weight", weight, "out", out);
  check_stat(kFusedBwd, "mean", mean, "out", out);
  check_stat(kFusedBwd, "rstd", rstd, "out", out);
  check_float(kFusedBwd, "x_dtype", x_dtype);
  check_dtypes(kFusedBwd, "out's dtype", x_dtype, y.scalar_type(), out.scalar_type());
}

Five fused_backward_empty(const at::Tensor& out, const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                          const at::Tensor& weight, at::ScalarType x_dtype) {
  return {at::empty(out.sizes(), out.options().dtype(x_dtype)), at::empty(y.sizes(), y.options()),
          gamma.has_value() ? at::empty(gamma->sizes(), gamma->options()) : at::empty({0}, y.options()),
          at::empty(weight.sizes(), weight.options()), at::empty(weight.sizes(), weight.options())};
}

Five fused_backward_meta(const at::Tensor& dout, const at::Tensor& dnormed, const at::Tensor& out,
                         const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                         const std::optional<at::Tensor>& scale, const at::Tensor& weight,
                         const at::Tensor& mean, const at::Tensor& rstd, at::ScalarType x_dtype, bool) {
  check_fused_backward(dout, dnormed, out, y, gamma, scale, weight, mean, rstd, x_dtype);
  return fused_backward_empty(out, y, gamma, weight, x_dtype);
}

Five fused_backward_cuda(const at::Tensor& dout, const at::Tensor& dnormed, const at::Tensor& out,
                         const at::Tensor& y, const std::optional<at::Tensor>& gamma,
                         const std::optional<at::Tensor>& scale, const at::Tensor& weight,
                         const at::Tensor& mean, const at::Tensor& rstd, at::ScalarType x_dtype,
                         bool prefetch) {
  check_fused_backward(dout, dnormed, out, y, gamma, scale, weight, mean, rstd, x_dtype);
  check_cuda(kFusedBwd, "out", out);
  const c10::cuda::CUDAGuard guard(out.device());
  auto [dx, dy, dgamma, dweight, dbias] = fused_backward_empty(out, y, gamma, weight, x_dtype);
  backward_impl(&dout, dnormed, out, &y, gamma, scale, weight, mean, rstd, dx, &dy,
                gamma.has_value() ? &dgamma : nullptr, dweight, dbias, prefetch);
  return {dx, dy, dgamma, dweight, dbias};
}

void check_ln_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_rows(kLnFwd, "x", x);
  check_param(kLnFwd, "weight", weight, "x", x);
  check_param(kLnFwd, "bias", bias, "x", x);
  check_eps(kLnFwd, eps);
}

Three ln_forward_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_ln_forward(x, weight, bias, eps);
  auto [mean, rstd] = empty_stats(x);
  return {at::empty(x.sizes(), x.options()), mean, rstd};
}

Three ln_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_ln_forward(x, weight, bias, eps);
  check_cuda(kLnFwd, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [mean, rstd] = empty_stats(x);
  at::Tensor normed = at::empty(x.sizes(), x.options());
  forward_impl(kLnFwd, x, nullptr, std::nullopt, std::nullopt, weight, bias, eps, nullptr, normed, mean,
               rstd);
  return {normed, mean, rstd};
}

void check_ln_backward(const at::Tensor& dnormed, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(kLnBwd, "x", x);
  check_like(kLnBwd, "dnormed", dnormed, "x", x, true);
  check_param(kLnBwd, "weight", weight, "x", x);
  check_stat(kLnBwd, "mean", mean, "x", x);
  check_stat(kLnBwd, "rstd", rstd, "x", x);
}

Three ln_backward_empty(const at::Tensor& x, const at::Tensor& weight) {
  return {at::empty(x.sizes(), x.options()), at::empty(weight.sizes(), weight.options()),
          at::empty(weight.sizes(), weight.options())};
}

Three ln_backward_meta(const at::Tensor& dnormed, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  check_ln_backward(dnormed, x, weight, mean, rstd);
  return ln_backward_empty(x, weight);
}

Three ln_backward_cuda(const at::Tensor& dnormed, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd) {
  check_ln_backward(dnormed, x, weight, mean, rstd);
  check_cuda(kLnBwd, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [dx, dweight, dbias] = ln_backward_empty(x, weight);
  backward_impl(nullptr, dnormed, x, nullptr, std::nullopt, std::nullopt, weight, mean, rstd, dx, nullptr,
                nullptr, dweight, dbias, false);  // no residual: nothing for PF to move
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_C, m) {
  // (out, normed, mean, rstd): out = x + gamma * y * scale[b], normed = LayerNorm(out) * weight
  // + bias, both contiguous in out_dtype (float32, or x's and y's common dtype); mean, rstd: fp32
  // (rows,). x, y: (rows, C) or (B, ..., C) fp32/fp16/bf16, any row strides, C <= 8192; gamma,
  // weight, bias: (C,); scale: (B,) fp32 DropPath factors.
  m.def("layerscale_residual_layernorm_forward(Tensor x, Tensor y, Tensor? gamma, Tensor? scale, "
        "Tensor weight, Tensor bias, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  // (dx in x_dtype, dy, dgamma (empty without gamma), dweight, dbias (both in weight's dtype)).
  // dout, dnormed: out's dtype; column grads deterministic (no atomics). prefetch: the kernel's
  // PF variant where it applies (the same results).
  m.def("layerscale_residual_layernorm_backward(Tensor dout, Tensor dnormed, Tensor out, Tensor y, "
        "Tensor? gamma, Tensor? scale, Tensor weight, Tensor mean, Tensor rstd, ScalarType x_dtype, "
        "bool prefetch=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Plain LayerNorm: (normed in x's dtype, mean, rstd) and (dx, dweight, dbias).
  m.def("layer_norm_forward(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor dnormed, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deit_fast_C, CUDA, m) {
  m.impl("layerscale_residual_layernorm_forward", &fused_forward_cuda);
  m.impl("layerscale_residual_layernorm_backward", &fused_backward_cuda);
  m.impl("layer_norm_forward", &ln_forward_cuda);
  m.impl("layer_norm_backward", &ln_backward_cuda);
}

// Shapes and dtypes without data: input checks and output metadata testable on any machine.
TORCH_LIBRARY_IMPL(deit_fast_C, Meta, m) {
  m.impl("layerscale_residual_layernorm_forward", &fused_forward_meta);
  m.impl("layerscale_residual_layernorm_backward", &fused_backward_meta);
  m.impl("layer_norm_forward", &ln_forward_meta);
  m.impl("layer_norm_backward", &ln_backward_meta);
}

}  // namespace deit_fast
