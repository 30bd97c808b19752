// Host test of csrc/common/tile_index.h: replays the patterns the CUDA kernels run (every CTA, every row,
// every key tile) and checks them against brute-force enumeration. Built and run by
// tests/test_cuda_sources.py with g++ -Icsrc; no CUDA needed.
//
//   test_tile_index                 run every self-check, print "OK <checks>" (exit 1 on any failure)
//   test_tile_index band S H BM BN  print "<q_tile> <first> <end>" per query tile (end exclusive)
//   test_tile_index sw BM BN        read "B S half", B kpm rows, B global rows (0/1 strings) on stdin;
//                                   print "R b i owners" per row and "P b i j count" per visited pair
//   test_tile_index bs BM BN        read "B H S bs Hl nqb max_nnz", the LUT, the counts, B kpm rows;
//                                   print "R b h i owners" and "P b h i j count" (the Python test builds
//                                   the LUT with etkd_kernels.cuda.block_sparse.layout_to_lut)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "common/tile_index.h"

namespace ti = etkd::tile;

namespace {

long long g_checks = 0;
int g_failures = 0;

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    ++g_checks;                                                            \
    if (!(cond)) {                                                         \
      if (++g_failures <= 20) {                                            \
        std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                 \
        std::fprintf(stderr, "\n");                                        \
      }                                                                    \
    }                                                                      \
  } while (0)

struct Rng {  // deterministic LCG, no <random> distribution differences across platforms
  unsigned long long s;
  explicit Rng(unsigned long long seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  unsigned next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<unsigned>(s >> 33);
  }
  bool coin(int percent) { return static_cast<int>(next() % 100) < percent; }
};

// Counts what a kernel would compute: seen[i*S + j] = times pair (i, j) enters a softmax; owners[i] =
// CTAs writing row i; bad_dense = key tiles declared dense that hold a pair the predicate rejects.
struct Replay {
  int S;
  std::vector<int> seen, owners;
  int bad_dense = 0;
  explicit Replay(int s) : S(s), seen(static_cast<size_t>(s) * s, 0), owners(s, 0) {}

  template <int BM, int BN, class P>
  void run(const P& pat) {
    for (int r = 0; r < BM; ++r) {
      const int i = pat.row(r);
      if (i < 0) continue;
      ++owners[i];
      if (!pat.row_live(i)) continue;
      for (int it = 0; it < pat.num_iters(); ++it) {
        const bool dense = pat.dense(it);
        for (int c = 0; c < BN; ++c) {
          const int j = pat.col(it, c);
          if (j < 0) continue;
          const bool vis = pat.visible(i, j, it);
          if (dense && !vis) ++bad_dense;
          if (dense || vis) ++seen[static_cast<size_t>(i) * S + j];
        }
      }
    }
  }
};

// ---- band tiles -----------------------------------------------------------------------------------------
void check_band_tiles(int S, int half, int BM, int BN) {
  const int nq = ti::cdiv(S, BM), nk = ti::cdiv(S, BN);
  for (int qt = 0; qt < nq; ++qt) {
    const ti::Span vis = ti::band_key_tiles(qt, BM, BN, S, half);
    for (int kt = 0; kt < nk; ++kt) {
      // Brute force: does key tile kt hold a band key of a row of query tile qt?
      bool needed = false, all_in = true;
      for (int i = qt * BM; i < ti::imin((qt + 1) * BM, S); ++i)
        for (int j = kt * BN; j < ti::imin((kt + 1) * BN, S); ++j) {
          const bool in = (i - j <= half) && (j - i <= half);
          needed |= in;
          all_in &= in;
        }
      const bool visited = kt >= vis.begin && kt < vis.end;
      // No in-band key missed, and no tile without band keys visited (the out-of-band waste is only the
      // corners of the first/last visited tiles).
      CHECK(visited == needed, "S=%d half=%d BM=%d BN=%d qt=%d kt=%d visited=%d needed=%d", S, half, BM, BN, qt,
            kt, visited, needed);
      CHECK(ti::tile_fully_in_band(qt, BM, kt, BN, S, half) == all_in, "fully_in_band S=%d half=%d qt=%d kt=%d", S,
            half, qt, kt);
    }
    CHECK(vis.size() <= ti::cdiv(BM + 2 * half, BN) + 1, "too many tiles: %d", vis.size());
  }
}

// ---- sliding window, whole launch -----------------------------------------------------------------------
template <int BM, int BN>
Replay replay_sw(int b, int S, int half, const bool* kpm, const bool* gm, const ti::GlobalList& g) {
  Replay rep(S);
  for (int x = 0; x < ti::BandPattern<BM, BN>::num_ctas(S); ++x)
    rep.run<BM, BN>(ti::BandPattern<BM, BN>(b, x, S, half, kpm, gm, g));
  for (int x = 0; x < ti::GlobalRowsPattern<BM, BN>::num_ctas(g.max_global); ++x)
    rep.run<BM, BN>(ti::GlobalRowsPattern<BM, BN>{b, x, S, kpm, g});
  return rep;
}

struct GlobalListHost {
  std::vector<int> idx, count;
  int max_global = 0;
  GlobalListHost(int B, int S, const std::vector<char>& gm) : count(B, 0) {
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < S; ++i) count[b] += gm[b * S + i];
    for (int b = 0; b < B; ++b) max_global = ti::imax(max_global, count[b]);
    idx.assign(static_cast<size_t>(B) * ti::imax(max_global, 1), -7);  // junk past count[b]
    for (int b = 0; b < B; ++b) {
      int n = 0;
      for (int i = 0; i < S; ++i)
        if (gm[b * S + i]) idx[b * max_global + n++] = i;
    }
  }
  ti::GlobalList view() const { return ti::GlobalList{idx.data(), count.data(), max_global}; }
};

template <int BM, int BN>
void check_sw(int S, int half, int pad_pct, int glob_pct, unsigned seed) {
  const int B = 2;
  Rng rng(seed);
  std::vector<char> kpm(B * S), gm(B * S);
  for (auto& x : kpm) x = !rng.coin(pad_pct);
  for (auto& x : gm) x = rng.coin(glob_pct);
  const GlobalListHost gl(B, S, gm);
  const bool* kp = pad_pct ? reinterpret_cast<const bool*>(kpm.data()) : nullptr;
  const bool* gp = reinterpret_cast<const bool*>(gm.data());
  for (int b = 0; b < B; ++b) {
    const Replay rep = replay_sw<BM, BN>(b, S, half, kp, gp, gl.view());
    CHECK(rep.bad_dense == 0, "dense tile with an invisible pair S=%d half=%d", S, half);
    for (int i = 0; i < S; ++i) {
      CHECK(rep.owners[i] == 1, "row %d written %d times (S=%d half=%d BM=%d BN=%d)", i, rep.owners[i], S, half, BM,
            BN);
      const bool qreal = !kp || kpm[b * S + i];
      for (int j = 0; j < S; ++j) {
        const bool kreal = !kp || kpm[b * S + j];
        const bool in = (i - j <= half) && (j - i <= half);
        const int want = (qreal && kreal && (gm[b * S + i] || in || gm[b * S + j])) ? 1 : 0;
        CHECK(rep.seen[static_cast<size_t>(i) * S + j] == want, "b=%d i=%d j=%d seen=%d want=%d S=%d half=%d BM=%d BN=%d",
              b, i, j, rep.seen[static_cast<size_t>(i) * S + j], want, S, half, BM, BN);
      }
    }
  }
}

// ---- block sparse ---------------------------------------------------------------------------------------
struct LutHost {
  std::vector<int> key_block, count;
  int heads_lut, nqb, max_nnz = 0;
  LutHost(const std::vector<char>& layout, int Hl, int nqb_, int nkb) : count(Hl * nqb_, 0), heads_lut(Hl), nqb(nqb_) {
    for (int x = 0; x < Hl * nqb; ++x)
      for (int kb = 0; kb < nkb; ++kb) count[x] += layout[x * nkb + kb];
    for (int c : count) max_nnz = ti::imax(max_nnz, c);
    key_block.assign(static_cast<size_t>(Hl) * nqb * ti::imax(max_nnz, 1), -3);
    for (int x = 0; x < Hl * nqb; ++x) {
      int n = 0;
      for (int kb = 0; kb < nkb; ++kb)
        if (layout[x * nkb + kb]) key_block[x * max_nnz + n++] = kb;
    }
  }
  ti::BlockLut view() const { return ti::BlockLut{key_block.data(), count.data(), heads_lut, nqb, max_nnz}; }
};

template <int BM, int BN>
Replay replay_bs(int b, int h, int S, int bs, const bool* kpm, const ti::BlockLut& lut) {
  Replay rep(S);
  for (int x = 0; x < ti::BlockPattern<BM, BN>::num_ctas(lut.nqb, bs); ++x)
    rep.run<BM, BN>(ti::BlockPattern<BM, BN>(b, h, x, bs, S, kpm, lut));
  return rep;
}

template <int BM, int BN>
void check_bs(int nblocks, int bs, int H, int Hl, int density, int pad_pct, unsigned seed) {
  const int B = 2, S = nblocks * bs;
  Rng rng(seed);
  std::vector<char> layout(Hl * nblocks * nblocks), kpm(B * S);
  for (auto& x : layout) x = rng.coin(density);
  for (auto& x : kpm) x = !rng.coin(pad_pct);
  const LutHost lut(layout, Hl, nblocks, nblocks);
  const bool* kp = pad_pct ? reinterpret_cast<const bool*>(kpm.data()) : nullptr;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const Replay rep = replay_bs<BM, BN>(b, h, S, bs, kp, lut.view());
      const int hl = Hl == 1 ? 0 : h;
      for (int i = 0; i < S; ++i) {
        CHECK(rep.owners[i] == 1, "bs row %d owners %d", i, rep.owners[i]);
        for (int j = 0; j < S; ++j) {
          const bool real = !kp || (kpm[b * S + i] && kpm[b * S + j]);
          const int want = (real && layout[(hl * nblocks + i / bs) * nblocks + j / bs]) ? 1 : 0;
          CHECK(rep.seen[static_cast<size_t>(i) * S + j] == want, "bs b=%d h=%d i=%d j=%d bs=%d BM=%d BN=%d", b, h, i,
                j, bs, BM, BN);
        }
      }
    }
}

// ---- predicates -----------------------------------------------------------------------------------------
void check_predicates() {
  const bool kpm[6] = {true, false, true, true, true, false};  // (B=2, S=3)
  CHECK(ti::is_real(nullptr, 0, 0, 3) && ti::is_real(nullptr, 1, 2, 3), "no mask: in range is real");
  CHECK(!ti::is_real(nullptr, 0, -1, 3) && !ti::is_real(nullptr, 0, 3, 3), "out of range is never real");
  CHECK(ti::is_real(kpm, 0, 0, 3) && !ti::is_real(kpm, 0, 1, 3) && ti::is_real(kpm, 1, 1, 3), "mask row/col");
  CHECK(!ti::is_real(kpm, 1, 2, 3) && !ti::is_real(kpm, 1, 3, 3), "padding / past the end");
  CHECK(!ti::is_global(nullptr, 0, 0, 3) && ti::is_global(kpm, 1, 0, 3) && !ti::is_global(kpm, 0, 7, 3),
        "global predicate");
  const int idx[4] = {2, 5, 1, -9}, cnt[2] = {2, 1};
  const ti::GlobalList g{idx, cnt, 2};
  CHECK(g.at(0, 0) == 2 && g.at(0, 1) == 5 && g.at(0, 2) == -1 && g.at(1, 0) == 1 && g.at(1, 1) == -1,
        "global list walk stops at count");
  CHECK(g.at(0, -1) == -1 && g.num_tiles(0, 64) == 1 && g.num_tiles(1, 1) == 1, "global list tiles");
  const ti::GlobalList none{nullptr, nullptr, 0};
  CHECK(none.size(0) == 0 && none.at(0, 0) == -1, "empty global list");
  CHECK(ti::band_key_tiles(5, 64, 64, 100, 8).empty(), "query tile past the end visits nothing");
  CHECK(ti::in_band(10, 2, 8) && ti::in_band(2, 10, 8) && !ti::in_band(11, 2, 8), "in_band is |i-j| <= half");
}

int self_test() {
  check_predicates();
  const int halves[] = {0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 100, 256};
  const int tiles[] = {16, 32, 64};
  for (int S = 1; S <= 70; ++S)
    for (int h : halves)
      for (int BM : tiles)
        for (int BN : tiles) check_band_tiles(S, h, BM, BN);
  for (int S : {100, 129, 255, 257, 513})
    for (int h : halves)
      for (int BM : tiles)
        for (int BN : tiles) check_band_tiles(S, h, BM, BN);

  // Full launches: seq not a multiple of the tiles, windows narrower/wider than a tile, padding, globals
  // (including padded global tokens and globals inside the band, which must still count once).
  unsigned seed = 1;
  for (int S : {1, 5, 31, 64, 65, 100, 130})
    for (int h : {0, 1, 4, 16, 40, 128})
      for (int pad : {0, 20})
        for (int glob : {0, 5, 30}) {
          check_sw<64, 64>(S, h, pad, glob, seed++);
          check_sw<64, 32>(S, h, pad, glob, seed++);
          check_sw<32, 32>(S, h, pad, glob, seed++);
          check_sw<16, 16>(S, h, pad, glob, seed++);
        }
  // Block sparse: block sizes below, equal to, above and not a multiple of the tile sizes.
  for (int bs : {8, 16, 24, 32, 64, 100})
    for (int nb : {1, 3, 5})
      for (int Hl : {1, 3})
        for (int pad : {0, 20}) {
          check_bs<64, 64>(nb, bs, 3, Hl, 40, pad, seed++);
          check_bs<64, 32>(nb, bs, 3, Hl, 40, pad, seed++);
          check_bs<32, 32>(nb, bs, 3, Hl, 100, pad, seed++);
          check_bs<32, 32>(nb, bs, 3, Hl, 0, pad, seed++);  // empty rows: see no key
          check_bs<16, 16>(nb, bs, 3, Hl, 40, pad, seed++);
        }
  if (g_failures) {
    std::fprintf(stderr, "%d of %lld checks failed\n", g_failures, g_checks);
    return 1;
  }
  std::printf("OK %lld\n", g_checks);
  return 0;
}

// ---- printing modes for the Python cross-check ------------------------------------------------------------
std::vector<char> read_rows(int n, int S) {
  std::vector<char> out;
  for (int r = 0; r < n; ++r) {
    std::string line;
    std::cin >> line;
    if (static_cast<int>(line.size()) != S) {
      std::fprintf(stderr, "expected a 0/1 row of %d chars\n", S);
      std::exit(2);
    }
    for (char c : line) out.push_back(c == '1');
  }
  return out;
}

void print_replay(const Replay& rep, const std::string& prefix) {
  for (int i = 0; i < rep.S; ++i) {
    std::printf("R %s%d %d\n", prefix.c_str(), i, rep.owners[i]);
    for (int j = 0; j < rep.S; ++j)
      if (rep.seen[static_cast<size_t>(i) * rep.S + j]) std::printf("P %s%d %d %d\n", prefix.c_str(), i, j, rep.seen[static_cast<size_t>(i) * rep.S + j]);
  }
}

template <int BM, int BN>
int print_sw() {
  int B, S, half;
  std::cin >> B >> S >> half;
  const std::vector<char> kpm = read_rows(B, S), gm = read_rows(B, S);
  const GlobalListHost gl(B, S, gm);
  for (int b = 0; b < B; ++b)
    print_replay(replay_sw<BM, BN>(b, S, half, reinterpret_cast<const bool*>(kpm.data()),
                                   reinterpret_cast<const bool*>(gm.data()), gl.view()),
                 std::to_string(b) + " ");
  return 0;
}

template <int BM, int BN>
int print_bs() {
  int B, H, S, bs, Hl, nqb, max_nnz;
  std::cin >> B >> H >> S >> bs >> Hl >> nqb >> max_nnz;
  std::vector<int> lut(static_cast<size_t>(Hl) * nqb * max_nnz), count(Hl * nqb);
  for (auto& x : lut) std::cin >> x;
  for (auto& x : count) std::cin >> x;
  const std::vector<char> kpm = read_rows(B, S);
  const ti::BlockLut view{lut.data(), count.data(), Hl, nqb, max_nnz};
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      print_replay(replay_bs<BM, BN>(b, h, S, bs, reinterpret_cast<const bool*>(kpm.data()), view),
                   std::to_string(b) + " " + std::to_string(h) + " ");
  return 0;
}

// The kernels instantiate only these tile shapes (kernels.h FwdTiles / BwdTiles).
template <template <int, int> class F>
int with_tiles(int BM, int BN) {
  if (BM == 64 && BN == 64) return F<64, 64>::run();
  if (BM == 64 && BN == 32) return F<64, 32>::run();
  if (BM == 32 && BN == 32) return F<32, 32>::run();
  if (BM == 16 && BN == 16) return F<16, 16>::run();
  std::fprintf(stderr, "tile shape %dx%d is not one the kernels use (64x64, 64x32, 32x32, 16x16)\n", BM, BN);
  return 2;
}
template <int BM, int BN>
struct SwMode {
  static int run() { return print_sw<BM, BN>(); }
};
template <int BM, int BN>
struct BsMode {
  static int run() { return print_bs<BM, BN>(); }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc == 1) return self_test();
  const std::string mode = argv[1];
  if (mode == "band" && argc == 6) {
    const int S = std::atoi(argv[2]), half = std::atoi(argv[3]), BM = std::atoi(argv[4]), BN = std::atoi(argv[5]);
    for (int qt = 0; qt < ti::cdiv(S, BM); ++qt) {
      const ti::Span s = ti::band_key_tiles(qt, BM, BN, S, half);
      std::printf("%d %d %d\n", qt, s.begin, s.end);
    }
    return 0;
  }
  if (mode == "sw" && argc == 4) return with_tiles<SwMode>(std::atoi(argv[2]), std::atoi(argv[3]));
  if (mode == "bs" && argc == 4) return with_tiles<BsMode>(std::atoi(argv[2]), std::atoi(argv[3]));
  std::fprintf(stderr, "usage: %s [band S HALF BM BN | sw BM BN | bs BM BN]\n", argv[0]);
  return 2;
}
