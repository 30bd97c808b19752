// FlashAttention-style CPU tiles and their (batch, head, query tile) driver. See flash_tile.h.
//
// SIMD: the element-wise softmax loops use at::vec::Vectorized<float>. ATen picks its vector width per
// translation unit from CPU_CAPABILITY_* macros; an extension gets none by default (scalar fallback), so on
// x86-64 this file alone is compiled for AVX2+FMA (the baseline of every x86 CPU torch's own AVX2 kernels
// target) and `check_cpu()` refuses to run it on a CPU without those features. Everything this file
// includes besides the vec headers is included before the target pragma, so no shared inline function is
// emitted with AVX2 code.
#include "cpu/flash_tile.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(CPU_CAPABILITY)
#define ETKD_AVX2 1
#define CPU_CAPABILITY etkd_avx2
#define CPU_CAPABILITY_AVX2
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ lexes the whole file before it sees the pragma, so the feature macros the vec and sleef headers test
// are not set by it: set them for the rest of this file.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif
#include <ATen/cpu/vec/vec.h>

// BLAS (MKL or OpenBLAS inside libtorch_cpu), column-major Fortran interface.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace etkd::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Row-major C (m x n) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // A row-major matrix is its column-major transpose: C^T = op(B)^T op(A)^T.
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda), ildc = static_cast<int>(ldc);
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  sgemm_(&tra, &trb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
}

// s[lo:hi] += bias[lo:hi] (bias may be null); returns max over s[lo:hi].
float add_bias_max(float* s, const float* bias, int64_t lo, int64_t hi) {
  int64_t j = lo;
  Vec vmax(kNegInf);
  if (bias) {
    for (; j + kV <= hi; j += kV) {
      Vec x = Vec::loadu(s + j) + Vec::loadu(bias + j);
      x.store(s + j);
      vmax = at::vec::maximum(vmax, x);
    }
  } else {
    for (; j + kV <= hi; j += kV) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
  }
  float m = vmax.reduce_max();
  for (; j < hi; ++j) {
    if (bias) s[j] += bias[j];
    m = std::max(m, s[j]);
  }
  return m;
}

// s[lo:hi] = exp(s[lo:hi] - m); returns the sum. m is finite.
float exp_sum(float* s, int64_t lo, int64_t hi, float m) {
  int64_t j = lo;
  const Vec vm(m);
  Vec acc(0.f);
  for (; j + kV <= hi; j += kV) {
    Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    e.store(s + j);
    acc = acc + e;
  }
  float sum = acc.reduce_add();
  for (; j < hi; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

void scale_row(float* x, int64_t n, float a) {
  int64_t j = 0;
  const Vec va(a);
  for (; j + kV <= n; j += kV) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// ds[j] = p[j] * (dp[j] - delta) in place in dp.
void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  int64_t j = 0;
  const Vec vd(delta);
  for (; j + kV <= n; j += kV) (Vec::loadu(p + j) * (Vec::loadu(dp + j) - vd)).store(dp + j);
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  Vec acc(0.f);
  for (; j + kV <= n; j += kV) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  float s = acc.reduce_add();
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

struct SrcView {
  const float* k;
  const float* v;
  const float* bias;
  bool band;
};

// Columns [lo, hi) of a segment that row `i` (absolute query index) may use.
inline void row_range(const Problem& p, const Seg& sg, bool band, int64_t i, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = sg.n;
  if (band) {
    *lo = std::max<int64_t>(0, i - p.w - sg.k0);
    *hi = std::min<int64_t>(sg.n, i + p.w + 1 - sg.k0);
  }
}

struct Work {
  std::vector<float> s, dp, acc, m, l;
  std::vector<Seg> segs;
  explicit Work(int64_t bq, int64_t d) : s(bq * kMaxSeg), dp(bq * kMaxSeg), acc(bq * d), m(bq), l(bq) {}
};

// One query tile: rows q[0:rows] (absolute index i0 + r), forward.
void forward_tile(const Problem& p, const SrcView* src, const float* q, const uint8_t* skip, int64_t i0,
                  int64_t rows, Work& w, float* out, float* lse) {
  const int64_t d = p.D;
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.f);
  for (const Seg& sg : w.segs) {
    const SrcView& sv = src[sg.src];
    const int64_t n = sg.n;
    const float* kp = sv.k + sg.k0 * d;
    float* s = w.s.data();
    gemm(false, true, rows, n, d, p.scale, q, d, kp, d, 0.f, s, n);
    const float* bias = sv.bias ? sv.bias + sg.k0 : nullptr;
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * n;
      int64_t lo, hi;
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      if ((skip && skip[r]) || lo >= hi) {
        std::fill(row, row + n, 0.f);
        continue;
      }
      const float mx = add_bias_max(row, bias, lo, hi);
      const float mnew = std::max(w.m[r], mx);
      if (mnew == kNegInf) {
        std::fill(row, row + n, 0.f);
        continue;
      }
      const float alpha = w.m[r] == kNegInf ? 0.f : std::exp(w.m[r] - mnew);
      std::fill(row, row + lo, 0.f);
      std::fill(row + hi, row + n, 0.f);
      const float sum = exp_sum(row, lo, hi, mnew);
      w.l[r] = w.l[r] * alpha + sum;
      if (alpha != 1.f) scale_row(w.acc.data() + r * d, d, alpha);
      w.m[r] = mnew;
      any = true;
    }
    if (any) gemm(false, false, rows, d, n, 1.f, s, n, sv.v + sg.k0 * d, d, 1.f, w.acc.data(), d);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * d;
    if (w.l[r] > 0.f) {
      const float inv = 1.f / w.l[r];
      const float* a = w.acc.data() + r * d;
      int64_t j = 0;
      const Vec vi(inv);
      for (; j + kV <= d; j += kV) (Vec::loadu(a + j) * vi).store(o + j);
      for (; j < d; ++j) o[j] = a[j] * inv;
      lse[r] = w.m[r] + std::log(w.l[r]);
    } else {
      std::fill(o, o + d, 0.f);
      lse[r] = kInf;
    }
  }
}

struct GradView {
  float* dk;
  float* dv;
};

// One query tile, backward: accumulates into dq (rows x d) and the sources' dk/dv.
void backward_tile(const Problem& p, const SrcView* src, const GradView* grad, const float* q, const float* dout,
                   const float* lse, const float* delta, const uint8_t* skip, int64_t i0, int64_t rows, Work& w,
                   float* dq) {
  const int64_t d = p.D;
  for (const Seg& sg : w.segs) {
    const SrcView& sv = src[sg.src];
    const int64_t n = sg.n;
    const float* kp = sv.k + sg.k0 * d;
    const float* vp = sv.v + sg.k0 * d;
    float* s = w.s.data();
    float* dp = w.dp.data();
    gemm(false, true, rows, n, d, p.scale, q, d, kp, d, 0.f, s, n);
    const float* bias = sv.bias ? sv.bias + sg.k0 : nullptr;
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * n;
      int64_t lo, hi;
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      if ((skip && skip[r]) || lo >= hi || !(lse[r] < kInf)) {
        std::fill(row, row + n, 0.f);
        continue;
      }
      add_bias_max(row, bias, lo, hi);
      std::fill(row, row + lo, 0.f);
      std::fill(row + hi, row + n, 0.f);
      exp_sum(row, lo, hi, lse[r]);
      any = true;
    }
    if (!any) continue;
    GradView g = grad[sg.src];
    // dV += P^T dO; dP = dO V^T; dS = P (dP - delta); dQ += s dS K; dK += s dS^T Q.
    gemm(true, false, n, d, rows, 1.f, s, n, dout, d, 1.f, g.dv + sg.k0 * d, d);
    gemm(false, true, rows, n, d, 1.f, dout, d, vp, d, 0.f, dp, n);
    for (int64_t r = 0; r < rows; ++r) softmax_grad_row(s + r * n, dp + r * n, n, delta[r]);
    gemm(false, false, rows, d, n, p.scale, dp, n, kp, d, 1.f, dq, d);
    gemm(true, false, n, d, rows, p.scale, dp, n, q, d, 1.f, g.dk + sg.k0 * d, d);
  }
}

// C rows [0, MR) x columns [0, NV * kV) of gemm_small: MR x NV accumulators (6 x 2 = 12 of the 16 ymm
// registers, plus NV loads of B and one broadcast of A per k step).
template <int MR, int NV, bool ACC>
void micro_kernel(int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
                  float* c, int64_t ldc) {
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * ldb;
    const float* ak = a + kk * a_ks;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(bk + v * kV);
    for (int r = 0; r < MR; ++r) {
      const Vec ar(ak[r * a_rs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
  const Vec va(alpha);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * kV;
      Vec x = acc[r][v] * va;
      if (ACC) x = x + Vec::loadu(cp);
      x.store(cp);
    }
}

constexpr int kMR = 6;                                 // micro-kernel rows
constexpr int kNG = static_cast<int>(kSmallPad / kV);  // vectors per kSmallPad columns
static_assert(kSmallPad % kV == 0, "gemm_small: kSmallPad must be a whole number of vectors");

template <int NV, bool ACC>
void micro_rows(int64_t mr, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
                int64_t ldb, float* c, int64_t ldc) {
  switch (mr) {
    case 6: return micro_kernel<6, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 5: return micro_kernel<5, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 4: return micro_kernel<4, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 3: return micro_kernel<3, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 2: return micro_kernel<2, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    default: return micro_kernel<1, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
  }
}

// Key rows per tile of landmark_attend: the (tile x np) scores and the v tile stay in L1/L2, and the online
// rescale of t (n x d per tile) stays small next to the tile's 2 * tile * n * d FMAs.
constexpr int64_t kLmTile = 128;

void check_cpu() {
#if defined(ETKD_AVX2)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!ok) throw std::runtime_error("etkd cpu backend: the kernels need a CPU with AVX2 and FMA");
#endif
}

}  // namespace

void append_run(std::vector<Seg>& segs, int64_t k0, int64_t k1, int src) {
  const int64_t n = k1 - k0;
  if (n <= 0) return;
  const int64_t pieces = (n + kMaxSeg - 1) / kMaxSeg;
  const int64_t len = (n + pieces - 1) / pieces;
  for (int64_t a = k0; a < k1; a += len) segs.push_back(Seg{a, std::min(len, k1 - a), src});
}

void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, const float* bias) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    const float mx = add_bias_max(row, bias, 0, n);
    if (mx == kNegInf) {
      std::fill(row, row + n, 0.f);
      continue;
    }
    scale_row(row, n, 1.f / exp_sum(row, 0, n, mx));
  }
}

void rowwise_dot(const float* a, const float* b, float* delta, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) delta[r] = dot(a + r * d, b + r * d, d);
  });
}

void gemm_small(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  check_cpu();
  assert(n % kSmallPad == 0);
  // Column panels of 16 (B's panel, k x 16, stays in L1 while the row blocks stream past), a last one of 8.
  for (int64_t j = 0; j < n; j += 2 * kSmallPad) {
    const bool wide = n - j >= 2 * kSmallPad;
    for (int64_t i = 0; i < m; i += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, m - i);
      const float* ai = a + i * a_rs;
      float* ci = c + i * ldc + j;
      if (wide) {
        if (accumulate)
          micro_rows<2 * kNG, true>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
        else
          micro_rows<2 * kNG, false>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
      } else {
        if (accumulate)
          micro_rows<kNG, true>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
        else
          micro_rows<kNG, false>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
      }
    }
  }
}

int64_t landmark_attend_work(int64_t np, int64_t d) { return kLmTile * np + kLmTile * pad_small(d) + 3 * np; }

void landmark_attend(const float* qlT, int64_t n, int64_t np, const float* k, const float* v, const float* bias,
                     int64_t S, int64_t d, float scale, float* t, float* work) {
  check_cpu();
  const int64_t dp = pad_small(d);
  float* s = work;                   // (kLmTile x np) scores, then probabilities
  float* vt = s + kLmTile * np;      // (kLmTile x dp) v tile padded to whole vectors (when d % kSmallPad != 0)
  float* m = vt + kLmTile * dp;      // running max per landmark
  float* l = m + np;                 // running sum
  float* alpha = l + np;             // rescale of this tile
  std::fill(m, m + np, kNegInf);
  std::fill(l, l + np, 0.f);
  std::fill(t, t + n * dp, 0.f);
  const Vec vninf(kNegInf), vzero(0.f);
  for (int64_t j0 = 0; j0 < S; j0 += kLmTile) {
    const int64_t tk = std::min(kLmTile, S - j0);
    const float* bj = bias ? bias + j0 : nullptr;
    if (bj && std::all_of(bj, bj + tk, [](float x) { return x == kNegInf; })) continue;  // all keys padded
    gemm_small(tk, np, d, scale, k + j0 * d, d, 1, qlT, np, s, np, false);
    // Column (landmark) max over the tile's keys, masked keys -inf; new running max; rescale factor.
    for (int64_t c = 0; c < np; c += kV) {
      Vec mx = vninf;
      for (int64_t r = 0; r < tk; ++r) {
        float* sr = s + r * np + c;
        if (bj && bj[r] != 0.f) {
          vninf.store(sr);
          continue;
        }
        mx = at::vec::maximum(mx, Vec::loadu(sr));
      }
      const Vec mold = Vec::loadu(m + c), mnew = at::vec::maximum(mold, mx);
      // A landmark with no usable key yet keeps max -inf: subtract 0 instead (exp(-inf) = 0, no NaN).
      const Vec msafe = Vec::blendv(mnew, vzero, mnew == vninf);
      const Vec al = (mold - msafe).exp_u20();
      mnew.store(m + c);
      msafe.store(alpha + c);  // stash msafe here until the exp pass below
      (Vec::loadu(l + c) * al).store(l + c);
      // Rescale rows c.. of t by al (only rows < n exist; rows whose max did not change have al = 1).
      float alb[kV];
      al.store(alb);
      for (int64_t i = 0; i < kV && c + i < n; ++i)
        if (alb[i] != 1.f) scale_row(t + (c + i) * dp, dp, alb[i]);
    }
    // p = exp(s - msafe), column sums into l.
    for (int64_t c = 0; c < np; c += kV) {
      const Vec ms = Vec::loadu(alpha + c);
      Vec sum(0.f);
      for (int64_t r = 0; r < tk; ++r) {
        float* sr = s + r * np + c;
        const Vec e = (Vec::loadu(sr) - ms).exp_u20();
        e.store(sr);
        sum = sum + e;
      }
      (Vec::loadu(l + c) + sum).store(l + c);
    }
    const float* vb = v + j0 * d;
    if (d != dp) {
      for (int64_t r = 0; r < tk; ++r) {
        std::copy(vb + r * d, vb + (r + 1) * d, vt + r * dp);
        std::fill(vt + r * dp + d, vt + (r + 1) * dp, 0.f);
      }
      vb = vt;
    }
    // t (n x dp) += p^T (n x tk) @ v_tile (tk x dp): p read transposed (landmark l, key r at s[r * np + l]).
    gemm_small(n, dp, tk, 1.f, s, 1, np, vb, dp, t, dp, true);
  }
  for (int64_t i = 0; i < n; ++i) {
    float* ti = t + i * dp;
    if (l[i] > 0.f)
      scale_row(ti, dp, 1.f / l[i]);
    else
      std::fill(ti, ti + dp, 0.f);
  }
}

void run_forward(const Problem& p, float* out, float* lse) {
  check_cpu();
  const int64_t tiles = (p.Sq + p.bq - 1) / p.bq;
  const int64_t total = p.B * p.H * tiles;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    Work w(p.bq, p.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / tiles, tile = t % tiles, b = bh / p.H, h = bh % p.H;
      const int64_t i0 = tile * p.bq, rows = std::min(p.bq, p.Sq - i0);
      SrcView src[2] = {
          {p.k + bh * p.Sk * p.D, p.v + bh * p.Sk * p.D, p.kbias ? p.kbias + b * p.Sk : nullptr, p.w >= 0},
          {p.kx ? p.kx + bh * p.Sx * p.D : nullptr, p.vx ? p.vx + bh * p.Sx * p.D : nullptr,
           p.kxbias ? p.kxbias + b * p.Sx : nullptr, false}};
      w.segs.clear();
      p.segments(b, h, i0, rows, w.segs);
      const int64_t row0 = bh * p.Sq + i0;
      forward_tile(p, src, p.q + row0 * p.D, p.qskip ? p.qskip + b * p.Sq + i0 : nullptr, i0, rows, w,
                   out + row0 * p.D, lse + row0);
    }
  });
}

void run_backward(const Problem& p, const float* dout, const float* lse, const float* delta, float* dq, float* dk,
                  float* dv, float* dkx, float* dvx) {
  check_cpu();
  const int64_t tiles = (p.Sq + p.bq - 1) / p.bq;
  const int64_t bhs = p.B * p.H;
  // dK/dV of different query tiles overlap: a task owns all tiles of a (b, h) chunk. With few (b, h) pairs
  // the query tiles are split into chunks that accumulate into private buffers, summed afterwards.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, (4 * threads + bhs - 1) / bhs));
  const int64_t tiles_per = (tiles + chunks - 1) / chunks;
  const int64_t nk = p.Sk * p.D, nx = p.Sx * p.D;
  std::vector<float> part;  // (chunks - 1, B*H, 2 * (nk + nx)) private accumulators of chunks 1..
  if (chunks > 1) part.assign((chunks - 1) * bhs * 2 * (nk + nx), 0.f);
  at::parallel_for(0, bhs * chunks, 1, [&](int64_t begin, int64_t end) {
    Work w(p.bq, p.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, c = t % chunks, b = bh / p.H, h = bh % p.H;
      SrcView src[2] = {
          {p.k + bh * nk, p.v + bh * nk, p.kbias ? p.kbias + b * p.Sk : nullptr, p.w >= 0},
          {p.kx ? p.kx + bh * nx : nullptr, p.vx ? p.vx + bh * nx : nullptr,
           p.kxbias ? p.kxbias + b * p.Sx : nullptr, false}};
      GradView grad[2];
      if (c == 0) {
        grad[0] = {dk + bh * nk, dv + bh * nk};
        grad[1] = {dkx ? dkx + bh * nx : nullptr, dvx ? dvx + bh * nx : nullptr};
      } else {
        float* base = part.data() + ((c - 1) * bhs + bh) * 2 * (nk + nx);
        grad[0] = {base, base + nk};
        grad[1] = {base + 2 * nk, base + 2 * nk + nx};
      }
      for (int64_t tile = c * tiles_per; tile < std::min(tiles, (c + 1) * tiles_per); ++tile) {
        const int64_t i0 = tile * p.bq, rows = std::min(p.bq, p.Sq - i0);
        w.segs.clear();
        p.segments(b, h, i0, rows, w.segs);
        const int64_t row0 = bh * p.Sq + i0;
        backward_tile(p, src, grad, p.q + row0 * p.D, dout + row0 * p.D, lse + row0, delta + row0,
                      p.qskip ? p.qskip + b * p.Sq + i0 : nullptr, i0, rows, w, dq + row0 * p.D);
      }
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, bhs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        for (int64_t c = 1; c < chunks; ++c) {
          const float* base = part.data() + ((c - 1) * bhs + bh) * 2 * (nk + nx);
          float* dst[4] = {dk + bh * nk, dv + bh * nk, dkx ? dkx + bh * nx : nullptr, dvx ? dvx + bh * nx : nullptr};
          const float* srcp[4] = {base, base + nk, base + 2 * nk, base + 2 * nk + nx};
          const int64_t len[4] = {nk, nk, nx, nx};
          for (int i = 0; i < 4; ++i) {
            if (!dst[i]) continue;
            for (int64_t j = 0; j < len[i]; ++j) dst[i][j] += srcp[i][j];
          }
        }
      }
    });
  }
}

}  // namespace etkd::cpu

#if defined(ETKD_AVX2)
#pragma GCC pop_options
#endif
