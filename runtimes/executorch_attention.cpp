// llama::custom_sdpa.out for float32 on x86-64 with AVX2 and FMA, registered as a kernel specialized for
// float tensors in contiguous order, so ExecuTorch picks it over the stock (fallback) kernel. The stock
// kernel in the x86 executorch wheel is built for baseline x86-64: its exp runs one lane at a time, and
// that made it most of a prefill's attention time. Anything this kernel does not cover (a mask, other
// dtypes or layouts, head sizes without an instantiation, a CPU without AVX2) goes to the stock kernel.
//
// Semantics as the stock kernel: q [batch, seq, heads, head_dim]; k and v the cache [batch, max_seq,
// kv_heads, head_dim]; query i sits at position start_pos + i and, causal, sees keys 0 .. start_pos + i;
// not causal, keys 0 .. start_pos + seq - 1. Heads share kv heads in groups (grouped-query attention).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
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

constexpr const char* kOpName = "llama::custom_sdpa.out";
constexpr int64_t kRowsPerTask = 16;

std::atomic<int64_t> calls_served{0};

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for x <= 0 (scores less their row's maximum): 2^n by the exponent bits times a degree-6 polynomial
// on the remainder, about 1 ulp on float.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
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

// out[0 .. 8 CHUNKS) = inverse * sum over keys of weights[j] * v[j * stride ...].
template <int CHUNKS>
__attribute__((target("avx2,fma"))) void weighted_sum(const float* weights, int64_t keys, const float* v,
                                                      int64_t stride, float inverse, float* out) {
  __m256 acc[CHUNKS];
  #pragma GCC unroll 32
  for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < keys; ++j) {
    const __m256 weight = _mm256_set1_ps(weights[j]);
    const float* v_row = v + j * stride;
    #pragma GCC unroll 32
    for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(v_row + 8 * c), acc[c]);
  }
  const __m256 scale = _mm256_set1_ps(inverse);
  #pragma GCC unroll 32
  for (int c = 0; c < CHUNKS; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], scale));
}

// One query row of one head: scores against the cached keys of its kv head, softmax, then the weighted sum
// of values. CHUNKS = head_dim / 8.
template <int CHUNKS>
__attribute__((target("avx2,fma"))) void attend_row(const Shape& s, int64_t b, int64_t i, int64_t head,
                                                    float* row) {
  constexpr int64_t D = CHUNKS * 8;
  const int64_t keys = s.causal ? s.start + i + 1 : s.start + s.seq;
  const int64_t kv_stride = s.kv_heads * D;
  const int64_t kv_head = head / s.group;
  const float* k_base = s.k + (b * s.max_seq * s.kv_heads + kv_head) * D;
  const float* v_base = s.v + (b * s.max_seq * s.kv_heads + kv_head) * D;
  const float* q = s.q + ((b * s.seq + i) * s.heads + head) * D;
  float* out = s.out + ((b * s.seq + i) * s.heads + head) * D;

  int64_t j = 0;
  // Four keys at a time: four dot products side by side, summed across lanes together.
  for (; j + 4 <= keys; j += 4) {
    const float* k0 = k_base + j * kv_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    #pragma GCC unroll 32
    for (int c = 0; c < CHUNKS; ++c) {
      const __m256 qc = _mm256_loadu_ps(q + 8 * c);
      a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + 8 * c), a0);
      a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + kv_stride + 8 * c), a1);
      a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + 2 * kv_stride + 8 * c), a2);
      a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k0 + 3 * kv_stride + 8 * c), a3);
    }
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
    _mm_storeu_ps(row + j, _mm_mul_ps(sums, _mm_set1_ps(s.scale)));
  }
  for (; j < keys; ++j) {
    const float* kj = k_base + j * kv_stride;
    __m256 a = _mm256_setzero_ps();
    #pragma GCC unroll 32
    for (int c = 0; c < CHUNKS; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(kj + 8 * c), a);
    row[j] = horizontal_sum(a) * s.scale;
  }

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
  for (j = 0; j + 8 <= keys; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + j), top8));
    _mm256_storeu_ps(row + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = horizontal_sum(sum8);
  for (; j < keys; ++j) {
    row[j] = std::exp(row[j] - top);
    sum += row[j];
  }

  // At most eight accumulators at a time: more would not fit AVX2's sixteen registers.
  const float inverse = 1.0f / sum;
  for (int c = 0; c + 8 <= CHUNKS; c += 8) weighted_sum<8>(row, keys, v_base + 8 * c, kv_stride, inverse, out + 8 * c);
  if (CHUNKS % 8) {
    constexpr int rest = CHUNKS % 8 ? CHUNKS % 8 : 8;
    weighted_sum<rest>(row, keys, v_base + 8 * (CHUNKS - rest), kv_stride, inverse, out + 8 * (CHUNKS - rest));
  }
}

template <int CHUNKS>
void attend(const Shape& s) {
  const int64_t row_blocks = (s.seq + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t tasks = s.batch * s.heads * row_blocks;
  auto run = [&](int64_t first, int64_t step) {
    thread_local std::vector<float> buffer;
    const size_t needed = static_cast<size_t>(s.start + s.seq);
    if (buffer.size() < needed) buffer.resize(std::max<size_t>(needed, 4096));
    for (int64_t t = first; t < tasks; t += step) {
      const int64_t block = t / (s.batch * s.heads);
      const int64_t b = (t / s.heads) % s.batch;
      const int64_t head = t % s.heads;
      const int64_t last = std::min(s.seq, (block + 1) * kRowsPerTask);
      for (int64_t i = block * kRowsPerTask; i < last; ++i) attend_row<CHUNKS>(s, b, i, head, buffer.data());
    }
  };
  const int64_t threads = tasks < 2 ? 1 : std::min<int64_t>(executorch::extension::get_thread_count(), tasks);
  if (threads <= 1) {
    run(0, 1);
    return;
  }
  // Even a decode step's few microseconds go through the pool: the stock kernel does, and a pool thread left
  // idle here falls asleep before the next XNNPACK call needs it (20% slower decode when run inline).
  // parallel_for hands each thread one contiguous range, and causal rows grow in cost, so each thread takes
  // every threads-th task instead, which spreads early and late rows evenly.
  executorch::extension::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; ++first) run(first, threads);
  });
}

bool is_contiguous(const Tensor& t) {
  return executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim());
}

OpFunction stock_kernel() {
  static OpFunction stock = [] {
    auto found = executorch::runtime::get_op_function_from_registry(kOpName);
    return found.ok() ? found.get() : nullptr;
  }();
  return stock;
}

void custom_sdpa_out(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  // runtimes/executorch_attention.py loads this library only where the CPU has both; checked once here too.
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
      executorch::runtime::internal::EventTracerProfileOpScope profile(ctx.internal_event_tracer(), kOpName);
      if (head_dim == 64) attend<8>(s);
      else if (head_dim == 96) attend<12>(s);
      else if (head_dim == 128) attend<16>(s);
      else attend<32>(s);
      served = true;
    }
  }
  if (served) {
    calls_served.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  OpFunction stock = stock_kernel();
  ET_KERNEL_CHECK_MSG(ctx, stock != nullptr, NotFound, , "the stock %s kernel is not registered", kOpName);
  stock(ctx, stack);
}

// What ExecuTorch matches a call against: the dtype and dim order of each tensor among the call's
// arguments, here query, key, value, out and the returned out again, all float in contiguous order.
constexpr const char* kFloatContiguousKey = "v1/6;0,1,2,3|6;0,1,2,3|6;0,1,2,3|6;0,1,2,3|6;0,1,2,3";

const auto registration = executorch::runtime::register_kernel(
    executorch::runtime::Kernel(kOpName, executorch::runtime::KernelKey(kFloatContiguousKey), custom_sdpa_out));

}  // namespace

extern "C" int64_t edgec_attention_calls_served() {
  return calls_served.load(std::memory_order_relaxed);
}

