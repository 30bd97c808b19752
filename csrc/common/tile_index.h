// Index logic shared by the CUDA kernels (csrc/cuda) and the host tests (tests/cpp/test_tile_index.cpp).
//
// Pure functions on ints: which key tiles a query tile visits, whether a (query, key) pair is inside the
// pattern, how a block-sparse look-up table (LUT) and a compact global-token list are walked. No torch, no
// CUDA runtime: under nvcc every function is __host__ __device__, under g++ it is a plain inline function,
// so the same code the kernels run is what the host test checks against brute force.
//
// Conventions
//   seq     number of rows/keys (rows >= seq are padding of the last tile)
//   half    one-sided window: query i sees key j iff |i - j| <= half (HF Longformer: half = window / 2)
//   BM, BN  query / key tile sizes
//   A "span" is a half-open range [begin, end) of element indices; an empty span has begin >= end.
#pragma once

#if defined(__CUDACC__)
#define ETKD_HD __host__ __device__ __forceinline__
#else
#define ETKD_HD inline
#endif

namespace etkd {
namespace tile {

ETKD_HD int imin(int a, int b) { return a < b ? a : b; }
ETKD_HD int imax(int a, int b) { return a > b ? a : b; }
ETKD_HD int cdiv(int a, int b) { return (a + b - 1) / b; }

struct Span {
  int begin;
  int end;  // exclusive
  ETKD_HD bool empty() const { return begin >= end; }
  ETKD_HD int size() const { return empty() ? 0 : end - begin; }
};

// Elements [t * T, min((t + 1) * T, limit)) of tile t; empty when the tile starts past `limit`.
ETKD_HD Span tile_span(int t, int T, int limit) { return Span{t * T, imin((t + 1) * T, limit)}; }

// ---------------------------------------------------------------------------------------------------------
// Sliding window (Longformer band)
// ---------------------------------------------------------------------------------------------------------

ETKD_HD bool in_band(int i, int j, int half) {
  const int d = i - j;
  return d <= half && -d <= half;
}

// Keys the rows `rows` can see through the band, clipped to [0, seq): [rows.begin - half, rows.end - 1 + half].
ETKD_HD Span band_keys(Span rows, int half, int seq) {
  if (rows.empty()) return Span{0, 0};
  return Span{imax(0, rows.begin - half), imin(seq, rows.end + half)};
}

// Key tiles [first, end) visited by query tile `q_tile`: every tile that holds at least one band key of at
// least one real row of the tile. Because the band of a contiguous row range is a contiguous key range,
// no tile in between is empty of band keys, so the visit is exact at tile granularity: the only wasted
// work is the out-of-band corner of the first and last tiles (bounded: at most 2 tiles partially out).
ETKD_HD Span band_key_tiles(int q_tile, int BM, int BN, int seq, int half) {
  const Span keys = band_keys(tile_span(q_tile, BM, seq), half, seq);
  if (keys.empty()) return Span{0, 0};
  return Span{keys.begin / BN, cdiv(keys.end, BN)};
}

// True when every (i, j) pair of the two tiles is in the band, so the kernel may skip the per-element
// predicate (interior tiles of wide windows). Rows/keys past `seq` are ignored.
ETKD_HD bool tile_fully_in_band(int q_tile, int BM, int k_tile, int BN, int seq, int half) {
  const Span r = tile_span(q_tile, BM, seq), c = tile_span(k_tile, BN, seq);
  if (r.empty() || c.empty()) return false;
  return in_band(r.begin, c.end - 1, half) && in_band(r.end - 1, c.begin, half);
}

// A global key j is seen by a non-global query i through the band when in_band(i, j); otherwise through
// the extra "global columns". Each key must count once, so the global-column pass takes only this case.
ETKD_HD bool global_key_outside_band(int i, int j, int half) { return !in_band(i, j, half); }

// The key (or query) tiles seen by a global query row: all of them.
ETKD_HD int num_tiles(int seq, int T) { return cdiv(seq, T); }

// ---------------------------------------------------------------------------------------------------------
// Compact global-token list: idx (batch, max_global) int32 (row-major), count (batch,) int32. Entries past
// count[b] are ignored (the binding fills them with any value).
// ---------------------------------------------------------------------------------------------------------
struct GlobalList {
  const int* idx;
  const int* count;
  int max_global;

  ETKD_HD int size(int b) const { return (idx == nullptr || count == nullptr) ? 0 : count[b]; }
  // The n-th global token of batch b, or -1 past the end.
  ETKD_HD int at(int b, int n) const { return (n >= 0 && n < size(b)) ? idx[b * max_global + n] : -1; }
  // Tiles of T entries needed to walk the list of batch b.
  ETKD_HD int num_tiles(int b, int T) const { return cdiv(size(b), T); }
};

// ---------------------------------------------------------------------------------------------------------
// Block sparse LUT: key_block (heads_lut, nqb, max_nnz) int32, count (heads_lut, nqb) int32, built from a
// bool layout (heads_lut, nqb, nkb) with heads_lut in {1, heads}: a layout with one head is broadcast.
// ---------------------------------------------------------------------------------------------------------
struct BlockLut {
  const int* key_block;
  const int* count;
  int heads_lut;
  int nqb;
  int max_nnz;

  ETKD_HD int head(int h) const { return heads_lut == 1 ? 0 : h; }
  ETKD_HD int size(int h, int qb) const { return count[head(h) * nqb + qb]; }
  ETKD_HD int at(int h, int qb, int n) const { return key_block[(head(h) * nqb + qb) * max_nnz + n]; }
};

// Block-sparse iteration space: query block qb is cut into ceil(bs / BM) query tiles (sub), and each LUT
// entry into ceil(bs / BN) key tiles, so iteration `it` is entry it / key_sub_tiles, sub-tile
// it % key_sub_tiles. Element c of that key tile is key block_begin + sub * BN + c when inside the block.
ETKD_HD int sub_tiles(int block_size, int T) { return cdiv(block_size, T); }

ETKD_HD Span block_sub_span(int block, int sub, int T, int block_size) {
  const int b0 = block * block_size;
  return Span{b0 + sub * T, imin(b0 + (sub + 1) * T, b0 + block_size)};
}

// ---------------------------------------------------------------------------------------------------------
// Padding: key_padding_mask (batch, seq) bool, true = real token; nullptr = every in-range token is real.
// ---------------------------------------------------------------------------------------------------------
ETKD_HD bool is_real(const bool* key_padding_mask, int b, int j, int seq) {
  if (j < 0 || j >= seq) return false;
  return key_padding_mask == nullptr || key_padding_mask[static_cast<long long>(b) * seq + j];
}

ETKD_HD bool is_global(const bool* global_mask, int b, int i, int seq) {
  return global_mask != nullptr && i >= 0 && i < seq && global_mask[static_cast<long long>(b) * seq + i];
}

}  // namespace tile
}  // namespace etkd
