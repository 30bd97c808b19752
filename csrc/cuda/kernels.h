// Parameters and launchers of the fused CUDA attention kernels. No torch header: the binding
// (binding.cpp) checks tensors and fills these structs; the .cu files only see raw pointers.
//
// Layout contract (the binding enforces it): every (B, H, S, D) tensor of one call shares the strides
// below and has unit stride in D; lse is (B, H, S) contiguous float32; masks are (B, S) contiguous bool;
// gradient outputs are float32 workspaces of the (B, H, S, D) shape, zero-initialised by the caller
// (dK/dV are accumulated with atomics, see attn_tile.cuh-part below), cast to the input dtype afterwards.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace etkd {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shape and strides (in elements) shared by all (B, H, S, D) tensors of a call.
struct AttnShape {
  DType dtype;
  int batch;
  int heads;
  int seq;
  int head_dim;  // 32, 64 or 128
  int64_t stride_b;
  int64_t stride_h;
  int64_t stride_s;
  float scale;
};

// ---- sliding window -------------------------------------------------------------------------------------
struct SlidingWindowArgs {
  AttnShape shape;
  int half;  // window / 2
  const void* q;
  const void* k;
  const void* v;
  // Global projections for global query rows; equal to q/k/v when the caller has none.
  const void* qg;
  const void* kg;
  const void* vg;
  const bool* key_padding_mask;  // (B, S), true = real; nullptr = all real
  const bool* global_mask;       // (B, S); nullptr = no global tokens
  const int* global_idx;         // (B, max_global) compact list of global positions
  const int* global_count;       // (B,)
  int max_global;                // 0 when there are no global tokens
};

struct SlidingWindowFwdParams {
  SlidingWindowArgs args;
  void* out;   // (B, H, S, D), input dtype
  float* lse;  // (B, H, S)
};

struct SlidingWindowBwdParams {
  SlidingWindowArgs args;
  const void* grad_out;  // (B, H, S, D)
  const void* out;       // saved forward output
  const float* lse;      // saved forward lse
  // float32 workspaces, zero-initialised. dqg/dkg/dvg may alias dq/dk/dv (no separate projections).
  float* dq;
  float* dk;
  float* dv;
  float* dqg;
  float* dkg;
  float* dvg;
};

// ---- block sparse ---------------------------------------------------------------------------------------
struct BlockSparseArgs {
  AttnShape shape;  // seq == nqb * block_size == nkb * block_size
  int block_size;
  const void* q;
  const void* k;
  const void* v;
  const bool* key_padding_mask;  // (B, S) or nullptr
  const int* lut;                // (heads_lut, nqb, max_nnz) key blocks per query block
  const int* lut_count;          // (heads_lut, nqb)
  int heads_lut;                 // 1 (broadcast) or heads
  int nqb;
  int max_nnz;
};

struct BlockSparseFwdParams {
  BlockSparseArgs args;
  void* out;
  float* lse;
};

struct BlockSparseBwdParams {
  BlockSparseArgs args;
  const void* grad_out;
  const void* out;
  const float* lse;
  float* dq;  // float32 workspaces, zero-initialised
  float* dk;
  float* dv;
};

// Launch on `stream`. Return cudaSuccess, cudaErrorInvalidValue for an unsupported dtype/head_dim or
// inconsistent sizes, or the launch error. The binding turns a non-success into a Python exception.
cudaError_t sliding_window_fwd(const SlidingWindowFwdParams& p, cudaStream_t stream);
cudaError_t sliding_window_bwd(const SlidingWindowBwdParams& p, cudaStream_t stream);
cudaError_t block_sparse_fwd(const BlockSparseFwdParams& p, cudaStream_t stream);
cudaError_t block_sparse_bwd(const BlockSparseBwdParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace etkd
