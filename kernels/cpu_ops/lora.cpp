// Batched LoRA for the CPU (punica / S-LoRA's grouped shrink-expand): for each token row t that adapter
// slot s holds, y[t] = round(y[t] + (x[t] @ A[s].T) @ B[s].T), both products in float32 and one rounding
// to y's dtype at the end, as the torch reference `kernels/torch_ops/lora.py` defines it.
//
// Why C++: the reference is ~8 ATen ops per slot (gather, two matmuls, gather, add, cast, scatter),
// 25-90 µs per slot at decode sizes for 0.1-1.4 million multiply-adds; this kernel takes 2.4-11x less
// time there in bfloat16, 1.4-10x in float32 (bench/lora_kernel.py, bench/RESULTS.md "Batched LoRA
// kernel (issue 11)").
//
// Two phases, each a list of work items pulled by the threads from a shared counter (items differ in
// size: slots hold different numbers of tokens):
// - shrink, items (slot, tokens): v[n, R] = x[rows] @ A[s].T in float32. Tokens go through in passes of 4,
//   each A vector widened once per pass and multiplied into every token's accumulators.
// - expand, items (slot, tokens, output tile): the tile of B[s] is transposed to float32 once per item,
//   then each pass of 4 tokens broadcasts v[t][r] against B's vectors of outputs; y rows are updated in
//   place (the items' (row, output) ranges are disjoint: a row is in one slot at most, checked here).
// Decode (a few tokens per slot over 1-5 slots) gets its parallelism from the output tiles, prefill (many
// tokens in a slot) from token ranges as well.
//
// Instruction sets, chosen at run time from the CPU's flags (`lora_isa()`), each forcible by `isa`:
// 2 = AVX-512 (F, BW, VL), 1 = AVX2 + FMA + F16C, 0 = plain C++. The SIMD paths are compiled under
// `#pragma GCC target`, so every path builds for any x86-64 CPU whatever -march says. float32, bfloat16
// and float16 inputs are widened to float32 on load. Batch invariance: `lora_simd.h`.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LORA_X86 1
#include <immintrin.h>
#else
#define LORA_X86 0
#endif

namespace {

// One call's operands: row strides in elements; the last dimension of every matrix is contiguous.
template <typename T>
struct Problem {
  const T* x;
  int64_t ldx;
  T* y;
  int64_t ldy;
  const T* a;  // [S, R, in]
  int64_t a_slot, a_row;
  const T* b;  // [S, out, R]
  int64_t b_slot, b_row;
  const int64_t* rows;  // token_indices
  int64_t in, out, rank;
};

}  // namespace

// The plain path's "vectors" are loops the compiler vectorizes as it likes; under -ffast-math it may also
// reassociate a token's sums, differently for passes of different sizes (seen: one token alone and the
// same token among others differed in the last bit). Without fast-math and contraction here, every sum
// is computed as written, so the plain path is batch-invariant as the intrinsics paths are.
#pragma GCC push_options
#pragma GCC optimize("no-fast-math", "fp-contract=off")
namespace lora_plain {
namespace {
#define LORA_ISA 0
#include "lora_simd.h"
#undef LORA_ISA
}  // namespace
}  // namespace lora_plain
#pragma GCC pop_options

#if LORA_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace lora_avx2 {
namespace {
#define LORA_ISA 1
#include "lora_simd.h"
#undef LORA_ISA
}  // namespace
}  // namespace lora_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace lora_avx512 {
namespace {
#define LORA_ISA 2
#include "lora_simd.h"
#undef LORA_ISA
}  // namespace
}  // namespace lora_avx512
#pragma GCC pop_options
#endif

namespace {

int64_t best_isa() {
#if LORA_X86
  static const int64_t isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return 2;
    return avx2 ? 1 : 0;
  }();
  return isa;
#else
  return 0;
#endif
}

template <typename T>
struct Paths {
  void (*shrink)(const Problem<T>&, int64_t, int64_t, int64_t, float*, float*);
  void (*expand)(const Problem<T>&, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, float*);
  int64_t (*expand_scratch)(int64_t, int64_t);
  int64_t lanes;
};

template <typename T>
Paths<T> paths_for(int64_t isa) {
#if LORA_X86
  if (isa == 2)
    return {lora_avx512::shrink_tokens<T>, lora_avx512::expand_tokens<T>, lora_avx512::expand_scratch,
            lora_avx512::kLanes};
  if (isa == 1)
    return {lora_avx2::shrink_tokens<T>, lora_avx2::expand_tokens<T>, lora_avx2::expand_scratch, lora_avx2::kLanes};
#endif
  return {lora_plain::shrink_tokens<T>, lora_plain::expand_tokens<T>, lora_plain::expand_scratch, lora_plain::kLanes};
}

struct Item {
  int64_t slot, p0, p1, o0, o1;
};

// Multiply-adds below which a call stays on the calling thread: forking costs more than it saves.
constexpr int64_t kParallelFrom = 1 << 17;
constexpr int64_t kShrinkTokens = 64;   // most tokens per shrink item (A[s] is read once per item)
constexpr int64_t kExpandTokens = 64;   // most tokens per expand item (its B tile is transposed once)
constexpr int64_t kWidestTile = 512;    // outputs per expand item, halved down to 64 for parallelism

// Runs fn(item, scratch) for items [0, count): threads pull the next item from a shared counter, each
// with its own scratch of `scratch_floats` floats.
template <typename Fn>
void run_items(int64_t count, bool parallel, int64_t scratch_floats, const Fn& fn) {
  if (count == 0) return;
  const int64_t tasks = parallel ? std::min<int64_t>(count, at::get_num_threads()) : 1;
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t, int64_t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(i, scratch.data());
  };
  if (tasks <= 1) work(0, 1);
  else at::parallel_for(0, tasks, 1, work);
}

// Token ranges of about `target` tokens (at most `most`), equal in size, covering [begin, end).
void split_tokens(int64_t begin, int64_t end, int64_t target, int64_t most, std::vector<std::pair<int64_t, int64_t>>& out) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t size = std::max<int64_t>(1, std::min(target, most));
  const int64_t parts = (n + size - 1) / size, base = n / parts, extra = n % parts;
  int64_t p = begin;
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t q = p + base + (i < extra);
    out.emplace_back(p, q);
    p = q;
  }
}

template <typename T>
void run(const Problem<T>& g, const std::vector<int64_t>& offsets, int64_t isa) {
  const Paths<T> paths = paths_for<T>(isa);
  const int64_t slots = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t tokens = offsets[slots] - offsets[0];
  const int64_t threads = at::get_num_threads();
  const bool parallel = threads > 1 && tokens * g.rank * (g.in + g.out) >= kParallelFrom;
  std::vector<float> v(offsets[slots] * g.rank);  // row p: the shrunk x of token position p

  // shrink: token ranges of about tokens / (4 threads) (at most kShrinkTokens), in passes of 4
  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::vector<int64_t> range_slot;
  const int64_t target = parallel ? ((tokens + 4 * threads - 1) / (4 * threads) + 3) / 4 * 4 : kShrinkTokens;
  for (int64_t s = 0; s < slots; ++s) {
    split_tokens(offsets[s], offsets[s + 1], target, kShrinkTokens, ranges);
    range_slot.resize(ranges.size(), s);
  }
  const int64_t xw_floats = 4 * ((g.in + paths.lanes - 1) / paths.lanes * paths.lanes);
  run_items(static_cast<int64_t>(ranges.size()), parallel, xw_floats, [&](int64_t i, float* scratch) {
    paths.shrink(g, range_slot[i], ranges[i].first, ranges[i].second, scratch, v.data());
  });

  // expand: token ranges of up to kExpandTokens x output tiles, the tiles narrowed (down to 64) until
  // there are about 4 items per thread
  ranges.clear();
  range_slot.clear();
  for (int64_t s = 0; s < slots; ++s) {
    split_tokens(offsets[s], offsets[s + 1], kExpandTokens, kExpandTokens, ranges);
    range_slot.resize(ranges.size(), s);
  }
  const int64_t range_count = static_cast<int64_t>(ranges.size());
  int64_t tile = kWidestTile;
  while (parallel && tile > 64 && range_count * ((g.out + tile - 1) / tile) < 4 * threads) tile /= 2;
  tile = std::min(tile, g.out);
  std::vector<Item> items;
  for (int64_t i = 0; i < range_count; ++i)
    for (int64_t o = 0; o < g.out; o += tile)
      items.push_back({range_slot[i], ranges[i].first, ranges[i].second, o, std::min(g.out, o + tile)});
  run_items(static_cast<int64_t>(items.size()), parallel, paths.expand_scratch(tile, g.rank),
            [&](int64_t i, float* scratch) {
              const Item& item = items[i];
              paths.expand(g, item.slot, item.p0, item.p1, item.o0, item.o1, v.data(), scratch);
            });
}

template <typename T>
void run_typed(const at::Tensor& x, at::Tensor& y, const at::Tensor& a, const at::Tensor& b, const int64_t* index,
               const std::vector<int64_t>& offsets, int64_t isa) {
  Problem<T> g;
  g.x = x.data_ptr<T>();
  g.ldx = x.stride(0);
  g.y = y.data_ptr<T>();
  g.ldy = y.stride(0);
  g.a = a.data_ptr<T>();
  g.a_slot = a.stride(0);
  g.a_row = a.stride(1);
  g.b = b.data_ptr<T>();
  g.b_slot = b.stride(0);
  g.b_row = b.stride(1);
  g.rows = index;
  g.in = x.size(1);
  g.out = y.size(1);
  g.rank = a.size(1);
  run(g, offsets, isa);
}

// A matrix whose last dimension is contiguous (any other strides), copying only where it is not.
at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void lora_add(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
              const at::Tensor& token_indices, const at::Tensor& slot_offsets, int64_t isa) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), "lora_add: y and x must be [T, out] and [T, in]");
  TORCH_CHECK(lora_a.dim() == 3 && lora_b.dim() == 3, "lora_add: lora_a must be [S, R, in] and lora_b [S, out, R]");
  const int64_t slots = lora_a.size(0), rank = lora_a.size(1), in = x.size(1), out = y.size(1), rows = y.size(0);
  TORCH_CHECK(lora_a.size(2) == in && lora_b.size(0) == slots && lora_b.size(1) == out && lora_b.size(2) == rank,
              "lora_add: lora_a ", lora_a.sizes(), " and lora_b ", lora_b.sizes(), " do not fit x ", x.sizes(),
              " and y ", y.sizes(), " (expected [S, R, in] and [S, out, R])");
  const at::ScalarType dtype = y.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "lora_add: y must be float32, bfloat16 or float16");
  TORCH_CHECK(x.scalar_type() == dtype && lora_a.scalar_type() == dtype && lora_b.scalar_type() == dtype,
              "lora_add: x, lora_a and lora_b must share y's dtype");
  TORCH_CHECK(token_indices.dim() == 1 && token_indices.scalar_type() == at::kLong,
              "lora_add: token_indices must be 1-D int64");
  TORCH_CHECK(slot_offsets.dim() == 1 && slot_offsets.scalar_type() == at::kLong && slot_offsets.size(0) == slots + 1,
              "lora_add: slot_offsets must be 1-D int64 with S + 1 = ", slots + 1, " offsets");
  if (isa < 0) isa = best_isa();
  TORCH_CHECK(isa <= best_isa(), "lora_add: this CPU cannot run path ", isa, " (best: ", best_isa(), ")");

  const at::Tensor indices = token_indices.contiguous(), bounds = slot_offsets.contiguous();
  const int64_t* index = indices.data_ptr<int64_t>();
  const std::vector<int64_t> offsets(bounds.data_ptr<int64_t>(), bounds.data_ptr<int64_t>() + slots + 1);
  TORCH_CHECK(offsets[0] >= 0 && offsets[slots] <= indices.size(0), "lora_add: slot_offsets must lie within [0, ",
              indices.size(0), "]");
  for (int64_t s = 0; s < slots; ++s)
    TORCH_CHECK(offsets[s] <= offsets[s + 1], "lora_add: slot_offsets must be non-decreasing");
  if (offsets[slots] == offsets[0] || rank == 0 || out == 0) return;
  // the rows the slots use: each within y, and in one slot at most (the threads write rows in place)
  std::vector<uint8_t> seen(rows, 0);
  for (int64_t p = offsets[0]; p < offsets[slots]; ++p) {
    TORCH_CHECK(index[p] >= 0 && index[p] < rows, "lora_add: token index ", index[p], " is outside [0, ", rows, ")");
    TORCH_CHECK(!seen[index[p]], "lora_add: token index ", index[p], " appears twice");
    seen[index[p]] = 1;
  }

  const at::Tensor xs = rows_contiguous(x), as = rows_contiguous(lora_a), bs = rows_contiguous(lora_b);
  at::Tensor ys = rows_contiguous(y);  // a copy only for a y with strided columns, copied back below
  if (dtype == at::kFloat) run_typed<float>(xs, ys, as, bs, index, offsets, isa);
  else if (dtype == at::kBFloat16) run_typed<at::BFloat16>(xs, ys, as, bs, index, offsets, isa);
  else run_typed<at::Half>(xs, ys, as, bs, index, offsets, isa);
  if (!ys.is_same(y)) y.copy_(ys);
}

int64_t lora_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sansllm_cpu, m) {
  m.def("lora_add(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor token_indices, "
        "Tensor slot_offsets, int isa=-1) -> ()");
  m.def("lora_isa() -> int", &lora_isa);  // the best path this CPU runs: 0 plain, 1 AVX2, 2 AVX-512
}

TORCH_LIBRARY_IMPL(sansllm_cpu, CPU, m) { m.impl("lora_add", &lora_add); }
