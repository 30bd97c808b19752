// The body of every x86-64 target file (csrc/cpu/isa/{avx2,avx512,avx512_bf16}.cpp), written once: the including
// file, after cpu/isa/prelude.h and inside its `#if ETKD_HAVE_<ISA>` guard, defines
//   ETKD_ISA          our per-target namespace (etkd::cpu::ETKD_ISA) and the name isa.cpp reports, e.g. avx512
//   ETKD_ISA_TARGET   the GCC target string, e.g. "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,..."
//   ETKD_ISA_AVX512   1: at::vec's 512-bit Vectorized (CPU_CAPABILITY_AVX512); 0: the 256-bit AVX2 one
//   ETKD_NATIVE_BF16  1: the target has avx512bf16 (native bf16 tiles in flash_tile_impl.h)
// and includes this file once. No include guard: each target's translation unit includes it exactly once.
#if !defined(ETKD_ISA) || !defined(ETKD_ISA_TARGET) || !defined(ETKD_ISA_AVX512) || !defined(ETKD_NATIVE_BF16)
#error "cpu/isa/x86_target.h: define ETKD_ISA, ETKD_ISA_TARGET, ETKD_ISA_AVX512 and ETKD_NATIVE_BF16 first"
#endif

#define ETKD_PRAGMA_(x) _Pragma(#x)
#define ETKD_PRAGMA(x) ETKD_PRAGMA_(x)  // expands ETKD_ISA_TARGET before _Pragma reads it
#define ETKD_CAT_(a, b) a##b
#define ETKD_CAT(a, b) ETKD_CAT_(a, b)
#define ETKD_STR_(x) #x
#define ETKD_STR(x) ETKD_STR_(x)

#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wpsabi"
ETKD_PRAGMA(GCC target(ETKD_ISA_TARGET))
// g++ lexes the whole file before it sees the pragma, so the feature macros the vec and sleef headers test are
// not set by it: set them for the rest of this translation unit.
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
#if ETKD_ISA_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY_AVX512
#else
#define CPU_CAPABILITY_AVX2
#endif
#if ETKD_NATIVE_BF16 && !defined(__AVX512BF16__)
#define __AVX512BF16__ 1
#endif
#define CPU_CAPABILITY ETKD_CAT(etkd_, ETKD_ISA)  // at::vec's per-target inline namespace: at::vec::etkd_<isa>
#define ETKD_ISA_NAME ETKD_STR(ETKD_ISA)
#include <ATen/cpu/vec/vec.h>

#include "cpu/flash_tile_impl.h"
#pragma GCC pop_options
