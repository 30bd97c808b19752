// The AVX-512 (F/BW/VL/DQ) target: 16-float vectors for the softmax loops and gemm_small (see isa.h).
#include "cpu/isa/prelude.h"

#if defined(__x86_64__) && ETKD_HAVE_AVX512
#define ETKD_ISA avx512
#define ETKD_ISA_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq"
#define ETKD_ISA_AVX512 1
#define ETKD_NATIVE_BF16 0
#include "cpu/isa/x86_target.h"
#endif
