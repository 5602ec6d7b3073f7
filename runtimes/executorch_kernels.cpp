// edgec's kernels for ExecuTorch's LLM programs on x86-64, each registered under a kernel key (the dtype and
// dim order of its tensors), so ExecuTorch picks it over the stock (fallback) kernel, which still takes
// whatever a kernel here does not cover:
// - llama::custom_sdpa.out for float32 with AVX2 and FMA. The stock kernel in the x86 executorch wheel is
//   built for baseline x86-64: its exp runs one lane at a time, and that made it most of a prefill's
//   attention time. A mask, other dtypes or layouts, head sizes without an instantiation or a CPU without
//   AVX2 go to the stock kernel.
// - aten::slice_copy.Tensor_out (4-D, step 1) and llama::update_cache.out: the copies between a layer's
//   projections and its attention, on the pool when large (see copy_rows).
//
// custom_sdpa's semantics are the stock kernel's: q [batch, seq, heads, head_dim]; k and v the cache [batch,
// max_seq, kv_heads, head_dim]; query i sits at position start_pos + i and, causal, sees keys 0 .. start_pos + i;
// not causal, keys 0 .. start_pos + seq - 1. Heads share kv heads in groups (grouped-query attention).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <executorch/runtime/core/event_tracer_hooks.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::OpFunction;
using executorch::runtime::Span;

constexpr const char* kSdpaName = "llama::custom_sdpa.out";
constexpr const char* kSliceName = "aten::slice_copy.Tensor_out";
constexpr const char* kUpdateCacheName = "llama::update_cache.out";
constexpr int64_t kPositionsPerTask = 16;
constexpr int64_t kTransposeFromPositions = 8;  // fewer query positions: the transpose costs more than it saves
constexpr int64_t kMinKeysPerRange = 64;  // decode's key ranges (attend_key_ranges): fewer keys, fewer ranges

// Calls each kernel computed itself (edgec_calls_served's argument; runtimes/executorch_kernels.py KERNELS).
enum Kernel { kAttention, kSliceCopy, kUpdateCache, kKernelCount };
std::atomic<int64_t> calls_served[kKernelCount] = {};

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for x <= 0 (scores less their row's maximum): 2^n by the exponent bits times a degree-6 polynomial
// on the remainder, about 1 ulp on float.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // in this order a NaN passes (maxps returns its second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

struct Shape {
  int64_t batch, seq, heads, kv_heads, max_seq, start, group;
  bool causal;
  float scale;
  const float* q;
  const float* k;
  const float* v;
  float* out;
};

// Up to four query rows, (position, head) pairs of one kv head, attended together: each key and value row
// loaded from the cache serves all of them (one row at a time read a key row and a value row per score).
constexpr int kMaxRows = 4;

struct RowSet {
  int count = 0;  // 1 .. kMaxRows
  const float* q[kMaxRows];
  float* out[kMaxRows];
  int64_t keys[kMaxRows];  // how many keys each row sees
  float* softmax_of[kMaxRows] = {};  // where given: the row's score maximum and its sum of exps go there
};

// The horizontal sums of eight vectors, in their order, as one vector.
__attribute__((target("avx2,fma"))) inline __m256 sum_each(const __m256* a) {
  const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}

// scores[r * stride + j] = scale * (q_r . k_j) for keys 0 .. keys. KEYS keys a step, R * KEYS accumulators:
// enough independent FMA chains to cover the FMA latency (four were bound by it).
template <int CHUNKS, int R>
__attribute__((target("avx2,fma"))) void scores_of(const RowSet& rows, const float* k_base, int64_t kv_stride,
                                                   int64_t keys, float scale, float* scores, int64_t stride) {
  constexpr int KEYS = R == 3 ? 2 : 8 / R;
  int64_t j = 0;
  for (; j + KEYS <= keys; j += KEYS) {
    const float* k0 = k_base + j * kv_stride;
    __m256 a[8];
    #pragma GCC unroll 8
    for (int n = 0; n < 8; ++n) a[n] = _mm256_setzero_ps();
    #pragma GCC unroll 32
    for (int c = 0; c < CHUNKS; ++c) {
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 qc = _mm256_loadu_ps(rows.q[r] + 8 * c);
        #pragma GCC unroll 8
        for (int k = 0; k < KEYS; ++k)
          a[r * KEYS + k] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + k * kv_stride + 8 * c), a[r * KEYS + k]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, _mm256_mul_ps(sum_each(a), _mm256_set1_ps(scale)));
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      #pragma GCC unroll 8
      for (int k = 0; k < KEYS; ++k) scores[r * stride + j + k] = sums[r * KEYS + k];
    }
  }
  for (; j < keys; ++j) {
    const float* kj = k_base + j * kv_stride;
    for (int r = 0; r < R; ++r) {
      __m256 a = _mm256_setzero_ps();
      #pragma GCC unroll 32
      for (int c = 0; c < CHUNKS; ++c)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(rows.q[r] + 8 * c), _mm256_loadu_ps(kj + 8 * c), a);
      scores[r * stride + j] = horizontal_sum(a) * scale;
    }
  }
}

// As scores_of, from the kv head's keys transposed (kt[d * kt_stride + j], zero past the last key, kt_stride
// a multiple of 16): sixteen keys of R rows a step, a broadcast of q_r[d] times two vectors of keys, and no
// sums across lanes.
template <int CHUNKS, int R>
__attribute__((target("avx2,fma"))) void scores_from_transposed(const RowSet& rows, const float* kt,
                                                                int64_t kt_stride, int64_t keys, float scale,
                                                                float* scores, int64_t stride) {
  constexpr int D = CHUNKS * 8;
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < keys; j += 16) {
    __m256 a[R][2];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    const float* column = kt + j;
    #pragma GCC unroll 8
    for (int d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(column + d * kt_stride);
      const __m256 k1 = _mm256_loadu_ps(column + d * kt_stride + 8);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 qd = _mm256_broadcast_ss(rows.q[r] + d);
        a[r][0] = _mm256_fmadd_ps(qd, k0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(qd, k1, a[r][1]);
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(scores + r * stride + j, _mm256_mul_ps(a[r][0], scale8));
      _mm256_storeu_ps(scores + r * stride + j + 8, _mm256_mul_ps(a[r][1], scale8));
    }
  }
}

// row[0 .. keys) becomes exp(row - its max), the max going to *top_out; returns 1 / their sum.
__attribute__((target("avx2,fma"))) float softmax_in_place(float* row, int64_t keys, float* top_out) {
  __m256 top8 = _mm256_set1_ps(row[0]);
  int64_t m = 0;
  for (; m + 8 <= keys; m += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + m));
  __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
  top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
  top4 = _mm_max_ss(top4, _mm_movehdup_ps(top4));
  float top = _mm_cvtss_f32(top4);
  for (; m < keys; ++m) top = std::max(top, row[m]);
  top8 = _mm256_set1_ps(top);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= keys; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), top8));
    _mm256_storeu_ps(row + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = horizontal_sum(sum8);
  for (; j < keys; ++j) {
    row[j] = std::exp(row[j] - top);
    sum += row[j];
  }
  *top_out = top;
  return 1.0f / sum;
}

// out_r[8 c0 .. 8 (c0 + W)) = inverse_r * sum over keys of weights_r[j] * v_j: R rows by W chunks of
// accumulators (at most eight, which AVX2's sixteen registers hold beside the loads).
template <int R, int W>
__attribute__((target("avx2,fma"))) void weighted_sum_pass(const RowSet& rows, int c0, const float* weights,
                                                           int64_t stride, const float* inverse, int64_t keys,
                                                           const float* v_base, int64_t kv_stride) {
  __m256 acc[R * W];
  #pragma GCC unroll 8
  for (int n = 0; n < R * W; ++n) acc[n] = _mm256_setzero_ps();
  for (int64_t j = 0; j < keys; ++j) {
    const float* v_row = v_base + j * kv_stride + 8 * c0;
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 weight = _mm256_set1_ps(weights[r * stride + j]);
      #pragma GCC unroll 8
      for (int w = 0; w < W; ++w)
        acc[r * W + w] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v_row + 8 * w), acc[r * W + w]);
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 scale = _mm256_set1_ps(inverse[r]);
    #pragma GCC unroll 8
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(rows.out[r] + 8 * (c0 + w), _mm256_mul_ps(acc[r * W + w], scale));
  }
}

// kt[d * stride + j] = k[j * kv_stride + d] for keys 0 .. keys, eight keys by eight dimensions at a time.
template <int CHUNKS>
__attribute__((target("avx2,fma"))) void transpose_keys(const float* k, int64_t kv_stride, int64_t keys, float* kt,
                                                        int64_t stride) {
  int64_t j = 0;
  for (; j + 8 <= keys; j += 8) {
    for (int c = 0; c < CHUNKS; ++c) {
      __m256 r[8];
      #pragma GCC unroll 8
      for (int n = 0; n < 8; ++n) r[n] = _mm256_loadu_ps(k + (j + n) * kv_stride + 8 * c);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* out = kt + 8 * c * stride + j;
      _mm256_storeu_ps(out + 0 * stride, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(out + 1 * stride, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(out + 2 * stride, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(out + 3 * stride, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(out + 4 * stride, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(out + 5 * stride, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(out + 6 * stride, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(out + 7 * stride, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  for (; j < keys; ++j)
    for (int d = 0; d < CHUNKS * 8; ++d) kt[d * stride + j] = k[j * kv_stride + d];
}

// The R rows of `rows` against the keys and values of their kv head. `scores` holds R rows of `stride`.
template <int CHUNKS, int R>
__attribute__((target("avx2,fma"))) void attend_rows(const Shape& s, const RowSet& rows, const float* k_base,
                                                     const float* kt, int64_t kt_stride, const float* v_base,
                                                     float* scores, int64_t stride) {
  const int64_t kv_stride = s.kv_heads * CHUNKS * 8;
  int64_t keys = 0;
  for (int r = 0; r < R; ++r) keys = std::max(keys, rows.keys[r]);
  if (kt != nullptr) scores_from_transposed<CHUNKS, R>(rows, kt, kt_stride, keys, s.scale, scores, stride);
  else scores_of<CHUNKS, R>(rows, k_base, kv_stride, keys, s.scale, scores, stride);
  float inverse[R];
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * stride;
    float top;
    inverse[r] = softmax_in_place(row, rows.keys[r], &top);
    if (rows.softmax_of[r] != nullptr) {
      rows.softmax_of[r][0] = top;
      rows.softmax_of[r][1] = 1.0f / inverse[r];
    }
    std::fill(row + rows.keys[r], row + keys, 0.0f);  // keys past a row's own weigh nothing in the sum
  }
  constexpr int W = R == 1 ? 8 : (R == 2 ? 4 : 2);
  for (int c = 0; c + W <= CHUNKS; c += W)
    weighted_sum_pass<R, W>(rows, c, scores, stride, inverse, keys, v_base, kv_stride);
  if (CHUNKS % W) {
    constexpr int rest = CHUNKS % W ? CHUNKS % W : W;
    weighted_sum_pass<R, rest>(rows, CHUNKS - rest, scores, stride, inverse, keys, v_base, kv_stride);
  }
}

// attend_rows for a set of 1 to kMaxRows rows, scoring in this thread's buffer of kMaxRows rows of `stride`.
template <int CHUNKS>
void attend_row_set(const Shape& s, const RowSet& rows, const float* k_base, const float* kt, int64_t kt_stride,
                    const float* v_base, int64_t stride) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(kMaxRows * stride)) buffer.resize(kMaxRows * stride);
  float* scores = buffer.data();
  switch (rows.count) {
    case 1: attend_rows<CHUNKS, 1>(s, rows, k_base, kt, kt_stride, v_base, scores, stride); break;
    case 2: attend_rows<CHUNKS, 2>(s, rows, k_base, kt, kt_stride, v_base, scores, stride); break;
    case 3: attend_rows<CHUNKS, 3>(s, rows, k_base, kt, kt_stride, v_base, scores, stride); break;
    default: attend_rows<CHUNKS, 4>(s, rows, k_base, kt, kt_stride, v_base, scores, stride); break;
  }
}

// Runs task(t) for t in 0 .. tasks on the pool, each thread taking the next task not yet taken: a pool
// thread can start tens of microseconds after the call (woken from sleep), and a fixed share of the tasks
// would finish that much later. Even a decode step's few microseconds go through the pool: the stock kernel
// does, and a pool thread left idle here falls asleep before the next XNNPACK call needs it (20% slower
// decode inline).
template <typename Task>
void for_each_task(int64_t tasks, const Task& task) {
  const int64_t threads = tasks < 2 ? 1 : std::min<int64_t>(executorch::extension::get_thread_count(), tasks);
  if (threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  std::atomic<int64_t> next{0};
  executorch::extension::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed))
      task(t);
  });
}

// Decode: a single position gives one task per kv head, too few to share out evenly (three kv heads on two
// threads: one thread does two). Each kv head's keys go in `splits` ranges, one task each, every range's
// rows attended on their own (normalized output, score maximum, sum of exps), and the ranges merged after:
// out = sum over ranges of sum_r exp(max_r - max) out_r / sum over ranges of sum_r exp(max_r - max).
template <int CHUNKS>
void attend_key_ranges(const Shape& s, int64_t splits) {
  constexpr int64_t D = CHUNKS * 8;
  constexpr int64_t kPartial = D + 2;  // a range's output for a row, then its score maximum and sum of exps
  const int64_t kv_count = s.batch * s.kv_heads;
  const int64_t total_keys = s.start + 1;
  const int64_t kv_stride = s.kv_heads * D;
  thread_local std::vector<float> partial_buffer;
  const size_t needed = static_cast<size_t>(kv_count * splits * s.group * kPartial);
  if (partial_buffer.size() < needed) partial_buffer.resize(needed);
  float* partials = partial_buffer.data();  // [kv head][range][row of the group][kPartial]
  const int64_t stride = (total_keys + 15) / 16 * 16;
  for_each_task(kv_count * splits, [&](int64_t task) {
    const int64_t bg = task / splits, range = task % splits;
    const int64_t b = bg / s.kv_heads, kv_head = bg % s.kv_heads;
    const int64_t first_key = total_keys * range / splits, end_key = total_keys * (range + 1) / splits;
    const float* k_base = s.k + ((b * s.max_seq + first_key) * s.kv_heads + kv_head) * D;
    const float* v_base = s.v + ((b * s.max_seq + first_key) * s.kv_heads + kv_head) * D;
    for (int64_t n = 0; n < s.group; n += kMaxRows) {
      RowSet rows;
      rows.count = static_cast<int>(std::min<int64_t>(kMaxRows, s.group - n));
      for (int r = 0; r < rows.count; ++r) {
        const int64_t head = kv_head * s.group + n + r;
        float* partial = partials + ((bg * splits + range) * s.group + n + r) * kPartial;
        rows.q[r] = s.q + (b * s.heads + head) * D;
        rows.out[r] = partial;
        rows.keys[r] = end_key - first_key;
        rows.softmax_of[r] = partial + D;
      }
      attend_row_set<CHUNKS>(s, rows, k_base, nullptr, 0, v_base, stride);
    }
  });
  for (int64_t bg = 0; bg < kv_count; ++bg) {
    const int64_t b = bg / s.kv_heads, kv_head = bg % s.kv_heads;
    for (int64_t g = 0; g < s.group; ++g) {
      const float* first = partials + (bg * splits * s.group + g) * kPartial;
      float top = first[D];
      for (int64_t range = 1; range < splits; ++range) top = std::max(top, first[range * s.group * kPartial + D]);
      float* out = s.out + (b * s.heads + kv_head * s.group + g) * D;
      std::fill(out, out + D, 0.0f);
      float total = 0.0f;
      for (int64_t range = 0; range < splits; ++range) {
        const float* partial = first + range * s.group * kPartial;
        const float weight = partial[D + 1] * std::exp(partial[D] - top);
        total += weight;
        for (int64_t d = 0; d < D; ++d) out[d] += weight * partial[d];
      }
      for (int64_t d = 0; d < D; ++d) out[d] /= total;
    }
  }
}

// A task is a block of positions of one kv head: its rows, position by position and within a position the
// kv head's query heads, go four at a time through attend_rows. Causal blocks cost more the later they
// sit, so the last go first. A prefill first transposes each kv head's keys, once for all its rows.
template <int CHUNKS>
void attend(const Shape& s) {
  constexpr int64_t D = CHUNKS * 8;
  if (s.seq == 1) {
    // As many ranges as make two tasks a thread, each of at least kMinKeysPerRange keys.
    const int64_t threads = executorch::extension::get_thread_count();
    const int64_t wanted = (2 * threads + s.batch * s.kv_heads - 1) / (s.batch * s.kv_heads);
    const int64_t splits = std::min(wanted, (s.start + 1) / kMinKeysPerRange);
    if (splits > 1) {
      attend_key_ranges<CHUNKS>(s, splits);
      return;
    }
  }
  const int64_t blocks = (s.seq + kPositionsPerTask - 1) / kPositionsPerTask;
  const int64_t total_keys = s.start + s.seq;
  const int64_t stride = (total_keys + 15) / 16 * 16;
  const int64_t kv_stride = s.kv_heads * D;
  // The calling thread's buffer: the tasks read it through `kt` while this call runs.
  thread_local std::vector<float> transposed_buffer;
  float* transposed = nullptr;
  const int64_t kv_count = s.batch * s.kv_heads;
  int64_t transposes = 0;
  std::unique_ptr<std::atomic<int>[]> transposed_ready;
  if (s.seq >= kTransposeFromPositions) {
    const size_t needed = static_cast<size_t>(kv_count * D * stride);
    if (transposed_buffer.size() < needed) transposed_buffer.resize(needed);
    transposed = transposed_buffer.data();
    transposes = kv_count;
    transposed_ready.reset(new std::atomic<int>[kv_count]);
    for (int64_t bg = 0; bg < kv_count; ++bg) transposed_ready[bg].store(0, std::memory_order_relaxed);
  }
  // The transposes are the first tasks, so the pool's threads (woken by the call) share them; tasks are taken
  // in order, so an attention task that finds its kv head's keys not yet transposed waits only on a running one.
  for_each_task(transposes + kv_count * blocks, [&](int64_t task) {
    if (task < transposes) {
      const float* k_base = s.k + ((task / s.kv_heads) * s.max_seq * s.kv_heads + task % s.kv_heads) * D;
      float* kt = transposed + task * D * stride;
      transpose_keys<CHUNKS>(k_base, kv_stride, total_keys, kt, stride);
      for (int64_t d = 0; d < D; ++d) std::fill(kt + d * stride + total_keys, kt + (d + 1) * stride, 0.0f);
      transposed_ready[task].store(1, std::memory_order_release);
      return;
    }
    const int64_t t = task - transposes;
    const int64_t block = blocks - 1 - t / (s.batch * s.kv_heads);
    const int64_t b = (t / s.kv_heads) % s.batch;
    const int64_t kv_head = t % s.kv_heads;
    const float* k_base = s.k + (b * s.max_seq * s.kv_heads + kv_head) * D;
    const float* v_base = s.v + (b * s.max_seq * s.kv_heads + kv_head) * D;
    const float* kt = nullptr;
    if (transposed != nullptr) {
      while (transposed_ready[b * s.kv_heads + kv_head].load(std::memory_order_acquire) == 0) _mm_pause();
      kt = transposed + (b * s.kv_heads + kv_head) * D * stride;
    }
    const int64_t first_position = block * kPositionsPerTask;
    const int64_t count = (std::min(s.seq, first_position + kPositionsPerTask) - first_position) * s.group;
    for (int64_t n = 0; n < count; n += kMaxRows) {
      RowSet rows;
      rows.count = static_cast<int>(std::min<int64_t>(kMaxRows, count - n));
      for (int r = 0; r < rows.count; ++r) {
        const int64_t i = first_position + (n + r) / s.group;
        const int64_t head = kv_head * s.group + (n + r) % s.group;
        const int64_t offset = ((b * s.seq + i) * s.heads + head) * D;
        rows.q[r] = s.q + offset;
        rows.out[r] = s.out + offset;
        rows.keys[r] = s.causal ? s.start + i + 1 : total_keys;
      }
      attend_row_set<CHUNKS>(s, rows, k_base, kt, stride, v_base, stride);
    }
  });
}

bool is_contiguous(const Tensor& t) {
  return executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim());
}

// The kernel ExecuTorch registered for `name` without a key: what takes the calls a kernel here does not.
OpFunction stock_kernel(const char* name) {
  auto found = executorch::runtime::get_op_function_from_registry(name);
  return found.ok() ? found.get() : nullptr;
}

void call_stock(OpFunction stock, const char* name, KernelRuntimeContext& ctx, Span<EValue*> stack) {
  ET_KERNEL_CHECK_MSG(ctx, stock != nullptr, NotFound, , "the stock %s kernel is not registered", name);
  stock(ctx, stack);
}

void custom_sdpa_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  // runtimes/executorch_kernels.py loads this library only where the CPU has both; checked once here too.
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool served = false;
  if (has_avx2 && stack.size() >= 9 && stack[4]->isNone() && stack[0]->isTensor()) {
    const Tensor& q = stack[0]->toTensor();
    const Tensor& k = stack[1]->toTensor();
    const Tensor& v = stack[2]->toTensor();
    Tensor& out = stack[8]->toTensor();
    const int64_t start = stack[3]->toInt();
    const double dropout = stack[5]->toDouble();
    const bool ok = q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == ScalarType::Float &&
                    k.scalar_type() == ScalarType::Float && v.scalar_type() == ScalarType::Float &&
                    out.scalar_type() == ScalarType::Float && is_contiguous(q) && is_contiguous(k) &&
                    is_contiguous(v) && dropout == 0.0 && k.size(0) == q.size(0) && v.size(0) == q.size(0) &&
                    k.size(3) == q.size(3) && v.size(3) == q.size(3) && k.size(2) == v.size(2) &&
                    k.size(1) == v.size(1) && k.size(2) > 0 && q.size(2) % k.size(2) == 0 && start >= 0 &&
                    start + q.size(1) <= k.size(1);
    const int64_t head_dim = ok ? q.size(3) : 0;
    if (ok && (head_dim == 64 || head_dim == 96 || head_dim == 128 || head_dim == 256) &&
        executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok &&
        is_contiguous(out)) {
      Shape s;
      s.batch = q.size(0);
      s.seq = q.size(1);
      s.heads = q.size(2);
      s.kv_heads = k.size(2);
      s.max_seq = k.size(1);
      s.start = start;
      s.group = s.heads / s.kv_heads;
      s.causal = stack[6]->toBool();
      s.scale = stack[7]->isNone() ? 1.0f / std::sqrt(static_cast<float>(head_dim))
                                   : static_cast<float>(stack[7]->toDouble());
      s.q = q.const_data_ptr<float>();
      s.k = k.const_data_ptr<float>();
      s.v = v.const_data_ptr<float>();
      s.out = out.mutable_data_ptr<float>();
      // Named in an ETDump as the stock kernel is (its boxed wrapper opens the same scope).
      executorch::runtime::internal::EventTracerProfileOpScope profile(ctx.internal_event_tracer(), kSdpaName);
      if (head_dim == 64) attend<8>(s);
      else if (head_dim == 96) attend<12>(s);
      else if (head_dim == 128) attend<16>(s);
      else attend<32>(s);
      served = true;
    }
  }
  if (served) {
    calls_served[kAttention].fetch_add(1, std::memory_order_relaxed);
    return;
  }
  static const OpFunction stock = stock_kernel(kSdpaName);
  call_stock(stock, kSdpaName, ctx, stack);
}

// Copies rows of row_bytes each, source rows src_stride bytes apart, destination rows dst_stride apart; on the
// pool when large. Keeping the pool's worker busy through these copies also keeps it awake for the attention
// that follows them (the worker sleeps after a short idle spin, and waking it cost ~27 us here).
void copy_rows(char* dst, const char* src, int64_t rows, int64_t row_bytes, int64_t src_stride,
               int64_t dst_stride) {
  constexpr int64_t kParallelBytes = 32 * 1024;
  const int64_t parts = rows * row_bytes < kParallelBytes ? 1 : executorch::extension::get_thread_count();
  if (rows >= parts) {
    for_each_task(parts, [&](int64_t t) {
      for (int64_t r = rows * t / parts; r < rows * (t + 1) / parts; ++r)
        std::memcpy(dst + r * dst_stride, src + r * src_stride, row_bytes);
    });
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for_each_task(parts, [&](int64_t t) {
        const int64_t begin = row_bytes * t / parts, end = row_bytes * (t + 1) / parts;
        std::memcpy(dst + r * dst_stride + begin, src + r * src_stride + begin, end - begin);
      });
  }
}

void slice_copy_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (stack.size() >= 6 && stack[0]->isTensor() && stack[4]->toInt() == 1) {
    const Tensor& in = stack[0]->toTensor();
    Tensor& out = stack[5]->toTensor();
    int64_t dim = stack[1]->toInt();
    const int64_t rank = in.dim();
    if (dim < 0) dim += rank;
    if (dim >= 0 && dim < rank && rank <= 16 && in.scalar_type() == out.scalar_type()) {
      const int64_t size = in.size(dim);
      int64_t start = stack[2]->isNone() ? 0 : stack[2]->toInt();
      int64_t end = stack[3]->isNone() ? size : stack[3]->toInt();
      if (start < 0) start += size;
      if (end < 0) end += size;
      start = std::min(std::max<int64_t>(start, 0), size);
      end = std::min(std::max(end, start), size);
      executorch::aten::SizesType sizes[16];
      for (int64_t d = 0; d < rank; ++d) sizes[d] = static_cast<executorch::aten::SizesType>(in.size(d));
      sizes[dim] = static_cast<executorch::aten::SizesType>(end - start);
      if (executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(rank)}) ==
          executorch::runtime::Error::Ok) {
        int64_t outer = 1, inner = in.element_size();
        for (int64_t d = 0; d < dim; ++d) outer *= in.size(d);
        for (int64_t d = dim + 1; d < rank; ++d) inner *= in.size(d);
        executorch::runtime::internal::EventTracerProfileOpScope profile(ctx.internal_event_tracer(), kSliceName);
        copy_rows(static_cast<char*>(out.mutable_data_ptr()),
                  static_cast<const char*>(in.const_data_ptr()) + start * inner, outer, (end - start) * inner,
                  size * inner, (end - start) * inner);
        calls_served[kSliceCopy].fetch_add(1, std::memory_order_relaxed);
        return;
      }
    }
  }
  static const OpFunction stock = stock_kernel(kSliceName);
  call_stock(stock, kSliceName, ctx, stack);
}

void update_cache_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (stack.size() >= 4 && stack[0]->isTensor() && stack[1]->isTensor()) {
    const Tensor& value = stack[0]->toTensor();
    Tensor& cache = stack[1]->toTensor();
    const int64_t start = stack[2]->toInt();
    if (value.dim() == 4 && cache.dim() == 4 && value.scalar_type() == cache.scalar_type() &&
        value.size(0) == cache.size(0) && value.size(2) == cache.size(2) && value.size(3) == cache.size(3) &&
        start >= 0 && start < cache.size(1) && start + value.size(1) <= cache.size(1)) {
      const int64_t row = value.size(2) * value.size(3) * value.element_size();
      executorch::runtime::internal::EventTracerProfileOpScope profile(ctx.internal_event_tracer(),
                                                                       kUpdateCacheName);
      copy_rows(static_cast<char*>(cache.mutable_data_ptr()) + start * row,
                static_cast<const char*>(value.const_data_ptr()), value.size(0), value.size(1) * row,
                value.size(1) * row, cache.size(1) * row);
      calls_served[kUpdateCache].fetch_add(1, std::memory_order_relaxed);
      return;
    }
  }
  static const OpFunction stock = stock_kernel(kUpdateCacheName);
  call_stock(stock, kUpdateCacheName, ctx, stack);
}

// What ExecuTorch matches a call against: the dtype (6: float) and dim order of each tensor among the call's
// arguments, the returned out included. custom_sdpa: query, key, value, out, returned, all 4-D contiguous;
// slice_copy: self, out, returned; update_cache: value, cache and its 1-element out, returned.
const auto sdpa_registration = executorch::runtime::register_kernel(executorch::runtime::Kernel(
    kSdpaName, executorch::runtime::KernelKey("v1/6;0,1,2,3|6;0,1,2,3|6;0,1,2,3|6;0,1,2,3|6;0,1,2,3"),
    custom_sdpa_out));
const auto slice_registration = executorch::runtime::register_kernel(executorch::runtime::Kernel(
    kSliceName, executorch::runtime::KernelKey("v1/6;0,1,2,3|6;0,1,2,3|6;0,1,2,3"), slice_copy_out));
const auto update_cache_registration = executorch::runtime::register_kernel(executorch::runtime::Kernel(
    kUpdateCacheName, executorch::runtime::KernelKey("v1/6;0,1,2,3|6;0,1,2,3|6;0|6;0"), update_cache_out));

}  // namespace

extern "C" int64_t edgec_calls_served(int kernel) {
  return kernel >= 0 && kernel < kKernelCount ? calls_served[kernel].load(std::memory_order_relaxed) : -1;
}

