// LSG attention on the CPU: forward and backward, two passes over the shared tile driver (flash_tile.h).
//
//   block pass   every real non-global query tile (inside query block n) visits, in one online softmax,
//                the local keys [(n - 1) B, (n + 2) B) of the main source (global and padded keys biased
//                out) and, as the extra source `kx`, the global keys followed by the two sparse windows of
//                compressed keys of its block;
//   global pass  the global query rows attend to every real key.
// The compressed keys (pooled / strided / norm-selected, etkd_kernels.reference.lsg.sparse_keys) are built
// by the Python side and differ by head, as do their masks, so the block pass folds heads into the batch
// (the driver's key biases are per batch row). The window positions come from the Python side too
// (`starts`, (nb, 2): first compressed position of each block's left and right window), so the pattern is
// defined in one place.
#include <algorithm>

#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

struct Passes {
  Problem block, glob;
  Tensor usable_bias, skip, kx_bias, starts, real_bias, qg, gskip;
  int64_t G = 0;
};

Passes setup(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kx, const Tensor& vx,
             const Tensor& kx_ok, const Tensor& starts, const OptTensor& kpm, int64_t block_size,
             int64_t sparse_block_size, int64_t num_global, double scale) {
  check_float(q, "q");
  TORCH_CHECK(q.dim() == 4, "q: expected (batch, heads, seq, head_dim), got ", q.sizes());
  check_like(k, q, "k");
  check_like(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), G = num_global;
  TORCH_CHECK(block_size >= 1 && S % block_size == 0, "block_size: seq ", S, " must be a multiple of block_size ",
              block_size);
  TORCH_CHECK(G >= 0 && G <= S, "num_global_tokens: expected 0..", S, ", got ", G);
  check_float(kx, "kx");
  TORCH_CHECK(kx.dim() == 4 && kx.size(0) == B && kx.size(1) == H && kx.size(2) >= G && kx.size(3) == D,
              "kx: expected (", B, ", ", H, ", >= ", G, ", ", D, "), got ", kx.sizes());
  check_like(vx, kx, "vx");
  const int64_t Sx = kx.size(2), T = Sx - G, nb = S / block_size;
  TORCH_CHECK(kx_ok.dim() == 3 && kx_ok.size(0) == B && kx_ok.size(1) == H && kx_ok.size(2) == Sx,
              "kx_ok: expected (", B, ", ", H, ", ", Sx, "), got ", kx_ok.sizes());
  TORCH_CHECK(T == 0 || (starts.dim() == 2 && starts.size(0) == nb && starts.size(1) == 2),
              "starts: expected (", nb, ", 2) sparse window starts, got ", starts.sizes());

  Passes ps;
  ps.G = G;
  auto real = real_mask(kpm, B, S);
  auto usable = real.clone();
  usable.narrow(1, 0, G).zero_();
  // Heads folded into the batch: biases and skip flags (B * H, ...).
  ps.usable_bias = bias_from(usable).unsqueeze(1).expand({B, H, S}).reshape({B * H, S}).contiguous();
  ps.skip = (1 - usable).unsqueeze(1).expand({B, H, S}).reshape({B * H, S}).contiguous();
  ps.kx_bias = bias_from(kx_ok).reshape({B * H, Sx}).contiguous();
  ps.starts = T ? starts.to(at::kLong).contiguous() : at::zeros({nb, 2}, at::kLong);

  Problem& p = ps.block;
  p.B = B * H, p.H = 1, p.Sq = S, p.Sk = S, p.D = D, p.scale = static_cast<float>(scale);
  p.bq = block_size <= 128 ? block_size : (block_size % 64 == 0 ? 64 : block_size);
  p.q = q.data_ptr<float>(), p.k = k.data_ptr<float>(), p.v = v.data_ptr<float>();
  p.kbias = ps.usable_bias.data_ptr<float>(), p.qskip = ps.skip.data_ptr<uint8_t>();
  if (Sx > 0) {
    p.kx = kx.data_ptr<float>(), p.vx = vx.data_ptr<float>(), p.kxbias = ps.kx_bias.data_ptr<float>(), p.Sx = Sx;
  }
  const int64_t* st = ps.starts.data_ptr<int64_t>();
  const int64_t bs = block_size, sbs = T ? sparse_block_size : 0;
  p.segments = [=](int64_t, int64_t, int64_t i0, int64_t, std::vector<Seg>& segs) {
    const int64_t n = i0 / bs;
    append_run(segs, std::max<int64_t>(0, (n - 1) * bs), std::min<int64_t>(S, (n + 2) * bs), 0);
    append_run(segs, 0, G, 1);
    for (int side = 0; side < 2 && sbs > 0; ++side) {
      const int64_t lo = std::max<int64_t>(0, st[n * 2 + side]), hi = std::min<int64_t>(T, st[n * 2 + side] + sbs);
      if (hi > lo) append_run(segs, G + lo, G + hi, 1);
    }
  };

  if (G > 0) {
    ps.real_bias = bias_from(real);
    ps.qg = q.narrow(2, 0, G).contiguous();
    ps.gskip = (1 - real.narrow(1, 0, G)).contiguous();
    Problem& r = ps.glob;
    r.B = B, r.H = H, r.Sq = G, r.Sk = S, r.D = D, r.scale = p.scale, r.bq = 64;
    r.q = ps.qg.data_ptr<float>(), r.k = k.data_ptr<float>(), r.v = v.data_ptr<float>();
    r.kbias = ps.real_bias.data_ptr<float>(), r.qskip = ps.gskip.data_ptr<uint8_t>();
    r.segments = [S](int64_t, int64_t, int64_t, int64_t, std::vector<Seg>& segs) { append_run(segs, 0, S, 0); };
  }
  return ps;
}

}  // namespace

std::tuple<Tensor, Tensor> lsg_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kx,
                                   const Tensor& vx, const Tensor& kx_ok, const Tensor& starts,
                                   const OptTensor& key_padding_mask, int64_t block_size, int64_t sparse_block_size,
                                   int64_t num_global_tokens, double scale) {
  Passes ps = setup(q, k, v, kx, vx, kx_ok, starts, key_padding_mask, block_size, sparse_block_size,
                    num_global_tokens, scale);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), G = ps.G;
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, S}, q.options());
  run_forward(ps.block, out.data_ptr<float>(), lse.data_ptr<float>());
  if (G > 0) {
    auto og = at::empty({B, H, G, D}, q.options());
    auto lg = at::empty({B, H, G}, q.options());
    run_forward(ps.glob, og.data_ptr<float>(), lg.data_ptr<float>());
    out.narrow(2, 0, G).copy_(og);
    lse.narrow(2, 0, G).copy_(lg);
  }
  return {out, lse};
}

std::vector<Tensor> lsg_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& out, const Tensor& lse, const Tensor& kx, const Tensor& vx,
                            const Tensor& kx_ok, const Tensor& starts, const OptTensor& key_padding_mask,
                            int64_t block_size, int64_t sparse_block_size, int64_t num_global_tokens, double scale) {
  Passes ps = setup(q, k, v, kx, vx, kx_ok, starts, key_padding_mask, block_size, sparse_block_size,
                    num_global_tokens, scale);
  check_like(grad_out, q, "grad_out");
  check_like(out, q, "out");
  check_float(lse, "lse");
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), G = ps.G;
  auto delta = at::empty({B, H, S}, q.options());
  rowwise_dot(grad_out.data_ptr<float>(), out.data_ptr<float>(), delta.data_ptr<float>(), B * H * S, D);
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  auto dkx = at::zeros_like(kx), dvx = at::zeros_like(vx);
  const bool extra = kx.size(2) > 0;
  run_backward(ps.block, grad_out.data_ptr<float>(), lse.data_ptr<float>(), delta.data_ptr<float>(),
               dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
               extra ? dkx.data_ptr<float>() : nullptr, extra ? dvx.data_ptr<float>() : nullptr);
  if (G > 0) {
    auto gdo = grad_out.narrow(2, 0, G).contiguous();
    auto glse = lse.narrow(2, 0, G).contiguous();
    auto gdelta = delta.narrow(2, 0, G).contiguous();
    auto dqg = at::zeros({B, H, G, D}, q.options());
    run_backward(ps.glob, gdo.data_ptr<float>(), glse.data_ptr<float>(), gdelta.data_ptr<float>(),
                 dqg.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), nullptr, nullptr);
    dq.narrow(2, 0, G).add_(dqg);
  }
  return {dq, dk, dv, dkx, dvx};
}

}  // namespace etkd::cpu
