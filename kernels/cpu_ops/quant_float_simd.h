// The float-activation GEMV of `quant_linear.cpp`, included once per instruction set inside its own
// namespace under `#pragma GCC target`, after `quant_simd_blocks.h`. The includer defines QL_AVX512: 1 for
// 512-bit vectors (AVX-512F/BW/VL), 0 for AVX2 + FMA + F16C. No include guard: it is meant to be included
// more than once, each time in its own namespace. Layouts and `FloatArgs`: `quant_formats.h`.
//
// Each weight block is decoded in registers into the exact float32 values of gguf's dequantization (on
// AVX-512 a table of the block's 16 or 32 possible values, d * q + m, indexed by the nibbles with
// `vpermps` / `vpermt2ps`; elsewhere an int-to-float conversion and one fused multiply-add), then
// multiplied into float32 accumulators by FMA for every activation row of the tile, so a block is decoded
// once per tile. The result differs from dequantize-then-matmul by the float32 summation order only.
//
// Why not fold the scale per block (d * sum q x + m * sum x): it saves nothing here. A block's table
// costs one multiply (or FMA), as the fold's multiply per block does, and beyond one row the fold needs
// a multiply per row and block where the table needs none; it also rounds worse where d * q and m cancel.
//
// Several activation rows per pass (`kFloatTile`: 8 with AVX-512, 6 with AVX2): each block is decoded once into registers and
// FMA'd into the accumulators of every row of the tile, so the decoding (most of the work beside reading
// the weights) is shared by the rows. Every activation row has its own accumulators, one per vector of a
// 32-element group, whatever the tile's size, so a row's result does not depend on the rows beside it
// (batch invariance). Where a tile's accumulators would not fit in the registers beside the decoded
// weights (AVX2's 16 registers hold 3 rows x 4), the pass runs over the weight row once per slice of each
// group's vectors (`slice_vecs`), each slice decoding only its own vectors; the weight row (<= 4 KB for
// the models here) is in L1 for the second slice, and each accumulator sums the same products in the same
// order as in one pass, so the bits are the same.
//
// One weight row per pass: two rows per pass, each activation vector loaded once for both, were 1.2x
// faster at 4 rows with the weights in cache, but 1.4-2.5x slower at one row with the weights read from
// memory (as in a decode step, a model being larger than the L3; Q8_0, Q4_K, F16: the hardware prefetcher
// keeps up with one stream of blocks, not with two).

#if QL_AVX512
using FV = __m512;
constexpr int kLanes = 16;
constexpr int kFloatTile = 8;  // activation rows per pass: 8 x 2 accumulators of 32 registers
constexpr int kAccBudget = 16; // accumulator registers a pass may hold
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
// activation rows per pass: 3 x 4 accumulators fit, 6 rows take two slices. Not 8 as on AVX-512: eight
// rows take four slices, each a pass over the tile's activations, which at 1536 inputs (48 KB for 8
// rows) no longer stay in L1: SmolLM2's `down` took 514 us at 8 rows against 122 at 4 and 352 at 12
// (6 + 6), with Q4_1 on the 2-core EPYC under --isa avx2 (bench.quant_linear).
constexpr int kFloatTile = 6;
constexpr int kAccBudget = 12; // of 16 registers: the rest hold decoded weights and an activation vector
static inline FV fzero() { return _mm256_setzero_ps(); }
static inline FV fload(const float* p) { return _mm256_loadu_ps(p); }
static inline FV ffma(FV a, FV b, FV c) { return _mm256_fmadd_ps(a, b, c); }
static inline FV fadd(FV a, FV b) { return _mm256_add_ps(a, b); }
static inline float fsum(FV v) { return hsum(v); }
#endif

constexpr int kVecs = kBlock / kLanes;  // vectors per group of 32 weights, and accumulators per row pair
using Group = FV[kVecs];                // a group of 32 weights, decoded

#define QL_INLINE inline __attribute__((always_inline))

template <typename Fn, int... j>
static QL_INLINE void unroll(Fn&& fn, std::integer_sequence<int, j...>) {
  (fn(std::integral_constant<int, j>{}), ...);
}

template <typename Fn>  // fn(std::integral_constant<int, j>) for j = 0 .. 7
static QL_INLINE void unroll8(Fn&& fn) {
  unroll(fn, std::make_integer_sequence<int, 8>{});
}

// The fp16 at p in every lane. Not `half_value`: its `vpinsrw` merges into a register whose last value
// GCC may take from the previous block, a dependency chain through every block (measured 2x slower).
static QL_INLINE FV half_splat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
#if QL_AVX512
  return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h)));
#else
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(h)));
#endif
}

#if QL_AVX512

static QL_INLINE __m512i widen_u8(const uint8_t* p) {  // 16 bytes -> 16 int32
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

static QL_INLINE __m512 iota16(float first) {
  return _mm512_add_ps(_mm512_set1_ps(first), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

template <int i>  // lane i of v in every lane
static QL_INLINE __m512 lane(__m512 v) {
  return _mm512_permutexvar_ps(_mm512_set1_epi32(i), v);
}

// A 32-element block (or 32 16-bit floats) decoded.
template <int F>
static QL_INLINE void block_values(const uint8_t* p, Group& w) {
  if constexpr (F == kF16) {
    w[0] = _mm512_cvtph_ps(load256(p));
    w[1] = _mm512_cvtph_ps(load256(p + 32));
  } else if constexpr (F == kBF16) {
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16));
    w[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p + 32)), 16));
  } else if constexpr (F == kQ8_0) {
    const __m512 d = half_splat(p);
    for (int v = 0; v < 2; ++v) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 + 16 * v));
      w[v] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
    }
  } else if constexpr (F == kQ4_0 || F == kQ4_1) {
    // the block's 16 possible values, exactly as gguf computes them: d * (q - 8), or d * q + m
    const __m512 d = half_splat(p);
    const __m512 table =
        F == kQ4_0 ? _mm512_mul_ps(d, iota16(-8.0f)) : _mm512_fmadd_ps(d, iota16(0.0f), half_splat(p + 2));
    const __m512i n = widen_u8(p + (F == kQ4_0 ? 2 : 4));  // vpermps reads the low 4 bits of each index
    w[0] = _mm512_permutexvar_ps(n, table);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(n, 4), table);
  } else {  // Q5_0, Q5_1: 32 values in two tables, the fifth bit choosing one (vpermt2ps: 5-bit indices)
    constexpr int high = F == kQ5_0 ? 2 : 4;
    const __m512 d = half_splat(p);
    const __m512 m = F == kQ5_0 ? _mm512_set1_ps(0.0f) : half_splat(p + 2);
    const __m512 low = F == kQ5_0 ? _mm512_mul_ps(d, iota16(-16.0f)) : _mm512_fmadd_ps(d, iota16(0.0f), m);
    const __m512 top = F == kQ5_0 ? _mm512_mul_ps(d, iota16(0.0f)) : _mm512_fmadd_ps(d, iota16(16.0f), m);
    uint32_t bits;
    std::memcpy(&bits, p + high, 4);
    const __m512i n = widen_u8(p + high + 4), sixteen = _mm512_set1_epi32(16);
    const __m512i first = _mm512_and_si512(n, _mm512_set1_epi32(0x0F)), second = _mm512_srli_epi32(n, 4);
    const __m512i i0 = _mm512_mask_or_epi32(first, _cvtu32_mask16(bits & 0xFFFF), first, sixteen);
    const __m512i i1 = _mm512_mask_or_epi32(second, _cvtu32_mask16(bits >> 16), second, sixteen);
    w[0] = _mm512_permutex2var_ps(low, i0, top);
    w[1] = _mm512_permutex2var_ps(low, i1, top);
  }
}

template <int j>  // v with bit j of each lane moved to bit 4 (other bits: whatever the shift leaves)
static QL_INLINE __m512i bit_to_4(__m512i v) {
  if constexpr (j < 4) return _mm512_slli_epi32(v, 4 - j);
  else if constexpr (j == 4) return v;
  else return _mm512_srli_epi32(v, j - 4);
}

// A K-quant super-block: its scales decoded once, then each group of 32 (`values<j>`).
template <int F>
struct Super {
  const uint8_t* p;
  // Q4_K / Q5_K: lanes 0-7 d * sc[j], 8-15 dmin * m[j] (exact: an fp16 times a 6-bit integer);
  // Q6_K: d * sc[s] for the 16 runs of 16 (exact: an fp16 times an int8)
  __m512 scales;
  __m512i h0, h1;  // Q5_K: the fifth-bit bytes of elements 0-15 and 16-31 of every sub-block

  explicit QL_INLINE Super(const uint8_t* block) : p(block) {
    if constexpr (F == kQ6_K) {
      const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
      scales = _mm512_mul_ps(half_splat(p + 208), _mm512_cvtepi32_ps(sc));
    } else {
      uint32_t words[4];
      k_scale_words(p + 4, words);  // sc[0..7], m[0..7]
      const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words)));
      const __m512 factors = _mm512_mask_blend_ps(0xFF00, half_splat(p), half_splat(p + 2));
      scales = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), factors);
      if constexpr (F == kQ5_K) h0 = widen_u8(p + 16), h1 = widen_u8(p + 32);
    }
  }

  template <int j>  // elements 32j .. 32j + 31
  QL_INLINE void values(Group& w) const {
    if constexpr (F == kQ6_K) {
      q6_values<j / 4, j % 4>(w);
    } else {
      const uint8_t* qs = p + (F == kQ5_K ? 48 : 16) + 32 * (j / 2);  // low nibbles: 2c, high: 2c + 1
      __m512i a = widen_u8(qs), b = widen_u8(qs + 16);
      if constexpr (j % 2) a = _mm512_srli_epi32(a, 4), b = _mm512_srli_epi32(b, 4);
      const __m512 dl = lane<j>(scales), ml = lane<8 + j>(scales);
      const __m512 low = _mm512_fmsub_ps(dl, iota16(0.0f), ml);  // d * sc * q - dmin * m, as gguf
      if constexpr (F == kQ4_K) {
        w[0] = _mm512_permutexvar_ps(a, low);
        w[1] = _mm512_permutexvar_ps(b, low);
      } else {
        const __m512 top = _mm512_fmsub_ps(dl, iota16(16.0f), ml);
        // index: the nibble in bits 0-3 (a), the fifth bit (bit j of the high byte) in bit 4
        const __m512i nibble = _mm512_set1_epi32(0x0F);
        w[0] = _mm512_permutex2var_ps(low, _mm512_ternarylogic_epi32(a, bit_to_4<j>(h0), nibble, 0xE4), top);
        w[1] = _mm512_permutex2var_ps(low, _mm512_ternarylogic_epi32(b, bit_to_4<j>(h1), nibble, 0xE4), top);
      }
    }
  }

  // Q6_K group t (0..3) of half h: low nibbles from byte 32 (t % 2) + i (t < 2: low nibble, else high),
  // the top two bits from bits 2t, 2t + 1 of high byte i; a scale per 16 elements
  template <int h, int t>
  QL_INLINE void q6_values(Group& w) const {
    const uint8_t *low = p + 64 * h + 32 * (t % 2), *high = p + 128 + 32 * h;
    const __m512i low4 = _mm512_set1_epi32(0x0F), top2 = _mm512_set1_epi32(0x30), offset = _mm512_set1_epi32(32);
    constexpr int scale = 8 * h + 2 * t;  // of elements 0-15 of the group; 16-31 have the next
    for (int v = 0; v < 2; ++v) {
      const __m512i l = widen_u8(low + 16 * v), hb = widen_u8(high + 16 * v);
      const __m512i nibbles = t < 2 ? _mm512_and_si512(l, low4) : _mm512_srli_epi32(l, 4);
      __m512i top;  // bits 2t, 2t + 1 to bits 4, 5
      if constexpr (t < 2) top = _mm512_slli_epi32(hb, 4 - 2 * t);
      else if constexpr (t == 2) top = hb;
      else top = _mm512_srli_epi32(hb, 2);
      const __m512i q = _mm512_or_si512(nibbles, _mm512_and_si512(top, top2));
      const __m512 s = v ? lane<scale + 1>(scales) : lane<scale>(scales);
      w[v] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, offset)), s);  // d * sc * (q - 32), as gguf
    }
  }
};

#else  // AVX2

template <int v>  // bytes 8v .. 8v + 7 of q as 8 int32 (unsigned)
static QL_INLINE __m256i part_u8(__m256i q) {
  const __m128i half = v < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  return _mm256_cvtepu8_epi32(v % 2 ? _mm_srli_si128(half, 8) : half);
}

static QL_INLINE __m256i load_u8x8(const uint8_t* p) {  // 8 bytes -> 8 int32
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 32 unsigned byte values q in element order -> scale * q + offset (scale1 / offset1 for elements
// 16-31), each one fused multiply-add: gguf's values exactly.
static QL_INLINE void bytes_values(__m256i q, __m256 scale0, __m256 offset0, __m256 scale1, __m256 offset1,
                                   Group& w) {
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<0>(q)), scale0, offset0);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<1>(q)), scale0, offset0);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<2>(q)), scale1, offset1);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part_u8<3>(q)), scale1, offset1);
}

template <int F>
static QL_INLINE void block_values(const uint8_t* p, Group& w) {
  if constexpr (F == kF16) {
    for (int v = 0; v < 4; ++v) w[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)));
  } else if constexpr (F == kBF16) {
    for (int v = 0; v < 4; ++v) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v));
      w[v] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
  } else if constexpr (F == kQ8_0) {
    const __m256 d = half_splat(p);
    for (int v = 0; v < 4; ++v) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + 8 * v));
      w[v] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
  } else if constexpr (F == kQ4_0 || F == kQ4_1) {
    const __m256 d = half_splat(p), m = F == kQ4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)) : half_splat(p + 2);
    const uint8_t* qs = p + (F == kQ4_0 ? 2 : 4);
    const __m256i a = load_u8x8(qs), b = load_u8x8(qs + 8), low4 = _mm256_set1_epi32(0x0F);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(a, low4)), d, m);  // d * q - 8d: exact
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), d, m);
  } else {  // Q5_0, Q5_1
    const __m256 d = half_splat(p), m = F == kQ5_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-16.0f)) : half_splat(p + 2);
    bytes_values(q5_values<F>(p), d, m, d, m, w);
  }
}

template <int F>
struct Super {
  const uint8_t* p;
  float d, dmin;
  uint8_t sc[16];  // Q4_K / Q5_K: sc[0..7], then m[0..7]

  explicit QL_INLINE Super(const uint8_t* block) : p(block) {
    if constexpr (F == kQ6_K) {
      d = half_value(p + 208);
      dmin = 0.0f;
    } else {
      d = half_value(p);
      dmin = half_value(p + 2);
      uint32_t words[4];
      k_scale_words(p + 4, words);
      std::memcpy(sc, words, 16);
    }
  }

  template <int j>  // elements 32j .. 32j + 31
  QL_INLINE void values(Group& w) const {
    if constexpr (F == kQ6_K) {
      const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
      const float s0 = d * static_cast<float>(scales[2 * j]), s1 = d * static_cast<float>(scales[2 * j + 1]);
      // s * q - 32 s: both products exact, so one rounding of s * (q - 32), as gguf
      bytes_values(k_values<F, j>(p), _mm256_set1_ps(s0), _mm256_set1_ps(-32.0f * s0), _mm256_set1_ps(s1),
                   _mm256_set1_ps(-32.0f * s1), w);
    } else {
      const __m256 scale = _mm256_set1_ps(d * static_cast<float>(sc[j]));
      const __m256 offset = _mm256_set1_ps(-dmin * static_cast<float>(sc[8 + j]));
      bytes_values(k_values<F, j>(p), scale, offset, scale, offset, w);
    }
  }
};

#endif

// Vectors per group a pass over the weight row covers for R activation rows: all (kVecs) where their
// accumulators fit in kAccBudget registers, else half or a quarter (see the header).
template <int R>
constexpr int slice_vecs() {
  int nv = kVecs;
  while (nv > 1 && R * nv > kAccBudget) nv /= 2;
  return nv;
}

// Vectors [V, V + NV) of every group of weight row `o`, times the R activation rows at x: their sums into
// parts[r][V ..]. Only those vectors of each group are used, so the compiler drops the others' decoding.
template <int F, int R, int V, int NV>
static QL_INLINE void float_slice(const FloatArgs& a, const uint8_t* row, FV (&parts)[R][kVecs]) {
  constexpr int64_t bytes = block_bytes(F);
  FV acc[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = fzero();
  const auto add = [&](const Group& w, int64_t e) __attribute__((always_inline)) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][v] = ffma(w[V + v], fload(a.x + r * a.k + e + (V + v) * kLanes), acc[r][v]);
  };
  if constexpr (is_k(F)) {
    for (int64_t b = 0; b < a.nb; ++b) {
      const Super<F> super(row + b * bytes);
      unroll8([&](auto index) {
        constexpr int j = decltype(index)::value;
        Group w;
        super.template values<j>(w);
        add(w, b * kSuper + 32 * j);
      });
    }
  } else {
    for (int64_t b = 0; b < a.nb; ++b) {
      Group w;
      block_values<F>(row + b * bytes, w);
      add(w, b * kBlock);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) parts[r][V + v] = acc[r][v];
}

template <typename V>  // v as it is: -ffast-math may not reassociate the sum across this point
static QL_INLINE V pin(V v) {
  __asm__("" : "+v"(v));
  return v;
}

// A row's accumulators summed in one fixed order. Pinned at every step: under -ffast-math GCC otherwise
// vectorised the sums of several rows together in an order of its own for some R (7 on AVX2), so that a
// row's bits depended on the tile's size.
static QL_INLINE float row_total(const FV (&p)[kVecs]) {
  FV v;
  if constexpr (kVecs == 2) v = pin(fadd(p[0], p[1]));
  else v = pin(fadd(pin(fadd(p[0], p[1])), pin(fadd(p[2], p[3]))));
#if QL_AVX512
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 half = pin(_mm256_add_ps(_mm512_castps512_ps256(v), high));
#else
  const __m256 half = v;
#endif
  __m128 s = pin(_mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
  s = pin(_mm_add_ps(s, _mm_movehl_ps(s, s)));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Weight row `o` times the R activation rows of a tile: y[r][o].
template <int F, int R>
static QL_INLINE void float_pass(const FloatArgs& a, int64_t o) {
  constexpr int nv = slice_vecs<R>();
  const uint8_t* row = a.w + o * a.row_bytes;
  FV parts[R][kVecs];
  unroll(
      [&](auto index) {
        constexpr int slice = decltype(index)::value;
        float_slice<F, R, slice * nv, nv>(a, row, parts);
      },
      std::make_integer_sequence<int, kVecs / nv>{});
  for (int r = 0; r < R; ++r) a.y[r * a.ldy + o] = row_total(parts[r]);
}

// y[r][o] for the R activation rows of a tile and weight rows [o_begin, o_end); see `FloatArgs`.
template <int F, int R>
void float_rows(const FloatArgs& a, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) float_pass<F, R>(a, o);
}

template <int F>
FloatRowsFn float_pick(int rows) {
  static_assert(kFloatTile <= 8);
  switch (rows) {
    case 1: return float_rows<F, 1>;
    case 2: return float_rows<F, 2>;
    case 3: return float_rows<F, 3>;
    case 4: return float_rows<F, 4>;
    case 5: return float_rows<F, 5>;
    case 6: return float_rows<F, 6>;
    case 7: return float_rows<F, 7>;
    default: return float_rows<F, 8>;
  }
}

// the kernel for `rows` (1 .. kFloatTile) activation rows of a tile
FloatRowsFn float_kernel_for(int qtype, int rows) {
  return with_format(qtype, [rows](auto f) { return float_pick<decltype(f)::value>(rows); });
}

#undef QL_INLINE
