// The small per-layer ops of a decoder step for the CPU, one pass each: RMSNorm with the residual add,
// rotary embedding, SiLU-and-mul, and the KV-cache write.
//
// Why C++: in torch ops each of these is 2-10 separate kernels with temporaries; over 30 layers that was
// ~1,500 op calls and ~13 ms of a ~60 ms SmolLM2-135M decode step for 32 sequences. Each function keeps
// the rounding steps of its torch reference in `kernels/torch_ops` (a result is rounded to the tensor's
// dtype wherever torch would store it), so the two agree to float32 rounding noise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using sansllm_cpu::load_row;
using sansllm_cpu::round_to;

// Rows per task: enough work that a small batch stays on one thread instead of paying for a fork.
inline int64_t grain_for(int64_t row_elements) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elements, 1)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, features] with contiguous features");
}

template <typename T>
void rms_norm_rows(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                   double eps, at::Tensor& out, at::Tensor& hidden) {
  const int64_t rows = x.size(0), width = x.size(1);
  const T* xs = x.data_ptr<T>();
  const T* rs = residual ? residual->data_ptr<T>() : nullptr;
  const T* ws = weight.data_ptr<T>();
  T* os = out.data_ptr<T>();
  T* hs = residual ? hidden.data_ptr<T>() : nullptr;  // without a residual the rows are x itself
  const int64_t x_stride = x.stride(0), r_stride = residual ? residual->stride(0) : 0;
  at::parallel_for(0, rows, grain_for(width), [&](int64_t begin, int64_t end) {
    std::vector<float> h(width), w(width), other(width), normed(width);
    load_row(ws, w.data(), width);
    for (int64_t r = begin; r < end; ++r) {
      load_row(xs + r * x_stride, h.data(), width);
      if (rs) {
        load_row(rs + r * r_stride, other.data(), width);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) h[i] = round_to<T>(h[i] + other[i]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += h[i] * h[i];
      const float inv_rms = 1.f / std::sqrt(squares / static_cast<float>(width) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) normed[i] = round_to<T>(h[i] * inv_rms) * w[i];
      sansllm_cpu::store_row(normed.data(), 1.f, os + r * width, width);
      if (hs) sansllm_cpu::store_row(h.data(), 1.f, hs + r * width, width);
    }
  });
}

// (out, x + residual): the normed rows and the new residual stream (x itself when there is no residual).
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual must match x");
  }
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight must be [features]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must share x's dtype");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor hidden = residual ? at::empty_like(out) : out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x, residual, weight, eps, out, hidden);
  });
  return {out, residual ? hidden : x};
}

template <typename T>
void rotate_rows(const at::Tensor& positions, const at::Tensor& x, const at::Tensor& table, int64_t head_dim,
                 bool is_neox, at::Tensor& out) {
  const int64_t rows = x.size(0), width = x.size(1), heads = width / head_dim;
  const int64_t rot_dim = table.size(1), half = rot_dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cos_sin = table.data_ptr<float>();
  const T* xs = x.data_ptr<T>();
  T* os = out.data_ptr<T>();
  const int64_t x_stride = x.stride(0);
  at::parallel_for(0, rows, grain_for(width), [&](int64_t begin, int64_t end) {
    std::vector<float> c(half), s(half), row(width), rotated(width);
    for (int64_t r = begin; r < end; ++r) {
      const float* entry = cos_sin + pos[r] * rot_dim;
      for (int64_t i = 0; i < half; ++i) {
        c[i] = round_to<T>(entry[i]);  // the torch path casts the table rows to x's dtype first
        s[i] = round_to<T>(entry[half + i]);
      }
      load_row(xs + r * x_stride, row.data(), width);
      for (int64_t h = 0; h < heads; ++h) {
        const float* in = row.data() + h * head_dim;
        float* dst = rotated.data() + h * head_dim;
        if (is_neox) {  // pairs (i, i + half)
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            dst[i] = round_to<T>(round_to<T>(in[i] * c[i]) - in[i + half] * s[i]);
            dst[i + half] = round_to<T>(round_to<T>(in[i + half] * c[i]) + in[i] * s[i]);
          }
        } else {  // GPT-J style pairs (2i, 2i + 1)
          for (int64_t i = 0; i < half; ++i) {
            dst[2 * i] = round_to<T>(round_to<T>(in[2 * i] * c[i]) - in[2 * i + 1] * s[i]);
            dst[2 * i + 1] = round_to<T>(round_to<T>(in[2 * i + 1] * c[i]) + in[2 * i] * s[i]);
          }
        }
        for (int64_t i = rot_dim; i < head_dim; ++i) dst[i] = in[i];
      }
      sansllm_cpu::store_row(rotated.data(), 1.f, os + r * width, width);
    }
  });
}

// (q, k) rotated by the angles of `positions`; q and k may be row-strided views (slices of one qkv matmul).
std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& cos_sin_cache,
                                                    int64_t head_dim, bool is_neox) {
  check_rows(q, "q");
  check_rows(k, "k");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions must be contiguous int64 [rows]");
  TORCH_CHECK(positions.size(0) == q.size(0) && k.size(0) == q.size(0), "one position per row");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.is_contiguous(),
              "cos_sin_cache must be contiguous float32");
  TORCH_CHECK(cos_sin_cache.size(1) <= head_dim && cos_sin_cache.size(1) % 2 == 0, "rotary dims must fit a head");
  TORCH_CHECK(q.size(1) % head_dim == 0 && k.size(1) % head_dim == 0, "rows must hold whole heads");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "q and k must share a dtype");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < positions.size(0); ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < cos_sin_cache.size(0), "position ", pos[r], " is outside the rotary table");
  at::Tensor q_out = at::empty({q.size(0), q.size(1)}, q.options());
  at::Tensor k_out = at::empty({k.size(0), k.size(1)}, k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding", [&] {
    rotate_rows<scalar_t>(positions, q, cos_sin_cache, head_dim, is_neox, q_out);
    rotate_rows<scalar_t>(positions, k, cos_sin_cache, head_dim, is_neox, k_out);
  });
  return {q_out, k_out};
}

template <typename T>
void silu_and_mul_rows(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  const T* xs = x.data_ptr<T>();
  T* os = out.data_ptr<T>();
  const int64_t x_stride = x.stride(0);
  at::parallel_for(0, rows, grain_for(2 * d), [&](int64_t begin, int64_t end) {
    std::vector<float> row(2 * d), product(d);
    for (int64_t r = begin; r < end; ++r) {
      load_row(xs + r * x_stride, row.data(), 2 * d);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float g = row[i];
        product[i] = round_to<T>(g / (1.f + std::exp(-g))) * row[d + i];  // exp vectorised by libmvec
      }
      sansllm_cpu::store_row(product.data(), 1.f, os + r * d, d);
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0, "x must hold gate and up halves");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(x, out);
  });
  return out;
}

// Copy each row of key/value [rows, kv_heads * head_dim] (row-strided views allowed) to its cache slot;
// slot -1 is a padding row and is skipped.
void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                       const at::Tensor& slot_mapping) {
  check_rows(key, "key");
  check_rows(value, "value");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  const int64_t width = key_cache.size(2) * key_cache.size(3);
  TORCH_CHECK(key.size(1) == width && value.size(1) == width, "rows must be kv_heads * head_dim wide");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == value_cache.scalar_type(),
              "rows and caches must share a dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
              "one contiguous slot per row");
  const at::Tensor slots = slot_mapping.scalar_type() == at::kLong ? slot_mapping : slot_mapping.to(at::kLong);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t capacity = key_cache.size(0) * key_cache.size(1), bytes = width * key.element_size();
  const char* ks = static_cast<const char*>(key.data_ptr());
  const char* vs = static_cast<const char*>(value.data_ptr());
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size(), v_stride = value.stride(0) * value.element_size();
  for (int64_t r = 0; r < key.size(0); ++r) {
    if (slot[r] < 0) continue;
    TORCH_CHECK(slot[r] < capacity, "slot ", slot[r], " is outside the cache");
    std::memcpy(kc + slot[r] * bytes, ks + r * k_stride, bytes);
    std::memcpy(vc + slot[r] * bytes, vs + r * v_stride, bytes);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sansllm_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def(
      "rotary_embedding(Tensor positions, Tensor q, Tensor k, Tensor cos_sin_cache, int head_dim, bool is_neox) "
      "-> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(sansllm_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("reshape_and_cache", &reshape_and_cache);
}
