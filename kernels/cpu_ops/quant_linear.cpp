// `y = x @ dequant(W).T` on GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16), for
// the CPU. Layouts: `quant_formats.h`. Three paths, picked per call by the number of activation rows:
//
// Float GEMV (few rows: decode; the default, `quant_float_simd.h`). Bound by reading the weights: float32
// weights move 4 bytes per weight, Q8_0 1.06, Q6_K 0.82, Q5_K 0.69, Q4_x 0.56-0.63. Each block is read
// once per tile of activation rows and decoded in registers to gguf's float32 values; float32 FMAs, so
// the result differs from dequantize-then-matmul by the summation order only.
//
// int8 GEMV (`activations` = 1; Q4_0, Q4_1, Q8_0 and the K-quants; `quant_linear_simd.h`). The activations
// are quantized to int8 (scale max|x| / 127, round to nearest) per block of 32 for the 32-element formats
// and per super-block of 256 for the K-quants, so that the dot products are integer sums of byte products
// (AVX-512 VNNI `vpdpbusd` / `vpdpwssd`, or AVX2 `vpmaddubsw` + `vpmaddwd`), scaled in float32 once per
// block (once per super-block for the K-quants, whose integer sub-block scales multiply the int16 pair
// sums). Q4_0's -8 and Q4_1's minimum are per-block float terms (Q4_1's on the exact sum of x); the
// K-quants' minimums and Q6_K's offset of 32 multiply int16 sums of the quantized activations per 16
// elements. The result differs from dequantize-then-matmul by the activations' rounding only: at most
// sum_j |w_j - m_j| * d_x(j) / 2 per output, where m_j is Q4_1's block minimum and 0 otherwise (the
// tests check that bound). With VNNI 1.2-1.5x faster than the float GEMV for the 32-element formats,
// 1.8-2.5x for the K-quants.
//
// Batched (prefill, decode of many sequences): the GEMV's cost grows with the rows faster than a float
// GEMM's, so from `batched_from` rows each thread dequantizes a tile of weight rows (~1 MB, in cache)
// into float32, or bfloat16 when x is bfloat16 and the CPU has AVX512-BF16, and multiplies it with
// at::mm into its columns of the output. Exact up to float32 rounding in float32 (the dequantized
// values are gguf's, bit for bit); in bfloat16 the weights round to bfloat16 (2^-8 relative).
//
// Not torch's own weight-packed matmuls (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), measured
// at the same shapes (bench/quant_linear.py, bench/RESULTS.md "Quantized linear kernels (issue 7)"): with
// float32 activations they took 5-90x F.linear's time on this AVX-512 CPU (a slow path for float32 x);
// with bfloat16 activations the int8 pack matches the int8 GEMV at 1-2 rows and falls behind from 4 (its
// time grows in proportion to the rows), the int4 pack is slower at every row count; and both would hold
// requantized weights (one int8 scale per row; bfloat16 group scales and zeros), not the file's values.
//
// GEMV paths, chosen at run time from the CPU's flags (`quant_linear_isa()`), each forcible by `isa`:
// 2 = AVX-512 VNNI (with VL/BW, on 256-bit vectors), 1 = AVX2 + FMA + F16C, 0 = plain C++. The SIMD
// paths are compiled under `#pragma GCC target`, so every path builds for any x86-64 CPU whatever
// -march says; on other CPUs (or other compilers) only the plain path is built.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "common.h"
#include "quant_formats.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QL_X86 1
#include <immintrin.h>
#else
#define QL_X86 0
#endif

namespace {

using namespace ql;

// ---- plain C++ GEMV: the same integer arithmetic, for any CPU ----

template <int F>
void rows_plain(const QuantArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  constexpr int64_t bytes = block_bytes(F);
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    float acc[kMaxRows] = {};
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* block = row + b * bytes;
      const float d = half_at(block);
      float c = 0.0f;
      if constexpr (F == kQ4_0) c = d;
      if constexpr (F == kQ4_1) c = half_at(block + 2);
      for (int r = 0; r < rows; ++r) {
        const int8_t* q = a.xq + r * a.k + b * kBlock;
        int32_t sum = 0;
        if constexpr (F == kQ8_0) {
          const int8_t* w = reinterpret_cast<const int8_t*>(block + 2);
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < kBlock; ++j) sum += static_cast<int32_t>(w[j]) * static_cast<int32_t>(q[j]);
        } else {
          const uint8_t* qs = block + (F == kQ4_0 ? 2 : 4);
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < kBlock / 2; ++j)
            sum += static_cast<int32_t>(qs[j] & 0x0F) * q[j] + static_cast<int32_t>(qs[j] >> 4) * q[j + kBlock / 2];
        }
        float term = static_cast<float>(sum) * (d * a.xd[b * kMaxRows + r]);
        if constexpr (F != kQ8_0) term += c * a.xs[b * kMaxRows + r];
        acc[r] += term;
      }
    }
    for (int r = 0; r < rows; ++r) a.y[r * a.ldy + o] = acc[r];
  }
}

// K-quants: each super-block decoded once (`k_decode`) for every activation row of the tile.
template <int F>
void k_rows_plain(const QuantArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  constexpr int64_t bytes = block_bytes(F);
  KDecoded k;
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    float acc[kMaxRows] = {};
    for (int64_t sb = 0; sb < a.nb; ++sb) {
      k_decode<F>(row + sb * bytes, k);
      for (int r = 0; r < rows; ++r) {
        const int8_t* q = a.xq + r * a.k + sb * kSuper;
        const int16_t* xb = a.xb + (r * a.nb + sb) * 16;
        int32_t sum = 0, offsets = 0;
        for (int s = 0; s < 16; ++s) {
          int32_t part = 0;
#pragma omp simd reduction(+ : part)
          for (int i = 0; i < 16; ++i) part += static_cast<int32_t>(k.q[16 * s + i]) * q[16 * s + i];
          sum += k.scale[s] * part;
          offsets += F == kQ6_K ? 32 * k.scale[s] * xb[s] : k.mins[s / 2] * xb[s];
        }
        const float dx = a.xd[r * a.nb + sb];
        acc[r] += F == kQ6_K ? static_cast<float>(sum - offsets) * (k.d * dx)
                             : static_cast<float>(sum) * (k.d * dx) - static_cast<float>(offsets) * (k.dmin * dx);
      }
    }
    for (int r = 0; r < rows; ++r) a.y[r * a.ldy + o] = acc[r];
  }
}

void run_plain(int qtype, const QuantArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  switch (qtype) {
    case kQ8_0: return rows_plain<kQ8_0>(a, rows, o_begin, o_end);
    case kQ4_0: return rows_plain<kQ4_0>(a, rows, o_begin, o_end);
    case kQ4_1: return rows_plain<kQ4_1>(a, rows, o_begin, o_end);
    case kQ4_K: return k_rows_plain<kQ4_K>(a, rows, o_begin, o_end);
    case kQ5_K: return k_rows_plain<kQ5_K>(a, rows, o_begin, o_end);
    default: return k_rows_plain<kQ6_K>(a, rows, o_begin, o_end);
  }
}

// ---- plain C++ float GEMV: each block dequantized to float32, then dot products, for any CPU ----

// A row's arithmetic is the same whatever `rows` is (batch invariance).
template <int F>
void float_rows_plain(const FloatArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  constexpr int n = block_elements(F);
  constexpr int64_t bytes = block_bytes(F);
  alignas(64) float w[kSuper];
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    float acc[kMaxRows] = {};
    for (int64_t b = 0; b < a.nb; ++b) {
      dequantize_block<F>(row + b * bytes, w);
      for (int r = 0; r < rows; ++r) {
        const float* x = a.x + r * a.k + b * n;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < n; ++i) sum += w[i] * x[i];
        acc[r] += sum;
      }
    }
    for (int r = 0; r < rows; ++r) a.y[r * a.ldy + o] = acc[r];
  }
}

void run_float_plain(int qtype, const FloatArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  with_format(qtype, [&](auto f) { float_rows_plain<decltype(f)::value>(a, rows, o_begin, o_end); });
}

}  // namespace

// ---- the SIMD paths, one copy of the same body per instruction set ----
#if QL_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace ql_avx2 {
namespace {
#define QL_VNNI 0
#define QL_BF16 0
#define QL_AVX512 0
#include "quant_simd_blocks.h"
#include "quant_linear_simd.h"
#include "quant_dequant_simd.h"
#include "quant_float_simd.h"
#undef QL_AVX512
#undef QL_BF16
#undef QL_VNNI
}  // namespace
}  // namespace ql_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace ql_avx512 {
namespace {
#define QL_VNNI 1
#define QL_AVX512 1
#include "quant_simd_blocks.h"
#include "quant_linear_simd.h"
#include "quant_float_simd.h"
#undef QL_AVX512
#undef QL_VNNI
}  // namespace
}  // namespace ql_avx512
#pragma GCC pop_options

// bfloat16 tiles rounded by `vcvtneps2bf16` where the CPU has AVX512-BF16 (its bfloat16 GEMMs use them)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")
namespace ql_bf16 {
namespace {
#define QL_BF16 1
#include "quant_simd_blocks.h"
#include "quant_dequant_simd.h"
#undef QL_BF16
}  // namespace
}  // namespace ql_bf16
#pragma GCC pop_options
#endif

namespace {

int64_t best_isa() {
#if QL_X86
  static const int64_t isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
    return 0;
  }();
  return isa;
#else
  return 0;
#endif
}

// Whether bfloat16 GEMMs run on hardware (AVX512-BF16's `vdpbf16ps`); elsewhere oneDNN emulates them,
// slower than float32.
bool bf16_gemm_is_fast() {
#if QL_X86
  static const bool fast = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return fast;
#else
  return false;
#endif
}

// ---- activations to int8 ----

// Per block of 32: scales xd and block terms xs (Q4_0: -8 * d * sum(q); Q4_1: sum(x); Q8_0: unused), as
// [tiles, nb, kMaxRows] (see `QuantArgs`).
template <typename T>
void quantize_blocks(const T* x, int64_t rows, int64_t k, int qtype, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = k / kBlock;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float values[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        sansllm_cpu::load_row(x + r * k + b * kBlock, values, kBlock);
        float amax = 0.0f, total = 0.0f;
        for (int j = 0; j < kBlock; ++j) {
          amax = std::max(amax, std::fabs(values[j]));
          total += values[j];
        }
        const float d = amax / 127.0f;
        const float inverse = d > 0.0f ? 1.0f / d : 0.0f;
        int8_t* q = xq + r * k + b * kBlock;
        int32_t qsum = 0;
        for (int j = 0; j < kBlock; ++j) {
          const int v = static_cast<int>(std::nearbyint(values[j] * inverse));
          q[j] = static_cast<int8_t>(std::min(127, std::max(-127, v)));
          qsum += q[j];
        }
        const int64_t at = ((r / kMaxRows) * nb + b) * kMaxRows + r % kMaxRows;
        xd[at] = d;
        xs[at] = qtype == kQ4_0 ? -8.0f * d * static_cast<float>(qsum) : total;
      }
    }
  });
}

// Per super-block of 256: scales xd and the sums of q per 16 elements xb (int16: at most 16 * 127).
template <typename T>
void quantize_super_blocks(const T* x, int64_t rows, int64_t k, int8_t* xq, float* xd, int16_t* xb) {
  const int64_t nb = k / kSuper;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float values[kSuper];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        sansllm_cpu::load_row(x + r * k + b * kSuper, values, kSuper);
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int j = 0; j < kSuper; ++j) amax = std::max(amax, std::fabs(values[j]));
        const float d = amax / 127.0f;
        const float inverse = d > 0.0f ? 1.0f / d : 0.0f;
        int8_t* q = xq + r * k + b * kSuper;
        for (int j = 0; j < kSuper; ++j) {
          const int v = static_cast<int>(std::nearbyint(values[j] * inverse));
          q[j] = static_cast<int8_t>(std::min(127, std::max(-127, v)));
        }
        for (int s = 0; s < 16; ++s) {
          int32_t sum = 0;
          for (int j = 0; j < 16; ++j) sum += q[16 * s + j];
          xb[(r * nb + b) * 16 + s] = static_cast<int16_t>(sum);
        }
        xd[r * nb + b] = d;
      }
    }
  });
}

// ---- the GEMV path ----

void gemv(const at::Tensor& x, const uint8_t* w, int type, int64_t n, int64_t k, int64_t isa, float* y) {
  const int64_t rows = x.size(0), nb = k / block_elements(type), row_bytes = nb * block_bytes(type);
  const int64_t tiles = (rows + kMaxRows - 1) / kMaxRows;
  std::vector<int8_t> xq(rows * k);
  std::vector<float> xd, xs;
  std::vector<int16_t> xb;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (is_k(type)) {
    xd.resize(rows * nb);
    xb.resize(rows * nb * 16);
    if (bf16) quantize_super_blocks(x.data_ptr<at::BFloat16>(), rows, k, xq.data(), xd.data(), xb.data());
    else quantize_super_blocks(x.data_ptr<float>(), rows, k, xq.data(), xd.data(), xb.data());
  } else {
    xd.resize(tiles * nb * kMaxRows);  // zeros in the lanes of a last, short tile
    xs.resize(tiles * nb * kMaxRows);
    if (bf16) quantize_blocks(x.data_ptr<at::BFloat16>(), rows, k, type, xq.data(), xd.data(), xs.data());
    else quantize_blocks(x.data_ptr<float>(), rows, k, type, xq.data(), xd.data(), xs.data());
  }
  // weight rows per task: ~32 KB of blocks, so small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // weight rows in chunks that stay in cache while every tile of activation rows passes over them
    const int64_t chunk = std::max<int64_t>(1, 16384 / row_bytes);
    for (int64_t o = begin; o < end; o += chunk) {
      const int64_t o_end = std::min(end, o + chunk);
      for (int64_t t = 0; t < rows; t += kMaxRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kMaxRows, rows - t));
        const QuantArgs args{w,
                             row_bytes,
                             nb,
                             k,
                             xq.data() + t * k,
                             xd.data() + t * nb,  // t is a multiple of kMaxRows: the same offset in both layouts
                             xs.empty() ? nullptr : xs.data() + t * nb,
                             xb.empty() ? nullptr : xb.data() + t * nb * 16,
                             y + t * n,
                             n};
#if QL_X86
        if (isa == 2) {
          ql_avx512::kernel_for(type, tile)(args, o, o_end);
          continue;
        }
        if (isa == 1) {
          ql_avx2::kernel_for(type, tile)(args, o, o_end);
          continue;
        }
#endif
        run_plain(type, args, tile, o, o_end);
      }
    }
  });
}

// ---- the float GEMV: float32 activations, weights decoded in registers ----

// activation rows per pass over the weights on path `isa`
int float_tile(int64_t isa) {
#if QL_X86
  if (isa == 2) return ql_avx512::kFloatTile;
  if (isa == 1) return ql_avx2::kFloatTile;
#endif
  return kMaxRows;
}

void float_gemv(const at::Tensor& x, const uint8_t* w, int type, int64_t n, int64_t k, int64_t isa, float* y) {
  const int64_t rows = x.size(0), nb = k / block_elements(type), row_bytes = nb * block_bytes(type);
  // bfloat16 widened once (here, not by x.to(): an ATen op costs microseconds, ~120 calls per step)
  std::vector<float> widened;
  const float* xs = x.scalar_type() == at::kFloat ? x.data_ptr<float>() : nullptr;
  if (!xs) {
    widened.resize(rows * k);
    sansllm_cpu::load_row(x.data_ptr<at::BFloat16>(), widened.data(), rows * k);
    xs = widened.data();
  }
  // tiles of at most float_tile(isa) rows, of even sizes (9 rows: 5 + 4, not 8 + 1: a one-row pass has
  // nothing to share its decoding with)
  const int64_t tiles = (rows + float_tile(isa) - 1) / float_tile(isa), base = rows / tiles, extra = rows % tiles;
  // weight rows per task: ~32 KB of blocks, so small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    // weight rows in chunks that stay in cache while every tile of activation rows passes over them
    const int64_t chunk = std::max<int64_t>(1, 16384 / row_bytes);
    for (int64_t o = begin; o < end; o += chunk) {
      const int64_t o_end = std::min(end, o + chunk);
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t t = i * base + std::min(i, extra);  // the tile's first row
        const int count = static_cast<int>(base + (i < extra));
        const FloatArgs args{w, row_bytes, nb, k, xs + t * k, y + t * n, n};
#if QL_X86
        if (isa == 2) {
          ql_avx512::float_kernel_for(type, count)(args, o, o_end);
          continue;
        }
        if (isa == 1) {
          ql_avx2::float_kernel_for(type, count)(args, o, o_end);
          continue;
        }
#endif
        run_float_plain(type, args, count, o, o_end);
      }
    }
  });
}

// ---- the batched path: dequantized tiles of weight rows into at::mm ----

// Weight rows [0, rows) of `w` dequantized into out [rows, k] (float32, or bfloat16 rounded to nearest).
template <int F, typename T>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t rows, T* out) {
  constexpr int n = block_elements(F);
  const int64_t nb = k / n;
  float values[kSuper];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      T* dst = out + r * k + b * n;
      if constexpr (std::is_same_v<T, float>) {
        dequantize_block<F>(w + r * row_bytes + b * block_bytes(F), dst);
      } else {
        dequantize_block<F>(w + r * row_bytes + b * block_bytes(F), values);
        sansllm_cpu::store_row(values, 1.0f, dst, n);
      }
    }
  }
}

template <typename T>
void dequantize_rows(int type, const uint8_t* w, int64_t row_bytes, int64_t k, int64_t rows, T* out) {
  with_format(type, [&](auto f) { dequantize_rows<decltype(f)::value>(w, row_bytes, k, rows, out); });
}

// Dequantization on the same instruction set as the GEMV path `isa` (the AVX2 code serves the AVX-512
// path, but for bfloat16 rounding where the CPU has AVX512-BF16), so that `isa` forces both paths.
template <typename T>
void dequantize_any(int type, const uint8_t* w, int64_t row_bytes, int64_t k, int64_t rows, T* out, int64_t isa) {
#if QL_X86
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (isa == 2 && bf16_gemm_is_fast()) return ql_bf16::dequantize_rows(type, w, row_bytes, k, rows, out);
  }
  if (isa >= 1) return ql_avx2::dequantize_rows(type, w, row_bytes, k, rows, out);
#endif
  dequantize_rows(type, w, row_bytes, k, rows, out);
}

// dequantized weights per tile, about a core's L2: large tiles, because every at::mm call packs x again
// (256 KB tiles measured 1.3-2x slower than 1 MB at 16-64 rows)
constexpr int64_t kTileBytes = 1024 * 1024;

// y [rows, n] (in `compute`'s dtype) = x @ dequant(W).T, one tile of weight rows per task.
void batched(const at::Tensor& x, const uint8_t* w, int type, int64_t n, int64_t k, at::ScalarType compute,
             int64_t isa, at::Tensor& y) {
  const at::Tensor xm = x.scalar_type() == compute ? x : x.to(compute);
  const int64_t row_bytes = k / block_elements(type) * block_bytes(type);
  const int64_t element = compute == at::kBFloat16 ? 2 : 4, threads = at::get_num_threads();
  // rows per tile: within kTileBytes, a multiple of 16, and no fewer tiles than threads
  const int64_t per_thread = (n + threads - 1) / threads;
  int64_t tile = std::max<int64_t>(16, kTileBytes / (k * element) / 16 * 16);
  tile = std::max<int64_t>(1, std::min(tile, (per_thread + 15) / 16 * 16));
  const int64_t tiles = (n + tile - 1) / tile;
  // the caller's thread-local state (inference mode above all) on the pool's threads too: at::mm_out
  // into an inference tensor is refused outside inference mode
  const at::ThreadLocalState caller;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard same_state(caller);
    at::Tensor buffer = at::empty({tile, k}, xm.options());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t * tile, count = std::min(tile, n - o);
      if (compute == at::kBFloat16)
        dequantize_any(type, w + o * row_bytes, row_bytes, k, count, buffer.data_ptr<at::BFloat16>(), isa);
      else
        dequantize_any(type, w + o * row_bytes, row_bytes, k, count, buffer.data_ptr<float>(), isa);
      at::Tensor columns = y.narrow(1, o, count);
      at::mm_out(columns, xm, buffer.narrow(0, 0, count).t());
    }
  });
}

// Activation rows from which the batched path beats the GEMV: measured with bench/quant_linear.py on
// SmolLM2-135M's shapes at 1 and 2 threads on an AVX-512 VNNI + BF16 CPU, AVX2 and plain forced on it
// (bench/RESULTS.md, "Quantized linear kernels (issue 7)"):
// - float GEMV: float32 tiles from 32 rows with AVX-512 (16-64 by shape and format), bfloat16 tiles
//   from 16 (8-32); with AVX2 from 16 (8-16); plain from 4 (1-16).
// - int8 GEMV: float32 tiles never with VNNI (its integer products stay ahead of a float32 GEMM through
//   512 rows, at 0.7-0.95x F.linear's time), from 64 rows with AVX2; bfloat16 tiles from 32 rows, 48 for
//   the K-quants (32-64), whose int8 GEMV costs less per row (one float multiply per 256 elements).
int64_t batched_from(int type, bool int8, int64_t isa, bool bf16_tiles) {
  constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  if (isa == 0) return 4;
  if (bf16_tiles) return int8 ? (is_k(type) ? 48 : 32) : 16;
  if (isa == 1) return int8 ? 64 : 16;
  return int8 ? kNever : 32;
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, int64_t qtype, int64_t out_features,
                        int64_t in_features, int64_t isa, int64_t path, const c10::optional<at::Tensor>& out,
                        int64_t activations) {
  TORCH_CHECK(is_supported(qtype), "quant_linear: GGML type ", qtype,
              " is not supported (F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, "
              "Q6_K = 14, BF16 = 30)");
  const int type = static_cast<int>(qtype);
  const int64_t block = block_elements(type);
  TORCH_CHECK(in_features > 0 && in_features % block == 0, "quant_linear: in_features must be a multiple of ",
              block, " for GGML type ", qtype, ", got ", in_features);
  TORCH_CHECK(out_features >= 0, "quant_linear: out_features must be >= 0");
  const int64_t row_bytes = in_features / block * block_bytes(type);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  qweight.numel() == out_features * row_bytes,
              "quant_linear: qweight must be contiguous uint8 holding ", out_features, " rows of ", row_bytes,
              " bytes, got ", qweight.numel(), " bytes");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "quant_linear: x must be [rows, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16");
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa <= best_isa(), "quant_linear: this CPU cannot run path ", isa, " (best: ", best_isa(), ")");
  TORCH_CHECK(path >= -1 && path <= 2, "quant_linear: path must be -1 (auto), 0 (GEMV), 1 (float32 tiles) or 2 "
              "(bfloat16 tiles)");
  TORCH_CHECK(path != 2 || x.scalar_type() == at::kBFloat16, "quant_linear: bfloat16 tiles need bfloat16 x");
  TORCH_CHECK(activations == 0 || activations == 1, "quant_linear: activations must be 0 (float) or 1 (int8)");
  // int8 activations where the format has that GEMV; Q5_0, Q5_1, F16 and BF16 take the float one
  const bool int8 = activations == 1 && has_int8_gemv(type);

  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0);
  at::Tensor y;
  if (out) {
    TORCH_CHECK(out->scalar_type() == x.scalar_type() && out->is_contiguous() && out->dim() == 2 &&
                    out->size(0) == rows && out->size(1) == out_features,
                "quant_linear: out must be a contiguous [", rows, ", ", out_features, "] tensor of x's dtype");
    y = *out;
  } else {
    y = at::empty({rows, out_features}, x.options());
  }
  if (rows == 0 || out_features == 0) return y;
  if (path < 0) {
    const bool bf16_tiles = x.scalar_type() == at::kBFloat16 && bf16_gemm_is_fast();
    path = rows < batched_from(type, int8, isa, bf16_tiles) ? 0 : (bf16_tiles ? 2 : 1);
  }
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  if (path == 0) {  // float32 sums, into y or (bfloat16 y) a buffer rounded into it
    std::vector<float> buffer(y.scalar_type() == at::kFloat ? 0 : rows * out_features);
    float* sums = buffer.empty() ? y.data_ptr<float>() : buffer.data();
    if (int8) gemv(xc, w, type, out_features, in_features, isa, sums);
    else float_gemv(xc, w, type, out_features, in_features, isa, sums);
    if (!buffer.empty()) sansllm_cpu::store_row(sums, 1.0f, y.data_ptr<at::BFloat16>(), rows * out_features);
    return y;
  }
  const at::ScalarType compute = path == 1 ? at::kFloat : at::kBFloat16;
  // float32 results go straight into y; bfloat16 ones from a float32 GEMM through a copy
  at::Tensor result = y.scalar_type() == compute ? y : at::empty({rows, out_features}, x.options().dtype(compute));
  batched(xc, w, type, out_features, in_features, compute, isa, result);
  if (!result.is_same(y)) y.copy_(result);
  return y;
}

int64_t quant_linear_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sansllm_cpu, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, int qtype, int out_features, int in_features, int isa, "
        "int path=-1, Tensor? out=None, int activations=0) -> Tensor");
  m.def("quant_linear_isa() -> int", &quant_linear_isa);  // the best GEMV path this CPU runs
}

TORCH_LIBRARY_IMPL(sansllm_cpu, CPU, m) { m.impl("quant_linear", &quant_linear); }
