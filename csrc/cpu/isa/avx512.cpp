// The AVX-512 (F/BW/VL/DQ) target: 16-float vectors for the softmax loops and gemm_small (see isa.h).
#include "cpu/isa/prelude.h"

#if defined(__x86_64__) && ETKD_HAVE_AVX512
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
// See avx2.cpp: the pragma does not set the feature macros the vec and sleef headers test.
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
#define CPU_CAPABILITY etkd_avx512
#define CPU_CAPABILITY_AVX512
#define ETKD_ISA avx512
#define ETKD_ISA_NAME "avx512"
#define ETKD_NATIVE_BF16 0
#include <ATen/cpu/vec/vec.h>

#include "cpu/flash_tile_impl.h"
#pragma GCC pop_options
#endif
