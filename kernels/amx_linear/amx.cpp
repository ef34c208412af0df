// y[m, n] = bf16(sum_k x[m, k] w[n, k]): a bf16 projection on AMX tiles, for every row count, whose rows get the
// same bits alone or among any others. The plain reference is naive.py; the equivalence tests are
// tests/kernels/test_amx_linear.py.
//
// Why: oneDNN's AMX kernels choose their blocking, and with it the order of a row's sums, by the row count, so
// engine/linear.py had to call every bf16 weight with 16..64 rows only (padding one decode row to 16, cutting a
// 512-row prefill chunk into 64-row calls): a decode step 12-17% and a prefill 15-20% slower on an AMX CPU. Here
// each output is one fp32 sum over k in a fixed order (32 k a tile multiply, its 16 pairs in order, the k blocks
// in order) whatever the row count, the rows beside it, the thread split or the weight rows' tiling.
//
// Layout: the weight is packed once (pack_weight) as the tiles' B operand, [N/16][K/32][16][32]: block (nb, kb)
// is 16 pair-rows of 16 output columns, B[i][2c + j] = w[16 nb + c][32 kb + 2 i + j] (zero past N and K), 1 KB
// read contiguously. x is the A operand straight from its rows (16 rows x 32 k a tile); C is 16 rows of x by 16
// outputs, rounded to bf16 (RNE) 16 at a time. Register blocking: 2 tiles of x rows x 2 of weight columns (4 C
// tiles); cache blocking: a thread's weight columns in chunks of ~256 KB, each against every 32 rows of x.
//
// Preconditions (the Python wrapper ensures them): x bf16 [M, K] contiguous with K a multiple of 32 (else padded
// by the caller), the weight packed by pack_weight from [N, K]. tdpbf16ps treats denormal inputs as zero (the same
// for every row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace {

// Linux hands a process AMX's tile state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
bool tiles_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTile = 16 * 32;  // bf16 elements of one packed weight block (1 KB)

// C tiles 4 + 2 mi + ni += x tile mi (A: tiles 0, 1) x weight tile ni (B: tiles 2, 3), over every k block
template <int MT, int NT>
inline void micro(const uint16_t* x0, const uint16_t* x1, int64_t xstride, const uint16_t* w0, const uint16_t* w1,
                  int64_t kblocks) {
  _tile_zero(4);
  if (NT > 1) _tile_zero(5);
  if (MT > 1) _tile_zero(6);
  if (MT > 1 && NT > 1) _tile_zero(7);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(2, w0 + kb * kTile, 64);
    _tile_loadd(0, x0 + kb * 32, xstride);
    _tile_dpbf16ps(4, 0, 2);
    if (NT > 1) {
      _tile_loadd(3, w1 + kb * kTile, 64);
      _tile_dpbf16ps(5, 0, 3);
    }
    if (MT > 1) {
      _tile_loadd(1, x1 + kb * 32, xstride);
      _tile_dpbf16ps(6, 1, 2);
      if (NT > 1) _tile_dpbf16ps(7, 1, 3);
    }
  }
}

// one C tile's rows (rows of x) rounded to bf16 into y[m0.., n0..n0+16) (columns past N not written)
inline void store(int tile, float (*c)[16], int rows, at::BFloat16* y, int64_t N, int64_t m0, int64_t n0) {
  switch (tile) {
    case 4: _tile_stored(4, c, 64); break;
    case 5: _tile_stored(5, c, 64); break;
    case 6: _tile_stored(6, c, 64); break;
    default: _tile_stored(7, c, 64); break;
  }
  const __mmask16 mask = N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>(_bzhi_u32(~0u, N - n0));
  for (int r = 0; r < rows; ++r) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c[r]));
    _mm256_mask_storeu_epi16(y + (m0 + r) * N + n0, mask, v);
  }
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "amx_linear: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0,
              "amx_linear: x must be bf16 [M, K] with K a multiple of 32");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.size(2) == 16 &&
                  packed.size(3) == 32 && packed.size(1) * 32 == x.size(1) && packed.size(0) * 16 >= N &&
                  packed.size(0) * 16 < N + 16 && packed.is_contiguous(),
              "amx_linear: the weight must be packed by pack_weight for x's K and N outputs");
  TORCH_CHECK(tiles_permitted(), "amx_linear: the kernel did not grant this process AMX tile state");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), kblocks = K / 32, nblocks = packed.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // x's rows a tile: all of them up to 16; more are taken 16 at a time, the last ones padded to 16 with zeros
  const int rows = M < 16 ? static_cast<int>(M) : 16;
  const int64_t Mp = M < 16 ? M : (M + 15) / 16 * 16;
  at::Tensor xpad = xc;
  if (Mp != M) {
    xpad = at::zeros({Mp, K}, x.options());
    xpad.narrow(0, 0, M).copy_(xc);
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xpad.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t xstride = K * 2, mtiles = (Mp + rows - 1) / rows, npairs = (nblocks + 1) / 2;
  // weight columns a cache block: ~256 KB of packed weight, whole pairs of 16
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / (32 * K * 2));
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = t == 2 || t == 3 ? 16 : rows;
  }
  at::parallel_for(0, npairs, 1, [&](int64_t begin, int64_t end) {
    _tile_loadconfig(&cfg);
    alignas(64) float c[16][16];
    for (int64_t p0 = begin; p0 < end; p0 += chunk) {
      const int64_t p1 = std::min(end, p0 + chunk);
      for (int64_t mt = 0; mt < mtiles; mt += 2) {
        const bool two_m = mt + 1 < mtiles;
        const uint16_t* x0 = xp + mt * rows * K;
        const uint16_t* x1 = two_m ? x0 + rows * K : x0;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t nb = 2 * p;
          const bool two_n = nb + 1 < nblocks;
          const uint16_t* w0 = wp + nb * kblocks * kTile;
          const uint16_t* w1 = two_n ? w0 + kblocks * kTile : w0;
          if (two_m && two_n) micro<2, 2>(x0, x1, xstride, w0, w1, kblocks);
          else if (two_m) micro<2, 1>(x0, x1, xstride, w0, w1, kblocks);
          else if (two_n) micro<1, 2>(x0, x1, xstride, w0, w1, kblocks);
          else micro<1, 1>(x0, x1, xstride, w0, w1, kblocks);
          const int64_t m0 = mt * rows;
          const int r0 = static_cast<int>(std::min<int64_t>(rows, M - m0));
          store(4, c, r0, yp, N, m0, nb * 16);
          if (two_n) store(5, c, r0, yp, N, m0, nb * 16 + 16);
          if (two_m) {
            const int r1 = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(rows, M - m0 - rows)));
            store(6, c, r1, yp, N, m0 + rows, nb * 16);
            if (two_n) store(7, c, r1, yp, N, m0 + rows, nb * 16 + 16);
          }
        }
      }
    }
    _tile_release();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(qwenpd_amx, m) { m.def("linear(Tensor x, Tensor packed, int n) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwenpd_amx, CPU, m) { m.impl("linear", &amx_linear); }
