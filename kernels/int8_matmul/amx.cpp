// y[m, n] = bf16(sum_k x[m, k] q[n, k] * scale[n]) with AMX tiles: the weight-only int8 matmul of decode-step
// rows on CPUs with AMX-BF16 (and AVX512-BF16/VBMI for the conversion). The plain reference is naive.py; the
// equivalence tests are tests/kernels/test_int8_matmul.py (both kernels).
//
// Why: cpu.cpp's bf16 dot products (vdpbf16ps) cost one instruction per row of x per 32 weights, so from 8 rows
// on a step is bound by them, not by reading the weights (int8 decode batch 8 ran at bf16's speed on an AMX CPU,
// batch 16 at 0.6x). A tile multiply (tdpbf16ps) takes 16 weight rows x 32 weights against up to 16 rows of x at
// once. The weights are the tiles' A operand, in their own row-major order: 16 weight rows x 64 int8 become bf16
// by cpu.cpp's exact two byte-table lookups (in the lane order unpack gives) and are stored to a 2 KB buffer the
// tile loads read back from L1; x, packed once a call in the tiles' pair-interleaved B layout (in the same
// permuted order of k), is the B operand; C[n][m] is the output transposed (16 weight rows x the rows of x).
//
// Batch invariance: each output element is its own fp32 sum over k in one fixed order (per 64-weight block, the
// two tile multiplies, each over its 16 pairs in order), whatever the number of rows of x, the other rows, the
// thread split or the weight rows' tiling: a row gets the same bits alone or in any batch (tested). The bits are
// not cpu.cpp's (another order of the same sums): the weight fingerprint names the kernel that ran.
//
// Preconditions as cpu.cpp: q in [-127, 127]; tdpbf16ps, like vdpbf16ps, treats denormal inputs as zero.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: ask the kernel for an extended state component
constexpr int kXfeatureXtiledata = 18;     // AMX tile data

// Linux hands a process AMX's tile state only once asked (ARCH_REQ_XCOMP_PERM); asked once per process
bool tiles_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct Tables {
  __m512i lo0, lo1, hi0, hi1;
  Tables() {
    alignas(64) uint8_t lo[128], hi[128];
    for (int a = 0; a < 128; ++a) {
      const float f = static_cast<float>(a);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      lo[a] = (bits >> 16) & 0xFF;
      hi[a] = bits >> 24;
    }
    lo0 = _mm512_load_si512(lo);
    lo1 = _mm512_load_si512(lo + 64);
    hi0 = _mm512_load_si512(hi);
    hi1 = _mm512_load_si512(hi + 64);
  }
};

// 64 int8 -> 64 bf16 as cpu.cpp's convert64: w0 holds k = 16j + 0..7 and w1 k = 16j + 8..15 of each 128-bit lane j
inline void convert64(const Tables& t, __m512i q, __m512i& w0, __m512i& w1) {
  const __m512i a = _mm512_abs_epi8(q);
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, a, t.lo1);
  const __m512i mag = _mm512_permutex2var_epi8(t.hi0, a, t.hi1);
  const __m512i hi = _mm512_ternarylogic_epi32(mag, q, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  w0 = _mm512_unpacklo_epi8(lo, hi);
  w1 = _mm512_unpackhi_epi8(lo, hi);
}

inline int64_t k_of(int half, int p) { return 16 * (p / 8) + 8 * half + p % 8; }  // w<half> position p -> k

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int kMaxCols = 64;  // rows of x per pass over the weights: 4 C tiles of 16 columns

// x [M, K] (M <= kMaxCols) as B tiles: for each 64-wide k block, each 16-column block of x's rows and each half,
// 16 tile rows of `cols` (x, k) pairs: B[i][2c + j] = x[c][k0 + k_of(half, 2i + j)]; zero past K and past M
std::vector<uint16_t> pack_x(const uint16_t* x, int64_t xstride, int64_t M, int64_t K, int64_t Kp, int cols,
                             int blocks) {
  std::vector<uint16_t> out(static_cast<size_t>(Kp / 64) * blocks * 2 * 16 * cols * 2, 0);
  uint16_t* o = out.data();
  for (int64_t k0 = 0; k0 < Kp; k0 += 64)
    for (int b = 0; b < blocks; ++b)
      for (int half = 0; half < 2; ++half)
        for (int i = 0; i < 16; ++i, o += 2 * cols)
          for (int c = 0; c < cols; ++c) {
            const int64_t m = b * 16 + c;
            if (m >= M) continue;
            for (int j = 0; j < 2; ++j) {
              const int64_t k = k0 + k_of(half, 2 * i + j);
              if (k < K) o[2 * c + j] = x[m * xstride + k];
            }
          }
  return out;
}

// the B tile multiplies of one converted 64-wide k block (a: its two halves) into C tiles 4..3+B
template <int B>
inline void multiply(const uint16_t (*a)[16][32], const uint16_t* xk, int64_t bstep, int cols) {
  _tile_loadd(0, a[0], 64);
  _tile_loadd(1, a[1], 64);
  _tile_loadd(2, xk, cols * 4);
  _tile_loadd(3, xk + bstep, cols * 4);
  _tile_dpbf16ps(4, 0, 2);
  _tile_dpbf16ps(4, 1, 3);
  if (B > 1) {
    _tile_loadd(2, xk + 2 * bstep, cols * 4);
    _tile_loadd(3, xk + 3 * bstep, cols * 4);
    _tile_dpbf16ps(5, 0, 2);
    _tile_dpbf16ps(5, 1, 3);
  }
  if (B > 2) {
    _tile_loadd(2, xk + 4 * bstep, cols * 4);
    _tile_loadd(3, xk + 5 * bstep, cols * 4);
    _tile_dpbf16ps(6, 0, 2);
    _tile_dpbf16ps(6, 1, 3);
  }
  if (B > 3) {
    _tile_loadd(2, xk + 6 * bstep, cols * 4);
    _tile_loadd(3, xk + 7 * bstep, cols * 4);
    _tile_dpbf16ps(7, 0, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
}

// 16 weight rows from n0 (fewer at the end) against every row of x (B blocks of `cols`): y's columns n0..n0+15.
// The k blocks are converted one ahead of their tile multiplies (two buffers), so the tile loads never wait for
// the stores just made.
template <int B>
void weight_rows(const Tables& t, const uint16_t* xb, int cols, const int8_t* q, const at::BFloat16* scale,
                 at::BFloat16* y, int64_t ystride, int64_t M, int64_t N, int64_t K, int64_t Kp, int64_t n0) {
  alignas(64) uint16_t a[2][2][16][32];
  alignas(64) float c[16][16];
  const int rows = static_cast<int>(std::min<int64_t>(16, N - n0));
  if (rows < 16) std::memset(a, 0, sizeof(a));
  _tile_zero(4);
  if (B > 1) _tile_zero(5);
  if (B > 2) _tile_zero(6);
  if (B > 3) _tile_zero(7);
  const int64_t bstep = 16 * cols * 2;  // uint16 per B tile
  const int64_t kblocks = Kp / 64;
  for (int64_t kb = 0; kb <= kblocks; ++kb) {
    if (kb < kblocks) {
      const int64_t k0 = kb * 64, left = K - k0;
      const __mmask64 mask = left >= 64 ? ~0ULL : _bzhi_u64(~0ULL, left);
      uint16_t (*buf)[16][32] = a[kb & 1];
      for (int r = 0; r < rows; ++r) {
        const int8_t* p = q + (n0 + r) * K + k0;
        _mm_prefetch(reinterpret_cast<const char*>(p + 16 * K), _MM_HINT_T0);  // the next 16 rows, same place
        __m512i w0, w1;
        convert64(t, _mm512_maskz_loadu_epi8(mask, p), w0, w1);
        _mm512_store_si512(buf[0][r], w0);
        _mm512_store_si512(buf[1][r], w1);
      }
    }
    if (kb > 0) multiply<B>(a[(kb - 1) & 1], xb + (kb - 1) * B * 2 * bstep, bstep, cols);
  }
  for (int b = 0; b < B; ++b) {
    switch (b) {
      case 0: _tile_stored(4, c, 64); break;
      case 1: _tile_stored(5, c, 64); break;
      case 2: _tile_stored(6, c, 64); break;
      default: _tile_stored(7, c, 64); break;
    }
    const int64_t m_end = std::min<int64_t>(M, b * 16 + cols);
    for (int r = 0; r < rows; ++r) {
      const float s = static_cast<float>(scale[n0 + r]);
      for (int64_t m = b * 16; m < m_end; ++m) y[m * ystride + n0 + r] = at::BFloat16(c[r][m - b * 16] * s);
    }
  }
}

using RowsFn = void (*)(const Tables&, const uint16_t*, int, const int8_t*, const at::BFloat16*, at::BFloat16*,
                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[4] = {weight_rows<1>, weight_rows<2>, weight_rows<3>, weight_rows<4>};

at::Tensor int8_matmul_amx(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "int8_matmul: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_matmul: x must be bf16 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.size(1) == x.size(1),
              "int8_matmul: q must be int8 [N, K] with x's K");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kBFloat16 && scale.size(0) == q.size(0),
              "int8_matmul: scale must be bf16 [N]");
  TORCH_CHECK(tiles_permitted(), "int8_matmul: the kernel did not grant this process AMX tile state");
  static const Tables tables;
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kp = (K + 63) / 64 * 64;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const int8_t* qp = qc.data_ptr<int8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  for (int64_t m0 = 0; m0 < M; m0 += kMaxCols) {  // more rows: the weights are converted again for every 64
    const int64_t mp = std::min<int64_t>(kMaxCols, M - m0);
    const int cols = mp < 16 ? static_cast<int>(mp) : 16;  // columns a tile: x's rows, up to 16
    const int blocks = static_cast<int>((mp + 15) / 16);
    const std::vector<uint16_t> xb = pack_x(xp + m0 * K, K, mp, K, Kp, cols, blocks);
    TileConfig cfg;
    cfg.rows[0] = cfg.rows[1] = 16;
    cfg.colsb[0] = cfg.colsb[1] = 64;
    for (int t = 2; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = static_cast<uint16_t>(cols * 4);
    }
    at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t begin, int64_t end) {
      _tile_loadconfig(&cfg);
      for (int64_t nb = begin; nb < end; ++nb)
        kRows[blocks - 1](tables, xb.data(), cols, qp, sp, yp + m0 * N, N, mp, N, K, Kp, nb * 16);
      _tile_release();
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(qwenpd_int8_amx, m) { m.def("int8_matmul(Tensor x, Tensor q, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwenpd_int8_amx, CPU, m) { m.impl("int8_matmul", &int8_matmul_amx); }
