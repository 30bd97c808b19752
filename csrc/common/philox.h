// The attention-dropout RNG contract (etkd_kernels/_shared.py: `philox4x32_10`, `dropout_keep`) for the
// CUDA kernels and the host tests: Philox4x32-10 (Random123's multipliers and Weyl key bumps), curand-free.
// Pure functions on uint32: __host__ __device__ under nvcc, plain inline functions under g++, so the code
// the kernels run is what tests/cpp/test_philox.cpp checks against Random123's known answers.
//
// Element (batch b, head h, query row i, key column j) of a call with seed s and offset o:
//   counter = (j >> 3, i, b * H + h, o & 0xffffffff), key = (s & 0xffffffff, s >> 32);
//   one call covers 8 key columns: u16 = (r[(j & 7) >> 1] >> (16 * (j & 1))) & 0xffff;
//   kept iff u16 >= thr, thr = min(65535, floor(p * 65536)); kept values are scaled by 1 / (1 - p).
// i and j are absolute positions of the op's own [0, seq) coordinates, so the mask depends on no tiling.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ETKD_RNG_HD __host__ __device__ __forceinline__
#else
#define ETKD_RNG_HD inline
#endif

namespace etkd {
namespace rng {

struct Philox4 {
  uint32_t r[4];
};

ETKD_RNG_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

ETKD_RNG_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// What a kernel needs of one call's dropout: the key and offset words, the 16-bit threshold and the scale.
// `enabled` false: no dropout (the kernels then take their dropout-free instantiation).
struct Dropout {
  bool enabled;
  uint32_t k0, k1, offset;
  uint32_t threshold;
  float scale;  // 1 / (1 - p), computed in double by the caller
};

// min(65535, floor(p * 65536)): p is resolved to 1/65536.
ETKD_RNG_HD uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0;
  return t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
}

inline Dropout make_dropout(double p, uint64_t seed, uint64_t offset) {
  Dropout d{};
  d.enabled = p > 0.0;
  d.k0 = static_cast<uint32_t>(seed & 0xffffffffu);
  d.k1 = static_cast<uint32_t>((seed >> 32) & 0xffffffffu);
  d.offset = static_cast<uint32_t>(offset & 0xffffffffu);
  d.threshold = dropout_threshold(p);
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// The 16 random bits of element (bh = b * H + h, i, j).
ETKD_RNG_HD uint32_t dropout_bits(const Dropout& d, int bh, int i, int j) {
  const uint32_t ju = static_cast<uint32_t>(j);
  const Philox4 x = philox4x32_10(ju >> 3, static_cast<uint32_t>(i), static_cast<uint32_t>(bh), d.offset, d.k0, d.k1);
  const uint32_t w = (ju & 7u) >> 1;  // selects, not x.r[w]: a runtime index would put x in local memory
  const uint32_t word = w == 0 ? x.r[0] : w == 1 ? x.r[1] : w == 2 ? x.r[2] : x.r[3];
  return (word >> (16u * (ju & 1u))) & 0xffffu;
}

ETKD_RNG_HD bool dropout_keep(const Dropout& d, int bh, int i, int j) { return dropout_bits(d, bh, i, j) >= d.threshold; }

}  // namespace rng
}  // namespace etkd
