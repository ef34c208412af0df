// int8 weights -> bf16, exactly, by two byte-table lookups: shared by kernels/int8_matmul/cpu.cpp and
// kernels/amx_linear/amx.cpp (each #includes it; built with AVX512-BF16/VBMI). |q| <= 127: -128 would read as 0.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace qwenpd_int8 {

// bf16 bits of the integers 0..127 as low and high bytes, each table in two 64-byte registers
struct Tables {
  __m512i lo0, lo1, hi0, hi1;
  Tables() {
    alignas(64) uint8_t lo[128], hi[128];
    for (int a = 0; a < 128; ++a) {
      const float f = static_cast<float>(a);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      lo[a] = (bits >> 16) & 0xFF;  // exact in bf16: a has at most 7 significant bits
      hi[a] = bits >> 24;
    }
    lo0 = _mm512_load_si512(lo);
    lo1 = _mm512_load_si512(lo + 64);
    hi0 = _mm512_load_si512(hi);
    hi1 = _mm512_load_si512(hi + 64);
  }
};

// 64 int8 weights -> 64 bf16 in two registers: w0 holds bytes 16j + 0..7 and w1 bytes 16j + 8..15 of each 128-bit
// lane j (the order unpack gives)
inline void convert64(const Tables& t, __m512i q, __m512i& w0, __m512i& w1) {
  const __m512i a = _mm512_abs_epi8(q);
  const __m512i lo = _mm512_permutex2var_epi8(t.lo0, a, t.lo1);
  const __m512i mag = _mm512_permutex2var_epi8(t.hi0, a, t.hi1);
  const __m512i hi = _mm512_ternarylogic_epi32(mag, q, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);  // | sign
  w0 = _mm512_unpacklo_epi8(lo, hi);
  w1 = _mm512_unpackhi_epi8(lo, hi);
}

}  // namespace qwenpd_int8
