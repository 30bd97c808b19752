// Fused softmax-attention tiles for the CPU backend, shared by every pattern (sliding window, block
// sparse, the Nystrom softmax products).
//
// A pattern is described to the driver as: for each (batch, head, query tile), a list of key segments
// (contiguous key runs of one key source), an optional band |i - j| <= w on the main source, per-key
// additive biases (0 = usable, -inf = masked: padding, keys counted elsewhere), and per-query skip flags
// (rows whose output is produced elsewhere or is zero). The driver runs FlashAttention-2 style loops:
// forward = online softmax over the segments (scores live only in a bq x seg tile), backward = recompute
// P from the saved lse. Tile products in fp32 (fp32 inputs, and fp16/bf16 converted on load), forward and
// backward, are the target's own register-blocked micro-kernels on K^T (and V^T) packed once per (batch, head)
// task, so each ISA target runs its own vector width end to end (own_tile_gemm; BLAS sgemm with
// ETKD_CPU_GEMM=blas, for head dims that are not whole vectors, and on the portable target);
// native bf16 tiles go through oneDNN's brgemm (AMX) or the own vdpbf16ps kernels on K/V packed once per task,
// forward and backward, MKL's bf16 GEMM otherwise. The element-wise softmax work is at::vec. The SIMD code is
// compiled per ISA and chosen at run time: isa.h.
//
// No torch headers here: plain pointers, so the kernel translation units stay cheap to compile.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace etkd::cpu {

// Keys [k0, k0 + n) of key source `src` (0 = main, 1 = extra, e.g. gathered global tokens).
struct Seg {
  int64_t k0;
  int64_t n;
  int src;
};

// Longest segment the tile loops take at once; callers split longer runs with `append_run`.
constexpr int64_t kMaxSeg = 640;

// Append keys [k0, k1) of `src` to `segs`, split into near-equal pieces of at most kMaxSeg keys.
void append_run(std::vector<Seg>& segs, int64_t k0, int64_t k1, int src);

// Attention dropout on P (the contract of etkd_kernels/_shared.py, bit for bit): the keep bit of (b, h, query row
// i, key column j) is Philox4x32-10 with key (key0, key1), counter (j >> 3, i, b * H + h, offset), 16 bits per
// column (word (j & 7) >> 1, half j & 1), kept iff >= thr. Rows and columns are the op's positions: query row r of
// the problem is qrow[b * Sq + r] (or r), main-source key j is column j, extra-source key x is column
// xcol[b * Sx + x] (or xcol0 + x). Kept probabilities are scaled by `scale` = float(1 / (1 - p)).
struct Dropout {
  bool on = false;
  uint32_t thr = 0, key0 = 0, key1 = 0, offset = 0;
  float scale = 1.f;
  const int64_t* qrow = nullptr;
  const int64_t* xcol = nullptr;
  int64_t xcol0 = 0;
};

// Element type of q, k, v, kx, vx, out and dout.
enum class Elem : uint8_t { f32, bf16, f16 };

// Where the rows of a (B, H, rows, D) tensor of the main source live: row r of (b, h) starts at element
// b * b_ + h * h_ + r * s (its D elements contiguous), e.g. the (b, s, h, d) head-split view of a projection
// (b_ = s * h * d, h_ = d, s = h * d), sliced heads, an expanded batch (b_ = 0). Unset: contiguous, {H * rows * D,
// rows * D, D}. The tile loops read and write rows D apart; other layouts go through per-task (K, V, dK, dV) and
// per-tile (Q, out, dO, dQ) copies in the worker that uses them, instead of a whole-tensor copy before the call.
struct Rows {
  int64_t b = 0, h = 0, s = 0;
  bool set = false;
  int64_t at(int64_t bi, int64_t hi, int64_t r) const { return bi * b + hi * h + r * s; }
};

struct Problem {
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  float scale = 1.f;
  int64_t bq = 64;  // query rows per tile
  // 16-bit tiles are converted to float32 on load into per-tile scratch, or multiplied as bf16 where the chosen
  // ISA target does that natively (kernels().native_bf16). Softmax statistics and gradients are float32.
  Elem elem = Elem::f32;
  // Main source: q (B, H, Sq, D); k, v (B, H, Sk, D), rows where `rows.q`, `rows.k`, `rows.v` say.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Row layouts of the main source's tensors (Rows; unset = contiguous): q, k, v, out (forward), dout, dq, dk, dv
  // (backward). lse, delta and the extra source are contiguous.
  struct {
    Rows q, k, v, out, dout, dq, dk, dv;
  } rows;
  const float* kbias = nullptr;   // (B, Sk) or null
  const uint8_t* qskip = nullptr;  // (B, Sq) or null: 1 = row sees nothing (out 0, lse +inf)
  int64_t w = -1;                  // band half width on the main source (query i, key j: |i - j| <= w); -1 = none
  // Extra source (optional): kx, vx (B, H, Sx, D), bias (B, Sx).
  const void* kx = nullptr;
  const void* vx = nullptr;
  const float* kxbias = nullptr;
  int64_t Sx = 0;
  Dropout drop;  // off unless drop.on
  // run_backward adds into dq, dk, dv (dkx, dvx), which the caller zero-filled or filled by an earlier pass (true), or
  // writes them (false: each task zeroes the rows it owns first, in the thread that then accumulates into them,
  // instead of a serial fill of the whole tensors before the call).
  bool add_grads = true;
  // Segments of query tile [i0, i0 + rows) of (b, h).
  std::function<void(int64_t b, int64_t h, int64_t i0, int64_t rows, std::vector<Seg>& segs)> segments;
};

// out (B, H, Sq, D, rows at p.rows.out) in the element type, lse (B, H, Sq) float32.
void run_forward(const Problem& p, void* out, float* lse);

// Gradients (float32), shaped like q, k, v (kx, vx): added into (p.add_grads: the caller zero-fills them or holds an
// earlier pass's sums) or written.
// dout in the element type; delta (B, H, Sq) = rowsum(dout * out).
void run_backward(const Problem& p, const void* dout, const float* lse, const float* delta, float* dq, float* dk,
                  float* dv, float* dkx, float* dvx);

// Tile products by the target's own micro-kernels (true, the default: fp32 FMA kernels, and vdpbf16ps kernels for
// bf16 on the avx512_bf16 target when AMX is absent or off) or by BLAS (false: ETKD_CPU_GEMM=blas in the
// environment, read once: sgemm for fp32, MKL's bf16 GEMM for native bf16). BLAS picks its own ISA whatever
// target runs ours, so with it an `avx2` target still multiplies with AVX-512 on an AVX-512 CPU; the own kernels
// keep each target to its width (and are faster on these L1/L2-resident tiles: README, CPU ISA targets).
bool own_tile_gemm();

// The products with nothing to multiply, done without calling BLAS (gemm_rm and the bf16 GEMM): true when m or n is
// 0, or when k is 0 (then C = beta * C, and C = 0 when beta is 0, as BLAS defines it); false otherwise.
bool gemm_degenerate(int64_t m, int64_t n, int64_t k, float beta, float* c, int64_t ldc);

// MKL on one thread in this thread while in scope (mkl_set_num_threads_local; nothing without MKL). The tile
// drivers' workers hold one: MKL's sgemm rounded the same tile product differently inside a worker of 4 threads
// than of 1 (it follows its thread setting even when it runs sequentially), so BLAS products (head dims that are
// not whole vectors, ETKD_CPU_GEMM=blas) made results depend on the thread count.
struct BlasOneThread {
  int prev = 0;
  BlasOneThread();
  ~BlasOneThread();
  BlasOneThread(const BlasOneThread&) = delete;
  BlasOneThread& operator=(const BlasOneThread&) = delete;
};

// Row-major C (m x n) = alpha * op(A) (m x k) @ op(B) (k x n) + beta * C through BLAS sgemm.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Register-blocked GEMM for the thin products of Nystrom attention (K = head_dim or landmarks, a few dozen) on
// L1/L2-resident tiles: a 6 x (2 vectors) micro-kernel (6 x 16 on AVX2, 6 x 32 on AVX-512), no packing and no per-call BLAS dispatch, so the products
// can be fused per tile with their softmax (about 90% of the FMA peak on a Zen 1 core, like MKL on whole
// (seq x landmarks) matrices; the gain is the fusion, not the kernel).
// C (m x n) = alpha * A @ B, or C += alpha * A @ B when `accumulate`. n must be a multiple of kSmallPad: B
// (k x n, row stride ldb) and C are read and written in whole 8-float vectors, so callers pad B's columns
// (zeros). A element (r, kk) is a[r * a_rs + kk * a_ks]: row-major (a_ks = 1) or transposed (a_rs = 1).
// kSmallPad is a whole number of vectors on every target (8 floats on AVX2, 16 on AVX-512).
constexpr int64_t kSmallPad = 16;
inline int64_t pad_small(int64_t n) { return (n + kSmallPad - 1) / kSmallPad * kSmallPad; }
void gemm_small(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t a_rs, int64_t a_ks,
                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Nystrom's K3 @ v for one (batch, head): t (n x dp, row stride dp) = softmax_j(scale * ql k^T + bias) @ v for
// n landmark queries against S keys, without the (n x S) probability matrix. Key tiles are scored transposed,
// s (tile x np) = k_tile @ qlT with qlT (d x np) the landmark queries packed column-wise (padding zero), so the
// per-landmark softmax runs down the columns, vectorised over landmarks, as an online softmax over the tiles.
// k, v (S x d) rows lk and lv floats apart (a model's head-split views read in place); bias (S) of 0 / -inf or null;
// landmarks seeing no key get t = 0. dp = pad_small(d).
// lse (np floats, or null): each landmark's log-sum-exp of its scores, +inf for a landmark seeing no key and for the
// padding columns n..np, so exp(score - lse) is K3 (zero where K3 is), as nystrom_k3_bwd recomputes it.
// ksum (null, or n x dp, row stride dp): adds the sum of k's rows of each segment of `seg` keys into its row (the
// key landmarks' sums, from the same pass over k; padded keys included, as the landmarks are defined).
// work: landmark_attend_work(np, d) floats.
// k3 (null, or S x np) and k3max (tiles of kLmTile keys x np): K3 kept for nystrom_k3_bwd, key-major: row j holds
// exp(score - m) of key j, m the running max per landmark when j's tile was reached (k3max's row of that tile), so
// K3 = k3 * exp(k3max - lse) (at most 1 per factor); padded keys' rows zero; an all-padded tile's rows zero and its
// k3max -inf.
// Key rows per tile of landmark_attend: the (tile x np) scores and the v tile stay in L1/L2, and the online
// rescale of t (n x d per tile) stays small next to the tile's 2 * tile * n * d FMAs.
constexpr int64_t kLmTile = 128;
int64_t landmark_attend_work(int64_t np, int64_t d);
void landmark_attend(const float* qlT, int64_t n, int64_t np, const float* k, int64_t lk, const float* v, int64_t lv,
                     const float* bias, int64_t S, int64_t d, float scale, float* t, float* lse, float* ksum,
                     int64_t seg, float* work, float* k3 = nullptr, float* k3max = nullptr);

// Nystrom's K3 backward for one (batch, head) in tiles of kLmTile keys (nystrom_impl.h), K3 (keys x landmarks, per
// tile) recomputed as exp(scale k qlT - lse) from landmark_attend's lse: dv = K3 dT, dS3 = K3 o (v dT^T - dl),
// dk = scale dS3 ql (+ row l of dkl for a key of segment l, segments of `seg` keys: the key landmarks' gradient
// spread over their segments, already divided by the segments' sizes; dkl null: none), dv and dk written, rows of
// dp floats; dql += scale dS3^T k. k, v (S x dp; rows lk, lv floats apart), dv, dk (rows ldv, ldk apart), qlT and
// dtT (dp x np, padding zero), ql, dt and dkl (n x dp), dl (np: dT . T per landmark), bias (S) of 0 / -inf or null.
// work: nystrom_k3_bwd_work(np) floats. k3, k3max: landmark_attend's kept K3 (null: recomputed from k and qlT).
int64_t nystrom_k3_bwd_work(int64_t np);
void nystrom_k3_bwd(const float* qlT, const float* lse, const float* k, int64_t lk, const float* v, int64_t lv,
                    const float* bias, int64_t S, int64_t n, int64_t np, int64_t dp, float scale, const float* dt,
                    const float* dtT, const float* dl, const float* ql, const float* dkl, int64_t seg, float* dv,
                    int64_t ldv, float* dk, int64_t ldk, float* dql, float* work, const float* k3 = nullptr,
                    const float* k3max = nullptr);

// In-place softmax of `rows` rows of `n` floats (row stride ld), keys biased by bias[0:n] (null = none):
// rows seeing no key (all -inf) become zeros. SIMD (at::vec).
void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, const float* bias);

// delta[r] = sum_c a[r, c] * b[r, c] over `rows` rows of `d` floats.
void rowwise_dot(const float* a, const float* b, float* delta, int64_t rows, int64_t d);

// Dropout applied outside the tile loops (Nystrom's K1 block): x[r, c] = kept ? x[r, c] * dr.scale : 0, the keep bit
// of (bh, row0 + r, column col0 + c) as in Dropout; r < rows, c < n, row stride ld. SIMD keep bits.
void dropout_rows(const Dropout& dr, int64_t bh, int64_t row0, int64_t rows, int64_t col0, int64_t n, float* x,
                  int64_t ld);

// oneDNN's brgemm micro-kernel for bf16 x bf16 -> fp32 (at::native::cpublas::brgemm, the one ATen's CPU flash
// attention uses; AMX-BF16 on CPUs that have it), wrapped here so the per-ISA files need not include oneDNN:
// C (m x n, row stride ldc) = (add ? C : 0) + A (m x k bf16, row stride lda) @ B, with B packed VNNI
// ([k/2][ldb][2], pairs of k rows interleaved; k even, n <= ldb <= 64). Available when oneDNN is enabled and
// can pack bf16 (`cpublas::could_pack`: AMX); asked per call, as torch.backends.mkldnn can be switched off.
bool brgemm_bf16_available();
void brgemm_bf16(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add, const void* a,
                 const void* b, float* c);
// Releases the thread's AMX tile configuration (after a task's last brgemm_bf16).
void brgemm_done();
// ETKD_CPU_AMX=0 in the environment (read once; 1, the default, or unset: use AMX where the CPU has it) keeps the
// bf16 tiles off AMX, so an AMX CPU runs them as a CPU with AVX512-BF16 and no AMX (AMD Zen 4/5) does: the own
// vdpbf16ps products. Any other value is an error at the first kernel use.
bool amx_allowed();

// Which products multiplied the tiles of each bf16 run_forward / run_backward call, counted per call (always on:
// one atomic add per call) so a test can tell that the path asked for really ran; `_C.bf16_calls()` returns and
// resets the counts.
enum Bf16Products : int { kProdAmx, kProdDp, kProdMkl, kProdFp32, kProdKinds };
extern const char* const kProdNames[kProdKinds];
void count_bf16_call(bool backward, Bf16Products how);
// counts[2 * kProdKinds]: forward kinds, then backward kinds; reset to zero.
std::vector<int64_t> bf16_calls_take();

// Per-phase time of run_forward and run_backward, for profiling: when on (set_profiling: the cpu backend sets it
// from ETKD_CPU_PROFILE, checked by etkd_kernels/_env.py as every etkd variable is) every tile adds its time per
// phase, summed over threads (so the phases add up to about threads x wall time); `_C.cpu_profile()` returns and
// resets the totals. Off (the default) it costs one branch per phase. The backward charges its products to qk
// (S = Q K^T) and pv (the other four), its exps and dS to softmax, its bf16 transposes and conversions to convert.
enum Phase : int {
  kPhasePrep,     // K/V of a (batch, head) task converted / packed once (16-bit paths)
  kPhaseQK,       // S = scale * Q K^T
  kPhaseSoftmax,  // bias, row max, exp, row sums, rescale of the accumulator
  kPhaseConvert,  // tile conversions: Q / K / V to the product type, P to bf16
  kPhasePV,       // acc += P V
  kPhaseOut,      // out = acc / l in the element type, lse
  kPhases
};
extern const char* const kPhaseNames[kPhases];
bool profiling();
void set_profiling(bool on);
// ns[kPhases] added to the process totals (atomics).
void profile_add(const int64_t* ns);
// The totals in seconds, and reset to zero.
std::vector<double> profile_take();
// Monotonic clock in nanoseconds (clock_gettime: no inline std:: code in the per-ISA files).
int64_t now_ns();

}  // namespace etkd::cpu
