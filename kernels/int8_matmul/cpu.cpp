// y[m, n] = bf16(sum_k x[m, k] q[n, k] * scale[n]): weight-only int8 matmul for decode-step rows on CPUs with
// AVX512-BF16 and AVX512-VBMI. The plain reference is naive.py; the equivalence tests are
// tests/kernels/test_int8_matmul.py.
//
// Why not aten::_weight_int8pack_mm: it converts each weight to fp32 and multiplies it in fp32 once per row of x,
// which makes it compute-bound below memory speed from one row on and 0.5-0.7x bf16 from 8 rows on. Here 64
// weights at a time become bf16 once (two byte-table lookups, exact: |q| <= 127) and every row of x takes them by
// bf16 dot products (vdpbf16ps, fp32 sums). A row's sums run in the same order whatever the row count, the other
// rows, or the thread split: every row of x gets the same bits alone or in any batch.
//
// Preconditions, not checked per call (a check would read the weights once more): q in [-127, 127] (the quantizer,
// engine/weights.py int8_quantize, clamps to it; -128 would read as 0). vdpbf16ps treats denormal inputs as zero,
// so a denormal x element counts as 0 (the same for every row: batch invariance holds).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "bf16_tables.h"

namespace {

using qwenpd_int8::convert64;
using qwenpd_int8::Tables;

// rows of x in the weights' unpacked column order, zero-padded to whole 64s: [M, Kp]
std::vector<uint16_t> permute_x(const uint16_t* x, int64_t M, int64_t K, int64_t Kp) {
  alignas(64) uint16_t i0[32], i1[32];
  for (int p = 0; p < 32; ++p) {
    i0[p] = 16 * (p / 8) + p % 8;
    i1[p] = 16 * (p / 8) + 8 + p % 8;
  }
  const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
  std::vector<uint16_t> out(M * Kp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < Kp; k += 64) {
      const uint16_t* src = x + m * K + k;
      const int64_t left = K - k;
      const __m512i a = left >= 32 ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, left), src);
      const __m512i b = left >= 64 ? _mm512_loadu_si512(src + 32)
                        : left > 32 ? _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, left - 32), src + 32)
                                    : _mm512_setzero_si512();
      _mm512_storeu_si512(out.data() + m * Kp + k, _mm512_permutex2var_epi16(a, idx0, b));
      _mm512_storeu_si512(out.data() + m * Kp + k + 32, _mm512_permutex2var_epi16(a, idx1, b));
    }
  return out;
}

// MT rows of x times R weight rows from n0
template <int MT, int R>
inline void tile(const Tables& t, const uint16_t* xp, int64_t Kp, const int8_t* q, const at::BFloat16* scale,
                 at::BFloat16* y, int64_t N, int64_t K, int64_t n0) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    __m512i w0[R], w1[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* p = q + (n0 + r) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(p + R * K), _MM_HINT_T0);  // the next tile's same column
      const __m512i b = K - k >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(_bzhi_u64(~0ULL, K - k), p);
      convert64(t, b, w0[r], w1[r]);
    }
    for (int m = 0; m < MT; ++m) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp + m * Kp + k);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xp + m * Kp + k + 32);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], x0, (__m512bh)w0[r]);
        acc[m][r] = _mm512_dpbf16_ps(acc[m][r], x1, (__m512bh)w1[r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      y[m * N + n0 + r] = at::BFloat16(_mm512_reduce_add_ps(acc[m][r]) * static_cast<float>(scale[n0 + r]));
}

template <int MT>
void rows(const Tables& t, const uint16_t* xp, int64_t Kp, const int8_t* q, const at::BFloat16* scale,
          at::BFloat16* y, int64_t N, int64_t K, int64_t begin, int64_t end) {
  constexpr int R = MT <= 4 ? 4 : 2;  // accumulators MT x R, weights 2R, tables 4: within 32 registers
  int64_t n = begin;
  for (; n + R <= end; n += R) tile<MT, R>(t, xp, Kp, q, scale, y, N, K, n);
  for (; n < end; ++n) tile<MT, 1>(t, xp, Kp, q, scale, y, N, K, n);
}

using RowsFn = void (*)(const Tables&, const uint16_t*, int64_t, const int8_t*, const at::BFloat16*, at::BFloat16*,
                        int64_t, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[8] = {rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>, rows<7>, rows<8>};

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "int8_matmul: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_matmul: x must be bf16 [M, K]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.size(1) == x.size(1),
              "int8_matmul: q must be int8 [N, K] with x's K");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kBFloat16 && scale.size(0) == q.size(0),
              "int8_matmul: scale must be bf16 [N]");
  static const Tables tables;
  const at::Tensor xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kp = (K + 63) / 64 * 64;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const std::vector<uint16_t> xp = permute_x(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K, Kp);
  const int8_t* qp = qc.data_ptr<int8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    // more than 8 rows: the weights are converted again for every 8 (a buffer of converted weight rows shared by
    // every 8, with or without blocking over columns, measured slower on Qwen3.6-27B's shapes: 0.48-0.62x bf16
    // against 0.62-0.81x at 16 and 32 rows)
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mt = std::min<int64_t>(8, M - m0);
      kRows[mt - 1](tables, xp.data() + m0 * Kp, Kp, qp, sp, yp + m0 * N, N, K, begin, end);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(qwenpd_int8, m) { m.def("int8_matmul(Tensor x, Tensor q, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwenpd_int8, CPU, m) { m.impl("int8_matmul", &int8_matmul); }
