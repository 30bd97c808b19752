// Fused softmax-attention tiles for the CPU backend, shared by every pattern (sliding window, block
// sparse, the Nystrom softmax products).
//
// A pattern is described to the driver as: for each (batch, head, query tile), a list of key segments
// (contiguous key runs of one key source), an optional band |i - j| <= w on the main source, per-key
// additive biases (0 = usable, -inf = masked: padding, keys counted elsewhere), and per-query skip flags
// (rows whose output is produced elsewhere or is zero). The driver runs FlashAttention-2 style loops:
// forward = online softmax over the segments (scores live only in a bq x seg tile), backward = recompute
// P from the saved lse. Tile products are BLAS sgemm calls; the element-wise softmax work is at::vec.
//
// No torch headers here: plain pointers, so the kernel translation unit stays cheap to compile.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace etkd::cpu {

// Keys [k0, k0 + n) of key source `src` (0 = main, 1 = extra, e.g. gathered global tokens).
struct Seg {
  int64_t k0;
  int64_t n;
  int src;
};

// Longest segment the tile loops take at once; callers split longer runs with `append_run`.
constexpr int64_t kMaxSeg = 640;

// Append keys [k0, k1) of `src` to `segs`, split into near-equal pieces of at most kMaxSeg keys.
void append_run(std::vector<Seg>& segs, int64_t k0, int64_t k1, int src);

struct Problem {
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  float scale = 1.f;
  int64_t bq = 64;  // query rows per tile
  // Main source, all contiguous: q (B, H, Sq, D); k, v (B, H, Sk, D).
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* kbias = nullptr;   // (B, Sk) or null
  const uint8_t* qskip = nullptr;  // (B, Sq) or null: 1 = row sees nothing (out 0, lse +inf)
  int64_t w = -1;                  // band half width on the main source (query i, key j: |i - j| <= w); -1 = none
  // Extra source (optional): kx, vx (B, H, Sx, D), bias (B, Sx).
  const float* kx = nullptr;
  const float* vx = nullptr;
  const float* kxbias = nullptr;
  int64_t Sx = 0;
  // Segments of query tile [i0, i0 + rows) of (b, h).
  std::function<void(int64_t b, int64_t h, int64_t i0, int64_t rows, std::vector<Seg>& segs)> segments;
};

// out (B, H, Sq, D), lse (B, H, Sq).
void run_forward(const Problem& p, float* out, float* lse);

// Gradients; dq, dk, dv (and dkx, dvx when p.kx) must be zero-filled, shaped like q, k, v (kx, vx).
// delta (B, H, Sq) = rowsum(dout * out).
void run_backward(const Problem& p, const float* dout, const float* lse, const float* delta, float* dq, float* dk,
                  float* dv, float* dkx, float* dvx);

// Row-major C (m x n) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C through BLAS sgemm.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// In-place softmax of `rows` rows of `n` floats (row stride ld), keys biased by bias[0:n] (null = none):
// rows seeing no key (all -inf) become zeros. SIMD (at::vec).
void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, const float* bias);

// delta[r] = sum_c a[r, c] * b[r, c] over `rows` rows of `d` floats.
void rowwise_dot(const float* a, const float* b, float* delta, int64_t rows, int64_t d);

}  // namespace etkd::cpu
