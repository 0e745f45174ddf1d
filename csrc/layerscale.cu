// LayerScale residual with per-sample DropPath (DESIGN.md section 3), the CUDA backend of
// deit_fast.ops.layerscale_residual. Schemas: the TORCH_LIBRARY_FRAGMENT at the end.
//
//   forward   out[b, n, c] = x[b, n, c] + (gamma[c] * y[b, n, c]) * scale[b]
//   backward  dy[b, n, c]  = (dout[b, n, c] * scale[b]) * gamma[c]
//             dgamma[c]    = sum over (b, n) of dout[b, n, c] * scale[b] * y[b, n, c]
//
// gamma (C,) and scale (B,) (fp32 DropPath factors keep[b] / keep_prob) are optional; dx is dout
// itself, so no kernel produces it. All math is fp32 whatever the storage dtypes.
//
// Memory-bound: one thread per (row, 8-column vector), vector loads wherever the host finds
// every pointer and row stride aligned (C % 8 == 0 at ViT widths), scalar code otherwise.
// x, y and dout are addressed as (B, N, C) with two row strides, so q/k/v-style slices and
// transposed layouts are read in place; out and dy are fresh contiguous tensors.
//
// dgamma is deterministic without atomics: block p of the backward sums its fixed strip of rows
// into partial[p, :] (fp32, fixed order), then a second kernel adds the strips per column in a
// fixed order and casts to gamma's dtype. The strip count depends on the shape only.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace deit_fast {
namespace {

constexpr int kVec = 8;             // 16 B of fp16/bf16, 32 B of fp32 per vector access
constexpr int64_t kRowBlocks = 1024;  // at most this many row strips in the backward

// ---- kernels -----------------------------------------------------------------------------

// Grid (ceil(rows / TY), column tiles), block (TX, TY): thread (tx, ty) of block (i, j) owns
// row i * TY + ty and columns [(j * TX + tx) * VEC, + VEC).
template <typename XT, typename YT, typename GT, typename OT, int VEC>
__global__ void __launch_bounds__(256) layerscale_fwd_kernel(
    const XT* __restrict__ x, const YT* __restrict__ y, const GT* __restrict__ gamma,
    const float* __restrict__ scale, OT* __restrict__ out, int64_t rows, int64_t N, int64_t C,
    int64_t sxb, int64_t sxn, int64_t syb, int64_t syn) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (r >= rows || c >= C) return;  // with VEC > 1 the host guarantees C % VEC == 0
  int64_t b, n;
  split_row(r, rows, N, b, n);

  float xv[VEC], yv[VEC], g[VEC], o[VEC];
  load_vec<VEC>(x + b * sxb + n * sxn + c, xv);
  load_vec<VEC>(y + b * syb + n * syn + c, yv);
  if (gamma != nullptr) {
    load_vec<VEC>(gamma + c, g);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = 1.f;
  }
  const float s = scale != nullptr ? scale[b] : 1.f;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o[j] = xv[j] + (g[j] * yv[j]) * s;
  store_vec<VEC>(out + r * C + c, o);
}

// Grid (P row strips, column tiles), block (TX, TY): block (p, j) walks rows
// [p * rows_per_block, (p + 1) * rows_per_block) with its TY thread rows, writes dy, and (with
// gamma) leaves its column sums of dout * scale * y in partial[p, :].
template <typename DT, typename YT, typename GT, int VEC>
__global__ void __launch_bounds__(256) layerscale_bwd_kernel(
    const DT* __restrict__ dout, const YT* __restrict__ y, const GT* __restrict__ gamma,
    const float* __restrict__ scale, YT* __restrict__ dy, float* __restrict__ partial,
    int64_t rows, int64_t N, int64_t C, int64_t sdb, int64_t sdn, int64_t syb, int64_t syn,
    int64_t rows_per_block) {
  __shared__ float red[256 * VEC];  // blockDim.x * blockDim.y <= 256 (launch bounds)
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * TX + tx) * VEC;
  const bool col_ok = c < C;  // with VEC > 1 the host guarantees C % VEC == 0
  const bool has_gamma = gamma != nullptr;

  float g[VEC], acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] = 1.f, acc[j] = 0.f;
  if (has_gamma && col_ok) load_vec<VEC>(gamma + c, g);

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  if (col_ok) {
    for (int64_t r = r0 + ty; r < r1; r += TY) {
      int64_t b, n;
      split_row(r, rows, N, b, n);
      float d[VEC], o[VEC];
      load_vec<VEC>(dout + b * sdb + n * sdn + c, d);
      const float s = scale != nullptr ? scale[b] : 1.f;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        d[j] *= s;
        o[j] = d[j] * g[j];
      }
      store_vec<VEC>(dy + r * C + c, o);
      if (has_gamma) {
        float yv[VEC];
        load_vec<VEC>(y + b * syb + n * syn + c, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += d[j] * yv[j];
      }
    }
  }
  if (!has_gamma) return;  // uniform across the block: no thread is left at the barrier

  // Sum the TY thread rows per column in a fixed order. red[k][q]: thread row k, column q of
  // this tile (width TX * VEC columns, starting at col0).
  const int width = TX * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) red[ty * width + tx * VEC + j] = acc[j];
  __syncthreads();
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * width;
  for (int q = ty * TX + tx; q < width; q += TX * TY) {
    float sum = 0.f;
    for (int k = 0; k < TY; ++k) sum += red[k * width + q];
    if (col0 + q < C) partial[static_cast<int64_t>(blockIdx.x) * C + col0 + q] = sum;
  }
}

// dgamma[c] = sum over p of partial[p, c] (column_sum). Grid ceil(C / 32), block (32, kColsumRows).
template <typename GT>
__global__ void __launch_bounds__(32 * kColsumRows) layerscale_colsum_kernel(
    const float* __restrict__ partial, GT* __restrict__ dgamma, int64_t P, int64_t C) {
  column_sum(partial, dgamma, P, C);
}

// ---- input checks (shared by the CUDA and Meta kernels) ----------------------------------

// gamma: (C,); scale: (B,) fp32; every tensor on `ref`'s device.
void check_common(const char* op, const char* ref_name, const at::Tensor& ref, const at::Tensor& y,
                  const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(ref.dim() >= 2, op, ": ", ref_name, " must be (rows, C) or (B, ..., C), got shape ",
              ref.sizes());
  TORCH_CHECK(y.sizes() == ref.sizes(), op, ": y must have ", ref_name, "'s shape ", ref.sizes(),
              ", got ", y.sizes());
  check_float(op, ref_name, ref.scalar_type());
  check_float(op, "y", y.scalar_type());
  TORCH_CHECK(y.device() == ref.device(), op, ": y is on ", y.device(), " but ", ref_name, " is on ",
              ref.device());
  if (gamma.has_value()) {
    const at::Tensor& g = *gamma;
    TORCH_CHECK(g.dim() == 1 && g.size(0) == ref.size(-1), op, ": gamma must have shape (",
                ref.size(-1), ",), got ", g.sizes());
    check_float(op, "gamma", g.scalar_type());
    TORCH_CHECK(g.device() == ref.device(), op, ": gamma is on ", g.device(), " but ", ref_name,
                " is on ", ref.device());
  }
  if (scale.has_value()) {
    const at::Tensor& s = *scale;
    TORCH_CHECK(s.dim() == 1 && s.size(0) == ref.size(0), op, ": scale must have shape (",
                ref.size(0), ",) (one DropPath factor per sample), got ", s.sizes());
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": scale dtype must be float32, got ",
                s.scalar_type());
    TORCH_CHECK(s.device() == ref.device(), op, ": scale is on ", s.device(), " but ", ref_name,
                " is on ", ref.device());
  }
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// gamma as the kernels read it: contiguous, and fp32 unless it has y's dtype (the two cases that
// occur: an fp32 parameter under autocast, or a model cast to half). Other mixes convert its
// C elements to fp32 rather than adding kernel variants.
at::Tensor kernel_gamma(const std::optional<at::Tensor>& gamma, const at::Tensor& y) {
  if (!gamma.has_value()) return at::Tensor();
  at::Tensor g = gamma->contiguous();
  return g.scalar_type() == at::kFloat || g.scalar_type() == y.scalar_type() ? g : g.to(at::kFloat);
}

constexpr const char* kFwd = "layerscale_residual_forward";
constexpr const char* kBwd = "layerscale_residual_backward";

// ---- forward -----------------------------------------------------------------------------

template <int VEC, typename XT, typename YT, typename GT, typename OT>
void launch_forward(const RowView& x, const RowView& y, const at::Tensor& gamma,
                    const at::Tensor& scale, at::Tensor& out, cudaStream_t stream) {
  const RowTiling t = row_tiling(x.C, VEC);
  const int64_t rows = x.rows();
  const int64_t blocks = (rows + t.ty - 1) / t.ty;
  TORCH_CHECK(blocks <= INT32_MAX && t.col_tiles <= 65535, kFwd, ": too large: ", rows,
              " rows of ", x.C);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(t.col_tiles));
  const dim3 block(t.tx, t.ty);
  layerscale_fwd_kernel<XT, YT, GT, OT, VEC><<<grid, block, 0, stream>>>(
      static_cast<const XT*>(x.t.const_data_ptr()), static_cast<const YT*>(y.t.const_data_ptr()),
      gamma.defined() ? static_cast<const GT*>(gamma.const_data_ptr()) : nullptr,
      scale.defined() ? static_cast<const float*>(scale.const_data_ptr()) : nullptr,
      static_cast<OT*>(out.data_ptr()), rows, x.N, x.C, x.sb, x.sn, y.sb, y.sn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor forward_meta(const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& gamma,
                        const std::optional<at::Tensor>& scale, at::ScalarType out_dtype) {
  check_common(kFwd, "x", x, y, gamma, scale);
  check_float(kFwd, "out_dtype", out_dtype);
  return at::empty(x.sizes(), x.options().dtype(out_dtype));
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& gamma_opt,
                        const std::optional<at::Tensor>& scale_opt, at::ScalarType out_dtype) {
  check_common(kFwd, "x", x, y, gamma_opt, scale_opt);
  check_float(kFwd, "out_dtype", out_dtype);
  check_cuda(kFwd, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));  // contiguous
  if (out.numel() == 0) return out;

  const RowView xv = row_view(x, "x"), yv = row_view(y, "y");
  const at::Tensor gamma = kernel_gamma(gamma_opt, y);
  const at::Tensor scale = scale_opt.has_value() ? scale_opt->contiguous() : at::Tensor();
  const bool vec = vec_ok(xv, kVec) && vec_ok(yv, kVec) && vec_ok(out, kVec) &&
                   (!gamma.defined() || vec_ok(gamma, kVec));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(x.scalar_type(), "x", [&](auto xt) {
    using XT = typename decltype(xt)::type;
    dispatch_float(y.scalar_type(), "y", [&](auto yt) {
      using YT = typename decltype(yt)::type;
      dispatch_float(out_dtype, "out_dtype", [&](auto ot) {
        using OT = typename decltype(ot)::type;
        // gamma is fp32 or y's dtype (kernel_gamma); without gamma the GT pointer is null.
        const bool gamma_is_y = gamma.defined() && gamma.scalar_type() != at::kFloat;
        if (gamma_is_y) {
          if (vec) launch_forward<kVec, XT, YT, YT, OT>(xv, yv, gamma, scale, out, stream);
          else launch_forward<1, XT, YT, YT, OT>(xv, yv, gamma, scale, out, stream);
        } else {
          if (vec) launch_forward<kVec, XT, YT, float, OT>(xv, yv, gamma, scale, out, stream);
          else launch_forward<1, XT, YT, float, OT>(xv, yv, gamma, scale, out, stream);
        }
      });
    });
  });
  return out;
}

// ---- backward ----------------------------------------------------------------------------

// Row strips of the backward: at most kRowBlocks, each a whole number of thread rows. A function
// of the shape only, so the summation order (and dgamma's bits) never changes between runs.
struct Strips {
  int64_t rows_per_block, count;
};

Strips row_strips(int64_t rows, const RowTiling& t) {
  int64_t rows_per_block = (rows + kRowBlocks - 1) / kRowBlocks;
  rows_per_block = (rows_per_block + t.ty - 1) / t.ty * t.ty;
  return Strips{rows_per_block, (rows + rows_per_block - 1) / rows_per_block};  // count in [1, kRowBlocks]
}

template <int VEC, typename DT, typename YT, typename GT>
void launch_backward(const RowView& d, const RowView* y, const at::Tensor& gamma,
                     const at::Tensor& scale, at::Tensor& dy, at::Tensor& partial,
                     const RowTiling& t, const Strips& strips, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(strips.count), static_cast<unsigned>(t.col_tiles));
  const dim3 block(t.tx, t.ty);
  layerscale_bwd_kernel<DT, YT, GT, VEC><<<grid, block, 0, stream>>>(
      static_cast<const DT*>(d.t.const_data_ptr()),
      y != nullptr ? static_cast<const YT*>(y->t.const_data_ptr()) : nullptr,
      gamma.defined() ? static_cast<const GT*>(gamma.const_data_ptr()) : nullptr,
      scale.defined() ? static_cast<const float*>(scale.const_data_ptr()) : nullptr,
      static_cast<YT*>(dy.data_ptr()),
      partial.defined() ? static_cast<float*>(partial.data_ptr()) : nullptr, d.rows(), d.N, d.C,
      d.sb, d.sn, y != nullptr ? y->sb : 0, y != nullptr ? y->sn : 0, strips.rows_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> backward_meta(const at::Tensor& dout, const at::Tensor& y,
                                                 const std::optional<at::Tensor>& gamma,
                                                 const std::optional<at::Tensor>& scale) {
  check_common(kBwd, "dout", dout, y, gamma, scale);
  return {at::empty(y.sizes(), y.options()),
          gamma.has_value() ? at::empty({gamma->size(0)}, gamma->options()) : at::empty({0}, y.options())};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& dout, const at::Tensor& y,
                                                 const std::optional<at::Tensor>& gamma_opt,
                                                 const std::optional<at::Tensor>& scale_opt) {
  check_common(kBwd, "dout", dout, y, gamma_opt, scale_opt);
  check_cuda(kBwd, "dout", dout);
  const c10::cuda::CUDAGuard guard(dout.device());
  at::Tensor dy = at::empty(y.sizes(), y.options());  // contiguous, y's dtype
  const at::Tensor gamma = kernel_gamma(gamma_opt, y);
  at::Tensor dgamma = gamma.defined() ? at::empty({gamma.size(0)}, gamma_opt->options())
                                      : at::empty({0}, y.options());
  if (dy.numel() == 0) {
    if (gamma.defined()) dgamma.zero_();  // a sum over no rows
    return {dy, dgamma};
  }

  const RowView dv = row_view(dout, "dout");
  RowView yv{};  // y is read only for dgamma: no view (or copy) without gamma
  if (gamma.defined()) yv = row_view(y, "y");
  const RowView* yp = gamma.defined() ? &yv : nullptr;
  const at::Tensor scale = scale_opt.has_value() ? scale_opt->contiguous() : at::Tensor();
  const bool vec = vec_ok(dv, kVec) && vec_ok(dy, kVec) &&
                   (!gamma.defined() || (vec_ok(yv, kVec) && vec_ok(gamma, kVec)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = dv.rows(), C = dv.C;
  const RowTiling t = row_tiling(C, vec ? kVec : 1);
  const Strips strips = row_strips(rows, t);
  TORCH_CHECK(t.col_tiles <= 65535, kBwd, ": too large: ", rows, " rows of ", C);
  at::Tensor partial;  // (strips, C) fp32 column sums, one row per strip
  if (gamma.defined()) partial = at::empty({strips.count, C}, dy.options().dtype(at::kFloat));

  dispatch_float(dout.scalar_type(), "dout", [&](auto dt) {
    using DT = typename decltype(dt)::type;
    dispatch_float(y.scalar_type(), "y", [&](auto yt) {
      using YT = typename decltype(yt)::type;
      const bool gamma_is_y = gamma.defined() && gamma.scalar_type() != at::kFloat;
      if (gamma_is_y) {
        if (vec) launch_backward<kVec, DT, YT, YT>(dv, yp, gamma, scale, dy, partial, t, strips, stream);
        else launch_backward<1, DT, YT, YT>(dv, yp, gamma, scale, dy, partial, t, strips, stream);
      } else {
        if (vec) launch_backward<kVec, DT, YT, float>(dv, yp, gamma, scale, dy, partial, t, strips, stream);
        else launch_backward<1, DT, YT, float>(dv, yp, gamma, scale, dy, partial, t, strips, stream);
      }
    });
  });
  if (!gamma.defined()) return {dy, dgamma};

  dispatch_float(dgamma.scalar_type(), "gamma", [&](auto gt) {  // gamma's own dtype
    using GT = typename decltype(gt)::type;
    const dim3 grid(static_cast<unsigned>((C + 31) / 32)), block(32, kColsumRows);
    layerscale_colsum_kernel<GT><<<grid, block, 0, stream>>>(
        static_cast<const float*>(partial.const_data_ptr()), static_cast<GT*>(dgamma.data_ptr()),
        strips.count, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dy, dgamma};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_C, m) {
  // out = x + gamma * y * scale[b] in fp32; out contiguous with x's shape.
  // x, y: (rows, C) or (B, ..., C), fp32/fp16/bf16, any row strides; gamma: (C,) fp32 or y's
  // dtype; scale: (B,) fp32 per-sample DropPath factors. dgamma is deterministic (no atomics),
  // in gamma's dtype, and an empty tensor when gamma is None; dy is contiguous, y's dtype.
  m.def("layerscale_residual_forward(Tensor x, Tensor y, Tensor? gamma, Tensor? scale, "
        "ScalarType out_dtype) -> Tensor");
  m.def("layerscale_residual_backward(Tensor dout, Tensor y, Tensor? gamma, Tensor? scale) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deit_fast_C, CUDA, m) {
  m.impl("layerscale_residual_forward", &forward_cuda);
  m.impl("layerscale_residual_backward", &backward_cuda);
}

// Shapes and dtypes without data: input checks and output metadata testable on any machine.
TORCH_LIBRARY_IMPL(deit_fast_C, Meta, m) {
  m.impl("layerscale_residual_forward", &forward_meta);
  m.impl("layerscale_residual_backward", &backward_meta);
}

}  // namespace deit_fast
