// Helpers shared by the C++ CPU kernels: widening rows to float32 and rounding back, the way torch rounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace sansllm_cpu {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {  // float16, float64
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  // bfloat16 is the top half of a float32: widening is a shift, which vectorises.
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// float32 bits rounded to the nearest bfloat16 (ties to even), as c10::BFloat16 does for finite values;
// branch-free so that loops over rows vectorise (c10's conversion checks for NaN and does not).
inline uint32_t bf16_rounded_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits + 0x7FFFu + ((bits >> 16) & 1u);
}

template <typename T>
inline void store_row(const float* src, float scale, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * scale);
}

inline void store_row(const float* src, float scale, at::BFloat16* dst, int64_t n) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint16_t>(bf16_rounded_bits(src[i] * scale) >> 16);
}

// x rounded to T and back: what torch stores between two ops computed in T.
template <typename T>
inline float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <>
inline float round_to<float>(float x) {
  return x;
}

template <>
inline float round_to<at::BFloat16>(float x) {
  const uint32_t bits = bf16_rounded_bits(x) & 0xFFFF0000u;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace sansllm_cpu
