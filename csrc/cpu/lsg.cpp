// LSG attention on the CPU: forward and backward, two passes over the shared tile driver (flash_tile.h).
//
//   block pass   every real non-global query tile (inside query block n; with all_rows, padded ones too: the
//                model files' bos_pooling pools their hidden states) visits, in one online softmax,
//                the local keys [(n - 1) B, (n + 2) B) of the main source (global and padded keys biased
//                out) and, as the extra source `kx`, the global keys followed by the two sparse windows of
//                compressed keys of its block;
//   global pass  the global query rows attend to every real key.
// The compressed keys (pooled / strided / norm-selected, etkd_kernels.reference.lsg.sparse_keys) are built
// by the Python side and differ by head, as do their masks, so the block pass folds heads into the batch
// (the driver's key biases are per batch row). The window positions come from the Python side too
// (`starts`, (nb, 2): first compressed position of each block's left and right window), so the pattern is
// defined in one place.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

// Sparsity types compressed here (the others are built by the Python side): ids shared with etkd_kernels/cpu/lsg.py.
constexpr int64_t kPooling = 1, kStride = 2, kBlockStride = 3;

struct Passes {
  Problem block, glob;
  Tensor usable_bias, skip, kx_bias, starts, real_bias, qg, gskip, xcols;
  int64_t G = 0;
};

Passes setup(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kx, const Tensor& vx,
             const Tensor& kx_ok, const Tensor& starts, const OptTensor& kpm, int64_t block_size,
             int64_t sparse_block_size, int64_t num_global, double scale, const OptTensor& kx_cols,
             const Dropout& drop, bool all_rows) {
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
  // Rows skipped by the block pass: the global ones and, unless all_rows, the padded ones.
  auto rows = all_rows ? at::arange(S).ge(G).to(at::kByte).unsqueeze(0).expand({B, S}) : usable;
  ps.skip = (1 - rows).unsqueeze(1).expand({B, H, S}).reshape({B * H, S}).contiguous();
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
  // Dropout: rows and local keys are positions (the folded batch row b * H + h is the counter's b * H + h); extra
  // key x has column kx_cols[x] (globals their positions, compressed position t: S + t), per folded batch row.
  p.drop = drop;
  if (drop.on && Sx > 0) {
    TORCH_CHECK(kx_cols.has_value() && kx_cols->dim() == 1 && kx_cols->size(0) == Sx &&
                    kx_cols->scalar_type() == at::kLong,
                "kx_cols: expected (", Sx, ") int64 dropout columns of the extra keys");
    ps.xcols = kx_cols->view({1, Sx}).expand({B * H, Sx}).contiguous();
    p.drop.xcol = ps.xcols.data_ptr<int64_t>();
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
    r.drop = drop;  // global rows 0..G-1 and every key at its position
  }
  return ps;
}

// Token of compressed position p of head h for the strided types (etkd_kernels.reference.lsg.sparse_keys).
inline int64_t strided_token(int64_t type, int64_t p, int64_t h, int64_t block, int64_t f) {
  const int64_t step = block / f;
  return type == kStride ? p * f + h % f : (p / step) * block + (h * step + p % step) % block;
}

void check_compress(const Tensor& k, int64_t G, int64_t block, int64_t f, int64_t type) {
  check_float(k, "k");
  TORCH_CHECK(k.dim() == 4, "k: expected (batch, heads, seq, head_dim), got ", k.sizes());
  TORCH_CHECK(type == kPooling || type == kStride || type == kBlockStride, "sparsity type: expected 1..3, got ", type);
  TORCH_CHECK(f >= 2 && block % f == 0 && k.size(2) % block == 0 && G >= 0 && G <= k.size(2),
              "lsg_sparse_keys: expected factor >= 2 dividing block ", block, " dividing seq ", k.size(2), ", got factor ",
              f, ", ", G, " globals");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> lsg_sparse_keys(const Tensor& k, const Tensor& v, const OptTensor& kpm,
                                                   int64_t num_global_tokens, int64_t block_size,
                                                   int64_t sparsity_factor, int64_t type) {
  const int64_t G = num_global_tokens, f = sparsity_factor;
  check_compress(k, G, block_size, f, type);
  check_like(v, k, "v");
  const int64_t B = k.size(0), H = k.size(1), S = k.size(2), D = k.size(3), T = S / f, Sx = G + T;
  auto real = real_mask(kpm, B, S);
  auto kx = at::empty({B, H, Sx, D}, k.options()), vx = at::empty({B, H, Sx, D}, k.options());
  auto ok = at::empty({B, H, Sx}, at::kBool);
  const uint8_t* rp = real.data_ptr<uint8_t>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *kxp = kx.data_ptr<float>(), *vxp = vx.data_ptr<float>();
  bool* okp = ok.data_ptr<bool>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(f);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const uint8_t* r = rp + b * S;
      const float *kh = kp + bh * S * D, *vh = vp + bh * S * D;
      float *kxh = kxp + bh * Sx * D, *vxh = vxp + bh * Sx * D;
      bool* o = okp + bh * Sx;
      std::copy(kh, kh + G * D, kxh);
      std::copy(vh, vh + G * D, vxh);
      for (int64_t j = 0; j < G; ++j) o[j] = r[j] != 0;
      for (int64_t p = 0; p < T; ++p) {
        float *kc = kxh + (G + p) * D, *vc = vxh + (G + p) * D;
        if (type == kPooling) {  // sum of the usable tokens / (count + 1e-6); attended even when empty (LSG)
          int64_t cnt = 0;
          for (int64_t i = 0; i < f; ++i) cnt += r[p * f + i] && p * f + i >= G;
          const float inv = 1.f / (static_cast<float>(cnt) + 1e-6f);
          std::fill(kc, kc + D, 0.f);
          std::fill(vc, vc + D, 0.f);
          for (int64_t i = 0; i < f; ++i) {
            const int64_t j = p * f + i;
            if (!r[j] || j < G) continue;
            for (int64_t c = 0; c < D; ++c) kc[c] += kh[j * D + c], vc[c] += vh[j * D + c];
          }
          for (int64_t c = 0; c < D; ++c) kc[c] *= inv, vc[c] *= inv;
          o[G + p] = true;
        } else {
          const int64_t j = strided_token(type, p, h, block_size, f);
          std::copy(kh + j * D, kh + (j + 1) * D, kc);
          std::copy(vh + j * D, vh + (j + 1) * D, vc);
          o[G + p] = r[j] && j >= G;
        }
      }
    }
  });
  return {kx, vx, ok};
}

void lsg_sparse_keys_bwd(const Tensor& dkx, const Tensor& dvx, const Tensor& dk, const Tensor& dv,
                         const OptTensor& kpm, int64_t num_global_tokens, int64_t block_size, int64_t sparsity_factor,
                         int64_t type) {
  const int64_t G = num_global_tokens, f = sparsity_factor;
  check_compress(dk, G, block_size, f, type);
  check_like(dv, dk, "dv");
  const int64_t B = dk.size(0), H = dk.size(1), S = dk.size(2), D = dk.size(3), T = S / f, Sx = G + T;
  check_float(dkx, "dkx");
  TORCH_CHECK(dkx.dim() == 4 && dkx.size(0) == B && dkx.size(1) == H && dkx.size(2) == Sx && dkx.size(3) == D,
              "dkx: expected (", B, ", ", H, ", ", Sx, ", ", D, "), got ", dkx.sizes());
  check_like(dvx, dkx, "dvx");
  auto real = real_mask(kpm, B, S);
  const uint8_t* rp = real.data_ptr<uint8_t>();
  const float *gkx = dkx.data_ptr<float>(), *gvx = dvx.data_ptr<float>();
  float *gk = dk.data_ptr<float>(), *gv = dv.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const uint8_t* r = rp + b * S;
      float *kh = gk + bh * S * D, *vh = gv + bh * S * D;
      const float *kxh = gkx + bh * Sx * D, *vxh = gvx + bh * Sx * D;
      for (int64_t i = 0; i < G * D; ++i) kh[i] += kxh[i], vh[i] += vxh[i];
      for (int64_t p = 0; p < T; ++p) {
        const float *kc = kxh + (G + p) * D, *vc = vxh + (G + p) * D;
        if (type == kPooling) {
          int64_t cnt = 0;
          for (int64_t i = 0; i < f; ++i) cnt += r[p * f + i] && p * f + i >= G;
          const float inv = 1.f / (static_cast<float>(cnt) + 1e-6f);
          for (int64_t i = 0; i < f; ++i) {
            const int64_t j = p * f + i;
            if (!r[j] || j < G) continue;
            for (int64_t c = 0; c < D; ++c) kh[j * D + c] += inv * kc[c], vh[j * D + c] += inv * vc[c];
          }
        } else {  // distinct p of a head select distinct tokens: no two writers
          const int64_t j = strided_token(type, p, h, block_size, f);
          for (int64_t c = 0; c < D; ++c) kh[j * D + c] += kc[c], vh[j * D + c] += vc[c];
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> lsg_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kx,
                                   const Tensor& vx, const Tensor& kx_ok, const Tensor& starts,
                                   const OptTensor& key_padding_mask, int64_t block_size, int64_t sparse_block_size,
                                   int64_t num_global_tokens, double scale, const OptTensor& kx_cols,
                                   double dropout_p, int64_t seed, int64_t offset, bool all_rows) {
  Passes ps = setup(q, k, v, kx, vx, kx_ok, starts, key_padding_mask, block_size, sparse_block_size,
                    num_global_tokens, scale, kx_cols, dropout_of(dropout_p, seed, offset), all_rows);
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
                            int64_t block_size, int64_t sparse_block_size, int64_t num_global_tokens, double scale,
                            const OptTensor& kx_cols, double dropout_p, int64_t seed, int64_t offset,
                            bool all_rows) {
  Passes ps = setup(q, k, v, kx, vx, kx_ok, starts, key_padding_mask, block_size, sparse_block_size,
                    num_global_tokens, scale, kx_cols, dropout_of(dropout_p, seed, offset), all_rows);
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
