// The one-row decode GEMVs of our own: y = x @ Wᵀ (+ bias), streaming W's rows from memory.
//
// Built on the serving machine by native.py (g++ -O3 -march=native), so each CPU gets its widest
// vectors: AVX-512, else AVX2 with FMA, else whatever the compiler makes of the scalar loop. One
// loop serves every weight type (`dot`): it widens W's elements to float32 on the way, keeps four
// independent accumulators and prefetches PREFETCH_BYTES ahead of the rows it reads.
//
// int8_rows: an int8 W (per-row scales), with aten's _weight_int8pack_mm's contract
// (adapters/backends/cpu.py): activations rounded to bfloat16, float32 multiply-adds, the product
// rounded to bfloat16, the bias added after. So the kernel plan can pick either per weight shape,
// and the compiled step use this one, without changing what a request gets beyond the order of
// float32 sums. Why not a library kernel: at one row each int8 byte must become a float on the way,
// and aten's int8 kernel, oneDNN's quantized linear and inductor's reduction over int8 all read the
// default model's 135 MB at 8-10 GB/s where summing the same bytes reaches 14-18 (Intel Xeon, 2
// cores; docs/benchmarks.md); this loop reaches 77-91% of the summing rate.
//
// dense_rows: a float32 or bfloat16 W, with the compiled step's reduction's contract (float32
// products and sums, the bias added in float32, one rounding to the activations' dtype). In the
// compiled step, inductor's reduction over the default model's bf16 head (56.6 MB) took 4.2-4.5 ms
// a token, this loop 2.1-2.3 (Intel Xeon, 2 cores; docs/benchmarks.md).
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

inline void prefetch(const void* p) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p);
#endif
}

// A vector of float32 lanes, and W's elements widened into one (`widen`): per instruction set.
#if defined(__AVX512F__)
constexpr int64_t LANES = 16;
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float sum_lanes(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec widen(const c10::BFloat16* p) {  // bfloat16 is float32's upper half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline Vec widen(const float* p) { return load(p); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t LANES = 8;
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float sum_lanes(Vec v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline Vec widen(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec widen(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline Vec widen(const float* p) { return load(p); }
#else
constexpr int64_t LANES = 0;  // the scalar loop only
#endif

// sum_k x[k] * w[k] in float32, w's elements widened to float32.
template <typename W>
inline float dot(const float* x, const W* w, int64_t K) {
  int64_t k = 0;
  float sum = 0.f;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  constexpr int64_t STEP = 4 * LANES;  // elements a loop iteration: four independent accumulators
  Vec a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
  for (; k + STEP <= K; k += STEP) {
    const char* ahead = reinterpret_cast<const char*>(w + k) + PREFETCH_BYTES;
    for (int64_t line = 0; line < STEP * static_cast<int64_t>(sizeof(W)); line += 64) prefetch(ahead + line);
    a0 = fma(widen(w + k), load(x + k), a0);
    a1 = fma(widen(w + k + LANES), load(x + k + LANES), a1);
    a2 = fma(widen(w + k + 2 * LANES), load(x + k + 2 * LANES), a2);
    a3 = fma(widen(w + k + 3 * LANES), load(x + k + 3 * LANES), a3);
  }
  sum = sum_lanes(add(add(a0, a1), add(a2, a3)));
#endif
  for (; k < K; ++k) sum += x[k] * static_cast<float>(w[k]);
  return sum;
}

// The activations as float32 (into `buffer`), rounded to bfloat16 first where `to_bf16` (the int8
// contract).
template <typename T>
const float* as_float(const at::Tensor& x, std::vector<float>& buffer, bool to_bf16) {
  const T* v = x.data_ptr<T>();
  buffer.resize(x.numel());
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float f = static_cast<float>(v[i]);
    buffer[i] = to_bf16 ? static_cast<float>(c10::BFloat16(f)) : f;
  }
  return buffer.data();
}

const float* float_rows(const at::Tensor& x, std::vector<float>& buffer, bool to_bf16) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return to_bf16 ? as_float<float>(x, buffer, true) : x.data_ptr<float>();
    case at::kBFloat16: return as_float<c10::BFloat16>(x, buffer, false);  // already bf16
    case at::kHalf: return as_float<c10::Half>(x, buffer, to_bf16);
    default: TORCH_CHECK(false, "row kernels: activations in float32, bfloat16 or float16, not ", x.scalar_type());
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

// ys[i][.., n] = row(x's row, i, n) + biases[i][n] for x [.., K] and weights i of Ns[i] outputs,
// written in x's dtype: the loop every kernel here shares, in parallel over all the weights' rows
// (`row_bytes` each). Conversions happen here, not as ops around the call: at one row each op costs
// a few microseconds, and a decode token makes ~100-200 of these calls.
template <typename Row>
std::vector<at::Tensor> rows_times_weights(const at::Tensor& x, const std::vector<int64_t>& Ns, int64_t K,
                                           int64_t row_bytes, const std::vector<std::optional<at::Tensor>>& biases,
                                           bool to_bf16, const Row& row) {
  TORCH_CHECK(x.device().is_cpu(), "the row kernels run on CPU tensors");
  TORCH_CHECK(x.size(-1) == K, "x's last dimension ", x.size(-1), " is not the weight's ", K);
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0), count = static_cast<int64_t>(Ns.size());
  std::vector<float> x_buffer;
  const float* X = float_rows(rows, x_buffer, to_bf16);
  std::vector<std::vector<float>> b_buffers(count);
  std::vector<const float*> B(count, nullptr);
  std::vector<at::Tensor> outs;
  std::vector<void*> O;
  std::vector<int64_t> starts{0};  // weight i's rows are [starts[i], starts[i + 1]) of the loop's
  for (int64_t i = 0; i < count; ++i) {
    if (biases[i].has_value()) {
      TORCH_CHECK(biases[i]->numel() == Ns[i], "bias: one per output row");
      B[i] = float_bias(biases[i]->contiguous(), b_buffers[i]);
    }
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = Ns[i];
    outs.push_back(at::empty(shape, x.options()));  // in the activations' dtype: no conversion op follows
    O.push_back(outs.back().data_ptr());
    starts.push_back(starts.back() + Ns[i]);
  }
  void (*write)(void*, int64_t, float) = x.scalar_type() == at::kFloat  ? store<float>
                                         : x.scalar_type() == at::kHalf ? store<c10::Half>
                                                                        : store<c10::BFloat16>;
  const int64_t grain = std::max<int64_t>(1, MIN_BYTES_PER_TASK / std::max<int64_t>(row_bytes * M, 1));
  at::parallel_for(0, starts.back(), grain, [&](int64_t r0, int64_t r1) {
    int64_t i = 0;
    for (int64_t r = r0; r < r1; ++r) {
      while (r >= starts[i + 1]) ++i;
      const int64_t n = r - starts[i], N = Ns[i];
      for (int64_t m = 0; m < M; ++m) {  // the weight's row stays in L1 across the rows of x
        const float y = row(X + m * K, i, n);
        write(O[i], m * N + n, B[i] ? y + B[i][n] : y);
      }
    }
  });
  return outs;
}

// q's inner dimension (K).
int64_t check_int8(const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() && q.device().is_cpu(),
              "q: a contiguous int8 [N, K] on the CPU");
  TORCH_CHECK(scales.numel() == q.size(0) && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "scales: float32, one per output row");
  return q.size(1);
}

// The int8 contract's row (the header): the float32 sum rounded to bfloat16 after its scale.
struct Int8Row {
  std::vector<const int8_t*> W;
  std::vector<const float*> S;
  int64_t K;
  float operator()(const float* xr, int64_t i, int64_t n) const {
    return static_cast<float>(c10::BFloat16(S[i][n] * dot(xr, W[i] + n * K, K)));
  }
};

// x [.., K] (float32, bfloat16 or float16), q [N, K] int8, scales [N] float32, bias [N] or none
// -> [.., N] in x's dtype, by the int8 contract.
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  const int64_t K = check_int8(q, scales);
  const Int8Row row{{q.data_ptr<int8_t>()}, {scales.data_ptr<float>()}, K};
  return rows_times_weights(x, {q.size(0)}, K, K, {bias}, /*to_bf16=*/true, row)[0];
}

// int8_rows for several weights that read the same x (a q/k/v or gate/up group), in one call and
// one parallel loop: the compiled step's wrapper spends ~10 us a call around the kernel.
std::vector<at::Tensor> int8_rows_group(const at::Tensor& x, at::TensorList qs, at::TensorList scales) {
  TORCH_CHECK(!qs.empty() && qs.size() == scales.size(), "one scales tensor per q");
  const int64_t K = check_int8(qs[0], scales[0]);
  Int8Row row{{}, {}, K};
  std::vector<int64_t> Ns;
  for (size_t i = 0; i < qs.size(); ++i) {
    TORCH_CHECK(check_int8(qs[i], scales[i]) == K, "the weights of a group read the same input: K ", K, " and ",
                qs[i].size(1));
    row.W.push_back(qs[i].data_ptr<int8_t>());
    row.S.push_back(scales[i].data_ptr<float>());
    Ns.push_back(qs[i].size(0));
  }
  return rows_times_weights(x, Ns, K, K, std::vector<std::optional<at::Tensor>>(qs.size()), true, row);
}

// x [.., K] (float32, bfloat16 or float16), weight [N, K] float32 or bfloat16, bias [N] or none
// -> [.., N] in x's dtype: float32 products and sums, the bias added before the one rounding.
at::Tensor dense_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "weight: a contiguous [N, K] on the CPU");
  const int64_t N = weight.size(0), K = weight.size(1);
  if (weight.scalar_type() == at::kFloat) {
    const float* W = weight.data_ptr<float>();
    auto row = [&](const float* xr, int64_t, int64_t n) { return dot(xr, W + n * K, K); };
    return rows_times_weights(x, {N}, K, K * 4, {bias}, false, row)[0];
  }
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "dense_rows: a float32 or bfloat16 weight, not ",
              weight.scalar_type());
  const c10::BFloat16* W = weight.data_ptr<c10::BFloat16>();
  auto row = [&](const float* xr, int64_t, int64_t n) { return dot(xr, W + n * K, K); };
  return rows_times_weights(x, {N}, K, K * 2, {bias}, false, row)[0];
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
  m.def("int8_rows_group(Tensor x, Tensor[] qs, Tensor[] scales) -> Tensor[]");
  m.def("dense_rows(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("vector_bits() -> int", &vector_bits);
}

TORCH_LIBRARY_IMPL(loraserve_native, CPU, m) {
  m.impl("int8_rows", &int8_rows);
  m.impl("int8_rows_group", &int8_rows_group);
  m.impl("dense_rows", &dense_rows);
}
