// Shared by every csrc/<op>.cu: fp32 math on fp32/fp16/bf16 storage, aligned vector access,
// dtype dispatch, and the (B, N, C) row view that lets strided inputs in without a copy.
//
// Lean includes on purpose: nvcc parses this translation unit once per target arch, so the
// whole of torch/extension.h would cost more than the kernels themselves.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace deit_fast {

// ---- device side -------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements as one aligned unit: 16 B (one LDG.128) for 8 halves, 32 B (two) for
// 8 floats. Only dereferenced at addresses the host has checked to be VEC * sizeof(T) aligned.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// cp.async (sm_80+): copies that land in shared memory without passing through registers, so
// the compiler cannot delay them to shorten register lifetimes, as it does with early loads.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1. bytes = 0 reads nothing and writes 16 zero bytes.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_float(v.v[j]);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(in[0]);
  } else {
    Vec<T, VEC> v;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(in[j]);
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
  }
}

// Row r of a (B, N, C) view -> (b, n). 32-bit division when the row count allows (the common
// case; 64-bit division is a long instruction sequence), 64-bit otherwise. `rows` is uniform.
__device__ __forceinline__ void split_row(int64_t r, int64_t rows, int64_t N, int64_t& b, int64_t& n) {
  if (rows <= static_cast<int64_t>(UINT32_MAX)) {
    const uint32_t q = static_cast<uint32_t>(r) / static_cast<uint32_t>(N);
    b = q;
    n = r - static_cast<int64_t>(q) * N;
  } else {
    b = r / N;
    n = r - b * N;
  }
}

// The second, deterministic stage of the column reductions (dgamma, dweight, dbias): the first
// stage leaves one fp32 row of partial sums per row strip; here out[c] = sum over p < P of
// part[p * C + c], for the 32 columns of blockIdx.x, always in the same order (thread row y adds
// p = y, y + kColsumRows, ..., then row 0 adds the kColsumRows sums). Block (32, kColsumRows).
constexpr int kColsumRows = 8;

template <typename T>
__device__ __forceinline__ void column_sum(const float* __restrict__ part, T* __restrict__ out,
                                           int64_t P, int64_t C) {
  __shared__ float red[kColsumRows][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.f;
  if (c < C) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < P; p += kColsumRows) s += part[p * C + c];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < kColsumRows; ++k) t += red[k][threadIdx.x];
    out[c] = from_float<T>(t);
  }
}

// ---- host side ---------------------------------------------------------------------------

template <typename T> struct Tag { using type = T; };

inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The kernels' storage dtypes; anything else is an error naming op and argument.
inline void check_float(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK(is_kernel_float(t), op, ": ", name, " dtype must be float32, float16 or bfloat16, got ", t);
}

// f(Tag<cuda type>{}) for an fp32/fp16/bf16 ScalarType; anything else is an error naming `name`.
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, name, " dtype must be float32, float16 or bfloat16, got ", t);
  }
}

// A (rows, C) or (B, ..., C) tensor seen as (B, N, C) with strides (sb, sn, 1). A view when one
// exists (q/k/v-style slices, transposed (N, B) layouts), else a contiguous copy. Strides of
// size-1 dims are zeroed: they are never used, and must not spoil the alignment test.
struct RowView {
  at::Tensor t;  // keeps a copy alive when one was needed
  int64_t B, N, C, sb, sn;
  int64_t rows() const { return B * N; }
};

inline RowView row_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, name, " must be (rows, C) or (B, ..., C), got shape ", t.sizes());
  const int64_t B = t.size(0), C = t.size(-1);
  int64_t N = 1;
  for (int64_t d = 1; d + 1 < t.dim(); ++d) N *= t.size(d);
  at::Tensor v = t.dim() == 3 ? t : t.reshape({B, N, C});  // a view whenever strides allow
  if (C > 1 && v.stride(2) != 1) v = v.contiguous();
  TORCH_CHECK(C <= 1 || v.stride(2) == 1, name, " last-dim stride must be 1 after reshape, got ",
              v.stride(2));
  return RowView{v, B, N, C, B > 1 ? v.stride(0) : 0, N > 1 ? v.stride(1) : 0};
}

inline bool ptr_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Whether VEC-wide vector access is legal for a view: every vector starts at a multiple of VEC
// elements from a VEC * itemsize aligned base.
inline bool vec_ok(const RowView& v, int vec) {
  return v.C % vec == 0 && v.sb % vec == 0 && v.sn % vec == 0 &&
         ptr_aligned(v.t.data_ptr(), vec * static_cast<int64_t>(v.t.element_size()));
}

inline bool vec_ok(const at::Tensor& contiguous, int vec) {
  return contiguous.numel() % vec == 0 &&
         ptr_aligned(contiguous.data_ptr(), vec * static_cast<int64_t>(contiguous.element_size()));
}

// Thread-block shape of the row kernels: TX threads across the C / VEC column vectors of a row
// (several column tiles when a row has more than 256 vectors), TY rows per block, TX * TY <= 256.
// Sized to the row so that no lane idles at ViT widths (C = 192 in bf16: 24 x 10 threads).
struct RowTiling {
  int tx, ty;
  int64_t col_tiles;
};

inline RowTiling row_tiling(int64_t C, int vec) {
  TORCH_INTERNAL_ASSERT(C > 0, "row_tiling needs C > 0: return before launching on empty tensors");
  constexpr int64_t kThreads = 256;
  const int64_t vectors = (C + vec - 1) / vec;
  const int64_t tiles = (vectors + kThreads - 1) / kThreads;
  const int64_t tx = (vectors + tiles - 1) / tiles;  // in [1, 256]
  const int64_t ty = kThreads / tx;                  // >= 1
  return RowTiling{static_cast<int>(tx), static_cast<int>(ty), tiles};
}

}  // namespace deit_fast
