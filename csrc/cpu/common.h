// Tensor glue shared by the CPU op files: argument checks, dtypes, mask -> bias/skip conversion.
//
// Dtypes: float32, bfloat16 and float16 inputs. A call computes in float32 with fp32 softmax statistics and
// accumulation; 16-bit tiles are multiplied as bf16 only where the chosen ISA target does it natively
// (kernels().native_bf16, bf16 inputs); otherwise 16-bit inputs are converted to float32 on load
// (`kernel_input`) and outputs and gradients cast back to the input dtype (`as_dtype`).
#pragma once

#include <ATen/ATen.h>

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

// Whether a call with inputs of dtype `dt` runs bf16 tiles natively (else: float32 kernels).
inline bool native_tiles(at::ScalarType dt) { return dt == at::kBFloat16 && kernels().native_bf16; }

// `t` as the kernels read it: itself (float32, or bf16 on a native target), else converted to float32.
inline Tensor kernel_input(const Tensor& t, bool native) {
  if (native || t.scalar_type() == at::kFloat) return t.contiguous();
  return t.to(at::kFloat).contiguous();
}
inline OptTensor kernel_input(const OptTensor& t, bool native) {
  if (!t.has_value()) return t;
  return kernel_input(*t, native);
}

// A result in the caller's dtype.
inline Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// delta (rows) = rowsum(dout * out) over the last dim, in float32.
inline Tensor row_delta(const Tensor& dout, const Tensor& out) {
  if (dout.scalar_type() != at::kFloat) return (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  auto delta = at::empty(out.sizes().slice(0, out.dim() - 1), out.options());
  rowwise_dot(dout.data_ptr<float>(), out.data_ptr<float>(), delta.data_ptr<float>(), delta.numel(),
              out.size(-1));
  return delta;
}

// (B, S) bool "real token" mask as uint8 (all ones when absent).
inline Tensor real_mask(const OptTensor& kpm, int64_t B, int64_t S) {
  if (!kpm.has_value()) return at::ones({B, S}, at::kByte);
  TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == B && kpm->size(1) == S, "key_padding_mask: expected (", B, ", ",
              S, "), got ", kpm->sizes());
  return kpm->to(at::kByte).contiguous();
}

// 0 where `ok`, -inf elsewhere, float32.
inline Tensor bias_from(const Tensor& ok) {
  return at::where(ok.to(at::kBool), at::zeros({}, at::kFloat),
                   at::full({}, -std::numeric_limits<float>::infinity(), at::kFloat))
      .contiguous();
}

}  // namespace etkd::cpu
