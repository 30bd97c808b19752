// Everything a per-ISA kernel file (csrc/cpu/isa/*.cpp) includes before its `#pragma GCC target`: code
// included here is compiled for the baseline, so no inline function shared with other translation units
// (std::, c10::) is ever emitted with a wider target's instructions. Only at::vec (per-target namespace,
// CPU_CAPABILITY) and our own kernels (namespace ETKD_ISA) come after the pragma.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <ostream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

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

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/flash_tile.h"
#include "cpu/isa.h"

// MKL's bf16 x bf16 -> fp32 GEMM, exported by x86 torch builds that link MKL; weak, so a build without it
// loads and simply has no native bf16 path (Kernels::native_bf16 = false).
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));
namespace etkd::cpu {
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
}
