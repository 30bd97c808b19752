// Block-sparse attention, forward and backward: exact softmax over the key blocks a block layout allows,
// read from a look-up table (LUT) of key blocks per query block that the Python module builds once.
//
// Grid = (nqb * ceil(block_size / BM), batch * heads): CTA x owns query sub-tile x % qsub of query block
// x / qsub and walks, for every LUT entry, the ceil(block_size / BN) key tiles of that key block.
// Block sizes smaller than the tile waste the rest of the tile (masked columns); tiles never straddle two
// blocks, so the LUT of one query block is all a CTA needs.
#include "cuda/kernels.h"

namespace etkd {
namespace cuda {
namespace {

using namespace detail;
namespace ti = etkd::tile;

template <int BM, int BN>
struct BlockPattern {
  int b, h, qb, sub, block_size, seq, k_sub;
  const bool* kpm;
  ti::BlockLut lut;

  __device__ int row(int r) const {
    const ti::Span s = ti::block_sub_span(qb, sub, BM, block_size);
    const int i = s.begin + r;
    return i < s.end ? i : -1;
  }
  __device__ bool row_live(int i) const { return ti::is_real(kpm, b, i, seq); }
  __device__ int num_iters() const { return lut.size(h, qb) * k_sub; }
  __device__ int col(int it, int c) const {
    const ti::Span s = ti::block_sub_span(lut.at(h, qb, it / k_sub), it % k_sub, BN, block_size);
    const int j = s.begin + c;
    return (j < s.end && ti::is_real(kpm, b, j, seq)) ? j : -1;
  }
  __device__ bool dense(int) const { return true; }
  __device__ bool visible(int, int, int) const { return true; }
};

template <int BM, int BN>
__device__ __forceinline__ BlockPattern<BM, BN> make_pattern(const BlockSparseArgs& a) {
  const int q_sub = ti::sub_tiles(a.block_size, BM);
  BlockPattern<BM, BN> pat;
  pat.b = blockIdx.y / a.shape.heads;
  pat.h = blockIdx.y % a.shape.heads;
  pat.qb = blockIdx.x / q_sub;
  pat.sub = blockIdx.x % q_sub;
  pat.block_size = a.block_size;
  pat.seq = a.shape.seq;
  pat.k_sub = ti::sub_tiles(a.block_size, BN);
  pat.kpm = a.key_padding_mask;
  pat.lut = ti::BlockLut{a.lut, a.lut_count, a.heads_lut, a.nqb, a.max_nnz};
  return pat;
}

__device__ __forceinline__ int64_t bh_offset(const AttnShape& s) {
  return static_cast<int64_t>(blockIdx.y / s.heads) * s.stride_b +
         static_cast<int64_t>(blockIdx.y % s.heads) * s.stride_h;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bs_fwd_kernel(const BlockSparseFwdParams p) {
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
__global__ void __launch_bounds__(kThreads) bs_bwd_kernel(const BlockSparseBwdParams p) {
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

dim3 grid_for(const BlockSparseArgs& a, int BM) {
  return dim3(a.nqb * ti::sub_tiles(a.block_size, BM), a.shape.batch * a.shape.heads);
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
    bs_fwd_kernel<T, D><<<grid_for(p.args, Tl::BM), kThreads, smem, stream>>>(p);
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
    bs_bwd_kernel<T, D><<<grid_for(p.args, Tl::BM), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace etkd
