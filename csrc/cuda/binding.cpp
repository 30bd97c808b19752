// Thin torch binding of the fused CUDA kernels: checks tensors, fills the params structs of kernels.h,
// launches on the current stream and registers the ops in the `etkd_cuda` library. Built only with a
// CUDA torch (setup.py); the kernels themselves (.cu) include no torch header.
//
// The argument checks that the public op already does (rank, window parity, layout size...) are
// repeated here only where a wrong value would make a kernel read out of bounds.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/kernels.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif

namespace {

using at::Tensor;
using etkd::cuda::DType;
using OptTensor = std::optional<Tensor>;

DType dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": q must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

// Contiguous and 16-byte aligned (the kernels load rows as 16-byte vectors).
Tensor prepared(const Tensor& t) {
  Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

Tensor check_like(const Tensor& t, const Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), ", q on ", q.device());
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have shape ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must be ", q.scalar_type(), ", got ",
              t.scalar_type());
  return prepared(t);
}

// Dropout on P from the op's (p, seed, offset) (csrc/common/philox.h); p == 0: the dropout-free kernels.
etkd::rng::Dropout dropout_of(double p, int64_t seed, int64_t offset, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2**63), got ", seed);
  return etkd::rng::make_dropout(p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

std::string head_dims_text() {
  std::string text;
  for (int h : etkd::cuda::kHeadDims) text += (text.empty() ? "" : ", ") + std::to_string(h);
  return text;
}

etkd::cuda::AttnShape shape_of(const Tensor& q, double scale, const etkd::rng::Dropout& dropout, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  TORCH_CHECK(q.dim() == 4, op, ": q must be (batch, heads, seq, head_dim), got ", q.sizes());
  const int64_t d = q.size(3);
  TORCH_CHECK(etkd::cuda::head_dim_supported(d), op, ": head_dim must be one of ", head_dims_text(), ", got ", d);
  TORCH_CHECK(q.size(0) * q.size(1) <= etkd::cuda::kMaxBatchHeads, op, ": batch * heads must be <= ",
              etkd::cuda::kMaxBatchHeads, ", got ", q.size(0) * q.size(1));
  TORCH_CHECK(q.size(2) <= etkd::cuda::kMaxSeq, op, ": seq must be <= ", etkd::cuda::kMaxSeq, ", got ", q.size(2));
  etkd::cuda::AttnShape s{};
  s.dtype = dtype_of(q, op);
  s.batch = static_cast<int>(q.size(0));
  s.heads = static_cast<int>(q.size(1));
  s.seq = static_cast<int>(q.size(2));
  s.head_dim = static_cast<int>(d);
  // Every (B, H, S, D) tensor is made contiguous, so they all share these strides.
  s.stride_b = q.size(1) * q.size(2) * d;
  s.stride_h = q.size(2) * d;
  s.stride_s = d;
  s.scale = static_cast<float>(scale);
  s.dropout = dropout;
  return s;
}

std::optional<Tensor> check_mask(const OptTensor& m, const Tensor& q, const char* op, const char* name) {
  if (!m.has_value() || !m->defined()) return std::nullopt;
  TORCH_CHECK(m->is_cuda() && m->device() == q.device(), op, ": ", name, " must be on ", q.device());
  TORCH_CHECK(m->scalar_type() == at::kBool, op, ": ", name, " must be bool, got ", m->scalar_type());
  TORCH_CHECK(m->dim() == 2 && m->size(0) == q.size(0) && m->size(1) == q.size(2), op, ": ", name,
              " must be (batch, seq) = (", q.size(0), ", ", q.size(2), "), got ", m->sizes());
  return m->contiguous();
}

void check_lse(const Tensor& lse, const Tensor& q, const char* op) {
  TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat, op, ": lse must be a float32 CUDA tensor");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must be (batch, heads, seq), got ", lse.sizes());
}

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(e),
              e == cudaErrorInvalidConfiguration ? " (not enough shared memory on this GPU for the tile)" : "");
}

// float32 workspace the kernels accumulate into (dK/dV with atomics), zero-initialised.
Tensor workspace(const Tensor& q) { return at::zeros(q.sizes(), q.options().dtype(at::kFloat)); }

Tensor as_input_dtype(const Tensor& w, const Tensor& q) { return w.scalar_type() == q.scalar_type() ? w : w.to(q.scalar_type()); }

// (out, lse) of a forward: out like the prepared q (every row is written by exactly one CTA), lse float32
// (B, H, S); `launch` (sliding_window_fwd, block_sparse_fwd) runs on the current stream unless q is empty.
template <class Params, class Args, class Launch>
std::tuple<Tensor, Tensor> run_forward(const Tensor& q, const Tensor& q_prepared, const Args& args, Launch launch,
                                       const char* op) {
  Tensor out = at::empty_like(q_prepared);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  Params p{};
  p.args = args;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(launch(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {out, lse};
}

// A backward launch: the saved tensors checked and prepared, the float32 gradient workspaces, and the params
// pointing at them (the tensors live here until the launch is done).
template <class Params>
struct Backward {
  Tensor dout, out, lse, dq, dk, dv;
  Params p{};
};

template <class Params, class Args>
Backward<Params> backward_of(const Args& args, const Tensor& grad_out, const Tensor& q, const Tensor& out,
                             const Tensor& lse, const char* op) {
  const Tensor dout = check_like(grad_out, q, op, "grad_out");
  const Tensor o = check_like(out, q, op, "out");
  check_lse(lse, q, op);
  const Tensor lse_c = lse.contiguous();
  Tensor dq = workspace(q), dk = workspace(q), dv = workspace(q);
  Params p{};
  p.args = args;
  p.grad_out = dout.data_ptr();
  p.out = o.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  return {dout, o, lse_c, dq, dk, dv, p};
}

// ---- sliding window -------------------------------------------------------------------------------------

struct SlidingWindowInputs {
  etkd::cuda::SlidingWindowArgs args{};
  Tensor q, k, v, qg, kg, vg;
  std::optional<Tensor> kpm, gm;
  Tensor gidx, gcount;  // keep the compact global list alive during the launch
  bool separate_global = false;
};

SlidingWindowInputs sliding_window_inputs(const Tensor& q_, const Tensor& k_, const Tensor& v_, int64_t window,
                                          const OptTensor& global_mask, const OptTensor& qg_, const OptTensor& kg_,
                                          const OptTensor& vg_, const OptTensor& key_padding_mask, double scale,
                                          const etkd::rng::Dropout& dropout, const char* op) {
  SlidingWindowInputs in;
  in.args.shape = shape_of(q_, scale, dropout, op);
  TORCH_CHECK(window >= 0 && window % 2 == 0, op, ": window must be a non-negative even int, got ", window);
  in.args.half = static_cast<int>(window / 2);
  in.q = prepared(q_);
  in.k = check_like(k_, q_, op, "k");
  in.v = check_like(v_, q_, op, "v");
  const bool has_qg = qg_.has_value() && qg_->defined();
  TORCH_CHECK(has_qg == (kg_.has_value() && kg_->defined()) && has_qg == (vg_.has_value() && vg_->defined()), op,
              ": qg, kg, vg must be given together");
  in.separate_global = has_qg;
  in.qg = has_qg ? check_like(*qg_, q_, op, "qg") : in.q;
  in.kg = has_qg ? check_like(*kg_, q_, op, "kg") : in.k;
  in.vg = has_qg ? check_like(*vg_, q_, op, "vg") : in.v;
  in.kpm = check_mask(key_padding_mask, q_, op, "key_padding_mask");
  in.gm = check_mask(global_mask, q_, op, "global_mask");

  auto& a = in.args;
  a.q = in.q.data_ptr();
  a.k = in.k.data_ptr();
  a.v = in.v.data_ptr();
  a.qg = in.qg.data_ptr();
  a.kg = in.kg.data_ptr();
  a.vg = in.vg.data_ptr();
  a.key_padding_mask = in.kpm ? in.kpm->data_ptr<bool>() : nullptr;
  a.global_mask = nullptr;
  a.max_global = 0;
  if (in.gm && in.gm->numel() > 0) {
    // Compact list of global positions per batch row: stable sort puts the globals first, in order. The
    // list is as wide as the sequence: its true width (the largest count) would be a device-to-host read,
    // a synchronisation per call. CTAs past a batch row's count find no live row and return at once.
    // (Same construction as etkd_kernels.masks.GlobalTokens, which the triton backend uses.)
    in.gcount = in.gm->sum(1, /*keepdim=*/false, at::kInt).contiguous();
    in.gidx = at::argsort(in.gm->logical_not().to(at::kChar), /*stable=*/true, /*dim=*/1, /*descending=*/false)
                  .to(at::kInt)
                  .contiguous();
    a.global_mask = in.gm->data_ptr<bool>();
    a.global_idx = in.gidx.data_ptr<int>();
    a.global_count = in.gcount.data_ptr<int>();
    a.max_global = static_cast<int>(q_.size(2));
  }
  return in;
}

std::tuple<Tensor, Tensor> sliding_window_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window,
                                              const OptTensor& global_mask, const OptTensor& qg, const OptTensor& kg,
                                              const OptTensor& vg, const OptTensor& key_padding_mask, double scale,
                                              double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "etkd_cuda.sliding_window_fwd";
  const c10::cuda::CUDAGuard guard(q.device());
  SlidingWindowInputs in = sliding_window_inputs(q, k, v, window, global_mask, qg, kg, vg, key_padding_mask, scale,
                                                 dropout_of(dropout_p, seed, offset, op), op);
  return run_forward<etkd::cuda::SlidingWindowFwdParams>(q, in.q, in.args, etkd::cuda::sliding_window_fwd, op);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sliding_window_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    int64_t window, const OptTensor& global_mask, const OptTensor& qg, const OptTensor& kg, const OptTensor& vg,
    const OptTensor& key_padding_mask, double scale, double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "etkd_cuda.sliding_window_bwd";
  const c10::cuda::CUDAGuard guard(q.device());
  SlidingWindowInputs in = sliding_window_inputs(q, k, v, window, global_mask, qg, kg, vg, key_padding_mask, scale,
                                                 dropout_of(dropout_p, seed, offset, op), op);
  auto bw = backward_of<etkd::cuda::SlidingWindowBwdParams>(in.args, grad_out, q, out, lse, op);
  auto& p = bw.p;
  Tensor dqg, dkg, dvg;
  if (in.separate_global) {
    dqg = workspace(q);
    dkg = workspace(q);
    dvg = workspace(q);
  }
  const bool empty = q.numel() == 0;
  // Without separate projections the global rows' gradients land in dq/dk/dv (disjoint dq rows; dk/dv
  // are atomic adds, so sharing is safe).
  p.dqg = in.separate_global ? dqg.data_ptr<float>() : p.dq;
  p.dkg = in.separate_global ? dkg.data_ptr<float>() : p.dk;
  p.dvg = in.separate_global ? dvg.data_ptr<float>() : p.dv;
  if (!empty) check_launch(etkd::cuda::sliding_window_bwd(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  // Schemas cannot return None in a tuple of Tensors: absent global grads are empty tensors, which the
  // Python module turns back into None.
  const Tensor none = at::empty({0}, q.options());
  return {as_input_dtype(bw.dq, q),
          as_input_dtype(bw.dk, q),
          as_input_dtype(bw.dv, q),
          in.separate_global ? as_input_dtype(dqg, q) : none,
          in.separate_global ? as_input_dtype(dkg, q) : none,
          in.separate_global ? as_input_dtype(dvg, q) : none};
}

// ---- block sparse ---------------------------------------------------------------------------------------

struct BlockSparseInputs {
  etkd::cuda::BlockSparseArgs args{};
  Tensor q, k, v, lut, count;
  std::optional<Tensor> kpm;
};

BlockSparseInputs block_sparse_inputs(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& lut,
                                      const Tensor& lut_count, int64_t block_size, const OptTensor& key_padding_mask,
                                      double scale, const etkd::rng::Dropout& dropout, const char* op) {
  BlockSparseInputs in;
  in.args.shape = shape_of(q_, scale, dropout, op);
  TORCH_CHECK(block_size > 0 && q_.size(2) > 0 && q_.size(2) % block_size == 0, op, ": seq (", q_.size(2),
              ") must be a positive multiple of block_size (", block_size, ")");
  const int64_t nqb = q_.size(2) / block_size;
  TORCH_CHECK(lut.is_cuda() && lut.scalar_type() == at::kInt && lut.dim() == 3, op,
              ": lut must be an int32 CUDA tensor (heads_lut, nqb, max_nnz), got ", lut.sizes());
  TORCH_CHECK(lut.size(0) == 1 || lut.size(0) == q_.size(1), op, ": lut heads must be 1 or ", q_.size(1));
  TORCH_CHECK(lut.size(1) == nqb, op, ": lut must have ", nqb, " query blocks, got ", lut.size(1));
  TORCH_CHECK(lut_count.is_cuda() && lut_count.scalar_type() == at::kInt && lut_count.dim() == 2 &&
                  lut_count.size(0) == lut.size(0) && lut_count.size(1) == nqb,
              op, ": lut_count must be int32 (heads_lut, nqb), got ", lut_count.sizes());
  in.q = prepared(q_);
  in.k = check_like(k_, q_, op, "k");
  in.v = check_like(v_, q_, op, "v");
  in.lut = lut.contiguous();
  in.count = lut_count.contiguous();
  in.kpm = check_mask(key_padding_mask, q_, op, "key_padding_mask");
  auto& a = in.args;
  a.block_size = static_cast<int>(block_size);
  a.q = in.q.data_ptr();
  a.k = in.k.data_ptr();
  a.v = in.v.data_ptr();
  a.key_padding_mask = in.kpm ? in.kpm->data_ptr<bool>() : nullptr;
  a.lut = in.lut.data_ptr<int>();
  a.lut_count = in.count.data_ptr<int>();
  a.heads_lut = static_cast<int>(lut.size(0));
  a.nqb = static_cast<int>(nqb);
  a.max_nnz = static_cast<int>(lut.size(2));
  return in;
}

std::tuple<Tensor, Tensor> block_sparse_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lut,
                                            const Tensor& lut_count, int64_t block_size,
                                            const OptTensor& key_padding_mask, double scale, double dropout_p,
                                            int64_t seed, int64_t offset) {
  const char* op = "etkd_cuda.block_sparse_fwd";
  const c10::cuda::CUDAGuard guard(q.device());
  BlockSparseInputs in = block_sparse_inputs(q, k, v, lut, lut_count, block_size, key_padding_mask, scale,
                                             dropout_of(dropout_p, seed, offset, op), op);
  return run_forward<etkd::cuda::BlockSparseFwdParams>(q, in.q, in.args, etkd::cuda::block_sparse_fwd, op);
}

std::tuple<Tensor, Tensor, Tensor> block_sparse_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& out, const Tensor& lse,
                                                    const Tensor& lut, const Tensor& lut_count, int64_t block_size,
                                                    const OptTensor& key_padding_mask, double scale,
                                                    double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "etkd_cuda.block_sparse_bwd";
  const c10::cuda::CUDAGuard guard(q.device());
  BlockSparseInputs in = block_sparse_inputs(q, k, v, lut, lut_count, block_size, key_padding_mask, scale,
                                             dropout_of(dropout_p, seed, offset, op), op);
  const auto bw = backward_of<etkd::cuda::BlockSparseBwdParams>(in.args, grad_out, q, out, lse, op);
  if (q.numel() != 0) check_launch(etkd::cuda::block_sparse_bwd(bw.p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {as_input_dtype(bw.dq, q), as_input_dtype(bw.dk, q), as_input_dtype(bw.dv, q)};
}

}  // namespace

TORCH_LIBRARY(etkd_cuda, m) {
  m.def(
      "sliding_window_fwd(Tensor q, Tensor k, Tensor v, int window, Tensor? global_mask, Tensor? qg, "
      "Tensor? kg, Tensor? vg, Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset) "
      "-> (Tensor, Tensor)");
  m.def(
      "sliding_window_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, "
      "Tensor? global_mask, Tensor? qg, Tensor? kg, Tensor? vg, Tensor? key_padding_mask, float scale, "
      "float dropout_p, int seed, int offset) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor lut, Tensor lut_count, int block_size, "
      "Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lut, "
      "Tensor lut_count, int block_size, Tensor? key_padding_mask, float scale, float dropout_p, int seed, "
      "int offset) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(etkd_cuda, CUDA, m) {
  m.impl("sliding_window_fwd", &sliding_window_fwd);
  m.impl("sliding_window_bwd", &sliding_window_bwd);
  m.impl("block_sparse_fwd", &block_sparse_fwd);
  m.impl("block_sparse_bwd", &block_sparse_bwd);
}

// `import etkd_kernels._C_cuda` runs the registrations above; the ops are then torch.ops.etkd_cuda.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "etkd fused CUDA kernels (ops in torch.ops.etkd_cuda)"; }
