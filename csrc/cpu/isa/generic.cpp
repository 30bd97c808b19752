// The portable target for CPUs other than x86-64 (scalar at::vec, or whatever the compiler's own flags allow).
#include "cpu/isa/prelude.h"

#if !defined(__x86_64__)
#define CPU_CAPABILITY etkd_generic
#define ETKD_ISA generic
#define ETKD_ISA_NAME "generic"
#define ETKD_NATIVE_BF16 0
#define ETKD_OWN_PRODUCTS 0
#include <ATen/cpu/vec/vec.h>

#include "cpu/flash_tile_impl.h"
#endif
