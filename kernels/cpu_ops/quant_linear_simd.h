// The SIMD body of `quant_linear.cpp`, included once per instruction set under `#pragma GCC target`
// (so each copy may use its own instructions while the file itself is built for any x86-64 CPU).
// The includer defines QL_VNNI: 1 for AVX-512 VNNI's `vpdpbusd`, 0 for AVX2's `vpmaddubsw` + `vpmaddwd`.
// No include guard: it is meant to be included twice, each time inside its own namespace.

// 8 int32 sums, each of 4 adjacent products u[i] * s[i] (u unsigned bytes, s signed bytes).
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if QL_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // pair sums fit int16 without saturating: |u| <= 128 and |s| <= 127 give at most 2 * 128 * 127 = 32512
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// A Q4 block's 16 bytes as 32 unsigned nibbles in element order: low nibbles are elements 0-15, high 16-31.
static inline __m256i nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// One block's contribution to R accumulators: the integer dot products scaled by d_w * d_x, and the
// per-block term (Q4_0's -8, Q4_1's minimum) into `bias`.
template <int F, int R>
static inline void block_into(const QuantArgs& a, const uint8_t* block, int64_t b, __m256* acc, __m256* bias) {
  const float d = half_at(block);
  __m256i u;  // the unsigned operand: |w| for Q8_0, the nibbles for Q4_x
  __m256i w;  // Q8_0's signed weights, whose signs move onto the activations
  float c = 0.0f;
  if constexpr (F == kQ8_0) {
    w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
    u = _mm256_sign_epi8(w, w);
  } else if constexpr (F == kQ4_0) {
    u = nibbles(block + 2);
    c = d;
  } else {
    u = nibbles(block + 4);
    c = half_at(block + 2);
  }
  for (int r = 0; r < R; ++r) {
    __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + r * a.k + b * 32));
    if constexpr (F == kQ8_0) q = _mm256_sign_epi8(q, w);
    const __m256 products = _mm256_cvtepi32_ps(dot_u8s8(u, q));
    acc[r] = _mm256_fmadd_ps(products, _mm256_set1_ps(d * a.xd[r * a.nb + b]), acc[r]);
    // the block term goes into lane 0 of its own vector: a scalar chain would bound the loop's speed
    if constexpr (F != kQ8_0) bias[r] = _mm256_add_ps(bias[r], _mm256_castps128_ps256(_mm_set_ss(c * a.xs[r * a.nb + b])));
  }
}

// y[r][o] for the R activation rows of a tile and weight rows [o_begin, o_end); see `QuantArgs`.
// For up to 4 rows, even and odd blocks go into separate accumulators (two dependency chains).
template <int F, int R>
void rows_kernel(const QuantArgs& a, int64_t o_begin, int64_t o_end) {
  constexpr int64_t bytes = block_bytes(F);
  constexpr int kSets = R <= 4 ? 2 : 1;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    __m256 acc[kSets][R], bias[kSets][R];
    for (int s = 0; s < kSets; ++s)
      for (int r = 0; r < R; ++r) acc[s][r] = bias[s][r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + kSets <= a.nb; b += kSets)
      for (int s = 0; s < kSets; ++s) block_into<F, R>(a, row + (b + s) * bytes, b + s, acc[s], bias[s]);
    for (; b < a.nb; ++b) block_into<F, R>(a, row + b * bytes, b, acc[0], bias[0]);
    for (int r = 0; r < R; ++r) {
      __m256 total = _mm256_add_ps(acc[0][r], bias[0][r]);
      if constexpr (kSets == 2) total = _mm256_add_ps(total, _mm256_add_ps(acc[1][r], bias[1][r]));
      a.y[r * a.ldy + o] = hsum(total);
    }
  }
}

template <int F>
RowsFn pick(int rows) {
  switch (rows) {
    case 1: return rows_kernel<F, 1>;
    case 2: return rows_kernel<F, 2>;
    case 3: return rows_kernel<F, 3>;
    case 4: return rows_kernel<F, 4>;
    case 5: return rows_kernel<F, 5>;
    case 6: return rows_kernel<F, 6>;
    case 7: return rows_kernel<F, 7>;
    default: return rows_kernel<F, 8>;
  }
}

RowsFn kernel_for(int qtype, int rows) {
  switch (qtype) {
    case kQ8_0: return pick<kQ8_0>(rows);
    case kQ4_0: return pick<kQ4_0>(rows);
    default: return pick<kQ4_1>(rows);
  }
}
