// The GGUF block formats the quantized linear kernels read, and the decoding every path shares.
//
// Layouts (GGUF's raw tensor data; every row of a matrix is a run of blocks, little-endian fp16):
//   Q4_0  18 B / 32:  d, 16 B nibbles; w = d * (q - 8). Byte j: element j (low nibble), j + 16 (high).
//   Q4_1  20 B / 32:  d, m, 16 B nibbles; w = d * q + m.
//   Q5_0  22 B / 32:  d, 4 B fifth bits (a little-endian word: bit j is element j's), 16 B nibbles as Q4_0;
//                     w = d * (q - 16).
//   Q5_1  24 B / 32:  d, m, 4 B fifth bits, 16 B nibbles; w = d * q + m.
//   Q8_0  34 B / 32:  d, 32 int8; w = d * q.
//   F16, BF16:        one 16-bit float per element; the kernels take them in "blocks" of 32 (64 B).
//   Q4_K 144 B / 256: d, dmin, 12 B of 6-bit sub-scales sc[8] and mins m[8], 128 B nibbles;
//                     sub-block s (32 elements): w = d * sc[s] * q - dmin * m[s]. The nibbles come in
//                     four runs of 32 bytes: run c holds sub-block 2c in its low nibbles, 2c + 1 in its high.
//   Q5_K 176 B / 256: d, dmin, 12 B scales as Q4_K, 32 B high bits, 128 B nibbles as Q4_K; element j of
//                     sub-block s has its fifth bit at bit s of high-bit byte j.
//   Q6_K 210 B / 256: 128 B low nibbles, 64 B high bit pairs, 16 int8 sub-scales (one per 16 elements),
//                     d last; w = d * sc[e / 16] * (q - 32). Each half of 128 elements has 64 low-nibble
//                     bytes (byte i: element i low, i + 64 high) and 32 high bytes (byte i: bits 2t..2t+1
//                     are the top bits of element i + 32 t).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace ql {

// GGML's type ids
constexpr int kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14,
              kBF16 = 30;
constexpr int kBlock = 32;   // elements per block of the 32-element formats (and per sub-block of K-quants)
constexpr int kSuper = 256;  // elements per K-quant super-block

constexpr bool is_k(int f) { return f == kQ4_K || f == kQ5_K || f == kQ6_K; }
// fn(std::integral_constant<int, F>{}) for the float-path format `type` (Q6_K for any other id:
// callers check the type first). The one switch from a run-time type id to each format's template.
template <typename Fn>
inline decltype(auto) with_format(int type, Fn&& fn) {
  switch (type) {
    case kF16: return fn(std::integral_constant<int, kF16>{});
    case kBF16: return fn(std::integral_constant<int, kBF16>{});
    case kQ8_0: return fn(std::integral_constant<int, kQ8_0>{});
    case kQ4_0: return fn(std::integral_constant<int, kQ4_0>{});
    case kQ4_1: return fn(std::integral_constant<int, kQ4_1>{});
    case kQ5_0: return fn(std::integral_constant<int, kQ5_0>{});
    case kQ5_1: return fn(std::integral_constant<int, kQ5_1>{});
    case kQ4_K: return fn(std::integral_constant<int, kQ4_K>{});
    case kQ5_K: return fn(std::integral_constant<int, kQ5_K>{});
    default: return fn(std::integral_constant<int, kQ6_K>{});
  }
}

constexpr bool is_float16(int f) { return f == kF16 || f == kBF16; }
constexpr bool is_supported(int64_t f) {
  return f == kQ4_0 || f == kQ4_1 || f == kQ5_0 || f == kQ5_1 || f == kQ8_0 || f == kQ4_K || f == kQ5_K ||
         f == kQ6_K || f == kF16 || f == kBF16;
}
// the formats the int8-activation GEMV takes (the others run the float GEMV whatever is asked)
constexpr bool has_int8_gemv(int64_t f) {
  return f == kQ4_0 || f == kQ4_1 || f == kQ8_0 || f == kQ4_K || f == kQ5_K || f == kQ6_K;
}
constexpr int block_elements(int f) { return is_k(f) ? kSuper : kBlock; }
constexpr int64_t block_bytes(int f) {
  switch (f) {
    case kF16:
    case kBF16: return 64;
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    default: return 210;  // Q6_K
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// n bfloat16 values (raw bytes) widened to float32: the top half of a float32's bits
inline void bf16_to_float(const uint8_t* src, float* out, int n) {
  for (int i = 0; i < n; ++i) {
    uint16_t half;
    std::memcpy(&half, src + 2 * i, 2);
    const uint32_t bits = static_cast<uint32_t>(half) << 16;
    std::memcpy(out + i, &bits, 4);
  }
}

// Q4_K / Q5_K's 12 bytes -> sc[0..7] and m[0..7] (6 bits each), as four words of four bytes: sc[0..3],
// sc[4..7], m[0..3], m[4..7]. Bytes 0-3 hold sc[0..3] in their low six bits, bytes 4-7 m[0..3]; bytes 8-11
// hold the low four bits of sc[4..7] (low nibble) and m[4..7] (high nibble), whose top two bits sit in
// bits 6-7 of bytes 0-3 (sc) and 4-7 (m). Four bytes at a time.
inline void k_scale_words(const uint8_t* packed, uint32_t words[4]) {
  uint32_t a, b, c;
  std::memcpy(&a, packed, 4);
  std::memcpy(&b, packed + 4, 4);
  std::memcpy(&c, packed + 8, 4);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, top2 = 0x30303030u;
  words[0] = a & low6;
  words[1] = (c & low4) | ((a >> 2) & top2);
  words[2] = b & low6;
  words[3] = ((c >> 4) & low4) | ((b >> 2) & top2);
}

// A K-quant super-block decoded: its 256 values as unsigned integers (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63,
// whose offset of 32 the caller subtracts), the integer scale of each run of 16 elements, and for Q4_K /
// Q5_K the integer minimum of each sub-block of 32, so that w = d * scale * q - dmin * min (Q6_K:
// d * scale * (q - 32)). Plain loops: the compiler vectorises them for the CPU it builds on.
struct KDecoded {
  alignas(64) uint8_t q[kSuper];
  int16_t scale[16];
  int16_t mins[8];
  float d, dmin;
};

template <int F>
inline void k_decode(const uint8_t* block, KDecoded& out) {
  if constexpr (F == kQ6_K) {
    const uint8_t *low = block, *high = block + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
    for (int h = 0; h < 2; ++h) {
      uint8_t* q = out.q + 128 * h;
      const uint8_t *l = low + 64 * h, *hb = high + 32 * h;
#pragma omp simd
      for (int i = 0; i < 32; ++i) {
        q[i] = static_cast<uint8_t>((l[i] & 0x0F) | ((hb[i] & 0x03) << 4));
        q[i + 32] = static_cast<uint8_t>((l[i + 32] & 0x0F) | (((hb[i] >> 2) & 0x03) << 4));
        q[i + 64] = static_cast<uint8_t>((l[i] >> 4) | (((hb[i] >> 4) & 0x03) << 4));
        q[i + 96] = static_cast<uint8_t>((l[i + 32] >> 4) | (((hb[i] >> 6) & 0x03) << 4));
      }
    }
    for (int s = 0; s < 16; ++s) out.scale[s] = scales[s];
    out.d = half_at(block + 208);
    out.dmin = 0.0f;
  } else {
    out.d = half_at(block);
    out.dmin = half_at(block + 2);
    uint32_t words[4];
    k_scale_words(block + 4, words);
    uint8_t sc[8], mins[8];
    std::memcpy(sc, words, 8);
    std::memcpy(mins, words + 2, 8);
    const uint8_t* nibbles = block + (F == kQ5_K ? 48 : 16);
    const uint8_t* high = block + 16;  // Q5_K's fifth bits
    for (int c = 0; c < 4; ++c) {
      uint8_t* q = out.q + 64 * c;
      const uint8_t* n = nibbles + 32 * c;
#pragma omp simd
      for (int i = 0; i < 32; ++i) {
        q[i] = n[i] & 0x0F;
        q[i + 32] = n[i] >> 4;
        if constexpr (F == kQ5_K) {
          q[i] |= static_cast<uint8_t>(((high[i] >> (2 * c)) & 1) << 4);
          q[i + 32] |= static_cast<uint8_t>(((high[i] >> (2 * c + 1)) & 1) << 4);
        }
      }
    }
    for (int s = 0; s < 8; ++s) {
      out.scale[2 * s] = out.scale[2 * s + 1] = sc[s];
      out.mins[s] = mins[s];
    }
  }
}

// One block's values as float32 (32 for the 32-element formats, 256 for K-quants), for the batched path.
template <int F>
inline void dequantize_block(const uint8_t* block, float* out) {
  if constexpr (is_k(F)) {
    KDecoded k;
    k_decode<F>(block, k);
    // the same float32 products as gguf's dequantization (exact but for Q6_K's, which rounds alike)
    for (int s = 0; s < 16; ++s) {
      const float scale = k.d * static_cast<float>(k.scale[s]);
      const uint8_t* q = k.q + 16 * s;
      if constexpr (F == kQ6_K) {
#pragma omp simd
        for (int i = 0; i < 16; ++i) out[16 * s + i] = scale * static_cast<float>(q[i] - 32);
      } else {
        const float offset = k.dmin * static_cast<float>(k.mins[s / 2]);
#pragma omp simd
        for (int i = 0; i < 16; ++i) out[16 * s + i] = scale * static_cast<float>(q[i]) - offset;
      }
    }
  } else if constexpr (F == kQ8_0) {
    const float d = half_at(block);
    const int8_t* q = reinterpret_cast<const int8_t*>(block + 2);
#pragma omp simd
    for (int i = 0; i < kBlock; ++i) out[i] = d * static_cast<float>(q[i]);
  } else if constexpr (F == kQ5_0 || F == kQ5_1) {
    const float d = half_at(block);
    const float m = F == kQ5_0 ? -16.0f * d : half_at(block + 2);
    uint32_t high;
    std::memcpy(&high, block + (F == kQ5_0 ? 2 : 4), 4);
    const uint8_t* q = block + (F == kQ5_0 ? 6 : 8);
    for (int i = 0; i < kBlock / 2; ++i) {
      const int low = (q[i] & 0x0F) | (((high >> i) & 1) << 4);
      const int top = (q[i] >> 4) | (((high >> (i + 16)) & 1) << 4);
      out[i] = d * static_cast<float>(low) + m;
      out[i + kBlock / 2] = d * static_cast<float>(top) + m;
    }
  } else if constexpr (F == kF16) {
    for (int i = 0; i < kBlock; ++i) out[i] = half_at(block + 2 * i);
  } else if constexpr (F == kBF16) {
    bf16_to_float(block, out, kBlock);
  } else {
    const float d = half_at(block);
    const float m = F == kQ4_0 ? -8.0f * d : half_at(block + 2);
    const uint8_t* q = block + (F == kQ4_0 ? 2 : 4);
#pragma omp simd
    for (int i = 0; i < kBlock / 2; ++i) {
      out[i] = d * static_cast<float>(q[i] & 0x0F) + m;
      out[i + kBlock / 2] = d * static_cast<float>(q[i] >> 4) + m;
    }
  }
}

// One activation tile of up to kMaxRows rows, already quantized to int8, and where its outputs go.
// 32-element formats: xd and xs per block of 32, as [nb, kMaxRows] (row r of block b at b * kMaxRows + r;
// xs: Q4_0 -8 * d_x * sum(q), Q4_1 sum(x), Q8_0 unused). K-quants: xd per super-block of 256, as
// [rows, nb], and xb, 16 int16 sums of q per super-block (one per 16 elements).
struct QuantArgs {
  const uint8_t* w;  // the weight's blocks
  int64_t row_bytes, nb, k;
  const int8_t* xq;   // [rows, k] int8 activations
  const float* xd;    // activation scales: [nb, kMaxRows] (32-element formats) or [rows, nb] (K-quants)
  const float* xs;    // [nb, kMaxRows] (32-element formats)
  const int16_t* xb;  // [rows, nb, 16] (K-quants)
  float* y;           // [rows, ldy]
  int64_t ldy;
};

constexpr int kMaxRows = 8;  // activation rows per pass over the weights
using RowsFn = void (*)(const QuantArgs&, int64_t, int64_t);

// One tile of float32 activation rows for the float GEMV, and where its outputs go.
struct FloatArgs {
  const uint8_t* w;  // the weight's blocks
  int64_t row_bytes, nb, k;
  const float* x;  // [rows, k]
  float* y;        // [rows, ldy]
  int64_t ldy;
};

using FloatRowsFn = void (*)(const FloatArgs&, int64_t, int64_t);

}  // namespace ql
