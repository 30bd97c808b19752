// Nystrom attention on the CPU.
//
// nystrom_fwd: the whole forward (landmark means, K2 softmax, Newton-Schulz pseudo-inverse, K3 @ v and
// K1 @ X) in three parallel loops instead of ~40 small ATen ops. Semantics are etkd_kernels/reference/
// nystrom.py's; "hf_global" needs the max column sum of K2 over every (batch, head) before any pseudo-inverse
// starts, so the loop over (batch, head) runs in two phases, then the K1 @ X loop over query tiles. The thin
// products (K = head_dim or landmarks) go through gemm_small's register-blocked kernel, fused per tile with
// their softmax (flash_tile.h), not through BLAS sgemm on (seq x landmarks) matrices.
//
// softmax_matmul: out = softmax(scale * a @ b^T, keys masked) @ c, the exact num_landmarks == seq case
// (etkd_kernels/cpu/nystrom.py); its backward recomputes the probabilities from the saved lse.
//
// Attention dropout (etkd_kernels/reference/nystrom.py) drops entries of K1 (query row i, landmark l: column
// seq + l): in nystrom_fwd's query tiles after their softmax, in nystrom_bwd on the recomputed K1 (dX takes the
// dropped K1, dK1 the mask); softmax_matmul drops its probabilities on key columns (the exact case).
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <ctime>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

// Softmax backward over `rows` rows of `width` probabilities p (row stride ld, g the same layout): the upstream
// gradient g becomes dS = p o (g - rowsum(p o g)) in place. Used by K1's and K3's backward in nystrom_bwd.
inline void softmax_rows_bwd(const float* p, float* g, int64_t rows, int64_t width, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * ld;
    float* gr = g + r * ld;
    float dl = 0.f;
    for (int64_t j = 0; j < width; ++j) dl += pr[j] * gr[j];
    for (int64_t j = 0; j < width; ++j) gr[j] = pr[j] * (gr[j] - dl);
  }
}

struct Setup {
  Problem p;
  Tensor bias;
};

Setup setup(const Tensor& a, const Tensor& b, const Tensor& c, const OptTensor& key_mask, double scale,
            const Dropout& drop) {
  check_float(a, "a");
  check_float(b, "b");
  check_float(c, "c");
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4 && c.sizes() == b.sizes() && a.size(0) == b.size(0) &&
                  a.size(1) == b.size(1) && a.size(3) == b.size(3),
              "softmax_matmul: expected a (B, H, M, D), b and c (B, H, N, D), got ", a.sizes(), ", ", b.sizes(),
              ", ", c.sizes());
  Setup s;
  Problem& p = s.p;
  const int64_t N = b.size(2);
  p.B = a.size(0), p.H = a.size(1), p.Sq = a.size(2), p.Sk = N, p.D = a.size(3);
  p.scale = static_cast<float>(scale);
  p.q = a.data_ptr<float>(), p.k = b.data_ptr<float>(), p.v = c.data_ptr<float>();
  p.drop = drop;  // rows of a and keys of b are the op's positions (the exact num_landmarks == seq case)
  if (key_mask.has_value()) {
    s.bias = bias_from(real_mask(key_mask, p.B, N));
    p.kbias = s.bias.data_ptr<float>();
  }
  p.segments = [N](int64_t, int64_t, int64_t, int64_t, std::vector<Seg>& segs) { append_run(segs, 0, N, 0); };
  return s;
}

// The NaN/Inf check of nystrom_fwd's inputs (the op layer's _checks.check_finite, fused: Capabilities.checks_finite of
// the cpu backend's nystrom). x * 0 is 0 for a finite x and NaN for NaN and +-Inf, so one sum of them decides every
// element exactly (a sum of the values could also overflow), in per-lane partial sums the compiler vectorises without
// reordering a float reduction. rows x d floats, rows lx apart.
bool rows_finite(const float* x, int64_t lx, int64_t rows, int64_t d) {
  constexpr int64_t kLanes = 16;
  float acc[kLanes] = {};
  const int64_t dv = d / kLanes * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * lx;
    for (int64_t j = 0; j < dv; j += kLanes)
      for (int64_t u = 0; u < kLanes; ++u) acc[u] += xr[j + u] * 0.f;
    for (int64_t j = dv; j < d; ++j) acc[0] += xr[j] * 0.f;
  }
  float all = 0.f;
  for (float a : acc) all += a;
  return all == 0.f;
}

// Bits of the inputs found holding a NaN or an Inf (kBadQ: q, ...), in the order check_finite names them.
constexpr int kBadQ = 1, kBadK = 2, kBadV = 4;

// The error the op layer's check_finite raises (etkd_kernels/_checks.py: the same text, a ValueError), for the first
// of q, k, v in `bad`.
[[noreturn]] void throw_non_finite(int bad) {
  const char* name = bad & kBadQ ? "q" : bad & kBadK ? "k" : "v";
  TORCH_CHECK_VALUE(false, name, ": contains NaN or Inf; etkd ops reject non-finite inputs");
  __builtin_unreachable();
}

// Rows [r0, r1) of landmark segment l: the S rows in segments of c, the last one S - (n - 1) c rows (the one place
// the landmark means, their backward and the key landmarks' scaling take a segment's rows and count from).
struct SegmentRows {
  int64_t r0, r1;
  float count() const { return static_cast<float>(r1 - r0); }
};
SegmentRows segment_rows(int64_t l, int64_t c, int64_t S) { return {l * c, std::min(S, (l + 1) * c)}; }

// x (S, D), rows lx floats apart -> means over n segments of c rows (segment_rows): out (n, D), row stride ld >= D
// (columns D..ld are left as they are).
void segment_means(const float* x, int64_t lx, int64_t S, int64_t D, int64_t n, int64_t c, float* out, int64_t ld) {
  for (int64_t l = 0; l < n; ++l) {
    const SegmentRows seg = segment_rows(l, c, S);
    float* o = out + l * ld;
    std::fill(o, o + D, 0.f);
    for (int64_t r = seg.r0; r < seg.r1; ++r) {
      const float* xr = x + r * lx;
      for (int64_t j = 0; j < D; ++j) o[j] += xr[j];
    }
    const float cnt = seg.count();
    for (int64_t j = 0; j < D; ++j) o[j] /= cnt;
  }
}

// dst (cols x rows, row stride ldt) = src^T for src (rows x cols, row stride ld), in 16 x 16 blocks (4 x 4 SSE
// transposes inside them on x86-64, whose baseline has SSE: no per-target code needed); dst's other columns are left
// as they are.
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t ldt) {
  constexpr int64_t kb = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kb)
    for (int64_t c0 = 0; c0 < cols; c0 += kb) {
      const int64_t r1 = std::min(rows, r0 + kb), c1 = std::min(cols, c0 + kb);
#if defined(__SSE2__)
      if (r1 - r0 == kb && c1 - c0 == kb) {
        for (int64_t r = r0; r < r1; r += 4)
          for (int64_t c = c0; c < c1; c += 4) {
            __m128 a = _mm_loadu_ps(src + r * ld + c), b = _mm_loadu_ps(src + (r + 1) * ld + c),
                   e = _mm_loadu_ps(src + (r + 2) * ld + c), f = _mm_loadu_ps(src + (r + 3) * ld + c);
            _MM_TRANSPOSE4_PS(a, b, e, f);
            _mm_storeu_ps(dst + c * ldt + r, a);
            _mm_storeu_ps(dst + (c + 1) * ldt + r, b);
            _mm_storeu_ps(dst + (c + 2) * ldt + r, e);
            _mm_storeu_ps(dst + (c + 3) * ldt + r, f);
          }
        continue;
      }
#endif
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) dst[c * ldt + r] = src[r * ld + c];
    }
}

// C (m x n) = alpha * A @ B (+ C when acc) with gemm_small's arguments (A element (r, kk) at a[r * a_rs + kk * a_ks],
// B row-major, n whole vectors): the target's own kernels, or BLAS sgemm when the tile products are switched to it
// (own_tile_gemm: ETKD_CPU_GEMM=blas).
void product(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
             int64_t ldb, float* c, int64_t ldc, bool acc) {
  if (own_tile_gemm()) return gemm_small(m, n, k, alpha, a, a_rs, a_ks, b, ldb, c, ldc, acc);
  const bool ta = a_ks != 1;  // A stored transposed: k rows of stride a_ks
  gemm_rm(ta, false, m, n, k, alpha, a, ta ? a_ks : a_rs, b, ldb, acc ? 1.f : 0.f, c, ldc);
}

// The (n x n) products of the Newton-Schulz pseudo-inverse and its backward on gemm_small's own kernels: every
// matrix is n rows of np = pad_small(n) floats whose padding columns stay zero (identity terms are added on the
// first n diagonal entries only), so the padding never reaches the first n columns. BLAS sgemm's per-call cost is
// most of a 64 x 64 x 64 product, and its ISA is capped separately from ours (MKL_ENABLE_INSTRUCTIONS).
struct SquareOps {
  int64_t n, np;
  float* bt;  // n x np scratch, padding zero: the transposed right operand of mmt

  // c = alpha * op(a) @ b (+ c when acc), op(a) = a^T when ta.
  void mm(bool ta, const float* a, const float* b, float* c, float alpha, bool acc) const {
    product(n, np, n, alpha, a, ta ? 1 : np, ta ? np : 1, b, np, c, np, acc);
  }
  // c = alpha * a @ b^T (+ c when acc).
  void mmt(const float* a, const float* b, float* c, float alpha, bool acc) const {
    transpose(b, n, n, np, bt, np);
    mm(false, a, bt, c, alpha, acc);
  }
  void add_eye(float* x, float d) const {
    for (int64_t i = 0; i < n; ++i) x[i * np + i] += d;
  }
  // z0 = coeff * m^T, HF's initial inverse.
  void init(const float* m, float coeff, float* z) const {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) z[i * np + j] = coeff * m[j * np + i];
  }
  // One step's terms, HF's association: mz = m z, t1 = 7I - mz, t2 = 15I - mz t1, t3 = 13I - mz t2; the next
  // iterate is 0.25 z t3.
  void terms(const float* m, const float* z, float* mz, float* t1, float* t2, float* t3) const {
    mm(false, m, z, mz, 1.f, false);
    for (int64_t i = 0; i < n * np; ++i) t1[i] = -mz[i];
    add_eye(t1, 7.f);
    mm(false, mz, t1, t2, -1.f, false);
    add_eye(t2, 15.f);
    mm(false, mz, t2, t3, -1.f, false);
    add_eye(t3, 13.f);
  }
};

// Floats per (batch, head) of what nystrom_fwd always keeps for nystrom_bwd: T = K3 v and the landmarks ql, kl, each
// n x pad_small(D) (padding zero), and K3's log-sum-exp (pad_small(n)). What the caller asks to keep follows
// (`keep`, etkd_kernels/cpu/nystrom.py: kept): bit 0, K1 (seq x pad_small(n), before dropout); bit 1, K3 as
// landmark_attend keeps it (seq x pad_small(n) exps, then one row of pad_small(n) maxima per kLmTile keys). Each saves
// the backward a product and its softmax or exps, but costs the forward writing it and the backward reading it back
// (measured a gain on every target with both kept: kept()'s note in etkd_kernels/cpu/nystrom.py).
int64_t saved_floats(int64_t D, int64_t n) { return 3 * n * pad_small(D) + pad_small(n); }
int64_t k1_floats(int64_t S, int64_t n) { return S * pad_small(n); }
int64_t k3_floats(int64_t S, int64_t n) { return (S + (S + kLmTile - 1) / kLmTile) * pad_small(n); }

// This thread's scratch `slot` of at least `size` floats, kept from call to call (a fresh buffer of a few MiB costs
// its page faults on every call); the contents are whatever the last user left.
float* thread_scratch(int slot, int64_t size) {
  thread_local std::vector<float> bufs[3];
  std::vector<float>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < size) b.resize(size);
  return b.data();
}

// Per-phase timers of nystrom_fwd / nystrom_bwd (on with ETKD_CPU_PROFILE=1, as the tile drivers' phases: profiling()):
// each task adds its wall time per phase, summed over threads; `total` phases are the calls' wall time (one thread
// counts them), so total x threads - the sum of the other phases is the time outside the tasks (serial work,
// waiting at the ends of the parallel loops). `_C.nystrom_profile()` returns and resets them.
enum NysPhase : int {
  kFMeans, kFK2, kFK3v, kFPinv, kFK1Scores, kFK1Softmax, kFK1Out, kFTotal, kFCheck,
  kBK2, kBNsFwd, kBX, kBK1Scores, kBK1Softmax, kBDx, kBDk1, kBDs1, kBDq, kBDkl, kBDtDz, kBNsBwd, kBK3, kBCopies,
  kBSpread, kBTotal,
  // The calling thread's CPU time outside the parallel loops (setup, the max between phases: serial work), and each
  // parallel loop's CPU time per thread (parallel_tasks: thread 0, then the others summed).
  kFSerial, kBSerial, kFLoop1, kFLoop1b, kFLoop2, kFLoop2b, kFLoop3, kFLoop3b, kBLoop1, kBLoop1b, kBLoop2, kBLoop2b,
  kBLoop3, kBLoop3b, kNysPhases
};
const char* const kNysNames[kNysPhases] = {
    "fwd.means", "fwd.k2", "fwd.k3v", "fwd.pinv", "fwd.k1_scores", "fwd.k1_softmax", "fwd.k1_out", "fwd.total",
    "fwd.check",
    "bwd.k2", "bwd.ns_fwd", "bwd.x", "bwd.k1_scores", "bwd.k1_softmax", "bwd.dx", "bwd.dk1", "bwd.ds1", "bwd.dq",
    "bwd.dkl", "bwd.dt_dz", "bwd.ns_bwd", "bwd.k3_side", "bwd.copies", "bwd.spread", "bwd.total", "fwd.serial",
    "bwd.serial", "fwd.loop1.t0", "fwd.loop1.t1+", "fwd.loop2.t0", "fwd.loop2.t1+", "fwd.loop3.t0", "fwd.loop3.t1+",
    "bwd.loop1.t0", "bwd.loop1.t1+", "bwd.loop2.t0", "bwd.loop2.t1+", "bwd.loop3.t0", "bwd.loop3.t1+"};
std::atomic<int64_t> g_nys_ns[kNysPhases];

// This thread's CPU time in nanoseconds: a phase's time without the time the thread waited for a core (this machine
// is shared), so phases measured under load stay comparable.
int64_t cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// A task's laps: lap(i) charges the CPU time since the last lap to phase i (wall time for the `total` phases, which
// time whole calls); the destructor adds them to the totals.
struct Laps {
  bool on = profiling();
  bool wall = false;
  int64_t t = on ? cpu_ns() : 0;
  int64_t ns[kNysPhases] = {};
  Laps() = default;
  explicit Laps(bool wall_clock) : wall(wall_clock), t(on ? (wall ? now_ns() : cpu_ns()) : 0) {}
  void lap(int i) {
    if (!on) return;
    const int64_t x = wall ? now_ns() : cpu_ns();
    ns[i] += x - t;
    t = x;
  }
  // Restart without charging the time since the last lap (a parallel loop the serial timer leaves out).
  void skip() {
    if (on) t = wall ? now_ns() : cpu_ns();
  }
  ~Laps() {
    if (!on) return;
    for (int i = 0; i < kNysPhases; ++i)
      if (ns[i]) g_nys_ns[i].fetch_add(ns[i], std::memory_order_relaxed);
  }
};

// Run body(scratch, i) for i in [0, n) on the OpenMP threads, tasks handed out one at a time from a shared
// counter rather than in at::parallel_for's fixed equal chunks: on a shared machine a thread that loses its core
// for a while would otherwise hold up the whole phase. make_scratch() builds one thread's buffers. Profiling: each
// thread's CPU time in the loop (scratch and tasks) goes to phase `loop` (OpenMP thread 0, the caller) or loop + 1
// (the others, summed): the two differ by the time one thread worked while the other had no task left.
template <class MakeScratch, class Body>
void parallel_tasks(int loop, int64_t n, MakeScratch make_scratch, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    Laps t;
    auto scratch = make_scratch();
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(scratch, i);
    t.lap(at::get_thread_num() == 0 ? loop : loop + 1);
  });
}

}  // namespace

std::vector<std::pair<const char*, double>> nystrom_profile_take() {
  std::vector<std::pair<const char*, double>> out;
  for (int i = 0; i < kNysPhases; ++i) out.emplace_back(kNysNames[i], g_nys_ns[i].exchange(0) * 1e-9);
  return out;
}

std::tuple<Tensor, Tensor> nystrom_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_landmarks,
                                       int64_t iterations, const OptTensor& key_padding_mask, double scale,
                                       bool hf_global, double dropout_p, int64_t seed, int64_t offset, int64_t keep) {
  Laps total(true), serial;
  // q, k, v at any row strides (a model's head-split views of its projections, read in place); out in q's layout.
  check_float(q, "q", true);
  check_like(k, q, "k", true);
  check_like(v, q, "v", true);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  TORCH_CHECK(num_landmarks >= 1 && num_landmarks <= S, "num_landmarks: expected 1..", S, ", got ", num_landmarks);
  TORCH_CHECK(iterations >= 0, "pinv_iterations: expected >= 0, got ", iterations);
  const int64_t c = (S + num_landmarks - 1) / num_landmarks, n = (S + c - 1) / c;  // n non-empty segments
  const float sc = static_cast<float>(scale);
  // Dropout on K1 (query row i, landmark l: column S + l; etkd_kernels/reference/nystrom.py).
  const Dropout drop = dropout_of(dropout_p, seed, offset);
  Tensor real, kbias;
  if (key_padding_mask.has_value()) {
    real = real_mask(key_padding_mask, B, S);
    kbias = bias_from(real);
  }
  const uint8_t* rp = real.defined() ? real.data_ptr<uint8_t>() : nullptr;
  const float* bp = kbias.defined() ? kbias.data_ptr<float>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  auto out = at::empty_like(q);  // in q's layout
  float* op = out.data_ptr<float>();
  const Rows rq = row_layout(q), rk = row_layout(k), rv = row_layout(v), ro = row_layout(out);
  const int64_t BH = B * H;
  // Landmark counts padded to whole SIMD vectors for gemm_small's B operands (padding columns are zero).
  const int64_t np = pad_small(n), dp = pad_small(D);
  // What the backward reads (nystrom_bwd), per head: T = K3 @ v, ql, kl (n x dp each).
  TORCH_CHECK(keep >= 0 && keep <= 3, "keep: expected 0..3 (bit 0: K1, bit 1: K3), got ", keep);
  const bool keep_k1 = keep & 1, keep_k3 = keep & 2;
  const int64_t per0 = saved_floats(D, n), k3off = per0 + (keep_k1 ? k1_floats(S, n) : 0),
                per = k3off + (keep_k3 ? k3_floats(S, n) : 0);
  auto saved = at::empty({B, H, per}, q.options());
  float* svp = saved.data_ptr<float>();
  // Phase 1 per (b, h): landmarks ql, kl (n, D) and their packed transposes qlT, klT (D, np); T = K3 @ v (n, dp),
  // which needs no pseudo-inverse, so it runs before the global max, and gathers kl's sums as it reads k; K2 (n, np)
  // and its max column sum.
  std::vector<float> qlT(BH * D * np, 0.f), klT(BH * D * np, 0.f), k2(BH * n * np, 0.f), colmax(BH),
      xx(BH * n * dp);
  struct Scratch1 {
    std::vector<float> cs, work;
  };
  // The NaN/Inf check of q, k, v (throw_non_finite), fused into the passes phase 1 makes over them anyway: a sum over
  // rows is non-finite when one of its terms is (or when finite terms overflow), so a finite result vouches for every
  // element it summed and only a non-finite one has its rows scanned exactly (rows_finite). Every element is covered:
  // q by its segment means, k by the key landmarks' sums (every row, padded ones too: landmark_attend's
  // nystrom_segment_sums), v by T = K3 v (a zero probability times an Inf is NaN still) with K3's log-sum-exp finite
  // (a landmark without a usable key gets T = 0), and v's padded rows, which landmark_attend may skip, scanned here.
  std::atomic<int> bad{0};
  serial.lap(kFSerial);
  parallel_tasks(
      kFLoop1, BH, [&] { return Scratch1{std::vector<float>(n), std::vector<float>(landmark_attend_work(np, D))}; },
      [&](Scratch1& w, int64_t bh) {
        Laps t;
        std::vector<float>& cs = w.cs;
        const int64_t b = bh / H;
        float *qlh = svp + bh * per + n * dp, *klh = qlh + n * dp, *m = k2.data() + bh * n * np;
        float *qlt = qlT.data() + bh * D * np, *klt = klT.data() + bh * D * np;
        std::fill(qlh, qlh + 2 * n * dp, 0.f);
        const float *xq = qp + rq.at(b, bh % H, 0), *xk = kp + rk.at(b, bh % H, 0), *xv = vp + rv.at(b, bh % H, 0);
        segment_means(xq, rq.s, S, D, n, c, qlh, dp);
        if (!rows_finite(qlh, dp, n, D) && !rows_finite(xq, rq.s, S, D)) bad.fetch_or(kBadQ);
        transpose(qlh, n, D, dp, qlt, np);
        t.lap(kFMeans);
        // T = K3 v and K3's log-sum-exp; the key landmarks' sums from the same pass over k.
        float *tt = svp + bh * per, *lse = tt + 3 * n * dp;
        landmark_attend(qlt, n, np, xk, rk.s, xv, rv.s, bp ? bp + b * S : nullptr, S, D, sc, tt, lse, klh, c,
                        w.work.data(), keep_k3 ? svp + bh * per + k3off : nullptr,
                        keep_k3 ? svp + bh * per + k3off + S * np : nullptr);
        t.lap(kFK3v);
        if (!rows_finite(klh, dp, n, D) && !rows_finite(xk, rk.s, S, D)) bad.fetch_or(kBadK);
        if (!(rows_finite(tt, dp, n, D) && rows_finite(lse, n, 1, n))) {
          if (!rows_finite(xv, rv.s, S, D)) bad.fetch_or(kBadV);
        } else if (bp) {
          const float* bh_bias = bp + b * S;
          for (int64_t r0 = 0, r1; r0 < S; r0 = r1) {  // runs of padded keys
            for (r1 = r0 + 1; r1 < S && (bh_bias[r1] != 0.f) == (bh_bias[r0] != 0.f);) ++r1;
            if (bh_bias[r0] != 0.f && !rows_finite(xv + r0 * rv.s, rv.s, r1 - r0, D)) bad.fetch_or(kBadV);
          }
        }
        t.lap(kFCheck);
        for (int64_t l = 0; l < n; ++l) {
          const float cnt = segment_rows(l, c, S).count();
          for (int64_t j = 0; j < D; ++j) klh[l * dp + j] /= cnt;
        }
        transpose(klh, n, D, dp, klt, np);
        product(n, np, D, sc, qlh, dp, 1, klt, np, m, np, false);
        softmax_rows(m, n, n, np, nullptr);
        std::fill(cs.begin(), cs.end(), 0.f);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) cs[j] += m[i * np + j];
        colmax[bh] = *std::max_element(cs.begin(), cs.end());
        t.lap(kFK2);
      });
  serial.skip();
  if (const int x = bad.load()) throw_non_finite(x);
  const float gmax = BH ? *std::max_element(colmax.begin(), colmax.end()) : 1.f;
  // Phase 2 per (b, h): Z = pinv(K2), X = Z @ T (n, dp).
  serial.lap(kFSerial);
  parallel_tasks(
      kFLoop2, BH, [&] { return std::vector<float>(7 * n * np, 0.f); },
      [&](std::vector<float>& w, int64_t bh) {
        Laps t;
        float *z = w.data(), *zn = z + n * np, *mz = zn + n * np, *t1 = mz + n * np, *t2 = t1 + n * np,
              *t3 = t2 + n * np;
        const SquareOps sq{n, np, t3 + n * np};
        const float* m = k2.data() + bh * n * np;
        sq.init(m, 1.f / (hf_global ? gmax : colmax[bh]), z);
        for (int64_t it = 0; it < iterations; ++it) {
          sq.terms(m, z, mz, t1, t2, t3);
          sq.mm(false, z, t3, zn, 0.25f, false);
          std::swap(z, zn);  // pointers into w
        }
        product(n, dp, n, 1.f, z, np, 1, svp + bh * per, dp, xx.data() + bh * n * dp, dp, false);
        t.lap(kFPinv);
      });
  // Phase 3 per (b, h, query tile of bq rows): out = K1 @ X, the tile's (bq, n) scores and probabilities, klT
  // and X all in L1/L2. Tiles rather than heads as tasks: K1 is most of the work and balances over threads. With
  // keep_k1 the tile's K1 is computed in `saved` (before dropout, which then goes to a copy in the scratch).
  constexpr int64_t bq = 48;
  const int64_t tiles = (S + bq - 1) / bq;
  serial.skip();
  parallel_tasks(
      kFLoop3, BH * tiles, [&] { return std::vector<float>(bq * np + (D == dp ? 0 : bq * dp)); },
      [&](std::vector<float>& w, int64_t task) {
        Laps t;
        float *s1 = w.data(), *ot = s1 + bq * np;
        const int64_t bh = task / tiles, b = bh / H, i0 = task % tiles * bq, rows = std::min(bq, S - i0);
        float* k1 = keep_k1 ? svp + bh * per + per0 + i0 * np : s1;
        gemm_small(rows, np, D, sc, qp + rq.at(b, bh % H, i0), rq.s, 1, klT.data() + bh * D * np, np, k1, np, false);
        t.lap(kFK1Scores);
        softmax_rows(k1, rows, n, np, nullptr);
        if (drop.on) {
          if (keep_k1) std::copy(k1, k1 + rows * np, s1);
          dropout_rows(drop, bh, i0, rows, S, n, s1, np);
        } else {
          s1 = k1;
        }
        t.lap(kFK1Softmax);
        float* o = op + ro.at(b, bh % H, i0);
        if (D == dp) {
          gemm_small(rows, dp, n, 1.f, s1, np, 1, xx.data() + bh * n * dp, dp, o, ro.s, false);
        } else {
          gemm_small(rows, dp, n, 1.f, s1, np, 1, xx.data() + bh * n * dp, dp, ot, dp, false);
          for (int64_t r = 0; r < rows; ++r) std::copy(ot + r * dp, ot + r * dp + D, o + r * ro.s);
        }
        if (rp) {
          for (int64_t r = 0; r < rows; ++r)
            if (!rp[b * S + i0 + r]) std::fill(o + r * ro.s, o + r * ro.s + D, 0.f);
        }
        t.lap(kFK1Out);
      });
  total.lap(kFTotal);
  return {out, saved};
}

// nystrom_bwd: hand-written backward of the whole composition, recomputing the forward per (batch, head) on the
// target's own gemm_small kernels (no BLAS call: its ISA is capped separately, and its per-call cost is large next
// to these thin products):
//   out = K1 X, X = Z T, T = K3 v, Z = NS(K2) (Newton-Schulz from Z0 = K2^T / max column sum).
// Phase 1 per head: landmarks, K2 and its max column sum (hf_global needs the max over every head first).
// Phase 2 per head: Z (iterates kept, n x n each); X = Z T; then query tiles of kBwdRows rows, everything of a
// tile in L1/L2: K1's scores and probabilities, dX += K1^T dO, dK1 = dO X^T, K1's softmax backward, dq (through K1)
// and dkl += dS1^T q; dT, dZ; the Newton-Schulz backward -> dK2 (all but hf_global's max-column-sum term) and
// d(coefficient); K2's softmax backward -> dql, dkl; K3's backward in key tiles (nystrom_k3_bwd: K3 from the
// forward's log-sum-exp, key-major like k and v, so nothing is transposed) -> dv, dk (through K3, plus dkl spread over
// the key segments as the tiles are written), dql, with rowsum(K3 o dK3) = dT . T per landmark; dq += dql spread over
// the query segments. Phase 3 (hf_global only), in the heads holding the global max: its term of dK2 through K2's
// softmax backward, spread over the segments. Padded query rows of grad_out are read as zero (their output is
// zero). Head dims that are not whole vectors run on zero-padded copies of the head's rows.
constexpr int64_t kBwdRows = 64;

std::vector<Tensor> nystrom_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& saved, int64_t num_landmarks, int64_t iterations,
                                const OptTensor& key_padding_mask, double scale, bool hf_global, double dropout_p,
                                int64_t seed, int64_t offset) {
  Laps total(true), serial;
  // q, k, v at any row strides, read in place; dq, dk, dv written in their layouts.
  check_float(q, "q", true);
  check_like(k, q, "k", true);
  check_like(v, q, "v", true);
  // grad_out at any strides (the expanded gradient of a sum, a model's head-split view): its rows are read in place
  // or gathered per query tile, never copied whole.
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == at::kFloat && grad_out.sizes() == q.sizes(),
              "grad_out: expected a float32 CPU tensor of shape ", q.sizes(), ", got ", grad_out.scalar_type(), " ",
              grad_out.sizes(), " on ", grad_out.device());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), BH = B * H;
  TORCH_CHECK(num_landmarks >= 1 && num_landmarks <= S, "num_landmarks: expected 1..", S, ", got ", num_landmarks);
  TORCH_CHECK(iterations >= 0, "pinv_iterations: expected >= 0, got ", iterations);
  const int64_t c = (S + num_landmarks - 1) / num_landmarks, n = (S + c - 1) / c;
  // Padded widths: landmarks np, head dim dp (gemm_small's B and C columns), keys ls (K3's rows; one vector more
  // than the padded length so rows 4 KiB apart do not share L1 sets when read down a column).
  const int64_t np = pad_small(n), dp = pad_small(D);
  check_float(saved, "saved");
  // saved: with or without K1 and K3 (nystrom_fwd's keep), told apart by its size.
  const int64_t per0 = saved_floats(D, n), k1n = k1_floats(S, n), k3n = k3_floats(S, n);
  const int64_t per = saved.dim() == 3 ? saved.size(2) : -1;
  int64_t kept = -1;
  for (int64_t x = 0; x < 4; ++x)
    if (per == per0 + (x & 1 ? k1n : 0) + (x & 2 ? k3n : 0)) kept = x;
  TORCH_CHECK(kept >= 0 && saved.size(0) == B && saved.size(1) == H && saved.is_contiguous(),
              "saved: expected nystrom_fwd's contiguous (", B, ", ", H, ", ", per0, " + ", k1n, " with K1 + ", k3n,
              " with K3), got ", saved.sizes());
  const bool kept_k1 = kept & 1, kept_k3 = kept & 2;
  const int64_t k3off = per0 + (kept_k1 ? k1n : 0);
  const float* svp = saved.data_ptr<float>();
  const int64_t nn = n * np, nd = n * dp;
  const bool padded_d = D != dp;
  const int64_t ld = dp;  // row stride of the per-tile grad_out rows and of the padded copies (D == dp otherwise)
  const float sc = static_cast<float>(scale);
  const Dropout drop = dropout_of(dropout_p, seed, offset);  // on K1, as in nystrom_fwd
  Tensor kbias;
  if (key_padding_mask.has_value()) kbias = bias_from(real_mask(key_padding_mask, B, S));
  const float* bp = kbias.defined() ? kbias.data_ptr<float>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* dop = grad_out.data_ptr<float>();
  const int64_t gs0 = grad_out.stride(0), gs1 = grad_out.stride(1), gs2 = grad_out.stride(2), gs3 = grad_out.stride(3);
  const bool go_rows = gs3 == 1 || D <= 1;  // rows of D contiguous floats, gs2 apart
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);  // in q's, k's, v's layouts
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const Rows rq = row_layout(q), rk = row_layout(k), rv = row_layout(v), rdq = row_layout(dq), rdk = row_layout(dk),
             rdv = row_layout(dv);
  // Per head: klT (D x np), K2 and dK2 (n x np), dql, dkl (n x dp); the landmarks ql, kl are the forward's.
  std::vector<float> klT(BH * D * np, 0.f), k2(BH * nn, 0.f), dk2(BH * nn, 0.f), colmax(BH), dcoeff(BH);
  auto qlp = [&](int64_t bh) { return svp + bh * per + nd; };
  auto klp = [&](int64_t bh) { return svp + bh * per + 2 * nd; };
  auto lsep = [&](int64_t bh) { return svp + bh * per + 3 * nd; };

  // Phase 1.
  serial.lap(kBSerial);
  parallel_tasks(
      kBLoop1, BH, [&] { return 0; },
      [&](int, int64_t bh) {
        Laps t;
        const float *qlh = qlp(bh), *klh = klp(bh);
        float *m = k2.data() + bh * nn, *klt = klT.data() + bh * D * np;
        transpose(klh, n, D, dp, klt, np);
        product(n, np, D, sc, qlh, dp, 1, klt, np, m, np, false);
        softmax_rows(m, n, n, np, nullptr);
        float mx = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          float cs = 0.f;
          for (int64_t i = 0; i < n; ++i) cs += m[i * np + j];
          mx = std::max(mx, cs);
        }
        colmax[bh] = mx;
        t.lap(kBK2);
      });
  serial.skip();
  const float gmax = BH ? *std::max_element(colmax.begin(), colmax.end()) : 1.f;
  // dK2 (dm) += the max column sum's term: d(loss)/d(max) = dmx, split evenly over the tied columns of head bh's K2 (m)
  // and over `ties` heads holding the same max (hf_global; 1 for per_head), as torch's max does; cs: n floats.
  auto add_max_term = [&](int64_t bh, const float* m, float dmx, int64_t ties, float* dm, float* cs) {
    const float mx = hf_global ? gmax : colmax[bh];
    std::fill(cs, cs + n, 0.f);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) cs[j] += m[i * np + j];
    int64_t here = 0;
    for (int64_t j = 0; j < n; ++j) here += cs[j] == mx ? 1 : 0;
    if (here == 0) return;
    // hf_global: ties across heads are counted per head (exact ties between heads do not occur in practice).
    const float share = dmx / static_cast<float>(here * ties);
    for (int64_t j = 0; j < n; ++j)
      if (cs[j] == mx)
        for (int64_t i = 0; i < n; ++i) dm[i * np + j] += share;
  };
  // Landmark means' backward: each of the S rows of x (row stride lx) in segment l gets lm's row l / count(l).
  auto spread = [&](float* x, int64_t lx, const float* lm) {
    for (int64_t l = 0; l < n; ++l) {
      const SegmentRows seg = segment_rows(l, c, S);
      const float inv = 1.f / seg.count();
      for (int64_t r = seg.r0; r < seg.r1; ++r) {
        float* g = x + r * lx;
        for (int64_t j = 0; j < D; ++j) g[j] += inv * lm[l * dp + j];
      }
    }
  };

  // Phase 2. Scratch per thread (thread_scratch): nystrom_k3_bwd's key tiles; the query tiles (K1, its gradient, K1
  // with dropout, grad_out rows with padded rows zeroed); the small matrices; with D not a whole vector, the head's
  // q, k, v, grad_out rows and then dq, dk, dv rows, padded to dp columns.
  const int64_t its = iterations;
  const int64_t big_n = nystrom_k3_bwd_work(np), tile_n = 3 * kBwdRows * np + kBwdRows * ld + kBwdRows,
                small_n = (its + 1 + 11) * nn + 5 * nd + 2 * D * np + 2 * dp * np + np,
                rows_n = padded_d ? 7 * S * dp : 0;
  serial.lap(kBSerial);
  parallel_tasks(
      kBLoop2, BH,
      [&] {
        return std::array<float*, 3>{thread_scratch(0, big_n), thread_scratch(1, tile_n + small_n),
                                     thread_scratch(2, rows_n)};
      },
      [&](std::array<float*, 3>& w, int64_t bh) {
        Laps t;
        const int64_t b = bh / H, h = bh % H;
        const float *xq = qp + rq.at(b, h, 0), *xk = kp + rk.at(b, h, 0), *xv = vp + rv.at(b, h, 0);
        float *xdq = dqp + rdq.at(b, h, 0), *xdk = dkp + rdk.at(b, h, 0), *xdv = dvp + rdv.at(b, h, 0);
        // Row strides of the rows the products read and write: the tensors' own, or dp in the padded copies.
        int64_t lq = rq.s, lk = rk.s, lv = rv.s, ldq = rdq.s, ldk = rdk.s, ldv = rdv.s;
        // grad_out's rows of this head: in place (row stride ldo) when go_rows and D is whole vectors, else through
        // grad_row, which copies row r's D floats to dst.
        const float* xdo = dop + b * gs0 + (bh % H) * gs1;
        int64_t ldo = gs2;
        auto grad_row = [&](int64_t r, float* dst) {
          const float* src = xdo + r * gs2;
          if (go_rows)
            std::copy(src, src + D, dst);
          else if (gs3 == 0)  // one value per row (e.g. the expanded gradient of out.sum())
            std::fill(dst, dst + D, *src);
          else
            for (int64_t j = 0; j < D; ++j) dst[j] = src[j * gs3];
        };
        if (padded_d) {
          float* r = w[2];
          std::fill(r, r + rows_n, 0.f);
          const float* src[3] = {xq, xk, xv};
          const int64_t ls[3] = {lq, lk, lv};
          for (int i = 0; i < 3; ++i)
            for (int64_t j = 0; j < S; ++j) std::copy(src[i] + j * ls[i], src[i] + j * ls[i] + D, r + (i * S + j) * dp);
          for (int64_t j = 0; j < S; ++j) grad_row(j, r + (3 * S + j) * dp);
          xq = r, xk = r + S * dp, xv = r + 2 * S * dp, xdo = r + 3 * S * dp, ldo = dp;
          xdq = r + 4 * S * dp, xdk = r + 5 * S * dp, xdv = r + 6 * S * dp;
          lq = lk = lv = ldq = ldk = ldv = dp;
          t.lap(kBCopies);
        }
        const float *qlh = qlp(bh), *klh = klp(bh), *m = k2.data() + bh * nn;
        const float* klt = klT.data() + bh * D * np;
        float *s1 = w[1], *g1 = s1 + kBwdRows * np, *k1d = g1 + kBwdRows * np, *dob = k1d + kBwdRows * np;
        float* dl1 = dob + kBwdRows * ld;  // the tile's rowsum(K1 o dK1)
        float* zs = dl1 + kBwdRows;  // iterates z_0 .. z_its
        std::fill(zs, zs + small_n, 0.f);
        float *mz = zs + (its + 1) * nn, *t1 = mz + nn, *t2 = t1 + nn, *t3 = t2 + nn, *dz = t3 + nn, *dzn = dz + nn,
              *dt = dzn + nn, *dt2 = dt + nn, *dmz = dt2 + nn, *bt = dmz + nn, *dts = bt + nn;
        const float* tt = svp + bh * per;  // T = K3 v, as the forward computed it
        float *xx = dts + nn, *dx = xx + nd, *dtt = dx + nd, *dqlh = dtt + nd, *dklh = dqlh + nd;
        float *xxT = dklh + nd, *ttT = xxT + D * np, *qlT = ttT + D * np, *dtT = qlT + dp * np, *dl3 = dtT + dp * np;
        float* dm = dk2.data() + bh * nn;
        const SquareOps sq{n, np, bt};
        // Z: Newton-Schulz, every iterate kept.
        const float coeff = 1.f / (hf_global ? gmax : colmax[bh]);
        sq.init(m, coeff, zs);
        for (int64_t it = 0; it < its; ++it) {
          const float* z = zs + it * nn;
          sq.terms(m, z, mz, t1, t2, t3);
          sq.mm(false, z, t3, zs + (it + 1) * nn, 0.25f, false);
        }
        const float* zf = zs + its * nn;
        t.lap(kBNsFwd);
        // X = Z T, and X^T, T^T packed (D x np) as B operands.
        product(n, dp, n, 1.f, zf, np, 1, tt, dp, xx, dp, false);
        transpose(xx, n, D, dp, xxT, np);
        transpose(tt, n, D, dp, ttT, np);
        // Query tiles: K1 = softmax(s q kl^T); dX += K1^T dO; dK1 = dO X^T; dS1 = K1 o (dK1 - rowsum(K1 o dK1));
        // dq = s dS1 kl; dkl += s dS1^T q. With dropout (mask M on K1, scale r): dX takes K1 o M r and
        // dK1 = (dO X^T) o M r.
        std::fill(dx, dx + nd, 0.f);
        std::fill(dklh, dklh + nd, 0.f);
        t.lap(kBX);
        for (int64_t i0 = 0; i0 < S; i0 += kBwdRows) {
          const int64_t rows = std::min(kBwdRows, S - i0);
          const float* qt = xq + i0 * lq;
          const float* dot = xdo + i0 * ldo;
          int64_t ldt = ldo;  // dot's row stride
          // Padded query rows: their output is zero, so no gradient flows from grad_out there; rows that are not
          // whole contiguous vectors in place (and not the padded copy): gathered.
          const float* bq = bp ? bp + b * S + i0 : nullptr;
          const bool zero = bq && std::any_of(bq, bq + rows, [](float x) { return x != 0.f; });
          if (zero || (!padded_d && !go_rows)) {
            for (int64_t r = 0; r < rows; ++r) {
              if (bq && bq[r] != 0.f)
                std::fill(dob + r * ld, dob + (r + 1) * ld, 0.f);
              else if (padded_d)
                std::copy(dot + r * ldo, dot + r * ldo + ld, dob + r * ld);
              else
                grad_row(i0 + r, dob + r * ld);
            }
            dot = dob, ldt = ld;
          }
          const float* k1 = s1;  // this tile's K1 (rows x np, padding columns zero)
          if (kept_k1) {
            k1 = svp + bh * per + per0 + i0 * np;  // the forward's
          } else {
            product(rows, np, D, sc, qt, lq, 1, klt, np, s1, np, false);
            t.lap(kBK1Scores);
            softmax_rows(s1, rows, n, np, nullptr);
          }
          const float* k1x = k1;
          if (drop.on) {
            std::copy(k1, k1 + rows * np, k1d);
            dropout_rows(drop, bh, i0, rows, S, n, k1d, np);
            k1x = k1d;
          }
          t.lap(kBK1Softmax);
          product(n, dp, rows, 1.f, k1x, 1, np, dot, ldt, dx, dp, true);
          t.lap(kBDx);
          product(rows, np, D, 1.f, dot, ldt, 1, xxT, np, g1, np, false);
          if (drop.on) dropout_rows(drop, bh, i0, rows, S, n, g1, np);
          t.lap(kBDk1);
          // dS1 = K1 o (dK1 - rowsum(K1 o dK1)), the row sums by the target's SIMD dot over np columns (K1's
          // padding columns are zero)
          rowwise_dot(k1, g1, dl1, rows, np);
          for (int64_t r = 0; r < rows; ++r) {
            const float *pr = k1 + r * np, d = dl1[r];
            float* gr = g1 + r * np;
            for (int64_t j = 0; j < n; ++j) gr[j] = pr[j] * (gr[j] - d);
          }
          t.lap(kBDs1);
          product(rows, dp, n, sc, g1, np, 1, klh, dp, xdq + i0 * ldq, ldq, false);
          t.lap(kBDq);
          product(n, dp, rows, sc, g1, 1, np, qt, lq, dklh, dp, true);
          t.lap(kBDkl);
        }
        // dT = Z^T dX; dZ = dX T^T.
        product(n, dp, n, 1.f, zf, 1, np, dx, dp, dtt, dp, false);
        product(n, np, D, 1.f, dx, dp, 1, ttT, np, dz, np, false);
        t.lap(kBDtDz);
        // Newton-Schulz backward, last iteration first: z' = 0.25 z t3.
        std::fill(dm, dm + nn, 0.f);
        for (int64_t it = its - 1; it >= 0; --it) {
          const float* z = zs + it * nn;
          sq.terms(m, z, mz, t1, t2, t3);
          sq.mmt(dz, t3, dzn, 0.25f, false);   // dz_in = 0.25 dz t3^T
          sq.mm(true, z, dz, dt, 0.25f, false);  // dt3 = 0.25 z^T dz
          sq.mmt(dt, t2, dmz, -1.f, false);    // dmz = -dt3 t2^T
          sq.mm(true, mz, dt, dt2, -1.f, false);  // dt2 = -mz^T dt3
          sq.mmt(dt2, t1, dmz, -1.f, true);    // dmz -= dt2 t1^T
          sq.mm(true, mz, dt2, dts, -1.f, false);  // dt1 = -mz^T dt2
          for (int64_t i = 0; i < nn; ++i) dmz[i] -= dts[i];  // dmz -= dt1
          sq.mmt(dmz, z, dm, 1.f, true);        // dm += dmz z^T
          sq.mm(true, m, dmz, dzn, 1.f, true);   // dz_in += m^T dmz
          std::swap(dz, dzn);
        }
        float dc = 0.f;  // z0 = coeff m^T
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j)
            dm[j * np + i] += coeff * dz[i * np + j], dc += dz[i * np + j] * m[j * np + i];
        dcoeff[bh] = dc;
        // dK2's max-column-sum term where this head alone decides it (per_head; hf_global's waits for every head:
        // phase 3), K2's softmax backward: dS2 = K2 (dK2 - rowsum(K2 dK2)); dql = s dS2 kl; dkl += s dS2^T ql.
        if (!hf_global) add_max_term(bh, m, -dc / (colmax[bh] * colmax[bh]), 1, dm, dts);
        std::copy(dm, dm + nn, dts);
        softmax_rows_bwd(m, dts, n, n, np);
        product(n, dp, n, sc, dts, np, 1, klh, dp, dqlh, dp, false);
        product(n, dp, n, sc, dts, 1, np, qlh, dp, dklh, dp, true);
        t.lap(kBNsBwd);
        // K3 backward in key tiles (nystrom_k3_bwd), K3 recomputed from the forward's lse: dv = K3^T dT;
        // dK3 = dT v^T; dS3 = K3 o (dK3 - rowsum(K3 o dK3)), the row sum being dT . T (= sum_j K3[l, j] dT[l] . v[j]);
        // dql += s dS3 k; dk = s dS3^T ql + dkl spread over the key segments (dkl is whole by now, but for
        // hf_global's max term). The landmark side packed (dp x np, padding zero) as B operands.
        transpose(qlh, n, dp, dp, qlT, np);
        transpose(dtt, n, dp, dp, dtT, np);
        rowwise_dot(dtt, tt, dl3, n, dp);
        for (int64_t l = 0; l < n; ++l) {  // dkl / segment size, into xx (free after the query tiles)
          const float inv = 1.f / segment_rows(l, c, S).count();
          for (int64_t j = 0; j < dp; ++j) xx[l * dp + j] = inv * dklh[l * dp + j];
        }
        nystrom_k3_bwd(qlT, lsep(bh), xk, lk, xv, lv, bp ? bp + b * S : nullptr, S, n, np, dp, sc, dtt, dtT, dl3, qlh,
                       xx, c, xdv, ldv, xdk, ldk, dqlh, w[0], kept_k3 ? svp + bh * per + k3off : nullptr,
                       kept_k3 ? svp + bh * per + k3off + S * np : nullptr);
        t.lap(kBK3);
        spread(xdq, ldq, dqlh);  // dq += dql spread over the query segments
        t.lap(kBSpread);
        if (padded_d) {
          const float* src[3] = {xdq, xdk, xdv};
          float* dst[3] = {dqp + rdq.at(b, h, 0), dkp + rdk.at(b, h, 0), dvp + rdv.at(b, h, 0)};
          const int64_t ls[3] = {rdq.s, rdk.s, rdv.s};
          for (int i = 0; i < 3; ++i)
            for (int64_t j = 0; j < S; ++j) std::copy(src[i] + j * dp, src[i] + j * dp + D, dst[i] + j * ls[i]);
          t.lap(kBCopies);
        }
      });

  // Phase 3, hf_global: d(coefficient) summed over every head -> d(max column sum) -> its term of dK2 in the heads
  // holding the max, through K2's softmax backward to their dql, dkl, spread over the segments (linear in dK2, so
  // added to what phase 2 spread). per_head did it in phase 2.
  serial.skip();
  if (hf_global) {
    float dgmax = 0.f;
    for (int64_t bh = 0; bh < BH; ++bh) dgmax += dcoeff[bh];
    int64_t ties = 0;
    for (int64_t o = 0; o < BH; ++o) ties += colmax[o] == gmax ? 1 : 0;  // heads holding the max
    serial.lap(kBSerial);
    parallel_tasks(
        kBLoop3, BH, [&] { return std::vector<float>(2 * nn + 2 * nd, 0.f); },
        [&](std::vector<float>& w, int64_t bh) {
          if (colmax[bh] != gmax) return;
          Laps t;
          const float* m = k2.data() + bh * nn;
          float *dm = w.data(), *cs = dm + nn, *dqx = cs + nn, *dkx = dqx + nd;
          std::fill(dm, dm + nn, 0.f);
          add_max_term(bh, m, -dgmax / (gmax * gmax), ties, dm, cs);
          softmax_rows_bwd(m, dm, n, n, np);
          product(n, dp, n, sc, dm, np, 1, klp(bh), dp, dqx, dp, false);
          product(n, dp, n, sc, dm, 1, np, qlp(bh), dp, dkx, dp, false);
          spread(dqp + rdq.at(bh / H, bh % H, 0), rdq.s, dqx);
          spread(dkp + rdk.at(bh / H, bh % H, 0), rdk.s, dkx);
          t.lap(kBSpread);
        });
    serial.skip();
  }
  total.lap(kBTotal);
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> softmax_matmul_fwd(const Tensor& a, const Tensor& b, const Tensor& c,
                                              const OptTensor& key_mask, double scale, double dropout_p, int64_t seed,
                                              int64_t offset) {
  Setup s = setup(a, b, c, key_mask, scale, dropout_of(dropout_p, seed, offset));
  auto out = at::empty({a.size(0), a.size(1), a.size(2), a.size(3)}, a.options());
  auto lse = at::empty({a.size(0), a.size(1), a.size(2)}, a.options());
  run_forward(s.p, out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}

std::vector<Tensor> softmax_matmul_bwd(const Tensor& grad_out, const Tensor& a, const Tensor& b, const Tensor& c,
                                       const Tensor& out, const Tensor& lse, const OptTensor& key_mask, double scale,
                                       double dropout_p, int64_t seed, int64_t offset) {
  Setup s = setup(a, b, c, key_mask, scale, dropout_of(dropout_p, seed, offset));
  check_like(grad_out, a, "grad_out");
  check_like(out, a, "out");
  check_float(lse, "lse");
  auto delta = at::empty_like(lse);
  rowwise_dot(grad_out.data_ptr<float>(), out.data_ptr<float>(), delta.data_ptr<float>(), lse.numel(), a.size(3));
  auto da = at::zeros_like(a), db = at::zeros_like(b), dc = at::zeros_like(c);
  run_backward(s.p, grad_out.data_ptr<float>(), lse.data_ptr<float>(), delta.data_ptr<float>(), da.data_ptr<float>(),
               db.data_ptr<float>(), dc.data_ptr<float>(), nullptr, nullptr);
  return {da, db, dc};
}

}  // namespace etkd::cpu
