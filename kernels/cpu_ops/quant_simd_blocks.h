// Block decoding shared by the SIMD GEMV (`quant_linear_simd.h`) and dequantization
// (`quant_dequant_simd.h`), included once per instruction set inside its own namespace under
// `#pragma GCC target` (see `quant_linear.cpp`). Layouts: `quant_formats.h`. No include guard: it is meant
// to be included more than once, each time in its own namespace.

using namespace ql;

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float half_value(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

static inline __m256i load256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// A Q4 block's 16 bytes as 32 unsigned nibbles in element order: low nibbles are elements 0-15, high 16-31.
static inline __m256i nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Sub-block j's 32 values as unsigned bytes in element order (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63).
template <int F, int j>
static inline __m256i k_values(const uint8_t* block) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (F == kQ6_K) {
    constexpr int half = j / 4, t = j % 4;
    const __m256i packed = load256(block + 64 * half + 32 * (t % 2));
    const __m256i low = _mm256_and_si256(t / 2 ? _mm256_srli_epi16(packed, 4) : packed, low4);
    const __m256i bits = load256(block + 128 + 32 * half);  // bits 2t..2t+1 move to 4..5
    __m256i top;
    if constexpr (t < 2) top = _mm256_slli_epi16(bits, 4 - 2 * t);
    else if constexpr (t == 2) top = bits;
    else top = _mm256_srli_epi16(bits, 2);
    return _mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
  } else {
    const __m256i packed = load256(block + (F == kQ5_K ? 48 : 16) + 32 * (j / 2));
    const __m256i low = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(packed, 4) : packed, low4);
    if constexpr (F == kQ4_K) return low;
    const __m256i bits = load256(block + 16);  // bit j moves to bit 4 (16-bit shifts: no byte's bits cross)
    __m256i fifth;
    if constexpr (j <= 4) fifth = _mm256_slli_epi16(bits, 4 - j);
    else fifth = _mm256_srli_epi16(bits, j - 4);
    return _mm256_or_si256(low, _mm256_and_si256(fifth, _mm256_set1_epi8(0x10)));
  }
}


// Q5_0 / Q5_1's fifth bits (4 bytes, bit i: element i) as 32 bytes in element order: 0x10 where set, else 0.
static inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  // byte i takes byte i / 8 of the word (each 128-bit lane holds the word's 4 bytes at its start)
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i mask = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(0x10));
}

// A Q5_0 / Q5_1 block's 32 values (0..31) as unsigned bytes in element order.
template <int F>
static inline __m256i q5_values(const uint8_t* block) {
  constexpr int high = F == kQ5_0 ? 2 : 4;
  return _mm256_or_si256(nibbles(block + high + 4), fifth_bits(block + high));
}
