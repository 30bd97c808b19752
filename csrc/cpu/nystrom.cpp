// Nystrom attention on the CPU.
//
// nystrom_fwd: the whole forward (landmark means, K2 softmax, Newton-Schulz pseudo-inverse, K3 @ v and
// K1 @ X) in three parallel loops instead of ~40 small ATen ops. Semantics are etkd_kernels/reference/
// nystrom.py's; "hf_global" needs the max column sum of K2 over every (batch, head) before any pseudo-inverse
// starts, so the loop over (batch, head) runs in two phases, then the K1 @ X loop over query tiles. The thin
// products (K = head_dim or landmarks) go through gemm_small's register-blocked kernel, fused per tile with
// their softmax (flash_tile.h), not through BLAS sgemm on (seq x landmarks) matrices.
//
// softmax_matmul: out = softmax(scale * a @ b^T, keys masked) @ c, the fused product the composite backward
// (etkd_kernels/cpu/nystrom.py) differentiates: K1 @ X (a = q, b = landmark keys) and K3 @ v (a = landmark
// queries, b = k, padded keys masked); its backward recomputes the probabilities from the saved lse.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

struct Setup {
  Problem p;
  Tensor bias;
};

Setup setup(const Tensor& a, const Tensor& b, const Tensor& c, const OptTensor& key_mask, double scale) {
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
                   const OptTensor& key_padding_mask, double scale, bool hf_global) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q: expected (batch, heads, seq, head_dim), got ", q.sizes());
  check_like(k, q, "k");
  check_like(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  TORCH_CHECK(num_landmarks >= 1 && num_landmarks <= S, "num_landmarks: expected 1..", S, ", got ", num_landmarks);
  TORCH_CHECK(iterations >= 0, "pinv_iterations: expected >= 0, got ", iterations);
  const int64_t c = (S + num_landmarks - 1) / num_landmarks, n = (S + c - 1) / c;  // n non-empty segments
  const float sc = static_cast<float>(scale);
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

std::tuple<Tensor, Tensor> softmax_matmul_fwd(const Tensor& a, const Tensor& b, const Tensor& c,
                                              const OptTensor& key_mask, double scale) {
  Setup s = setup(a, b, c, key_mask, scale);
  auto out = at::empty({a.size(0), a.size(1), a.size(2), a.size(3)}, a.options());
  auto lse = at::empty({a.size(0), a.size(1), a.size(2)}, a.options());
  run_forward(s.p, out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}

std::vector<Tensor> softmax_matmul_bwd(const Tensor& grad_out, const Tensor& a, const Tensor& b, const Tensor& c,
                                       const Tensor& out, const Tensor& lse, const OptTensor& key_mask, double scale) {
  Setup s = setup(a, b, c, key_mask, scale);
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
