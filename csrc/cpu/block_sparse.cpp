// Block-sparse attention on the CPU: forward and backward over any block layout.
//
// Query tiles never straddle a query block; a tile visits the allowed key blocks of its query block from
// the layout's look-up table (etkd_kernels.masks.layout_lut), adjacent blocks merged into one segment so
// the tile products stay large; empty blocks are never touched.
#include <algorithm>

#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

struct Setup {
  Problem p;
  Tensor bias, skip, lut, counts;
};

Setup setup(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lut, const Tensor& counts,
            int64_t block_size, const OptTensor& kpm, double scale, const Dropout& drop) {
  check_float(q, "q", true);
  check_like(k, q, "k", true);
  check_like(v, q, "v", true);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  TORCH_CHECK(block_size >= 1 && S % block_size == 0, "block_size: seq ", S, " must be a multiple of block_size ",
              block_size);
  const int64_t nb = S / block_size;
  TORCH_CHECK(lut.dim() == 3 && (lut.size(0) == 1 || lut.size(0) == H) && lut.size(1) == nb,
              "lut: expected (1 or ", H, ", ", nb, ", max_blocks), got ", lut.sizes());
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == lut.size(0) && counts.size(1) == nb,
              "counts: expected (", lut.size(0), ", ", nb, "), got ", counts.sizes());
  Setup s;
  s.lut = lut.to(at::kInt).contiguous();
  s.counts = counts.to(at::kInt).contiguous();
  TORCH_CHECK(s.lut.numel() == 0 || (s.lut.min().item<int>() >= 0 && s.lut.max().item<int>() < nb),
              "lut: key block index out of range [0, ", nb, ")");
  auto real = real_mask(kpm, B, S);
  s.bias = bias_from(real);
  s.skip = (1 - real).contiguous();
  Problem& p = s.p;
  p.B = B, p.H = H, p.Sq = S, p.Sk = S, p.D = D, p.scale = static_cast<float>(scale);
  p.bq = block_size <= 128 ? block_size : (block_size % 64 == 0 ? 64 : block_size);
  p.elem = elem_of(q);
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.rows.q = row_layout(q), p.rows.k = row_layout(k), p.rows.v = row_layout(v);
  p.drop = drop;  // rows and key columns are the (padded) sequence positions
  if (!real.all().item<bool>()) p.kbias = s.bias.data_ptr<float>(), p.qskip = s.skip.data_ptr<uint8_t>();
  const int* lp = s.lut.data_ptr<int>();
  const int* cp = s.counts.data_ptr<int>();
  const int64_t hl = s.lut.size(0), width = s.lut.size(2);
  p.segments = [=](int64_t, int64_t h, int64_t i0, int64_t, std::vector<Seg>& segs) {
    const int64_t qb = i0 / block_size, row = (hl == 1 ? 0 : h) * nb + qb;
    const int* blocks = lp + row * width;
    const int n = cp[row];
    for (int a = 0; a < n;) {
      int e = a + 1;
      while (e < n && blocks[e] == blocks[e - 1] + 1) ++e;  // merge runs of adjacent key blocks
      append_run(segs, blocks[a] * block_size, (blocks[e - 1] + 1) * block_size, 0);
      a = e;
    }
  };
  return s;
}

}  // namespace

std::tuple<Tensor, Tensor> block_sparse_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& lut,
                                            const Tensor& counts, int64_t block_size,
                                            const OptTensor& key_padding_mask, double scale, double dropout_p,
                                            int64_t seed, int64_t offset) {
  const Tensor q = with_rows(q_), k = with_rows(k_), v = with_rows(v_);
  Setup s = setup(q, k, v, lut, counts, block_size, key_padding_mask, scale, dropout_of(dropout_p, seed, offset));
  auto out = at::empty_like(q);  // in q's layout
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  s.p.rows.out = row_layout(out);
  run_forward(s.p, out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

std::vector<Tensor> block_sparse_bwd(const Tensor& grad_out_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                     const Tensor& out_, const Tensor& lse, const Tensor& lut, const Tensor& counts,
                                     int64_t block_size, const OptTensor& key_padding_mask, double scale,
                                     double dropout_p, int64_t seed, int64_t offset) {
  const Tensor q = with_rows(q_), k = with_rows(k_), v = with_rows(v_), grad_out = with_rows(grad_out_),
               out = with_rows(out_);
  check_float(q, "q", true);
  const auto dt = q.scalar_type();
  const auto [delta, dq, dk, dv] = backward_start(grad_out, out, q, k, v, lse, true);
  Setup s = setup(q, k, v, lut, counts, block_size, key_padding_mask, scale, dropout_of(dropout_p, seed, offset));
  s.p.add_grads = false;  // dq, dk, dv from backward_start: written, not added to
  s.p.rows.dout = row_layout(grad_out), s.p.rows.dq = row_layout(dq), s.p.rows.dk = row_layout(dk),
  s.p.rows.dv = row_layout(dv);
  run_backward(s.p, grad_out.data_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
               dk.data_ptr<float>(), dv.data_ptr<float>(), nullptr, nullptr);
  return {as_dtype(dq, dt), as_dtype(dk, dt), as_dtype(dv, dt)};
}

}  // namespace etkd::cpu
