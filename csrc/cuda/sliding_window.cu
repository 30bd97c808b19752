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

// Calls run(pattern, q, k, v, global) with this CTA's pattern and projections: a band CTA (x < n_band_tiles)
// the band pattern and q/k/v, a global CTA the global-rows pattern and qg/kg/vg.
template <typename T, int BM, int BN, class Run>
__device__ __forceinline__ void with_pattern(const SlidingWindowArgs& a, int b, int n_band_tiles, Run&& run) {
  const ti::GlobalList globals{a.global_idx, a.global_count, a.max_global};
  const int64_t off = head_offsets(a.shape).off;
  if (static_cast<int>(blockIdx.x) < n_band_tiles) {
    const BandPattern<BM, BN> pat(b, blockIdx.x, a.shape.seq, a.half, a.key_padding_mask, a.global_mask, globals);
    run(pat, static_cast<const T*>(a.q) + off, static_cast<const T*>(a.k) + off, static_cast<const T*>(a.v) + off,
        false);
  } else {
    const GlobalRowsPattern<BM, BN> pat{b, static_cast<int>(blockIdx.x) - n_band_tiles, a.shape.seq,
                                        a.key_padding_mask, globals};
    run(pat, static_cast<const T*>(a.qg) + off, static_cast<const T*>(a.kg) + off,
        static_cast<const T*>(a.vg) + off, true);
  }
}

template <class I>
__global__ void __launch_bounds__(kThreads, kMinBlocks) sw_fwd_kernel(const SlidingWindowFwdParams p, int n_band_tiles) {
  using T = typename I::T;
  const SlidingWindowArgs& a = p.args;
  const HeadOffsets o = head_offsets(a.shape);
  T* out = static_cast<T*>(p.out) + o.off;
  float* lse = p.lse + o.lse_off;
  with_pattern<T, I::Fwd::BM, I::Fwd::BN>(a, o.b, n_band_tiles, [&](const auto& pat, const T* q, const T* k,
                                                                    const T* v, bool) {
    attn_fwd_tile<I>(pat, q, k, v, out, lse, a.shape);
  });
}

template <class I>
__global__ void __launch_bounds__(kThreads, kMinBlocks) sw_bwd_kernel(const SlidingWindowBwdParams p, int n_band_tiles) {
  using T = typename I::T;
  const SlidingWindowArgs& a = p.args;
  const HeadOffsets o = head_offsets(a.shape);
  const T* out = static_cast<const T*>(p.out) + o.off;
  const T* dout = static_cast<const T*>(p.grad_out) + o.off;
  const float* lse = p.lse + o.lse_off;
  with_pattern<T, I::Bwd::BM, I::Bwd::BN>(a, o.b, n_band_tiles, [&](const auto& pat, const T* q, const T* k,
                                                                    const T* v, bool global) {
    attn_bwd_tile<I>(pat, q, k, v, out, dout, lse, (global ? p.dqg : p.dq) + o.off,
                     (global ? p.dkg : p.dk) + o.off, (global ? p.dvg : p.dv) + o.off, a.shape);
  });
}

cudaError_t check_args(const SlidingWindowArgs& a) {
  const AttnShape& s = a.shape;
  if (cudaError_t e = check_shape(s); e != cudaSuccess) return e;
  if (a.half < 0) return cudaErrorInvalidValue;
  if (a.max_global > 0 && (a.global_idx == nullptr || a.global_count == nullptr || a.global_mask == nullptr))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <int BM>
dim3 grid_for(const SlidingWindowArgs& a, int* n_band_tiles) {
  *n_band_tiles = BandPattern<BM, 0>::num_ctas(a.shape.seq);
  return dim3(*n_band_tiles + GlobalRowsPattern<BM, 0>::num_ctas(a.max_global), a.shape.batch * a.shape.heads);
}

// One launcher for both passes: check, pick the instance, launch the pass's kernel on its grid.
template <bool kBwd, class Params>
cudaError_t run(const Params& p, cudaStream_t stream) {
  if (cudaError_t e = check_args(p.args); e != cudaSuccess) return e;
  return dispatch(p.args.shape, [&](auto inst) -> cudaError_t {
    using I = decltype(inst);
    using Tiles = std::conditional_t<kBwd, typename I::Bwd, typename I::Fwd>;
    int n_band = 0;
    const dim3 grid = grid_for<Tiles::BM>(p.args, &n_band);
    if constexpr (kBwd) {
      return launch(sw_bwd_kernel<I>, I::kBwdSmem, grid, stream, p, n_band);
    } else {
      return launch(sw_fwd_kernel<I>, I::kFwdSmem, grid, stream, p, n_band);
    }
  });
}

}  // namespace

cudaError_t sliding_window_fwd(const SlidingWindowFwdParams& p, cudaStream_t stream) { return run<false>(p, stream); }

cudaError_t sliding_window_bwd(const SlidingWindowBwdParams& p, cudaStream_t stream) { return run<true>(p, stream); }

}  // namespace cuda
}  // namespace etkd
