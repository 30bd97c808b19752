// FlashAttention-style CPU tiles and their (batch, head, query tile) driver, compiled once per ISA target by
// csrc/cpu/isa/*.cpp (see isa.h). The including file has already set the target pragma, CPU_CAPABILITY (so
// at::vec::Vectorized is that target's width) and ETKD_ISA / ETKD_ISA_NAME; ETKD_NATIVE_BF16 = 1 adds the bf16
// tile path (MKL's bf16 x bf16 -> fp32 GEMM, AVX512-BF16 conversions). Everything here lives in
// etkd::cpu::ETKD_ISA, so the targets never share a symbol.
#pragma once

#include <ATen/cpu/vec/functional.h>

#ifndef ETKD_OWN_PRODUCTS
#define ETKD_OWN_PRODUCTS 1  // the portable target (generic.cpp) leaves its tile products to BLAS
#endif

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
  if (gemm_degenerate(m, n, k, beta, c, ldc)) return;
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

// ---- Attention dropout: keep bits of the contract (flash_tile.h Dropout, etkd_kernels/_shared.py) ----
// The keep bits of a tile are generated per segment for all its rows at once (tile_keep -> keep_grid): the Philox4x32-10
// calls of the tile's (row, 8-column group) grid run 16 (AVX-512) or 8 (AVX2) to a vector whatever the rows' lengths,
// so a 64-key segment (a block-sparse block: 8 calls a row) fills whole vectors rather than half of one. A call's 8
// keep bits are one byte. They are applied where P is formed (the fp32 exp pass, or before P is rounded to bf16 on the
// native bf16 paths); the backward regenerates them.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// c = Philox4x32-10(c, (k0, k1)), one counter.
inline void philox_one(uint32_t* c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) k0 += kPhiloxW0, k1 += kPhiloxW1;
    const uint64_t p0 = uint64_t(kPhiloxM0) * c[0], p1 = uint64_t(kPhiloxM1) * c[2];
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0, n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[0] = n0, c[1] = uint32_t(p1), c[2] = n2, c[3] = uint32_t(p0);
  }
}

// Keep bit of (batch-head bh, row, column col), one Philox call (gathered columns: global keys).
inline bool keep_one(const Dropout& dr, uint32_t bh, uint32_t row, int64_t col) {
  uint32_t c[4] = {uint32_t(col >> 3), row, bh, dr.offset};
  philox_one(c, dr.key0, dr.key1);
  return ((c[(col & 7) >> 1] >> (16 * (col & 1))) & 0xFFFFu) >= dr.thr;
}

// Words of one row's keep bits: a segment's columns and the covering key blocks around them, plus the 64 bits
// Keep::at64 reads past the last one.
constexpr int64_t kKeepWords = (kMaxSeg + 2 * 64 + 8) / 64 + 4;

#if defined(CPU_CAPABILITY_AVX512)
#define ETKD_SIMD_PHILOX 1
using VI = __m512i;
constexpr int kKeepLanes = 16;
inline VI vset1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline VI vxor(VI a, VI b) { return _mm512_xor_si512(a, b); }
// (hi, lo) 32-bit halves of a * m in every lane (m the same in every lane). Odd lanes move to even ones and back by
// shuffles (port 5 on Intel) rather than shifts, which would queue behind the multiplies on port 0.
inline void mul_hilo(VI a, VI m, VI& hi, VI& lo) {
  const VI pe = _mm512_mul_epu32(a, m), po = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(pe, _MM_PERM_DDBB), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_shuffle_epi32(po, _MM_PERM_CCAA));
}
// Keep bits of the 16 calls of Philox outputs x0..x3 (lane 4k + m: call 4m + k): call i is byte i of out[0:2].
inline void keep_bytes(VI x0, VI x1, VI x2, VI x3, uint32_t thr, uint64_t* out) {
  const VI t = _mm512_set1_epi16(static_cast<int16_t>(thr));
  const VI a = _mm512_unpacklo_epi32(x0, x1), b = _mm512_unpacklo_epi32(x2, x3);
  const VI c = _mm512_unpackhi_epi32(x0, x1), d = _mm512_unpackhi_epi32(x2, x3);
  const uint64_t k0 = _mm512_cmpge_epu16_mask(_mm512_unpacklo_epi64(a, b), t);
  const uint64_t k1 = _mm512_cmpge_epu16_mask(_mm512_unpackhi_epi64(a, b), t);
  const uint64_t k2 = _mm512_cmpge_epu16_mask(_mm512_unpacklo_epi64(c, d), t);
  const uint64_t k3 = _mm512_cmpge_epu16_mask(_mm512_unpackhi_epi64(c, d), t);
  out[0] = k0 | (k1 << 32);
  out[1] = k2 | (k3 << 32);
}
// The call each lane runs in keep_grid: lane 4k + m runs call 4m + k, so that after keep_bytes' transposes vector m
// holds calls 4m .. 4m + 3.
constexpr int32_t kLanePerm[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
// x where the low kV bits of `bits` are set, 0 elsewhere.
inline Vec keep_vec(Vec x, uint64_t bits) { return Vec(_mm512_maskz_mov_ps(static_cast<__mmask16>(bits), x)); }
#elif defined(CPU_CAPABILITY_AVX2)
#define ETKD_SIMD_PHILOX 1
using VI = __m256i;
constexpr int kKeepLanes = 8;
inline VI vset1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline VI vxor(VI a, VI b) { return _mm256_xor_si256(a, b); }
inline void mul_hilo(VI a, VI m, VI& hi, VI& lo) {  // as the AVX-512 one
  const VI pe = _mm256_mul_epu32(a, m), po = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xF5), m);
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(pe, 0xF5), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_shuffle_epi32(po, 0xA0), 0xAA);
}
// 32 keep flags (0xFFFF per kept column) of x, y (16 columns each, in order) -> 32 bits in column order.
inline uint64_t keep_mask32(__m256i x, __m256i y, __m256i thr) {
  const __m256i kx = _mm256_cmpeq_epi16(_mm256_max_epu16(x, thr), x);
  const __m256i ky = _mm256_cmpeq_epi16(_mm256_max_epu16(y, thr), y);
  // packs interleaves the 128-bit lanes (x.lo, y.lo, x.hi, y.hi); the permute restores column order.
  const __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi16(kx, ky), 0xD8);
  return static_cast<uint32_t>(_mm256_movemask_epi8(b));
}
// As the AVX-512 one; 8 calls (lane 4k + m: call 2m + k) in out[0].
inline void keep_bytes(VI x0, VI x1, VI x2, VI x3, uint32_t thr, uint64_t* out) {
  const VI t = _mm256_set1_epi16(static_cast<int16_t>(thr));
  const VI a = _mm256_unpacklo_epi32(x0, x1), b = _mm256_unpacklo_epi32(x2, x3);
  const VI c = _mm256_unpackhi_epi32(x0, x1), d = _mm256_unpackhi_epi32(x2, x3);
  out[0] = keep_mask32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b), t) |
           (keep_mask32(_mm256_unpacklo_epi64(c, d), _mm256_unpackhi_epi64(c, d), t) << 32);
}
// Lane 4k + m runs call 2m + k: after the transposes vector m holds calls 2m, 2m + 1.
constexpr int32_t kLanePerm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
inline Vec keep_vec(Vec x, uint64_t bits) {
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits & 0xFF)), lane);
  return Vec(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, lane))));
}
#else
constexpr int kKeepLanes = 8;
inline Vec keep_vec(Vec x, uint64_t bits) {
  float y[kV];
  x.store(y);
  for (int64_t t = 0; t < kV; ++t)
    if (!((bits >> t) & 1)) y[t] = 0.f;
  return Vec::loadu(y);
}
#endif

#if ETKD_SIMD_PHILOX
// Philox4x32-10 of the counters (x0, x1, x2, x3) in every lane, key (k0, k1).
inline void philox_rounds(VI& x0, VI& x1, VI& x2, VI& x3, uint32_t k0, uint32_t k1) {
  const VI m0 = vset1(kPhiloxM0), m1 = vset1(kPhiloxM1);
  for (int r = 0; r < 10; ++r) {
    if (r) k0 += kPhiloxW0, k1 += kPhiloxW1;
    VI hi0, lo0, hi1, lo1;
    mul_hilo(x0, m0, hi0, lo0);
    mul_hilo(x2, m1, hi1, lo1);
    x0 = vxor(vxor(hi1, x1), vset1(k0));
    x2 = vxor(vxor(hi0, x3), vset1(k1));
    x1 = lo1, x3 = lo0;
  }
}
#endif

// The keep bits of a grid of Philox calls: rows ri < R (row counter row0 + ri, or rowc[ri] when rowc is set) by the
// 8-column groups g0 .. g0 + G - 1; call f = ri * G + (g - g0) stores its 8 keep bits (column 8g + t: bit t) as byte
// f of out (which takes up to 16 bytes past R * G). The lanes of a vector are 16 (AVX-512) or 8 (AVX2) consecutive
// calls whatever the rows' lengths, so a 64-key segment (8 calls a row) fills whole vectors; each lane finds its
// (row, group) from f by a float division corrected to the exact quotient.
void keep_grid(const Dropout& dr, uint32_t bh, uint32_t row0, const uint32_t* rowc, int64_t R, int64_t g0, int64_t G,
               uint8_t* out) {
  const int64_t n = R * G;
#if ETKD_SIMD_PHILOX
  // Lane l runs call f0 + kLanePerm[l] (see kLanePerm); its (row r, group g0 + rem) follow from the call index, kept
  // up to date as f0 steps by kKeepLanes: rem += kKeepLanes, then at most ceil(kKeepLanes / G) carries into r.
  using VInt = at::vec::Vectorized<int32_t>;
  static_assert(VInt::size() == kKeepLanes, "keep_grid: one int lane per Philox call");
  alignas(64) int32_t ri[kKeepLanes], rm[kKeepLanes];
  for (int l = 0; l < kKeepLanes; ++l) ri[l] = kLanePerm[l] / G, rm[l] = kLanePerm[l] % G;
  VInt r = VInt::loadu(ri), rem = VInt::loadu(rm);
  const VInt vg(static_cast<int32_t>(G)), last(static_cast<int32_t>(R - 1)), one(1), step(kKeepLanes);
  const int64_t carries = (kKeepLanes + G - 1) / G;
  for (int64_t f0 = 0; f0 < n; f0 += kKeepLanes) {
    VI x0 = VInt(static_cast<int32_t>(g0)) + rem;
    VI x1;
    const VInt rr = at::vec::minimum(r, last);  // lanes past n: any row, never stored
    if (rowc) {
      rr.store(ri);
      for (int l = 0; l < kKeepLanes; ++l) rm[l] = static_cast<int32_t>(rowc[ri[l]]);
      x1 = VInt::loadu(rm);
    } else {
      x1 = VInt(static_cast<int32_t>(row0)) + rr;
    }
    VI x2 = vset1(bh), x3 = vset1(dr.offset);
    philox_rounds(x0, x1, x2, x3, dr.key0, dr.key1);
    uint64_t bytes[kKeepLanes / 8];
    keep_bytes(x0, x1, x2, x3, dr.thr, bytes);
    std::memcpy(out + f0, bytes, sizeof(bytes));
    rem = rem + step;
    for (int64_t c = 0; c < carries; ++c) {
      const VInt m = rem >= vg;  // all ones where the call has passed its row's last group
      r = r + (m & one), rem = rem - (m & vg);
    }
  }
#else
  for (int64_t f = 0; f < n; ++f) {
    const int64_t ri = f / G;
    uint32_t c[4] = {static_cast<uint32_t>(g0 + f % G), rowc ? rowc[ri] : row0 + static_cast<uint32_t>(ri), bh,
                     dr.offset};
    philox_one(c, dr.key0, dr.key1);
    uint8_t b = 0;
    for (int t = 0; t < 8; ++t) b |= uint8_t((((c[t >> 1] >> (16 * (t & 1))) & 0xFFFFu) >= dr.thr) << t);
    out[f] = b;
  }
#endif
}

// The keep bits of one row of a segment: column t of the segment (0 <= t < sg.n) is bit t + shift of w.
struct Keep {
  const uint64_t* w = nullptr;
  int64_t shift = 0;
  // 64 bits from column t on.
  uint64_t at64(int64_t t) const {
    const int64_t pos = t + shift, q = pos >> 6, r = pos & 63;
    return r ? (w[q] >> r) | (w[q + 1] << (64 - r)) : w[q];
  }
  bool at(int64_t t) const { return (w[(t + shift) >> 6] >> ((t + shift) & 63)) & 1; }
};

// s[lo:hi] += bias[lo:hi] (bias may be null); returns max over s[lo:hi]. Plain vector max (clamp_min: the
// inputs are finite, checked at the op's door, so maximum's NaN propagation is not needed), two accumulators.
float add_bias_max(float* s, const float* bias, int64_t lo, int64_t hi) {
  int64_t j = lo;
  Vec m0(kNegInf), m1(kNegInf);
  if (bias) {
    for (; j + kV <= hi; j += kV) {
      Vec x = Vec::loadu(s + j) + Vec::loadu(bias + j);
      x.store(s + j);
      m0 = at::vec::clamp_min(x, m0);
    }
  } else {
    for (; j + 2 * kV <= hi; j += 2 * kV) {
      m0 = at::vec::clamp_min(Vec::loadu(s + j), m0);
      m1 = at::vec::clamp_min(Vec::loadu(s + j + kV), m1);
    }
    for (; j + kV <= hi; j += kV) m0 = at::vec::clamp_min(Vec::loadu(s + j), m0);
  }
  float m = at::vec::clamp_min(m0, m1).reduce_max();
  for (; j < hi; ++j) {
    if (bias) s[j] += bias[j];
    m = std::max(m, s[j]);
  }
  return m;
}

// e = exp(s[lo:hi] - m) into kept[lo:hi] (e where the keep bits kp say so and 0 elsewhere: kDrop) and into
// s[lo:hi] (kAll: s keeps every e; else kept is s); returns the sum of every e (the softmax statistics count every
// key). m is finite.
template <bool kDrop, bool kAll>
float exp_sum_as(float* s, float* kept, int64_t lo, int64_t hi, float m, const Keep& kp) {
  int64_t j = lo;
  const Vec vm(m);
  Vec acc(0.f);
  for (; j + kV <= hi; j += kV) {
    const Vec e = (Vec::loadu(s + j) - vm).exp_u20();
    acc = acc + e;
    if constexpr (kAll) e.store(s + j);
    if constexpr (kDrop)
      keep_vec(e, kp.at64(j)).store(kept + j);
    else
      e.store(kept + j);
  }
  float sum = acc.reduce_add();
  for (; j < hi; ++j) {
    const float e = std::exp(s[j] - m);
    sum += e;
    if constexpr (kAll) s[j] = e;
    kept[j] = !kDrop || kp.at(j) ? e : 0.f;
  }
  return sum;
}

// s[lo:hi] = exp(s[lo:hi] - m), times the keep bits when kp has them (dropout); returns the sum of the exps.
float exp_sum(float* s, int64_t lo, int64_t hi, float m, const Keep& kp = Keep{}) {
  return kp.w ? exp_sum_as<true, false>(s, s, lo, hi, m, kp) : exp_sum_as<false, false>(s, s, lo, hi, m, kp);
}

#if ETKD_NATIVE_BF16
// The exps of the bf16 tiles are at::vec's fexp_u20 (degree-3 polynomial, relative error <= 1.2e-4 on the range
// softmax uses, measured against float64 exp over [-87, 0]) rather than exp_u20 (fp32 accuracy): P is rounded to
// bf16 right after (relative error up to 2^-9 = 2.0e-3), so the cheaper exp is 17x below what the rounding adds,
// and the row sums use the same values as P, so each row stays normalised.

// p[0:n] = bf16(exp(s[j] - m)) on [lo, hi), 0 elsewhere; returns the float32 sum of the exps (the softmax
// statistics stay unrounded, as in flash attention). The rounding is fused into the exp pass: P is written once,
// already in the product type. m is finite.
// With dropout (kp.w set), the dropped entries of P are zeroed before the rounding; the sum counts every key.
float exp_sum_bf16(const float* s, BFloat16* p, int64_t n, int64_t lo, int64_t hi, float m, const Keep& kp) {
  std::fill(p, p + lo, BFloat16(0.f));
  std::fill(p + hi, p + n, BFloat16(0.f));
  const __m512 vm = _mm512_set1_ps(m);
  Vec acc(0.f);
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    const Vec e = Vec(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm)).fexp_u20();
    acc = acc + e;
    const __m512 pe = kp.w ? _mm512_maskz_mov_ps(static_cast<__mmask16>(kp.at64(j)), e) : __m512(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(pe));
  }
  if (j < hi) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (hi - j)) - 1);
    const Vec e = Vec(_mm512_maskz_sub_ps(mk, _mm512_maskz_loadu_ps(mk, s + j), vm)).fexp_u20();
    acc = acc + Vec(_mm512_maskz_mov_ps(mk, e));
    const __mmask16 km = kp.w ? static_cast<__mmask16>(mk & kp.at64(j)) : mk;
    _mm256_mask_storeu_epi16(p + j, mk, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(km, e)));
  }
  return acc.reduce_add();
}
#endif

void scale_row(float* x, int64_t n, float a) {
  int64_t j = 0;
  const Vec va(a);
  for (; j + kV <= n; j += kV) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// y[0:n] += x[0:n].
void add_to(float* y, const float* x, int64_t n) {
  int64_t j = 0;
  for (; j + kV <= n; j += kV) (Vec::loadu(y + j) + Vec::loadu(x + j)).store(y + j);
  for (; j < n; ++j) y[j] += x[j];
}

// ds[j] = p[j] * (dp[j] - delta) in place in dp, on [j0, j1); kDrop: dp[j] counts only where the keep bits kp say so.
template <bool kDrop>
void softmax_grad_as(const float* p, float* dp, int64_t j0, int64_t j1, float delta, const Keep& kp) {
  int64_t j = j0;
  const Vec vd(delta);
  for (; j + kV <= j1; j += kV) {
    Vec g = Vec::loadu(dp + j);
    if constexpr (kDrop) g = keep_vec(g, kp.at64(j));
    (Vec::loadu(p + j) * (g - vd)).store(dp + j);
  }
  for (; j < j1; ++j) dp[j] = p[j] * ((!kDrop || kp.at(j) ? dp[j] : 0.f) - delta);
}

void softmax_grad_row(const float* p, float* dp, int64_t n, float delta) {
  softmax_grad_as<false>(p, dp, 0, n, delta, Keep{});
}

float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  Vec acc(0.f);
  for (; j + kV <= n; j += kV) acc = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc);
  float s = acc.reduce_add();
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// C rows [0, MR) x columns [0, NV * kV) of gemm_panels: MR x NV accumulators (6 x 4 = 24 of the 32 zmm
// registers on AVX-512, 6 x 2 = 12 of the 16 ymm on AVX2, plus NV loads of B and one broadcast of A per k step).
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

// The fp32 micro-kernel as gemm_panels takes it: A and B elements are floats, a vector holds kV columns.
struct FmaKernel {
  using Elt = float;
  static constexpr int64_t kCols = kV;
  template <int MR, int NV, bool ACC>
  static void run(int64_t k, float alpha, const Elt* a, int64_t a_rs, int64_t a_ks, const Elt* b, int64_t ldb,
                  float* c, int64_t ldc) {
    micro_kernel<MR, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
  }
};

#if ETKD_NATIVE_BF16
// ---- own bf16 tile products on vdpbf16ps (_mm512_dpbf16_ps), for AVX512-BF16 CPUs without AMX (Zen 4/5) ----
// One vdpbf16ps multiplies 16 pairs of bf16 by 16 pairs and adds both products of each pair into an fp32 lane:
// twice the multiply-adds of an fp32 FMA per instruction. So the reduction index runs in pairs: A element (r, p)
// is the 32-bit pair of bf16 at a[r * a_rs + p * a_ks] (reduction indices 2p, 2p + 1, broadcast to every lane),
// and B's pair row p (b + p * ldb, 32-bit units) holds, per column, the pair of reduction indices 2p, 2p + 1
// interleaved ([k/2][ldb][2]: the VNNI layout brgemm takes, so K and V are packed once per task for both).
// MR x NV accumulators as the fp32 kernel (6 x 4 of the 32 zmm), k counted in pairs.
template <int MR, int NV, bool ACC>
void dp_kernel(int64_t k2, float alpha, const uint32_t* a, int64_t a_rs, int64_t a_ks, const uint32_t* b,
               int64_t ldb, float* c, int64_t ldc) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k2; ++kk) {
    const uint32_t* bk = b + kk * ldb;
    const uint32_t* ak = a + kk * a_ks;
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bk + v * 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(ak[r * a_rs]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + v * 16;
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (ACC) x = _mm512_add_ps(x, _mm512_loadu_ps(cp));
      _mm512_storeu_ps(cp, x);
    }
}

struct DpKernel {
  using Elt = uint32_t;  // a pair of bf16
  static constexpr int64_t kCols = 16;
  template <int MR, int NV, bool ACC>
  static void run(int64_t k2, float alpha, const Elt* a, int64_t a_rs, int64_t a_ks, const Elt* b, int64_t ldb,
                  float* c, int64_t ldc) {
    dp_kernel<MR, NV, ACC>(k2, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
  }
};
#endif

constexpr int kMR = 6;  // micro-kernel rows
// Widest panel (vectors of B's columns) of the tile products: as many accumulators as the register file holds.
constexpr int kPanel = kV >= 16 ? 4 : 2;
// Depth of one pass over B (k rows): a PV product's V rows (kDepth x a panel) stay in L1 while the row blocks of
// P go past, instead of streaming the whole segment's V from L2 once per row block.
constexpr int64_t kDepth = 128;
// The AVX2 target's attention tile products (tile_panels) take the passes over k outside the column panels, kDepthOuter
// rows of B each: A's chunk (64 query rows x 64 floats = 16 KiB: the P or dS rows of PV and dQ) is then read from L1
// by every panel; 64 x kDepth floats (32 KiB, a whole Zen 3 L1D) cannot stay in L1 between panels. AMD EPYC Zen 3,
// 1 thread, process CPU time, BigBird / sliding window fwd+bwd (12 x 4096 x 64), 7 alternating rounds, loaded: 615 ->
// 588 ms and 508 -> 480 ms (medians). AVX-512 (48 KiB L1D on the Xeons measured) and Nystrom's products keep kDepth
// inside (gemm_panels).
constexpr bool kDepthOutside = kV < 16;
constexpr int64_t kDepthOuter = 64;
static_assert(kSmallPad % kV == 0, "gemm_small: kSmallPad must be a whole number of vectors");

template <class K, int NV, bool ACC>
void micro_rows(int64_t mr, int64_t k, float alpha, const typename K::Elt* a, int64_t a_rs, int64_t a_ks,
                const typename K::Elt* b, int64_t ldb, float* c, int64_t ldc) {
  switch (mr) {
    case 6: return K::template run<6, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 5: return K::template run<5, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 4: return K::template run<4, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 3: return K::template run<3, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    case 2: return K::template run<2, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
    default: return K::template run<1, NV, ACC>(k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
  }
}

// One panel of nv <= NV vectors over all rows (the NV of the template down to the nv at run time).
template <class K, int NV>
void panel_rows(int64_t nv, bool accumulate, int64_t m, int64_t k, float alpha, const typename K::Elt* a,
                int64_t a_rs, int64_t a_ks, const typename K::Elt* b, int64_t ldb, float* c, int64_t ldc) {
  if constexpr (NV > 1) {
    if (nv < NV) return panel_rows<K, NV - 1>(nv, accumulate, m, k, alpha, a, a_rs, a_ks, b, ldb, c, ldc);
  }
  for (int64_t i = 0; i < m; i += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, m - i);
    if (accumulate)
      micro_rows<K, NV, true>(mr, k, alpha, a + i * a_rs, a_rs, a_ks, b, ldb, c + i * ldc, ldc);
    else
      micro_rows<K, NV, false>(mr, k, alpha, a + i * a_rs, a_rs, a_ks, b, ldb, c + i * ldc, ldc);
  }
}

// C (m x n) = alpha * A @ B, or C += alpha * A @ B when `accumulate`; n a whole number of vectors (K::kCols), A
// element (r, kk) at a[r * a_rs + kk * a_ks], B (k x n) and C row-major (K: the micro-kernel and its element,
// FmaKernel or DpKernel, whose k counts pairs). Column panels of up to NV vectors (B's panel stays in L1 while the
// row blocks stream past), in passes of kDepth rows of B; kOuter: passes of kDepthOuter rows, each over every panel.
template <class K, int NV, bool kOuter = false>
void panels(int64_t m, int64_t n, int64_t k, float alpha, const typename K::Elt* a, int64_t a_rs, int64_t a_ks,
            const typename K::Elt* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  assert(n % K::kCols == 0);
  if constexpr (kOuter) {
    for (int64_t k0 = 0; k0 < k; k0 += kDepthOuter)
      for (int64_t j = 0; j < n; j += NV * K::kCols)
        panel_rows<K, NV>(std::min<int64_t>(NV, (n - j) / K::kCols), accumulate || k0 > 0, m,
                          std::min(kDepthOuter, k - k0), alpha, a + k0 * a_ks, a_rs, a_ks, b + k0 * ldb + j, ldb,
                          c + j, ldc);
    if (k == 0 && !accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
    return;
  }
  for (int64_t j = 0; j < n; j += NV * K::kCols) {
    const int64_t nv = std::min<int64_t>(NV, (n - j) / K::kCols);
    for (int64_t k0 = 0; k0 < k; k0 += kDepth)
      panel_rows<K, NV>(nv, accumulate || k0 > 0, m, std::min(kDepth, k - k0), alpha, a + k0 * a_ks, a_rs, a_ks,
                        b + k0 * ldb + j, ldb, c + j, ldc);
    if (k == 0 && !accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc + j, c + i * ldc + j + nv * K::kCols, 0.f);
  }
}

template <int NV>
void gemm_panels(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  panels<FmaKernel, NV>(m, n, k, alpha, a, a_rs, a_ks, b, ldb, c, ldc, accumulate);
}

// gemm_panels for the attention tiles' products (forward_tile, backward_tile, product_rates): k's passes outside the
// panels on AVX2 (kDepthOutside). Nystrom's products (gemm_small, nystrom_impl.h) keep gemm_panels.
template <int NV>
void tile_panels(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  panels<FmaKernel, NV, kDepthOutside>(m, n, k, alpha, a, a_rs, a_ks, b, ldb, c, ldc, accumulate);
}

#if ETKD_NATIVE_BF16
// The vdpbf16ps products: k2 pairs of the reduction index, pointers to pairs of bf16 (see dp_kernel).
inline void dp_gemm(int64_t m, int64_t n, int64_t k2, float alpha, const void* a, int64_t a_rs, int64_t a_ks,
                    const void* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  panels<DpKernel, 4>(m, n, k2, alpha, static_cast<const uint32_t*>(a), a_rs, a_ks, static_cast<const uint32_t*>(b),
                      ldb, c, ldc, accumulate);
}
#endif

void gemm_small(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  assert(n % kSmallPad == 0);
  gemm_panels<kPanel>(m, n, k, alpha, a, a_rs, a_ks, b, ldb, c, ldc, accumulate);
}

// Keys of one source: key j is row (j - off) of k and v (off > 0 when only a converted range is held).
template <class T>
struct SrcView {
  const T* k;
  const T* v;
  const float* bias;
  bool band;
  int64_t off = 0;
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

// Phase clock of one task (flash_tile.h: ETKD_CPU_PROFILE): lap(ph) charges the time since the last lap to ph.
struct Clock {
  bool on = profiling();
  int64_t ns[kPhases] = {};
  int64_t t = on ? now_ns() : 0;
  void lap(Phase ph) {
    if (!on) return;
    const int64_t n = now_ns();
    ns[ph] += n - t;
    t = n;
  }
  ~Clock() {
    if (on) profile_add(ns);
  }
};

// Key block of the packed bf16 path (brgemm's column block; see forward_tile_packed), and a task's packed keys.
constexpr int64_t kPackN = 64;
struct Packed {
  // bf16 bits. Forward: K^T blocks (S = Q K^T), V key pairs (acc += P V). Backward: K^T blocks, V^T blocks
  // (dP = dO V^T) and K key pairs (dQ += dS K).
  std::vector<uint16_t> k, v, vt, kr;
  int64_t base = 0;  // first key held (a multiple of kPackN)
  int64_t keys = 0;  // keys held (a multiple of kPackN)
};

// K^T of the keys a forward task visits, for the own fp32 tile products, in blocks of kPackN keys (as the bf16
// path): block j0 / kPackN holds keys j0 .. j0 + kPackN - 1 as a (d x kPackN) matrix, so a product's B panel is
// one contiguous 16 KiB run (d = 64) rather than d rows a page apart (a TLB miss per k step). Zeros past hi.
struct KeysT {
  std::vector<float> kt;
  int64_t base = 0;  // first key held (a multiple of kPackN)
};

// Pack keys [lo, hi) of k (rows of d, stored as T; d a whole number of vectors) into kt as float, by kV x kV
// register transposes (at::vec::transpose_mxn); 16-bit keys, and key groups cut by lo or hi, go through tmp.
template <class T>
void pack_keys_t(const T* k, int64_t lo, int64_t hi, int64_t d, KeysT& kt, std::vector<float>& tmp) {
  kt.base = lo / kPackN * kPackN;
  const int64_t keys = (hi + kPackN - 1) / kPackN * kPackN - kt.base;
  const size_t need = static_cast<size_t>(keys * d);
  if (kt.kt.size() < need) kt.kt.resize(need);
  if (tmp.size() < static_cast<size_t>(kV * d)) tmp.resize(kV * d);
  for (int64_t j0 = 0; j0 < keys; j0 += kV) {
    const int64_t key0 = kt.base + j0;
    const float* src;
    if (std::is_same_v<T, float> && key0 >= lo && key0 + kV <= hi) {
      src = reinterpret_cast<const float*>(k + key0 * d);
    } else {
      for (int64_t j = 0; j < kV; ++j) {
        float* r = tmp.data() + j * d;
        if (key0 + j < lo || key0 + j >= hi)
          std::fill(r, r + d, 0.f);  // outside the range: never read as a score, kept finite
        else if constexpr (std::is_same_v<T, float>)
          std::copy(k + (key0 + j) * d, k + (key0 + j + 1) * d, r);
        else
          to_float(k + (key0 + j) * d, r, d);
      }
      src = tmp.data();
    }
    float* blk = kt.kt.data() + (j0 / kPackN) * kPackN * d + j0 % kPackN;
    for (int64_t c = 0; c < d; c += kV) at::vec::transpose_mxn<float, kV, kV>(src + c, d, blk + c * kPackN, kPackN);
  }
}

// 64-byte aligned storage for the buffers the tile products read and write: MKL's conditions for reproducible
// results are a fixed thread count (BlasOneThread) and, recommended, 64-byte aligned operands; malloc's alignment of
// a worker's scratch is whatever the heap gives that thread.
template <class T>
struct Align64 {
  using value_type = T;
  Align64() = default;
  template <class U>
  Align64(const Align64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* x, size_t) { ::operator delete(x, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Align64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Align64<U>&) const { return false; }
};
template <class T>
using AVec = std::vector<T, Align64<T>>;

template <class T, class C>
struct Work {
  // inputs converted to C: K/V once per forward task (prepare_sources), Q per tile; per tile in the backward
  static constexpr bool kConvert = !std::is_same_v<T, C>;
  static constexpr bool kNarrow = !std::is_same_v<C, float>;  // P and dS rounded to C for the products
  AVec<float> s, dp, acc;
  std::vector<float> m, l;
  AVec<C> s16, dp16, qb, kb, vb, db;
  AVec<C> kc[2], vc[2];  // forward: K/V of a task's key range, converted once (kConvert)
  Packed packed[2];             // forward, packed bf16 path: K/V of a task's key range
  KeysT kt[2], vt[2];           // own fp32 products: K^T (and V^T in the backward) of a task's key range
  std::vector<float> tmp;       // pack_keys_t's scratch
  std::vector<uint32_t> pr, qr, dor;  // backward, own bf16 products: P / dS, Q, dO in pairs of query rows
  bool own = false;             // fp32 tile products by gemm_panels (own_ok), else BLAS
  bool amx = false;             // packed bf16 products by brgemm (AMX), else by dp_gemm (bf16_path)
  std::vector<Seg> segs;
  Clock clock;
  int64_t b = 0, bh = 0;            // the task's batch and batch * H + head (dropout counters)
  std::vector<uint64_t> keep;  // dropout: keep bits of every row of a tile over one segment (tile_keep)
  std::vector<Keep> keeps;     // each tile row's bits in `keep`
  std::vector<uint32_t> rowc;  // tile_keep: the row counters of a tile under a row map (Dropout::qrow)
  AVec<float> pd;              // backward with dropout: P with the dropped entries zeroed
  // The main source's rows where they are not D apart (Problem::rows), copied D apart in the worker that uses them:
  // K/V of a task's key blocks (at their own rows of a Sk-row buffer), a tile's Q, dO and out rows, its dQ rows (from
  // row 0), and chunk 0's dK/dV of its key range.
  AVec<T> kcopy, vcopy, qcopy, docopy, ocopy;
  AVec<float> dqcopy, dkcopy, dvcopy;
  // s and s16 also fit a segment's covering key blocks on the packed path (up to 2 kPackN - 2 more columns).
  explicit Work(int64_t bq, int64_t d)
      : s(bq * (kMaxSeg + 2 * kPackN)), dp(bq * (kMaxSeg + 2 * kPackN)), acc(bq * d), m(bq), l(bq),
        s16(kNarrow ? bq * (kMaxSeg + 2 * kPackN) : 0), dp16(kNarrow ? bq * kMaxSeg : 0), qb(kConvert ? bq * d : 0),
        kb(kConvert ? kMaxSeg * d : 0), vb(kConvert ? kMaxSeg * d : 0), db(kConvert ? bq * d : 0),
        keep(bq * kKeepWords), keeps(bq) {}
};

// The key blocks (of kPackN) covering a segment, as the packed paths score it: from the block edge a0 below
// sg.k0, ls columns (whole blocks); the segment's keys are columns [c0, c0 + sg.n).
struct Cover {
  int64_t a0, ls, c0;
};
inline Cover cover(const Seg& sg) {
  const int64_t a0 = sg.k0 / kPackN * kPackN, a1 = (sg.k0 + sg.n + kPackN - 1) / kPackN * kPackN;
  return {a0, a1 - a0, sg.k0 - a0};
}

// Row r's online-softmax step after a segment: the running sum l and the accumulator move from the old max to
// mnew (the segment's exps, summing to `sum`, are already relative to mnew), and mnew becomes the max.
template <class T, class C>
void online_step(Work<T, C>& w, int64_t r, int64_t d, float mnew, float sum) {
  const float alpha = w.m[r] == kNegInf ? 0.f : std::exp(w.m[r] - mnew);
  w.l[r] = w.l[r] * alpha + sum;
  if (alpha != 1.f) scale_row(w.acc.data() + r * d, d, alpha);
  w.m[r] = mnew;
}

// The end of a forward tile: out = acc / l (times the dropout scale: acc holds the kept exps) and lse = m + log l
// per row; a row that saw no key gets out 0 and lse +inf (its backward then skips it).
template <class T, class C>
void finish_rows(const Problem& p, const Work<T, C>& w, int64_t rows, int64_t d, T* out, float* lse) {
  const float post = p.drop.on ? p.drop.scale : 1.f;
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * d;
    if (w.l[r] > 0.f) {
      store_scaled(w.acc.data() + r * d, post / w.l[r], o, d);
      lse[r] = w.m[r] + std::log(w.l[r]);
    } else {
      std::fill(o, o + d, T(0.f));
      lse[r] = kInf;
    }
  }
}

// The keep bits of segment sg for the rows [0, rows) of the tile at absolute row i0 (or the problem's row map) that
// see it (not skipped, a non-empty [lo, hi) = row_range, and, in the backward, a finite lse): row r's Keep in
// w.keeps[r] (empty for the other rows). The rows r0 .. r1 between the first and the last seeing row all get the
// union [g0, g1) of their groups, one keep_grid over w.keep (a sliding-window tile: about (2w + bq) / (2w + 1) of the
// calls its rows need; a block-sparse tile: exactly them).
template <class T, class C>
void tile_keep(const Problem& p, Work<T, C>& w, const Seg& sg, bool band, int64_t i0, int64_t rows,
               const uint8_t* skip, const float* lse) {
  const Dropout& dr = p.drop;
  const uint32_t bh = static_cast<uint32_t>(w.bh);
  int64_t col0 = sg.k0 + (sg.src == 1 ? dr.xcol0 : 0);  // column of the segment's first key
  bool gathered = sg.src == 1 && dr.xcol;               // mapped columns (global keys): one Philox call per key
  if (gathered) {  // ... unless they are one run (LSG's globals, its compressed windows): then SIMD bits as above
    const int64_t* col = dr.xcol + w.b * p.Sx + sg.k0;
    bool run = sg.n > 0;
    for (int64_t t = 1; t < sg.n && run; ++t) run = col[t] == col[t - 1] + 1;
    if (run) gathered = false, col0 = col[0];
  }
  auto sees = [&](int64_t r, int64_t* lo, int64_t* hi) {
    row_range(p, sg, band, i0 + r, lo, hi);
    return !(skip && skip[r]) && *lo < *hi && !(lse && !(lse[r] < kInf));
  };
  auto row_of = [&](int64_t r) { return static_cast<uint32_t>(dr.qrow ? dr.qrow[w.b * p.Sq + i0 + r] : i0 + r); };
  int64_t g0 = INT64_MAX, g1 = 0, r0 = -1, r1 = -1;
  for (int64_t r = 0; r < rows; ++r) {
    w.keeps[r] = Keep{};
    int64_t lo, hi;
    if (!sees(r, &lo, &hi)) continue;
    if (gathered) {  // row r's bits in slot r of w.keep
      uint64_t* buf = w.keep.data() + r * kKeepWords;
      const int64_t* col = dr.xcol + w.b * p.Sx + sg.k0;
      for (int64_t i = 0; i <= hi / 64 + 1; ++i) buf[i] = 0;
      for (int64_t t = lo; t < hi; ++t)
        if (keep_one(dr, bh, row_of(r), col[t])) buf[t >> 6] |= uint64_t(1) << (t & 63);
      w.keeps[r] = {buf, 0};
      continue;
    }
    g0 = std::min(g0, (col0 + lo) >> 3), g1 = std::max(g1, (col0 + hi + 7) >> 3);
    if (r0 < 0) r0 = r;
    r1 = r;
  }
  if (gathered || r0 < 0) return;
  const int64_t G = g1 - g0, R = r1 - r0 + 1;
  const uint32_t* rowc = nullptr;
  if (dr.qrow) {
    w.rowc.resize(R);
    for (int64_t i = 0; i < R; ++i) w.rowc[i] = row_of(r0 + i);
    rowc = w.rowc.data();
  }
  keep_grid(dr, bh, row_of(r0), rowc, R, g0, G, reinterpret_cast<uint8_t*>(w.keep.data()));
  for (int64_t r = r0; r <= r1; ++r) {
    int64_t lo, hi;
    if (sees(r, &lo, &hi)) w.keeps[r] = {w.keep.data(), 8 * (r - r0) * G + col0 - 8 * g0};
  }
}

// The own products' scores of segment sg: s (rows x cv.ls) = alpha * a (rows x d, row-major) @ K^T over the key
// blocks covering the segment (cover), in whole vectors; only the segment's columns [cv.c0, cv.c0 + sg.n) are
// read afterwards. kt: K^T (or V^T) of the task's keys (pack_keys_t).
inline Cover scores_own(const KeysT& kt, const Seg& sg, int64_t rows, int64_t d, float alpha, const float* a,
                        float* s) {
  const Cover cv = cover(sg);
  const int64_t v0 = cv.c0 / kV * kV, v1 = (cv.c0 + sg.n + kV - 1) / kV * kV;  // whole vectors
  for (int64_t b0 = 0; b0 < cv.ls; b0 += kPackN) {
    const int64_t j0 = std::max(b0, v0), j1 = std::min(b0 + kPackN, v1);
    if (j0 < j1)
      tile_panels<kPanel>(rows, j1 - j0, d, alpha, a, d, 1, kt.kt.data() + (cv.a0 + b0 - kt.base) * d + (j0 - b0),
                          kPackN, s + j0, cv.ls, false);
  }
  return cv;
}

// One query tile: rows q[0:rows] (absolute index i0 + r), forward. The key sources are already in the product
// type C (prepare_sources).
template <class T, class C>
void forward_tile(const Problem& p, const SrcView<C>* src, const T* q_, const uint8_t* skip, int64_t i0, int64_t rows,
                  Work<T, C>& w, T* out, float* lse) {
  constexpr bool kNarrow = Work<T, C>::kNarrow;
  const int64_t d = p.D;
  Clock& ck = w.clock;
  const C* q = operand<C>(q_, rows * d, w.qb.data());
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.f);
  ck.lap(kPhaseConvert);
  for (const Seg& sg : w.segs) {
    const SrcView<C>& sv = src[sg.src];
    const int64_t n = sg.n;
    int64_t ls = n, c0 = 0;  // the segment's scores: columns [c0, c0 + n) of s, row stride ls
    float* s = w.s.data();
    C* pn = w.s16.data();  // P in the product type (kNarrow)
    if constexpr (std::is_same_v<C, float>) {
      if (w.own) {
        const Cover cv = scores_own(w.kt[sg.src], sg, rows, d, p.scale, q, s);
        ls = cv.ls, c0 = cv.c0;
      }
    }
    if (!w.own) mm(false, true, rows, n, d, p.scale, q, d, sv.k + (sg.k0 - sv.off) * d, d, 0.f, s, n);
    ck.lap(kPhaseQK);
    const float* bias = sv.bias ? sv.bias + sg.k0 : nullptr;
    bool any = false;
    if (p.drop.on) tile_keep(p, w, sg, sv.band, i0, rows, skip, nullptr);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * ls + c0;
      int64_t lo, hi;
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      float mx = kNegInf;
      if (!(skip && skip[r]) && lo < hi) mx = add_bias_max(row, bias, lo, hi);
      const float mnew = std::max(w.m[r], mx);
      if (mx == kNegInf || mnew == kNegInf) {
        if constexpr (kNarrow)
          std::fill(pn + r * n, pn + (r + 1) * n, C(0.f));
        else
          std::fill(row, row + n, 0.f);
        continue;
      }
      float sum = 0.f;
      const Keep kp = p.drop.on ? w.keeps[r] : Keep{};
      if constexpr (kNarrow) {
#if ETKD_NATIVE_BF16
        sum = exp_sum_bf16(row, pn + r * n, n, lo, hi, mnew, kp);
#endif
      } else {
        std::fill(row, row + lo, 0.f);
        std::fill(row + hi, row + n, 0.f);
        sum = exp_sum(row, lo, hi, mnew, kp);  // the sum (softmax statistics) counts every key, P the kept ones
      }
      online_step(w, r, d, mnew, sum);
      any = true;
    }
    ck.lap(kPhaseSoftmax);
    if (any) {
      const C* vp = sv.v + (sg.k0 - sv.off) * d;
      const C* pp;
      if constexpr (kNarrow)
        pp = pn;
      else
        pp = s;
      if constexpr (std::is_same_v<C, float>) {
        if (w.own) tile_panels<kPanel>(rows, d, n, 1.f, pp + c0, ls, 1, vp, d, w.acc.data(), d, true);
      }
      if (!w.own) mm(false, false, rows, d, n, 1.f, pp, n, vp, d, 1.f, w.acc.data(), d);
      ck.lap(kPhasePV);
    }
  }
  finish_rows(p, w, rows, d, out, lse);
  ck.lap(kPhaseOut);
}

#if ETKD_NATIVE_BF16
// ---- bf16 tiles through oneDNN's brgemm (AMX-BF16 here), with K and V packed once per task ----
// brgemm takes B packed VNNI ([k/2][ldb][2]: pairs of k rows interleaved) in column blocks of at most kPackN, as
// ATen's flash attention packs it. A task packs the keys it visits in whole blocks of kPackN keys (zero keys past
// the end): K^T per key block as [D/2][kPackN][2], V per head-dim block of kPackN columns as [keys/2][bw][2]
// over all the task's keys, so one brgemm covers a whole segment of PV. A segment that does not start or end on
// a block edge is scored over its covering blocks; the extra columns get P = 0.

// How the bf16 tiles of a problem are multiplied on this target: on K and V packed once per task (pack_keys) by
// oneDNN's brgemm on AMX tiles (amx: the CPU has AMX and ETKD_CPU_AMX is not 0) or by the own vdpbf16ps
// kernels (own: AVX512-BF16 without AMX, e.g. AMD Zen 4/5, or ETKD_CPU_AMX=0), or per tile by MKL's bf16 GEMM
// (blas: ETKD_CPU_GEMM=blas, a head dim not of whole 16-column groups — brgemm's N blocks, the own kernels'
// vectors, an even K —, or inputs not 4-byte aligned: the packing and the own kernels move bf16 pairs as 32-bit
// units; always aligned for tensors of their own, a view at an odd element offset is not).
enum class Bf16Path { amx, own, blas };
inline Bf16Path bf16_path(const Problem& p) {
  auto al4 = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 4 == 0; };
  if (!own_tile_gemm() || p.D % 16 != 0 || p.D <= 0 || !al4(p.q) || !al4(p.k) || !al4(p.v) || !al4(p.kx) ||
      !al4(p.vx))
    return Bf16Path::blas;
  return brgemm_bf16_available() ? Bf16Path::amx : Bf16Path::own;
}

// x^T of `keys` key rows of d bf16 (x at the first key; rows from `real` on are zero), in blocks of kPackN keys:
// block kb holds (pair i, key j) at [i][j] of a (d/2 x kPackN) matrix of 32-bit pairs, so a block is the B
// operand of S = Q K^T (brgemm or dp_gemm). A 32-bit transpose: pairs of bf16 move as one unit.
inline void pack_blocks_t(const BFloat16* x, int64_t keys, int64_t real, int64_t d, std::vector<uint16_t>& buf) {
  if (buf.size() < static_cast<size_t>(keys * d)) buf.resize(keys * d);
  const int64_t hp = d / 2;
  const uint32_t* xs = reinterpret_cast<const uint32_t*>(x);
  uint32_t* kt = reinterpret_cast<uint32_t*>(buf.data());
  for (int64_t kb = 0; kb < keys; kb += kPackN) {
    uint32_t* out = kt + kb * hp;
    for (int64_t j = 0; j < kPackN; ++j) {
      const int64_t key = kb + j;
      if (key < real) {
        const uint32_t* row = xs + key * hp;
        for (int64_t i = 0; i < hp; ++i) out[i * kPackN + j] = row[i];
      } else {
        for (int64_t i = 0; i < hp; ++i) out[i * kPackN + j] = 0;
      }
    }
  }
}

// x in pairs of keys, per head-dim block c0 of kPackN columns (width bw): (key pair j / 2, dim c) at [j / 2][c] =
// x[j][c] | x[j + 1][c] << 16, blocks one after the other ([keys/2][bw][2] each): the B operand of P V.
inline void pack_pairs(const BFloat16* x, int64_t keys, int64_t real, int64_t d, std::vector<uint16_t>& buf) {
  if (buf.size() < static_cast<size_t>(keys * d)) buf.resize(keys * d);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x);
  uint32_t* vt = reinterpret_cast<uint32_t*>(buf.data());
  for (int64_t c0 = 0; c0 < d; c0 += kPackN) {
    const int64_t bw = std::min(kPackN, d - c0);
    uint32_t* out = vt + keys * c0 / 2;
    for (int64_t j = 0; j < keys; j += 2) {
      uint32_t* o = out + (j / 2) * bw;
      const uint16_t* r0 = xs + j * d + c0;
      const uint16_t* r1 = r0 + d;
      if (j + 1 < real) {
        for (int64_t c = 0; c < bw; ++c) o[c] = uint32_t(r0[c]) | (uint32_t(r1[c]) << 16);
      } else if (j < real) {
        for (int64_t c = 0; c < bw; ++c) o[c] = r0[c];
      } else {
        std::fill(o, o + bw, 0u);
      }
    }
  }
}

// Pack keys [lo, hi) of k, v (rows of d bf16; keys past `limit` are zero) into pk, in whole blocks of kPackN keys:
// the forward's layouts (K^T blocks, V pairs), or the backward's (K^T and V^T blocks, K pairs).
inline void pack_keys(const BFloat16* k, const BFloat16* v, int64_t lo, int64_t hi, int64_t limit, int64_t d,
                      Packed& pk, bool backward = false) {
  pk.base = lo / kPackN * kPackN;
  pk.keys = (hi + kPackN - 1) / kPackN * kPackN - pk.base;
  const int64_t real = std::max<int64_t>(0, std::min(limit, pk.base + pk.keys) - pk.base);  // keys with data
  const BFloat16* kb = k + pk.base * d;
  const BFloat16* vb = v + pk.base * d;
  pack_blocks_t(kb, pk.keys, real, d, pk.k);
  if (backward) {
    pack_blocks_t(vb, pk.keys, real, d, pk.vt);
    pack_pairs(kb, pk.keys, real, d, pk.kr);
  } else {
    pack_pairs(vb, pk.keys, real, d, pk.v);
  }
}

// The two softmax passes of the packed path in AVX-512 intrinsics: plain max (inputs are finite, checked at the
// op's door, so at::vec::maximum's NaN propagation is not needed), two accumulators for the max chain, unmasked
// main loops and one masked tail.

// max over scale * s[lo:hi] + bias[lo:hi] (bias may be null); s is only read.
template <bool kBias>
float scaled_max_as(const float* s, const float* bias, int64_t lo, int64_t hi, float scale) {
  const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(kNegInf);
  auto val = [&](int64_t j, __mmask16 mk) {
    const __m512 x = _mm512_mask_loadu_ps(ninf, mk, s + j);
    if constexpr (kBias)
      return _mm512_mask_fmadd_ps(x, mk, vs, _mm512_maskz_loadu_ps(mk, bias + j));  // masked lanes stay -inf
    else
      return _mm512_mask_mul_ps(ninf, mk, x, vs);
  };
  __m512 m0 = ninf, m1 = ninf;
  int64_t j = lo;
  for (; j + 32 <= hi; j += 32) {
    m0 = _mm512_max_ps(m0, val(j, 0xffff));
    m1 = _mm512_max_ps(m1, val(j + 16, 0xffff));
  }
  for (; j < hi; j += 16) {
    const __mmask16 mk = hi - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (hi - j)) - 1);
    m0 = _mm512_max_ps(m0, val(j, mk));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

float scaled_max(const float* s, const float* bias, int64_t lo, int64_t hi, float scale) {
  return bias ? scaled_max_as<true>(s, bias, lo, hi, scale) : scaled_max_as<false>(s, bias, lo, hi, scale);
}

// p[lo:hi] = bf16(exp(scale * s + bias - m)) (bias may be null); returns the float32 sum of the exps. One pass:
// the scaling, bias, exp and rounding to the product type are fused. m is finite.
template <bool kBias>
float scaled_exp_sum_bf16_as(const float* s, const float* bias, float scale, BFloat16* p, int64_t lo, int64_t hi,
                             float m, const Keep& kp) {
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m), nm = _mm512_set1_ps(-m);
  auto ex = [&](int64_t j, __mmask16 mk) {
    const __m512 x = _mm512_maskz_loadu_ps(mk, s + j);
    const __m512 b = kBias ? _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, bias + j), vm) : nm;
    return Vec(_mm512_fmadd_ps(x, vs, b)).fexp_u20();
  };
  __m512 acc = _mm512_setzero_ps();
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    const __m512 e = ex(j, 0xffff);
    acc = _mm512_add_ps(acc, e);
    const __m512 pe = kp.w ? _mm512_maskz_mov_ps(static_cast<__mmask16>(kp.at64(j)), e) : e;  // dropout, pre-rounding
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(pe));
  }
  if (j < hi) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (hi - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(mk, ex(j, mk));
    acc = _mm512_add_ps(acc, e);
    const __m512 pe = kp.w ? _mm512_maskz_mov_ps(static_cast<__mmask16>(kp.at64(j)), e) : e;
    _mm256_mask_storeu_epi16(p + j, mk, (__m256i)_mm512_cvtneps_pbh(pe));
  }
  return _mm512_reduce_add_ps(acc);
}

float scaled_exp_sum_bf16(const float* s, const float* bias, float scale, BFloat16* p, int64_t lo, int64_t hi,
                          float m, const Keep& kp) {
  return bias ? scaled_exp_sum_bf16_as<true>(s, bias, scale, p, lo, hi, m, kp)
              : scaled_exp_sum_bf16_as<false>(s, bias, scale, p, lo, hi, m, kp);
}

// One query tile of the packed path; w.s / w.s16 hold rows x (covering columns).
void forward_tile_packed(const Problem& p, const Packed* pk, const SrcView<BFloat16>* src, const BFloat16* q,
                         const uint8_t* skip, int64_t i0, int64_t rows, Work<BFloat16, BFloat16>& w, BFloat16* out,
                         float* lse) {
  const int64_t d = p.D;
  Clock& ck = w.clock;
  std::fill(w.acc.begin(), w.acc.begin() + rows * d, 0.f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.f);
  for (const Seg& sg : w.segs) {
    const Packed& pks = pk[sg.src];
    const SrcView<BFloat16>& sv = src[sg.src];
    const Cover cv = cover(sg);
    const int64_t a0 = cv.a0, nc = cv.ls, c0 = cv.c0;  // covering columns; the segment starts at column c0
    float* s = w.s.data();
    BFloat16* pn = w.s16.data();
    for (int64_t b0 = a0; b0 < a0 + nc; b0 += kPackN) {
      const uint16_t* kb = pks.k.data() + (b0 - pks.base) * d;
      if (w.amx)
        brgemm_bf16(rows, kPackN, d, d, kPackN, nc, false, q, kb, s + (b0 - a0));
      else
        dp_gemm(rows, kPackN, d / 2, 1.f, q, d / 2, 1, kb, kPackN, s + (b0 - a0), nc, false);
    }
    ck.lap(kPhaseQK);
    const float* bias = sv.bias ? sv.bias + sg.k0 : nullptr;
    bool any = false;
    if (p.drop.on) tile_keep(p, w, sg, sv.band, i0, rows, skip, nullptr);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * nc;
      BFloat16* prow = pn + r * nc;
      int64_t lo, hi;
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      float mx = kNegInf;
      if (!(skip && skip[r]) && lo < hi) mx = scaled_max(row + c0, bias, lo, hi, p.scale);
      const float mnew = std::max(w.m[r], mx);
      if (mx == kNegInf || mnew == kNegInf) {
        std::fill(prow, prow + nc, BFloat16(0.f));
        continue;
      }
      std::fill(prow, prow + c0 + lo, BFloat16(0.f));
      std::fill(prow + c0 + hi, prow + nc, BFloat16(0.f));
      const Keep kp = p.drop.on ? w.keeps[r] : Keep{};
      online_step(w, r, d, mnew, scaled_exp_sum_bf16(row + c0, bias, p.scale, prow + c0, lo, hi, mnew, kp));
      any = true;
    }
    ck.lap(kPhaseSoftmax);
    if (any) {
      for (int64_t cb = 0; cb < d; cb += kPackN) {
        const int64_t bw = std::min(kPackN, d - cb);
        const uint16_t* vb = pks.v.data() + pks.keys * cb + (a0 - pks.base) * bw;
        if (w.amx)
          brgemm_bf16(rows, bw, nc, nc, bw, d, true, pn, vb, w.acc.data() + cb);
        else
          dp_gemm(rows, bw, nc / 2, 1.f, pn, nc / 2, 1, vb, bw, w.acc.data() + cb, d, true);
      }
      ck.lap(kPhasePV);
    }
  }
  finish_rows(p, w, rows, d, out, lse);
  ck.lap(kPhaseOut);
}
#endif

// The key sources of a forward task (query tiles [t0, t1) of one (batch, head)) in the product type C: the
// inputs themselves when T == C, else the keys those tiles visit (the union of their segments), converted once
// per task into w.kc / w.vc — not once per query tile, which converted every key about (bq + 2w) / bq times.
// The keys of each source (0: keys, 1: separate global keys) that query tiles [t0, t1) of (b, h) visit:
// [lo[i], hi[i]), empty when hi[i] <= lo[i]. `segs` is scratch.
inline void key_range(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, std::vector<Seg>& segs,
                      int64_t* lo, int64_t* hi) {
  lo[0] = lo[1] = INT64_MAX;
  hi[0] = hi[1] = 0;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t i0 = tile * p.bq;
    segs.clear();
    p.segments(b, h, i0, std::min(p.bq, p.Sq - i0), segs);
    for (const Seg& sg : segs) {
      lo[sg.src] = std::min(lo[sg.src], sg.k0);
      hi[sg.src] = std::max(hi[sg.src], sg.k0 + sg.n);
    }
  }
}

// Can the own fp32 tile products take this problem: a SIMD target (not the portable one), not switched off
// (ETKD_CPU_GEMM=blas), and a head dim of whole vectors (PV's columns). Else the products are BLAS sgemm.
inline bool own_ok(const Problem& p) { return ETKD_OWN_PRODUCTS && own_tile_gemm() && p.D % kV == 0 && p.D > 0; }

template <class T, class C>
void prepare_sources(const Problem& p, const SrcView<T>* raw, int64_t b, int64_t h, int64_t t0, int64_t t1,
                     Work<T, C>& w, SrcView<C>* src) {
  for (int i = 0; i < 2; ++i) {
    src[i] = {nullptr, nullptr, raw[i].bias, raw[i].band, 0};
  }
  if constexpr (std::is_same_v<T, C>) {
    for (int i = 0; i < 2; ++i) src[i].k = raw[i].k, src[i].v = raw[i].v, src[i].off = 0;
  }
  if (!std::is_same_v<T, C> || w.own) {
    int64_t lo[2], hi[2];
    key_range(p, b, h, t0, t1, w.segs, lo, hi);
    const int64_t d = p.D;
    for (int i = 0; i < 2; ++i) {
      if (hi[i] <= lo[i]) continue;
      if constexpr (std::is_same_v<C, float>) {
        if (w.own) pack_keys_t(raw[i].k, lo[i], hi[i], d, w.kt[i], w.tmp);
      }
      if constexpr (!std::is_same_v<T, C>) {
        const int64_t n = (hi[i] - lo[i]) * d;
        if (static_cast<int64_t>(w.vc[i].size()) < n) w.vc[i].resize(n);
        // K in the product type only where the products read it from the source (not the own products' K^T).
        if (!w.own) {
          if (static_cast<int64_t>(w.kc[i].size()) < n) w.kc[i].resize(n);
          src[i].k = operand<C>(raw[i].k + lo[i] * d, n, w.kc[i].data());
        }
        src[i].v = operand<C>(raw[i].v + lo[i] * d, n, w.vc[i].data());
        src[i].off = lo[i];
      }
    }
  }
  w.clock.lap(kPhasePrep);
}

// Where a task accumulates dK and dV of one key source: key j at row j - off of dk and dv (off > 0 for a chunk's
// private buffer, which holds only the keys its tiles visit).
struct GradView {
  float* dk = nullptr;
  float* dv = nullptr;
  int64_t off = 0;
  float* dk_at(int64_t k0, int64_t d) const { return dk + (k0 - off) * d; }
  float* dv_at(int64_t k0, int64_t d) const { return dv + (k0 - off) * d; }
};

// A backward row's probabilities from the saved lse: row[0:sg.n] holds the segment's scaled scores of query i and
// becomes P = exp(s + bias - lse) on the keys the row sees, 0 on the rest of the ls columns [-c0, ls - c0) the
// products read around the segment (its covering key blocks; c0 = 0, ls = sg.n for BLAS). With dropout (kept set),
// kept (same columns) becomes P times the row's keep bits kp, in the same pass. false: the row sees none of the
// segment's keys (skipped, out of band, or no key at all: lse +inf).
inline bool recompute_p(const Problem& p, const Seg& sg, bool band, const float* bias, int64_t i, bool skip, float lse,
                        float* row, int64_t c0, int64_t ls, float* kept = nullptr, const Keep& kp = Keep{}) {
  float* full = row - c0;
  int64_t lo, hi;
  row_range(p, sg, band, i, &lo, &hi);
  if (skip || lo >= hi || !(lse < kInf)) {
    std::fill(full, full + ls, 0.f);
    if (kept) std::fill(kept - c0, kept - c0 + ls, 0.f);
    return false;
  }
  if (bias) add_bias_max(row, bias, lo, hi);  // its max is unused (P = exp(s - lse)): no pass at all without a bias
  std::fill(full, row + lo, 0.f);
  std::fill(row + hi, full + ls, 0.f);
  if (!kept) {
    exp_sum(row, lo, hi, lse);
    return true;
  }
  std::fill(kept - c0, kept + lo, 0.f);
  std::fill(kept + hi, kept - c0 + ls, 0.f);
  exp_sum_as<true, true>(row, kept, lo, hi, lse, kp);
  return true;
}

#if ETKD_NATIVE_BF16
// out[p][j] = (bf16(x[2p][j]), bf16(x[2p + 1][j])) as one 32-bit pair, for p < (rows + 1) / 2 and j < n (a
// multiple of 16; row stride ldx; a missing last row is zero): rows of x in pairs, the B operand (VNNI layout) of a
// product that reduces over query rows (dV += P^T dO, dK += dS^T Q).
template <class T>
void pair_rows(const T* x, int64_t ldx, int64_t rows, int64_t n, uint32_t* out) {
  alignas(64) static constexpr int16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const T* a = x + 2 * p * ldx;
    const T* b = 2 * p + 1 < rows ? a + ldx : nullptr;
    uint32_t* o = out + p * n;
    for (int64_t j = 0; j < n; j += 16) {
      __m512i both;  // bf16 of row a in the low 16 lanes, of row b in the high 16
      if constexpr (std::is_same_v<T, float>) {
        const __m512 va = _mm512_loadu_ps(a + j), vb = b ? _mm512_loadu_ps(b + j) : _mm512_setzero_ps();
        both = (__m512i)_mm512_cvtne2ps_pbh(vb, va);
      } else {
        const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j));
        const __m256i vb = b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j)) : _mm256_setzero_si256();
        both = _mm512_inserti64x4(_mm512_castsi256_si512(va), vb, 1);
      }
      _mm512_storeu_si512(o + j, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// x (rows x d, row-major bf16) in pairs of rows per head-dim block of kPackN columns: block cb (width bw) at
// out + rows2 * cb holds [rows2][bw] pairs, the B operand (ldb = bw <= kPackN, as brgemm takes it) of the products
// that reduce over a tile's query rows.
inline void pair_row_blocks(const BFloat16* x, int64_t rows, int64_t d, uint32_t* out) {
  const int64_t rows2 = (rows + 1) / 2;
  for (int64_t cb = 0; cb < d; cb += kPackN) pair_rows(x + cb, d, rows, std::min(kPackN, d - cb), out + rows2 * cb);
}

// out (columns [j0, j1) x ldo) = x^T for x (r16 rows x columns, bf16, row stride ldx; r16, j0 and j1 multiples of
// 16): out[j][i] = x[i][j], by at::vec's 16 x 16 bf16 register transposes: the A operand of dV += P^T dO and
// dK += dS^T Q.
inline void transpose_bf16(const BFloat16* x, int64_t ldx, int64_t r16, int64_t j0, int64_t j1, BFloat16* out,
                           int64_t ldo) {
  for (int64_t i = 0; i < r16; i += 16)
    for (int64_t j = j0; j < j1; j += 16) at::vec::transpose_mxn<BFloat16, 16, 16>(x + i * ldx + j, ldx, out + j * ldo + i, ldo);
}

// out[0:n] = bf16(alpha * x[0:n]), n a multiple of 16.
inline void from_float_scaled(const float* x, float alpha, BFloat16* out, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + j), va)));
}

// s[lo:hi] = exp(scale * s + bias - lse) in place (bias may be null) and p[lo:hi] = bf16 of it, with dropout
// (kp.w set) bf16 of it times rp where the keep bits say so and 0 elsewhere (what multiplies dO into dV): fexp_u20
// as the forward's P (P and dS are rounded to bf16 for the products right after).
template <bool kBias>
void scaled_exp_as(float* s, BFloat16* p, const float* bias, float scale, int64_t lo, int64_t hi, float lse,
                   const Keep& kp, float rp) {
  const __m512 vr = _mm512_set1_ps(rp);
  auto kept = [&](int64_t j, __m512 e) {
    return kp.w ? _mm512_maskz_mul_ps(static_cast<__mmask16>(kp.at64(j)), e, vr) : e;
  };
  const __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(lse), nl = _mm512_set1_ps(-lse);
  auto ex = [&](int64_t j, __mmask16 mk) {
    const __m512 x = _mm512_maskz_loadu_ps(mk, s + j);
    const __m512 b = kBias ? _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, bias + j), vl) : nl;
    return __m512(Vec(_mm512_fmadd_ps(x, vs, b)).fexp_u20());
  };
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    const __m512 e = ex(j, 0xffff);
    _mm512_storeu_ps(s + j, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(kept(j, e)));
  }
  if (j < hi) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (hi - j)) - 1);
    const __m512 e = ex(j, mk);
    _mm512_mask_storeu_ps(s + j, mk, e);
    _mm256_mask_storeu_epi16(p + j, mk, (__m256i)_mm512_cvtneps_pbh(kept(j, e)));
  }
}

// One query tile, backward, on keys packed once per task (pack_keys, backward layouts), the products by oneDNN's
// brgemm on AMX tiles (w.amx) or by the own vdpbf16ps kernels, on the same operands: S = Q K^T and dP = dO V^T over
// a segment's covering key blocks (as the forward), P recomputed from the saved lse, dV += P^T dO and
// dK += scale dS^T Q over the segment's own keys (P^T and dS^T in bf16, query rows zero-padded to 16, times Q and
// dO in pairs of query rows), dQ += scale dS K over the covering keys (dS in bf16 times K in pairs of keys).
void backward_tile_packed(const Problem& p, const Packed* pk, const SrcView<BFloat16>* src, const GradView* grad,
                          const BFloat16* q, const BFloat16* dout, const float* lse, const float* delta,
                          const uint8_t* skip, int64_t i0, int64_t rows, Work<BFloat16, BFloat16>& w, float* dq) {
  const int64_t d = p.D, rows2 = (rows + 1) / 2, r16 = (rows + 15) / 16 * 16;
  Clock& ck = w.clock;
  const size_t wide = static_cast<size_t>(r16 * (kMaxSeg + 2 * kPackN));
  if (w.pr.size() < wide / 2) w.pr.resize(wide / 2);
  if (w.s16.size() < wide) w.s16.resize(wide);
  if (w.qr.size() < static_cast<size_t>(rows2 * d)) w.qr.resize(rows2 * d), w.dor.resize(rows2 * d);
  pair_row_blocks(q, rows, d, w.qr.data());
  pair_row_blocks(dout, rows, d, w.dor.data());
  BFloat16* tr = reinterpret_cast<BFloat16*>(w.pr.data());  // P^T, then dS^T: (covering keys x r16)
  BFloat16* pn = w.s16.data();  // P, then scale dS, in bf16: (r16 x covering keys), rows from `rows` on zero
  // C (m x bw) (+)= A (m x k, row stride lda) @ B (packed pairs, ldb = bw), k even: brgemm or vdpbf16ps.
  auto product = [&](int64_t m, int64_t bw, int64_t k, const BFloat16* a, int64_t lda, const uint32_t* b, float* c,
                     int64_t ldc, bool add) {
    if (w.amx)
      brgemm_bf16(m, bw, k, lda, bw, ldc, add, a, b, c);
    else
      dp_gemm(m, bw, k / 2, 1.f, a, lda / 2, 1, b, bw, c, ldc, add);
  };
  ck.lap(kPhaseConvert);
  for (const Seg& sg : w.segs) {
    const Packed& pks = pk[sg.src];
    const SrcView<BFloat16>& sv = src[sg.src];
    const Cover cv = cover(sg);
    const int64_t a0 = cv.a0, nc = cv.ls, c0 = cv.c0, n = sg.n;
    float* s = w.s.data();
    float* dp = w.dp.data();
    auto blocks_t = [&](const BFloat16* a, const std::vector<uint16_t>& packed, float* c) {  // c = a @ packed^T
      for (int64_t b0 = a0; b0 < a0 + nc; b0 += kPackN)
        product(rows, kPackN, d, a, d, reinterpret_cast<const uint32_t*>(packed.data() + (b0 - pks.base) * d),
                c + (b0 - a0), nc, false);
    };
    blocks_t(q, pks.k, s);
    ck.lap(kPhaseQK);
    const float* bias = sv.bias ? sv.bias + sg.k0 : nullptr;
    bool any = false;
    // With dropout: each row's keep bits in w.keeps; dV += (P o M / (1 - p))^T dO, dS = P (dP o M / (1 - p) - delta).
    const bool drop = p.drop.on;
    const float rp = drop ? p.drop.scale : 1.f;
    if (drop) tile_keep(p, w, sg, sv.band, i0, rows, skip, lse);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * nc;
      BFloat16* prow = pn + r * nc;
      int64_t lo, hi;
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      if ((skip && skip[r]) || lo >= hi || !(lse[r] < kInf)) {
        std::fill(row, row + nc, 0.f);
        std::fill(prow, prow + nc, BFloat16(0.f));
        continue;
      }
      std::fill(row, row + c0 + lo, 0.f);
      std::fill(row + c0 + hi, row + nc, 0.f);
      std::fill(prow, prow + c0 + lo, BFloat16(0.f));
      std::fill(prow + c0 + hi, prow + nc, BFloat16(0.f));
      const Keep kp = drop ? w.keeps[r] : Keep{};
      if (bias)
        scaled_exp_as<true>(row + c0, prow + c0, bias, p.scale, lo, hi, lse[r], kp, rp);
      else
        scaled_exp_as<false>(row + c0, prow + c0, bias, p.scale, lo, hi, lse[r], kp, rp);
      any = true;
    }
    std::fill(pn + rows * nc, pn + r16 * nc, BFloat16(0.f));
    ck.lap(kPhaseSoftmax);
    if (!any) continue;
    const GradView g = grad[sg.src];
    // over the segment's keys: C (n x d) += A (n x the tile's query rows) @ B (query rows in pairs)
    auto reduce_rows = [&](const uint32_t* b, float* c) {
      for (int64_t cb = 0; cb < d; cb += kPackN)
        product(n, std::min(kPackN, d - cb), 2 * rows2, tr + c0 * r16, r16, b + rows2 * cb, c + cb, d, true);
    };
    const int64_t j0 = c0 / 16 * 16, j1 = (c0 + n + 15) / 16 * 16;  // the segment's keys, whole 16-key groups
    transpose_bf16(pn, nc, r16, j0, j1, tr, r16);
    ck.lap(kPhaseConvert);
    reduce_rows(w.dor.data(), g.dv_at(sg.k0, d));  // dV += P^T dO
    blocks_t(dout, pks.vt, dp);                     // dP = dO V^T
    ck.lap(kPhasePV);
    for (int64_t r = 0; r < rows; ++r) {  // dS = P (dP - delta), with dropout dP o M / (1 - p)
      float* prow = s + r * nc;
      float* drow = dp + r * nc;
      if (!drop || !w.keeps[r].w) {
        softmax_grad_row(prow, drow, nc, delta[r]);
        continue;
      }
      int64_t lo, hi;  // P is 0 outside the row's range
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      scale_row(drow, nc, rp);
      softmax_grad_as<false>(prow + c0, drow + c0, -c0, lo, delta[r], Keep{});
      softmax_grad_as<true>(prow + c0, drow + c0, lo, hi, delta[r], w.keeps[r]);
      softmax_grad_as<false>(prow + c0, drow + c0, hi, nc - c0, delta[r], Keep{});
    }
    ck.lap(kPhaseSoftmax);
    BFloat16* ds = pn;
    for (int64_t r = 0; r < rows; ++r) from_float_scaled(dp + r * nc, p.scale, ds + r * nc, nc);
    transpose_bf16(ds, nc, r16, j0, j1, tr, r16);
    ck.lap(kPhaseConvert);
    reduce_rows(w.qr.data(), g.dk_at(sg.k0, d));  // dK += scale dS^T Q
    for (int64_t cb = 0; cb < d; cb += kPackN) {  // dQ += scale dS K
      const int64_t bw = std::min(kPackN, d - cb);
      const uint16_t* kb = pks.kr.data() + pks.keys * cb + (a0 - pks.base) * bw;
      product(rows, bw, nc, ds, nc, reinterpret_cast<const uint32_t*>(kb), dq + cb, d, true);
    }
    ck.lap(kPhasePV);
  }
}
#endif

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
    // S (and dP) of the segment: columns [c0, c0 + n), row stride ls (scores_own); BLAS: c0 = 0, ls = n.
    int64_t ls = n, c0 = 0;
    if constexpr (std::is_same_v<C, float>) {
      if (w.own) {
        const Cover cv = scores_own(w.kt[sg.src], sg, rows, d, p.scale, q, s);
        ls = cv.ls, c0 = cv.c0;
      }
    }
    if (!w.own) mm(false, true, rows, n, d, p.scale, q, d, kp, d, 0.f, s, n);
    w.clock.lap(kPhaseQK);
    s += c0;
    dp += c0;
    const float* bias = sv.bias ? sv.bias + sg.k0 : nullptr;
    bool any = false;
    const bool drop = p.drop.on;
    // With dropout: pd = P with the dropped entries zeroed (row stride ls and column offset c0, like s); each row's
    // keep bits stay in w.keeps for dS.
    float* pd = nullptr;
    if (drop) {
      if (w.pd.size() < w.s.size()) w.pd.resize(w.s.size());
      pd = w.pd.data() + c0;
      tile_keep(p, w, sg, sv.band, i0, rows, skip, lse);
    }
    for (int64_t r = 0; r < rows; ++r)
      any |= recompute_p(p, sg, sv.band, bias, i0 + r, skip && skip[r], lse[r], s + r * ls, c0, ls,
                         drop ? pd + r * ls : nullptr, drop ? w.keeps[r] : Keep{});
    w.clock.lap(kPhaseSoftmax);
    if (!any) continue;
    GradView g = grad[sg.src];
    // With dropout: dV += (P o M / (1 - p))^T dO; dP = (dO V^T) o M / (1 - p); dS = P (dP - delta).
    const float rp = drop ? p.drop.scale : 1.f;
    const float* pv = drop ? pd : s;  // what multiplies dO into dV
    auto ds_row = [&](int64_t r, const float* prow, float* dprow) {
      const Keep& kp = w.keeps[r];
      if (!drop || !kp.w) return softmax_grad_row(prow, dprow, n, delta[r]);
      int64_t lo, hi;  // dropped entries of dP count 0 (P is 0 outside the row's range [lo, hi))
      row_range(p, sg, sv.band, i0 + r, &lo, &hi);
      softmax_grad_as<false>(prow, dprow, 0, lo, delta[r], kp);
      softmax_grad_as<true>(prow, dprow, lo, hi, delta[r], kp);
      softmax_grad_as<false>(prow, dprow, hi, n, delta[r], kp);
    };
    // dV += P^T dO; dP = dO V^T; dS = P (dP - delta); dQ += s dS K; dK += s dS^T Q.
    if constexpr (std::is_same_v<C, float>) {
      if (w.own) {
        tile_panels<kPanel>(n, d, rows, rp, pv, 1, ls, dout, d, g.dv_at(sg.k0, d), d, true);
        scores_own(w.vt[sg.src], sg, rows, d, rp, dout, dp - c0);  // dP: same segment, same columns as S
        for (int64_t r = 0; r < rows; ++r) ds_row(r, s + r * ls, dp + r * ls);
        tile_panels<kPanel>(rows, d, n, p.scale, dp, ls, 1, kp, d, dq, d, true);
        tile_panels<kPanel>(n, d, rows, p.scale, dp, 1, ls, q, d, g.dk_at(sg.k0, d), d, true);
        w.clock.lap(kPhasePV);
        continue;
      }
    }
    const C* vp = operand<C>(sv.v + sg.k0 * d, n * d, w.vb.data());
    mm(true, false, n, d, rows, rp, operand<C>(pv, rows * n, w.s16.data()), n, dout, d, 1.f, g.dv_at(sg.k0, d), d);
    mm(false, true, rows, n, d, rp, dout, d, vp, d, 0.f, dp, n);
    for (int64_t r = 0; r < rows; ++r) ds_row(r, s + r * n, dp + r * n);
    const C* ds = operand<C>(dp, rows * n, w.dp16.data());
    mm(false, false, rows, d, n, p.scale, ds, n, kp, d, 1.f, dq, d);
    mm(true, false, n, d, rows, p.scale, ds, n, q, d, 1.f, g.dk_at(sg.k0, d), d);
    w.clock.lap(kPhasePV);
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

#include "cpu/nystrom_impl.h"

void landmark_attend(const float* qlT, int64_t n, int64_t np, const float* k, int64_t lk, const float* v, int64_t lv,
                     const float* bias, int64_t S, int64_t d, float scale, float* t, float* lse, float* ksum,
                     int64_t seg, float* work, float* k3, float* k3max) {
  const int64_t dp = pad_small(d);
  // work: (kLmTile x np) scores, then probabilities (in k3 instead when kept); then these.
  float* vt = work + kLmTile * np;   // (kLmTile x dp) v tile padded to whole vectors (when d % kSmallPad != 0)
  float* m = vt + kLmTile * dp;      // running max per landmark
  float* l = m + np;                 // running sum
  float* alpha = l + np;             // rescale of this tile
  std::fill(m, m + np, kNegInf);
  std::fill(l, l + np, 0.f);
  std::fill(t, t + n * dp, 0.f);
  const Vec vninf(kNegInf), vzero(0.f);
  for (int64_t j0 = 0; j0 < S; j0 += kLmTile) {
    const int64_t tk = std::min(kLmTile, S - j0);
    if (ksum) nystrom_segment_sums(k + j0 * lk, lk, j0, tk, d, seg, ksum, dp);
    const float* bj = bias ? bias + j0 : nullptr;
    if (bj && std::all_of(bj, bj + tk, [](float x) { return x == kNegInf; })) {  // all keys padded
      if (k3) {
        std::fill(k3 + j0 * np, k3 + (j0 + tk) * np, 0.f);
        std::fill(k3max + j0 / kLmTile * np, k3max + (j0 / kLmTile + 1) * np, kNegInf);  // factor exp(-inf) = 0
      }
      continue;
    }
    float* s = k3 ? k3 + j0 * np : work;  // K3 kept: the tile's scores, then its exps, in place there
    gemm_small(tk, np, d, scale, k + j0 * lk, lk, 1, qlT, np, s, np, false);
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
      if (k3max) msafe.store(k3max + j0 / kLmTile * np + c);
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
    const float* vb = v + j0 * lv;
    int64_t lvb = lv;
    if (d != dp) {
      for (int64_t r = 0; r < tk; ++r) {
        std::copy(vb + r * lv, vb + r * lv + d, vt + r * dp);
        std::fill(vt + r * dp + d, vt + (r + 1) * dp, 0.f);
      }
      vb = vt, lvb = dp;
    }
    // t (n x dp) += p^T (n x tk) @ v_tile (tk x dp): p read transposed (landmark l, key r at s[r * np + l]).
    gemm_small(n, dp, tk, 1.f, s, 1, np, vb, lvb, t, dp, true);
  }
  for (int64_t i = 0; i < n; ++i) {
    float* ti = t + i * dp;
    if (l[i] > 0.f)
      scale_row(ti, dp, 1.f / l[i]);
    else
      std::fill(ti, ti + dp, 0.f);
  }
  if (lse) {
    for (int64_t i = 0; i < np; ++i)
      lse[i] = i < n && l[i] > 0.f ? m[i] + std::log(l[i]) : std::numeric_limits<float>::infinity();
  }
}
// A main-source layout (Problem::rows) of a tensor with n rows a pair, the contiguous one where unset.
inline Rows rows_of(const Rows& r, const Problem& p, int64_t n) {
  return r.set ? r : Rows{p.H * n * p.D, n * p.D, p.D, true};
}

// Rows [r0, r0 + n) of (b, h) of x (layout r), D apart: x's own when they are, else copied into buf.
template <class T>
const T* rows_in(const T* x, const Rows& r, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d, AVec<T>& buf) {
  const T* at = x + r.at(b, h, r0);
  if (r.s == d) return at;
  if (buf.size() < static_cast<size_t>(n * d)) buf.resize(n * d);
  for (int64_t i = 0; i < n; ++i) std::copy(at + i * r.s, at + i * r.s + d, buf.data() + i * d);
  return buf.data();
}

// Where rows [r0, r0 + n) of (b, h) of x are written D apart: in x when its rows are, else in buf, which rows_out
// then stores into x.
template <class T>
T* rows_at(T* x, const Rows& r, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d, AVec<T>& buf) {
  if (r.s == d) return x + r.at(b, h, r0);
  if (buf.size() < static_cast<size_t>(n * d)) buf.resize(n * d);
  return buf.data();
}
template <class T>
void rows_out(T* x, const Rows& r, int64_t b, int64_t h, int64_t r0, int64_t n, int64_t d, const T* buf) {
  if (r.s == d) return;
  T* at = x + r.at(b, h, r0);
  for (int64_t i = 0; i < n; ++i) std::copy(buf + i * d, buf + (i + 1) * d, at + i * r.s);
}

// y rows (row stride ys) += x rows (D apart), n rows of d.
inline void add_rows(float* y, int64_t ys, const float* x, int64_t n, int64_t d) {
  if (ys == d) return add_to(y, x, n * d);
  for (int64_t i = 0; i < n; ++i) add_to(y + i * ys, x + i * d, d);
}

// Query tile `tile` of (b, h) = pair bh: its first row i0 (of the pair), its rows, and row0, that row in the
// (B * H * Sq) rows of q, out, dq, lse; its key segments into `segs`. The per-tile header of every task loop.
struct TileRows {
  int64_t i0, rows, row0;
};
inline TileRows tile_rows(const Problem& p, int64_t b, int64_t h, int64_t bh, int64_t tile, std::vector<Seg>& segs) {
  const int64_t i0 = tile * p.bq, rows = std::min(p.bq, p.Sq - i0);
  segs.clear();
  p.segments(b, h, i0, rows, segs);
  return {i0, rows, bh * p.Sq + i0};
}

#if ETKD_NATIVE_BF16
// A forward task of the packed path: pack the keys the tiles [t0, t1) visit, then run the tiles.
void forward_task_packed(const Problem& p, const SrcView<BFloat16>* raw, int64_t b, int64_t h, int64_t bh, int64_t t0,
                         int64_t t1, Work<BFloat16, BFloat16>& w, const BFloat16* q, BFloat16* out, float* lse) {
  int64_t lo[2], hi[2];
  key_range(p, b, h, t0, t1, w.segs, lo, hi);
  const int64_t limit[2] = {p.Sk, p.Sx};
  for (int i = 0; i < 2; ++i)
    if (hi[i] > lo[i]) pack_keys(raw[i].k, raw[i].v, lo[i], hi[i], limit[i], p.D, w.packed[i]);
  w.clock.lap(kPhasePrep);
  const Rows rq = rows_of(p.rows.q, p, p.Sq), ro = rows_of(p.rows.out, p, p.Sq);
  for (int64_t tile = t0; tile < t1; ++tile) {
    const auto [i0, rows, row0] = tile_rows(p, b, h, bh, tile, w.segs);
    BFloat16* ot = rows_at(out, ro, b, h, i0, rows, p.D, w.ocopy);
    forward_tile_packed(p, w.packed, raw, rows_in(q, rq, b, h, i0, rows, p.D, w.qcopy),
                        p.qskip ? p.qskip + b * p.Sq + i0 : nullptr, i0, rows, w, ot, lse + row0);
    rows_out(out, ro, b, h, i0, rows, p.D, ot);
  }
}
#endif

// The tasks of a forward or backward pass: runs of query tiles of one (batch, head), so that a task's keys are
// prepared (converted, packed) once; with fewer (batch, head) pairs than `want` tasks the tiles of each pair are
// split into `chunks` runs. Task t covers tiles [t0, t1) of pair bh = (b, h), run c.
struct Tasks {
  int64_t tiles, bhs, chunks, per;
  Tasks(const Problem& p, int64_t want) {
    tiles = (p.Sq + p.bq - 1) / p.bq;
    bhs = p.B * p.H;
    chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, (want + bhs - 1) / bhs));
    per = (tiles + chunks - 1) / chunks;
  }
  int64_t count() const { return bhs * chunks; }
  struct Task {
    int64_t bh, c, b, h, t0, t1;
  };
  Task at(const Problem& p, int64_t t) const {
    const int64_t bh = t / chunks, c = t % chunks;
    return {bh, c, bh / p.H, bh % p.H, c * per, std::min(tiles, c * per + per)};
  }
};

// The key sources of (b, h) = pair bh: main keys (band when p.w >= 0) and the extra source.
template <class T>
void task_sources(const Problem& p, int64_t bh, int64_t b, int64_t h, SrcView<T>* src) {
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* kx = static_cast<const T*>(p.kx);
  const T* vx = static_cast<const T*>(p.vx);
  const int64_t nx = p.Sx * p.D;
  const Rows rk = rows_of(p.rows.k, p, p.Sk), rv = rows_of(p.rows.v, p, p.Sk);
  src[0] = {k + rk.at(b, h, 0), v + rv.at(b, h, 0), p.kbias ? p.kbias + b * p.Sk : nullptr, p.w >= 0};
  src[1] = {kx ? kx + bh * nx : nullptr, vx ? vx + bh * nx : nullptr, p.kxbias ? p.kxbias + b * p.Sx : nullptr, false};
}

// Main keys and values whose rows are not D apart: the key blocks (of kPackN: the packed paths read whole blocks) a
// task's tiles visit, copied D apart at their own rows of w.kcopy / w.vcopy, which become the task's source.
template <class T, class C>
void key_copies(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, Work<T, C>& w, SrcView<T>* src) {
  const int64_t d = p.D;
  const Rows rk = rows_of(p.rows.k, p, p.Sk), rv = rows_of(p.rows.v, p, p.Sk);
  if (rk.s == d && rv.s == d) return;
  int64_t lo[2], hi[2];
  key_range(p, b, h, t0, t1, w.segs, lo, hi);
  if (hi[0] <= lo[0]) return;
  const int64_t k0 = lo[0] / kPackN * kPackN, k1 = std::min(p.Sk, (hi[0] + kPackN - 1) / kPackN * kPackN);
  auto copy = [&](const T* x, const Rows& r, AVec<T>& buf) -> const T* {
    if (r.s == d) return x;
    if (buf.size() < static_cast<size_t>(p.Sk * d)) buf.resize(p.Sk * d);
    for (int64_t j = k0; j < k1; ++j) std::copy(x + j * r.s, x + j * r.s + d, buf.data() + j * d);
    return buf.data();
  };
  src[0].k = copy(src[0].k, rk, w.kcopy);
  src[0].v = copy(src[0].v, rv, w.vcopy);
  w.clock.lap(kPhasePrep);
}

// Runs task(w, t, tk, src) for every non-empty task t of `tasks` (tk = tasks.at(p, t), src its key sources) on the
// OpenMP threads; each worker keeps one Work (own products: own, AMX tiles: amx) and MKL on one thread.
template <class T, class C, class F>
void for_tasks(const Problem& p, const Tasks& tasks, bool own, bool amx, F task) {
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    const BlasOneThread blas;
    Work<T, C> w(p.bq, p.D);
    w.own = own;
    w.amx = amx;
    for (int64_t t = begin; t < end; ++t) {
      const Tasks::Task tk = tasks.at(p, t);
      if (tk.t0 >= tk.t1) continue;
      w.b = tk.b, w.bh = tk.bh;
      SrcView<T> src[2];
      task_sources(p, tk.bh, tk.b, tk.h, src);
      key_copies(p, tk.b, tk.h, tk.t0, tk.t1, w, src);
      task(w, t, tk, src);
    }
#if ETKD_NATIVE_BF16
    if (amx) brgemm_done();
#endif
  });
}

template <class T, class C>
void forward_as(const Problem& p, T* out, float* lse) {
  const T* q = static_cast<const T*>(p.q);
  // A forward row is computed by one task whatever the split: the split follows the thread count.
  const Tasks tasks(p, 2 * at::get_num_threads());
  bool packed = false, amx = false;
#if ETKD_NATIVE_BF16
  if constexpr (std::is_same_v<C, BFloat16>) {
    const Bf16Path path = bf16_path(p);
    packed = path != Bf16Path::blas;
    amx = path == Bf16Path::amx;
  }
#endif
  const bool own = std::is_same_v<C, float> && own_ok(p);
  for_tasks<T, C>(p, tasks, own, amx, [&](Work<T, C>& w, int64_t, const Tasks::Task& tk, const SrcView<T>* raw) {
    const auto [bh, c, b, h, t0, t1] = tk;
#if ETKD_NATIVE_BF16
    if constexpr (std::is_same_v<C, BFloat16>) {
      if (packed) return forward_task_packed(p, raw, b, h, bh, t0, t1, w, q, out, lse);
    }
#endif
    SrcView<C> src[2];
    prepare_sources(p, raw, b, h, t0, t1, w, src);
    const Rows rq = rows_of(p.rows.q, p, p.Sq), ro = rows_of(p.rows.out, p, p.Sq);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const auto [i0, rows, row0] = tile_rows(p, b, h, bh, tile, w.segs);
      T* ot = rows_at(out, ro, b, h, i0, rows, p.D, w.ocopy);
      forward_tile(p, src, rows_in(q, rq, b, h, i0, rows, p.D, w.qcopy), p.qskip ? p.qskip + b * p.Sq + i0 : nullptr,
                   i0, rows, w, ot, lse + row0);
      rows_out(out, ro, b, h, i0, rows, p.D, ot);
    }
  });
  if constexpr (std::is_same_v<T, BFloat16>)
    count_bf16_call(false, !std::is_same_v<C, BFloat16> ? kProdFp32 : !packed ? kProdMkl : amx ? kProdAmx : kProdDp);
}

// Backward tasks: (batch, head) pairs split into query-tile runs until there are this many tasks, whatever the thread
// count. dK/dV of a pair are sums over its query tiles; a fixed split adds them in a fixed order, so the gradients are
// the same bits for any number of threads (a split by thread count moved the sums' boundaries). A split costs: each
// run packs the K/V its tiles visit (BigBird's global rows visit all of them) and its private dK/dV are zeroed and
// added afterwards: with 16 tasks, BigBird 4096 x 12 heads (2 runs a head) took about 7% more CPU time without
// dropout than with one run a head (forward + backward, 1 thread, Xeon avx512_bf16, two runs each, load 6-9). 8 tasks:
// no split from 8 pairs on (a model's batch x heads), and up to 8 threads kept busy on a single pair.
constexpr int64_t kBackwardTasks = 8;

// A backward chunk after the first of its pair: dK/dV of the keys its tiles visit ([lo[i], hi[i]) of source i), in
// private buffers added to the pair's gradients after every task is done, chunk by chunk.
struct Partial {
  AVec<float> buf;  // per source with keys: dk, then dv, (hi - lo) x D each
  int64_t lo[2] = {0, 0}, hi[2] = {0, 0};
};

template <class T, class C>
void backward_as(const Problem& p, const T* dout, const float* lse, const float* delta, float* dq, float* dk, float* dv,
                 float* dkx, float* dvx) {
  const T* q = static_cast<const T*>(p.q);
  // dK/dV of different query tiles overlap: a task owns all tiles of a (b, h) chunk; chunks after the first
  // accumulate into private buffers (Partial), summed afterwards in chunk order.
  const Tasks tasks(p, kBackwardTasks);
  const int64_t bhs = tasks.bhs, chunks = tasks.chunks, d = p.D;
  const int64_t nk = p.Sk * d, nx = p.Sx * d;
  std::vector<Partial> parts(chunks > 1 ? tasks.count() : 0);
  const bool own = std::is_same_v<C, float> && own_ok(p);
  // bf16 products on K/V packed once per task (backward_tile_packed, with or without dropout): AMX brgemm where the
  // CPU has AMX (and ETKD_CPU_AMX is not 0), else the own vdpbf16ps kernels; MKL's bf16 GEMM per tile when bf16_path
  // says blas or dO is not 4-byte aligned.
  const Rows rq = rows_of(p.rows.q, p, p.Sq), rdo = rows_of(p.rows.dout, p, p.Sq), rdq = rows_of(p.rows.dq, p, p.Sq);
  const Rows rdk = rows_of(p.rows.dk, p, p.Sk), rdv = rows_of(p.rows.dv, p, p.Sk);
  // Chunk 0 adds its pair's main-key dK/dV in place where their rows are D apart, else into w.dkcopy / w.dvcopy (its
  // key range), stored at the task's end.
  const bool kgrad_copy = rdk.s != d || rdv.s != d;
  bool packed = false, amx = false;
#if ETKD_NATIVE_BF16
  if constexpr (std::is_same_v<C, BFloat16>) {
    const Bf16Path path = bf16_path(p);
    // dO's tile rows 4-byte aligned: copied (rows not D apart), or in place from an aligned start
    const bool aligned =
        rdo.s != d || (reinterpret_cast<uintptr_t>(dout) % 4 == 0 && rdo.b % 2 == 0 && rdo.h % 2 == 0);
    packed = path != Bf16Path::blas && aligned;
    amx = packed && path == Bf16Path::amx;
  }
#endif
  if (!p.add_grads && tasks.tiles == 0) {  // no query tile, no task: the key gradients are zero
    std::fill(dk, dk + bhs * nk, 0.f), std::fill(dv, dv + bhs * nk, 0.f);
    if (dkx) std::fill(dkx, dkx + bhs * nx, 0.f), std::fill(dvx, dvx + bhs * nx, 0.f);
  }
  for_tasks<T, C>(p, tasks, own, amx, [&](Work<T, C>& w, int64_t t, const Tasks::Task& tk, const SrcView<T>* src) {
    const auto [bh, c, b, h, t0, t1] = tk;
    if (!p.add_grads) {  // the gradients this task owns, zeroed: dQ of its tiles' rows, dK/dV of its pair (chunk 0)
      if (rdq.s == d) {  // else each tile zeroes its private dQ rows
        const int64_t r0 = t0 * p.bq, r1 = std::min(p.Sq, t1 * p.bq);
        std::fill(dq + rdq.at(b, h, r0), dq + rdq.at(b, h, r0) + (r1 - r0) * d, 0.f);
      }
      if (c == 0) {
        if (!kgrad_copy)
          std::fill(dk + rdk.at(b, h, 0), dk + rdk.at(b, h, 0) + nk, 0.f),
              std::fill(dv + rdv.at(b, h, 0), dv + rdv.at(b, h, 0) + nk, 0.f);
        if (dkx) std::fill(dkx + bh * nx, dkx + (bh + 1) * nx, 0.f), std::fill(dvx + bh * nx, dvx + (bh + 1) * nx, 0.f);
      }
    }
    int64_t lo[2] = {0, 0}, hi[2] = {0, 0};  // the keys the chunk's tiles visit
    if (own || packed || c > 0 || kgrad_copy) key_range(p, b, h, t0, t1, w.segs, lo, hi);
    const int64_t klo = hi[0] > lo[0] ? lo[0] : 0, khi = hi[0] > lo[0] ? hi[0] : 0;  // main keys visited
    GradView grad[2];
    if (c == 0) {
      grad[0] = {dk + rdk.at(b, h, 0), dv + rdv.at(b, h, 0)};
      if (kgrad_copy) {
        w.dkcopy.assign((khi - klo) * d, 0.f), w.dvcopy.assign((khi - klo) * d, 0.f);
        grad[0] = {w.dkcopy.data(), w.dvcopy.data(), klo};
      }
      grad[1] = {dkx ? dkx + bh * nx : nullptr, dvx ? dvx + bh * nx : nullptr};
    } else {
      Partial& pt = parts[t];
      int64_t size = 0;
      for (int i = 0; i < 2; ++i) {
        pt.lo[i] = lo[i], pt.hi[i] = std::max(lo[i], hi[i]);
        size += 2 * (pt.hi[i] - pt.lo[i]) * d;
      }
      pt.buf.assign(size, 0.f);
      float* at = pt.buf.data();
      for (int i = 0; i < 2; ++i) {
        const int64_t n = (pt.hi[i] - pt.lo[i]) * d;
        grad[i] = {at, at + n, pt.lo[i]};
        at += 2 * n;
      }
    }
    if (own || packed) {  // the keys the chunk's tiles visit, packed for the own / packed bf16 products
      for (int i = 0; i < 2; ++i) {
        if (hi[i] <= lo[i]) continue;
        if constexpr (std::is_same_v<C, float>) {
          pack_keys_t(src[i].k, lo[i], hi[i], d, w.kt[i], w.tmp);
          pack_keys_t(src[i].v, lo[i], hi[i], d, w.vt[i], w.tmp);
        }
#if ETKD_NATIVE_BF16
        else {
          pack_keys(src[i].k, src[i].v, lo[i], hi[i], i == 0 ? p.Sk : p.Sx, d, w.packed[i], true);
        }
#endif
      }
      w.clock.lap(kPhasePrep);
    }
    for (int64_t tile = t0; tile < t1; ++tile) {
      const auto [i0, rows, row0] = tile_rows(p, b, h, bh, tile, w.segs);
      const uint8_t* skip = p.qskip ? p.qskip + b * p.Sq + i0 : nullptr;
      const T* qt = rows_in(q, rq, b, h, i0, rows, d, w.qcopy);
      const T* dot_ = rows_in(dout, rdo, b, h, i0, rows, d, w.docopy);
      float* dqt = rows_at(dq, rdq, b, h, i0, rows, d, w.dqcopy);
      if (rdq.s != d) {  // the tile's dQ rows in a private copy, stored after the tile
        if (p.add_grads)
          rows_in(static_cast<const float*>(dq), rdq, b, h, i0, rows, d, w.dqcopy);
        else
          std::fill(dqt, dqt + rows * d, 0.f);
      }
      bool done = false;
#if ETKD_NATIVE_BF16
      if constexpr (std::is_same_v<C, BFloat16>) {
        if (packed) {
          backward_tile_packed(p, w.packed, src, grad, qt, dot_, lse + row0, delta + row0, skip, i0, rows, w, dqt);
          done = true;
        }
      }
#endif
      if (!done) backward_tile(p, src, grad, qt, dot_, lse + row0, delta + row0, skip, i0, rows, w, dqt);
      rows_out(dq, rdq, b, h, i0, rows, d, dqt);
    }
    if (c == 0 && kgrad_copy) {  // chunk 0's private dK/dV into the pair's rows: its key range, zeros (or nothing) elsewhere
      auto store = [&](float* x, int64_t xs, const float* g) {
        for (int64_t j = 0; j < p.Sk; ++j) {
          float* row = x + j * xs;
          if (j >= klo && j < khi) {
            if (p.add_grads)
              add_to(row, g + (j - klo) * d, d);
            else
              std::copy(g + (j - klo) * d, g + (j - klo + 1) * d, row);
          } else if (!p.add_grads) {
            std::fill(row, row + d, 0.f);
          }
        }
      };
      store(dk + rdk.at(b, h, 0), rdk.s, w.dkcopy.data());
      store(dv + rdv.at(b, h, 0), rdv.s, w.dvcopy.data());
    }
  });
  if constexpr (std::is_same_v<T, BFloat16>)
    count_bf16_call(true, !std::is_same_v<C, BFloat16> ? kProdFp32 : !packed ? kProdMkl : amx ? kProdAmx : kProdDp);
  if (chunks > 1) {
    at::parallel_for(0, bhs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p.H, h = bh % p.H;
        float* dst[2][2] = {{dk + rdk.at(b, h, 0), dv + rdv.at(b, h, 0)},
                            {dkx ? dkx + bh * nx : nullptr, dvx ? dvx + bh * nx : nullptr}};
        const int64_t stride[2][2] = {{rdk.s, rdv.s}, {d, d}};  // row strides
        for (int64_t c = 1; c < chunks; ++c) {  // in chunk order: the same sums for any thread count
          const Partial& pt = parts[bh * chunks + c];
          const float* x = pt.buf.data();
          for (int i = 0; i < 2; ++i) {
            const int64_t keys = pt.hi[i] - pt.lo[i], n = keys * d;
            for (int g = 0; g < 2; ++g, x += n)
              if (dst[i][g] && n) add_rows(dst[i][g] + pt.lo[i] * stride[i][g], stride[i][g], x, keys, d);
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

// Dropout on a block of probabilities outside the tile loops (Nystrom's K1): x[r, c] = keep(bh, row0 + r, col0 + c) ?
// x[r, c] * dr.scale : 0 for r < rows, c < n (row stride ld); columns taken kMaxSeg at a time, the keep bits of kRows
// rows at once (one keep_grid).
void dropout_rows(const Dropout& dr, int64_t bh, int64_t row0, int64_t rows, int64_t col0, int64_t n, float* x,
                  int64_t ld) {
  constexpr int64_t kRows = 8;
  uint64_t bits[kRows * kKeepWords];  // kRows x (up to kMaxSeg / 8 + 2) calls' bytes and the slack keep_grid takes
  const Vec vs(dr.scale);
  for (int64_t c0 = 0; c0 < n; c0 += kMaxSeg) {
    const int64_t c1 = std::min(n, c0 + kMaxSeg), len = c1 - c0, g0 = (col0 + c0) >> 3;
    const int64_t G = ((col0 + c1 + 7) >> 3) - g0;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t rr = std::min(kRows, rows - r0);
      keep_grid(dr, static_cast<uint32_t>(bh), static_cast<uint32_t>(row0 + r0), nullptr, rr, g0, G,
                reinterpret_cast<uint8_t*>(bits));
      for (int64_t r = 0; r < rr; ++r) {
        const Keep kp{bits, 8 * r * G + col0 + c0 - 8 * g0};
        float* xr = x + (r0 + r) * ld + c0;
        int64_t j = 0;
        for (; j + kV <= len; j += kV) keep_vec(Vec::loadu(xr + j) * vs, kp.at64(j)).store(xr + j);
        for (; j < len; ++j) xr[j] = kp.at(j) ? xr[j] * dr.scale : 0.f;
      }
    }
  }
}

// Multiply-adds per ns (GMAC/s; best of 200 on the calling thread, so a loaded machine lowers it less than a
// kernel's time) of this target's own tile products on the forward's shapes: S = Q K^T over ten 64-key blocks and
// acc += P V over those 640 keys, 64 query rows, head dim 64. kind 0: the fp32 FMA micro-kernels; kind 1: the
// vdpbf16ps ones (0 where the target has none). Their ratio is the bound the bf16 products without AMX have here
// against the fp32 ones (bench_isa --profile prints it).
double product_rate(int kind) {
#if ETKD_OWN_PRODUCTS
  constexpr int64_t rows = 64, d = 64, nc = 10 * kPackN;
  AVec<float> a(rows * nc, 0.01f), b(nc * d, 0.02f), c(rows * nc);
#if ETKD_NATIVE_BF16
  AVec<uint16_t> ab(rows * nc, 0x3c00), bb(nc * d, 0x3c00);  // bf16 1.0
#endif
  int64_t best = INT64_MAX;
  for (int rep = 0; rep < 200; ++rep) {
    const int64_t t0 = now_ns();
    if (kind == 0) {
      for (int64_t b0 = 0; b0 < nc; b0 += kPackN)
        tile_panels<kPanel>(rows, kPackN, d, 1.f, a.data(), d, 1, b.data() + b0 * d, kPackN, c.data() + b0, nc, false);
      tile_panels<kPanel>(rows, d, nc, 1.f, a.data(), nc, 1, b.data(), d, c.data(), d, true);
    } else {
#if ETKD_NATIVE_BF16
      for (int64_t b0 = 0; b0 < nc; b0 += kPackN)
        dp_gemm(rows, kPackN, d / 2, 1.f, ab.data(), d / 2, 1, bb.data() + b0 * d, kPackN, c.data() + b0, nc, false);
      dp_gemm(rows, d, nc / 2, 1.f, ab.data(), nc / 2, 1, bb.data(), d, c.data(), d, true);
#else
      return 0.0;
#endif
    }
    best = std::min(best, now_ns() - t0);
  }
  return 2.0 * rows * nc * d / static_cast<double>(std::max<int64_t>(best, 1));
#else
  return 0.0;
#endif
}

}  // namespace

// This target's table (isa.cpp). native_bf16 needs MKL's bf16 GEMM in the torch build (a weak symbol).
const Kernels& table() {
  static const Kernels t = [] {
    Kernels k;
    k.name = ETKD_ISA_NAME;
    k.native_bf16 = native_bf16();
    k.own_products = ETKD_OWN_PRODUCTS;
    k.vec_floats = static_cast<int>(kV);
    k.run_forward = run_forward;
    k.run_backward = run_backward;
    k.gemm_small = gemm_small;
    k.landmark_attend = landmark_attend;
    k.nystrom_k3_bwd = nystrom_k3_bwd;
    k.softmax_rows = softmax_rows;
    k.rowwise_dot = rowwise_dot;
    k.dropout_rows = dropout_rows;
    k.product_rate = product_rate;
    return k;
  }();
  return t;
}

}  // namespace etkd::cpu::ETKD_ISA
