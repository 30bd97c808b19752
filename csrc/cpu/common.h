// Tensor glue shared by the CPU op files: argument checks and mask -> bias/skip conversion.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string>

#include "cpu/ops.h"

namespace etkd::cpu {

inline void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": the cpu backend supports float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_like(const Tensor& t, const Tensor& like, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.sizes() == like.sizes(), name, ": expected shape ", like.sizes(), ", got ", t.sizes());
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
