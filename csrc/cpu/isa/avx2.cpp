// The AVX2 + FMA target: the baseline of every x86-64 CPU the cpu backend runs on (see isa.h).
#include "cpu/isa/prelude.h"

#if defined(__x86_64__) && ETKD_HAVE_AVX2
#define ETKD_ISA avx2
#define ETKD_ISA_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"
#define ETKD_ISA_AVX512 0
#define ETKD_NATIVE_BF16 0
#include "cpu/isa/x86_target.h"
#endif
