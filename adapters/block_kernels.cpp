// One-row GEMVs over weights quantized in groups of 32 inputs, llama.cpp's Q4_1 and Q8_0 codes,
// laid out in blocks of 16 output rows (adapters/blocks.py packs them): y = x @ Wᵀ.
//
// Why: an int8 W (row_kernels.cpp) is 8 bits a weight, where llama.cpp's Q4_1 file of the default
// model is ~5 (Q4_1 layers, a Q8_0 head), and widening every weight to float32 costs as much as
// reading it. Here the activations are quantized instead, once a call: each group of 32 to int16
// with its own scale (an error of at most 1/65,534 of the group's largest value, finer than the
// bfloat16 rounding of the int8 contract), so the products are int16 multiply-adds into int32
// (AVX-512 VNNI's vpdpwssd, or vpmaddwd), each group's sum scaled once. The layout puts 16 rows in
// the 16 lanes: no horizontal sums, and one group's 16 scales are one vector.
//
// A block of 16 rows is, per group of 32 inputs g, contiguous and in this order:
//   Q4_1 (320 bytes): codes[8][16][2] (t, row, h): byte = q[row][32g + 2t + h] | q[row][32g + 2(t + 8) + h] << 4,
//                     then 16 float16 scales d, then 16 float16 minimums m: w = d * q + m, q in 0..15;
//   Q8_0 (544 bytes): codes[16][16][2] (v, row, h): int8 q[row][32g + 2v + h], then 16 float16 scales d: w = d * q.
// Each block's (t or v, row, h) run of 32 codes widens into 16 lanes of int16 pairs, each pair
// multiplied by the activations' pair (2v, 2v + 1), broadcast.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS = 16, GROUP = 32;
constexpr int64_t Q4_1_BYTES = 8 * ROWS * 2 + 2 * ROWS * 2, Q8_0_BYTES = 16 * ROWS * 2 + ROWS * 2;
constexpr int64_t PREFETCH_BYTES = 4096;  // as row_kernels.cpp's loop: ~a DRAM latency's worth of reads
constexpr int64_t MIN_BYTES_PER_TASK = 32 * 1024;

// One row of x, quantized: int16 codes (pairs read as int32), a scale and the float sum per group.
struct QuantizedRow {
  std::vector<int16_t> q;
  std::vector<float> scale, sum;
  const int32_t* pairs() const { return reinterpret_cast<const int32_t*>(q.data()); }
};

QuantizedRow quantize_row(const float* x, int64_t K) {
  QuantizedRow r{std::vector<int16_t>(K), std::vector<float>(K / GROUP), std::vector<float>(K / GROUP)};
  for (int64_t g = 0; g < K / GROUP; ++g) {
    const float* v = x + g * GROUP;
    float amax = 0.f, sum = 0.f;
    for (int64_t i = 0; i < GROUP; ++i) amax = std::max(amax, std::fabs(v[i])), sum += v[i];
    const float inverse = amax > 0.f ? 32767.f / amax : 0.f;
    for (int64_t i = 0; i < GROUP; ++i) r.q[g * GROUP + i] = static_cast<int16_t>(std::nearbyint(v[i] * inverse));
    r.scale[g] = amax / 32767.f;
    r.sum[g] = sum;
  }
  return r;
}

inline void prefetch_group(const uint8_t* p, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(p + PREFETCH_BYTES + line);
}

// out[16] = the block's 16 rows times x, for `G` groups. Q4 selects Q4_1, else Q8_0.
template <bool Q4>
void block_rows(const uint8_t* block, int64_t G, const QuantizedRow& x, float* out) {
  constexpr int64_t BYTES = Q4 ? Q4_1_BYTES : Q8_0_BYTES, CODES = Q4 ? 256 : 512;
  const int32_t* xp = x.pairs();
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g, block += BYTES, xp += GROUP / 2) {
    prefetch_group(block, BYTES);
    __m512i s[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    auto madd = [&](int j, __m512i w, int32_t pair) {
#if defined(__AVX512VNNI__)
      s[j] = _mm512_dpwssd_epi32(s[j], w, _mm512_set1_epi32(pair));
#else
      s[j] = _mm512_add_epi32(s[j], _mm512_madd_epi16(w, _mm512_set1_epi32(pair)));
#endif
    };
    if constexpr (Q4) {
      const __m512i low = _mm512_set1_epi16(0x0F);
      for (int t = 0; t < 8; ++t) {
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * t)));
        madd(t & 3, _mm512_and_si512(w, low), xp[t]);
        madd((t + 2) & 3, _mm512_srli_epi16(w, 4), xp[t + 8]);
      }
    } else {
      for (int v = 0; v < 16; ++v)
        madd(v & 3, _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * v))), xp[v]);
    }
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + CODES)));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(x.scale[g])), acc);
    if constexpr (Q4) {
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + CODES + 32)));
      acc = _mm512_fmadd_ps(m, _mm512_set1_ps(x.sum[g]), acc);
    }
  }
  _mm512_storeu_ps(out, acc);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0-7, 8-15
  for (int64_t g = 0; g < G; ++g, block += BYTES, xp += GROUP / 2) {
    prefetch_group(block, BYTES);
    for (int half = 0; half < 2; ++half) {
      __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      auto madd = [&](int j, __m256i w, int32_t pair) {
        s[j] = _mm256_add_epi32(s[j], _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
      };
      if constexpr (Q4) {
        const __m256i low = _mm256_set1_epi16(0x0F);
        for (int t = 0; t < 8; ++t) {
          const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 32 * t + 16 * half)));
          madd(0, _mm256_and_si256(w, low), xp[t]);
          madd(1, _mm256_srli_epi16(w, 4), xp[t + 8]);
        }
      } else {
        for (int v = 0; v < 16; ++v)
          madd(v & 1, _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 32 * v + 16 * half))), xp[v]);
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + CODES + 16 * half)));
      acc[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s[0], s[1])),
                                  _mm256_mul_ps(d, _mm256_set1_ps(x.scale[g])), acc[half]);
      if constexpr (Q4) {
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + CODES + 32 + 16 * half)));
        acc[half] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.sum[g]), acc[half]);
      }
    }
  }
  _mm256_storeu_ps(out, acc[0]);
  _mm256_storeu_ps(out + 8, acc[1]);
#else
  float acc[ROWS] = {};
  for (int64_t g = 0; g < G; ++g, block += BYTES) {
    const c10::Half* d = reinterpret_cast<const c10::Half*>(block + CODES);
    for (int64_t r = 0; r < ROWS; ++r) {
      int32_t sum = 0;
      for (int64_t k = 0; k < GROUP; ++k) {
        const int64_t v = k / 2, h = k % 2;
        const int32_t q = Q4 ? (block[32 * (v % 8) + 2 * r + h] >> (v < 8 ? 0 : 4)) & 0x0F
                             : static_cast<int8_t>(block[32 * v + 2 * r + h]);
        sum += q * x.q[g * GROUP + k];
      }
      acc[r] += static_cast<float>(sum) * (static_cast<float>(d[r]) * x.scale[g]);
      if (Q4) acc[r] += static_cast<float>(d[ROWS + r]) * x.sum[g];
    }
  }
  for (int64_t r = 0; r < ROWS; ++r) out[r] = acc[r];
#endif
}

template <typename T>
void store_rows(void* out, int64_t offset, const float* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) static_cast<T*>(out)[offset + i] = static_cast<T>(y[i]);
}

// ys[i] = x @ W_iᵀ for weights in blocks [N_i / 16, K / 32, bytes], one parallel loop over all their
// blocks (a q/k/v or gate/up group in one call: the compiled step's wrapper costs ~10 us a call).
template <bool Q4>
std::vector<at::Tensor> blocks_times(const at::Tensor& x, at::TensorList blocks) {
  constexpr int64_t BYTES = Q4 ? Q4_1_BYTES : Q8_0_BYTES;
  TORCH_CHECK(!blocks.empty(), "no weights");
  TORCH_CHECK(x.device().is_cpu(), "the block kernels run on CPU tensors");
  const int64_t G = blocks[0].size(1), K = G * GROUP;
  for (const at::Tensor& b : blocks)
    TORCH_CHECK(b.dim() == 3 && b.scalar_type() == at::kByte && b.is_contiguous() && b.size(2) == BYTES &&
                    b.size(1) == G,
                "blocks: contiguous uint8 [N / 16, ", G, ", ", BYTES, "] for inputs of ", K, ", got ", b.sizes());
  TORCH_CHECK(x.size(-1) == K, "x's last dimension ", x.size(-1), " is not the weights' ", K);
  const at::Tensor rows = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = rows.size(0);
  std::vector<QuantizedRow> xq;
  for (int64_t m = 0; m < M; ++m) xq.push_back(quantize_row(rows.data_ptr<float>() + m * K, K));
  std::vector<at::Tensor> outs;
  std::vector<int64_t> starts{0};  // weight i's blocks are [starts[i], starts[i + 1]) of the loop's
  for (const at::Tensor& b : blocks) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = b.size(0) * ROWS;
    outs.push_back(at::empty(shape, x.options()));
    starts.push_back(starts.back() + b.size(0));
  }
  void (*write)(void*, int64_t, const float*, int64_t) = x.scalar_type() == at::kFloat  ? store_rows<float>
                                                         : x.scalar_type() == at::kHalf ? store_rows<c10::Half>
                                                                                        : store_rows<c10::BFloat16>;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "block kernels: activations in float32, bfloat16 or float16, not ", x.scalar_type());
  const int64_t grain = std::max<int64_t>(1, MIN_BYTES_PER_TASK / std::max<int64_t>(BYTES * G * M, 1));
  at::parallel_for(0, starts.back(), grain, [&](int64_t b0, int64_t b1) {
    int64_t i = 0;
    float y[ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= starts[i + 1]) ++i;
      const uint8_t* block = blocks[i].data_ptr<uint8_t>() + (b - starts[i]) * G * BYTES;
      const int64_t N = blocks[i].size(0) * ROWS;
      for (int64_t m = 0; m < M; ++m) {  // the block stays in L1/L2 across the rows of x
        block_rows<Q4>(block, G, xq[m], y);
        write(outs[i].data_ptr(), m * N + (b - starts[i]) * ROWS, y, ROWS);
      }
    }
  });
  return outs;
}

// The blocks' values w = d·q (+ m) into `out` [N, K] (float32, bfloat16 or float16), in parallel over
// blocks: the dequantized matmul's scratch for calls of many rows, where a GEMM beats this file's loop.
template <bool Q4, typename T>
void dequantize_into(const at::Tensor& blocks, T* out) {
  constexpr int64_t BYTES = Q4 ? Q4_1_BYTES : Q8_0_BYTES, CODES = Q4 ? 256 : 512;
  const int64_t G = blocks.size(1), K = G * GROUP;
  const uint8_t* all = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, blocks.size(0) * G, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const uint8_t* block = all + bg * BYTES;
      const c10::Half* d = reinterpret_cast<const c10::Half*>(block + CODES);
      const int64_t b = bg / G, g = bg % G;
      for (int64_t r = 0; r < ROWS; ++r) {
        const float scale = static_cast<float>(d[r]), minimum = Q4 ? static_cast<float>(d[ROWS + r]) : 0.f;
        T* row = out + (b * ROWS + r) * K + g * GROUP;
        for (int64_t k = 0; k < GROUP; ++k) {
          const int64_t v = k / 2, h = k % 2;
          const int32_t q = Q4 ? (block[32 * (v % 8) + 2 * r + h] >> (v < 8 ? 0 : 4)) & 0x0F
                               : static_cast<int8_t>(block[32 * v + 2 * r + h]);
          row[k] = static_cast<T>(scale * static_cast<float>(q) + minimum);
        }
      }
    }
  });
}

void dequantize_blocks(const at::Tensor& blocks, at::Tensor& out) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  (blocks.size(2) == Q4_1_BYTES || blocks.size(2) == Q8_0_BYTES),
              "blocks: contiguous uint8 [N / 16, K / 32, ", Q4_1_BYTES, " or ", Q8_0_BYTES, "]");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == blocks.size(0) * ROWS &&
                  out.size(1) == blocks.size(1) * GROUP,
              "out: contiguous [", blocks.size(0) * ROWS, ", ", blocks.size(1) * GROUP, "]");
  const bool q4 = blocks.size(2) == Q4_1_BYTES;
  switch (out.scalar_type()) {
    case at::kFloat:
      return q4 ? dequantize_into<true>(blocks, out.data_ptr<float>()) : dequantize_into<false>(blocks, out.data_ptr<float>());
    case at::kBFloat16:
      return q4 ? dequantize_into<true>(blocks, out.data_ptr<c10::BFloat16>())
                : dequantize_into<false>(blocks, out.data_ptr<c10::BFloat16>());
    case at::kHalf:
      return q4 ? dequantize_into<true>(blocks, out.data_ptr<c10::Half>())
                : dequantize_into<false>(blocks, out.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "dequantize_blocks: out in float32, bfloat16 or float16, not ", out.scalar_type());
  }
}

std::vector<at::Tensor> q4_1_rows(const at::Tensor& x, at::TensorList blocks) { return blocks_times<true>(x, blocks); }
std::vector<at::Tensor> q8_0_rows(const at::Tensor& x, at::TensorList blocks) { return blocks_times<false>(x, blocks); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve_native, m) {
  m.def("q4_1_rows(Tensor x, Tensor[] blocks) -> Tensor[]");
  m.def("q8_0_rows(Tensor x, Tensor[] blocks) -> Tensor[]");
  m.def("dequantize_blocks(Tensor blocks, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(loraserve_native, CPU, m) {
  m.impl("q4_1_rows", &q4_1_rows);
  m.impl("q8_0_rows", &q8_0_rows);
  m.impl("dequantize_blocks", &dequantize_blocks);
}
