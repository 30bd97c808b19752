// The CPU ops registered by binding.cpp (schemas there); each implemented in its pattern's file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace etkd::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Dropout (dropout_p, seed, offset): the contract of etkd_kernels/_shared.py (flash_tile.h Dropout); p = 0 is off.
// Global tokens as etkd_kernels.masks.GlobalTokens (mask, index, count), built once per call by the op layer.
std::tuple<Tensor, Tensor> sliding_window_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t window,
                                              const OptTensor& global_mask, const OptTensor& global_index,
                                              const OptTensor& global_count, const OptTensor& qg, const OptTensor& kg,
                                              const OptTensor& vg, const OptTensor& key_padding_mask, double scale,
                                              double dropout_p, int64_t seed, int64_t offset);
std::vector<Tensor> sliding_window_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& out, const Tensor& lse, int64_t window,
                                       const OptTensor& global_mask, const OptTensor& global_index,
                                       const OptTensor& global_count, const OptTensor& qg, const OptTensor& kg,
                                       const OptTensor& vg, const OptTensor& key_padding_mask, double scale,
                                       double dropout_p, int64_t seed, int64_t offset);

std::tuple<Tensor, Tensor> block_sparse_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lut,
                                            const Tensor& counts, int64_t block_size,
                                            const OptTensor& key_padding_mask, double scale, double dropout_p,
                                            int64_t seed, int64_t offset);
std::vector<Tensor> block_sparse_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, const Tensor& lut, const Tensor& counts,
                                     int64_t block_size, const OptTensor& key_padding_mask, double scale,
                                     double dropout_p, int64_t seed, int64_t offset);

// softmax(scale * a @ b^T, keys masked by key_mask) @ c, the fused product the Nystrom op is built from.
std::tuple<Tensor, Tensor> softmax_matmul_fwd(const Tensor& a, const Tensor& b, const Tensor& c,
                                              const OptTensor& key_mask, double scale, double dropout_p, int64_t seed,
                                              int64_t offset);
std::vector<Tensor> softmax_matmul_bwd(const Tensor& grad_out, const Tensor& a, const Tensor& b, const Tensor& c,
                                       const Tensor& out, const Tensor& lse, const OptTensor& key_mask, double scale,
                                       double dropout_p, int64_t seed, int64_t offset);

// The whole Nystrom forward (landmarks, pseudo-inverse, both products) fused per (batch, head): out, and what the
// backward reads, `saved` (B, H, per head: T = K3 v, ql, kl, K3's lse; keep's bit 0: K1 itself, seq x landmarks
// padded to whole vectors, before dropout; bit 1: K3's exps, seq x landmarks padded, and their per-tile maxima).
std::tuple<Tensor, Tensor> nystrom_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_landmarks,
                                       int64_t iterations, const OptTensor& key_padding_mask, double scale,
                                       bool hf_global, double dropout_p, int64_t seed, int64_t offset, int64_t keep);

// LSG: local blocks of the main source plus [global keys, compressed keys] of `kx` (built in Python); kx_cols (Sx)
// int64: the dropout column of each extra key (etkd_kernels._shared.lsg_key_columns), needed when dropout_p > 0.
std::tuple<Tensor, Tensor> lsg_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kx,
                                   const Tensor& vx, const Tensor& kx_ok, const Tensor& starts,
                                   const OptTensor& key_padding_mask, int64_t block_size, int64_t sparse_block_size,
                                   int64_t num_global_tokens, double scale, const OptTensor& kx_cols,
                                   double dropout_p, int64_t seed, int64_t offset, bool all_rows);
// [global keys, compressed keys] for pooling (1), stride (2), block_stride (3) with sparsity_factor >= 2, and
// the adjoint: dk, dv += the gradients of kx, vx.
std::tuple<Tensor, Tensor, Tensor> lsg_sparse_keys(const Tensor& k, const Tensor& v, const OptTensor& key_padding_mask,
                                                   int64_t num_global_tokens, int64_t block_size,
                                                   int64_t sparsity_factor, int64_t type);
void lsg_sparse_keys_bwd(const Tensor& dkx, const Tensor& dvx, const Tensor& dk, const Tensor& dv,
                         const OptTensor& key_padding_mask, int64_t num_global_tokens, int64_t block_size,
                         int64_t sparsity_factor, int64_t type);
std::vector<Tensor> lsg_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& out, const Tensor& lse, const Tensor& kx, const Tensor& vx,
                            const Tensor& kx_ok, const Tensor& starts, const OptTensor& key_padding_mask,
                            int64_t block_size, int64_t sparse_block_size, int64_t num_global_tokens, double scale,
                            const OptTensor& kx_cols, double dropout_p, int64_t seed, int64_t offset,
                            bool all_rows);

// Its hand-written backward from the forward's `saved` (recomputes K1 per query tile unless the forward kept it, and
// K3 per head). Padded query
// rows of grad_out are read as zero.
std::vector<Tensor> nystrom_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& saved, int64_t num_landmarks, int64_t iterations,
                                const OptTensor& key_padding_mask, double scale, bool hf_global, double dropout_p,
                                int64_t seed, int64_t offset);
// nystrom_fwd / nystrom_bwd's per-phase seconds (ETKD_CPU_PROFILE=1), summed over threads, then reset to zero.
std::vector<std::pair<const char*, double>> nystrom_profile_take();

// Dense attention through the tile driver (the `cpu` full_attention with dropout): out, lse (B, H, S).
std::tuple<Tensor, Tensor> full_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const OptTensor& key_padding_mask, double scale, double dropout_p, int64_t seed,
                                    int64_t offset);
std::vector<Tensor> full_bwd(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, const OptTensor& key_padding_mask, double scale,
                             double dropout_p, int64_t seed, int64_t offset);

}  // namespace etkd::cpu
