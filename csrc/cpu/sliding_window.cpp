// Sliding-window (Longformer) attention on the CPU: forward and backward.
//
// Two passes over the shared tile driver (flash_tile.h):
//   band pass    every real non-global query tile [i0, i0 + bq) visits the keys [i0 - w, i0 + bq + w) of
//                the main source (band |i - j| <= w applied per row, global and padded keys biased out)
//                and, as a second source, the gathered global keys (each key counted once, as HF does);
//   global pass  the gathered global query rows (qg or q) attend to every real key of (kg, vg) or (k, v).
// Global/padded rows are skipped by the band pass; the global pass writes the global rows afterwards.
#include <algorithm>
#include <cstring>

#include "cpu/common.h"
#include "cpu/flash_tile.h"

namespace etkd::cpu {
namespace {

struct Globals {
  Tensor real;      // (B, S) uint8
  Tensor is_glob;   // (B, S) uint8: global & real
  Tensor idx;       // (B, G) int64 positions of global tokens (slot >= count: never read as a token)
  std::vector<int64_t> count;  // per batch
  int64_t G = 0;
};

// The global-token list comes from the op layer (etkd_kernels.masks.GlobalTokens: built once per call and shared
// by the forward and its backward): mask (B, S) bool restricted to real tokens, index (B, S) int32 with each
// row's global positions first, count (B,) int32. Absent: no global token.
Globals globals_of(const OptTensor& mask, const OptTensor& index, const OptTensor& count, const OptTensor& kpm,
                   int64_t B, int64_t S) {
  TORCH_CHECK(mask.has_value() == index.has_value() && index.has_value() == count.has_value(),
              "global tokens: give all of global_mask, global_index, global_count or none");
  Globals g;
  g.real = real_mask(kpm, B, S);
  g.count.assign(B, 0);
  if (!mask.has_value()) {
    g.is_glob = at::zeros({B, S}, at::kByte);
    g.idx = at::zeros({B, 0}, at::kLong);
    return g;
  }
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == S, "global_mask: expected (", B, ", ", S,
              "), got ", mask->sizes());
  TORCH_CHECK(index->dim() == 2 && index->size(0) == B && index->size(1) == S, "global_index: expected (", B, ", ",
              S, "), got ", index->sizes());
  TORCH_CHECK(count->dim() == 1 && count->size(0) == B, "global_count: expected (", B, "), got ", count->sizes());
  g.is_glob = (mask->to(at::kByte) * g.real).contiguous();
  const Tensor cnt = count->to(at::kLong).contiguous();
  const int64_t* cp = cnt.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cp[b] >= 0 && cp[b] <= S, "global_count: expected 0..", S, ", got ", cp[b]);
    g.count[b] = cp[b];
  }
  g.G = B ? *std::max_element(g.count.begin(), g.count.end()) : 0;
  g.idx = index->narrow(1, 0, g.G).to(at::kLong).contiguous();
  TORCH_CHECK(g.idx.numel() == 0 || (g.idx.min().item<int64_t>() >= 0 && g.idx.max().item<int64_t>() < S),
              "global_index: positions out of range [0, ", S, ")");
  return g;
}

// An optional q-like input as the strided kernels take it (with_rows).
OptTensor rows_opt(const OptTensor& t) { return t.has_value() ? OptTensor(with_rows(*t)) : t; }

// x (B, H, S, D) -> rows at idx: (B, H, G, D).
Tensor gather_rows(const Tensor& x, const Tensor& idx) {
  const auto B = x.size(0), H = x.size(1), D = x.size(3), G = idx.size(1);
  return x.gather(2, idx.view({B, 1, G, 1}).expand({B, H, G, D})).contiguous();
}

// dst[b, h, idx[b, s]] (+)= src[b, h, s] for the valid slots s < count[b]; rows of `row` elements of `dst`'s
// dtype (adding: float32 only); src contiguous, dst's rows at its strides (a row's elements contiguous).
void scatter_rows(const Tensor& dst, const Tensor& src, const Globals& g, int64_t H, int64_t row, bool add) {
  const int64_t B = static_cast<int64_t>(g.count.size());
  const int64_t* ip = g.idx.data_ptr<int64_t>();
  const int64_t es = dst.element_size(), sb = dst.stride(0), sh = dst.stride(1), ss = dst.stride(2);
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && (!add || dst.scalar_type() == at::kFloat),
              "scatter_rows: dtype mismatch");
  char* dp = static_cast<char*>(dst.data_ptr());
  const char* sp = static_cast<const char*>(src.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < g.count[b]; ++s) {
        char* d = dp + (b * sb + h * sh + ip[b * g.G + s] * ss) * es;
        const char* x = sp + ((b * H + h) * g.G + s) * row * es;
        if (add) {
          float* df = reinterpret_cast<float*>(d);
          const float* xf = reinterpret_cast<const float*>(x);
          for (int64_t j = 0; j < row; ++j) df[j] += xf[j];
        } else {
          std::memcpy(d, x, row * es);
        }
      }
}

struct Passes {
  Problem band, glob;
  Tensor band_bias, skip, gbias, kx, vx, real_bias, qrows, gskip;
};

// Everything both passes need, built once per call.
Passes setup(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window, const Globals& g, const Tensor& qg_,
             const Tensor& kg_, const Tensor& vg_, double scale, const Dropout& drop) {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), w = window / 2, G = g.G;
  Passes ps;
  auto usable = g.real * (1 - g.is_glob);  // band keys and band rows: real and not global
  ps.band_bias = bias_from(usable);
  ps.skip = (1 - usable).contiguous();
  Problem& p = ps.band;
  p.B = B, p.H = H, p.Sq = S, p.Sk = S, p.D = D, p.scale = static_cast<float>(scale), p.bq = 64;
  p.elem = elem_of(q);
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.rows.q = row_layout(q), p.rows.k = row_layout(k), p.rows.v = row_layout(v);
  p.w = w;
  p.drop = drop;  // band keys are positions; the gathered global keys' columns are their positions (g.idx)
  if (G > 0) p.drop.xcol = g.idx.data_ptr<int64_t>();
  if (!usable.all().item<bool>()) {  // no padding and no globals: the tile loops skip the bias and skip reads
    p.kbias = ps.band_bias.data_ptr<float>(), p.qskip = ps.skip.data_ptr<uint8_t>();
  }
  if (G > 0) {
    ps.kx = gather_rows(k, g.idx), ps.vx = gather_rows(v, g.idx);
    auto slot = at::arange(G, at::kLong).view({1, G});
    auto cnt = at::tensor(g.count, at::kLong).view({B, 1});
    ps.gbias = bias_from(slot < cnt);
    ps.gskip = (slot >= cnt).to(at::kByte).contiguous();
    p.kx = ps.kx.data_ptr(), p.vx = ps.vx.data_ptr(), p.kxbias = ps.gbias.data_ptr<float>(), p.Sx = G;
  }
  p.segments = [S, w, G](int64_t, int64_t, int64_t i0, int64_t rows, std::vector<Seg>& segs) {
    append_run(segs, std::max<int64_t>(0, i0 - w), std::min<int64_t>(S, i0 + rows + w), 0);
    append_run(segs, 0, G, 1);
  };
  if (G > 0) {
    ps.real_bias = bias_from(g.real);
    ps.qrows = gather_rows(qg_, g.idx);
    Problem& r = ps.glob;
    r.B = B, r.H = H, r.Sq = G, r.Sk = S, r.D = D, r.scale = p.scale, r.bq = 64, r.elem = p.elem;
    r.q = ps.qrows.data_ptr(), r.k = kg_.data_ptr(), r.v = vg_.data_ptr();
    r.rows.k = row_layout(kg_), r.rows.v = row_layout(vg_);
    r.kbias = ps.real_bias.data_ptr<float>(), r.qskip = ps.gskip.data_ptr<uint8_t>();
    r.segments = [S](int64_t, int64_t, int64_t, int64_t, std::vector<Seg>& segs) { append_run(segs, 0, S, 0); };
    r.drop = drop;  // the gathered global rows are rows g.idx of the op
    r.drop.qrow = g.idx.data_ptr<int64_t>();
  }
  return ps;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window, const OptTensor& qg,
                  const OptTensor& kg, const OptTensor& vg) {
  check_float(q, "q", true);
  check_like(k, q, "k", true);
  check_like(v, q, "v", true);
  TORCH_CHECK(window >= 2 && window % 2 == 0, "window: expected an even int >= 2, got ", window);
  TORCH_CHECK(qg.has_value() == kg.has_value() && kg.has_value() == vg.has_value(),
              "global_qkv: give all of qg, kg, vg or none");
  if (qg.has_value()) {
    check_like(*qg, q, "qg", true);
    check_like(*kg, q, "kg", true);
    check_like(*vg, q, "vg", true);
  }
}

// The global tokens and both passes of one call (forward or backward), after the input checks.
struct Call {
  Globals g;
  Passes ps;
  bool sep = false;  // separate global projections (qg, kg, vg)
};
Call prepare(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window, const OptTensor& global_mask,
             const OptTensor& global_index, const OptTensor& global_count, const OptTensor& qg, const OptTensor& kg,
             const OptTensor& vg, const OptTensor& kpm, double scale, double dropout_p, int64_t seed, int64_t offset) {
  check_inputs(q, k, v, window, qg, kg, vg);
  Call c;
  c.g = globals_of(global_mask, global_index, global_count, kpm, q.size(0), q.size(2));
  c.sep = qg.has_value();
  c.ps = setup(q, k, v, window, c.g, c.sep ? *qg : q, c.sep ? *kg : k, c.sep ? *vg : v, scale,
               dropout_of(dropout_p, seed, offset));
  return c;
}

}  // namespace

std::tuple<Tensor, Tensor> sliding_window_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, int64_t window,
                                              const OptTensor& global_mask, const OptTensor& global_index,
                                              const OptTensor& global_count, const OptTensor& qg_, const OptTensor& kg_,
                                              const OptTensor& vg_, const OptTensor& key_padding_mask, double scale,
                                              double dropout_p, int64_t seed, int64_t offset) {
  const Tensor q = with_rows(q_), k = with_rows(k_), v = with_rows(v_);
  const OptTensor qg = rows_opt(qg_), kg = rows_opt(kg_), vg = rows_opt(vg_);
  const auto [g, ps, sep] = prepare(q, k, v, window, global_mask, global_index, global_count, qg, kg, vg,
                                    key_padding_mask, scale, dropout_p, seed, offset);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  auto out = at::empty_like(q);  // in q's layout
  auto lse = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  Problem band = ps.band;
  band.rows.out = row_layout(out);
  run_forward(band, out.data_ptr(), lse.data_ptr<float>());
  if (g.G > 0) {
    auto og = at::empty({B, H, g.G, D}, q.options());
    auto lg = at::empty({B, H, g.G}, lse.options());
    run_forward(ps.glob, og.data_ptr(), lg.data_ptr<float>());
    scatter_rows(out, og, g, H, D, false);
    scatter_rows(lse, lg, g, H, 1, false);
  }
  return {out, lse};
}

std::vector<Tensor> sliding_window_bwd(const Tensor& grad_out_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                       const Tensor& out_, const Tensor& lse, int64_t window,
                                       const OptTensor& global_mask, const OptTensor& global_index,
                                       const OptTensor& global_count, const OptTensor& qg_, const OptTensor& kg_,
                                       const OptTensor& vg_, const OptTensor& key_padding_mask, double scale,
                                       double dropout_p, int64_t seed, int64_t offset) {
  const Tensor q = with_rows(q_), k = with_rows(k_), v = with_rows(v_), grad_out = with_rows(grad_out_),
               out = with_rows(out_);
  const OptTensor qg = rows_opt(qg_), kg = rows_opt(kg_), vg = rows_opt(vg_);
  const auto [g, ps, sep] = prepare(q, k, v, window, global_mask, global_index, global_count, qg, kg, vg,
                                    key_padding_mask, scale, dropout_p, seed, offset);
  const auto dt = q.scalar_type();
  const auto [delta, dq, dk, dv] = backward_start(grad_out, out, q, k, v, lse, true);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  const auto f32 = q.options().dtype(at::kFloat);
  auto cast = [dt](std::vector<Tensor> gs) {
    for (auto& t : gs) t = as_dtype(t, dt);
    return gs;
  };
  // The band pass writes dq, dk, dv, dkx, dvx (backward_start's are uninitialised); the global pass adds.
  Tensor dkx, dvx;
  if (g.G > 0) dkx = at::empty({B, H, g.G, D}, f32), dvx = at::empty({B, H, g.G, D}, f32);
  Problem band = ps.band;
  band.add_grads = false;
  band.rows.dout = row_layout(grad_out), band.rows.dq = row_layout(dq), band.rows.dk = row_layout(dk),
  band.rows.dv = row_layout(dv);
  run_backward(band, grad_out.data_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<float>(),
               dk.data_ptr<float>(), dv.data_ptr<float>(), g.G ? dkx.data_ptr<float>() : nullptr,
               g.G ? dvx.data_ptr<float>() : nullptr);
  if (g.G == 0) {
    if (sep) return cast({dq, dk, dv, at::zeros(q.sizes(), f32), at::zeros(q.sizes(), f32), at::zeros(q.sizes(), f32)});
    return cast({dq, dk, dv});
  }
  scatter_rows(dk, dkx, g, H, D, true);
  scatter_rows(dv, dvx, g, H, D, true);
  // Global rows: gathered dout / lse / delta, gradients into (dqg, dkg, dvg) or back into (dq, dk, dv).
  auto gdo = gather_rows(grad_out, g.idx);
  auto glse = gather_rows(lse.unsqueeze(-1), g.idx);
  auto gdelta = gather_rows(delta.unsqueeze(-1), g.idx);
  auto dqx = at::zeros({B, H, g.G, D}, f32);
  Tensor dqg = sep ? at::zeros(q.sizes(), f32) : dq, dkg = sep ? at::zeros(q.sizes(), f32) : dk,
         dvg = sep ? at::zeros(q.sizes(), f32) : dv;
  Problem glob = ps.glob;  // adds into dkg, dvg (the band pass's dk, dv without separate projections)
  glob.rows.dk = row_layout(dkg), glob.rows.dv = row_layout(dvg);
  run_backward(glob, gdo.data_ptr(), glse.data_ptr<float>(), gdelta.data_ptr<float>(), dqx.data_ptr<float>(),
               dkg.data_ptr<float>(), dvg.data_ptr<float>(), nullptr, nullptr);
  scatter_rows(dqg, dqx, g, H, D, true);
  if (sep) return cast({dq, dk, dv, dqg, dkg, dvg});
  return cast({dq, dk, dv});
}

}  // namespace etkd::cpu
