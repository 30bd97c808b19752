// Nystrom attention on the CPU.
//
// nystrom_fwd: the whole forward (landmark means, K2 softmax, Newton-Schulz pseudo-inverse, K3 @ v and
// K1 @ X) as one parallel loop over (batch, head) with BLAS sgemm on the small matrices, instead of ~40
// small ATen ops. Semantics are etkd_kernels/reference/nystrom.py's; "hf_global" needs the max column sum
// of K2 over every (batch, head) before any pseudo-inverse starts, so the loop runs in two phases.
//
// softmax_matmul: out = softmax(scale * a @ b^T, keys masked) @ c, the fused product the composite backward
// (etkd_kernels/cpu/nystrom.py) differentiates: K1 @ X (a = q, b = landmark keys) and K3 @ v (a = landmark
// queries, b = k, padded keys masked); its backward recomputes the probabilities from the saved lse.
#include <ATen/Parallel.h>

#include <algorithm>
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
  // Phase 1 per (b, h): landmarks ql, kl (n, D), K2 (n, n), K2's max column sum.
  std::vector<float> ql(BH * n * D), kl(BH * n * D), k2(BH * n * n), colmax(BH);
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(n);
    for (int64_t bh = begin; bh < end; ++bh) {
      float *qlh = ql.data() + bh * n * D, *klh = kl.data() + bh * n * D, *m = k2.data() + bh * n * n;
      segment_means(qp + bh * S * D, S, D, n, c, qlh);
      segment_means(kp + bh * S * D, S, D, n, c, klh);
      gemm_rm(false, true, n, n, D, sc, qlh, D, klh, D, 0.f, m, n);
      softmax_rows(m, n, n, n, nullptr);
      std::fill(cs.begin(), cs.end(), 0.f);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) cs[j] += m[i * n + j];
      colmax[bh] = *std::max_element(cs.begin(), cs.end());
    }
  });
  const float gmax = BH ? *std::max_element(colmax.begin(), colmax.end()) : 1.f;
  // Phase 2 per (b, h): Z = pinv(K2), T = K3 @ v, X = Z @ T, out = K1 @ X (query tiles of bq rows).
  constexpr int64_t bq = 256;
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(n * n), zn(n * n), mz(n * n), t1(n * n), t2(n * n), s3(n * S), t(n * D), x(n * D),
        s1(bq * n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const float *qlh = ql.data() + bh * n * D, *klh = kl.data() + bh * n * D, *m = k2.data() + bh * n * n;
      const float coeff = 1.f / (hf_global ? gmax : colmax[bh]);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) z[i * n + j] = coeff * m[j * n + i];
      for (int64_t it = 0; it < iterations; ++it) {
        // z <- (0.25 z) @ (13 I - mz @ (15 I - mz @ (7 I - mz))), mz = m @ z (HF's association).
        gemm_rm(false, false, n, n, n, 1.f, m, n, z.data(), n, 0.f, mz.data(), n);
        for (int64_t i = 0; i < n * n; ++i) t1[i] = -mz[i];
        for (int64_t i = 0; i < n; ++i) t1[i * n + i] += 7.f;
        gemm_rm(false, false, n, n, n, -1.f, mz.data(), n, t1.data(), n, 0.f, t2.data(), n);
        for (int64_t i = 0; i < n; ++i) t2[i * n + i] += 15.f;
        gemm_rm(false, false, n, n, n, -1.f, mz.data(), n, t2.data(), n, 0.f, t1.data(), n);
        for (int64_t i = 0; i < n; ++i) t1[i * n + i] += 13.f;
        for (int64_t i = 0; i < n * n; ++i) z[i] *= 0.25f;
        gemm_rm(false, false, n, n, n, 1.f, z.data(), n, t1.data(), n, 0.f, zn.data(), n);
        std::swap(z, zn);
      }
      const float *kh = kp + bh * S * D, *vh = vp + bh * S * D, *qh = qp + bh * S * D;
      gemm_rm(false, true, n, S, D, sc, qlh, D, kh, D, 0.f, s3.data(), S);
      softmax_rows(s3.data(), n, S, S, bp ? bp + b * S : nullptr);
      gemm_rm(false, false, n, D, S, 1.f, s3.data(), S, vh, D, 0.f, t.data(), D);
      gemm_rm(false, false, n, D, n, 1.f, z.data(), n, t.data(), D, 0.f, x.data(), D);
      for (int64_t i0 = 0; i0 < S; i0 += bq) {
        const int64_t rows = std::min(bq, S - i0);
        gemm_rm(false, true, rows, n, D, sc, qh + i0 * D, D, klh, D, 0.f, s1.data(), n);
        softmax_rows(s1.data(), rows, n, n, nullptr);
        float* o = op + (bh * S + i0) * D;
        gemm_rm(false, false, rows, D, n, 1.f, s1.data(), n, x.data(), D, 0.f, o, D);
        if (rp) {
          for (int64_t r = 0; r < rows; ++r)
            if (!rp[b * S + i0 + r]) std::fill(o + r * D, o + (r + 1) * D, 0.f);
        }
      }
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
