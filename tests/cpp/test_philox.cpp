// Host test of csrc/common/philox.h, the dropout RNG the CUDA kernels run. Built and run by
// tests/test_cuda_sources.py with g++ -Icsrc; no CUDA needed.
//
//   test_philox                                   Random123's philox4x32-10 known answers and the 16-bit
//                                                 threshold; print "OK <checks>" (exit 1 on any failure)
//   test_philox mask P SEED OFFSET BH ROWS COLS   print the keep-mask of rows 0..ROWS-1, columns 0..COLS-1 of
//                                                 program row BH, one line of 0/1 per row (the Python test
//                                                 compares it with etkd_kernels/_shared.py's dropout_keep)
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/philox.h"

namespace rng = etkd::rng;

namespace {

int g_checks = 0, g_failures = 0;

void check(bool ok, const char* what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL %s\n", what);
  }
}

// Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4] key[2] -> result[4].
struct Kat {
  uint32_t c[4], k[2], r[4];
};
constexpr Kat kKats[] = {
    {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

int self_test() {
  for (const Kat& t : kKats) {
    const rng::Philox4 x = rng::philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int w = 0; w < 4; ++w) check(x.r[w] == t.r[w], "philox4x32-10 known answer");
  }
  check(rng::dropout_threshold(0.0) == 0u, "threshold(0)");
  check(rng::dropout_threshold(0.1) == 6553u, "threshold(0.1) = floor(6553.6)");
  check(rng::dropout_threshold(0.5) == 32768u, "threshold(0.5)");
  check(rng::dropout_threshold(0.99999999) == 65535u, "threshold clamps to 65535");
  // The column -> (word, half) layout: columns 8t..8t+7 are the 8 halves of one call, low half first.
  const rng::Dropout d = rng::make_dropout(0.3, 0x123456789abcdefULL, 0x1'0000'0007ULL);
  check(d.k0 == 0x89abcdefu && d.k1 == 0x01234567u && d.offset == 7u, "key / offset words");
  for (int j = 0; j < 64; ++j) {
    const rng::Philox4 x = rng::philox4x32_10(static_cast<uint32_t>(j / 8), 5u, 3u, d.offset, d.k0, d.k1);
    const uint32_t want = (x.r[(j % 8) / 2] >> (16 * (j % 2))) & 0xffffu;
    check(rng::dropout_bits(d, 3, 5, j) == want, "dropout_bits layout");
  }
  std::printf("%s %d\n", g_failures ? "FAILED" : "OK", g_checks);
  return g_failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 1) return self_test();
  if (argc == 8 && std::string(argv[1]) == "mask") {
    const rng::Dropout d = rng::make_dropout(std::strtod(argv[2], nullptr), std::strtoull(argv[3], nullptr, 10),
                                             std::strtoull(argv[4], nullptr, 10));
    const int bh = std::atoi(argv[5]), rows = std::atoi(argv[6]), cols = std::atoi(argv[7]);
    std::string line(static_cast<size_t>(cols), '0');
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) line[static_cast<size_t>(j)] = rng::dropout_keep(d, bh, i, j) ? '1' : '0';
      std::printf("%s\n", line.c_str());
    }
    return 0;
  }
  std::fprintf(stderr, "usage: test_philox | test_philox mask P SEED OFFSET BH ROWS COLS\n");
  return 2;
}
