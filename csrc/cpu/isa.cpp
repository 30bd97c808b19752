// Choosing the ISA target once per process, and the entry points of flash_tile.h that forward to it (isa.h).
#include "cpu/isa.h"

#include <ATen/native/CPUBlas.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

// BLAS (MKL or OpenBLAS inside libtorch_cpu), column-major Fortran interface.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count (Fortran interface; returns the previous setting, 0 = the global one); weak: absent
// when libtorch_cpu has no MKL.
extern "C" int mkl_set_num_threads_local_(const int* nt) __attribute__((weak));

namespace etkd::cpu {

BlasOneThread::BlasOneThread() {
  const int one = 1;
  prev = mkl_set_num_threads_local_ ? mkl_set_num_threads_local_(&one) : 0;
}

BlasOneThread::~BlasOneThread() {
  if (mkl_set_num_threads_local_) mkl_set_num_threads_local_(&prev);
}

#if defined(__x86_64__)
#if ETKD_HAVE_AVX2
namespace avx2 {
const Kernels& table();
}
#endif
#if ETKD_HAVE_AVX512
namespace avx512 {
const Kernels& table();
}
#endif
#if ETKD_HAVE_AVX512_BF16
namespace avx512_bf16 {
const Kernels& table();
}
#endif
#else
namespace generic {
const Kernels& table();
}
#endif

const char* const kPhaseNames[kPhases] = {"prep", "qk", "softmax", "convert", "pv", "out"};

const char* const kProdNames[kProdKinds] = {"amx", "vdpbf16ps", "mkl", "fp32"};

namespace {
std::atomic<int64_t> g_phase_ns[kPhases];
std::atomic<int64_t> g_bf16_calls[2 * kProdKinds];
}  // namespace

void count_bf16_call(bool backward, Bf16Products how) {
  g_bf16_calls[(backward ? kProdKinds : 0) + how].fetch_add(1, std::memory_order_relaxed);
}

std::vector<int64_t> bf16_calls_take() {
  std::vector<int64_t> out(2 * kProdKinds);
  for (int i = 0; i < 2 * kProdKinds; ++i) out[i] = g_bf16_calls[i].exchange(0);
  return out;
}

namespace {
std::atomic<bool> g_profiling{false};
}  // namespace

bool profiling() { return g_profiling.load(std::memory_order_relaxed); }

void set_profiling(bool on) { g_profiling.store(on, std::memory_order_relaxed); }

namespace {
// The index of the environment variable `name`'s value in `values` (unset or empty: 0, the default); any other
// value throws, naming the variable and `expected`. One parser for the ETKD_CPU_* switches read once per process.
int env_choice(const char* name, std::initializer_list<const char*> values, const char* expected) {
  const char* e = std::getenv(name);
  const std::string v = e ? e : "";
  if (v.empty()) return 0;
  int i = 0;
  for (const char* x : values) {
    if (v == x) return i;
    ++i;
  }
  throw std::runtime_error(std::string(name) + "=" + v + ": expected " + expected);
}
}  // namespace

bool own_tile_gemm() {
  static const bool own = env_choice("ETKD_CPU_GEMM", {"own", "blas"}, "`own` (the default) or `blas`") == 0;
  return own;
}

void profile_add(const int64_t* ns) {
  for (int i = 0; i < kPhases; ++i) g_phase_ns[i].fetch_add(ns[i], std::memory_order_relaxed);
}

std::vector<double> profile_take() {
  std::vector<double> out(kPhases);
  for (int i = 0; i < kPhases; ++i) out[i] = g_phase_ns[i].exchange(0) * 1e-9;
  return out;
}

bool amx_allowed() {
  static const bool on =
      env_choice("ETKD_CPU_AMX", {"1", "0"}, "1 (the default: AMX tiles where the CPU has them) or 0") == 0;
  return on;
}

bool brgemm_bf16_available() { return amx_allowed() && at::native::cpublas::could_pack(at::kBFloat16); }

void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const void* a,
                 const void* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, static_cast<const at::BFloat16*>(a),
                              static_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
}

void brgemm_done() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

namespace {

struct Target {
  const char* name;
  const Kernels& (*table)();
  bool (*cpu_has)();
};

// Built targets, narrowest first. cpu_has asks the CPU (cpuid through __builtin_cpu_supports).
const std::vector<Target>& targets() {
  static const std::vector<Target> t = {
#if defined(__x86_64__)
#if ETKD_HAVE_AVX2
      {"avx2", avx2::table,
       [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }},
#endif
#if ETKD_HAVE_AVX512
      {"avx512", avx512::table,
       [] {
         return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
       }},
#endif
#if ETKD_HAVE_AVX512_BF16
      {"avx512_bf16", avx512_bf16::table,
       [] {
         return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512bf16");
       }},
#endif
#else
      {"generic", generic::table, [] { return true; }},
#endif
  };
  return t;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? "none" : s;
}

double g_bf16_rates[2];  // the fp32 and vdpbf16ps rates the automatic choice compared (bf16_products_choice)

double bf16_choice_rate(int kind) { return g_bf16_rates[kind]; }

// The widest target `t` the CPU supports, unless it multiplies bf16 tiles by the own vdpbf16ps kernels (AVX512-BF16,
// no AMX or ETKD_CPU_AMX=0, own tile products) while converting them to fp32 tiles is faster here: on this Xeon
// (Emerald Rapids, AMX off) the vdpbf16ps products run at ~0.5x the fp32 FMA ones, on AMD Zen 4 they should win.
// ETKD_CPU_BF16=auto (the default) measures both on this thread (product_rate, a few ms) and keeps vdpbf16ps only
// when its rate beats fp32's, else takes the avx512 target (same fp32 kernels, bf16 converted on load); =vdpbf16ps
// or =fp32 forces one (ETKD_CPU_ISA=<target> forces the target and ends the choice). The table of a measured choice
// reports the compared rates as its product_rate, so `_C.product_rates()` and `etkd info` say why.
int bf16_mode() {
  static const int mode =
      env_choice("ETKD_CPU_BF16", {"auto", "vdpbf16ps", "fp32"}, "auto (the default), vdpbf16ps or fp32");
  return mode;
}

const Kernels& bf16_products_choice(const Target& t) {
  const int mode = bf16_mode();
  const Kernels& k = t.table();
  if (!k.native_bf16 || !own_tile_gemm() || brgemm_bf16_available()) return k;  // AMX, MKL or no native bf16
  const Target* fp32 = nullptr;
  for (const Target& x : targets())
    if (std::string(x.name) == "avx512" && x.cpu_has()) fp32 = &x;
  if (fp32 == nullptr || mode == 1) return k;
  if (mode == 2) return fp32->table();
  for (int kind = 0; kind < 2; ++kind) g_bf16_rates[kind] = k.product_rate(kind);
  static Kernels measured;
  measured = g_bf16_rates[1] > g_bf16_rates[0] ? k : fp32->table();
  measured.product_rate = bf16_choice_rate;
  return measured;
}

const Kernels& choose() {
  own_tile_gemm();  // a bad ETKD_CPU_GEMM (ETKD_CPU_AMX, ETKD_CPU_BF16) is an error at the first kernel use, like a
  amx_allowed();    // bad ETKD_CPU_ISA
  bf16_mode();
  const char* env = std::getenv("ETKD_CPU_ISA");
  const std::string want = env ? env : "";
  if (!want.empty() && want != "auto") {
    for (const Target& t : targets()) {
      if (want != t.name) continue;
      if (!t.cpu_has())
        throw std::runtime_error("ETKD_CPU_ISA=" + want + ": this CPU lacks " + want +
                                 " (it supports: " + join(supported_isas()) + "); unset ETKD_CPU_ISA or pick one of those");
      return t.table();
    }
    throw std::runtime_error("ETKD_CPU_ISA=" + want + ": not a target of this build (built: " + join(built_isas()) +
                             "; 'auto' picks the widest the CPU supports)");
  }
  for (auto it = targets().rbegin(); it != targets().rend(); ++it)
    if (it->cpu_has()) return bf16_products_choice(*it);
  throw std::runtime_error("etkd cpu backend: this CPU supports none of the built kernel targets (" +
                           join(built_isas()) + "); the x86-64 kernels need at least AVX2 + FMA + F16C");
}

}  // namespace

const Kernels& kernels() {
  static const Kernels& k = choose();
  return k;
}

std::vector<std::string> built_isas() {
  std::vector<std::string> v;
  for (const Target& t : targets()) v.push_back(t.name);
  return v;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> v;
  for (const Target& t : targets())
    if (t.cpu_has()) v.push_back(t.name);
  return v;
}

void append_run(std::vector<Seg>& segs, int64_t k0, int64_t k1, int src) {
  const int64_t n = k1 - k0;
  if (n <= 0) return;
  const int64_t pieces = (n + kMaxSeg - 1) / kMaxSeg;
  const int64_t len = (n + pieces - 1) / pieces;
  for (int64_t a = k0; a < k1; a += len) segs.push_back(Seg{a, std::min(len, k1 - a), src});
}

bool gemm_degenerate(int64_t m, int64_t n, int64_t k, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return true;
  if (k != 0) return false;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
  return true;
}

void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (gemm_degenerate(m, n, k, beta, c, ldc)) return;
  // A row-major matrix is its column-major transpose: C^T = op(B)^T op(A)^T.
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda), ildc = static_cast<int>(ldc);
  sgemm_(&tra, &trb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
}

int64_t landmark_attend_work(int64_t np, int64_t d) { return kLmTile * np + kLmTile * pad_small(d) + 3 * np; }

void run_forward(const Problem& p, void* out, float* lse) { kernels().run_forward(p, out, lse); }

void run_backward(const Problem& p, const void* dout, const float* lse, const float* delta, float* dq, float* dk,
                  float* dv, float* dkx, float* dvx) {
  kernels().run_backward(p, dout, lse, delta, dq, dk, dv, dkx, dvx);
}

void gemm_small(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  kernels().gemm_small(m, n, k, alpha, a, a_rs, a_ks, b, ldb, c, ldc, accumulate);
}

void landmark_attend(const float* qlT, int64_t n, int64_t np, const float* k, int64_t lk, const float* v, int64_t lv,
                     const float* bias, int64_t S, int64_t d, float scale, float* t, float* lse, float* ksum,
                     int64_t seg, float* work, float* k3, float* k3max) {
  kernels().landmark_attend(qlT, n, np, k, lk, v, lv, bias, S, d, scale, t, lse, ksum, seg, work, k3, k3max);
}

int64_t nystrom_k3_bwd_work(int64_t np) { return 2 * kLmTile * np; }

void nystrom_k3_bwd(const float* qlT, const float* lse, const float* k, int64_t lk, const float* v, int64_t lv,
                    const float* bias, int64_t S, int64_t n, int64_t np, int64_t dp, float scale, const float* dt,
                    const float* dtT, const float* dl, const float* ql, const float* dkl, int64_t seg, float* dv,
                    int64_t ldv, float* dk, int64_t ldk, float* dql, float* work, const float* k3,
                    const float* k3max) {
  kernels().nystrom_k3_bwd(qlT, lse, k, lk, v, lv, bias, S, n, np, dp, scale, dt, dtT, dl, ql, dkl, seg, dv, ldv, dk,
                           ldk, dql, work, k3, k3max);
}

void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, const float* bias) {
  kernels().softmax_rows(s, rows, n, ld, bias);
}

void rowwise_dot(const float* a, const float* b, float* delta, int64_t rows, int64_t d) {
  kernels().rowwise_dot(a, b, delta, rows, d);
}

void dropout_rows(const Dropout& dr, int64_t bh, int64_t row0, int64_t rows, int64_t col0, int64_t n, float* x,
                  int64_t ld) {
  kernels().dropout_rows(dr, bh, row0, rows, col0, n, x, ld);
}

}  // namespace etkd::cpu
