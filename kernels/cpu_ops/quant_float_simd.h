// The float-activation GEMV of `quant_linear.cpp`, included once per instruction set inside its own
// namespace under `#pragma GCC target`, after `quant_simd_blocks.h`. The includer defines QL_AVX512: 1 for
// 512-bit vectors (AVX-512F/BW/VL), 0 for AVX2 + FMA + F16C. No include guard: it is meant to be included
// more than once, each time in its own namespace. Layouts and `FloatArgs`: `quant_formats.h`.
//
// Each weight block is decoded in registers into the exact float32 values of gguf's dequantization (a
// 16-entry table d * q + m per block, indexed by the nibbles with `vpermps`, on AVX-512; an int-to-float
// conversion and one fused multiply-add elsewhere), then multiplied into float32 accumulators by FMA for
// every activation row of the tile, so the block is decoded once per tile. The result differs from
// dequantize-then-matmul by the float32 summation order only.
//
// Why not fold the scale per block (d * sum q x + m * sum x): that saves nothing here. A block's table
// costs one multiply (one FMA with m), as the fold's one multiply per block does, and beyond one row the
// fold needs a multiply per row and block where the table needs none; it also rounds worse where
// d * q and m cancel.
//
// Every row has the same 4 accumulators (AVX-512: 2 vectors of 16 per 32-element group, alternating sets
// for even and odd groups; AVX2: 4 vectors of 8) whatever the tile's row count, so a row's result does
// not depend on the rows beside it (batch invariance).

#if QL_AVX512
using FV = __m512;
constexpr int kLanes = 16;
static inline FV fzero() { return _mm512_setzero_ps(); }
static inline FV fload(const float* p) { return _mm512_loadu_ps(p); }
static inline FV ffma(FV a, FV b, FV c) { return _mm512_fmadd_ps(a, b, c); }
static inline FV fadd(FV a, FV b) { return _mm512_add_ps(a, b); }
static inline float fsum(FV v) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), high));
}
#else
using FV = __m256;
constexpr int kLanes = 8;
static inline FV fzero() { return _mm256_setzero_ps(); }
static inline FV fload(const float* p) { return _mm256_loadu_ps(p); }
static inline FV ffma(FV a, FV b, FV c) { return _mm256_fmadd_ps(a, b, c); }
static inline FV fadd(FV a, FV b) { return _mm256_add_ps(a, b); }
static inline float fsum(FV v) { return hsum(v); }
#endif

constexpr int kVecs = kBlock / kLanes;  // vectors per group of 32 weights
constexpr int kSets = 4 / kVecs;        // accumulator sets, alternating by group
// activation rows per pass over the weights: 4 accumulators each must fit the registers (32 / 16)
constexpr int kFloatTile = QL_AVX512 ? 4 : 2;

#define QL_INLINE inline __attribute__((always_inline))

// The tile's R accumulators per row; `add` takes vector V of the group of 32 weights at element e.
template <int R>
struct RowSums {
  FV acc[R][4];
  const float* x;
  int64_t k;

  RowSums(const float* x_, int64_t k_) : x(x_), k(k_) {
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = fzero();
  }

  template <int P, int V>  // P: the group's parity (which set), V: the vector within the group
  QL_INLINE void add(int64_t e, FV w) {
    constexpr int slot = (P % kSets) * kVecs + V;
    for (int r = 0; r < R; ++r) acc[r][slot] = ffma(w, fload(x + r * k + e + V * kLanes), acc[r][slot]);
  }

  float total(int r) const { return fsum(fadd(fadd(acc[r][0], acc[r][2]), fadd(acc[r][1], acc[r][3]))); }
};

static QL_INLINE FV fset1(float v) {
#if QL_AVX512
  return _mm512_set1_ps(v);
#else
  return _mm256_set1_ps(v);
#endif
}

#if QL_AVX512

static QL_INLINE __m512i widen_u8(const uint8_t* p) {  // 16 bytes -> 16 int32
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

static QL_INLINE __m512 iota16(float first) {
  return _mm512_add_ps(_mm512_set1_ps(first),
                       _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// lane `i` of v in every lane
template <int i>
static QL_INLINE __m512 lane(__m512 v) {
  return _mm512_permutexvar_ps(_mm512_set1_epi32(i), v);
}

// A 32-element block (or 32 16-bit floats) into the sums, as group parity P.
template <int F, int P, int R>
static QL_INLINE void block_dot(const uint8_t* p, int64_t e, RowSums<R>& s) {
  if constexpr (F == kF16) {
    s.template add<P, 0>(e, _mm512_cvtph_ps(load256(p)));
    s.template add<P, 1>(e, _mm512_cvtph_ps(load256(p + 32)));
  } else if constexpr (F == kBF16) {
    s.template add<P, 0>(e, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16)));
    s.template add<P, 1>(e, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p + 32)), 16)));
  } else if constexpr (F == kQ8_0) {
    const __m512 d = _mm512_set1_ps(half_value(p));
    const auto values = [&](int offset) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 + offset));
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
    };
    s.template add<P, 0>(e, values(0));
    s.template add<P, 1>(e, values(16));
  } else if constexpr (F == kQ4_0 || F == kQ4_1) {
    // the block's 16 possible values, exactly as gguf computes them: d * (q - 8), or d * q + m
    const __m512 d = _mm512_set1_ps(half_value(p));
    const __m512 table = F == kQ4_0 ? _mm512_mul_ps(d, iota16(-8.0f))
                                    : _mm512_fmadd_ps(d, iota16(0.0f), _mm512_set1_ps(half_value(p + 2)));
    const __m512i n = widen_u8(p + (F == kQ4_0 ? 2 : 4));  // vpermps reads the low 4 bits of each index
    s.template add<P, 0>(e, _mm512_permutexvar_ps(n, table));
    s.template add<P, 1>(e, _mm512_permutexvar_ps(_mm512_srli_epi32(n, 4), table));
  } else {  // Q5_0, Q5_1: 32 values in two tables, the fifth bit choosing one (vpermt2ps: 5-bit indices)
    constexpr int high = F == kQ5_0 ? 2 : 4;
    const __m512 d = _mm512_set1_ps(half_value(p));
    const __m512 m = F == kQ5_0 ? _mm512_set1_ps(0.0f) : _mm512_set1_ps(half_value(p + 2));
    const __m512 low = F == kQ5_0 ? _mm512_mul_ps(d, iota16(-16.0f)) : _mm512_fmadd_ps(d, iota16(0.0f), m);
    const __m512 top = F == kQ5_0 ? _mm512_mul_ps(d, iota16(0.0f)) : _mm512_fmadd_ps(d, iota16(16.0f), m);
    uint32_t bits;
    std::memcpy(&bits, p + high, 4);
    const __m512i n = widen_u8(p + high + 4), sixteen = _mm512_set1_epi32(16);
    const __m512i first = _mm512_and_si512(n, _mm512_set1_epi32(0x0F)), second = _mm512_srli_epi32(n, 4);
    const __m512i i0 = _mm512_mask_or_epi32(first, _cvtu32_mask16(bits & 0xFFFF), first, sixteen);
    const __m512i i1 = _mm512_mask_or_epi32(second, _cvtu32_mask16(bits >> 16), second, sixteen);
    s.template add<P, 0>(e, _mm512_permutex2var_ps(low, i0, top));
    s.template add<P, 1>(e, _mm512_permutex2var_ps(low, i1, top));
  }
}

// v with bit j of each lane moved to bit 4 (other bits: whatever the shift leaves)
template <int j>
static QL_INLINE __m512i bit_to_4(__m512i v) {
  if constexpr (j < 4) return _mm512_slli_epi32(v, 4 - j);
  else if constexpr (j == 4) return v;
  else return _mm512_srli_epi32(v, j - 4);
}

// Q4_K / Q5_K sub-blocks 2c and 2c + 1 (elements 64c .. 64c + 63 of the super-block at element e).
template <int F, int c, int R>
static QL_INLINE void k_pair_dot(const uint8_t* p, __m512 scales, __m512i h0, __m512i h1, int64_t e, RowSums<R>& s) {
  const uint8_t* qs = p + (F == kQ5_K ? 48 : 16) + 32 * c;
  const __m512i n0 = widen_u8(qs), n1 = widen_u8(qs + 16);
  const auto one = [&](auto index) {
    constexpr int j = decltype(index)::value;  // the sub-block
    const __m512 dl = lane<j>(scales), ml = lane<8 + j>(scales);
    const __m512i a = j % 2 ? _mm512_srli_epi32(n0, 4) : n0, b = j % 2 ? _mm512_srli_epi32(n1, 4) : n1;
    const int64_t at = e + 32 * j;
    if constexpr (F == kQ4_K) {
      const __m512 table = _mm512_fmsub_ps(dl, iota16(0.0f), ml);  // d * sc * q - dmin * m, as gguf
      s.template add<j % 2, 0>(at, _mm512_permutexvar_ps(a, table));
      s.template add<j % 2, 1>(at, _mm512_permutexvar_ps(b, table));
    } else {
      const __m512 low = _mm512_fmsub_ps(dl, iota16(0.0f), ml), top = _mm512_fmsub_ps(dl, iota16(16.0f), ml);
      // index: the nibble in bits 0-3, the fifth bit (bit j of the high byte) in bit 4
      const __m512i nibble = _mm512_set1_epi32(0x0F);
      const __m512i i0 = _mm512_ternarylogic_epi32(a, bit_to_4<j>(h0), nibble, 0xE4);
      const __m512i i1 = _mm512_ternarylogic_epi32(b, bit_to_4<j>(h1), nibble, 0xE4);
      s.template add<j % 2, 0>(at, _mm512_permutex2var_ps(low, i0, top));
      s.template add<j % 2, 1>(at, _mm512_permutex2var_ps(low, i1, top));
    }
  };
  one(std::integral_constant<int, 2 * c>{});
  one(std::integral_constant<int, 2 * c + 1>{});
}

// Q6_K group t (0..3) of half h: 32 elements of 6-bit q, a scale per 16.
template <int h, int t, int R>
static QL_INLINE void q6_group_dot(const uint8_t* p, __m512 scales, __m512i l0, __m512i l1, __m512i h0, __m512i h1,
                                   int64_t e, RowSums<R>& s) {
  const __m512i low4 = _mm512_set1_epi32(0x0F), top2 = _mm512_set1_epi32(0x30), offset = _mm512_set1_epi32(32);
  const auto values = [&](__m512i l, __m512i hb) {
    const __m512i low = t < 2 ? _mm512_and_si512(l, low4) : _mm512_srli_epi32(l, 4);
    __m512i top;  // bits 2t, 2t + 1 of the high byte to bits 4, 5
    if constexpr (t < 2) top = _mm512_slli_epi32(hb, 4 - 2 * t);
    else if constexpr (t == 2) top = hb;
    else top = _mm512_srli_epi32(hb, 2);
    const __m512i q = _mm512_or_si512(low, _mm512_and_si512(top, top2));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(q, offset));
  };
  constexpr int scale = 8 * h + 2 * t;  // of elements 0-15 of the group; 16-31 have the next
  const int64_t at = e + 128 * h + 32 * t;
  s.template add<t % 2, 0>(at, _mm512_mul_ps(values(l0, h0), lane<scale>(scales)));
  s.template add<t % 2, 1>(at, _mm512_mul_ps(values(l1, h1), lane<scale + 1>(scales)));
}

template <int F, int R>
static QL_INLINE void super_dot(const uint8_t* p, int64_t e, RowSums<R>& s) {
  if constexpr (F == kQ6_K) {
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
    const __m512 scales = _mm512_mul_ps(_mm512_set1_ps(half_value(p + 208)), _mm512_cvtepi32_ps(sc));
    const auto half = [&](auto index) {
      constexpr int h = decltype(index)::value;
      const uint8_t *low = p + 64 * h, *high = p + 128 + 32 * h;
      const __m512i h0 = widen_u8(high), h1 = widen_u8(high + 16);
      const __m512i a0 = widen_u8(low), a1 = widen_u8(low + 16), b0 = widen_u8(low + 32), b1 = widen_u8(low + 48);
      q6_group_dot<h, 0>(p, scales, a0, a1, h0, h1, e, s);
      q6_group_dot<h, 1>(p, scales, b0, b1, h0, h1, e, s);
      q6_group_dot<h, 2>(p, scales, a0, a1, h0, h1, e, s);
      q6_group_dot<h, 3>(p, scales, b0, b1, h0, h1, e, s);
    };
    half(std::integral_constant<int, 0>{});
    half(std::integral_constant<int, 1>{});
  } else {
    uint32_t words[4];
    k_scale_words(p + 4, words);  // sc[0..7], m[0..7]
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words))));
    // lanes 0-7: d * sc[j]; lanes 8-15: dmin * m[j] (exact: an fp16 times a 6-bit integer)
    const __m512 factors = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(half_value(p)), _mm512_set1_ps(half_value(p + 2)));
    const __m512 scales = _mm512_mul_ps(sc, factors);
    __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
    if constexpr (F == kQ5_K) h0 = widen_u8(p + 16), h1 = widen_u8(p + 32);
    k_pair_dot<F, 0>(p, scales, h0, h1, e, s);
    k_pair_dot<F, 1>(p, scales, h0, h1, e, s);
    k_pair_dot<F, 2>(p, scales, h0, h1, e, s);
    k_pair_dot<F, 3>(p, scales, h0, h1, e, s);
  }
}

#else  // AVX2

template <typename Fn, int... j>
static QL_INLINE void unroll(Fn&& fn, std::integer_sequence<int, j...>) {
  (fn(std::integral_constant<int, j>{}), ...);
}

template <typename Fn>  // fn(std::integral_constant<int, j>) for j = 0 .. 7
static QL_INLINE void unroll8(Fn&& fn) {
  unroll(fn, std::make_integer_sequence<int, 8>{});
}

// bytes 8v .. 8v + 7 of q as 8 int32 (unsigned)
template <int v>
static QL_INLINE __m256i part_u8(__m256i q) {
  const __m128i half = v < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  return _mm256_cvtepu8_epi32(v % 2 ? _mm_srli_si128(half, 8) : half);
}

static QL_INLINE __m256i load_u8x8(const uint8_t* p) {  // 8 bytes -> 8 int32
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 32 unsigned byte values q in element order -> scale * q + offset into the sums (scale1 / offset1 for
// elements 16-31), each one fused multiply-add: gguf's values exactly.
template <int P, int R>
static QL_INLINE void bytes_dot(__m256i q, __m256 scale0, __m256 offset0, __m256 scale1, __m256 offset1, int64_t e,
                                RowSums<R>& s) {
  s.template add<P, 0>(e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<0>(q)), scale0, offset0));
  s.template add<P, 1>(e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<1>(q)), scale0, offset0));
  s.template add<P, 2>(e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<2>(q)), scale1, offset1));
  s.template add<P, 3>(e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<3>(q)), scale1, offset1));
}

template <int F, int P, int R>
static QL_INLINE void block_dot(const uint8_t* p, int64_t e, RowSums<R>& s) {
  if constexpr (F == kF16) {
    s.template add<P, 0>(e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    s.template add<P, 1>(e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    s.template add<P, 2>(e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32))));
    s.template add<P, 3>(e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48))));
  } else if constexpr (F == kBF16) {
    const auto widen = [&](int offset) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + offset));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    };
    s.template add<P, 0>(e, widen(0));
    s.template add<P, 1>(e, widen(16));
    s.template add<P, 2>(e, widen(32));
    s.template add<P, 3>(e, widen(48));
  } else if constexpr (F == kQ8_0) {
    const __m256 d = _mm256_set1_ps(half_value(p));
    const auto values = [&](int offset) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + offset));
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    };
    s.template add<P, 0>(e, values(0));
    s.template add<P, 1>(e, values(8));
    s.template add<P, 2>(e, values(16));
    s.template add<P, 3>(e, values(24));
  } else if constexpr (F == kQ4_0 || F == kQ4_1) {
    const float dv = half_value(p);
    const __m256 d = _mm256_set1_ps(dv), m = _mm256_set1_ps(F == kQ4_0 ? -8.0f * dv : half_value(p + 2));
    const uint8_t* qs = p + (F == kQ4_0 ? 2 : 4);
    const __m256i a = load_u8x8(qs), b = load_u8x8(qs + 8), low4 = _mm256_set1_epi32(0x0F);
    const auto value = [&](__m256i q) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m); };
    s.template add<P, 0>(e, value(_mm256_and_si256(a, low4)));
    s.template add<P, 1>(e, value(_mm256_and_si256(b, low4)));
    s.template add<P, 2>(e, value(_mm256_srli_epi32(a, 4)));
    s.template add<P, 3>(e, value(_mm256_srli_epi32(b, 4)));
  } else {  // Q5_0, Q5_1
    const float dv = half_value(p);
    const __m256 d = _mm256_set1_ps(dv), m = _mm256_set1_ps(F == kQ5_0 ? -16.0f * dv : half_value(p + 2));
    bytes_dot<P>(q5_values<F>(p), d, m, d, m, e, s);
  }
}

template <int F, int R>
static QL_INLINE void super_dot(const uint8_t* p, int64_t e, RowSums<R>& s) {
  if constexpr (F == kQ6_K) {
    const float d = half_value(p + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const auto one = [&](auto index) {
      constexpr int j = decltype(index)::value;
      const float s0 = d * static_cast<float>(sc[2 * j]), s1 = d * static_cast<float>(sc[2 * j + 1]);
      bytes_dot<j % 2>(k_values<F, j>(p), _mm256_set1_ps(s0), _mm256_set1_ps(-32.0f * s0), _mm256_set1_ps(s1),
                       _mm256_set1_ps(-32.0f * s1), e + 32 * j, s);
    };
    unroll8(one);
  } else {
    const float d = half_value(p), dmin = half_value(p + 2);
    uint32_t words[4];
    k_scale_words(p + 4, words);
    uint8_t sc[16];  // sc[0..7], then m[0..7]
    std::memcpy(sc, words, 16);
    const auto one = [&](auto index) {
      constexpr int j = decltype(index)::value;
      const __m256 scale = _mm256_set1_ps(d * static_cast<float>(sc[j]));
      const __m256 offset = _mm256_set1_ps(-dmin * static_cast<float>(sc[8 + j]));
      bytes_dot<j % 2>(k_values<F, j>(p), scale, offset, scale, offset, e + 32 * j, s);
    };
    unroll8(one);
  }
}

#endif

// y[r][o] for the R activation rows of a tile and weight rows [o_begin, o_end); see `FloatArgs`.
template <int F, int R>
void float_rows(const FloatArgs& a, int64_t o_begin, int64_t o_end) {
  constexpr int64_t bytes = block_bytes(F);
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    RowSums<R> s(a.x, a.k);
    if constexpr (is_k(F)) {
      for (int64_t b = 0; b < a.nb; ++b) super_dot<F>(row + b * bytes, b * kSuper, s);
    } else {
      int64_t b = 0;
      for (; b + 2 <= a.nb; b += 2) {
        block_dot<F, 0>(row + b * bytes, b * kBlock, s);
        block_dot<F, 1>(row + (b + 1) * bytes, (b + 1) * kBlock, s);
      }
      if (b < a.nb) block_dot<F, 0>(row + b * bytes, b * kBlock, s);
    }
    for (int r = 0; r < R; ++r) a.y[r * a.ldy + o] = s.total(r);
  }
}

template <int F>
FloatRowsFn float_pick(int rows) {
  if constexpr (kFloatTile == 4) {
    switch (rows) {
      case 1: return float_rows<F, 1>;
      case 2: return float_rows<F, 2>;
      case 3: return float_rows<F, 3>;
      default: return float_rows<F, 4>;
    }
  } else {
    return rows == 1 ? float_rows<F, 1> : float_rows<F, 2>;
  }
}

// the kernel for `rows` (1 .. kFloatTile) activation rows of a tile
FloatRowsFn float_kernel_for(int qtype, int rows) {
  switch (qtype) {
    case kF16: return float_pick<kF16>(rows);
    case kBF16: return float_pick<kBF16>(rows);
    case kQ8_0: return float_pick<kQ8_0>(rows);
    case kQ4_0: return float_pick<kQ4_0>(rows);
    case kQ4_1: return float_pick<kQ4_1>(rows);
    case kQ5_0: return float_pick<kQ5_0>(rows);
    case kQ5_1: return float_pick<kQ5_1>(rows);
    case kQ4_K: return float_pick<kQ4_K>(rows);
    case kQ5_K: return float_pick<kQ5_K>(rows);
    default: return float_pick<kQ6_K>(rows);
  }
}

#undef QL_INLINE
