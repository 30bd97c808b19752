// Runtime ISA dispatch of the CPU kernels.
//
// The SIMD code (csrc/cpu/flash_tile_impl.h) is compiled once per target by the small files in csrc/cpu/isa/
// (avx2.cpp, avx512.cpp, avx512_bf16.cpp), each of which names its target (ETKD_ISA, our own per-target
// namespace, and the GCC target string) and includes csrc/cpu/isa/x86_target.h, the one body that sets
// `#pragma GCC target`, CPU_CAPABILITY (at::vec's per-target inline namespace) and the feature macros, includes
// the impl and so fills one `Kernels` table. isa.cpp picks one table once, at first use: the widest target the CPU
// reports (`__builtin_cpu_supports`), or the one named by ETKD_CPU_ISA=avx2|avx512|avx512_bf16 (a target that
// is not built or that this CPU lacks is an error, never a silent downgrade). A CPU never executes the code of
// a target it does not report: every entry point below goes through the chosen table.
//
// setup.py compiles a target only when the compiler accepts it (a compile probe) and passes ETKD_HAVE_<ISA>=1;
// a wrapper whose macro is unset compiles to an empty translation unit.
//
// How a new kernel file joins (e.g. csrc/cpu/lsg.cpp):
//   - torch-facing glue (argument checks, tensors, dtype) stays in csrc/cpu/<op>.cpp, compiled once, baseline;
//   - ISA-specific loops go into a header included by flash_tile_impl.h (or next to it), written against
//     `Vec` (at::vec::Vectorized<float>) and the helpers there, inside namespace etkd::cpu::ETKD_ISA;
//   - add a function pointer to `Kernels`, fill it in flash_tile_impl.h's `make_kernels()`, and call it as
//     `kernels().my_fn(...)` (or through a plain wrapper like run_forward in isa.cpp);
//   - 16-bit inputs: templated on the storage type T and the product type C like flash_tile_impl.h's driver
//     (`operand<C>` converts a tile on load into scratch; `from_float` / `store_scaled` write T back);
//     `kernels().native_bf16` says whether the chosen target multiplies bf16 tiles as bf16.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/flash_tile.h"

namespace etkd::cpu {

struct Kernels {
  const char* name = nullptr;  // "avx2", "avx512", "avx512_bf16"
  bool native_bf16 = false;    // bf16 tiles multiplied as bf16 (fp32 accumulation) rather than converted on load
  bool own_products = false;   // fp32 tile products (fwd + bwd) by this target's micro-kernels (unless ETKD_CPU_GEMM=blas)
  int vec_floats = 0;          // floats per vector: the own products need head_dim a multiple of it
  void (*run_forward)(const Problem& p, void* out, float* lse) = nullptr;
  void (*run_backward)(const Problem& p, const void* dout, const float* lse, const float* delta, float* dq,
                       float* dk, float* dv, float* dkx, float* dvx) = nullptr;
  void (*gemm_small)(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                     const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) = nullptr;
  void (*landmark_attend)(const float* qlT, int64_t n, int64_t np, const float* k, int64_t lk, const float* v,
                          int64_t lv, const float* bias, int64_t S, int64_t d, float scale, float* t, float* lse,
                          float* ksum, int64_t seg, float* work, float* k3, float* k3max) = nullptr;
  void (*nystrom_k3_bwd)(const float* qlT, const float* lse, const float* k, int64_t lk, const float* v, int64_t lv,
                         const float* bias, int64_t S, int64_t n, int64_t np, int64_t dp, float scale, const float* dt,
                         const float* dtT, const float* dl, const float* ql, const float* dkl, int64_t seg, float* dv,
                         int64_t ldv, float* dk, int64_t ldk, float* dql, float* work, const float* k3,
                         const float* k3max) = nullptr;
  void (*softmax_rows)(float* s, int64_t rows, int64_t n, int64_t ld, const float* bias) = nullptr;
  void (*rowwise_dot)(const float* a, const float* b, float* delta, int64_t rows, int64_t d) = nullptr;
  void (*dropout_rows)(const Dropout& dr, int64_t bh, int64_t row0, int64_t rows, int64_t col0, int64_t n, float* x,
                       int64_t ld) = nullptr;
  // Multiply-adds per ns of the own tile products on the calling thread (flash_tile_impl.h: product_rate).
  double (*product_rate)(int kind) = nullptr;
};

// The table chosen for this process (first call decides; throws when ETKD_CPU_ISA names an unusable target).
const Kernels& kernels();

// Targets compiled into this build, in order of preference (widest last).
std::vector<std::string> built_isas();
// Targets this CPU can run among the built ones.
std::vector<std::string> supported_isas();

}  // namespace etkd::cpu
