// The fused product Nystrom attention is built from: out = softmax(scale * a @ b^T, keys masked) @ c.
//
// K1 @ X (a = q, b = landmark keys) and K3 @ v (a = landmark queries, b = k, padded keys masked) are both
// this op; its backward recomputes the probabilities from the saved lse. The pseudo-inverse is a few
// (landmarks x landmarks) products and stays in ATen (etkd_kernels/cpu/nystrom.py).
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

}  // namespace

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
