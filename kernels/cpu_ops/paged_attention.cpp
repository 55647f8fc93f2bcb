// Decode attention over the paged KV cache for the CPU: each sequence's one new query token attends
// over its cached keys and values, read in place through its block table.
//
// Why C++: in torch ops the keys and values have to be gathered out of their blocks (and permuted for
// the batched matmuls) first, which copies the whole context of every sequence in every layer; for 32
// sequences of ~200 tokens that was ~27 ms of a ~100 ms SmolLM2-135M decode step. Reading the blocks
// in place makes it a single pass over the keys and one over the values.
//
// Layout (kernels/kv_cache.py): key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim];
// query [num_seqs, num_heads, head_dim]; block_tables [num_seqs, max_blocks] int32; seq_lens [num_seqs]
// int32. Query heads are grouped over kv heads (GQA): head h reads kv head h / (num_heads / num_kv_heads).
// Scores and the softmax are in float32 whatever the cache dtype, as the torch path computes them.
// With a sliding window W > 0 (Gemma 3's local layers) a sequence of length L reads only positions
// L - W .. L - 1: the query sits at L - 1 and sees the last W positions up to its own.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#if defined(__AVX512F__)  // also covers AVX512-BF16, which implies it
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using sansllm_cpu::load_row;
using sansllm_cpu::store_row;

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// q . k for bfloat16 rows straight from memory, `n` a multiple of 32, where the CPU has AVX512-BF16 (built
// with -march=native, so the build machine decides): one instruction multiplies 32 pairs and accumulates
// in float32, with no widening of the cached row first.
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;
inline float dot_bf16(const at::BFloat16* a, const at::BFloat16* b, int64_t n) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 32)
    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
  return _mm512_reduce_add_ps(sum);
}

#else
constexpr bool kHasBf16Dot = false;
inline float dot_bf16(const at::BFloat16*, const at::BFloat16*, int64_t) { return 0.f; }
#endif

// acc[0:HD] = sum over t of weights[t] * row_t, the rows (bfloat16 or float32) at `base + offsets[t]`,
// with AVX-512: the HD/16 float32 accumulators stay in registers for the whole walk over the sequence.
#if defined(__AVX512F__)
constexpr bool kHasAvx512 = true;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

template <typename T, int HD>
inline void weighted_sum(const float* weights, const T* base, const int64_t* offsets, int64_t len, float* acc) {
  static_assert(HD % 16 == 0 && HD <= 256, "HD must be a multiple of 16, at most 256");
  __m512 sums[HD / 16];
  for (int i = 0; i < HD / 16; ++i) sums[i] = _mm512_setzero_ps();
  constexpr int64_t kAhead = 8;  // rows are scattered over blocks: ask for the one 8 positions on
  for (int64_t t = 0; t < len; ++t) {
    if (t + kAhead < len) {
      const char* next = reinterpret_cast<const char*>(base + offsets[t + kAhead]);
      for (int64_t line = 0; line < HD * static_cast<int64_t>(sizeof(T)); line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
    }
    const __m512 w = _mm512_set1_ps(weights[t]);
    const T* row = base + offsets[t];
    for (int i = 0; i < HD / 16; ++i) sums[i] = _mm512_fmadd_ps(w, load16(row + 16 * i), sums[i]);
  }
  for (int i = 0; i < HD / 16; ++i) _mm512_storeu_ps(acc + 16 * i, sums[i]);
}
#else
constexpr bool kHasAvx512 = false;
template <typename T, int HD>
inline void weighted_sum(const float*, const T*, const int64_t*, int64_t, float*) {}
#endif

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Ask for block `index` of a sequence (if it has one) while the current block is being read: blocks
// are scattered, so the hardware prefetcher cannot guess the next one.
template <typename T>
inline void prefetch_block(const T* cache, const int32_t* table, int64_t index, int64_t len, int64_t block_size,
                           int64_t token_stride) {
  if (index * block_size >= len) return;
  const char* start = reinterpret_cast<const char*>(cache + static_cast<int64_t>(table[index]) * block_size * token_stride);
  const int64_t bytes = std::min(block_size, len - index * block_size) * token_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(start + line);
}

template <typename T>
void decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t sliding_window,
                      at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const T* q = query.data_ptr<T>();
  const T* keys = key_cache.data_ptr<T>();
  const T* values = value_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* o = out.data_ptr<T>();
  const int64_t token_stride = num_kv_heads * head_dim;  // between positions inside a block
  const float softmax_scale = static_cast<float>(scale);
  // A task is one sequence with all its kv heads, so it reads each cached position's keys (and values)
  // as one contiguous row and whole blocks front to back, which the prefetcher follows; reading one kv
  // head per task (a strided walk) measured ~4.5x slower on a cold cache. With fewer sequences than
  // threads, a task is one (sequence, kv head) so every core still has work.
  const int64_t heads_per_task = num_seqs >= 2 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t tasks_per_seq = num_kv_heads / heads_per_task;

  at::parallel_for(0, num_seqs * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = heads_per_task * group;  // query heads of one task
    std::vector<float> qf(rows * head_dim), row(token_stride), acc(rows * head_dim), scores, inv_sums(rows);
    std::vector<int64_t> offsets;  // element offset of each position's row in the cache
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / tasks_per_seq, first_kv = (task % tasks_per_seq) * heads_per_task;
      // Positions [first, first + len) of the sequence are read; `table` and `t` below count from `first`.
      const int64_t seq_len = lens[seq];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(seq_len - sliding_window, 0) : 0;
      const int64_t len = seq_len - first;
      const int32_t* table = tables + seq * max_blocks;
      const int64_t first_head = first_kv * group;
      T* out_rows = o + (seq * num_heads + first_head) * head_dim;
      if (len <= 0) {
        std::fill(acc.begin(), acc.end(), 0.f);
        store_row(acc.data(), 1.f, out_rows, rows * head_dim);
        continue;
      }
      load_row(q + (seq * num_heads + first_head) * head_dim, qf.data(), rows * head_dim);
      for (float& value : qf) value *= softmax_scale;
      const int64_t width = heads_per_task * head_dim;  // the slice of a cached row this task reads
      const int64_t offset = first_kv * head_dim;
      scores.resize(rows * len);
      const T* q_rows = q + (seq * num_heads + first_head) * head_dim;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t p = first + t;
        if (t == 0 || p % block_size == 0) prefetch_block(keys, table, p / block_size + 1, seq_len, block_size, token_stride);
        const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
        const T* key_row = keys + slot * token_stride + offset;
        if constexpr (std::is_same_v<T, at::BFloat16> && kHasBf16Dot) {
          if (head_dim % 32 == 0) {
            for (int64_t r = 0; r < rows; ++r)
              scores[r * len + t] =
                  dot_bf16(q_rows + r * head_dim, key_row + (r / group) * head_dim, head_dim) * softmax_scale;
            continue;
          }
        }
        const float* key_floats = row.data();
        if constexpr (std::is_same_v<T, float>) {
          key_floats = key_row;  // already float32: no copy
        } else {
          load_row(key_row, row.data(), width);
        }
        for (int64_t r = 0; r < rows; ++r)
          scores[r * len + t] = dot(qf.data() + r * head_dim, key_floats + (r / group) * head_dim, head_dim);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores.data() + r * len;
        float peak = s[0];  // not -inf: built with -ffast-math, which assumes finite values
        for (int64_t t = 1; t < len; ++t) peak = std::max(peak, s[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - peak);  // vectorised by libmvec under -ffast-math
          total += s[t];
        }
        inv_sums[r] = 1.f / total;
      }
      if constexpr ((std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>) && kHasAvx512) {
        if (head_dim == 64 || head_dim == 128 || head_dim == 256) {
          offsets.resize(len);
          for (int64_t t = 0; t < len; ++t) {
            const int64_t p = first + t;
            offsets[t] = (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size) * token_stride;
          }
          for (int64_t r = 0; r < rows; ++r) {
            const T* base = values + offset + (r / group) * head_dim;
            float* sums = acc.data() + r * head_dim;
            if (head_dim == 64) weighted_sum<T, 64>(scores.data() + r * len, base, offsets.data(), len, sums);
            else if (head_dim == 128) weighted_sum<T, 128>(scores.data() + r * len, base, offsets.data(), len, sums);
            else weighted_sum<T, 256>(scores.data() + r * len, base, offsets.data(), len, sums);
          }
          for (int64_t r = 0; r < rows; ++r)
            store_row(acc.data() + r * head_dim, inv_sums[r], out_rows + r * head_dim, head_dim);
          continue;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t p = first + t;
        if (t == 0 || p % block_size == 0) prefetch_block(values, table, p / block_size + 1, seq_len, block_size, token_stride);
        const int64_t slot = static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size;
        load_row(values + slot * token_stride + offset, row.data(), width);
        for (int64_t r = 0; r < rows; ++r)
          axpy(scores[r * len + t], row.data() + (r / group) * head_dim, acc.data() + r * head_dim, head_dim);
      }
      for (int64_t r = 0; r < rows; ++r)
        store_row(acc.data() + r * head_dim, inv_sums[r], out_rows + r * head_dim, head_dim);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                  int64_t sliding_window) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "query [S, H, D] and cache [B, bs, Hkv, D] expected");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "query and caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() && value_cache.scalar_type() == query.scalar_type(),
              "query and caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "block_tables, seq_lens must be contiguous");
  TORCH_CHECK(query.size(2) == key_cache.size(3) && query.size(1) % key_cache.size(2) == 0,
              "head_dim must match and num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.size(0) == query.size(0) && seq_lens.size(0) == query.size(0), "one row per sequence");
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sansllm_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int sliding_window=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(sansllm_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
