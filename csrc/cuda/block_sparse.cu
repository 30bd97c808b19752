// Block-sparse attention, forward and backward: exact softmax over the key blocks a block layout allows,
// read from a look-up table (LUT) of key blocks per query block that the Python module builds once.
//
// Grid = (nqb * ceil(block_size / BM), batch * heads); what each CTA visits is tile_index.h's BlockPattern.
// Block sizes smaller than the tile waste the rest of the tile (masked columns); tiles never straddle two
// blocks, so the LUT of one query block is all a CTA needs.
#include "cuda/kernels.h"

namespace etkd {
namespace cuda {
namespace {

using namespace detail;
namespace ti = etkd::tile;

template <int BM, int BN>
__device__ __forceinline__ ti::BlockPattern<BM, BN> make_pattern(const BlockSparseArgs& a, int b) {
  return ti::BlockPattern<BM, BN>(b, blockIdx.y % a.shape.heads, blockIdx.x, a.block_size, a.shape.seq,
                                  a.key_padding_mask,
                                  ti::BlockLut{a.lut, a.lut_count, a.heads_lut, a.nqb, a.max_nnz});
}

// The CTA's pattern and its (batch, head)'s q, k, v, handed to `f` (both passes).
template <class I, int BM, int BN, class F>
__device__ __forceinline__ void with_pattern(const BlockSparseArgs& a, const HeadOffsets& o, F&& f) {
  using T = typename I::T;
  f(make_pattern<BM, BN>(a, o.b), static_cast<const T*>(a.q) + o.off, static_cast<const T*>(a.k) + o.off,
    static_cast<const T*>(a.v) + o.off);
}

template <class I>
__global__ void __launch_bounds__(kThreads, kMinBlocks) bs_fwd_kernel(const BlockSparseFwdParams p) {
  using T = typename I::T;
  const HeadOffsets o = head_offsets(p.args.shape);
  with_pattern<I, I::Fwd::BM, I::Fwd::BN>(p.args, o, [&](const auto& pat, const T* q, const T* k, const T* v) {
    attn_fwd_tile<I>(pat, q, k, v, static_cast<T*>(p.out) + o.off, p.lse + o.lse_off, p.args.shape);
  });
}

template <class I>
__global__ void __launch_bounds__(kThreads, kMinBlocks) bs_bwd_kernel(const BlockSparseBwdParams p) {
  using T = typename I::T;
  const HeadOffsets o = head_offsets(p.args.shape);
  with_pattern<I, I::Bwd::BM, I::Bwd::BN>(p.args, o, [&](const auto& pat, const T* q, const T* k, const T* v) {
    attn_bwd_tile<I>(pat, q, k, v, static_cast<const T*>(p.out) + o.off, static_cast<const T*>(p.grad_out) + o.off,
                     p.lse + o.lse_off, p.dq + o.off, p.dk + o.off, p.dv + o.off, p.args.shape);
  });
}

cudaError_t check_args(const BlockSparseArgs& a) {
  const AttnShape& s = a.shape;
  if (cudaError_t e = check_shape(s); e != cudaSuccess) return e;
  if (a.block_size <= 0 || a.nqb <= 0 || s.seq != a.nqb * a.block_size) return cudaErrorInvalidValue;
  if (a.heads_lut != 1 && a.heads_lut != s.heads) return cudaErrorInvalidValue;
  if (a.lut == nullptr || a.lut_count == nullptr || a.max_nnz < 0) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <int BM>
dim3 grid_for(const BlockSparseArgs& a) {
  return dim3(ti::BlockPattern<BM, 0>::num_ctas(a.nqb, a.block_size), a.shape.batch * a.shape.heads);
}

// One launcher for both passes: check, pick the instance, launch the pass's kernel on its grid.
template <bool kBwd, class Params>
cudaError_t run(const Params& p, cudaStream_t stream) {
  if (cudaError_t e = check_args(p.args); e != cudaSuccess) return e;
  return dispatch(p.args.shape, [&](auto inst) -> cudaError_t {
    using I = decltype(inst);
    if constexpr (kBwd) {
      return launch(bs_bwd_kernel<I>, I::kBwdSmem, grid_for<I::Bwd::BM>(p.args), stream, p);
    } else {
      return launch(bs_fwd_kernel<I>, I::kFwdSmem, grid_for<I::Fwd::BM>(p.args), stream, p);
    }
  });
}

}  // namespace

cudaError_t block_sparse_fwd(const BlockSparseFwdParams& p, cudaStream_t stream) { return run<false>(p, stream); }

cudaError_t block_sparse_bwd(const BlockSparseBwdParams& p, cudaStream_t stream) { return run<true>(p, stream); }

}  // namespace cuda
}  // namespace etkd
