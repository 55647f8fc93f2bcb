// The SIMD GEMV of `quant_linear.cpp`, included once per instruction set under `#pragma GCC target`
// (so each copy may use its own instructions while the file itself is built for any x86-64 CPU), after
// `quant_simd_blocks.h`. The includer defines QL_VNNI: 1 for AVX-512 VNNI's `vpdpbusd` / `vpdpwssd`, 0 for
// AVX2's `vpmaddubsw` + `vpmaddwd`. No include guard: it is meant to be included twice, each time inside
// its own namespace. Layouts and `QuantArgs`: `quant_formats.h`.

// 8 int32 sums, each of 4 adjacent products u[i] * s[i] (u unsigned bytes, s signed bytes).
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if QL_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  // pair sums fit int16 without saturating: |u| <= 128 and |s| <= 127 give at most 2 * 128 * 127 = 32512
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc + the pair sums of u * s (16 int16: u <= 63, |s| <= 127, so at most 16002, no saturation), each
// times its int16 scale, added in pairs into 8 int32 lanes.
static inline __m256i dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i scales) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
#if QL_VNNI
  return _mm256_dpwssd_epi32(acc, pairs, scales);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scales));
#endif
}

// ---- 32-element formats: Q8_0, Q4_0, Q4_1 ----

// One block's contribution to R accumulators: the integer dot products scaled by d_w * d_x, and the
// per-block term (Q4_0's -8, Q4_1's minimum) of all the tile's rows at once into `bias` (lane r: row r).
// The tile's activation scales and terms come as 8 lanes per block (`QuantArgs`), so that d_w * d_x is one
// multiply for all rows, each row's lane then broadcast by a permute.
template <int F, int R>
static inline void block_into(const QuantArgs& a, const uint8_t* block, int64_t b, __m256* acc, __m256& bias) {
  const __m256 d = _mm256_set1_ps(half_value(block));
  __m256i u;  // the unsigned operand: |w| for Q8_0, the nibbles for Q4_x
  __m256i w;  // Q8_0's signed weights, whose signs move onto the activations
  if constexpr (F == kQ8_0) {
    w = load256(block + 2);
    u = _mm256_sign_epi8(w, w);
  } else if constexpr (F == kQ4_0) {
    u = nibbles(block + 2);
    bias = _mm256_fmadd_ps(d, _mm256_loadu_ps(a.xs + b * 8), bias);
  } else {
    u = nibbles(block + 4);
    bias = _mm256_fmadd_ps(_mm256_set1_ps(half_value(block + 2)), _mm256_loadu_ps(a.xs + b * 8), bias);
  }
  const __m256 scales = _mm256_mul_ps(d, _mm256_loadu_ps(a.xd + b * 8));
  for (int r = 0; r < R; ++r) {
    __m256i q = load256(a.xq + r * a.k + b * 32);
    if constexpr (F == kQ8_0) q = _mm256_sign_epi8(q, w);
    const __m256 products = _mm256_cvtepi32_ps(dot_u8s8(u, q));
    acc[r] = _mm256_fmadd_ps(products, _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(r)), acc[r]);
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
    __m256 acc[kSets][R], bias[kSets];
    for (int s = 0; s < kSets; ++s) {
      bias[s] = _mm256_setzero_ps();
      for (int r = 0; r < R; ++r) acc[s][r] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    for (; b + kSets <= a.nb; b += kSets)
      for (int s = 0; s < kSets; ++s) block_into<F, R>(a, row + (b + s) * bytes, b + s, acc[s], bias[s]);
    for (; b < a.nb; ++b) block_into<F, R>(a, row + b * bytes, b, acc[0], bias[0]);
    alignas(32) float terms[8];
    _mm256_store_ps(terms, kSets == 2 ? _mm256_add_ps(bias[0], bias[kSets - 1]) : bias[0]);
    for (int r = 0; r < R; ++r) {
      __m256 total = acc[0][r];
      if constexpr (kSets == 2) total = _mm256_add_ps(total, acc[1][r]);
      a.y[r * a.ldy + o] = hsum(total) + terms[r];
    }
  }
}

// ---- K-quants: super-blocks of 256, activations in int8 per super-block ----
//
// Per super-block and activation row, the integer sums sum_s scale_s * dot(q_s, q_x) collect in 8 int32
// lanes (each sub-block's pair sums times its scale: `dot_scaled`), then one float multiply-add by d * d_x.
// The minimums (Q4_K, Q5_K) and Q6_K's offset of 32 multiply the activations' int16 sums per 16 elements
// (`QuantArgs::xb`), so no block needs a float term of its own.

// An int16 vector with element `lo` of v's low 128-bit lane in all of that lane's slots, and element `hi`
// of the high lane in all of the high lane's.
template <int lo, int hi>
static inline __m256i lane_broadcast16(__m256i v) {
  const __m256i control = _mm256_set_m128i(_mm_set1_epi16(static_cast<short>(((2 * hi + 1) << 8) | (2 * hi))),
                                           _mm_set1_epi16(static_cast<short>(((2 * lo + 1) << 8) | (2 * lo))));
  return _mm256_shuffle_epi8(v, control);
}

// A K-quant super-block's scales, decoded once per weight row and super-block for every activation row.
template <int F>
struct KScales {
  float d, dmin;
  __m256i scales;  // Q4_K / Q5_K: sc[0..7] as int16 in both lanes; Q6_K: sc[0..15] as int16
  __m256i low, high;  // Q6_K: sc[0..7] and sc[8..15], each in both lanes
  __m256i mins;       // Q4_K / Q5_K: m[s] twice each, to multiply the sums per 16 elements

  explicit KScales(const uint8_t* block) {
    if constexpr (F == kQ6_K) {
      d = half_value(block + 208);
      dmin = 0.0f;
      scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 192)));
      low = _mm256_permute4x64_epi64(scales, 0x44);
      high = _mm256_permute4x64_epi64(scales, 0xEE);
    } else {
      d = half_value(block);
      dmin = half_value(block + 2);
      uint32_t w[4];
      k_scale_words(block + 4, w);
      const __m128i bytes = _mm_set_epi32(static_cast<int>(w[3]), static_cast<int>(w[2]), static_cast<int>(w[1]),
                                          static_cast<int>(w[0]));
      const __m128i sc = _mm_cvtepu8_epi16(bytes);
      scales = _mm256_set_m128i(sc, sc);
      const __m128i m = _mm_cvtepu8_epi16(_mm_srli_si128(bytes, 8));
      mins = _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m));
    }
  }

  // the int16 scales of sub-block j's 32 elements (Q6_K: two runs of 16, one per lane)
  template <int j>
  __m256i of() const {
    if constexpr (F == kQ6_K) return lane_broadcast16<(2 * j) % 8, (2 * j + 1) % 8>(j < 4 ? low : high);
    else return lane_broadcast16<j, j>(scales);
  }
};

template <int F, int R, int S, int j>
static inline void k_step(const uint8_t* block, const KScales<F>& sc, const int8_t* xq, int64_t k, __m256i (&sums)[S][R]) {
  const __m256i u = k_values<F, j>(block), scale = sc.template of<j>();
  for (int r = 0; r < R; ++r) sums[j % S][r] = dot_scaled(sums[j % S][r], u, load256(xq + r * k + 32 * j), scale);
}

template <int F, int R, int S, int... j>
static inline void k_steps(const uint8_t* block, const KScales<F>& sc, const int8_t* xq, int64_t k, __m256i (&sums)[S][R],
                           std::integer_sequence<int, j...>) {
  (k_step<F, R, S, j>(block, sc, xq, k, sums), ...);
}

// y[r][o] for the R activation rows of a tile and weight rows [o_begin, o_end). For up to 2 rows, even
// and odd sub-blocks go into separate integer accumulators (two dependency chains).
template <int F, int R>
void k_rows_kernel(const QuantArgs& a, int64_t o_begin, int64_t o_end) {
  constexpr int64_t bytes = block_bytes(F);
  constexpr int kSets = R <= 2 ? 2 : 1;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < a.nb; ++sb) {
      const uint8_t* block = row + sb * bytes;
      const KScales<F> sc(block);
      __m256i sums[kSets][R];
      for (int s = 0; s < kSets; ++s)
        for (int r = 0; r < R; ++r) sums[s][r] = _mm256_setzero_si256();
      k_steps<F, R, kSets>(block, sc, a.xq + sb * kSuper, a.k, sums, std::make_integer_sequence<int, 8>{});
      for (int r = 0; r < R; ++r) {
        __m256i total = sums[0][r];
        if constexpr (kSets == 2) total = _mm256_add_epi32(total, sums[1][r]);
        const __m256i xb = load256(a.xb + (r * a.nb + sb) * 16);
        const float dx = a.xd[r * a.nb + sb];
        if constexpr (F == kQ6_K) total = _mm256_sub_epi32(total, _mm256_slli_epi32(_mm256_madd_epi16(sc.scales, xb), 5));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(sc.d * dx), acc[r]);
        if constexpr (F != kQ6_K)
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sc.mins, xb)), _mm256_set1_ps(-sc.dmin * dx), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) a.y[r * a.ldy + o] = hsum(acc[r]);
  }
}

template <int F>
RowsFn pick(int rows) {
  if constexpr (is_k(F)) {
    switch (rows) {
      case 1: return k_rows_kernel<F, 1>;
      case 2: return k_rows_kernel<F, 2>;
      case 3: return k_rows_kernel<F, 3>;
      case 4: return k_rows_kernel<F, 4>;
      case 5: return k_rows_kernel<F, 5>;
      case 6: return k_rows_kernel<F, 6>;
      case 7: return k_rows_kernel<F, 7>;
      default: return k_rows_kernel<F, 8>;
    }
  } else {
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
}

RowsFn kernel_for(int qtype, int rows) {
  switch (qtype) {
    case kQ8_0: return pick<kQ8_0>(rows);
    case kQ4_0: return pick<kQ4_0>(rows);
    case kQ4_1: return pick<kQ4_1>(rows);
    case kQ4_K: return pick<kQ4_K>(rows);
    case kQ5_K: return pick<kQ5_K>(rows);
    default: return pick<kQ6_K>(rows);
  }
}
