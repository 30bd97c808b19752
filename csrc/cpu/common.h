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

// A (B, H, rows, D) tensor whose rows the tile driver reads or writes in place (flash_tile.h: Rows): its last dim
// contiguous.
inline bool rows_ok(const Tensor& t) { return t.dim() == 4 && (t.stride(3) == 1 || t.size(3) <= 1); }

// t as the strided ops take it: itself when rows_ok, else a contiguous copy (e.g. the expanded gradient of a sum).
inline Tensor with_rows(const Tensor& t) { return rows_ok(t) ? t : t.contiguous(); }

// Where the rows of t (rows_ok) are.
inline Rows row_layout(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), true}; }

// any_rows: the op reads t at any row strides (rows_ok), else t must be contiguous.
inline void check_float(const Tensor& t, const char* name, bool any_rows = false) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              ": the cpu backend supports float32, bfloat16 and float16, got ", dt);
  if (any_rows) {
    TORCH_CHECK(rows_ok(t), name, ": expected (batch, heads, seq, head_dim) with head_dim contiguous (stride 1), got ",
                t.sizes(), " strides ", t.strides());
  } else {
    TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  }
}

inline void check_like(const Tensor& t, const Tensor& like, const char* name, bool any_rows = false) {
  check_float(t, name, any_rows);
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
// dout and out contiguous, or 4-d with rows at any strides (rows_ok); delta contiguous.
inline Tensor row_delta(const Tensor& dout, const Tensor& out) {
  auto delta = at::empty(out.sizes().slice(0, out.dim() - 1), out.options().dtype(at::kFloat));
  const int64_t rows = delta.numel(), d = out.size(-1);
  float* dl = delta.data_ptr<float>();
  const bool dense = dout.is_contiguous() && out.is_contiguous();
  if (dout.scalar_type() == at::kFloat && dense) {
    rowwise_dot(dout.data_ptr<float>(), out.data_ptr<float>(), dl, rows, d);
    return delta;
  }
  // Row r = ((b * H) + h) * S + s: its element offset in a 4-d tensor t (rows_ok), or r * d when contiguous.
  const int64_t H = dense ? 1 : out.size(1), S = dense ? 1 : out.size(2);
  auto offset = [&](const Tensor& t, int64_t r) {
    if (dense) return r * d;
    return (r / (H * S)) * t.stride(0) + (r / S % H) * t.stride(1) + (r % S) * t.stride(2);
  };
  if (dout.scalar_type() == at::kFloat) {  // strided float32: the target's SIMD dot row by row
    const float* a = dout.data_ptr<float>();
    const float* b = out.data_ptr<float>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rowwise_dot(a + offset(dout, r), b + offset(out, r), dl + r, 1, d);
    });
    return delta;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dout.scalar_type(), "row_delta", [&] {
    const scalar_t* a = dout.data_ptr<scalar_t>();
    const scalar_t* b = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = a + offset(dout, r);
        const scalar_t* y = b + offset(out, r);
        float acc = 0.f;
        for (int64_t c = 0; c < d; ++c) acc += static_cast<float>(x[c]) * static_cast<float>(y[c]);
        dl[r] = acc;
      }
    });
  });
  return delta;
}

// The opening of a tile backward (sliding window, block sparse, full): grad_out and out checked against q (at any
// row strides with any_rows), lse float32; delta = rowsum(grad_out * out) and the float32 gradients dq, dk, dv in
// the layouts of q, k, v (empty_like), uninitialised: the backward's first pass writes them (Problem::add_grads
// false), its tasks zeroing what they own.
struct BackwardStart {
  Tensor delta, dq, dk, dv;
};
inline BackwardStart backward_start(const Tensor& grad_out, const Tensor& out, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& lse, bool any_rows = false) {
  check_like(grad_out, q, "grad_out", any_rows);
  check_like(out, q, "out", any_rows);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse: expected contiguous float32");
  const auto f32 = q.options().dtype(at::kFloat);
  return {row_delta(grad_out, out).contiguous(), at::empty_like(q, f32), at::empty_like(k, f32),
          at::empty_like(v, f32)};
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
