// `y = x @ dequant(W).T` computed on GGUF quantized blocks as they are (Q8_0, Q4_0, Q4_1), for the CPU.
//
// Why: decode with one or a few rows is bound by reading the weights; float32 weights move 4 bytes per
// weight, Q8_0 1.06 and Q4_x 0.56-0.63. The kernel reads each quantized block once per (up to) 8
// activation rows and never writes a dequantized copy.
//
// How (llama.cpp's scheme): every activation row is quantized to int8 per block of 32 (scale
// max|x| / 127, round to nearest), so that a block's dot product is an integer sum of byte products
// (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw` + `vpmaddwd`), scaled once by d_w * d_x and summed in
// float32. The unsigned operand is the Q4 nibble (0..15; the -8 of Q4_0 and the min of Q4_1 are folded
// into a per-block term: -8 * d_w * d_x * sum(q_x), m_w * sum(x)) or, for Q8_0, |w| with w's signs moved
// onto the activations. The result differs from dequantize-then-matmul by the activations' rounding
// to the int8 grid only (at most sum_j |w_j - m_j| * d_x / 2 per output; the tests check that bound).
//
// Paths, chosen at run time from the CPU's flags (`quant_linear_isa()`), each forcible by `isa`:
// 2 = AVX-512 VNNI (with VL/BW, on 256-bit vectors), 1 = AVX2 + FMA + F16C, 0 = plain C++. The SIMD
// paths are compiled under `#pragma GCC target`, so every path builds for any x86-64 CPU whatever
// -march says; on other CPUs (or other compilers) only the plain path is built.
//
// Layout: qweight is GGUF's raw tensor data (what gguf's GGUFReader gives as `tensor.data`): out_features
// rows, each of in_features / 32 blocks. Q8_0: fp16 d, 32 int8 (34 bytes); Q4_0: fp16 d, 16 bytes of
// nibbles, w = d * (q - 8) (18 bytes); Q4_1: fp16 d, fp16 m, 16 bytes, w = d * q + m (20 bytes). In a
// Q4 block, byte j holds element j in its low nibble and element j + 16 in its high one.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QL_X86 1
#include <immintrin.h>
#else
#define QL_X86 0
#endif

namespace {

constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;  // GGML's type ids
constexpr int kBlock = 32;
constexpr int kMaxRows = 8;  // activation rows per pass over the weights

constexpr int64_t block_bytes(int qtype) { return qtype == kQ8_0 ? 34 : qtype == kQ4_0 ? 18 : 20; }

// One tile of up to kMaxRows activation rows, already quantized, and where its outputs go.
struct QuantArgs {
  const uint8_t* w;  // the weight's blocks
  int64_t row_bytes, nb, k;
  const int8_t* xq;  // [rows, k] int8 activations
  const float* xd;   // [rows, nb] activation scales
  const float* xs;   // [rows, nb] per-block term: Q4_0 -8 * d_x * sum(q), Q4_1 sum(x), Q8_0 unused
  float* y;          // [rows, ldy]
  int64_t ldy;
};

using RowsFn = void (*)(const QuantArgs&, int64_t, int64_t);

// ---- plain C++: the same integer arithmetic, for any CPU ----

template <int F>
void rows_plain(const QuantArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  constexpr int64_t bytes = block_bytes(F);
  for (int64_t o = o_begin; o < o_end; ++o) {
    const uint8_t* row = a.w + o * a.row_bytes;
    float acc[kMaxRows] = {};
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* block = row + b * bytes;
      uint16_t bits;
      std::memcpy(&bits, block, 2);
      const float d = c10::detail::fp16_ieee_to_fp32_value(bits);
      float c = 0.0f;
      if constexpr (F == kQ4_0) c = d;
      if constexpr (F == kQ4_1) {
        std::memcpy(&bits, block + 2, 2);
        c = c10::detail::fp16_ieee_to_fp32_value(bits);
      }
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
        float term = static_cast<float>(sum) * (d * a.xd[r * a.nb + b]);
        if constexpr (F != kQ8_0) term += c * a.xs[r * a.nb + b];
        acc[r] += term;
      }
    }
    for (int r = 0; r < rows; ++r) a.y[r * a.ldy + o] = acc[r];
  }
}

void run_plain(int qtype, const QuantArgs& a, int rows, int64_t o_begin, int64_t o_end) {
  switch (qtype) {
    case kQ8_0: return rows_plain<kQ8_0>(a, rows, o_begin, o_end);
    case kQ4_0: return rows_plain<kQ4_0>(a, rows, o_begin, o_end);
    default: return rows_plain<kQ4_1>(a, rows, o_begin, o_end);
  }
}

}  // namespace

// ---- the SIMD paths, one copy of the same body per instruction set ----
#if QL_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace ql_avx2 {
namespace {
#define QL_VNNI 0
#include "quant_linear_simd.h"
#undef QL_VNNI
}  // namespace
}  // namespace ql_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace ql_avx512 {
namespace {
#define QL_VNNI 1
#include "quant_linear_simd.h"
#undef QL_VNNI
}  // namespace
}  // namespace ql_avx512
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

// x [rows, k] (float32, or anything `load_row` widens) as int8 blocks with their scales and block terms.
template <typename T>
void quantize_activations(const T* x, int64_t rows, int64_t k, int qtype, int8_t* xq, float* xd, float* xs) {
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
        xd[r * nb + b] = d;
        xs[r * nb + b] = qtype == kQ4_0 ? -8.0f * d * static_cast<float>(qsum) : total;
      }
    }
  });
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, int64_t qtype, int64_t out_features,
                        int64_t in_features, int64_t isa) {
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1,
              "quant_linear: GGML type ", qtype, " is not supported (Q8_0 = 8, Q4_0 = 2, Q4_1 = 3)");
  TORCH_CHECK(in_features > 0 && in_features % kBlock == 0, "quant_linear: in_features must be a multiple of 32");
  TORCH_CHECK(out_features >= 0, "quant_linear: out_features must be >= 0");
  const int64_t nb = in_features / kBlock, row_bytes = nb * block_bytes(static_cast<int>(qtype));
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  qweight.numel() == out_features * row_bytes,
              "quant_linear: qweight must be contiguous uint8 holding ", out_features, " rows of ", row_bytes,
              " bytes");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "quant_linear: x must be [rows, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16");
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa <= best_isa(), "quant_linear: this CPU cannot run path ", isa, " (best: ", best_isa(), ")");

  const at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0);
  at::Tensor y = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  if (rows == 0 || out_features == 0) return y.to(x.scalar_type());
  std::vector<int8_t> xq(rows * in_features);
  std::vector<float> xd(rows * nb), xs(rows * nb);
  const int type = static_cast<int>(qtype);
  if (xc.scalar_type() == at::kFloat) {
    quantize_activations(xc.data_ptr<float>(), rows, in_features, type, xq.data(), xd.data(), xs.data());
  } else {
    quantize_activations(xc.data_ptr<at::BFloat16>(), rows, in_features, type, xq.data(), xd.data(), xs.data());
  }

  const uint8_t* w = qweight.data_ptr<uint8_t>();
  float* ys = y.data_ptr<float>();
  // weight rows per task: ~32 KB of blocks, so small layers stay on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / row_bytes);
  at::parallel_for(0, out_features, grain, [&](int64_t begin, int64_t end) {
    // weight rows in chunks that stay in cache while every tile of activation rows passes over them
    const int64_t chunk = std::max<int64_t>(1, 16384 / row_bytes);
    for (int64_t o = begin; o < end; o += chunk) {
      const int64_t o_end = std::min(end, o + chunk);
      for (int64_t t = 0; t < rows; t += kMaxRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kMaxRows, rows - t));
        const QuantArgs args{w,           row_bytes,       nb, in_features, xq.data() + t * in_features,
                             xd.data() + t * nb, xs.data() + t * nb, ys + t * out_features, out_features};
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
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

int64_t quant_linear_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sansllm_cpu, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, int qtype, int out_features, int in_features, int isa) -> Tensor");
  m.def("quant_linear_isa() -> int", &quant_linear_isa);  // the best path this CPU runs
}

TORCH_LIBRARY_IMPL(sansllm_cpu, CPU, m) { m.impl("quant_linear", &quant_linear); }

