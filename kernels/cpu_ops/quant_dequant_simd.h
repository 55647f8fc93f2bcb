// Dequantization of GGUF blocks into float32 or bfloat16 tiles (the batched path of `quant_linear.cpp`),
// included inside a namespace under `#pragma GCC target` after `quant_simd_blocks.h`. The includer
// defines QL_BF16: 1 to round to bfloat16 with AVX512-BF16's `vcvtneps2bf16`, 0 with AVX2 integer ops.
// No include guard: it is meant to be included more than once, each time in its own namespace.

// ---- dequantization into float32 or bfloat16 tiles (the batched path) ----
//
// Every value is one fused multiply-add, scale * q + offset, which rounds once: the same float32 as
// gguf's dequantization (whose products are exact, or round once as here for Q6_K's d * sc * (q - 32)).

static inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

// rounded to nearest bfloat16 (ties to even, as torch rounds finite values), 8 at a time
static inline void store8(at::BFloat16* dst, __m256 v) {
#if QL_BF16
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(v)));
#else
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
#endif
}

// 32 bytes of q (unsigned, or signed for Q8_0) -> dst[i] = scale * q[i] + offset, with one scale and
// offset for elements 0-15 and another for 16-31 (Q6_K's sub-blocks of 16).
template <bool Signed, typename T>
static inline void expand32(__m256i q, __m256 scale0, __m256 offset0, __m256 scale1, __m256 offset1, T* dst) {
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int h = 0; h < 2; ++h) {
    const __m256 scale = h ? scale1 : scale0, offset = h ? offset1 : offset0;
    const __m128i part = halves[h];
    const __m128i parts[2] = {part, _mm_srli_si128(part, 8)};
    for (int i = 0; i < 2; ++i) {
      const __m256i ints = Signed ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]);
      store8(dst + 16 * h + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, offset));
    }
  }
}

template <bool Signed, typename T>
static inline void expand32(__m256i q, float scale, float offset, T* dst) {
  const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
  expand32<Signed>(q, s, o, s, o, dst);
}

template <int F, typename T, int... j>
static inline void k_dequantize(const uint8_t* block, T* dst, std::integer_sequence<int, j...>) {
  if constexpr (F == kQ6_K) {
    const float d = half_value(block + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(block + 192);
    const auto one = [&](auto index) {
      constexpr int i = decltype(index)::value;
      const float s0 = d * static_cast<float>(sc[2 * i]), s1 = d * static_cast<float>(sc[2 * i + 1]);
      expand32<false>(k_values<F, i>(block), _mm256_set1_ps(s0), _mm256_set1_ps(-32.0f * s0), _mm256_set1_ps(s1),
                      _mm256_set1_ps(-32.0f * s1), dst + 32 * i);
    };
    (one(std::integral_constant<int, j>{}), ...);
  } else {
    const float d = half_value(block), dmin = half_value(block + 2);
    uint32_t words[4];
    k_scale_words(block + 4, words);
    uint8_t sc[16];  // sc[0..7], then m[0..7]
    std::memcpy(sc, words, 16);
    const auto one = [&](auto index) {
      constexpr int i = decltype(index)::value;
      expand32<false>(k_values<F, i>(block), d * static_cast<float>(sc[i]), -dmin * static_cast<float>(sc[8 + i]),
                      dst + 32 * i);
    };
    (one(std::integral_constant<int, j>{}), ...);
  }
}

// 32 F16 / BF16 weights widened to float32 (bfloat16 into bfloat16: copied as they are)
template <typename T>
static inline void float16_block(int f, const uint8_t* block, T* dst) {
  if (f == kBF16 && std::is_same_v<T, at::BFloat16>) {
    std::memcpy(dst, block, 64);
    return;
  }
  for (int i = 0; i < 4; ++i) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * i));
    const __m256 v = f == kF16 ? _mm256_cvtph_ps(raw)
                               : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    store8(dst + 8 * i, v);
  }
}

// Weight rows [0, rows) of `w` dequantized into out [rows, k].
template <int F, typename T>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t rows, T* out) {
  constexpr int n = block_elements(F);
  constexpr int64_t bytes = block_bytes(F);
  const int64_t nb = k / n;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = w + r * row_bytes + b * bytes;
      T* dst = out + r * k + b * n;
      if constexpr (is_k(F)) {
        k_dequantize<F>(block, dst, std::make_integer_sequence<int, 8>{});
      } else if constexpr (is_float16(F)) {
        float16_block(F, block, dst);
      } else {
        const float d = half_value(block);
        if constexpr (F == kQ8_0) expand32<true>(load256(block + 2), d, 0.0f, dst);
        if constexpr (F == kQ4_0) expand32<false>(nibbles(block + 2), d, -8.0f * d, dst);
        if constexpr (F == kQ4_1) expand32<false>(nibbles(block + 4), d, half_value(block + 2), dst);
        if constexpr (F == kQ5_0) expand32<false>(q5_values<F>(block), d, -16.0f * d, dst);
        if constexpr (F == kQ5_1) expand32<false>(q5_values<F>(block), d, half_value(block + 2), dst);
      }
    }
  }
}

template <typename T>
void dequantize_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t k, int64_t rows, T* out) {
  with_format(type, [&](auto f) { dequantize_rows<decltype(f)::value>(w, row_bytes, k, rows, out); });
}
