// The AVX2 + FMA target: the baseline of every x86-64 CPU the cpu backend runs on (see isa.h).
#include "cpu/isa/prelude.h"

#if defined(__x86_64__) && ETKD_HAVE_AVX2
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ lexes the whole file before it sees the pragma, so the feature macros the vec and sleef headers test are
// not set by it: set them for the rest of this file.
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
#define CPU_CAPABILITY etkd_avx2
#define CPU_CAPABILITY_AVX2
#define ETKD_ISA avx2
#define ETKD_ISA_NAME "avx2"
#define ETKD_NATIVE_BF16 0
#include <ATen/cpu/vec/vec.h>

#include "cpu/flash_tile_impl.h"
#pragma GCC pop_options
#endif
