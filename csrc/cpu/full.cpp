// Dense attention on the CPU through the shared tile driver (flash_tile.h): one pass in which every query tile
// visits every key, padded keys biased out and padded query rows skipped (out 0, lse +inf). The `cpu` backend
// runs it for attention dropout (etkd_kernels/cpu/full.py): ATen's flash kernel draws its mask from torch's RNG,
// not from etkd's Philox contract, so only this pass reproduces the `reference` mask and regenerates it in the
// backward.
#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

struct Pass {
  Problem p;
  Tensor bias, skip;
};

Pass setup(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& kpm, double scale,
           const Dropout& drop) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q: expected (batch, heads, seq, head_dim), got ", q.sizes());
  check_like(k, q, "k");
  check_like(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  Pass ps;
  Problem& p = ps.p;
  p.B = B, p.H = H, p.Sq = S, p.Sk = S, p.D = D, p.scale = static_cast<float>(scale), p.bq = 64;
  p.elem = elem_of(q);
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.drop = drop;  // rows and columns are the op's positions
  if (kpm.has_value()) {
    const Tensor real = real_mask(kpm, B, S);
    ps.bias = bias_from(real);
    ps.skip = (1 - real).contiguous();
    p.kbias = ps.bias.data_ptr<float>(), p.qskip = ps.skip.data_ptr<uint8_t>();
  }
  p.segments = [S](int64_t, int64_t, int64_t, int64_t, std::vector<Seg>& segs) { append_run(segs, 0, S, 0); };
  return ps;
}

}  // namespace

std::tuple<Tensor, Tensor> full_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptTensor& key_padding_mask, double scale, double dropout_p, int64_t seed,
                                    int64_t offset) {
  Pass ps = setup(q, k, v, key_padding_mask, scale, dropout_of(dropout_p, seed, offset));
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  run_forward(ps.p, out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

std::vector<Tensor> full_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, const OptTensor& key_padding_mask, double scale,
                             double dropout_p, int64_t seed, int64_t offset) {
  Pass ps = setup(q, k, v, key_padding_mask, scale, dropout_of(dropout_p, seed, offset));
  const auto [delta, dq, dk, dv] = backward_start(grad_out, out, q, k, v, lse);
  ps.p.add_grads = false;  // written, not added to
  run_backward(ps.p, grad_out.data_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
               dk.data_ptr<float>(), dv.data_ptr<float>(), nullptr, nullptr);
  const auto dt = q.scalar_type();
  return {as_dtype(dq, dt), as_dtype(dk, dt), as_dtype(dv, dt)};
}

}  // namespace etkd::cpu
