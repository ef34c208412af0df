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
// Weight-only int8 (`linear_int8`): the weight is packed as int8 in the same layout, each 64 bytes in the order
// the byte-table conversion leaves them in (pack_int8_weight), one scale per output; a thread converts a cache
// block's int8 to bf16 once (exact: |q| <= 127, the conversion of kernels/int8_matmul/cpu.cpp) into a buffer of
// its own and runs the same tile loops from it against every row of x, then scales each output's fp32 sum and
// rounds to bf16. Decode steps and prefill rows alike, batch invariant as the bf16 path.
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

#include "../int8_matmul/bf16_tables.h"

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

using qwenpd_int8::Tables;

// 64 int8 (in pack_int8_weight's order) -> 64 bf16 in the packed bf16 layout's order, stored at `out`
inline void convert64(const Tables& t, const int8_t* in, uint16_t* out) {
  __m512i w0, w1;
  qwenpd_int8::convert64(t, _mm512_loadu_si512(in), w0, w1);
  _mm512_store_si512(out, w0);
  _mm512_store_si512(out + 32, w1);
}
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

// micro's sums with int8 weight tiles (pack_int8_weight's) converted one k block ahead of their tile multiplies
// into a double buffer in L1 (few rows of x: converting a whole cache block first would read it back from L2)
template <int MT, int NT>
inline void micro_int8(const Tables& t, const uint16_t* x0, const uint16_t* x1, int64_t xstride, const int8_t* q0,
                       const int8_t* q1, int64_t kblocks, uint16_t (*buf)[2][kTile]) {
  _tile_zero(4);
  if (NT > 1) _tile_zero(5);
  if (MT > 1) _tile_zero(6);
  if (MT > 1 && NT > 1) _tile_zero(7);
  for (int64_t kb = 0; kb <= kblocks; ++kb) {
    if (kb < kblocks) {
      uint16_t (*slot)[kTile] = buf[kb & 1];
      for (int e = 0; e < kTile; e += 64) convert64(t, q0 + kb * kTile + e, slot[0] + e);
      if (NT > 1)
        for (int e = 0; e < kTile; e += 64) convert64(t, q1 + kb * kTile + e, slot[1] + e);
    }
    if (kb == 0) continue;
    const int64_t k = kb - 1;
    uint16_t (*slot)[kTile] = buf[k & 1];
    _tile_loadd(2, slot[0], 64);
    _tile_loadd(0, x0 + k * 32, xstride);
    _tile_dpbf16ps(4, 0, 2);
    if (NT > 1) {
      _tile_loadd(3, slot[1], 64);
      _tile_dpbf16ps(5, 0, 3);
    }
    if (MT > 1) {
      _tile_loadd(1, x1 + k * 32, xstride);
      _tile_dpbf16ps(6, 1, 2);
      if (NT > 1) _tile_dpbf16ps(7, 1, 3);
    }
  }
}

// one C tile's rows (rows of x) rounded to bf16 into y[m0.., n0..n0+16) (columns past N not written)
// (with `scale`: each output's sum times its scale, then rounded)
inline void store(int tile, float (*c)[16], int rows, at::BFloat16* y, int64_t N, int64_t m0, int64_t n0,
                  const at::BFloat16* scale = nullptr) {
  switch (tile) {
    case 4: _tile_stored(4, c, 64); break;
    case 5: _tile_stored(5, c, 64); break;
    case 6: _tile_stored(6, c, 64); break;
    default: _tile_stored(7, c, 64); break;
  }
  const __mmask16 mask = N - n0 >= 16 ? 0xFFFF : static_cast<__mmask16>(_bzhi_u32(~0u, N - n0));
  __m512 s = _mm512_set1_ps(1.0f);
  if (scale != nullptr)  // bf16 -> fp32: the bits shifted up
    s = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, scale + n0)), 16));
  for (int r = 0; r < rows; ++r) {
    __m512 v = _mm512_loadu_ps(c[r]);
    if (scale != nullptr) v = _mm512_mul_ps(v, s);
    _mm256_mask_storeu_epi16(y + (m0 + r) * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// y = x times the packed weight (bf16, or int8 with `scale`): the tile loops of every path
at::Tensor run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor* scale, int64_t N) {
  const bool int8 = scale != nullptr;
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "amx_linear: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0,
              "amx_linear: x must be bf16 [M, K] with K a multiple of 32");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == (int8 ? at::kChar : at::kBFloat16) &&
                  packed.size(2) == 16 && packed.size(3) == 32 && packed.size(1) * 32 == x.size(1) &&
                  packed.size(0) * 16 >= N && packed.size(0) * 16 < N + 16 && packed.is_contiguous(),
              "amx_linear: the weight must be packed by pack_weight (pack_int8_weight) for x's K and N outputs");
  TORCH_CHECK(!int8 || (scale->device().is_cpu() && scale->dim() == 1 && scale->scalar_type() == at::kBFloat16 && scale->size(0) == N &&
                        scale->is_contiguous()),
              "amx_linear: scale must be bf16 [N], contiguous");
  TORCH_CHECK(tiles_permitted(), "amx_linear: the kernel did not grant this process AMX tile state");
  static const Tables tables;
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), kblocks = K / 32, nblocks = packed.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();  // (no k block to sum: and the cache block below divides by K)
  // x's rows a tile: all of them up to 16; more are taken 16 at a time, the last ones padded to 16 with zeros
  const int rows = M < 16 ? static_cast<int>(M) : 16;
  const int64_t Mp = M < 16 ? M : (M + 15) / 16 * 16;
  at::Tensor xpad = xc;
  if (Mp != M) {
    xpad = at::zeros({Mp, K}, x.options());
    xpad.narrow(0, 0, M).copy_(xc);
  }
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xpad.data_ptr<at::BFloat16>());
  const void* wp = packed.data_ptr();
  const at::BFloat16* sp = int8 ? scale->data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t xstride = K * 2, mtiles = (Mp + rows - 1) / rows, npairs = (nblocks + 1) / 2;
  // weight columns a cache block: ~256 KB of bf16 weight (converted from int8 once a block), whole pairs of 16
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / (32 * K * 2));
  // int8 with at most 32 rows of x (a decode step): each weight tile is used once a call, converted just ahead
  // of its multiply in L1 (micro_int8); more rows: a cache block converted once, read again for every 32 rows
  const bool streamed = int8 && mtiles <= 2;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = t == 2 || t == 3 ? 16 : rows;
  }
  at::parallel_for(0, npairs, 1, [&](int64_t begin, int64_t end) {
    _tile_loadconfig(&cfg);
    struct Release {  // the tile state is given back however this thread's part ends
      ~Release() { _tile_release(); }
    } release;
    alignas(64) float c[16][16];
    uint16_t* buffer = nullptr;  // int8: a block's weights converted, 2 * chunk * kblocks tiles
    at::Tensor held;
    alignas(64) uint16_t ahead[2][2][kTile];  // int8, few rows: micro_int8's double buffer
    if (int8 && !streamed) {
      held = at::empty({2 * std::min(chunk, end - begin) * kblocks * kTile + 32}, x.options());
      buffer = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(held.data_ptr()) + 63) & ~uintptr_t(63));
    }
    for (int64_t p0 = begin; p0 < end; p0 += chunk) {
      const int64_t p1 = std::min(end, p0 + chunk);
      const int64_t nb0 = 2 * p0, nb1 = std::min(nblocks, 2 * p1);
      // the block's first weight tile: int8 ones converted to bf16 here, once for every row of x
      const uint16_t* wblock = static_cast<const uint16_t*>(wp) + (int8 ? 0 : nb0 * kblocks * kTile);
      if (int8 && !streamed) {
        const int8_t* q = static_cast<const int8_t*>(wp) + nb0 * kblocks * kTile;
        for (int64_t e = 0; e < (nb1 - nb0) * kblocks * kTile; e += 64) convert64(tables, q + e, buffer + e);
        wblock = buffer;
      }
      for (int64_t mt = 0; mt < mtiles; mt += 2) {
        const bool two_m = mt + 1 < mtiles;
        const uint16_t* x0 = xp + mt * rows * K;
        const uint16_t* x1 = two_m ? x0 + rows * K : x0;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t nb = 2 * p;
          const bool two_n = nb + 1 < nblocks;
          if (streamed) {
            const int8_t* q0 = static_cast<const int8_t*>(wp) + nb * kblocks * kTile;
            const int8_t* q1 = two_n ? q0 + kblocks * kTile : q0;
            if (two_m && two_n) micro_int8<2, 2>(tables, x0, x1, xstride, q0, q1, kblocks, ahead);
            else if (two_m) micro_int8<2, 1>(tables, x0, x1, xstride, q0, q1, kblocks, ahead);
            else if (two_n) micro_int8<1, 2>(tables, x0, x1, xstride, q0, q1, kblocks, ahead);
            else micro_int8<1, 1>(tables, x0, x1, xstride, q0, q1, kblocks, ahead);
          } else {
            const uint16_t* w0 = wblock + (nb - nb0) * kblocks * kTile;
            const uint16_t* w1 = two_n ? w0 + kblocks * kTile : w0;
            if (two_m && two_n) micro<2, 2>(x0, x1, xstride, w0, w1, kblocks);
            else if (two_m) micro<2, 1>(x0, x1, xstride, w0, w1, kblocks);
            else if (two_n) micro<1, 2>(x0, x1, xstride, w0, w1, kblocks);
            else micro<1, 1>(x0, x1, xstride, w0, w1, kblocks);
          }
          const int64_t m0 = mt * rows;
          const int r0 = static_cast<int>(std::min<int64_t>(rows, M - m0));
          store(4, c, r0, yp, N, m0, nb * 16, sp);
          if (two_n) store(5, c, r0, yp, N, m0, nb * 16 + 16, sp);
          if (two_m) {
            const int r1 = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(rows, M - m0 - rows)));
            store(6, c, r1, yp, N, m0 + rows, nb * 16, sp);
            if (two_n) store(7, c, r1, yp, N, m0 + rows, nb * 16 + 16, sp);
          }
        }
      }
    }
  });
  return y;
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) { return run(x, packed, nullptr, N); }

at::Tensor amx_linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t N) {
  return run(x, packed, &scale, N);
}

}  // namespace

TORCH_LIBRARY(qwenpd_amx, m) {
  m.def("linear(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor packed, Tensor scale, int n) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwenpd_amx, CPU, m) {
  m.impl("linear", &amx_linear);
  m.impl("linear_int8", &amx_linear_int8);
}
