// FlashAttention-style CPU tiles and their (batch, head, query tile) driver, compiled once per ISA target by
// csrc/cpu/isa/*.cpp (see isa.h). The including file has already set the target pragma, CPU_CAPABILITY (so
// at::vec::Vectorized is that target's width) and ETKD_ISA / ETKD_ISA_NAME; ETKD_NATIVE_BF16 = 1 adds the bf16
// tile path (MKL's bf16 x bf16 -> fp32 GEMM, AVX512-BF16 conversions). Everything here lives in
// etkd::cpu::ETKD_ISA, so the targets never share a symbol.
#pragma once

#include <ATen/cpu/vec/functional.h>

namespace etkd::cpu::ETKD_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Element types. T: how q, k, v, out and dout are stored (float, c10::BFloat16, c10::Half). C: what the tile
// products take: float (sgemm; 16-bit tiles are converted on load into L1/L2-resident scratch), or
// c10::BFloat16 on the native target (MKL's bf16 x bf16 -> fp32 GEMM, AVX512-BF16 or AMX-BF16 inside MKL).
// Softmax statistics, the output accumulator and gradients are always float.
using c10::BFloat16;
using c10::Half;

inline void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_rm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// y[0:n] = float(x[0:n]) for a 16-bit x.
template <class T>
void to_float(const T* x, float* y, int64_t n) {
  using VT = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + VT::size() <= n; j += VT::size()) {
    auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(x + j));
    lo.store(y + j);
    hi.store(y + j + kV);
  }
  for (; j < n; ++j) y[j] = static_cast<float>(x[j]);
}

// y[0:n] = T(x[0:n]), round to nearest even.
template <class T>
void from_float(const float* x, T* y, int64_t n) {
  using VT = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + VT::size() <= n; j += VT::size())
    at::vec::convert_from_float<T>(Vec::loadu(x + j), Vec::loadu(x + j + kV)).store(y + j);
  for (; j < n; ++j) y[j] = static_cast<T>(x[j]);
}

#if ETKD_NATIVE_BF16
inline void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const BFloat16* a, int64_t lda,
               const BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  cblas_gemm_bf16bf16f32(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
                         static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha,
                         reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
                         reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// from_float for bf16 with the AVX512-BF16 instruction (vcvtneps2bf16, round to nearest even).
inline void from_float(const float* x, BFloat16* y, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
  if (j < n) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (n - j)) - 1);
    _mm256_mask_storeu_epi16(y + j, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x + j)));
  }
}
#endif

// x[0:n] (stored as T) as the tile products take it (C): itself when T == C, else converted into buf.
template <class C, class T>
inline const C* operand(const T* x, int64_t n, C* buf) {
  if constexpr (std::is_same_v<T, C>) {
    return x;
  } else if constexpr (std::is_same_v<C, float>) {
    to_float(x, buf, n);
    return buf;
  } else {
    static_assert(std::is_same_v<T, float>, "operand: 16-bit to 16-bit");
    from_float(x, buf, n);
    return buf;
  }
}

// out[0:n] = a * x[0:n], stored as T.
template <class T>
void store_scaled(const float* x, float a, T* out, int64_t n) {
  const Vec va(a);
  if constexpr (std::is_same_v<T, float>) {
    int64_t j = 0;
    for (; j + kV <= n; j += kV) (Vec::loadu(x + j) * va).store(out + j);
    for (; j < n; ++j) out[j] = x[j] * a;
  } else {
    float tmp[256];
    for (int64_t j0 = 0; j0 < n; j0 += 256) {
      const int64_t m = std::min<int64_t>(256, n - j0);
      store_scaled(x + j0, a, tmp, m);
      from_float(tmp, out + j0, m);
    }
  }
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

template <class T>
struct SrcView {
  const T* k;
  const T* v;
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

template <class T, class C>
struct Work {
  static constexpr bool kConvert = !std::is_same_v<T, C>;  // inputs converted per tile
  static constexpr bool kNarrow = !std::is_same_v<C, float>;  // P and dS rounded to C for the products
  std::vector<float> s, dp, acc, m, l;
  std::vector<C> s16, dp16, qb, kb, vb, db;
  std::vector<Seg> segs;
  explicit Work(int64_t bq, int64_t d)
      : s(bq * kMaxSeg), dp(bq * kMaxSeg), acc(bq * d), m(bq), l(bq),
        s16(kNarrow ? bq * kMaxSeg : 0), dp16(kNarrow ? bq * kMaxSeg : 0), qb(kConvert ? bq * d : 0),
        kb(kConvert ? kMaxSeg * d : 0), vb(kConvert ? kMaxSeg * d : 0), db(kConvert ? bq * d : 0) {}
};

// One query tile: rows q[0:rows] (absolute index i0 + r), forward.
template <class T, class C>
void forward_tile(const Problem& p, const SrcView<T>* src, const T* q_, const uint8_t* skip, int64_t i0, int64_t rows,
                  Work<T, C>& w, T* out, float* lse) {
  const int64_t d = p.D;
  const C* q = operand<C>(q_, rows * d, w.qb.data());
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.f);
  for (const Seg& sg : w.segs) {
    const SrcView<T>& sv = src[sg.src];
    const int64_t n = sg.n;
    const C* kp = operand<C>(sv.k + sg.k0 * d, n * d, w.kb.data());
    float* s = w.s.data();
    mm(false, true, rows, n, d, p.scale, q, d, kp, d, 0.f, s, n);
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
    if (any) {
      const C* vp = operand<C>(sv.v + sg.k0 * d, n * d, w.vb.data());
      mm(false, false, rows, d, n, 1.f, operand<C>(s, rows * n, w.s16.data()), n, vp, d, 1.f, w.acc.data(), d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * d;
    if (w.l[r] > 0.f) {
      store_scaled(w.acc.data() + r * d, 1.f / w.l[r], o, d);
      lse[r] = w.m[r] + std::log(w.l[r]);
    } else {
      std::fill(o, o + d, T(0.f));
      lse[r] = kInf;
    }
  }
}

struct GradView {
  float* dk;
  float* dv;
};

// One query tile, backward: accumulates into dq (rows x d) and the sources' dk/dv.
template <class T, class C>
void backward_tile(const Problem& p, const SrcView<T>* src, const GradView* grad, const T* q_, const T* dout_,
                   const float* lse, const float* delta, const uint8_t* skip, int64_t i0, int64_t rows,
                   Work<T, C>& w, float* dq) {
  const int64_t d = p.D;
  const C* q = operand<C>(q_, rows * d, w.qb.data());
  const C* dout = operand<C>(dout_, rows * d, w.db.data());
  for (const Seg& sg : w.segs) {
    const SrcView<T>& sv = src[sg.src];
    const int64_t n = sg.n;
    const C* kp = operand<C>(sv.k + sg.k0 * d, n * d, w.kb.data());
    float* s = w.s.data();
    float* dp = w.dp.data();
    mm(false, true, rows, n, d, p.scale, q, d, kp, d, 0.f, s, n);
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
    const C* vp = operand<C>(sv.v + sg.k0 * d, n * d, w.vb.data());
    mm(true, false, n, d, rows, 1.f, operand<C>(s, rows * n, w.s16.data()), n, dout, d, 1.f, g.dv + sg.k0 * d, d);
    mm(false, true, rows, n, d, 1.f, dout, d, vp, d, 0.f, dp, n);
    for (int64_t r = 0; r < rows; ++r) softmax_grad_row(s + r * n, dp + r * n, n, delta[r]);
    const C* ds = operand<C>(dp, rows * n, w.dp16.data());
    mm(false, false, rows, d, n, p.scale, ds, n, kp, d, 1.f, dq, d);
    mm(true, false, n, d, rows, p.scale, ds, n, q, d, 1.f, g.dk + sg.k0 * d, d);
  }
}

// C rows [0, MR) x columns [0, NV * kV) of gemm_small: MR x NV accumulators (6 x 2 = 12 of the 16 ymm or 32 zmm
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

constexpr int kMR = 6;  // micro-kernel rows
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


void gemm_small(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  assert(n % kSmallPad == 0);
  // Column panels of two vectors (B's panel, k x 2 kV, stays in L1 while the row blocks stream past), a last
  // one of one vector when n is an odd number of vectors.
  for (int64_t j = 0; j < n; j += 2 * kV) {
    const bool wide = n - j >= 2 * kV;
    for (int64_t i = 0; i < m; i += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, m - i);
      const float* ai = a + i * a_rs;
      float* ci = c + i * ldc + j;
      if (wide) {
        if (accumulate)
          micro_rows<2, true>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
        else
          micro_rows<2, false>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
      } else {
        if (accumulate)
          micro_rows<1, true>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
        else
          micro_rows<1, false>(mr, k, alpha, ai, a_rs, a_ks, b + j, ldb, ci, ldc);
      }
    }
  }
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

void landmark_attend(const float* qlT, int64_t n, int64_t np, const float* k, const float* v, const float* bias,
                     int64_t S, int64_t d, float scale, float* t, float* work) {
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
template <class T, class C>
void forward_as(const Problem& p, T* out, float* lse) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* kx = static_cast<const T*>(p.kx);
  const T* vx = static_cast<const T*>(p.vx);
  const int64_t tiles = (p.Sq + p.bq - 1) / p.bq;
  const int64_t total = p.B * p.H * tiles;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    Work<T, C> w(p.bq, p.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / tiles, tile = t % tiles, b = bh / p.H, h = bh % p.H;
      const int64_t i0 = tile * p.bq, rows = std::min(p.bq, p.Sq - i0);
      SrcView<T> src[2] = {
          {k + bh * p.Sk * p.D, v + bh * p.Sk * p.D, p.kbias ? p.kbias + b * p.Sk : nullptr, p.w >= 0},
          {kx ? kx + bh * p.Sx * p.D : nullptr, vx ? vx + bh * p.Sx * p.D : nullptr,
           p.kxbias ? p.kxbias + b * p.Sx : nullptr, false}};
      w.segs.clear();
      p.segments(b, h, i0, rows, w.segs);
      const int64_t row0 = bh * p.Sq + i0;
      forward_tile(p, src, q + row0 * p.D, p.qskip ? p.qskip + b * p.Sq + i0 : nullptr, i0, rows, w,
                   out + row0 * p.D, lse + row0);
    }
  });
}

template <class T, class C>
void backward_as(const Problem& p, const T* dout, const float* lse, const float* delta, float* dq, float* dk, float* dv,
                 float* dkx, float* dvx) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* kx = static_cast<const T*>(p.kx);
  const T* vx = static_cast<const T*>(p.vx);
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
    Work<T, C> w(p.bq, p.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / chunks, c = t % chunks, b = bh / p.H, h = bh % p.H;
      SrcView<T> src[2] = {
          {k + bh * nk, v + bh * nk, p.kbias ? p.kbias + b * p.Sk : nullptr, p.w >= 0},
          {kx ? kx + bh * nx : nullptr, vx ? vx + bh * nx : nullptr, p.kxbias ? p.kxbias + b * p.Sx : nullptr,
           false}};
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
        backward_tile(p, src, grad, q + row0 * p.D, dout + row0 * p.D, lse + row0, delta + row0,
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

// bf16 tiles multiplied as bf16: the native target, when the torch build exports MKL's bf16 GEMM.
bool native_bf16() {
#if ETKD_NATIVE_BF16
  return cblas_gemm_bf16bf16f32 != nullptr;
#else
  return false;
#endif
}

void run_forward(const Problem& p, void* out, float* lse) {
  switch (p.elem) {
    case Elem::f32: return forward_as<float, float>(p, static_cast<float*>(out), lse);
    case Elem::f16: return forward_as<Half, float>(p, static_cast<Half*>(out), lse);
    case Elem::bf16:
#if ETKD_NATIVE_BF16
      if (native_bf16()) return forward_as<BFloat16, BFloat16>(p, static_cast<BFloat16*>(out), lse);
#endif
      return forward_as<BFloat16, float>(p, static_cast<BFloat16*>(out), lse);
  }
}

void run_backward(const Problem& p, const void* dout, const float* lse, const float* delta, float* dq, float* dk,
                  float* dv, float* dkx, float* dvx) {
  switch (p.elem) {
    case Elem::f32:
      return backward_as<float, float>(p, static_cast<const float*>(dout), lse, delta, dq, dk, dv, dkx, dvx);
    case Elem::f16:
      return backward_as<Half, float>(p, static_cast<const Half*>(dout), lse, delta, dq, dk, dv, dkx, dvx);
    case Elem::bf16:
#if ETKD_NATIVE_BF16
      if (native_bf16())
        return backward_as<BFloat16, BFloat16>(p, static_cast<const BFloat16*>(dout), lse, delta, dq, dk, dv, dkx,
                                               dvx);
#endif
      return backward_as<BFloat16, float>(p, static_cast<const BFloat16*>(dout), lse, delta, dq, dk, dv, dkx, dvx);
  }
}

}  // namespace

// This target's table (isa.cpp). native_bf16 needs MKL's bf16 GEMM in the torch build (a weak symbol).
const Kernels& table() {
  static const Kernels t = [] {
    Kernels k;
    k.name = ETKD_ISA_NAME;
    k.native_bf16 = native_bf16();
    k.run_forward = run_forward;
    k.run_backward = run_backward;
    k.gemm_small = gemm_small;
    k.landmark_attend = landmark_attend;
    k.softmax_rows = softmax_rows;
    k.rowwise_dot = rowwise_dot;
    return k;
  }();
  return t;
}

}  // namespace etkd::cpu::ETKD_ISA
