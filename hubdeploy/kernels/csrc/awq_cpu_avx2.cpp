// AWQ 4-bit GEMV/GEMM for the CPU (AVX2 + FMA): the weights stay 4-bit in memory.
//
// Layout ("lane-interleaved"): row n of W is K/8 int32 words. Block b covers k in [64b, 64b+64);
// its 8 words hold, in word j and nibble t, the weight for k = 64b + 8t + j. One 256-bit load
// gives a block; nibble t of all 8 lanes is `(v >> 4t) & 15`, which lines up with x[64b+8t .. +8]:
// no byte shuffles, so the unpack costs two ALU ops per 8 weights.
//
// Math: sum_k s_g (q_k - z_g) x_k = s_g * sum_k q_k x_k - (z_g s_g) * sum_{k in g} x_k, in fp32;
// the per-group sums of x are computed once per call.
#include <immintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace {

constexpr int kMaxRows = 4;  // rows of x per pass (accumulators kept in registers)

// Software prefetch distance in int32 words (4 KB ahead): streaming W from memory, one core's
// hardware prefetcher alone left the batch-1 GEMV 1.3x slower (benchmarks/RESULTS.md, "CPU GEMV
// from memory").
constexpr int64_t kPrefetchInt4 = 1024;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[m, n] for m in [0, M) (M <= kMaxRows), n in [n0, n1). A accumulators per row of x break
// the FMA dependency chain (latency, not throughput, bounds one chain at batch 1).
template <int M, int A = (M == 1 ? 4 : M == 2 ? 2 : 1)>
void rows_kernel(const int32_t* w, const float* s, const float* zs, const float* x, const float* xg,
                 float* out, int64_t K, int64_t N, int64_t g, int64_t n0, int64_t n1, int64_t x_stride,
                 int64_t out_stride) {
  const __m256i mask = _mm256_set1_epi32(15);
  const int64_t groups = K / g, halves_per_group = g / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * (K / 8);
    const float* sr = s + n * groups;
    const float* zr = zs + n * groups;
    __m256 acc[M], accg[M][A];
    float corr[M];
    for (int m = 0; m < M; ++m) {
      acc[m] = _mm256_setzero_ps();
      corr[m] = 0.f;
      for (int a = 0; a < A; ++a) accg[m][a] = _mm256_setzero_ps();
    }
    int64_t half = 0, group = 0;
    for (int64_t b = 0; b < K / 64; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(wr + 8 * b + kPrefetchInt4), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 8 * b));
      const float* xb = x + 64 * b;
#define HUBDEPLOY_SLICE(t)                                                                      \
      {                                                                                         \
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * (t)), mask)); \
        for (int m = 0; m < M; ++m)                                                             \
          accg[m][(t) % A] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xb + m * x_stride + 8 * (t)), accg[m][(t) % A]); \
      }
      for (int h = 0; h < 2; ++h) {
        if (h == 0) { HUBDEPLOY_SLICE(0) HUBDEPLOY_SLICE(1) HUBDEPLOY_SLICE(2) HUBDEPLOY_SLICE(3) }
        else { HUBDEPLOY_SLICE(4) HUBDEPLOY_SLICE(5) HUBDEPLOY_SLICE(6) HUBDEPLOY_SLICE(7) }
        if (++half == halves_per_group) {  // group done: scale it in, subtract its zero term
          const __m256 sv = _mm256_set1_ps(sr[group]);
          for (int m = 0; m < M; ++m) {
            __m256 sum = accg[m][0];
            accg[m][0] = _mm256_setzero_ps();
            for (int a = 1; a < A; ++a) { sum = _mm256_add_ps(sum, accg[m][a]); accg[m][a] = _mm256_setzero_ps(); }
            acc[m] = _mm256_fmadd_ps(sum, sv, acc[m]);
            corr[m] += zr[group] * xg[m * groups + group];
          }
          half = 0;
          ++group;
        }
      }
#undef HUBDEPLOY_SLICE
    }
    for (int m = 0; m < M; ++m) out[m * out_stride + n] = hsum(acc[m]) - corr[m];
  }
}

using RowsFn = void (*)(const int32_t*, const float*, const float*, const float*, const float*, float*,
                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[kMaxRows + 1] = {nullptr, rows_kernel<1>, rows_kernel<2>, rows_kernel<3>, rows_kernel<4>};

}  // namespace

// x [M, K] fp32 contiguous; w [N, K/8] int32; scales, zero_scales [N, K/g] fp32 -> [M, N] fp32.
torch::Tensor awq_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zero_scales,
                       int64_t group_size) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kInt32 && w.is_contiguous() && w.dim() == 2, "w: contiguous int32 [N, K/8]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 64 == 0 && w.size(1) == K / 8, "K must be a multiple of 64 and match w");
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "group size: a multiple of 32 dividing K");
  TORCH_CHECK(scales.is_contiguous() && zero_scales.is_contiguous() && scales.dtype() == torch::kFloat32 &&
                  zero_scales.dtype() == torch::kFloat32 && scales.numel() == N * (K / group_size) &&
                  zero_scales.numel() == N * (K / group_size),
              "scales/zero_scales: contiguous fp32 [N, K/g]");
  auto out = torch::empty({M, N}, x.options());
  auto xg = x.view({M, K / group_size, group_size}).sum(-1).contiguous();  // per-group sums of x
  const int32_t* wp = w.data_ptr<int32_t>();
  const float *sp = scales.data_ptr<float>(), *zp = zero_scales.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    const float* xp = x.data_ptr<float>() + m0 * K;
    const float* xgp = xg.data_ptr<float>() + m0 * (K / group_size);
    float* op = out.data_ptr<float>() + m0 * N;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      kRows[rows](wp, sp, zp, xp, xgp, op, K, N, group_size, n0, n1, K, N);
    });
  }
  return out;
}

// Rows [n0, n1) of W as dense fp32 into `out` ([n1 - n0, K], row stride K).
void dequantize_rows(const int32_t* w, const float* s, const float* zs, float* out, int64_t K, int64_t g,
                     int64_t n0, int64_t n1) {
  const __m256i mask = _mm256_set1_epi32(15);
  const int64_t groups = K / g, halves_per_group = g / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wr = w + n * (K / 8);
    float* o = out + (n - n0) * K;
    int64_t half = 0, group = 0;
    __m256 sv = _mm256_set1_ps(s[n * groups]), zv = _mm256_set1_ps(zs[n * groups]);
    for (int64_t b = 0; b < K / 64; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 8 * b));
      float* ob = o + 64 * b;
#define HUBDEPLOY_DQ(t) \
      _mm256_storeu_ps(ob + 8 * (t), _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * (t)), mask)), sv, zv));
      for (int h = 0; h < 2; ++h) {
        if (h == 0) { HUBDEPLOY_DQ(0) HUBDEPLOY_DQ(1) HUBDEPLOY_DQ(2) HUBDEPLOY_DQ(3) }
        else { HUBDEPLOY_DQ(4) HUBDEPLOY_DQ(5) HUBDEPLOY_DQ(6) HUBDEPLOY_DQ(7) }
        if (++half == halves_per_group && ++group < groups) {
          half = 0;
          sv = _mm256_set1_ps(s[n * groups + group]);
          zv = _mm256_set1_ps(zs[n * groups + group]);
        }
      }
#undef HUBDEPLOY_DQ
    }
  }
}

constexpr int64_t kTileRows = 128;  // rows of W dequantized at a time: 128 x K fp32 stays in L2

// x [M, K] fp32 @ W.T for larger M (prefill): per tile of W's rows, dequantize into an
// L2-sized buffer and multiply with the BLAS sgemm, so only 4-bit weights cross memory.
torch::Tensor awq_gemm_tiled(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor zero_scales,
                             int64_t group_size) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [M, K]");
  TORCH_CHECK(w.dtype() == torch::kInt32 && w.is_contiguous() && w.dim() == 2, "w: contiguous int32 [N, K/8]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 64 == 0 && w.size(1) == K / 8 && group_size % 32 == 0 && K % group_size == 0,
              "K: a multiple of 64 matching w; group size: a multiple of 32 dividing K");
  auto out = torch::empty({M, N}, x.options());
  auto tile = torch::empty({std::min(kTileRows, N), K}, x.options());
  const int32_t* wp = w.data_ptr<int32_t>();
  const float *sp = scales.data_ptr<float>(), *zp = zero_scales.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
    const int64_t n1 = std::min(N, n0 + kTileRows);
    float* tp = tile.data_ptr<float>();
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
      dequantize_rows(wp, sp, zp, tp + (a - n0) * K, K, group_size, a, b);
    });
    auto out_tile = out.narrow(1, n0, n1 - n0);  // strided rows: BLAS writes with ldc = N
    at::mm_out(out_tile, x, tile.narrow(0, 0, n1 - n0).t());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// 16-bit weights (bf16 / fp16) times fp32 x, for CPUs whose BLAS has no fast 16-bit GEMM (AVX2
// without AVX-512-BF16/AMX: torch's bf16 matmul there runs far below the memory's pace). W stays
// in the checkpoint's [N, K] row-major 16-bit layout: bf16 -> fp32 is a widen and a shift, fp16
// -> fp32 one F16C instruction; products are summed in fp32 and the caller rounds once.

template <bool Half>
inline __m256 load8_16bit(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (Half) return _mm256_cvtph_ps(v);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <bool Half>
inline float to_float_16bit(uint16_t v) {
  if constexpr (Half) return _cvtsh_ss(v);
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Software prefetch distance for streaming W from memory, in 16-bit elements (8 KB ahead in each
// row read): one core's hardware prefetcher alone left batch-1 GEMVs at ~8 GB/s, with it ~13 GB/s
// (benchmarks/RESULTS.md, "CPU GEMV from memory").
constexpr int64_t kPrefetch16 = 4096;

// out[0, n] for one row of x, n in [n0, n1): R rows of W at a time, one accumulator each, so R
// independent FMA chains and R memory streams are in flight; x is loaded once for all R.
template <bool Half, int R = 4>
void row1_kernel16(const uint16_t* w, const float* x, float* out, int64_t K, int64_t n0, int64_t n1) {
  const int64_t k_main = K / 32 * 32;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    const uint16_t* wr = w + n * K;
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_main; k += 32) {
      for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr + i * K + k + kPrefetch16), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m256 xv = _mm256_loadu_ps(x + k + 8 * j);
        for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(load8_16bit<Half>(wr + i * K + k + 8 * j), xv, acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      float r = hsum(acc[i]);
      for (int64_t k = k_main; k < K; ++k) r += to_float_16bit<Half>(wr[i * K + k]) * x[k];
      out[n + i] = r;
    }
  }
  for (; n < n1; ++n) {  // the last < R rows of W
    const uint16_t* wr = w + n * K;
    float r = 0.f;
    for (int64_t k = 0; k < K; ++k) r += to_float_16bit<Half>(wr[k]) * x[k];
    out[n] = r;
  }
}

// out[m, n] for m < M rows of x, n in [n0, n1): each row of W is read once for all M rows of x.
template <int M, bool Half, int A = (M <= 4 ? 2 : 1)>
void rows16_kernel(const uint16_t* w, const float* x, float* out, int64_t K, int64_t n0, int64_t n1,
                   int64_t out_stride) {
  if constexpr (M == 1) {
    row1_kernel16<Half>(w, x, out, K, n0, n1);
    return;
  }
  constexpr int64_t kStep = 8 * A;
  const int64_t k_main = K / kStep * kStep, k_vec = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_main; k += kStep) {
      if (k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetch16), _MM_HINT_T0);
      for (int a = 0; a < A; ++a) {
        const __m256 wv = load8_16bit<Half>(wr + k + 8 * a);
        for (int m = 0; m < M; ++m) acc[m][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * a), acc[m][a]);
      }
    }
    for (int64_t k = k_main; k < k_vec; k += 8) {
      const __m256 wv = load8_16bit<Half>(wr + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      float r = hsum(sum);
      for (int64_t k = k_vec; k < K; ++k) r += to_float_16bit<Half>(wr[k]) * x[m * K + k];
      out[m * out_stride + n] = r;
    }
  }
}

template <bool Half>
void gemm16(const float* x, const uint16_t* w, float* out, int64_t M, int64_t K, int64_t N) {
  using Fn = void (*)(const uint16_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
  // up to 8 rows of x a pass: 8 accumulators, a widened weight vector and an x load fit the 16 ymm registers
  constexpr int64_t kRows16 = 8;
  static constexpr Fn kFns[kRows16 + 1] = {nullptr, rows16_kernel<1, Half>, rows16_kernel<2, Half>,
                                           rows16_kernel<3, Half>, rows16_kernel<4, Half>, rows16_kernel<5, Half>,
                                           rows16_kernel<6, Half>, rows16_kernel<7, Half>, rows16_kernel<8, Half>};
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  for (int64_t m0 = 0; m0 < M; m0 += kRows16) {
    const int64_t rows = std::min<int64_t>(kRows16, M - m0);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      kFns[rows](w, x + m0 * K, out + m0 * N, K, n0, n1, N);
    });
  }
}

template <bool Half>
void widen_rows(const uint16_t* w, float* out, int64_t K, int64_t n0, int64_t n1) {
  const int64_t k_vec = K / 8 * 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    float* o = out + (n - n0) * K;
    for (int64_t k = 0; k < k_vec; k += 8) _mm256_storeu_ps(o + k, load8_16bit<Half>(wr + k));
    for (int64_t k = k_vec; k < K; ++k) o[k] = to_float_16bit<Half>(wr[k]);
  }
}

// x [M, K] fp32 contiguous; w [N, K] bf16 or fp16 contiguous -> [M, N] fp32. Up to `gemv_rows`
// rows of x the weights are read directly (once per 8 rows); above, per tile of W's rows, they
// are widened into an L2-sized fp32 buffer and multiplied with the BLAS sgemm.
torch::Tensor gemm_16bit(torch::Tensor x, torch::Tensor w, int64_t gemv_rows) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [M, K]");
  TORCH_CHECK((w.dtype() == torch::kBFloat16 || w.dtype() == torch::kHalf) && w.is_contiguous() && w.dim() == 2,
              "w: contiguous bf16/fp16 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "w [N, K] must match x [M, K]");
  const bool half = w.dtype() == torch::kHalf;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto out = torch::empty({M, N}, x.options());
  if (M <= gemv_rows) {
    (half ? gemm16<true> : gemm16<false>)(x.data_ptr<float>(), wp, out.data_ptr<float>(), M, K, N);
    return out;
  }
  auto tile = torch::empty({std::min(kTileRows, N), K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
    const int64_t n1 = std::min(N, n0 + kTileRows);
    float* tp = tile.data_ptr<float>();
    at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
      (half ? widen_rows<true> : widen_rows<false>)(wp, tp + (a - n0) * K, K, a, b);
    });
    auto out_tile = out.narrow(1, n0, n1 - n0);
    at::mm_out(out_tile, x, tile.narrow(0, 0, n1 - n0).t());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("awq_gemm", &awq_gemm, "AWQ int4 x fp32 -> fp32 (lane-interleaved layout)");
  m.def("awq_gemm_tiled", &awq_gemm_tiled, "AWQ int4 x fp32 -> fp32, dequantized per tile of rows + sgemm");
  m.def("gemm_16bit", &gemm_16bit, "bf16/fp16 weights x fp32 -> fp32 (direct up to gemv_rows rows, else widened tiles + sgemm)");
}
