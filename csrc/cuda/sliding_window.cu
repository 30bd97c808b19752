// Sliding-window (Longformer) attention, forward and backward. FlashAttention-2 style tiles from the
// engine in kernels.h, driven by the patterns of csrc/common/tile_index.h (BandPattern, GlobalRowsPattern).
//
// One launch covers both kinds of query rows. Grid = (n_band_tiles + n_global_tiles, batch * heads):
//  * band CTAs (x < n_band_tiles) own the non-global rows of query tile x; they visit the key tiles of
//    the band (tile_index.h: band_key_tiles), then the compact list of global keys in tiles of BN,
//    taking from that list only keys outside the band so each key is counted once;
//  * global CTAs own BM consecutive entries of the batch's global-token list and visit every key tile
//    with the global projections (qg, kg, vg).
// Each output row is written by exactly one CTA, so the two kinds never race.
#include "cuda/kernels.h"

namespace etkd {
namespace cuda {
namespace {

using namespace detail;
namespace ti = etkd::tile;

using ti::BandPattern;
using ti::GlobalRowsPattern;

struct Offsets {
  int b, h;
  int64_t off;  // element offset of (b, h) in a (B, H, S, D) tensor
  int64_t lse_off;
};

__device__ __forceinline__ Offsets offsets(const AttnShape& s) {
  Offsets o;
  o.b = blockIdx.y / s.heads;
  o.h = blockIdx.y % s.heads;
  o.off = o.b * s.stride_b + o.h * s.stride_h;
  o.lse_off = static_cast<int64_t>(blockIdx.y) * s.seq;
  return o;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) sw_fwd_kernel(const SlidingWindowFwdParams p, int n_band_tiles) {
  constexpr int BM = FwdTiles<T, D>::BM, BN = FwdTiles<T, D>::BN;
  const SlidingWindowArgs& a = p.args;
  const Offsets o = offsets(a.shape);
  const ti::GlobalList globals{a.global_idx, a.global_count, a.max_global};
  T* out = static_cast<T*>(p.out) + o.off;
  float* lse = p.lse + o.lse_off;
  const int64_t ss = a.shape.stride_s;
  if (static_cast<int>(blockIdx.x) < n_band_tiles) {
    const BandPattern<BM, BN> pat(o.b, blockIdx.x, a.shape.seq, a.half, a.key_padding_mask, a.global_mask,
                                  globals);
    attn_fwd_tile<T, D, BM, BN>(pat, static_cast<const T*>(a.q) + o.off, static_cast<const T*>(a.k) + o.off,
                                static_cast<const T*>(a.v) + o.off, out, lse, ss, a.shape.scale);
  } else {
    const GlobalRowsPattern<BM, BN> pat{o.b, static_cast<int>(blockIdx.x) - n_band_tiles, a.shape.seq,
                                        a.key_padding_mask, globals};
    attn_fwd_tile<T, D, BM, BN>(pat, static_cast<const T*>(a.qg) + o.off, static_cast<const T*>(a.kg) + o.off,
                                static_cast<const T*>(a.vg) + o.off, out, lse, ss, a.shape.scale);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) sw_bwd_kernel(const SlidingWindowBwdParams p, int n_band_tiles) {
  constexpr int BM = BwdTiles<T, D>::BM, BN = BwdTiles<T, D>::BN;
  const SlidingWindowArgs& a = p.args;
  const Offsets o = offsets(a.shape);
  const ti::GlobalList globals{a.global_idx, a.global_count, a.max_global};
  const T* out = static_cast<const T*>(p.out) + o.off;
  const T* dout = static_cast<const T*>(p.grad_out) + o.off;
  const float* lse = p.lse + o.lse_off;
  const int64_t ss = a.shape.stride_s;
  if (static_cast<int>(blockIdx.x) < n_band_tiles) {
    const BandPattern<BM, BN> pat(o.b, blockIdx.x, a.shape.seq, a.half, a.key_padding_mask, a.global_mask,
                                  globals);
    attn_bwd_tile<T, D, BM, BN>(pat, static_cast<const T*>(a.q) + o.off, static_cast<const T*>(a.k) + o.off,
                                static_cast<const T*>(a.v) + o.off, out, dout, lse, p.dq + o.off,
                                p.dk + o.off, p.dv + o.off, ss, a.shape.scale);
  } else {
    const GlobalRowsPattern<BM, BN> pat{o.b, static_cast<int>(blockIdx.x) - n_band_tiles, a.shape.seq,
                                        a.key_padding_mask, globals};
    attn_bwd_tile<T, D, BM, BN>(pat, static_cast<const T*>(a.qg) + o.off, static_cast<const T*>(a.kg) + o.off,
                                static_cast<const T*>(a.vg) + o.off, out, dout, lse, p.dqg + o.off,
                                p.dkg + o.off, p.dvg + o.off, ss, a.shape.scale);
  }
}

cudaError_t check_args(const SlidingWindowArgs& a) {
  const AttnShape& s = a.shape;
  if (s.batch <= 0 || s.heads <= 0 || s.seq <= 0 || a.half < 0) return cudaErrorInvalidValue;
  if (a.max_global > 0 && (a.global_idx == nullptr || a.global_count == nullptr || a.global_mask == nullptr))
    return cudaErrorInvalidValue;
  if (static_cast<int64_t>(s.batch) * s.heads > 65535) return cudaErrorInvalidConfiguration;  // grid.y
  return cudaSuccess;
}

template <int BM>
dim3 grid_for(const SlidingWindowArgs& a, int* n_band_tiles) {
  *n_band_tiles = BandPattern<BM, 0>::num_ctas(a.shape.seq);
  return dim3(*n_band_tiles + GlobalRowsPattern<BM, 0>::num_ctas(a.max_global), a.shape.batch * a.shape.heads);
}

}  // namespace

cudaError_t sliding_window_fwd(const SlidingWindowFwdParams& p, cudaStream_t stream) {
  if (cudaError_t e = check_args(p.args); e != cudaSuccess) return e;
  return dispatch(p.args.shape.dtype, p.args.shape.head_dim, [&](auto inst) -> cudaError_t {
    using T = typename decltype(inst)::T;
    constexpr int D = decltype(inst)::D;
    using Tl = FwdTiles<T, D>;
    constexpr int smem = FwdLayout<T, D, Tl::BM, Tl::BN>::kBytes;
    if (cudaError_t e = prepare_smem(sw_fwd_kernel<T, D>, smem); e != cudaSuccess) return e;
    int n_band = 0;
    const dim3 grid = grid_for<Tl::BM>(p.args, &n_band);
    sw_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p, n_band);
    return cudaGetLastError();
  });
}

cudaError_t sliding_window_bwd(const SlidingWindowBwdParams& p, cudaStream_t stream) {
  if (cudaError_t e = check_args(p.args); e != cudaSuccess) return e;
  return dispatch(p.args.shape.dtype, p.args.shape.head_dim, [&](auto inst) -> cudaError_t {
    using T = typename decltype(inst)::T;
    constexpr int D = decltype(inst)::D;
    using Tl = BwdTiles<T, D>;
    constexpr int smem = BwdLayout<T, D, Tl::BM, Tl::BN>::kBytes;
    if (cudaError_t e = prepare_smem(sw_bwd_kernel<T, D>, smem); e != cudaSuccess) return e;
    int n_band = 0;
    const dim3 grid = grid_for<Tl::BM>(p.args, &n_band);
    sw_bwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(p, n_band);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace etkd
