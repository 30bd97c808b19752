// The AVX-512 + BF16 target: avx512.cpp plus native bf16 tiles (vcvtneps2bf16, MKL bf16 GEMM; see isa.h).
#include "cpu/isa/prelude.h"

#if defined(__x86_64__) && ETKD_HAVE_AVX512_BF16
#define ETKD_ISA avx512_bf16
#define ETKD_ISA_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"
#define ETKD_ISA_AVX512 1
#define ETKD_NATIVE_BF16 1
#include "cpu/isa/x86_target.h"
#endif
