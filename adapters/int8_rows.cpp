// x @ (q * scale)ᵀ (+ bias) for an int8 weight, streaming its rows: the one-row decode GEMV.
//
// Built on the serving machine by native.py (g++ -O3 -march=native), so each CPU gets its widest
// vectors: AVX-512, else AVX2 with FMA, else whatever the compiler makes of the scalar loop.
// Weight-only, with aten's _weight_int8pack_mm's contract (adapters/backends/cpu.py): activations
// rounded to bfloat16, float32 multiply-adds, the product rounded to bfloat16, the bias added after.
// So the kernel plan can pick either per weight shape, and the compiled step use this one, without
// changing what a request gets beyond the order of float32 sums.
//
// Why not a library kernel: at one row, the int8 weight's bytes must stream from memory at the
// machine's bandwidth, and each byte must become a float on the way. aten's int8 kernel, oneDNN's
// quantized linear and inductor's reduction over int8 all read the default model's 135 MB at
// 8-10 GB/s where summing the same bytes reaches 14-18 (Intel Xeon, 2 cores; docs/benchmarks.md).
// This loop keeps four independent accumulators and prefetches PREFETCH_BYTES ahead of the rows
// it reads, and reaches 77-91% of the summing rate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

// How far ahead of the loop the weight's bytes are asked for: ~a DRAM latency's worth of reads
// (256 and 1,024 bytes ran slower than no prefetch or as fast; 4,096 fastest, in the same run).
constexpr int64_t PREFETCH_BYTES = 4096;
constexpr int64_t MIN_BYTES_PER_TASK = 32 * 1024;  // smaller weights are not worth a second thread

inline void prefetch(const int8_t* p) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

// sum_k x[k] * w[k] in float32.
inline float dot_int8(const float* x, const int8_t* w, int64_t K) {
  int64_t k = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  auto widen = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  for (; k + 64 <= K; k += 64) {
    prefetch(w + k + PREFETCH_BYTES);
    a0 = _mm512_fmadd_ps(widen(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(widen(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    a2 = _mm512_fmadd_ps(widen(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
    a3 = _mm512_fmadd_ps(widen(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  auto widen = [](const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  };
  for (; k + 32 <= K; k += 32) {
    prefetch(w + k + PREFETCH_BYTES);
    a0 = _mm256_fmadd_ps(widen(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(widen(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(widen(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(widen(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  sum = _mm_cvtss_f32(h);
#endif
  for (; k < K; ++k) sum += x[k] * static_cast<float>(w[k]);
  return sum;
}

// The activations rounded to bfloat16, as float32 (into `buffer`): the int8 kernels' contract.
template <typename T>
const float* bf16_rounded(const at::Tensor& x, std::vector<float>& buffer) {
  const T* v = x.data_ptr<T>();
  buffer.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) buffer[i] = static_cast<float>(c10::BFloat16(static_cast<float>(v[i])));
  return buffer.data();
}

const float* float_rows(const at::Tensor& x, std::vector<float>& buffer) {
  switch (x.scalar_type()) {
    case at::kFloat: return bf16_rounded<float>(x, buffer);
    case at::kBFloat16: return bf16_rounded<c10::BFloat16>(x, buffer);
    case at::kHalf: return bf16_rounded<c10::Half>(x, buffer);
    default: TORCH_CHECK(false, "int8_rows: activations in float32, bfloat16 or float16, not ", x.scalar_type());
  }
}

// The bias as float32 (converted into `buffer` unless it is float32).
const float* float_bias(const at::Tensor& bias, std::vector<float>& buffer) {
  if (bias.scalar_type() == at::kFloat) return bias.data_ptr<float>();
  const at::Tensor b = bias.to(at::kFloat);
  buffer.assign(b.data_ptr<float>(), b.data_ptr<float>() + b.numel());
  return buffer.data();
}

template <typename T>
void store(void* out, int64_t i, float y) { static_cast<T*>(out)[i] = static_cast<T>(y); }

// x [.., K] (float32, bfloat16 or float16), q [N, K] int8, scales [N] float32, bias [N] or none
// -> [.., N] in x's dtype. Conversions happen here, not as ops around the call: at one row each op costs a
// few microseconds, and a decode token makes ~200 of these calls.
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q: a contiguous int8 [N, K]");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu(), "int8_rows runs on CPU tensors");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.size(-1) == K, "x's last dimension ", x.size(-1), " is not the weight's ", K);
  TORCH_CHECK(scales.numel() == N && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales: float32, one per output row");
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  std::vector<float> x_buffer, b_buffer;
  const float* X = float_rows(rows, x_buffer);
  const float* B = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias: one per output row");
    B = float_bias(bias->contiguous(), b_buffer);
  }
  const int8_t* W = q.data_ptr<int8_t>();
  const float* S = scales.data_ptr<float>();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  // Written in the activations' dtype, so no conversion op follows the call.
  void* O = out.data_ptr();
  void (*write)(void*, int64_t, float) = out.scalar_type() == at::kFloat  ? store<float>
                                               : out.scalar_type() == at::kHalf ? store<c10::Half>
                                                                                : store<c10::BFloat16>;
  const int64_t grain = std::max<int64_t>(1, MIN_BYTES_PER_TASK / std::max<int64_t>(K * M, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {  // the weight's row stays in L1 across the rows of x
        const float y = static_cast<float>(c10::BFloat16(S[n] * dot_int8(X + m * K, W + n * K, K)));
        write(O, m * N + n, B ? y + B[n] : y);
      }
    }
  });
  return out;
}

// The vector width this build's loop uses: 512 (AVX-512), 256 (AVX2 with FMA) or 0 (scalar).
int64_t vector_bits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__) && defined(__FMA__)
  return 256;
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(loraserve_native, m) {
  m.def("int8_rows(Tensor x, Tensor q, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("vector_bits() -> int", &vector_bits);
}

TORCH_LIBRARY_IMPL(loraserve_native, CPU, m) { m.impl("int8_rows", &int8_rows); }
