// Nystrom's per-target loops beyond landmark_attend, included by flash_tile_impl.h inside its per-target namespace
// (etkd::cpu::ETKD_ISA), before landmark_attend: it uses that file's Vec, kV, kPanel and gemm_panels, and includes
// nothing itself. Declarations and contracts: flash_tile.h.

// Segment sums of rows [r0, r0 + rows) of x (rows lx apart; x points at row r0): row r adds into sum row r / seg
// (row stride ld). landmark_attend gathers the key landmarks' sums in its pass over k with it, and nystrom_fwd the
// query landmarks' (nystrom_segment_means).
void nystrom_segment_sums(const float* x, int64_t lx, int64_t r0, int64_t rows, int64_t d, int64_t seg, float* sum,
                          int64_t ld) {
  const int64_t dv = d / kV * kV;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * lx;
    float* o = sum + (r0 + r) / seg * ld;
    int64_t j = 0;
    for (; j < dv; j += kV) (Vec::loadu(o + j) + Vec::loadu(xr + j)).store(o + j);
    for (; j < d; ++j) o[j] += xr[j];
  }
}

// K3's backward over key tiles of kLmTile rows, K3 held key-major (tile x np), as landmark_attend scores it: every
// product reads k, v and the tile row-major (no transposed copy of k or v, no (n x S) matrix), and the tile's five
// products run while it is in L1/L2. k, v, dk, dv at their own row strides (lk, lv, ldk, ldv): a model's views.
void nystrom_k3_bwd(const float* qlT, const float* lse, const float* k, int64_t lk, const float* v, int64_t lv,
                    const float* bias, int64_t S, int64_t n, int64_t np, int64_t dp, float scale, const float* dt,
                    const float* dtT, const float* dl, const float* ql, const float* dkl, int64_t seg, float* dv,
                    int64_t ldv, float* dk, int64_t ldk, float* dql, float* work, const float* k3,
                    const float* k3max) {
  float* p = work;                // (tile x np) scores, then K3
  float* g = p + kLmTile * np;    // (tile x np) dK3 = v dT^T, then dS3
  for (int64_t j0 = 0; j0 < S; j0 += kLmTile) {
    const int64_t tk = std::min(kLmTile, S - j0);
    const float* kj = k + j0 * lk;
    const float* vj = v + j0 * lv;
    const float* bj = bias ? bias + j0 : nullptr;
    if (k3) {  // the forward's exps, rescaled per landmark: K3 = k3 exp(k3max - lse) (padded keys' rows are zero)
      const float* mt = k3max + j0 / kLmTile * np;
      for (int64_t c = 0; c < np; c += kV) {
        const Vec f = (Vec::loadu(mt + c) - Vec::loadu(lse + c)).exp_u20();
        for (int64_t r = 0; r < tk; ++r) (Vec::loadu(k3 + (j0 + r) * np + c) * f).store(p + r * np + c);
      }
    } else {
      gemm_panels<kPanel>(tk, np, dp, scale, kj, lk, 1, qlT, np, p, np, false);
      for (int64_t r = 0; r < tk; ++r) {
        float* pr = p + r * np;
        if (bj && bj[r] != 0.f) {
          std::fill(pr, pr + np, 0.f);
          continue;
        }
        for (int64_t c = 0; c < np; c += kV) (Vec::loadu(pr + c) - Vec::loadu(lse + c)).exp_u20().store(pr + c);
      }
    }
    gemm_panels<kPanel>(tk, dp, n, 1.f, p, np, 1, dt, dp, dv + j0 * ldv, ldv, false);
    gemm_panels<kPanel>(tk, np, dp, 1.f, vj, lv, 1, dtT, np, g, np, false);
    for (int64_t r = 0; r < tk; ++r) {
      float *pr = p + r * np, *gr = g + r * np;
      for (int64_t c = 0; c < np; c += kV)
        (Vec::loadu(pr + c) * (Vec::loadu(gr + c) - Vec::loadu(dl + c))).store(gr + c);
    }
    float* dkj = dk + j0 * ldk;
    if (dkl) {  // the spread of the key landmarks' gradient first, the product added to it
      for (int64_t r = 0; r < tk; ++r) {
        const float* src = dkl + (j0 + r) / seg * dp;
        std::copy(src, src + dp, dkj + r * ldk);
      }
    }
    gemm_panels<kPanel>(tk, dp, n, scale, g, np, 1, ql, dp, dkj, ldk, dkl != nullptr);
    gemm_panels<kPanel>(n, dp, tk, scale, g, 1, np, kj, lk, dql, dp, true);
  }
}
