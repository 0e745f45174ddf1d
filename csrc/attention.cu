// Flash-attention forward on tensor cores for head dim 48 and 64, fp16/bf16 (DESIGN.md section 3),
// the forward of deit_fast.ops.attention on the `cuda` backend. Schema: the
// TORCH_LIBRARY_FRAGMENT at the end.
//
//   o[b, h, i, :] = sum_j softmax_j(q[b, h, i, :] . k[b, h, j, :] * scale) v[b, h, j, :]
//   lse[b, h, i]  = log2 sum_j exp2(q . k * scale * log2(e))      (log2 units, fp32)
//
// lse is exactly what the Triton forward (kernels/attention.py) saves, in the same contiguous
// (B, H, N) layout, so the Triton backward runs unchanged on this forward's o and lse.
//
// Why a hand-written kernel: CaiT's head dim 48 is 3 k-steps of m16n8k16 for q k^T and 6 n-tiles
// of 8 for p v, so nothing is padded to 64 (FlashAttention-2/3 and a power-of-two Triton block
// would do 33 % more math and loads). fp32 inputs and other head dims are not handled here: the
// Python op sends them to the Triton forward.
//
// Structure: one CTA of WARPS warps (4 or 8) per (batch * head, block of 64 or 128 queries, the
// op's block_m); warp w owns R blocks of 16 query rows (the op's rows_per_warp, 16, or 32 at
// block_m 128) from 16 R w and keeps their q fragments, running max / sum and output in
// registers. Keys and values stream through shared memory in tiles of 64, through a ring of
// STAGES buffers (2 to 4, the op's stages) filled by cp.async; rows past N are zero-filled by
// cp.async and masked to -inf in the logits, and 16-key chunks wholly past N skip their mma
// (N = 197 computes 208 key columns per query, not 256). 128 queries per CTA read each head's
// k and v from L2 half as often as 64 do (at N = 197, 2 CTAs per head instead of 4).
// q, k, v are read through (batch, head, row) strides with a unit last stride, so views of the
// (B, N, 3, H, D) qkv projection go in without a copy. o is (B, H, N, D) laid out (B, N, H, D) in
// memory, as FlashAttention writes it: the blocks' head merge o.transpose(1, 2).reshape(B, N, C)
// is then a view, not a copy kernel.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16/.bf16 and ldmatrix) are in the helpers below.
// Every reduction has a fixed order: the result is bitwise reproducible.
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace deit_fast {
namespace {

constexpr int kBlockN = 64;           // keys per shared-memory tile
constexpr int kStepN = 32;            // keys per online-softmax step (register footprint)
constexpr int kPad = 8;               // elements added to each shared row (see smem_stride)
constexpr int64_t kMaxN = int64_t{1} << 30;  // row indices stay in int; offsets are int64
constexpr int64_t kMaxRowStride = int64_t{1} << 24;  // 128 rows of it stay within int32

// Shared rows are D + 8 elements (112 B at D = 48, 144 B at D = 64): the 8 rows that one
// ldmatrix 8x8 matrix reads then start in 8 different 16-byte bank groups (no conflicts), and
// every row start stays 16-byte aligned for cp.async and ldmatrix.
template <int D>
constexpr int smem_stride() { return D + kPad; }

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;      // (B, H, N, D) with (B, N, H, D) memory order
  float* lse;   // (B, H, N) contiguous
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;  // batch and head strides, elements
  int q_sn, k_sn, v_sn;  // row strides, elements: < kMaxRowStride, so in-tile offsets are 32-bit
  int H, N, m_blocks;
  float qk_scale;  // scale * log2(e): the logits go straight into exp2
};

// ---- PTX wrappers ------------------------------------------------------------------------

// ldmatrix.x4: lanes 8i .. 8i+7 give the addresses of rows 0..7 of 8x8 matrix i (16 bytes each);
// register i of lane L then holds matrix i's row L/4, columns 2(L%4) and 2(L%4)+1 (low half = the
// lower column). With .trans it holds rows 2(L%4) and 2(L%4)+1 of column L/4 instead.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators. With g = lane / 4, t = lane % 4:
//   a[0]: A[g][2t, 2t+1]   a[1]: A[g+8][2t, 2t+1]   a[2]: A[g][2t+8, 2t+9]   a[3]: A[g+8][2t+8, 2t+9]
//   b0:   B[2t, 2t+1][g]   b1:   B[2t+8, 2t+9][g]
//   d[0], d[1]: D[g][2t, 2t+1]                       d[2], d[3]: D[g+8][2t, 2t+1]
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one 32-bit register of T: `lo` in the low half (the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The MUFU exp2 the Triton kernel uses too; exp2(-inf) = +0, which is how masked keys vanish.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- lane -> ldmatrix row address (row within a 16-row block, column within a 16-col block) --
//
// A operand (q rows x d), and V for p v (keys x d, loaded .trans): matrix i = lane / 8 covers
// rows 8 (i % 2) .. +7 and columns 8 (i / 2) .. +7, so registers 0..3 are a[0..3] of the table
// above for q; for V they are b0, b1 of d-tile 0 (columns 0..7), then b0, b1 of d-tile 1.
__device__ __forceinline__ int ldsm_rows_then_cols_row(int lane) { return (lane & 7) + (lane & 8); }
__device__ __forceinline__ int ldsm_rows_then_cols_col(int lane) { return (lane & 16) >> 1; }
// K for q k^T (keys x d, not transposed: B[d][key] = K[key][d] is "col" layout already):
// matrix i covers keys 8 (i / 2) .. +7 and d columns 8 (i % 2) .. +7, so registers 0..3 are
// b0, b1 of key tile 0 (keys 0..7), then b0, b1 of key tile 1 (keys 8..15).
__device__ __forceinline__ int ldsm_cols_then_rows_row(int lane) { return (lane & 7) + ((lane & 16) >> 1); }
__device__ __forceinline__ int ldsm_cols_then_rows_col(int lane) { return lane & 8; }

// ---- kernel ------------------------------------------------------------------------------

// Copies rows [0, min(rows_left, ROWS)) of a ROWS x D tile starting at `g` (row stride `ld`) to
// shared memory at `dst` (row stride smem_stride<D>()); rows at or past rows_left become zeros.
// `g` itself is always a valid row, so the zero-byte copies point at it.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* __restrict__ g, int ld,
                                          int rows_left, int tid) {
  constexpr int kVecs = D / 8;  // 16-byte vectors per row
  constexpr int kTotal = ROWS * kVecs;
  // When a row's vectors divide the block (D = 64), spelled so that the column and the row
  // offset are visibly loop-invariant.
  constexpr bool kWhole = THREADS % kVecs == 0;
#pragma unroll
  for (int i = 0; i < (kTotal + THREADS - 1) / THREADS; ++i) {
    const int c = tid + i * THREADS;  // vector c of the tile
    // The last round is partial where THREADS does not divide the tile (D = 48, 256 threads).
    if (kTotal % THREADS != 0 && c >= kTotal) break;
    const int row = kWhole ? tid / kVecs + i * (THREADS / kVecs) : c / kVecs;
    const int col = (kWhole ? tid % kVecs : c % kVecs) * 8;
    const bool ok = row < rows_left;
    const T* src = ok ? g + row * ld + col : g;
    cp_async_16(dst + (row * smem_stride<D>() + col) * 2, src, ok ? 16 : 0);
  }
}

// Running softmax state of one warp's 16 rows: this lane holds rows g and g + 8.
template <int D>
struct RowState {
  float acc[D / 8][4];  // o accumulators: d-tile n, layout of mma d[]
  float m[2];           // running max of the log2-scaled logits
  float l[2];           // this lane's partial row sums (the quad is summed once, at the end)
};

// kStepN keys of the current tile for one warp and its R blocks of 16 query rows: s = q k^T,
// online softmax, acc += p v. The tile (kBlockN keys, one barrier) is consumed in steps of kStepN
// so that the logits of only kStepN keys are live at once. Each k and v fragment is read from
// shared memory once and used for all R row blocks (ldmatrix traffic per MMA / R). MASK: only
// `valid` < kStepN of these keys are real (the last tile); 16-key chunks wholly past them skip
// their mma. Row blocks from `live` on lie wholly past N (the last query tile): skipped too.
template <typename T, int D, int R, bool MASK>
__device__ __forceinline__ void key_step(const uint32_t (&qf)[R][D / 16][4], uint32_t k_lane,
                                         uint32_t v_lane, int valid, int live, int lane,
                                         float qk_scale, RowState<D> (&st)[R]) {
  constexpr int kRowBytes = smem_stride<D>() * 2;
  constexpr float kNegInf = -INFINITY;
  float s[R][kStepN / 8][4];  // row block r, key tile n (8 keys), layout of mma d[]

#pragma unroll
  for (int c = 0; c < kStepN / 16; ++c) {
    if (MASK && c * 16 >= valid) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[r][2 * c][e] = s[r][2 * c + 1][e] = kNegInf;
      }
      continue;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[r][2 * c][e] = s[r][2 * c + 1][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[4];
      ldsm_x4(b, k_lane + c * 16 * kRowBytes + kk * 32);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (R > 1 && r >= live) break;  // warp-uniform
        mma_16816<T>(s[r][2 * c], qf[r][kk], b[0], b[1]);
        mma_16816<T>(s[r][2 * c + 1], qf[r][kk], b[2], b[3]);
      }
    }
  }

  // The max is taken on the unscaled logits and scaled once per row (qk_scale > 0), so that the
  // scale rides in the FFMA of the exponent below: one instruction less per score, in a loop
  // bound by instruction issue more than by its MMAs (kernels/attention.py says why).
  const int t = lane & 3;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (R > 1 && r >= live) break;
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int n = 0; n < kStepN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (MASK && n * 8 + 2 * t + (e & 1) >= valid) s[r][n][e] = kNegInf;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[r][n][e]);
      }
    }
    // The 4 lanes of a quad hold all the columns of the same two rows.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      mx[h] = fmaxf(st[r].m[h], mx[h] * qk_scale);
    }
    // Column 0 of every tile is a real key and the logits are finite, so mx is finite: on the
    // first tile m = -inf gives alpha = exp2(-inf) = 0, never inf - inf.
    float alpha[2], rowsum[2] = {0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      alpha[h] = exp2_approx(st[r].m[h] - mx[h]);
      st[r].m[h] = mx[h];
    }
#pragma unroll
    for (int n = 0; n < kStepN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[r][n][e] = exp2_approx(fmaf(s[r][n][e], qk_scale, -mx[e >> 1]));
        rowsum[e >> 1] += s[r][n][e];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) st[r].l[h] = st[r].l[h] * alpha[h] + rowsum[h];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[r].acc[n][e] *= alpha[e >> 1];
    }
  }

  // p as the A operand: the accumulators of key tiles 2c and 2c + 1 are exactly a[0..3] of the
  // 16 x 16 block of keys [16c, 16c + 16) (rows g / g + 8, columns 2t.. / 2t + 8..).
#pragma unroll
  for (int c = 0; c < kStepN / 16; ++c) {
    if (MASK && c * 16 >= valid) continue;
    uint32_t a[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      a[r][0] = pack2<T>(s[r][2 * c][0], s[r][2 * c][1]);
      a[r][1] = pack2<T>(s[r][2 * c][2], s[r][2 * c][3]);
      a[r][2] = pack2<T>(s[r][2 * c + 1][0], s[r][2 * c + 1][1]);
      a[r][3] = pack2<T>(s[r][2 * c + 1][2], s[r][2 * c + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      ldsm_x4_trans(b, v_lane + c * 16 * kRowBytes + dd * 32);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (R > 1 && r >= live) break;
        mma_16816<T>(st[r].acc[2 * dd], a[r], b[0], b[1]);
        mma_16816<T>(st[r].acc[2 * dd + 1], a[r], b[2], b[3]);
      }
    }
  }
}

// Shared memory of one CTA: STAGES buffers [k][v] of 64 rows each (36 KB at D = 64 with 2).
template <int D, int STAGES>
constexpr int smem_bytes() { return STAGES * 2 * kBlockN * smem_stride<D>() * 2; }

// Blocks per SM the launch bounds ask for: 16 warps an SM at one 16-row block a warp (128
// registers a thread). At two, the second block's q fragments, logits and o accumulators take
// 24 + 16 + 24 more registers at D = 48: 12 warps (168 registers, no spill at sm_80 / sm_90);
// at D = 64 ptxas spilled 32 bytes at 168, so 8 warps (up to 255).
template <int D, int WARPS, int R>
constexpr int min_blocks() { return (R == 1 ? 16 : D <= 48 ? 12 : 8) / WARPS; }

// Grid: m_blocks * B * H CTAs of 32 * WARPS threads; CTA x handles queries
// [16 R WARPS (x % m_blocks), +16 R WARPS) of (batch, head) x / m_blocks, so the CTAs that share
// one head's k and v run side by side; warp w owns R blocks of 16 of them from 16 R w. At R = 1,
// 16 warps per SM (4 CTAs of 4 warps, 2 of 8) cap registers at 128 per thread (D = 64 fits with
// no spill: only 32 keys of logits are live at once). R = 2 is FlashAttention-2's split of 128
// queries over 4 warps: every k and v fragment a warp reads from shared memory feeds twice the
// MMAs, and each warp has two independent chains of them, at 12 warps an SM at D = 48
// (8 at D = 64: min_blocks).
// STAGES - 1 key / value tiles are in flight while one is computed: 2 is double buffering; 4
// requests the whole of k and v at N <= 256 (4 tiles, 197 included) before the first tile is
// computed, for more bytes in flight per SM at the price of shared memory (57 KB at D = 48).
// (An H100 tune of the Triton forward favoured 128 queries and 3 stages over 64 and 2 by
// 1.2-1.4x at N = 197: bench/results/2026-11-26-nvidia-h100-tune.md.)
template <typename T, int D, int WARPS, int STAGES, int R>
__global__ void __launch_bounds__(32 * WARPS, (min_blocks<D, WARPS, R>()))
    attention_fwd_kernel(const FwdParams p) {
  constexpr int kThreads = 32 * WARPS, kWarpRows = 16 * R, kBlockM = kWarpRows * WARPS;
  constexpr int kStride = smem_stride<D>();
  constexpr uint32_t kTileBytes = kBlockN * kStride * 2;
  static_assert(STAGES >= 2, "a buffer is computed while the next fills");
  static_assert(kBlockM <= 2 * kBlockN, "the q tile and the o staging fit in one k + v buffer");
  // The q tile arrives in the last buffer, which the prefetch of key tile STAGES - 1 overwrites
  // only after every warp has read its q fragments (the first barrier of the loop); the
  // epilogue stages o in a buffer that the last tile did not use.
  extern __shared__ __align__(16) uint16_t smem[];
  const uint32_t sk = smem_addr(smem), sv = sk + kTileBytes;  // buffer 0; buffer s is 2 s tiles on
  const uint32_t sq = sk + (STAGES - 1) * 2 * kTileBytes;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m_block = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.m_blocks));
  const int64_t bh = blockIdx.x / static_cast<unsigned>(p.m_blocks);
  const int64_t b = bh / p.H, h = bh % p.H;
  const int N = p.N, q0 = m_block * kBlockM;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t{q0} * p.q_sn;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const int n_tiles = (N + kBlockN - 1) / kBlockN;
  // Key / value tile j into buffer j % STAGES, then one commit group, empty past the last tile:
  // tile j is then always the (j + 2)-th group, which the waits below count on.
  auto load_kv = [&](int j) {
    if (j < n_tiles) {
      const int first = j * kBlockN;
      const uint32_t buf = (j % STAGES) * 2 * kTileBytes;
      load_tile<T, D, kBlockN, kThreads>(sk + buf, k + int64_t{first} * p.k_sn, p.k_sn, N - first, tid);
      load_tile<T, D, kBlockN, kThreads>(sv + buf, v + int64_t{first} * p.v_sn, p.v_sn, N - first, tid);
    }
    cp_async_commit();
  };

  // Group 0: the q tile; groups 1 .. STAGES - 1: key / value tiles 0 .. STAGES - 2.
  load_tile<T, D, kBlockM, kThreads>(sq, q, p.q_sn, N - q0, tid);
  cp_async_commit();
#pragma unroll
  for (int j = 0; j < STAGES - 1; ++j) load_kv(j);

  // This warp's 16-row blocks that hold a query before N (warp-uniform): warps with none (N = 197
  // at 64 queries per CTA: 3 of the last CTA's 4) only help load; a warp with some computes those.
  const int w0 = q0 + warp * kWarpRows;
  const int live = w0 >= N ? 0 : min(R, (N - w0 + 15) / 16);
  const bool active = live > 0;
  const uint32_t q_lane = sq + ((warp * kWarpRows + ldsm_rows_then_cols_row(lane)) * kStride +
                                ldsm_rows_then_cols_col(lane)) * 2;
  const uint32_t k_lane = sk + (ldsm_cols_then_rows_row(lane) * kStride + ldsm_cols_then_rows_col(lane)) * 2;
  const uint32_t v_lane = sv + (ldsm_rows_then_cols_row(lane) * kStride + ldsm_rows_then_cols_col(lane)) * 2;

  uint32_t qf[R][D / 16][4];  // q fragments (A operand), per row block and 16-wide d step
  cp_async_wait<STAGES - 1>();  // the q group; the STAGES - 1 tile groups after it may be pending
  __syncthreads();
  if (active) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[r][kk], q_lane + r * 16 * kStride * 2 + kk * 32);
    }
  }

  RowState<D> st[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[r].acc[n][e] = 0.f;
    }
    st[r].m[0] = st[r].m[1] = -INFINITY;
    st[r].l[0] = st[r].l[1] = 0.f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    // Tile j has landed for every thread (of the groups after it, STAGES - 2 may be pending), and
    // every warp is done with tile j - 1, whose buffer the prefetch of tile j + STAGES - 1 then
    // overwrites while tile j is computed: one barrier per tile.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    load_kv(j + STAGES - 1);
    if (!active) continue;  // warp-uniform; the warp still reaches every barrier
    const uint32_t buf = (j % STAGES) * 2 * kTileBytes;
    const int valid = N - j * kBlockN;
#pragma unroll
    for (int i = 0; i < kBlockN / kStepN; ++i) {
      const uint32_t off = buf + i * kStepN * kStride * 2;
      if (valid >= kBlockN) {
        key_step<T, D, R, false>(qf, k_lane + off, v_lane + off, kStepN, live, lane, p.qk_scale, st);
      } else if (i * kStepN < valid) {
        key_step<T, D, R, true>(qf, k_lane + off, v_lane + off, valid - i * kStepN, live, lane,
                                p.qk_scale, st);
      }
    }
  }
  if (!active) return;

  // Epilogue: full row sums, lse, and o / l staged through shared memory so that global stores
  // are whole 16-byte vectors. This warp's 16 R rows of buffer n_tiles % STAGES, which the last
  // tile did not use: every copy has landed (the last wait covered tile n_tiles - 1, and no tile
  // comes after it), and the other warps are past every use of it but the last tile's.
  const int g = lane >> 2, t = lane & 3;
  uint16_t* stage = smem + ((n_tiles % STAGES) * 2 * kBlockN + warp * kWarpRows) * kStride;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r >= live) break;  // rows past N: nothing to store
    float inv[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      st[r].l[hf] += __shfl_xor_sync(0xffffffffu, st[r].l[hf], 1);
      st[r].l[hf] += __shfl_xor_sync(0xffffffffu, st[r].l[hf], 2);
      inv[hf] = 1.f / st[r].l[hf];
      const int row = w0 + 16 * r + g + 8 * hf;
      if (t == 0 && row < N) p.lse[bh * N + row] = st[r].m[hf] + log2f(st[r].l[hf]);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        *reinterpret_cast<uint32_t*>(stage + (16 * r + g + 8 * hf) * kStride + n * 8 + 2 * t) =
            pack2<T>(st[r].acc[n][2 * hf] * inv[hf], st[r].acc[n][2 * hf + 1] * inv[hf]);
      }
    }
  }
  __syncwarp();
  const int64_t row_stride = static_cast<int64_t>(p.H) * D;  // token-major: rows H * D apart
  T* o = static_cast<T*>(p.o) + (b * N + w0) * row_stride + h * D;
  constexpr int kVecs = D / 8;
  static_assert((kWarpRows * kVecs) % 32 == 0, "every lane stores the same number of vectors");
#pragma unroll
  for (int it = 0; it < kWarpRows * kVecs / 32; ++it) {
    const int i = lane + 32 * it;
    const int r = i / kVecs, c = (i % kVecs) * 8;
    if (w0 + r < N) {
      *reinterpret_cast<uint4*>(o + r * row_stride + c) =
          *reinterpret_cast<const uint4*>(stage + r * kStride + c);
    }
  }
}

// ---- input checks (shared by the CUDA and Meta kernels) ----------------------------------

constexpr const char* kOp = "attention_forward";

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                  int64_t block_m, int64_t stages, int64_t rows_per_warp) {
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be (B, H, N, D), got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), kOp, ": k must have q's shape ", q.sizes(),
              " (self-attention: as many keys as queries), got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), kOp, ": v must have q's shape ", q.sizes(), ", got ", v.sizes());
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16, kOp,
              ": q dtype must be float16 or bfloat16 (fp32 runs on the Triton forward), got ", t);
  TORCH_CHECK(k.scalar_type() == t, kOp, ": k dtype must be q's (", t, "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == t, kOp, ": v dtype must be q's (", t, "), got ", v.scalar_type());
  TORCH_CHECK(q.size(3) == 48 || q.size(3) == 64, kOp,
              ": q head dim D must be 48 or 64 (others run on the Triton forward), got ", q.size(3));
  TORCH_CHECK(q.size(2) <= kMaxN, kOp, ": q has N=", q.size(2), " rows, more than ", kMaxN);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, kOp, ": scale must be a positive finite float, got ",
              scale);
  TORCH_CHECK(block_m == 64 || block_m == 128, kOp,
              ": block_m (queries per CTA) must be 64 or 128, got ", block_m);
  TORCH_CHECK(stages >= 2 && stages <= 4, kOp,
              ": stages (key / value tiles in shared memory) must be 2, 3 or 4, got ", stages);
  TORCH_CHECK(rows_per_warp == 16 || rows_per_warp == 32, kOp,
              ": rows_per_warp (queries each warp owns) must be 16 or 32, got ", rows_per_warp);
  TORCH_CHECK(rows_per_warp == 16 || block_m == 128, kOp,
              ": rows_per_warp=32 needs block_m=128 (4 warps), got block_m=", block_m);
  TORCH_CHECK(k.device() == q.device(), kOp, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(v.device() == q.device(), kOp, ": v is on ", v.device(), " but q is on ", q.device());
}

std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& q) {
  return {at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2),
          at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, double scale, int64_t block_m,
                                                int64_t stages, int64_t rows_per_warp) {
  check_inputs(q, k, v, scale, block_m, stages, rows_per_warp);
  return empty_outputs(q);
}

// t as the kernel reads it: unit last stride, (batch, head, row) strides that keep every row
// 16-byte aligned from a 16-byte aligned base (cp.async). The qkv-projection views of the models
// qualify; anything else is copied. Strides of size-1 dims are never multiplied by a nonzero
// index: zeroed, so they cannot spoil the test.
struct HeadView {
  at::Tensor t;
  int64_t sb, sh, sn;
};

HeadView head_view(const at::Tensor& t) {
  auto stride = [&](const at::Tensor& x, int d) { return x.size(d) > 1 ? x.stride(d) : 0; };
  const bool ok = t.stride(3) == 1 && stride(t, 0) % 8 == 0 && stride(t, 1) % 8 == 0 &&
                  stride(t, 2) % 8 == 0 && stride(t, 2) < kMaxRowStride &&
                  ptr_aligned(t.const_data_ptr(), 16);
  const at::Tensor x = ok ? t : t.clone(at::MemoryFormat::Contiguous);  // a fresh, aligned tensor
  return HeadView{x, stride(x, 0), stride(x, 1), stride(x, 2)};
}

// Past 48 KB of shared memory a kernel must opt in, once per device (cudaFuncSetAttribute applies
// to the current device's context); setting it twice is harmless, so no lock.
constexpr int kMaxDevices = 64;

template <typename T, int D, int WARPS, int STAGES, int R>
void launch(const FwdParams& p, int64_t blocks, cudaStream_t stream, int device) {
  constexpr int kBytes = smem_bytes<D, STAGES>();
  const auto kernel = attention_fwd_kernel<T, D, WARPS, STAGES, R>;
  if constexpr (kBytes > 48 * 1024) {
    static std::atomic<bool> opted_in[kMaxDevices];
    TORCH_CHECK(device >= 0 && device < kMaxDevices, kOp, ": device index ", device, " past ", kMaxDevices);
    if (!opted_in[device].load(std::memory_order_relaxed)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
      opted_in[device].store(true, std::memory_order_relaxed);
    }
  }
  kernel<<<static_cast<unsigned>(blocks), 32 * WARPS, kBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, double scale,
                                                int64_t block_m, int64_t stages,
                                                int64_t rows_per_warp) {
  check_inputs(q_in, k_in, v_in, scale, block_m, stages, rows_per_warp);
  TORCH_CHECK(q_in.is_cuda(), kOp, ": q must be a CUDA tensor, got device ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto [o, lse] = empty_outputs(q_in);
  if (o.numel() == 0) return {o, lse};

  const HeadView q = head_view(q_in), k = head_view(k_in), v = head_view(v_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  const int64_t m_blocks = (N + block_m - 1) / block_m;
  const int64_t blocks = m_blocks * B * H;
  TORCH_CHECK(blocks <= INT32_MAX, kOp, ": too large: B * H = ", B * H, " heads of ", N, " rows");
  FwdParams p{q.t.const_data_ptr(), k.t.const_data_ptr(), v.t.const_data_ptr(), o.data_ptr(),
              lse.data_ptr<float>(), q.sb, q.sh, k.sb, k.sh, v.sb, v.sh,
              static_cast<int>(q.sn), static_cast<int>(k.sn), static_cast<int>(v.sn),
              static_cast<int>(H), static_cast<int>(N), static_cast<int>(m_blocks),
              static_cast<float>(scale) * 1.4426950408889634f};  // as the Triton kernel rounds it
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool half = q_in.scalar_type() == at::kHalf;
  // One instantiation per (dtype, head dim, warps, stages, row blocks a warp): a runtime switch
  // over compile-time tiles. Warps = block_m / rows_per_warp: 4 or 8.
  const int device = q_in.get_device();
  auto go = [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    auto with_tiling = [&](auto warps, auto r) {
      constexpr int kW = decltype(warps)::value, kR = decltype(r)::value;
      if (stages == 2) launch<T, kD, kW, 2, kR>(p, blocks, stream, device);
      if (stages == 3) launch<T, kD, kW, 3, kR>(p, blocks, stream, device);
      if (stages == 4) launch<T, kD, kW, 4, kR>(p, blocks, stream, device);
    };
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    if (rows_per_warp == 32) {
      with_tiling(std::integral_constant<int, 4>{}, I2{});  // block_m 128 (checked)
    } else {
      block_m == 64 ? with_tiling(std::integral_constant<int, 4>{}, I1{})
                    : with_tiling(std::integral_constant<int, 8>{}, I1{});
    }
  };
  using D48 = std::integral_constant<int, 48>;
  using D64 = std::integral_constant<int, 64>;
  if (D == 48) {
    half ? go(__half{}, D48{}) : go(__nv_bfloat16{}, D48{});
  } else {
    half ? go(__half{}, D64{}) : go(__nv_bfloat16{}, D64{});
  }
  return {o, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deit_fast_C, m) {
  // Self-attention forward: q, k, v (B, H, N, D), fp16 or bf16, D 48 or 64, any (batch, head,
  // row) strides; block_m queries per CTA, 64 or 128; stages key / value tiles in shared
  // memory, 2 to 4; rows_per_warp queries each warp owns, 16 or 32 (32 at block_m 128 only:
  // block_m / rows_per_warp warps). Returns o (B, H, N, D) in q's dtype, (B, N, H, D) in memory, and lse
  // (B, H, N) fp32, the per-row log2-sum-exp2 of the logits * scale * log2(e) that the Triton
  // backward takes.
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float scale, int block_m=64, int stages=2, "
        "int rows_per_warp=16) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deit_fast_C, CUDA, m) { m.impl("attention_forward", &forward_cuda); }

// Shapes and dtypes without data: input checks and output metadata testable on any machine.
TORCH_LIBRARY_IMPL(deit_fast_C, Meta, m) { m.impl("attention_forward", &forward_meta); }

}  // namespace deit_fast
