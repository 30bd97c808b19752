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
#include <atomic>
#include <vector>

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

// x (S, D) -> means over n segments of c rows (the last one S - (n - 1) c rows): out (n, D).
void segment_means(const float* x, int64_t S, int64_t D, int64_t n, int64_t c, float* out) {
  for (int64_t l = 0; l < n; ++l) {
    const int64_t r0 = l * c, r1 = std::min(S, r0 + c);
    float* o = out + l * D;
    std::fill(o, o + D, 0.f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * D;
      for (int64_t j = 0; j < D; ++j) o[j] += xr[j];
    }
    const float cnt = static_cast<float>(r1 - r0);
    for (int64_t j = 0; j < D; ++j) o[j] /= cnt;
  }
}

// Run body(scratch, i) for i in [0, n) on the OpenMP threads, tasks handed out one at a time from a shared
// counter rather than in at::parallel_for's fixed equal chunks: on a shared machine a thread that loses its core
// for a while would otherwise hold up the whole phase. make_scratch() builds one thread's buffers.
template <class MakeScratch, class Body>
void parallel_tasks(int64_t n, MakeScratch make_scratch, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto scratch = make_scratch();
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(scratch, i);
  });
}

}  // namespace

Tensor nystrom_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_landmarks, int64_t iterations,
                   const OptTensor& key_padding_mask, double scale, bool hf_global, double dropout_p, int64_t seed,
                   int64_t offset) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q: expected (batch, heads, seq, head_dim), got ", q.sizes());
  check_like(k, q, "k");
  check_like(v, q, "v");
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
  auto out = at::empty_like(q);
  float* op = out.data_ptr<float>();
  const int64_t BH = B * H;
  // Landmark counts padded to whole SIMD vectors for gemm_small's B operands (padding columns are zero).
  const int64_t np = pad_small(n), dp = pad_small(D);
  // Phase 1 per (b, h): landmarks ql, kl (n, D) and their packed transposes qlT, klT (D, np); K2 (n, n) and
  // its max column sum; T = K3 @ v (n, dp), which needs no pseudo-inverse, so it runs before the global max.
  std::vector<float> ql(BH * n * D), kl(BH * n * D), qlT(BH * D * np, 0.f), klT(BH * D * np, 0.f), k2(BH * n * n),
      colmax(BH), tt(BH * n * dp), xx(BH * n * dp);
  struct Scratch1 {
    std::vector<float> cs, work;
  };
  parallel_tasks(
      BH, [&] { return Scratch1{std::vector<float>(n), std::vector<float>(landmark_attend_work(np, D))}; },
      [&](Scratch1& w, int64_t bh) {
        std::vector<float>& cs = w.cs;
        const int64_t b = bh / H;
        float *qlh = ql.data() + bh * n * D, *klh = kl.data() + bh * n * D, *m = k2.data() + bh * n * n;
        float *qlt = qlT.data() + bh * D * np, *klt = klT.data() + bh * D * np;
        segment_means(qp + bh * S * D, S, D, n, c, qlh);
        segment_means(kp + bh * S * D, S, D, n, c, klh);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < D; ++j) qlt[j * np + i] = qlh[i * D + j], klt[j * np + i] = klh[i * D + j];
        gemm_rm(false, true, n, n, D, sc, qlh, D, klh, D, 0.f, m, n);
        softmax_rows(m, n, n, n, nullptr);
        std::fill(cs.begin(), cs.end(), 0.f);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) cs[j] += m[i * n + j];
        colmax[bh] = *std::max_element(cs.begin(), cs.end());
        landmark_attend(qlt, n, np, kp + bh * S * D, vp + bh * S * D, bp ? bp + b * S : nullptr, S, D, sc,
                        tt.data() + bh * n * dp, w.work.data());
      });
  const float gmax = BH ? *std::max_element(colmax.begin(), colmax.end()) : 1.f;
  // Phase 2 per (b, h): Z = pinv(K2), X = Z @ T (n, dp).
  parallel_tasks(
      BH, [&] { return std::vector<float>(5 * n * n); },
      [&](std::vector<float>& w, int64_t bh) {
        float *z = w.data(), *zn = z + n * n, *mz = zn + n * n, *t1 = mz + n * n, *t2 = t1 + n * n;
        const float* m = k2.data() + bh * n * n;
        const float coeff = 1.f / (hf_global ? gmax : colmax[bh]);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) z[i * n + j] = coeff * m[j * n + i];
        for (int64_t it = 0; it < iterations; ++it) {
          // z <- (0.25 z) @ (13 I - mz @ (15 I - mz @ (7 I - mz))), mz = m @ z (HF's association).
          gemm_rm(false, false, n, n, n, 1.f, m, n, z, n, 0.f, mz, n);
          for (int64_t i = 0; i < n * n; ++i) t1[i] = -mz[i];
          for (int64_t i = 0; i < n; ++i) t1[i * n + i] += 7.f;
          gemm_rm(false, false, n, n, n, -1.f, mz, n, t1, n, 0.f, t2, n);
          for (int64_t i = 0; i < n; ++i) t2[i * n + i] += 15.f;
          gemm_rm(false, false, n, n, n, -1.f, mz, n, t2, n, 0.f, t1, n);
          for (int64_t i = 0; i < n; ++i) t1[i * n + i] += 13.f;
          for (int64_t i = 0; i < n * n; ++i) z[i] *= 0.25f;
          gemm_rm(false, false, n, n, n, 1.f, z, n, t1, n, 0.f, zn, n);
          std::swap(z, zn);  // pointers into w
        }
        gemm_small(n, dp, n, 1.f, z, n, 1, tt.data() + bh * n * dp, dp, xx.data() + bh * n * dp, dp, false);
      });
  // Phase 3 per (b, h, query tile of bq rows): out = K1 @ X, the tile's (bq, n) scores and probabilities, klT
  // and X all in L1/L2. Tiles rather than heads as tasks: K1 is most of the work and balances over threads.
  constexpr int64_t bq = 48;
  const int64_t tiles = (S + bq - 1) / bq;
  parallel_tasks(
      BH * tiles, [&] { return std::vector<float>(bq * np + (D == dp ? 0 : bq * dp)); },
      [&](std::vector<float>& w, int64_t task) {
        float *s1 = w.data(), *ot = s1 + bq * np;
        const int64_t bh = task / tiles, b = bh / H, i0 = task % tiles * bq, rows = std::min(bq, S - i0);
        gemm_small(rows, np, D, sc, qp + (bh * S + i0) * D, D, 1, klT.data() + bh * D * np, np, s1, np, false);
        softmax_rows(s1, rows, n, np, nullptr);
        if (drop.on) dropout_rows(drop, bh, i0, rows, S, n, s1, np);
        float* o = op + (bh * S + i0) * D;
        if (D == dp) {
          gemm_small(rows, dp, n, 1.f, s1, np, 1, xx.data() + bh * n * dp, dp, o, D, false);
        } else {
          gemm_small(rows, dp, n, 1.f, s1, np, 1, xx.data() + bh * n * dp, dp, ot, dp, false);
          for (int64_t r = 0; r < rows; ++r) std::copy(ot + r * dp, ot + r * dp + D, o + r * D);
        }
        if (rp) {
          for (int64_t r = 0; r < rows; ++r)
            if (!rp[b * S + i0 + r]) std::fill(o + r * D, o + (r + 1) * D, 0.f);
        }
      });
  return out;
}

// nystrom_bwd: hand-written backward of the whole composition, recomputing the forward per (batch, head) with
// whole-head BLAS products; the (seq x landmarks) matrices K1, K3 and their gradients live only in one
// thread's scratch while its head is processed (nothing of that size is kept between forward and backward).
//   out = K1 X, X = Z T, T = K3 v, Z = NS(K2) (Newton-Schulz from Z0 = K2^T / max column sum).
// Phase 1 per head: landmarks, K2 and its max column sum (hf_global needs the max over every head first).
// Phase 2 per head: Z (iterates kept, n x n each), K3, T, X; K1 and dX, dK1 -> dq (through K1), dkl;
// dT, dZ; Newton-Schulz backward -> dK2 (all but the max-column-sum term) and d(coefficient); K3's
// backward -> dv, dk (through K3), dql. Phase 3 per head: the max term, K2's softmax backward, and the
// landmark gradients spread back over their segments. grad_out must already be zero on padded rows.
std::vector<Tensor> nystrom_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                int64_t num_landmarks, int64_t iterations, const OptTensor& key_padding_mask,
                                double scale, bool hf_global, double dropout_p, int64_t seed, int64_t offset) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q: expected (batch, heads, seq, head_dim), got ", q.sizes());
  check_like(k, q, "k");
  check_like(v, q, "v");
  check_like(grad_out, q, "grad_out");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), BH = B * H;
  TORCH_CHECK(num_landmarks >= 1 && num_landmarks <= S, "num_landmarks: expected 1..", S, ", got ", num_landmarks);
  TORCH_CHECK(iterations >= 0, "pinv_iterations: expected >= 0, got ", iterations);
  const int64_t c = (S + num_landmarks - 1) / num_landmarks, n = (S + c - 1) / c, nn = n * n, nd = n * D;
  const float sc = static_cast<float>(scale);
  const Dropout drop = dropout_of(dropout_p, seed, offset);  // on K1, as in nystrom_fwd
  Tensor kbias;
  if (key_padding_mask.has_value()) kbias = bias_from(real_mask(key_padding_mask, B, S));
  const float* bp = kbias.defined() ? kbias.data_ptr<float>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* dop = grad_out.data_ptr<float>();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  std::vector<float> ql(BH * nd), kl(BH * nd), k2(BH * nn), dk2(BH * nn), dql(BH * nd), dkl(BH * nd), colmax(BH),
      dcoeff(BH);

  // Phase 1.
  parallel_tasks(
      BH, [&] { return 0; },
      [&](int, int64_t bh) {
        float *qlh = ql.data() + bh * nd, *klh = kl.data() + bh * nd, *m = k2.data() + bh * nn;
        segment_means(qp + bh * S * D, S, D, n, c, qlh);
        segment_means(kp + bh * S * D, S, D, n, c, klh);
        gemm_rm(false, true, n, n, D, sc, qlh, D, klh, D, 0.f, m, n);
        softmax_rows(m, n, n, n, nullptr);
        float mx = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          float cs = 0.f;
          for (int64_t i = 0; i < n; ++i) cs += m[i * n + j];
          mx = std::max(mx, cs);
        }
        colmax[bh] = mx;
      });
  const float gmax = BH ? *std::max_element(colmax.begin(), colmax.end()) : 1.f;

  // Phase 2.
  struct Scratch {
    std::vector<float> big, small;
  };
  const int64_t its = iterations;
  parallel_tasks(
      BH,
      [&] {  // with dropout a fifth (S x n) buffer: K1 with the mask applied
        return Scratch{std::vector<float>((drop.on ? 5 : 4) * S * n),
                       std::vector<float>((its + 1) * nn + 9 * nn + 6 * nd)};
      },
      [&](Scratch& w, int64_t bh) {
        const int64_t b = bh / H;
        const float *qh = qp + bh * S * D, *kh = kp + bh * S * D, *vh = vp + bh * S * D, *doh = dop + bh * S * D;
        const float *qlh = ql.data() + bh * nd, *klh = kl.data() + bh * nd, *m = k2.data() + bh * nn;
        float *k1 = w.big.data(), *g1 = k1 + S * n, *k3 = g1 + S * n, *g3 = k3 + S * n;
        float* zs = w.small.data();  // iterates z_0 .. z_its
        float *mz = zs + (its + 1) * nn, *t1 = mz + nn, *t2 = t1 + nn, *t3 = t2 + nn, *dz = t3 + nn, *dzn = dz + nn,
              *dt = dzn + nn, *dt2 = dt + nn, *dmz = dt2 + nn;
        float *tt = dmz + nn, *xx = tt + nd, *dx = xx + nd, *dtt = dx + nd;
        float *dqlh = dql.data() + bh * nd, *dklh = dkl.data() + bh * nd, *dm = dk2.data() + bh * nn;
        const int64_t dqrow = bh * S * D;
        // Z: Newton-Schulz, every iterate kept.
        const float coeff = 1.f / (hf_global ? gmax : colmax[bh]);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) zs[i * n + j] = coeff * m[j * n + i];
        auto ns_terms = [&](const float* z) {  // mz = m z, t1 = 7I - mz, t2 = 15I - mz t1, t3 = 13I - mz t2
          gemm_rm(false, false, n, n, n, 1.f, m, n, z, n, 0.f, mz, n);
          for (int64_t i = 0; i < nn; ++i) t1[i] = -mz[i];
          for (int64_t i = 0; i < n; ++i) t1[i * n + i] += 7.f;
          gemm_rm(false, false, n, n, n, -1.f, mz, n, t1, n, 0.f, t2, n);
          for (int64_t i = 0; i < n; ++i) t2[i * n + i] += 15.f;
          gemm_rm(false, false, n, n, n, -1.f, mz, n, t2, n, 0.f, t3, n);
          for (int64_t i = 0; i < n; ++i) t3[i * n + i] += 13.f;
        };
        for (int64_t it = 0; it < its; ++it) {
          const float* z = zs + it * nn;
          ns_terms(z);
          gemm_rm(false, false, n, n, n, 0.25f, z, n, t3, n, 0.f, zs + (it + 1) * nn, n);
        }
        const float* zf = zs + its * nn;
        // K3 (n x S, padded keys masked), T = K3 v, X = Z T.
        gemm_rm(false, true, n, S, D, sc, qlh, D, kh, D, 0.f, k3, S);
        softmax_rows(k3, n, S, S, bp ? bp + b * S : nullptr);
        gemm_rm(false, false, n, D, S, 1.f, k3, S, vh, D, 0.f, tt, D);
        gemm_rm(false, false, n, D, n, 1.f, zf, n, tt, D, 0.f, xx, D);
        // K1 (S x n); dX = K1^T dO; dK1 = dO X^T; dS1 = K1 (dK1 - rowsum(K1 dK1)); dq = s dS1 kl; dkl = s dS1^T q.
        // With dropout (mask M on K1, scale r): dX = (K1 o M r)^T dO and dK1 = (dO X^T) o M r.
        gemm_rm(false, true, S, n, D, sc, qh, D, klh, D, 0.f, k1, n);
        softmax_rows(k1, S, n, n, nullptr);
        const float* k1x = k1;
        if (drop.on) {
          float* k1d = g3 + S * n;
          std::copy(k1, k1 + S * n, k1d);
          dropout_rows(drop, bh, 0, S, S, n, k1d, n);
          k1x = k1d;
        }
        gemm_rm(true, false, n, D, S, 1.f, k1x, n, doh, D, 0.f, dx, D);
        gemm_rm(false, true, S, n, D, 1.f, doh, D, xx, D, 0.f, g1, n);
        if (drop.on) dropout_rows(drop, bh, 0, S, S, n, g1, n);
        softmax_rows_bwd(k1, g1, S, n, n);
        gemm_rm(false, false, S, D, n, sc, g1, n, klh, D, 0.f, dqp + dqrow, D);
        gemm_rm(true, false, n, D, S, sc, g1, n, qh, D, 0.f, dklh, D);
        // dT = Z^T dX; dZ = dX T^T.
        gemm_rm(true, false, n, D, n, 1.f, zf, n, dx, D, 0.f, dtt, D);
        gemm_rm(false, true, n, n, D, 1.f, dx, D, tt, D, 0.f, dz, n);
        // Newton-Schulz backward, last iteration first: z' = 0.25 z t3.
        std::fill(dm, dm + nn, 0.f);
        for (int64_t it = its - 1; it >= 0; --it) {
          const float* z = zs + it * nn;
          ns_terms(z);
          gemm_rm(false, true, n, n, n, 0.25f, dz, n, t3, n, 0.f, dzn, n);  // dz_in = 0.25 dz t3^T
          gemm_rm(true, false, n, n, n, 0.25f, z, n, dz, n, 0.f, dt, n);    // dt3 = 0.25 z^T dz
          gemm_rm(false, true, n, n, n, -1.f, dt, n, t2, n, 0.f, dmz, n);   // dmz = -dt3 t2^T
          gemm_rm(true, false, n, n, n, -1.f, mz, n, dt, n, 0.f, dt2, n);   // dt2 = -mz^T dt3
          gemm_rm(false, true, n, n, n, -1.f, dt2, n, t1, n, 1.f, dmz, n);  // dmz -= dt2 t1^T
          gemm_rm(true, false, n, n, n, -1.f, mz, n, dt2, n, 0.f, dt, n);   // dt1 = -mz^T dt2
          for (int64_t i = 0; i < nn; ++i) dmz[i] -= dt[i];                 // dmz -= dt1
          gemm_rm(false, true, n, n, n, 1.f, dmz, n, z, n, 1.f, dm, n);     // dm += dmz z^T
          gemm_rm(true, false, n, n, n, 1.f, m, n, dmz, n, 1.f, dzn, n);    // dz_in += m^T dmz
          std::swap(dz, dzn);
        }
        float dc = 0.f;  // z0 = coeff m^T
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) dm[j * n + i] += coeff * dz[i * n + j], dc += dz[i * n + j] * m[j * n + i];
        dcoeff[bh] = dc;
        // K3 backward: dv = K3^T dT; dK3 = dT v^T; dS3 = K3 (dK3 - rowsum(K3 dK3)); dql = s dS3 k; dk = s dS3^T ql.
        gemm_rm(true, false, S, D, n, 1.f, k3, S, dtt, D, 0.f, dvp + dqrow, D);
        gemm_rm(false, true, n, S, D, 1.f, dtt, D, vh, D, 0.f, g3, S);
        softmax_rows_bwd(k3, g3, n, S, S);
        gemm_rm(false, false, n, D, S, sc, g3, S, kh, D, 0.f, dqlh, D);
        gemm_rm(true, false, S, D, n, sc, g3, S, qlh, D, 0.f, dkp + dqrow, D);
      });

  // Phase 3: d(coefficient) -> d(max column sum) -> dK2 (split evenly over tied maxima, as torch's max does).
  float dgmax = 0.f;
  for (int64_t bh = 0; bh < BH; ++bh) dgmax += dcoeff[bh];
  parallel_tasks(
      BH, [&] { return std::vector<float>(n); },
      [&](std::vector<float>& cs, int64_t bh) {
        const float* m = k2.data() + bh * nn;
        float* dm = dk2.data() + bh * nn;
        const float mx = hf_global ? gmax : colmax[bh];
        const float dmx = -(hf_global ? dgmax : dcoeff[bh]) / (mx * mx);
        std::fill(cs.begin(), cs.end(), 0.f);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) cs[j] += m[i * n + j];
        int64_t ties = 0;
        if (hf_global) {
          for (int64_t o = 0; o < BH; ++o) ties += colmax[o] == gmax ? 1 : 0;  // heads holding the max
        }
        int64_t here = 0;
        for (int64_t j = 0; j < n; ++j) here += cs[j] == mx ? 1 : 0;
        if (!hf_global) ties = 1;
        const bool holds = !hf_global || colmax[bh] == gmax;
        if (holds && here > 0) {
          // hf_global: the max over (heads, columns) is split over every tied column of every tied head; ties
          // across heads are counted per head here (exact ties between heads do not occur in practice).
          const float share = dmx / static_cast<float>(here * ties);
          for (int64_t j = 0; j < n; ++j)
            if (cs[j] == mx)
              for (int64_t i = 0; i < n; ++i) dm[i * n + j] += share;
        }
        // K2 softmax backward: dS2 = K2 (dK2 - rowsum(K2 dK2)); dql += s dS2 kl; dkl += s dS2^T ql.
        std::vector<float> ds(nn);
        for (int64_t i = 0; i < n; ++i) {
          float dl = 0.f;
          for (int64_t j = 0; j < n; ++j) dl += m[i * n + j] * dm[i * n + j];
          for (int64_t j = 0; j < n; ++j) ds[i * n + j] = m[i * n + j] * (dm[i * n + j] - dl);
        }
        float *dqlh = dql.data() + bh * nd, *dklh = dkl.data() + bh * nd;
        gemm_rm(false, false, n, D, n, sc, ds.data(), n, kl.data() + bh * nd, D, 1.f, dqlh, D);
        gemm_rm(true, false, n, D, n, sc, ds.data(), n, ql.data() + bh * nd, D, 1.f, dklh, D);
        // Landmark means: each token of segment l gets d(landmark l) / count(l).
        for (int64_t l = 0; l < n; ++l) {
          const int64_t r0 = l * c, r1 = std::min(S, r0 + c);
          const float inv = 1.f / static_cast<float>(r1 - r0);
          for (int64_t r = r0; r < r1; ++r) {
            float *gq = dqp + (bh * S + r) * D, *gk = dkp + (bh * S + r) * D;
            for (int64_t j = 0; j < D; ++j) gq[j] += inv * dqlh[l * D + j], gk[j] += inv * dklh[l * D + j];
          }
        }
      });
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
