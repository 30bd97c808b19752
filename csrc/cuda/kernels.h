// Parameters and launchers of the fused CUDA attention kernels. No torch header: the binding
// (binding.cpp) checks tensors and fills these structs; the .cu files only see raw pointers.
//
// Layout contract (the binding enforces it): every (B, H, S, D) tensor of one call shares the strides
// below and has unit stride in D; lse is (B, H, S) contiguous float32; masks are (B, S) contiguous bool;
// gradient outputs are float32 workspaces of the (B, H, S, D) shape, zero-initialised by the caller
// (dK/dV are accumulated with atomics, see the backward engine below), cast to the input dtype afterwards.
//
// The second half of this header (only seen by nvcc) is the tile engine both .cu files share: the
// FlashAttention-2 forward/backward loop over one query tile, parameterised by a "pattern" object that
// says which rows the CTA owns, which key tiles it visits and which (query, key) pairs are inside the
// pattern. The index arithmetic of the patterns lives in csrc/common/tile_index.h, tested on the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/philox.h"

namespace etkd {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shape and strides (in elements) shared by all (B, H, S, D) tensors of a call.
struct AttnShape {
  DType dtype;
  int batch;
  int heads;
  int seq;
  int head_dim;  // 32, 64 or 128
  int64_t stride_b;
  int64_t stride_h;
  int64_t stride_s;
  float scale;
  // Dropout on the attention probabilities (csrc/common/philox.h); `enabled` false: the dropout-free kernels.
  etkd::rng::Dropout dropout;
};

// ---- sliding window -------------------------------------------------------------------------------------
struct SlidingWindowArgs {
  AttnShape shape;
  int half;  // window / 2
  const void* q;
  const void* k;
  const void* v;
  // Global projections for global query rows; equal to q/k/v when the caller has none.
  const void* qg;
  const void* kg;
  const void* vg;
  const bool* key_padding_mask;  // (B, S), true = real; nullptr = all real
  const bool* global_mask;       // (B, S); nullptr = no global tokens
  const int* global_idx;         // (B, max_global) compact list of global positions
  const int* global_count;       // (B,)
  int max_global;                // 0 when there are no global tokens
};

struct SlidingWindowFwdParams {
  SlidingWindowArgs args;
  void* out;   // (B, H, S, D), input dtype
  float* lse;  // (B, H, S)
};

struct SlidingWindowBwdParams {
  SlidingWindowArgs args;
  const void* grad_out;  // (B, H, S, D)
  const void* out;       // saved forward output
  const float* lse;      // saved forward lse
  // float32 workspaces, zero-initialised. dqg/dkg/dvg may alias dq/dk/dv (no separate projections).
  float* dq;
  float* dk;
  float* dv;
  float* dqg;
  float* dkg;
  float* dvg;
};

// ---- block sparse ---------------------------------------------------------------------------------------
struct BlockSparseArgs {
  AttnShape shape;  // seq == nqb * block_size == nkb * block_size
  int block_size;
  const void* q;
  const void* k;
  const void* v;
  const bool* key_padding_mask;  // (B, S) or nullptr
  const int* lut;                // (heads_lut, nqb, max_nnz) key blocks per query block
  const int* lut_count;          // (heads_lut, nqb)
  int heads_lut;                 // 1 (broadcast) or heads
  int nqb;
  int max_nnz;
};

struct BlockSparseFwdParams {
  BlockSparseArgs args;
  void* out;
  float* lse;
};

struct BlockSparseBwdParams {
  BlockSparseArgs args;
  const void* grad_out;
  const void* out;
  const float* lse;
  float* dq;  // float32 workspaces, zero-initialised
  float* dk;
  float* dv;
};

// ---- limits ---------------------------------------------------------------------------------------------
// What the kernels take, written once on the C++ side (the binding's errors and both launchers' checks read
// these); etkd_kernels/cuda/__init__.py declares the same to the dispatcher, and tests/test_cuda_sources.py
// checks that the two agree. head_dim: the instances `dispatch_head_dim` compiles; batch * heads: grid.y;
// seq: int32 index arithmetic.
constexpr int kHeadDims[] = {32, 64, 128};
constexpr int64_t kMaxBatchHeads = 65535;
constexpr int64_t kMaxSeq = (int64_t{1} << 30) - 1;

inline bool head_dim_supported(int64_t d) {
  for (int h : kHeadDims)
    if (h == d) return true;
  return false;
}

// The shape checks every launcher makes first.
inline cudaError_t check_shape(const AttnShape& s) {
  if (s.batch <= 0 || s.heads <= 0 || s.seq <= 0 || s.seq > kMaxSeq) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(s.batch) * s.heads > kMaxBatchHeads) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

// Launch on `stream`. Return cudaSuccess, cudaErrorInvalidValue for an unsupported dtype/head_dim or
// inconsistent sizes, or the launch error. The binding turns a non-success into a Python exception.
cudaError_t sliding_window_fwd(const SlidingWindowFwdParams& p, cudaStream_t stream);
cudaError_t sliding_window_bwd(const SlidingWindowBwdParams& p, cudaStream_t stream);
cudaError_t block_sparse_fwd(const BlockSparseFwdParams& p, cudaStream_t stream);
cudaError_t block_sparse_bwd(const BlockSparseBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace etkd

// =========================================================================================================
// Device tile engine (nvcc only)
// =========================================================================================================
#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "common/tile_index.h"

namespace etkd {
namespace cuda {
namespace detail {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct Num;
template <>
struct Num<float> {
  static constexpr bool kTensorCore = false;  // fp32 stays exact fp32 FMA (no TF32 rounding)
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct Num<__half> {
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct Num<__nv_bfloat16> {
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// Tile sizes (BM query rows x BN keys). Backward keeps more tiles resident (Q, dO, K, V, S, dP, P, dS, dQ,
// a dK/dV partial), so its tiles are smaller; fp32 tiles are twice the bytes, so they shrink first. Every
// configuration fits 99 KiB of shared memory, the opt-in limit of sm_86/sm_89 (sm_80: 163 KiB, sm_90:
// 227 KiB), so the sm_80 binary also runs on consumer Ampere/Ada cards.
template <typename T, int D>
struct FwdTiles {
  static constexpr bool kWide = sizeof(T) == 4;
  static constexpr int BM = (kWide && D == 128) ? 32 : 64;
  static constexpr int BN = (D == 128 || (kWide && D >= 64)) ? 32 : 64;
};
template <typename T, int D>
struct BwdTiles {
  static constexpr bool kWide = sizeof(T) == 4;
  static constexpr int BM = kWide ? (D == 128 ? 16 : 32) : (D == 128 ? 32 : 64);
  static constexpr int BN = kWide ? (D == 128 ? 16 : 32) : 32;
};
constexpr int kMaxSmemBytes = 99 * 1024;
// Every kernel: __launch_bounds__(kThreads, kMinBlocks). Shared memory (FwdLayout/BwdLayout, e.g. 83 KiB for
// the 16-bit d64 backward) already bounds residency to 1-2 CTAs per SM, but without a min-blocks hint ptxas sizes
// registers for an occupancy of its own choosing and spilled for it (CUDA 13.0: the bf16 d64 backward settled on
// 96 registers and spilled 8-16 B per thread; several d32/d128 forwards spilled 4-28 B). With the hint it
// allocates what the code needs (sm_80 d64 backward: bf16 111, fp16 163, fp32 80 registers) and nothing spills.
constexpr int kMinBlocks = 1;

constexpr int align128(int x) { return (x + 127) / 128 * 128; }

// Leading dimensions padded by 16 bytes: keeps WMMA's ldm/alignment rules (ldm a multiple of 16 bytes,
// fragment pointers 32-byte aligned since row offsets are multiples of 16 rows) and breaks bank conflicts.
template <typename T, int N>
constexpr int ld_of() {
  return N + 16 / static_cast<int>(sizeof(T));
}

// Byte offsets of consecutive shared-memory regions, each 128-byte aligned: at[r] is where region r starts,
// at[N] the total. The forward and backward layouts list their regions' sizes and take offsets from here.
template <int N>
struct Carve {
  int at[N + 1];
  constexpr explicit Carve(const int (&bytes)[N]) : at{} {
    for (int r = 0; r < N; ++r) at[r + 1] = align128(at[r] + bytes[r]);
  }
};

// Both layouts start with the same three regions (the tile prologue below reads them): the CTA's rows
// (absolute positions, -1 = none), which of them are live, and the current key tile's columns (-1 = none).
// Leading dimensions of both layouts' tiles: T rows of head_dim (Q, K, V, dO), fp32 score rows (S, dP), T score
// rows (P, dS), fp32 rows of head_dim (O, dQ, dK/dV partials); kT: bytes of a T.
template <typename T, int D, int BN>
struct TileLds {
  static constexpr int ldT = ld_of<T, D>();
  static constexpr int ldS = ld_of<float, BN>();
  static constexpr int ldP = ld_of<T, BN>();
  static constexpr int ldO = ld_of<float, D>();
  static constexpr int kT = sizeof(T);
};

template <typename T, int D, int BM, int BN>
struct FwdLayout : TileLds<T, D, BN> {
  using B = TileLds<T, D, BN>;
  static constexpr int ldT = B::ldT, ldS = B::ldS, ldP = B::ldP, ldO = B::ldO, kT = B::kT;
  enum : int { kRows, kLive, kCols, kQ, kK, kV, kS, kP, kO, kM, kL, kCount };
  static constexpr Carve<kCount> carve{{BM * 4, BM * 4, BN * 4, BM * ldT * kT, BN * ldT * kT, BN * ldT * kT,
                                        BM * ldS * 4, BM * ldP * kT, BM * ldO * 4, BM * 4, BM * 4}};
  static constexpr int kBytes = carve.at[kCount];
  static_assert(kBytes <= kMaxSmemBytes, "forward tile does not fit 99 KiB of shared memory");
};

template <typename T, int D, int BM, int BN>
struct BwdLayout : TileLds<T, D, BN> {
  using B = TileLds<T, D, BN>;
  static constexpr int ldT = B::ldT, ldS = B::ldS, ldP = B::ldP, ldO = B::ldO, kT = B::kT;
  enum : int { kRows, kLive, kCols, kQ, kDO, kK, kV, kS, kDP, kP, kDS, kDQ, kPart, kLse, kDelta, kCount };
  static constexpr Carve<kCount> carve{{BM * 4, BM * 4, BN * 4, BM * ldT * kT, BM * ldT * kT, BN * ldT * kT,
                                        BN * ldT * kT, BM * ldS * 4, BM * ldS * 4, BM * ldP * kT, BM * ldP * kT,
                                        BM * ldO * 4, BN * ldO * 4, BM * 4, BM * 4}};
  static constexpr int kBytes = carve.at[kCount];
  static_assert(kBytes <= kMaxSmemBytes, "backward tile does not fit 99 KiB of shared memory");
};

// Region r of layout L in the dynamic shared memory, as an array of X.
template <class L, typename X, int R>
__device__ __forceinline__ X* region(unsigned char* smem) {
  constexpr int kOffset = L::carve.at[R];
  return reinterpret_cast<X*>(smem + kOffset);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// C (M x N, fp32, shared) = [C +] A (M x K) * B (K x N), A and B in shared memory.
// ARow: A(m, k) = A[m * lda + k], else A[k * lda + m]. BRow: B(k, n) = B[k * ldb + n], else B[n * ldb + k].
// fp16/bf16 run on tensor cores (WMMA m16n16k16, fp32 accumulate), one warp per 16x16 output tile.
// The caller synchronises before reading C.
template <int M, int N, int K, bool ARow, bool BRow, typename T>
__device__ __forceinline__ void smem_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc,
                                          bool accumulate) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool kWmma = Num<T>::kTensorCore;
#else
  constexpr bool kWmma = false;  // bf16 WMMA needs sm_80; older targets take the FMA path
#endif
  if constexpr (kWmma) {
    namespace wmma = nvcuda::wmma;
    static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tiles are 16x16x16");
    using LA = std::conditional_t<ARow, wmma::row_major, wmma::col_major>;
    using LB = std::conditional_t<BRow, wmma::row_major, wmma::col_major>;
    constexpr int TN = N / 16;
    const int warp = threadIdx.x / 32;
    for (int t = warp; t < (M / 16) * TN; t += kWarps) {
      const int m0 = (t / TN) * 16, n0 = (t % TN) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate) {
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.0f);
      }
#pragma unroll
      for (int kk = 0; kk < K; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
        wmma::load_matrix_sync(a, ARow ? A + m0 * lda + kk : A + kk * lda + m0, lda);
        wmma::load_matrix_sync(b, BRow ? B + kk * ldb + n0 : B + n0 * ldb + kk, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  } else {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      float s = accumulate ? C[m * ldc + n] : 0.0f;
#pragma unroll 8
      for (int kk = 0; kk < K; ++kk) {
        const float a = Num<T>::to_f(ARow ? A[m * lda + kk] : A[kk * lda + m]);
        const float b = Num<T>::to_f(BRow ? B[kk * ldb + n] : B[n * ldb + kk]);
        s = fmaf(a, b, s);
      }
      C[m * ldc + n] = s;
    }
  }
}

// dst[r * ld + :D] = src[idx[r] * stride_s + :D] for r < R (zeros where idx[r] < 0), 16-byte vectors.
// The binding guarantees 16-byte aligned base pointers and row strides.
template <typename T, int D, int R>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t stride_s, const int* idx) {
  constexpr int V = 16 / sizeof(T);
  constexpr int C = D / V;
  for (int e = threadIdx.x; e < R * C; e += kThreads) {
    const int r = e / C, c = (e % C) * V;
    const int i = idx[r];
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (i >= 0) val = *reinterpret_cast<const uint4*>(src + i * stride_s + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

// `Pat` is one of the per-CTA patterns of csrc/common/tile_index.h (BandPattern, GlobalRowsPattern,
// BlockPattern): which rows the CTA owns, which key tiles it visits, which pairs are visible.
// `I` is an instance (Inst below): element type T, head_dim D, kDrop (dropout on P) and the tile sizes.

// Tile prologue of both passes: rows[r] = the CTA's row r (or -1), live[r] = it exists and is not padding;
// returns (on every thread) whether any row is live.
template <int BM, class Pat>
__device__ __forceinline__ bool own_rows(const Pat& pat, int* rows, int* live) {
  int any_live = 0;
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int i = pat.row(r);
    rows[r] = i;
    live[r] = (i >= 0 && pat.row_live(i)) ? 1 : 0;
    any_live |= live[r];
  }
  return __syncthreads_or(any_live) != 0;
}

// cols[c] = column c of key tile `it` (or -1); returns (on every thread) whether any column exists.
template <int BN, class Pat>
__device__ __forceinline__ bool tile_cols(const Pat& pat, int it, int* cols) {
  int any = 0;
  for (int c = threadIdx.x; c < BN; c += kThreads) {
    cols[c] = pat.col(it, c);
    any |= cols[c] >= 0;
  }
  return __syncthreads_or(any) != 0;
}

// Dropout's keep-mask of element (row i, column j) of this CTA's (batch, head), blockIdx.y = b * H + h
// (the launches never split the batch). Only instantiated with kDrop.
__device__ __forceinline__ bool keep(const etkd::rng::Dropout& drop, int i, int j) {
  return etkd::rng::dropout_keep(drop, static_cast<int>(blockIdx.y), i, j);
}

// Forward over one query tile: online softmax (exp2 domain, fp32 statistics) and fp32 accumulation of
// O in shared memory; writes out (input dtype) and lse (natural log, +inf for rows that see no key).
// Dropout: the row sums (hence lse) see every probability, P @ V only the kept ones, out scaled by 1/(1-p).
template <class I, class Pat>
__device__ __forceinline__ void attn_fwd_tile(const Pat& pat, const typename I::T* __restrict__ q,
                                              const typename I::T* __restrict__ k,
                                              const typename I::T* __restrict__ v, typename I::T* __restrict__ out,
                                              float* __restrict__ lse, const AttnShape& shape) {
  using T = typename I::T;
  constexpr int D = I::D, BM = I::Fwd::BM, BN = I::Fwd::BN;
  using L = FwdLayout<T, D, BM, BN>;
  static_assert(BN % 32 == 0, "one warp covers a score row in BN / 32 steps");
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = region<L, T, L::kQ>(smem);
  T* Ks = region<L, T, L::kK>(smem);
  T* Vs = region<L, T, L::kV>(smem);
  float* Ss = region<L, float, L::kS>(smem);
  T* Ps = region<L, T, L::kP>(smem);
  float* Os = region<L, float, L::kO>(smem);
  float* m_s = region<L, float, L::kM>(smem);
  float* l_s = region<L, float, L::kL>(smem);
  int* rows = region<L, int, L::kRows>(smem);
  int* live = region<L, int, L::kLive>(smem);
  int* cols = region<L, int, L::kCols>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t ss = shape.stride_s;

  for (int r = tid; r < BM; r += kThreads) {
    m_s[r] = -INFINITY;
    l_s[r] = 0.0f;
  }
  for (int e = tid; e < BM * L::ldO; e += kThreads) Os[e] = 0.0f;
  // A tile whose owned rows are all padding visits nothing (its rows still get out 0 / lse +inf below).
  const int n_it = own_rows<BM>(pat, rows, live) ? pat.num_iters() : 0;
  load_rows<T, D, BM>(Qs, L::ldT, q, ss, rows);

  const float sl2 = shape.scale * kLog2e;
  for (int it = 0; it < n_it; ++it) {
    if (!tile_cols<BN>(pat, it, cols)) continue;  // nothing real in this key tile (e.g. all padding)
    load_rows<T, D, BN>(Ks, L::ldT, k, ss, cols);
    load_rows<T, D, BN>(Vs, L::ldT, v, ss, cols);
    __syncthreads();
    smem_gemm<BM, BN, D, true, false>(Qs, L::ldT, Ks, L::ldT, Ss, L::ldS, false);  // S = Q K^T
    __syncthreads();

    const bool dense = pat.dense(it);
    for (int r = warp; r < BM; r += kWarps) {
      const int i = rows[r];
      const bool lv = live[r] != 0;
      const float m_old = m_s[r];
      float x[BN / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        const int c = lane + 32 * t, j = cols[c];
        const bool ok = lv && j >= 0 && (dense || pat.visible(i, j, it));
        x[t] = ok ? Ss[r * L::ldS + c] * sl2 : -INFINITY;
        mx = fmaxf(mx, x[t]);
      }
      const float m_new = fmaxf(m_old, warp_max(mx));
      float alpha = 1.0f, sum = 0.0f;
      if (m_new != -INFINITY) {  // else nothing seen yet: P = 0 and O (still 0) keeps its scale
        alpha = exp2f(m_old - m_new);
#pragma unroll
        for (int t = 0; t < BN / 32; ++t) {
          x[t] = exp2f(x[t] - m_new);
          sum += x[t];
        }
      } else {
#pragma unroll
        for (int t = 0; t < BN / 32; ++t) x[t] = 0.0f;
      }
      sum = warp_sum(sum);
#pragma unroll
      for (int t = 0; t < BN / 32; ++t) {
        float pv = x[t];
        if constexpr (I::kDrop) {
          if (pv != 0.0f && !keep(shape.dropout, i, cols[lane + 32 * t])) pv = 0.0f;
        }
        Ps[r * L::ldP + lane + 32 * t] = Num<T>::from_f(pv);
      }
      for (int d = lane; d < D; d += 32) Os[r * L::ldO + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        m_s[r] = m_new;
        l_s[r] = l_s[r] * alpha + sum;
      }
    }
    __syncthreads();
    smem_gemm<BM, D, BN, true, true>(Ps, L::ldP, Vs, L::ldT, Os, L::ldO, true);  // O += P V
    __syncthreads();
  }

  const float out_scale = I::kDrop ? shape.dropout.scale : 1.0f;
  for (int e = tid; e < BM * D; e += kThreads) {
    const int r = e / D, d = e % D, i = rows[r];
    if (i < 0) continue;
    const float l = l_s[r];
    out[i * ss + d] = Num<T>::from_f(l > 0.0f ? Os[r * L::ldO + d] / l * out_scale : 0.0f);
  }
  for (int r = tid; r < BM; r += kThreads) {
    const int i = rows[r];
    if (i < 0) continue;
    const float l = l_s[r];
    lse[i] = l > 0.0f ? m_s[r] * kLn2 + logf(l) : INFINITY;
  }
}

// Backward over one query tile, recomputing P = exp(scale * q.k - lse) from the saved lse.
// dQ of the tile's rows accumulates in shared memory and is stored once (each row is owned by one CTA).
// dK/dV: this CTA's contribution to each visited key tile is formed in shared memory and added to the
// fp32 workspaces with atomicAdd. We chose atomics over a separate key-tile-major pass because one loop
// then serves every pattern: the key-major pass would need the transposed visit lists (query tiles per
// key tile, and for global keys *every* query tile), a second copy of the pattern logic per op. The cost
// is contention on global-key rows (touched by every query tile) and non-deterministic fp32 summation
// order; both are acceptable for training (FlashAttention-2 does the same for dQ).
// Dropout regenerates the forward's mask M: dV = (P*M/(1-p))^T dO, dS = P * (dP*M/(1-p) - rowsum(dO*O)).
template <class I, class Pat>
__device__ __forceinline__ void attn_bwd_tile(const Pat& pat, const typename I::T* __restrict__ q,
                                              const typename I::T* __restrict__ k,
                                              const typename I::T* __restrict__ v,
                                              const typename I::T* __restrict__ out,
                                              const typename I::T* __restrict__ dout, const float* __restrict__ lse,
                                              float* __restrict__ dq, float* dk, float* dv, const AttnShape& shape) {
  using T = typename I::T;
  constexpr int D = I::D, BM = I::Bwd::BM, BN = I::Bwd::BN;
  using L = BwdLayout<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = region<L, T, L::kQ>(smem);
  T* dOs = region<L, T, L::kDO>(smem);
  T* Ks = region<L, T, L::kK>(smem);
  T* Vs = region<L, T, L::kV>(smem);
  float* Ss = region<L, float, L::kS>(smem);
  float* dPs = region<L, float, L::kDP>(smem);
  T* Ps = region<L, T, L::kP>(smem);
  T* dSs = region<L, T, L::kDS>(smem);
  float* dQs = region<L, float, L::kDQ>(smem);
  float* Part = region<L, float, L::kPart>(smem);
  float* lse2 = region<L, float, L::kLse>(smem);
  float* delta = region<L, float, L::kDelta>(smem);
  int* rows = region<L, int, L::kRows>(smem);
  int* live = region<L, int, L::kLive>(smem);
  int* cols = region<L, int, L::kCols>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t ss = shape.stride_s;
  const float scale = shape.scale;

  for (int e = tid; e < BM * L::ldO; e += kThreads) dQs[e] = 0.0f;
  if (!own_rows<BM>(pat, rows, live)) return;  // dq of these rows stays 0 (zero-initialised workspace)
  for (int r = tid; r < BM; r += kThreads) {
    // lse = +inf (row saw nothing) gives P = exp2(s - inf) = 0 everywhere below.
    lse2[r] = live[r] ? lse[rows[r]] * kLog2e : INFINITY;
  }
  // delta_i = sum_d dO_id * O_id (the softmax-backward row term), one warp per row, fp32.
  for (int r = warp; r < BM; r += kWarps) {
    float s = 0.0f;
    if (live[r]) {
      const int i = rows[r];
      for (int d = lane; d < D; d += 32) s += Num<T>::to_f(dout[i * ss + d]) * Num<T>::to_f(out[i * ss + d]);
    }
    s = warp_sum(s);
    if (lane == 0) delta[r] = s;
  }
  load_rows<T, D, BM>(Qs, L::ldT, q, ss, rows);
  load_rows<T, D, BM>(dOs, L::ldT, dout, ss, rows);

  const float sl2 = scale * kLog2e;
  const int n_it = pat.num_iters();
  for (int it = 0; it < n_it; ++it) {
    if (!tile_cols<BN>(pat, it, cols)) continue;
    load_rows<T, D, BN>(Ks, L::ldT, k, ss, cols);
    load_rows<T, D, BN>(Vs, L::ldT, v, ss, cols);
    __syncthreads();
    smem_gemm<BM, BN, D, true, false>(Qs, L::ldT, Ks, L::ldT, Ss, L::ldS, false);    // S = Q K^T
    smem_gemm<BM, BN, D, true, false>(dOs, L::ldT, Vs, L::ldT, dPs, L::ldS, false);  // dP = dO V^T
    __syncthreads();

    const bool dense = pat.dense(it);
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int r = e / BN, c = e % BN, j = cols[c];
      const bool ok = live[r] && j >= 0 && (dense || pat.visible(rows[r], j, it));
      const float p = ok ? exp2f(Ss[r * L::ldS + c] * sl2 - lse2[r]) : 0.0f;
      float dp = dPs[r * L::ldS + c], pv = p;
      if constexpr (I::kDrop) {
        const bool kept = p != 0.0f && keep(shape.dropout, rows[r], j);
        pv = kept ? p * shape.dropout.scale : 0.0f;
        dp = kept ? dp * shape.dropout.scale : 0.0f;
      }
      const float ds = p * (dp - delta[r]);
      Ps[r * L::ldP + c] = Num<T>::from_f(pv);
      dSs[r * L::ldP + c] = Num<T>::from_f(ds * scale);  // d(score)/d(q.k) folds the scale in
    }
    __syncthreads();
    smem_gemm<BM, D, BN, true, true>(dSs, L::ldP, Ks, L::ldT, dQs, L::ldO, true);     // dQ += dS K
    smem_gemm<BN, D, BM, false, true>(dSs, L::ldP, Qs, L::ldT, Part, L::ldO, false);  // dK_t = dS^T Q
    __syncthreads();
    for (int e = tid; e < BN * D; e += kThreads) {
      const int c = e / D, d = e % D, j = cols[c];
      if (j >= 0) atomicAdd(dk + j * ss + d, Part[c * L::ldO + d]);
    }
    __syncthreads();
    smem_gemm<BN, D, BM, false, true>(Ps, L::ldP, dOs, L::ldT, Part, L::ldO, false);  // dV_t = P^T dO
    __syncthreads();
    for (int e = tid; e < BN * D; e += kThreads) {
      const int c = e / D, d = e % D, j = cols[c];
      if (j >= 0) atomicAdd(dv + j * ss + d, Part[c * L::ldO + d]);
    }
    __syncthreads();  // cols / Part are rewritten by the next key tile
  }

  for (int e = tid; e < BM * D; e += kThreads) {
    const int r = e / D, d = e % D;
    if (live[r]) dq[rows[r] * ss + d] = dQs[r * L::ldO + d];
  }
}

// Element offset of this CTA's (batch, head) in a (B, H, S, D) tensor, and of its row block in lse (B, H, S).
struct HeadOffsets {
  int b;
  int64_t off, lse_off;
};
__device__ __forceinline__ HeadOffsets head_offsets(const AttnShape& s) {
  const int b = blockIdx.y / s.heads, h = blockIdx.y % s.heads;
  return HeadOffsets{b, b * s.stride_b + h * s.stride_h, static_cast<int64_t>(blockIdx.y) * s.seq};
}

// Opt in to more than 48 KiB of dynamic shared memory; refuse sizes the device cannot give.
template <class Kernel>
inline cudaError_t prepare_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  if (bytes > optin) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// One launch of a tile kernel: opt in to its shared memory, then kernel<<<grid, kThreads, smem, stream>>>.
template <class Kernel, class... Args>
inline cudaError_t launch(Kernel kernel, int smem, dim3 grid, cudaStream_t stream, const Args&... args) {
  if (cudaError_t e = prepare_smem(kernel, smem); e != cudaSuccess) return e;
  kernel<<<grid, kThreads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// A kernel instance: element type, head_dim, dropout on P or not, and the tiles and shared memory of both
// passes. The dropout-free instance is the kernel as it was before dropout existed (kDrop folds away).
template <typename T_, int D_, bool kDrop_>
struct Inst {
  using T = T_;
  static constexpr int D = D_;
  static constexpr bool kDrop = kDrop_;
  using Fwd = FwdTiles<T, D>;
  using Bwd = BwdTiles<T, D>;
  static constexpr int kFwdSmem = FwdLayout<T, D, Fwd::BM, Fwd::BN>::kBytes;
  static constexpr int kBwdSmem = BwdLayout<T, D, Bwd::BM, Bwd::BN>::kBytes;
};

// Calls f(Inst<T, D, kDrop>{}) for the call's dtype, head_dim and dropout. ETKD_CUDA_MIN_INSTANCES (compile
// tests only) keeps one head_dim so the sm_80 + sm_90 compile check stays fast on small CI machines.
template <typename T, bool kDrop, class F>
inline cudaError_t dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
#if !defined(ETKD_CUDA_MIN_INSTANCES)
    case 32:
      return f(Inst<T, 32, kDrop>{});
    case 128:
      return f(Inst<T, 128, kDrop>{});
#endif
    case 64:
      return f(Inst<T, 64, kDrop>{});
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T, class F>
inline cudaError_t dispatch_dropout(const AttnShape& s, F&& f) {
  return s.dropout.enabled ? dispatch_head_dim<T, true>(s.head_dim, f) : dispatch_head_dim<T, false>(s.head_dim, f);
}

template <class F>
inline cudaError_t dispatch(const AttnShape& s, F&& f) {
  switch (s.dtype) {
    case DType::kFloat32:
      return dispatch_dropout<float>(s, f);
    case DType::kFloat16:
      return dispatch_dropout<__half>(s, f);
    case DType::kBFloat16:
      return dispatch_dropout<__nv_bfloat16>(s, f);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace cuda
}  // namespace etkd

#endif  // __CUDACC__
