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

// ---------------------------------------------------------------------------------------------------------
// Patterns: what one CTA of a kernel does, as pure index logic (the kernels in csrc/cuda run exactly these;
// tests/cpp/test_tile_index.cpp replays them on the host and checks them against brute force). Interface:
//   int  row(int r)              query index owned by tile row r, or -1 (row written by another CTA)
//   bool row_live(int i)         owned query i is a real token (dead owned rows get out 0, lse +inf)
//   int  num_iters()             number of key tiles visited
//   int  col(int it, int c)      real key index of column c of key tile `it`, or -1
//   bool dense(int it)           every (live row, valid column) pair of key tile `it` is visible
//   bool visible(int i, int j, int it)   the per-element predicate (only needed when !dense(it))
// ---------------------------------------------------------------------------------------------------------

// Sliding window, non-global rows of query tile q_tile: the band key tiles, then the global-key list in
// tiles of BN, from which only keys outside the band are taken (in-band globals were counted by the band).
template <int BM, int BN>
struct BandPattern {
  int b, q_tile, seq, half;
  const bool* kpm;
  const bool* gm;
  GlobalList globals;
  int k_tile0;  // first band key tile
  int n_band;   // band key tiles
  int n_glob;   // tiles of the global-key list

  ETKD_HD BandPattern(int b_, int q_tile_, int seq_, int half_, const bool* kpm_, const bool* gm_, GlobalList g)
      : b(b_), q_tile(q_tile_), seq(seq_), half(half_), kpm(kpm_), gm(gm_), globals(g) {
    const Span kt = band_key_tiles(q_tile, BM, BN, seq, half);
    k_tile0 = kt.begin;
    n_band = kt.size();
    n_glob = globals.num_tiles(b, BN);
  }
  static ETKD_HD int num_ctas(int seq) { return cdiv(seq, BM); }
  ETKD_HD int row(int r) const {
    const int i = q_tile * BM + r;
    return (i < seq && !is_global(gm, b, i, seq)) ? i : -1;
  }
  ETKD_HD bool row_live(int i) const { return is_real(kpm, b, i, seq); }
  ETKD_HD int num_iters() const { return n_band + n_glob; }
  ETKD_HD int col(int it, int c) const {
    const int j = it < n_band ? (k_tile0 + it) * BN + c : globals.at(b, (it - n_band) * BN + c);
    return is_real(kpm, b, j, seq) ? j : -1;
  }
  ETKD_HD bool dense(int it) const {
    return it < n_band && tile_fully_in_band(q_tile, BM, k_tile0 + it, BN, seq, half);
  }
  ETKD_HD bool visible(int i, int j, int it) const {
    return it < n_band ? in_band(i, j, half) : global_key_outside_band(i, j, half);
  }
};

// Sliding window, global rows: entries [g_tile * BM, (g_tile + 1) * BM) of the batch's global list, each
// attending to every real key.
template <int BM, int BN>
struct GlobalRowsPattern {
  int b, g_tile, seq;
  const bool* kpm;
  GlobalList globals;

  static ETKD_HD int num_ctas(int max_global) { return max_global > 0 ? cdiv(max_global, BM) : 0; }
  ETKD_HD int row(int r) const { return globals.at(b, g_tile * BM + r); }
  ETKD_HD bool row_live(int i) const { return is_real(kpm, b, i, seq); }
  ETKD_HD int num_iters() const { return num_tiles(seq, BN); }
  ETKD_HD int col(int it, int c) const {
    const int j = it * BN + c;
    return is_real(kpm, b, j, seq) ? j : -1;
  }
  ETKD_HD bool dense(int) const { return true; }
  ETKD_HD bool visible(int, int, int) const { return true; }
};

// Block sparse: CTA x owns query sub-tile x % q_sub of query block x / q_sub and walks, for every LUT entry
// of that block, the k_sub key tiles of the key block. Tiles never straddle two blocks.
template <int BM, int BN>
struct BlockPattern {
  int b, h, qb, sub, block_size, seq, k_sub;
  const bool* kpm;
  BlockLut lut;

  ETKD_HD BlockPattern(int b_, int h_, int cta_x, int block_size_, int seq_, const bool* kpm_, BlockLut lut_)
      : b(b_), h(h_), block_size(block_size_), seq(seq_), kpm(kpm_), lut(lut_) {
    const int q_sub = sub_tiles(block_size, BM);
    qb = cta_x / q_sub;
    sub = cta_x % q_sub;
    k_sub = sub_tiles(block_size, BN);
  }
  static ETKD_HD int num_ctas(int nqb, int block_size) { return nqb * sub_tiles(block_size, BM); }
  ETKD_HD int row(int r) const {
    const Span s = block_sub_span(qb, sub, BM, block_size);
    const int i = s.begin + r;
    return i < s.end ? i : -1;
  }
  ETKD_HD bool row_live(int i) const { return is_real(kpm, b, i, seq); }
  ETKD_HD int num_iters() const { return lut.size(h, qb) * k_sub; }
  ETKD_HD int col(int it, int c) const {
    const Span s = block_sub_span(lut.at(h, qb, it / k_sub), it % k_sub, BN, block_size);
    const int j = s.begin + c;
    return (j < s.end && is_real(kpm, b, j, seq)) ? j : -1;
  }
  ETKD_HD bool dense(int) const { return true; }
  ETKD_HD bool visible(int, int, int) const { return true; }
};

}  // namespace tile
}  // namespace etkd
