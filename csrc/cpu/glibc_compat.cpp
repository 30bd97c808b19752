// manylinux_2_28 compatibility of the wheel (issue 25). GCC >= 11's libstdc++ headers read glibc's
// `__libc_single_threaded` (GLIBC_2.32) to skip atomic reference counting in single-threaded processes; that one
// symbol would make the extension require glibc 2.32 and the wheel manylinux_2_34, while torch's own wheels are
// manylinux_2_28. A hidden definition here, 0 ("this process may be multi-threaded"), binds those reads inside
// this library: reference counts are then always atomic, which is correct in any process (and is what an
// OpenMP extension runs anyway).
#include <features.h>  // defines __GLIBC__ (and nothing else this file needs)

#if defined(__linux__) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
extern "C" {
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
}
#endif
