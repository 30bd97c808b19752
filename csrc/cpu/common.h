// Tensor glue shared by the CPU op files: argument checks, dtypes, mask -> bias/skip conversion.
//
// Dtypes: float32, bfloat16 and float16 inputs, read and written in their own dtype (Problem::elem); fp32
// softmax statistics and accumulation; gradients accumulated in float32 and cast back (`as_dtype`).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "cpu/flash_tile.h"
#include "cpu/isa.h"
#include "cpu/ops.h"

namespace etkd::cpu {

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": the cpu backend supports float32, bfloat16 and float16, got ", dt);
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_like(const Tensor& t, const Tensor& like, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

inline Elem elem_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return Elem::bf16;
    case at::kHalf: return Elem::f16;
    default: return Elem::f32;
  }
}

// A result in the caller's dtype.
inline Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// delta (rows) = rowsum(dout * out) over the last dim, in float32: the target's SIMD dot for float32; for 16-bit
// dout and out one pass over both, each element converted in the loop (the float32 copies, product and sum ATen
// would make took about as long as the bf16 backward's tiles: 4 passes over 2 x 12 MiB at seq 4096 x 12 x 64).
inline Tensor row_delta(const Tensor& dout, const Tensor& out) {
  auto delta = at::empty(out.sizes().slice(0, out.dim() - 1), out.options().dtype(at::kFloat));
  const int64_t rows = delta.numel(), d = out.size(-1);
  float* dl = delta.data_ptr<float>();
  if (dout.scalar_type() == at::kFloat) {
    rowwise_dot(dout.data_ptr<float>(), out.data_ptr<float>(), dl, rows, d);
    return delta;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dout.scalar_type(), "row_delta", [&] {
    const scalar_t* a = dout.data_ptr<scalar_t>();
    const scalar_t* b = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float acc = 0.f;
        for (int64_t c = 0; c < d; ++c) acc += static_cast<float>(a[r * d + c]) * static_cast<float>(b[r * d + c]);
        dl[r] = acc;
      }
    });
  });
  return delta;
}

// The opening of a tile backward (sliding window, block sparse, full): grad_out and out checked against q, lse
// float32; delta = rowsum(grad_out * out) and the float32 gradients dq, dk, dv shaped like q, uninitialised: the
// backward's first pass writes them (Problem::add_grads false), its tasks zeroing what they own.
struct BackwardStart {
  Tensor delta, dq, dk, dv;
};
inline BackwardStart backward_start(const Tensor& grad_out, const Tensor& out, const Tensor& q, const Tensor& lse) {
  check_like(grad_out, q, "grad_out");
  check_like(out, q, "out");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse: expected contiguous float32");
  const auto f32 = q.options().dtype(at::kFloat);
  return {row_delta(grad_out, out).contiguous(), at::empty(q.sizes(), f32), at::empty(q.sizes(), f32),
          at::empty(q.sizes(), f32)};
}

// (B, S) bool "real token" mask as uint8 (all ones when absent).
inline Tensor real_mask(const OptTensor& kpm, int64_t B, int64_t S) {
  if (!kpm.has_value()) return at::ones({B, S}, at::kByte);
  TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == B && kpm->size(1) == S, "key_padding_mask: expected (", B, ", ",
              S, "), got ", kpm->sizes());
  return kpm->to(at::kByte).contiguous();
}

// The dropout settings of a kernel call (flash_tile.h Dropout; etkd_kernels/_shared.py): off when p == 0.
inline Dropout dropout_of(double p, int64_t seed, int64_t offset) {
  Dropout d;
  if (p == 0) return d;
  TORCH_CHECK(p > 0 && p < 1, "dropout_p: expected a float in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "seed: expected an int in [0, 2**63), got ", seed);
  d.on = true;
  d.thr = static_cast<uint32_t>(std::min(65535.0, std::floor(p * 65536.0)));
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  d.key0 = static_cast<uint32_t>(seed & 0xFFFFFFFF), d.key1 = static_cast<uint32_t>((seed >> 32) & 0xFFFFFFFF);
  d.offset = static_cast<uint32_t>(offset & 0xFFFFFFFF);
  return d;
}

// 0 where `ok`, -inf elsewhere, float32.
inline Tensor bias_from(const Tensor& ok) {
  return at::where(ok.to(at::kBool), at::zeros({}, at::kFloat),
                   at::full({}, -std::numeric_limits<float>::infinity(), at::kFloat))
      .contiguous();
}

}  // namespace etkd::cpu
