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
__device__ __forceinline__ ti::BlockPattern<BM, BN> make_pattern(const BlockSparseArgs& a) {
  return ti::BlockPattern<BM, BN>(blockIdx.y / a.shape.heads, blockIdx.y % a.shape.heads, blockIdx.x, a.block_size,
                                  a.shape.seq, a.key_padding_mask,
                                  ti::BlockLut{a.lut, a.lut_count, a.heads_lut, a.nqb, a.max_nnz});
}

__device__ __forceinline__ int64_t bh_offset(const AttnShape& s) {
  return static_cast<int64_t>(blockIdx.y / s.heads) * s.stride_b +
         static_cast<int64_t>(blockIdx.y % s.heads) * s.stride_h;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) bs_fwd_kernel(const BlockSparseFwdParams p) {
  constexpr int BM = FwdTiles<T, D>::BM, BN = FwdTiles<T, D>::BN;
  const BlockSparseArgs& a = p.args;
  const int64_t off = bh_offset(a.shape);
  const auto pat = make_pattern<BM, BN>(a);
  attn_fwd_tile<T, D, BM, BN>(pat, static_cast<const T*>(a.q) + off, static_cast<const T*>(a.k) + off,
                              static_cast<const T*>(a.v) + off, static_cast<T*>(p.out) + off,
                              p.lse + static_cast<int64_t>(blockIdx.y) * a.shape.seq, a.shape.stride_s,
                              a.shape.scale);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) bs_bwd_kernel(const BlockSparseBwdParams p) {
  constexpr int BM = BwdTiles<T, D>::BM, BN = BwdTiles<T, D>::BN;
  const BlockSparseArgs& a = p.args;
  const int64_t off = bh_offset(a.shape);
  const auto pat = make_pattern<BM, BN>(a);
  attn_bwd_tile<T, D, BM, BN>(pat, static_cast<const T*>(a.q) + off, static_cast<const T*>(a.k) + off,
                              static_cast<const T*>(a.v) + off, static_cast<const T*>(p.out) + off,
                              static_cast<const T*>(p.grad_out) + off,
                              p.lse + static_cast<int64_t>(blockIdx.y) * a.shape.seq, p.dq + off, p.dk + off,
                              p.dv + off, a.shape.stride_s, a.shape.scale);
}

cudaError_t check_args(const BlockSparseArgs& a) {
  const AttnShape& s = a.shape;
  if (s.batch <= 0 || s.heads <= 0 || a.block_size <= 0 || a.nqb <= 0) return cudaErrorInvalidValue;
  if (s.seq != a.nqb * a.block_size) return cudaErrorInvalidValue;
  if (a.heads_lut != 1 && a.heads_lut != s.heads) return cudaErrorInvalidValue;
  if (a.lut == nullptr || a.lut_count == nullptr || a.max_nnz < 0) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(s.batch) * s.heads > 65535) return cudaErrorInvalidConfiguration;  // grid.y
  return cudaSuccess;
}

template <int BM>
dim3 grid_for(const BlockSparseArgs& a) {
  return dim3(ti::BlockPattern<BM, 0>::num_ctas(a.nqb, a.block_size), a.shape.batch * a.shape.heads);
}

}  // namespace

cudaError_t block_sparse_fwd(const BlockSparseFwdParams& p, cudaStream_t stream) {
  if (cudaError_t e = check_args(p.args); e != cudaSuccess) return e;
  return dispatch(p.args.shape.dtype, p.args.shape.head_dim, [&](auto inst) -> cudaError_t {
    using T = typename decltype(inst)::T;
    constexpr int D = decltype(inst)::D;
    using Tl = FwdTiles<T, D>;
    constexpr int smem = FwdLayout<T, D, Tl::BM, Tl::BN>::kBytes;
    if (cudaError_t e = prepare_smem(bs_fwd_kernel<T, D>, smem); e != cudaSuccess) return e;
    bs_fwd_kernel<T, D><<<grid_for<Tl::BM>(p.args), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t block_sparse_bwd(const BlockSparseBwdParams& p, cudaStream_t stream) {
  if (cudaError_t e = check_args(p.args); e != cudaSuccess) return e;
  return dispatch(p.args.shape.dtype, p.args.shape.head_dim, [&](auto inst) -> cudaError_t {
    using T = typename decltype(inst)::T;
    constexpr int D = decltype(inst)::D;
    using Tl = BwdTiles<T, D>;
    constexpr int smem = BwdLayout<T, D, Tl::BM, Tl::BN>::kBytes;
    if (cudaError_t e = prepare_smem(bs_bwd_kernel<T, D>, smem); e != cudaSuccess) return e;
    bs_bwd_kernel<T, D><<<grid_for<Tl::BM>(p.args), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace etkd
