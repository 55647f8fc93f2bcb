// The inner loops of the batched LoRA kernel (`lora.cpp`), included once per instruction set inside its
// own namespace: LORA_ISA 2 = AVX-512 (F, BW, VL) and 1 = AVX2 + FMA + F16C (each under `#pragma GCC target`, so
// they build whatever -march says), 0 = plain C++ for any CPU. No include guard: it is meant to be
// included more than once, each time in its own namespace, after `Problem` (lora.cpp).
//
// Batch invariance: every output element is one chain of float32 multiply-adds in a fixed order, and a
// token's chains are the same whatever tokens share its pass (each token has its own accumulators; a
// pass over fewer tokens is another instantiation of the same loops, not another order). Shrink: per
// (token, rank row) one vector accumulator over the input in vector-sized steps (the last step
// zero-padded), summed across lanes by a fixed tree. Expand: per (token, output) one lane accumulating
// v[r] * B[o][r] for r = 0 .. R-1. So a token's result does not depend on the batch.

#if LORA_ISA == 2
using V = __m512;
constexpr int kLanes = 16;
constexpr int kShrinkRows = 4;  // A rows per shrink pass: 4 tokens x 4 rows = 16 accumulators of 32 registers
constexpr int kExpandVecs = 4;  // output vectors per expand pass: 4 tokens x 4 vectors = 16 accumulators
static inline V vzero() { return _mm512_setzero_ps(); }
static inline V vset(float x) { return _mm512_set1_ps(x); }
static inline V vload(const float* p) { return _mm512_loadu_ps(p); }
static inline V vload(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
static inline V vload(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// the first n (<= 16) values at p, zeros after them (masked loads: nothing past p + n is read)
static inline V vload_n(const float* p, int64_t n) {
  return n >= 16 ? vload(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
static inline V vload_n(const at::BFloat16* p, int64_t n) {
  if (n >= 16) return vload(p);
  const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
static inline V vload_n(const at::Half* p, int64_t n) {
  return n >= 16 ? vload(p) : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
}
static inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
// dst[j][i] = src[i][j] widened, for a 16 x 16 block (row strides lds, ldd); src rows from
// `rows` on and columns from `cols` on read as zeros
template <typename T>
static inline void transpose_block(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? vload_n(src + i * lds, cols) : vzero();
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}
static inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
// y[0 .. 16) = round(y + d) to y's dtype, to nearest even (as `sansllm_cpu::store_row` rounds)
static inline void vaccumulate(float* y, V d) { _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), d)); }
static inline void vaccumulate(at::BFloat16* y, V d) {
  const __m512i bits = _mm512_castps_si512(_mm512_add_ps(vload(y), d));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
static inline void vaccumulate(at::Half* y, V d) {
  const __m256i half = _mm512_cvtps_ph(_mm512_add_ps(vload(y), d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), half);
}
static inline float vsum(V v) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v), high);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#elif LORA_ISA == 1
using V = __m256;
constexpr int kLanes = 8;
constexpr int kShrinkRows = 2;  // 4 tokens x 2 rows = 8 accumulators, + 2 rows + 1 x of 16 registers
constexpr int kExpandVecs = 2;  // 4 tokens x 2 vectors = 8 accumulators, + 2 B vectors + 1 broadcast
static inline V vzero() { return _mm256_setzero_ps(); }
static inline V vset(float x) { return _mm256_set1_ps(x); }
static inline V vload(const float* p) { return _mm256_loadu_ps(p); }
static inline V vload(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
static inline V vload(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// the first n (<= kLanes) values at p, zeros after them (nothing past p + n is read)
template <typename T>
static inline V vload_n(const T* p, int64_t n) {
  if (n >= kLanes) return vload(p);
  T copy[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) copy[i] = p[i];
  return vload(copy);
}
static inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
// dst[j][i] = src[i][j] widened, for an 8 x 8 block (row strides lds, ldd); src rows from
// `rows` on and columns from `cols` on read as zeros
template <typename T>
static inline void transpose_block(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = i < rows ? vload_n(src + i * lds, cols) : vzero();
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
    t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, t[i]);
}
static inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
// y[0 .. 8) = round(y + d) to y's dtype, to nearest even (as `sansllm_cpu::store_row` rounds)
static inline void vaccumulate(float* y, V d) { _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), d)); }
static inline void vaccumulate(at::BFloat16* y, V d) {
  const __m256i bits = _mm256_castps_si256(_mm256_add_ps(vload(y), d));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  // 8 values < 2^16 packed to 16 bits (per 128-bit lane), then the two lanes' halves side by side
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(packed));
}
static inline void vaccumulate(at::Half* y, V d) {
  const __m128i half = _mm256_cvtps_ph(_mm256_add_ps(vload(y), d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), half);
}
static inline float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int kLanes = 8;  // plain C++ "vectors" of 8 floats, which the compiler maps to what -march has
struct V {
  float lane[kLanes];
};
constexpr int kShrinkRows = 2;
constexpr int kExpandVecs = 2;
static inline V vzero() {
  V v;
  for (int i = 0; i < kLanes; ++i) v.lane[i] = 0.0f;
  return v;
}
static inline V vset(float x) {
  V v;
  for (int i = 0; i < kLanes; ++i) v.lane[i] = x;
  return v;
}
template <typename T>
static inline V vload(const T* p) {
  V v;
  for (int i = 0; i < kLanes; ++i) v.lane[i] = static_cast<float>(p[i]);
  return v;
}
// the first n (<= kLanes) values at p, zeros after them (nothing past p + n is read)
template <typename T>
static inline V vload_n(const T* p, int64_t n) {
  if (n >= kLanes) return vload(p);
  T copy[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) copy[i] = p[i];
  return vload(copy);
}
static inline void vstore(float* p, V v) {
  for (int i = 0; i < kLanes; ++i) p[i] = v.lane[i];
}
// dst[j][i] = src[i][j] widened, for a kLanes x kLanes block (row strides lds, ldd); src rows from `rows`
// on and columns from `cols` on read as zeros
template <typename T>
static inline void transpose_block(const T* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int i = 0; i < kLanes; ++i)
    for (int j = 0; j < kLanes; ++j)
      dst[j * ldd + i] = i < rows && j < cols ? static_cast<float>(src[i * lds + j]) : 0.0f;
}
static inline V vfma(V a, V b, V c) {
  for (int i = 0; i < kLanes; ++i) c.lane[i] += a.lane[i] * b.lane[i];
  return c;
}
// y[0 .. 8) = round(y + d) to y's dtype (c10's conversions round to nearest even)
template <typename T>
static inline void vaccumulate(T* y, V d) {
  for (int i = 0; i < kLanes; ++i) y[i] = static_cast<T>(static_cast<float>(y[i]) + d.lane[i]);
}
static inline float vsum(V v) {  // a fixed tree
  const float a = (v.lane[0] + v.lane[4]) + (v.lane[2] + v.lane[6]);
  const float b = (v.lane[1] + v.lane[5]) + (v.lane[3] + v.lane[7]);
  return a + b;
}
#endif

// A value held in a register: GCC otherwise folds the load into every FMA that uses it, which on CPUs
// that split 512-bit loads (Zen 4) made the passes load-bound (20 loads per 16 FMAs instead of 8).
#if LORA_ISA > 0
#define LORA_KEEP(v) __asm__("" : "+v"(v))
#else
#define LORA_KEEP(v) (void)(v)
#endif

constexpr int kTokens = 4;                       // tokens per pass, shrink and expand
constexpr int kBlock = kExpandVecs * kLanes;     // outputs per expand pass

// out[t * kShrinkRows + j] = dot(a[j], xw row t) for t < TM: the A rows against TM widened x rows
// (row stride ldxw, zero-padded to whole vectors). Each A vector is widened once for the TM tokens.
template <int TM, typename T>
static void shrink_pass(const T* const* a, const float* xw, int64_t ldxw, int64_t k, float* out) {
  V acc[TM][kShrinkRows];
  for (int t = 0; t < TM; ++t)
    for (int j = 0; j < kShrinkRows; ++j) acc[t][j] = vzero();
  const int64_t full = k - k % kLanes;
  for (int64_t c = 0; c < full; c += kLanes) {
    V w[kShrinkRows];
    for (int j = 0; j < kShrinkRows; ++j) w[j] = vload(a[j] + c);
    for (int t = 0; t < TM; ++t) {
      V xv = vload(xw + t * ldxw + c);
      LORA_KEEP(xv);
      for (int j = 0; j < kShrinkRows; ++j) acc[t][j] = vfma(w[j], xv, acc[t][j]);
    }
  }
  if (full < k) {  // the last, partial vector: the A rows' tails zero-padded (x's rows already are)
    V w[kShrinkRows];
    for (int j = 0; j < kShrinkRows; ++j) w[j] = vload_n(a[j] + full, k - full);
    for (int t = 0; t < TM; ++t) {
      const V xv = vload(xw + t * ldxw + full);
      for (int j = 0; j < kShrinkRows; ++j) acc[t][j] = vfma(w[j], xv, acc[t][j]);
    }
  }
  for (int t = 0; t < TM; ++t)
    for (int j = 0; j < kShrinkRows; ++j) out[t * kShrinkRows + j] = vsum(acc[t][j]);
}

// For t < TM and o < kBlock, sum over r of v[t][r] * bt[r][o] (bt: the slot's B tile transposed, row
// stride ldb; v: rows of `rank` floats), added into y[t][o] and rounded where y is given (y[t]: TM row
// pointers at the block's first output), else stored to out[t][o] (row stride ldo).
template <int TM, typename T>
static void expand_pass(const float* bt, int64_t ldb, const float* v, int64_t rank, T* const* y, float* out,
                        int64_t ldo) {
  V acc[TM][kExpandVecs];
  for (int t = 0; t < TM; ++t)
    for (int j = 0; j < kExpandVecs; ++j) acc[t][j] = vzero();
  for (int64_t r = 0; r < rank; ++r) {
    V b[kExpandVecs];
    for (int j = 0; j < kExpandVecs; ++j) {
      b[j] = vload(bt + r * ldb + j * kLanes);
      LORA_KEEP(b[j]);
    }
    for (int t = 0; t < TM; ++t) {
      const V s = vset(v[t * rank + r]);
      for (int j = 0; j < kExpandVecs; ++j) acc[t][j] = vfma(s, b[j], acc[t][j]);
    }
  }
  for (int t = 0; t < TM; ++t)
    for (int j = 0; j < kExpandVecs; ++j) {
      if (y) vaccumulate(y[t] + j * kLanes, acc[t][j]);
      else vstore(out + t * ldo + j * kLanes, acc[t][j]);
    }
}

template <typename T>
static void expand_call(int tm, const float* bt, int64_t ldb, const float* v, int64_t rank, T* const* y, float* out,
                        int64_t ldo) {
  switch (tm) {
    case 1: return expand_pass<1>(bt, ldb, v, rank, y, out, ldo);
    case 2: return expand_pass<2>(bt, ldb, v, rank, y, out, ldo);
    case 3: return expand_pass<3>(bt, ldb, v, rank, y, out, ldo);
    default: return expand_pass<4>(bt, ldb, v, rank, y, out, ldo);
  }
}

// Shrink for the tokens at positions [p0, p1) of token_indices, all of slot s: v[p][r] = x[row(p)] . A[s][r].
// xw: scratch for kTokens widened x rows of round_up(in, kLanes) floats.
template <typename T>
void shrink_tokens(const Problem<T>& g, int64_t s, int64_t p0, int64_t p1, float* xw, float* v) {
  const int64_t k = g.in, ldxw = (k + kLanes - 1) / kLanes * kLanes, rank = g.rank;
  const T* a = g.a + s * g.a_slot;
  for (int64_t p = p0; p < p1; p += kTokens) {
    const int tm = static_cast<int>(std::min<int64_t>(kTokens, p1 - p));
    for (int t = 0; t < tm; ++t) {
      float* row = xw + t * ldxw;
      sansllm_cpu::load_row(g.x + g.rows[p + t] * g.ldx, row, k);
      for (int64_t i = k; i < ldxw; ++i) row[i] = 0.0f;
    }
    for (int64_t r = 0; r < rank; r += kShrinkRows) {
      const T* rows[kShrinkRows];  // past the last A row: the last again, its sums dropped
      for (int j = 0; j < kShrinkRows; ++j) rows[j] = a + std::min<int64_t>(r + j, rank - 1) * g.a_row;
      float out[kTokens * kShrinkRows];
      switch (tm) {
        case 1: shrink_pass<1>(rows, xw, ldxw, k, out); break;
        case 2: shrink_pass<2>(rows, xw, ldxw, k, out); break;
        case 3: shrink_pass<3>(rows, xw, ldxw, k, out); break;
        default: shrink_pass<4>(rows, xw, ldxw, k, out); break;
      }
      for (int t = 0; t < tm; ++t)
        for (int j = 0; j < kShrinkRows && r + j < rank; ++j) v[(p + t) * rank + r + j] = out[t * kShrinkRows + j];
    }
  }
}

inline int64_t rank_padded(int64_t rank) { return (rank + kLanes - 1) / kLanes * kLanes; }

// The row stride of the transposed B tile: whole passes, plus a cache line so that its rows do not all
// fall in the same L1 sets (a stride of a power of two times 64 bytes thrashed L1 from rank 16 on).
inline int64_t tile_stride(int64_t width) { return (width + kBlock - 1) / kBlock * kBlock + 16; }


// Floats of scratch `expand_tokens` needs for an output tile of `width` columns and rank `rank`.
inline int64_t expand_scratch(int64_t width, int64_t rank) {
  return tile_stride(width) * rank_padded(rank) + kTokens * kBlock;
}

// Expand for the tokens at positions [p0, p1) of slot s, outputs [o0, o1): y[row(p)][o] = round(y + v[p] . B[s][o]).
// The B tile is transposed to float32 once here, kLanes x kLanes blocks at a time in registers, and
// serves every token of the range.
template <typename T>
void expand_tokens(const Problem<T>& g, int64_t s, int64_t p0, int64_t p1, int64_t o0, int64_t o1, const float* v,
                   float* scratch) {
  const int64_t rank = g.rank, width = o1 - o0, ldb = tile_stride(width);
  const int64_t padded = (width + kBlock - 1) / kBlock * kBlock, full = width / kBlock * kBlock;
  float* bt = scratch;                         // [rank_padded][ldb]: bt[r][o] = B[s][o0 + o][r]
  float* sums = bt + rank_padded(rank) * ldb;  // [kTokens][kBlock]: a last, partial block's sums
  const T* b = g.b + s * g.b_slot + o0 * g.b_row;
  for (int64_t o = 0; o < padded; o += kLanes) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kLanes, width - o));
    for (int64_t r = 0; r < rank; r += kLanes)
      transpose_block(b + o * g.b_row + r, g.b_row, rows, rank - r, bt + r * ldb + o, ldb);
  }
  for (int64_t p = p0; p < p1; p += kTokens) {
    const int tm = static_cast<int>(std::min<int64_t>(kTokens, p1 - p));
    const float* vt = v + p * rank;
    T* y[kTokens];
    for (int t = 0; t < tm; ++t) y[t] = g.y + g.rows[p + t] * g.ldy + o0;
    for (int64_t o = 0; o < full; o += kBlock) {
      T* cols[kTokens];
      for (int t = 0; t < tm; ++t) cols[t] = y[t] + o;
      expand_call<T>(tm, bt + o, ldb, vt, rank, cols, nullptr, 0);
    }
    if (full < width) {  // the last, partial block: through `sums`, the same float32 add and rounding
      expand_call<T>(tm, bt + full, ldb, vt, rank, nullptr, sums, kBlock);
      for (int t = 0; t < tm; ++t)
        for (int64_t o = full; o < width; ++o)
          y[t][o] = static_cast<T>(static_cast<float>(y[t][o]) + sums[t * kBlock + o - full]);
    }
  }
}
