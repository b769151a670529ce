// lmlab native matrix-vector kernels: y[M,N] = x[M,K] · W[N,K]ᵀ for a few rows of x (decoding), W stored as
//
//   int4_gemv(x, packed, scale, minimum, group_size)   lmlab's int4: packed uint8 N×Kp/2, low nibble = even
//       column, high nibble = odd column; float32 scale and minimum N×(Kp/group_size); w = code·scale + minimum.
//   int8_gemv(x, qweight, scale)                       int8 N×K, one float32 scale per row: w = q·scale[n].
//   bf16_gemv(x, w)                                    bfloat16 N×K.
//   f32_gemv(x, w)                                     float32 N×K.
// and attend_cached (below): a decoding step's or verification pass's attention over the slots its mask allows;
// causal_attention: a bfloat16 prompt's causal attention (flash-style, vdpbf16ps).
//
// The output has x's dtype (float32 or bfloat16); every kernel accumulates in float32.
//
// Integer kernels (AVX-512 VNNI): x is quantized once per call to int8 per group of 32 columns,
// dx[g] = max|x|/127, q = round(x/dx). Then Σ_k w[k]·x[k] ≈ Σ_g dx[g]·(Σ_{k∈g} w[k]·q[k]), the inner sums
// in int32 with vpdpbusd (u8 × s8, 4 products per 32-bit lane):
//   int4: a 64-byte load holds 128 columns = 4 groups; (byte & 15) are the even columns and (byte >> 4) the
//         odd ones, so x's codes are deinterleaved once into even/odd arrays that line up with the nibbles.
//         Lane i of the int32 result belongs to group 4c + i/4; it is converted to float and multiplied by
//         scale[n,g]·dx[g] (the 4 scales spread over 16 lanes with a permute). The minimum term is
//         Σ_g minimum[n,g]·Σ_{k∈g} dx[g]·q[k] (sums of the quantized x, so the result is exactly the product
//         of the de-quantized weight with the quantized x).
//   int8: vpdpbusd wants one unsigned operand: |q| (u8) times the weight with q's sign applied (s8).
//         A 64-byte load holds 2 groups: lanes 0-7 and 8-15 take dx of each; y = scale[n]·Σ.
// Float kernels: bf16 uses vdpbf16ps (x converted to bf16 once), float32 uses FMA; both 4 rows of W at a time,
// against up to 4 rows of x at once (16 accumulators), so a few-row product reads each piece of W once.
// K tails use masked loads. Rows of W are split over PyTorch's own thread pool (at::parallel_for).
//
// Every kernel has a plain scalar version (exact float x, any group size), used when the CPU lacks the
// instructions (checked at run time) or when the environment variable LMLAB_NATIVE_SCALAR=1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LMLAB_X86 1
#define LMLAB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma")))
#else
#define LMLAB_X86 0
#endif

namespace {

bool force_scalar() {
  const char* v = std::getenv("LMLAB_NATIVE_SCALAR");
  return v && v[0] && std::strcmp(v, "0") != 0;
}

bool has_avx512_vnni() {
#if LMLAB_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

bool has_avx512_bf16() {
#if LMLAB_X86
  static const bool ok = has_avx512_vnni() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// Rows of W per task: enough bytes that a thread's share outweighs waking it.
int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(4, (int64_t)32768 / std::max<int64_t>(1, row_bytes)); }

// x (M×K, float32 or bfloat16) as contiguous float32, converted here rather than through x.to(): a decoding
// step makes over a hundred of these calls, and each trip through the dispatcher costs microseconds
struct FloatX {
  std::vector<float> buf;
  const float* p = nullptr;
  explicit FloatX(const at::Tensor& x) {
    if (x.scalar_type() == at::kFloat && x.is_contiguous()) { p = x.data_ptr<float>(); return; }
    at::Tensor xc = x.contiguous();
    buf.resize(xc.numel());
    if (xc.scalar_type() == at::kBFloat16) {
      const at::BFloat16* src = xc.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < xc.numel(); ++i) buf[i] = static_cast<float>(src[i]);
    } else {
      const float* src = xc.data_ptr<float>();
      std::copy(src, src + xc.numel(), buf.begin());
    }
    p = buf.data();
  }
};

// the float32 result y in x's dtype (bfloat16: rounded to nearest even, as Tensor.to does)
at::Tensor like_x(const at::Tensor& y, const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return y;
  at::Tensor out = at::empty(y.sizes(), x.options());
  const float* src = y.data_ptr<float>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < y.numel(); ++i) dst[i] = at::BFloat16(src[i]);
  return out;
}

// ------------------------------------------------------------------ x quantized to int8 per group of 32
struct QuantX {
  int64_t M, Kpad, G;            // Kpad: K rounded up to `align` columns (zeros); G = Kpad / 32
  std::vector<int8_t> q;         // M × Kpad
  std::vector<float> dx, qsum;   // M × G: group scale, dx·Σq
};

#if LMLAB_X86
// One group (columns k0..k0+n-1, n <= 32) of one x row, vectorized: the same arithmetic as the scalar loop
// below (127/amax, round to nearest even, clamp), so both give the same codes.
LMLAB_AVX512 void quantize_group_avx512(const float* xr, int64_t n, int8_t* q, float* dx, float* qsum) {
  const __mmask16 m0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  const __mmask16 m1 = n <= 16 ? (__mmask16)0 : n >= 32 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - 16)) - 1);
  const __m512 v0 = _mm512_maskz_loadu_ps(m0, xr), v1 = _mm512_maskz_loadu_ps(m1, xr + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
  const __m512 vid = _mm512_set1_ps(id);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512i q0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), lo), hi);
  __m512i q1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid)), lo), hi);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128((__m128i*)(q + 16), _mm512_cvtepi32_epi8(q1));
  *dx = d;
  *qsum = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
}

// int4's x operands: the codes' even and odd columns apart (the low and high byte of each 16-bit pair).
LMLAB_AVX512 void deinterleave_avx512(const int8_t* q, int64_t bytes, int8_t* even, int8_t* odd) {
  for (int64_t i = 0; i < bytes; i += 32) {
    const __m512i w = _mm512_loadu_si512(q + 2 * i);
    _mm256_storeu_si256((__m256i*)(even + i), _mm512_cvtepi16_epi8(w));
    _mm256_storeu_si256((__m256i*)(odd + i), _mm512_cvtepi16_epi8(_mm512_srli_epi16(w, 8)));
  }
}
#endif

QuantX quantize_x(const float* x, int64_t M, int64_t K, int64_t align) {
  QuantX r;
  r.M = M;
  r.Kpad = (K + align - 1) / align * align;
  r.G = r.Kpad / 32;
  r.q.assign(M * r.Kpad, 0);
  r.dx.assign(M * r.G, 0.f);
  r.qsum.assign(M * r.G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t g = 0; g * 32 < K; ++g) {
      int64_t k0 = g * 32, k1 = std::min(K, k0 + 32);
#if LMLAB_X86
      if (has_avx512_vnni() && !force_scalar()) {
        quantize_group_avx512(xr + k0, k1 - k0, &r.q[m * r.Kpad + k0], &r.dx[m * r.G + g], &r.qsum[m * r.G + g]);
        continue;
      }
#endif
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xr[k]));
      float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      int32_t s = 0;
      for (int64_t k = k0; k < k1; ++k) {
        int32_t v = (int32_t)std::nearbyint(xr[k] * id);
        v = std::max(-127, std::min(127, v));
        r.q[m * r.Kpad + k] = (int8_t)v;
        s += v;
      }
      r.dx[m * r.G + g] = d;
      r.qsum[m * r.G + g] = d * (float)s;
    }
  }
  return r;
}

template <typename T>
void store(T* y, float v) { *y = (T)v; }

// ================================================================== int4
void int4_scalar(const float* x, int64_t M, int64_t K, const uint8_t* packed, const float* scale,
                 const float* minimum, int64_t N, int64_t Kp, int64_t gs, float* y) {
  int64_t G = Kp / gs;
  at::parallel_for(0, N, grain_rows(Kp / 2), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = packed + n * (Kp / 2);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        float acc = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          float dot = 0.f, xs = 0.f;
          for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) {
            int code = (k & 1) ? (row[k >> 1] >> 4) : (row[k >> 1] & 15);
            dot += (float)code * xr[k];
            xs += xr[k];
          }
          acc += scale[n * G + g] * dot + minimum[n * G + g] * xs;
        }
        y[m * N + n] = acc;
      }
    }
  });
}

#if LMLAB_X86
#define LMLAB_AVX512_INLINE LMLAB_AVX512 __attribute__((always_inline)) inline

// Software prefetch of what a later row will read: decoding reads each weight once, from memory, and the
// hardware prefetcher alone leaves short rows (288 bytes for int4 at K = 576) waiting on memory latency.
constexpr int64_t PREFETCH_BYTES = 4096;
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = (const char*)p;
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}
inline int64_t rows_ahead(int64_t row_bytes) { return std::max<int64_t>(1, PREFETCH_BYTES / std::max<int64_t>(1, row_bytes)); }

// Where x's int4-path operands live: MB rows starting at row m0 (codes deinterleaved, per-lane dx, dx·Σq).
struct X4 {
  const int8_t *xe, *xo;
  const float *dxl, *qsum;
  int64_t xbytes, chunks, G;
};

// One 64-byte chunk c (128 columns, 4 groups) of a weight row against MB rows of x.
template <int MB>
LMLAB_AVX512_INLINE void int4_chunk(__m512 (&acc)[MB], __m512i w, __m512 s, const X4& X, int64_t c) {
  const __m512i low = _mm512_set1_epi8(15);
  __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
  for (int m = 0; m < MB; ++m) {
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(X.xe + m * X.xbytes + c * 64));
    d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(X.xo + m * X.xbytes + c * 64));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_loadu_ps(X.dxl + (m * X.chunks + c) * 16)), acc[m]);
  }
}

// Rows n0..n1 of the weight (group size 32) times MB rows of x; y points at the block's first output row.
template <int MB>
LMLAB_AVX512 void int4_rows_avx512(const X4& X, const uint8_t* packed, const float* scale, const float* minimum,
                                   int64_t Kp, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t G = Kp / 32, bytes = Kp / 2, full = bytes / 64, tail = bytes % 64;
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __mmask64 tail_bytes = tail ? (((__mmask64)1 << tail) - 1) : 0;
  const __mmask16 tail_groups = (__mmask16)((1u << ((tail + 15) / 16)) - 1);
  const int64_t ahead = rows_ahead(bytes + 8 * G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * bytes;
    if (n + ahead < n1) {
      prefetch(row + ahead * bytes, bytes);
      prefetch(scale + (n + ahead) * G, 4 * G);
      prefetch(minimum + (n + ahead) * G, 4 * G);
    }
    const float* sc = scale + n * G;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
      __m512 s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(sc + c * 4)));
      int4_chunk<MB>(acc, _mm512_loadu_si512(row + c * 64), s, X, c);
    }
    if (tail) {
      __m512 s = _mm512_permutexvar_ps(spread, _mm512_maskz_loadu_ps(tail_groups, sc + full * 4));
      int4_chunk<MB>(acc, _mm512_maskz_loadu_epi8(tail_bytes, row + full * 64), s, X, full);
    }
    const float* mn = minimum + n * G;
    for (int m = 0; m < MB; ++m) {  // + Σ_g minimum[n,g]·dx[g]·Σq[g]
      __m512 a = acc[m];
      for (int64_t g = 0; g < G; g += 16) {
        __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, mn + g), _mm512_maskz_loadu_ps(mk, X.qsum + m * X.G + g), a);
      }
      y[m * N + n] = _mm512_reduce_add_ps(a);
    }
  }
}

// The totals of 4 accumulators (W rows r0..r3) as one 4-lane vector: two rounds of 128-bit shuffles fold
// the 4×16 lanes into 4×4, then in-lane swaps finish each row's sum in lane 0 of its 128-bit quarter.
LMLAB_AVX512_INLINE __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
  z = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));
  z = _mm512_add_ps(z, _mm512_permute_ps(z, 0xB1));
  const __m512i firsts = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, z));
}

// As int4_rows_avx512, 4 weight rows at a time: x's operands are loaded once per chunk for 4 rows and the 4
// row totals are reduced together (reduce4); a per-row horizontal sum was a third of the work at K = 576.
// Rows past the last multiple of 4 take int4_rows_avx512.
template <int MB>
LMLAB_AVX512 void int4_rows4_avx512(const X4& X, const uint8_t* packed, const float* scale, const float* minimum,
                                    int64_t Kp, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t G = Kp / 32, bytes = Kp / 2, full = bytes / 64, tail = bytes % 64;
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i low = _mm512_set1_epi8(15);
  const __mmask64 tail_bytes = tail ? (((__mmask64)1 << tail) - 1) : 0;
  const __mmask16 tail_groups = (__mmask16)((1u << ((tail + 15) / 16)) - 1);
  const int64_t ahead = std::max<int64_t>(4, rows_ahead(bytes + 8 * G) / 4 * 4);
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    if (n + ahead + 4 <= n1) {
      prefetch(packed + (n + ahead) * bytes, 4 * bytes);
      prefetch(scale + (n + ahead) * G, 16 * G);
      prefetch(minimum + (n + ahead) * G, 16 * G);
    }
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c <= full; ++c) {
      if (c == full && !tail) break;
      const bool last = c == full;
      __m512i lo[4], hi[4];
      __m512 s[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const uint8_t* row = packed + (n + r) * bytes + c * 64;
        const float* sc = scale + (n + r) * G + c * 4;
        __m512i w = last ? _mm512_maskz_loadu_epi8(tail_bytes, row) : _mm512_loadu_si512(row);
        lo[r] = _mm512_and_si512(w, low);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        s[r] = _mm512_permutexvar_ps(spread, last ? _mm512_castps128_ps512(_mm_maskz_loadu_ps(tail_groups, sc))
                                                  : _mm512_castps128_ps512(_mm_loadu_ps(sc)));
      }
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const __m512i xe = _mm512_loadu_si512(X.xe + m * X.xbytes + c * 64);
        const __m512i xo = _mm512_loadu_si512(X.xo + m * X.xbytes + c * 64);
        const __m512 dx = _mm512_loadu_ps(X.dxl + (m * X.chunks + c) * 16);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], xe);
          d = _mm512_dpbusd_epi32(d, hi[r], xo);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s[r], dx), acc[m][r]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {  // + Σ_g minimum[n,g]·dx[g]·Σq[g]
      for (int64_t g = 0; g < G; g += 16) {
        __mmask16 mk = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        const __m512 qs = _mm512_maskz_loadu_ps(mk, X.qsum + m * X.G + g);
        for (int r = 0; r < 4; ++r)
          acc[m][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, minimum + (n + r) * G + g), qs, acc[m][r]);
      }
      _mm_storeu_ps(y + m * N + n, reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    }
  }
  if (n < n1) int4_rows_avx512<MB>(X, packed, scale, minimum, Kp, n, n1, N, y);
}
#endif

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     const at::Tensor& minimum, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && scale.dim() == 2 && minimum.dim() == 2, "int4_gemv: 2-D tensors");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "int4_gemv: packed must be uint8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && minimum.scalar_type() == at::kFloat, "int4_gemv: float32 scales");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_gemv: x float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), Kp = packed.size(1) * 2;
  TORCH_CHECK(group_size >= 2 && group_size % 2 == 0 && Kp % group_size == 0, "int4_gemv: bad group_size");
  TORCH_CHECK(K <= Kp && Kp - K < group_size, "int4_gemv: x has ", K, " columns, weight ", Kp);
  TORCH_CHECK(scale.size(0) == N && scale.size(1) == Kp / group_size && minimum.sizes() == scale.sizes(),
              "int4_gemv: scale/minimum shape");
  FloatX xf(x);
  at::Tensor p = packed.contiguous(), s = scale.contiguous(), mn = minimum.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return like_x(y, x);
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float *sp = s.data_ptr<float>(), *mp = mn.data_ptr<float>(), *xp = xf.p;
  float* yp = y.data_ptr<float>();
#if LMLAB_X86
  if (group_size == 32 && has_avx512_vnni() && !force_scalar()) {
    QuantX qx = quantize_x(xp, M, K, 128);
    const int64_t xbytes = qx.Kpad / 2, chunks = (Kp / 2 + 63) / 64;
    TORCH_CHECK(xbytes >= chunks * 64, "int4_gemv: internal padding");
    std::vector<int8_t> xe(M * xbytes), xo(M * xbytes);
    std::vector<float> dxl(M * chunks * 16, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      deinterleave_avx512(&qx.q[m * qx.Kpad], xbytes, &xe[m * xbytes], &xo[m * xbytes]);  // xbytes: 64s
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t l = 0; l < 16; ++l) {
          int64_t g = c * 4 + l / 4;
          dxl[(m * chunks + c) * 16 + l] = g < Kp / 32 ? qx.dx[m * qx.G + g] : 0.f;
        }
    }
    at::parallel_for(0, N, grain_rows(Kp / 2), [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // blocks of up to 4 rows of x share each weight load
        X4 X{xe.data() + m0 * xbytes, xo.data() + m0 * xbytes, dxl.data() + m0 * chunks * 16,
             qx.qsum.data() + m0 * qx.G, xbytes, chunks, qx.G};
        float* yb = yp + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: int4_rows4_avx512<1>(X, pp, sp, mp, Kp, n0, n1, N, yb); break;
          case 2: int4_rows4_avx512<2>(X, pp, sp, mp, Kp, n0, n1, N, yb); break;
          case 3: int4_rows4_avx512<3>(X, pp, sp, mp, Kp, n0, n1, N, yb); break;
          default: int4_rows4_avx512<4>(X, pp, sp, mp, Kp, n0, n1, N, yb); break;
        }
      }
    });
    return like_x(y, x);
  }
#endif
  int4_scalar(xp, M, K, pp, sp, mp, N, Kp, group_size, yp);
  return like_x(y, x);
}

// ================================================================== int8
#if LMLAB_X86
// int8: w ^ 0x80 = w + 128 read as unsigned, so vpdpbusd(w + 128, q) = Σ w·q + 128·Σq; the second term does
// not depend on the weight row: it is removed once per row of x (`bias`) after the float accumulation.
template <int MB>
LMLAB_AVX512_INLINE void int8_chunk(__m512 (&acc)[MB], __m512i w, const int8_t* xq, const float* dxl, int64_t Kpad,
                                    int64_t chunks, int64_t c) {
  __m512i wu = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80));
  for (int m = 0; m < MB; ++m) {
    __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(xq + m * Kpad + c * 64));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(dxl + (m * chunks + c) * 16), acc[m]);
  }
}

template <int MB>
LMLAB_AVX512 void int8_rows_avx512(const int8_t* xq, const float* dxl, const float* bias, int64_t Kpad,
                                   const int8_t* w, const float* scale, int64_t K, int64_t n0, int64_t n1,
                                   int64_t N, float* y) {
  const int64_t full = K / 64, tail = K % 64, chunks = Kpad / 64;
  const __mmask64 tail_bytes = tail ? (((__mmask64)1 << tail) - 1) : 0;
  const int64_t ahead = rows_ahead(K);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    if (n + ahead < n1) prefetch(row + ahead * K, K);
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; ++c) int8_chunk<MB>(acc, _mm512_loadu_si512(row + c * 64), xq, dxl, Kpad, chunks, c);
    // tail: masked-off weight bytes read 0 (+128 after the xor) but meet x's zero padding
    if (tail) int8_chunk<MB>(acc, _mm512_maskz_loadu_epi8(tail_bytes, row + full * 64), xq, dxl, Kpad, chunks, full);
    for (int m = 0; m < MB; ++m) y[m * N + n] = scale[n] * (_mm512_reduce_add_ps(acc[m]) - bias[m]);
  }
}
#endif

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && scale.dim() == 1, "int8_gemv: x, qweight 2-D, scale 1-D");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, "int8_gemv: int8 weight, float32 scale");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_gemv: x float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K && scale.size(0) == N, "int8_gemv: shapes");
  FloatX xf(x);
  at::Tensor q = qweight.contiguous(), s = scale.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return like_x(y, x);
  const int8_t* wp = q.data_ptr<int8_t>();
  const float *sp = s.data_ptr<float>(), *xp = xf.p;
  float* yp = y.data_ptr<float>();
#if LMLAB_X86
  if (has_avx512_vnni() && !force_scalar()) {
    QuantX qx = quantize_x(xp, M, K, 64);
    const int64_t chunks = qx.Kpad / 64;
    std::vector<float> dxl(M * chunks * 16), bias(M, 0.f);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t l = 0; l < 16; ++l) dxl[(m * chunks + c) * 16 + l] = qx.dx[m * qx.G + c * 2 + l / 8];
      for (int64_t g = 0; g < qx.G; ++g) bias[m] += 128.f * qx.qsum[m * qx.G + g];  // 128·Σ_g dx[g]·Σq[g]
    }
    at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int8_t* xq = qx.q.data() + m0 * qx.Kpad;
        const float *dl = dxl.data() + m0 * chunks * 16, *b = bias.data() + m0;
        float* yb = yp + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: int8_rows_avx512<1>(xq, dl, b, qx.Kpad, wp, sp, K, n0, n1, N, yb); break;
          case 2: int8_rows_avx512<2>(xq, dl, b, qx.Kpad, wp, sp, K, n0, n1, N, yb); break;
          case 3: int8_rows_avx512<3>(xq, dl, b, qx.Kpad, wp, sp, K, n0, n1, N, yb); break;
          default: int8_rows_avx512<4>(xq, dl, b, qx.Kpad, wp, sp, K, n0, n1, N, yb); break;
        }
      }
    });
    return like_x(y, x);
  }
#endif
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += (float)wp[n * K + k] * xp[m * K + k];
        yp[m * N + n] = sp[n] * acc;
      }
  });
  return like_x(y, x);
}

// ================================================================== bfloat16 and float32
#if LMLAB_X86
LMLAB_AVX512 inline __m512bh load_bf16(const at::BFloat16* p, __mmask32 mk) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mk, p);
}

// x: M × K bfloat16; 4 rows of W per step
// R rows of x against the 4 rows of W at w (N×K; output columns n..n+3): 4·R accumulators, so each load of W
// serves R rows of x (a verification pass of a few tokens reads W once and pays little more than one row).
// With more than one row of x (PF), each step also prefetches the same 64 bytes of the next block's 4 rows
// (pf): memory keeps streaming while the block computes. (Measured, Qwen2.5 1.5B shapes, 2 threads, AMD
// EPYC: a 4-row product took 1.2–1.3× a one-row one with a burst of prefetches per block, 1.0–1.1× with
// these; a 3-token verification pass of the whole model went from 1.55× a compiled one-token step to 1.06×.
// One row keeps a burst of prefetches a block ahead: with the per-step ones SmolLM2's one-row bf16 products
// at K = 576 took 1.2–1.5× longer.)
template <int R, bool PF>
LMLAB_AVX512 inline void bf16_block(const at::BFloat16* x, const at::BFloat16* w, int64_t K, int64_t steps,
                                    __mmask32 tail, float* y, int64_t N, const at::BFloat16* pf) {
  __m512 a[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
    const __mmask32 mk = i == steps - 1 ? tail : ~(__mmask32)0;
    if (PF) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) _mm_prefetch((const char*)(pf + j * K + i * 32), _MM_HINT_T0);
    }
    __m512bh wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = load_bf16(w + j * K + i * 32, mk);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
      const __m512bh xv = load_bf16(x + r * K + i * 32, mk);
  #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], wv[j], xv);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) y[r * N + j] = _mm512_reduce_add_ps(a[r][j]);
}

template <int R, bool PF>
LMLAB_AVX512 inline void f32_block(const float* x, const float* w, int64_t K, int64_t steps, __mmask16 tail,
                                   float* y, int64_t N, const float* pf) {
  __m512 a[R][4];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < steps; ++i) {
    const __mmask16 mk = i == steps - 1 ? tail : (__mmask16)0xFFFF;
    if (PF) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) _mm_prefetch((const char*)(pf + j * K + i * 16), _MM_HINT_T0);
    }
    __m512 wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_ps(mk, w + j * K + i * 16);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + r * K + i * 16);
  #pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) a[r][j] = _mm512_fmadd_ps(wv[j], xv, a[r][j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) y[r * N + j] = _mm512_reduce_add_ps(a[r][j]);
}

LMLAB_AVX512 void bf16_rows_avx512(const at::BFloat16* x, int64_t M, const at::BFloat16* w, int64_t K,
                                   int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t steps = (K + 31) / 32;
  const __mmask32 tail = (K % 32) ? (__mmask32)((1u << (K % 32)) - 1) : ~(__mmask32)0;
  const int64_t ahead = (rows_ahead(2 * K) + 3) / 4 * 4;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const at::BFloat16* r0 = w + n * K;
    const at::BFloat16* pf = w + std::min(n + 4, n1 - 4) * K;
    if (M == 1) {
      if (n + ahead + 4 <= n1) prefetch(w + (n + ahead) * K, 8 * K);
      bf16_block<1, false>(x, r0, K, steps, tail, y + n, N, pf);
      continue;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) bf16_block<4, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf);
    if (M - m == 3) { bf16_block<3, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf); m += 3; }
    for (; m + 2 <= M; m += 2) bf16_block<2, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf);
    for (; m < M; ++m) bf16_block<1, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = 0; i < steps; ++i) {
        __mmask32 mk = i == steps - 1 ? tail : ~(__mmask32)0;
        a = _mm512_dpbf16_ps(a, load_bf16(w + n * K + i * 32, mk), load_bf16(x + m * K + i * 32, mk));
      }
      y[m * N + n] = _mm512_reduce_add_ps(a);
    }
}

LMLAB_AVX512 void f32_rows_avx512(const float* x, int64_t M, const float* w, int64_t K, int64_t n0, int64_t n1,
                                  int64_t N, float* y) {
  const int64_t steps = (K + 15) / 16;
  const __mmask16 tail = (K % 16) ? (__mmask16)((1u << (K % 16)) - 1) : (__mmask16)0xFFFF;
  const int64_t ahead = (rows_ahead(4 * K) + 3) / 4 * 4;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* r0 = w + n * K;
    const float* pf = w + std::min(n + 4, n1 - 4) * K;
    if (M == 1) {
      if (n + ahead + 4 <= n1) prefetch(w + (n + ahead) * K, 16 * K);
      f32_block<1, false>(x, r0, K, steps, tail, y + n, N, pf);
      continue;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f32_block<4, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf);
    if (M - m == 3) { f32_block<3, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf); m += 3; }
    for (; m + 2 <= M; m += 2) f32_block<2, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf);
    for (; m < M; ++m) f32_block<1, true>(x + m * K, r0, K, steps, tail, y + m * N + n, N, pf);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = 0; i < steps; ++i) {
        __mmask16 mk = i == steps - 1 ? tail : (__mmask16)0xFFFF;
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + n * K + i * 16), _mm512_maskz_loadu_ps(mk, x + m * K + i * 16), a);
      }
      y[m * N + n] = _mm512_reduce_add_ps(a);
    }
}
#endif

// the plain path of the dense kernels: y[m, n] = Σ_k w[n, k]·x[m, k], accumulated in float32
template <typename T>
void dense_scalar(const T* xp, int64_t M, const T* wp, int64_t K, int64_t N, float* yp) {
  at::parallel_for(0, N, grain_rows(sizeof(T) * K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(wp[n * K + k]) * static_cast<float>(xp[m * K + k]);
        yp[m * N + n] = acc;
      }
  });
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1), "bf16_gemv: x M×K, w N×K");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bf16_gemv: w must be bfloat16");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "bf16_gemv: x float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor xb = x.to(at::kBFloat16).contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return like_x(y, x);
  const at::BFloat16 *xp = xb.data_ptr<at::BFloat16>(), *wp = wc.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
#if LMLAB_X86
  if (has_avx512_bf16() && !force_scalar()) {
    at::parallel_for(0, N, grain_rows(2 * K), [&](int64_t n0, int64_t n1) { bf16_rows_avx512(xp, M, wp, K, n0, n1, N, yp); });
    return like_x(y, x);
  }
#endif
  dense_scalar(xp, M, wp, K, N, yp);
  return like_x(y, x);
}

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1), "f32_gemv: x M×K, w N×K");
  TORCH_CHECK(w.scalar_type() == at::kFloat, "f32_gemv: w must be float32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "f32_gemv: x float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  FloatX xf(x);
  at::Tensor wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return like_x(y, x);
  const float *xp = xf.p, *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if LMLAB_X86
  if (has_avx512_vnni() && !force_scalar()) {
    at::parallel_for(0, N, grain_rows(4 * K), [&](int64_t n0, int64_t n1) { f32_rows_avx512(xp, M, wp, K, n0, n1, N, yp); });
    return like_x(y, x);
  }
#endif
  dense_scalar(xp, M, wp, K, N, yp);
  return like_x(y, x);
}

// ================================================================== one-query attention
// attend_cached(q B×H×T×D, k/v B×KV×S×D, allowed B×T×S bool, scale) → B×H×T×D: the attention of a decoding
// step (T = 1) or verification pass (a few T) over its static cache, reading only the slots `allowed` marks (the compiled step's cache holds every
// slot up to max_len; the written-out attention reads all of them). Query heads h·KV/H share key/value
// head h/(H/KV). float32 or bfloat16 q/k/v, computed in float32: scores, max-subtracted exp, weighted sum.
template <typename T>
void attend_scalar(const float* q, const T* k, const T* v, const int32_t* slots, int64_t L, int64_t G, int64_t D,
                   float* scores, float* out) {  // q, out: G heads × D (q scaled)
  for (int64_t g = 0; g < G; ++g) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      float d = 0.f;
      for (int64_t i = 0; i < D; ++i) d += q[g * D + i] * static_cast<float>(k[slots[j] * D + i]);
      scores[g * L + j] = d;
      mx = std::max(mx, d);
    }
    for (int64_t j = 0; j < L; ++j) sum += scores[g * L + j] = std::exp(scores[g * L + j] - mx);
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = 0.f;
    for (int64_t j = 0; j < L; ++j)
      for (int64_t i = 0; i < D; ++i) out[g * D + i] += scores[g * L + j] / sum * static_cast<float>(v[slots[j] * D + i]);
  }
}

#if LMLAB_X86
LMLAB_AVX512_INLINE __m512 load_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LMLAB_AVX512_INLINE __m512 load_f32(const at::BFloat16* p, __mmask16 m) {  // bfloat16 = the top half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// e^x for x <= 0 (max-subtracted scores): 2^n · p(r), x = n·ln2 + r, |r| <= ln2/2, p of degree 6 (rel. error ~1e-7)
LMLAB_AVX512_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t AHEAD = 8;  // slots read ahead (software prefetch)

// STEPS = ⌈D/16⌉ vectors per head row (the last one masked by `tail`): scores 4 slots at a time, their sums
// reduced together (reduce4); the output of each head accumulated in registers.
template <typename T, int STEPS>
LMLAB_AVX512 void attend_avx512(const float* q, const T* k, const T* v, const int32_t* slots, int64_t L, int64_t G,
                                int64_t D, float* scores, float* out) {
  const __mmask16 tail = D % 16 ? (__mmask16)((1u << (D % 16)) - 1) : (__mmask16)0xFFFF;
  auto mask = [&](int i) { return i == STEPS - 1 ? tail : (__mmask16)0xFFFF; };
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) {
    const T* kr[4] = {k + slots[j] * D, k + slots[j + 1] * D, k + slots[j + 2] * D, k + slots[j + 3] * D};
    if (j + AHEAD + 4 <= L)  // the cache comes from memory (a step streams the weights through every cache level)
      for (int r = 0; r < 4; ++r) {
        prefetch(k + slots[j + AHEAD + r] * D, D * (int64_t)sizeof(T));
        prefetch(v + slots[j + AHEAD + r] * D, D * (int64_t)sizeof(T));  // for the weighted sum after the scores
      }
    for (int64_t g = 0; g < G; ++g) {
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#pragma GCC unroll 8
      for (int i = 0; i < STEPS; ++i) {
        const __m512 qi = _mm512_maskz_loadu_ps(mask(i), q + g * D + i * 16);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) a[r] = _mm512_fmadd_ps(load_f32(kr[r] + i * 16, mask(i)), qi, a[r]);
      }
      _mm_storeu_ps(scores + g * L + j, reduce4(a[0], a[1], a[2], a[3]));
    }
  }
  for (; j < L; ++j)
    for (int64_t g = 0; g < G; ++g) {
      __m512 a = _mm512_setzero_ps();
      for (int i = 0; i < STEPS; ++i)
        a = _mm512_fmadd_ps(load_f32(k + slots[j] * D + i * 16, mask(i)), _mm512_maskz_loadu_ps(mask(i), q + g * D + i * 16), a);
      scores[g * L + j] = _mm512_reduce_add_ps(a);
    }
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * L;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 m = L - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, sc + j));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 m = L - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), top)));
      _mm512_mask_storeu_ps(sc + j, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    __m512 o[STEPS];
    for (int i = 0; i < STEPS; ++i) o[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      const T* vr = v + slots[j] * D;
      const __m512 p = _mm512_set1_ps(sc[j]);
#pragma GCC unroll 8
      for (int i = 0; i < STEPS; ++i) o[i] = _mm512_fmadd_ps(p, load_f32(vr + i * 16, mask(i)), o[i]);
    }
    for (int i = 0; i < STEPS; ++i) _mm512_mask_storeu_ps(out + g * D + i * 16, mask(i), _mm512_mul_ps(o[i], inv));
  }
}

template <typename T>
LMLAB_AVX512 bool attend_fast(const float* q, const T* k, const T* v, const int32_t* slots, int64_t L, int64_t G,
                              int64_t D, float* scores, float* out) {
  switch ((D + 15) / 16) {
    case 1: attend_avx512<T, 1>(q, k, v, slots, L, G, D, scores, out); return true;
    case 2: attend_avx512<T, 2>(q, k, v, slots, L, G, D, scores, out); return true;
    case 3: attend_avx512<T, 3>(q, k, v, slots, L, G, D, scores, out); return true;
    case 4: attend_avx512<T, 4>(q, k, v, slots, L, G, D, scores, out); return true;
    case 5: attend_avx512<T, 5>(q, k, v, slots, L, G, D, scores, out); return true;
    case 6: attend_avx512<T, 6>(q, k, v, slots, L, G, D, scores, out); return true;
    case 7: attend_avx512<T, 7>(q, k, v, slots, L, G, D, scores, out); return true;
    case 8: attend_avx512<T, 8>(q, k, v, slots, L, G, D, scores, out); return true;
    default: return false;  // heads over 128 wide: the scalar path
  }
}
#endif

// q (B×H×T×D, any strides, last dim contiguous) and k/v (contiguous) of one dtype T; out B×H×T×D contiguous, T.
template <typename T>
void attend_heads(const at::Tensor& q, double scale, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                  at::Tensor& out) {
  const int64_t B = k.size(0), KV = k.size(1), S = k.size(2), D = k.size(3), H = q.size(1), T_ = q.size(2);
  const int64_t G = H / KV;
  const bool* ok = allowed.data_ptr<bool>();
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::vector<int32_t> all(B * T_ * S);  // per row and query: the slots it may see, packed from its start
  std::vector<int64_t> count(B * T_, 0);
  int64_t work = 0;
  for (int64_t r = 0; r < B * T_; ++r) {
    for (int64_t s = 0; s < S; ++s)
      if (ok[r * S + s]) all[r * S + count[r]++] = (int32_t)s;
    work += count[r] * KV * D;
  }
  auto task = [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(G * std::max<int64_t>(S, 4)), qbuf(G * D), obuf(G * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KV, h = task % KV;
      const T *kh = kp + (b * KV + h) * S * D, *vh = vp + (b * KV + h) * S * D;
      for (int64_t t = 0; t < T_; ++t) {
        for (int64_t g = 0; g < G; ++g) {  // this query's G heads, scaled, as float32
          const T* src = qp + b * q.stride(0) + (h * G + g) * q.stride(1) + t * q.stride(2);
          for (int64_t i = 0; i < D; ++i) qbuf[g * D + i] = static_cast<float>(src[i]) * (float)scale;
        }
        const int32_t* sl = all.data() + (b * T_ + t) * S;
        const int64_t L = count[b * T_ + t];
        bool done = false;
#if LMLAB_X86
        if (has_avx512_vnni() && !force_scalar())
          done = attend_fast(qbuf.data(), kh, vh, sl, L, G, D, scores.data(), obuf.data());
#endif
        if (!done) attend_scalar(qbuf.data(), kh, vh, sl, L, G, D, scores.data(), obuf.data());
        for (int64_t g = 0; g < G; ++g) {
          T* dst = op + ((b * H + h * G + g) * T_ + t) * D;
          for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(obuf[g * D + i]);
        }
      }
    }
  };
  if (work * G < (1 << 21)) task(0, B * KV);  // under ~50 µs of work: waking threads costs more than it saves
  else at::parallel_for(0, B * KV, 1, task);
}

at::Tensor attend_cached(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed,
                         double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "attend_cached: q B×H×T×D, k/v B×KV×S×D");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0, "attend_cached: shapes");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "attend_cached: k/v float32 or bfloat16");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.numel() == q.size(0) * q.size(2) * k.size(2),
              "attend_cached: allowed B×T×S bool");
  at::Tensor qc = q.scalar_type() == k.scalar_type() && q.stride(3) == 1 ? q : q.to(k.scalar_type()).contiguous();
  at::Tensor kc = k.contiguous(), vc = v.contiguous(), ok = allowed.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(k.scalar_type()));
  if (k.scalar_type() == at::kFloat) attend_heads<float>(qc, scale, kc, vc, ok, out);
  else attend_heads<at::BFloat16>(qc, scale, kc, vc, ok, out);
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

// ================================================================== causal attention of a prompt (bfloat16)
// causal_attention(q B×H×T×D, k/v B×KV×S×D, scale) → B×H×T×D, S ≥ T: the T queries are the last T positions of
// the S keys (a prompt, or a chunk of one after earlier chunks), query t seeing keys 0..S−T+t. bfloat16 in and
// out; scores, softmax and the output accumulate in float32, the probabilities are rounded to bfloat16 for the
// second product (as PyTorch's flash attention does). Flash-style, with vdpbf16ps for both products:
//   K is repacked per head as blocks of 16 keys × D/2 column pairs (one 32-bit pair of each key per lane), so a
//   broadcast pair of a query against one block gives 16 scores; V as pairs of keys interleaved per column, so
//   a broadcast pair of probabilities against it adds two keys' worth to 16 output columns.
//   R query rows (consecutive positions of one head) share every load of K and V; keys go by 32, with a
//   running max, a vector of running sums and the rescaled output (online softmax).
// Work is split over (row, head, tile of 32 queries) tasks ordered longest with shortest (causal tiles grow).
template <typename T>
void causal_scalar(const T* q, int64_t qs, const T* k, const T* v, int64_t kvs, int64_t T_, int64_t S, int64_t D,
                   float scale, T* out, int64_t os) {  // one head: q rows at stride qs, k/v rows at kvs, out at os
  std::vector<float> sc(S);
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t L = S - T_ + t + 1;
    float mx = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      float d = 0.f;
      for (int64_t i = 0; i < D; ++i) d += (float)q[t * qs + i] * (float)k[j * kvs + i];
      sc[j] = d * scale;
      mx = std::max(mx, sc[j]);
    }
    for (int64_t j = 0; j < L; ++j) sum += sc[j] = std::exp(sc[j] - mx);
    for (int64_t i = 0; i < D; ++i) {
      float o = 0.f;
      for (int64_t j = 0; j < L; ++j) o += sc[j] * (float)v[j * kvs + i];
      out[t * os + i] = (T)(o / sum);
    }
  }
}

#if LMLAB_X86
// K of one head (S rows at stride kvs, D columns) → kp: ⌈S/32⌉·2 blocks of [D/2 pairs][16 keys] 32-bit words,
// zeros past S; V → vp: ⌈S/32⌉·16 key pairs of [D columns][2 keys] bfloat16, zeros past S.
LMLAB_AVX512 void pack_kv(const at::BFloat16* k, const at::BFloat16* v, int64_t kvs, int64_t S, int64_t D,
                          int32_t* kp, at::BFloat16* vp) {
  const int64_t Sp = (S + 31) / 32 * 32, P = D / 2;
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)(kvs / 2)));
  for (int64_t b = 0; b < Sp / 16; ++b) {
    const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, S - b * 16));
    const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    const int32_t* base = (const int32_t*)(k + b * 16 * kvs);
    for (int64_t p = 0; p < P; ++p)
      _mm512_storeu_si512(kp + (b * P + p) * 16, n ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, lanes, base + p, 4)
                                                   : _mm512_setzero_si512());
  }
  // out[2i] = a[i], out[2i+1] = b[i]: the first 16 columns of two keys, then the next 16
  __m512i lo_idx, hi_idx;
  {
    alignas(64) int16_t l[32], h[32];
    for (int i = 0; i < 16; ++i) { l[2 * i] = i; l[2 * i + 1] = 32 + i; h[2 * i] = 16 + i; h[2 * i + 1] = 48 + i; }
    lo_idx = _mm512_load_si512(l);
    hi_idx = _mm512_load_si512(h);
  }
  for (int64_t j = 0; j < Sp / 2; ++j) {
    at::BFloat16* dst = vp + j * 2 * D;
    for (int64_t c = 0; c < D; c += 32) {
      const __m512i a = 2 * j < S ? _mm512_loadu_si512(v + 2 * j * kvs + c) : _mm512_setzero_si512();
      const __m512i b = 2 * j + 1 < S ? _mm512_loadu_si512(v + (2 * j + 1) * kvs + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, lo_idx, b));
      _mm512_storeu_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

// R query rows t0..t0+R−1 of one head; DV = D/16 output vectors per row.
template <int R, int DV>
LMLAB_AVX512 void causal_rows(const at::BFloat16* q, int64_t qs, const int32_t* kp, const at::BFloat16* vp, int64_t t0,
                              int64_t off, float scale, at::BFloat16* out, int64_t os) {
  constexpr int P = DV * 8, D = DV * 16;  // column pairs, columns
  const int64_t end = off + t0 + R;  // keys the last row sees
  float m[R];
  __m512 l[R], o[R][DV];
  const int32_t* qw[R];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = _mm512_setzero_ps();
    for (int i = 0; i < DV; ++i) o[r][i] = _mm512_setzero_ps();
    qw[r] = (const int32_t*)(q + (t0 + r) * qs);
  }
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  alignas(64) int32_t pb[R][16];  // each row's 32 probabilities as bfloat16 pairs
  for (int64_t j0 = 0; j0 < end; j0 += 32) {
    const int32_t* kb = kp + (j0 / 16) * P * 16;
    __m512 s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kb + p * 16), k1 = (__m512bh)_mm512_loadu_si512(kb + (P + p) * 16);
      for (int r = 0; r < R; ++r) {
        const __m512bh qq = (__m512bh)_mm512_set1_epi32(qw[r][p]);
        s[r][0] = _mm512_dpbf16_ps(s[r][0], qq, k0);
        s[r][1] = _mm512_dpbf16_ps(s[r][1], qq, k1);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t L = off + t0 + r + 1 - j0;  // keys this row sees in the block
      const __mmask16 m0 = L >= 16 ? (__mmask16)0xFFFF : L <= 0 ? (__mmask16)0 : _mm512_cmplt_epi32_mask(iota, _mm512_set1_epi32((int)L));
      const __mmask16 m1 = L >= 32 ? (__mmask16)0xFFFF : L <= 16 ? (__mmask16)0 : _mm512_cmplt_epi32_mask(iota, _mm512_set1_epi32((int)(L - 16)));
      const __m512 a = _mm512_mul_ps(s[r][0], _mm512_set1_ps(scale)), b = _mm512_mul_ps(s[r][1], _mm512_set1_ps(scale));
      const __m512 ninf = _mm512_set1_ps(-INFINITY);
      const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(ninf, m0, a), _mm512_mask_mov_ps(ninf, m1, b)));
      const float mn = std::max(m[r], top);
      if (mn > m[r]) {
        const __m512 alpha = _mm512_set1_ps(std::exp(m[r] - mn));
        l[r] = _mm512_mul_ps(l[r], alpha);
        for (int i = 0; i < DV; ++i) o[r][i] = _mm512_mul_ps(o[r][i], alpha);
        m[r] = mn;
      }
      const __m512 mv = _mm512_set1_ps(m[r]);
      const __m512 e0 = _mm512_maskz_mov_ps(m0, exp_ps(_mm512_sub_ps(a, mv)));
      const __m512 e1 = _mm512_maskz_mov_ps(m1, exp_ps(_mm512_sub_ps(b, mv)));
      l[r] = _mm512_add_ps(l[r], _mm512_add_ps(e0, e1));
      _mm512_store_si512(pb[r], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
    const at::BFloat16* vb = vp + j0 * D;  // 16 key pairs × D × 2
    const int64_t pairs = std::min<int64_t>(16, (end - j0 + 1) / 2);
    for (int64_t jp = 0; jp < pairs; ++jp) {
      __m512bh vv[DV];
      for (int i = 0; i < DV; ++i) vv[i] = (__m512bh)_mm512_loadu_si512(vb + jp * 2 * D + i * 32);
      for (int r = 0; r < R; ++r) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(pb[r][jp]);
        for (int i = 0; i < DV; ++i) o[r][i] = _mm512_dpbf16_ps(o[r][i], pp, vv[i]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(l[r]));
    at::BFloat16* dst = out + (t0 + r) * os;
    for (int i = 0; i < DV; ++i)
      _mm256_storeu_si256((__m256i*)(dst + i * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][i], inv)));
  }
}

template <int DV>
LMLAB_AVX512 void causal_tile(const at::BFloat16* q, int64_t qs, const int32_t* kp, const at::BFloat16* vp, int64_t t0,
                              int64_t t1, int64_t off, float scale, at::BFloat16* out, int64_t os) {
  constexpr int R = DV <= 4 ? 4 : 2;  // 4·DV output vectors in registers at D ≤ 64
  int64_t t = t0;
  for (; t + R <= t1; t += R) causal_rows<R, DV>(q, qs, kp, vp, t, off, scale, out, os);
  for (; t < t1; ++t) causal_rows<1, DV>(q, qs, kp, vp, t, off, scale, out, os);
}

LMLAB_AVX512 bool causal_fast(const at::BFloat16* q, int64_t qs, const int32_t* kp, const at::BFloat16* vp, int64_t t0,
                              int64_t t1, int64_t off, int64_t D, float scale, at::BFloat16* out, int64_t os) {
  switch (D) {
    case 32: causal_tile<2>(q, qs, kp, vp, t0, t1, off, scale, out, os); return true;
    case 64: causal_tile<4>(q, qs, kp, vp, t0, t1, off, scale, out, os); return true;
    case 96: causal_tile<6>(q, qs, kp, vp, t0, t1, off, scale, out, os); return true;
    case 128: causal_tile<8>(q, qs, kp, vp, t0, t1, off, scale, out, os); return true;
    default: return false;
  }
}
#endif

bool causal_fast_here(int64_t D) {
  return has_avx512_bf16() && !force_scalar() && (D == 32 || D == 64 || D == 96 || D == 128);
}

constexpr int64_t CAUSAL_TILE = 32;  // query rows per task

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "causal_attention: q B×H×T×D, k/v B×KV×S×D");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0 && k.size(2) >= q.size(2),
              "causal_attention: shapes (S ≥ T, H a multiple of KV)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "causal_attention: bfloat16 q/k/v");
  const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2), G = H / KV;
  const int64_t off = S - T_;
  // inputs with contiguous rows, rows of a head at a fixed stride (views of a fused projection or a cache keep theirs)
  auto rows_ok = [](const at::Tensor& x) { return x.stride(3) == 1 && x.stride(2) % 2 == 0; };
  at::Tensor qc = rows_ok(q) ? q : q.contiguous(), kc = rows_ok(k) ? k : k.contiguous(), vc = rows_ok(v) ? v : v.contiguous();
  if (kc.stride(2) != vc.stride(2)) kc = k.contiguous(), vc = v.contiguous();  // one row stride for both
  // the output in B×T×H×D memory (what the projection after attention reads), viewed as B×H×T×D
  at::Tensor out = at::empty({B, T_, H, D}, q.options()).transpose(1, 2);
  const at::BFloat16 *qp = qc.data_ptr<at::BFloat16>(), *kp = kc.data_ptr<at::BFloat16>(), *vp = vc.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t qs = qc.stride(2), kvs = kc.stride(2), os = out.stride(2);
  const bool fast = causal_fast_here(D);
  const int64_t tiles = (T_ + CAUSAL_TILE - 1) / CAUSAL_TILE;
  if (!fast) {
    at::parallel_for(0, B * H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t bh = h0; bh < h1; ++bh) {
        const int64_t b = bh / H, h = bh % H, kh = h / G;
        causal_scalar(qp + b * qc.stride(0) + h * qc.stride(1), qs, kp + b * kc.stride(0) + kh * kc.stride(1),
                      vp + b * vc.stride(0) + kh * vc.stride(1), kvs, T_, S, D, (float)scale,
                      op + b * out.stride(0) + h * out.stride(1), os);
      }
    });
    return out;
  }
#if LMLAB_X86
  const int64_t Sp = (S + 31) / 32 * 32;
  std::vector<int32_t> kpack(B * KV * Sp * D / 2);
  std::vector<at::BFloat16> vpack(B * KV * Sp * D);
  at::parallel_for(0, B * KV, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / KV, h = bh % KV;
      pack_kv(kp + b * kc.stride(0) + h * kc.stride(1), vp + b * vc.stride(0) + h * vc.stride(1), kvs, S, D,
              kpack.data() + bh * Sp * D / 2, vpack.data() + bh * Sp * D);
    }
  });
  const int64_t n = B * H * tiles;
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = i % 2 ? n - 1 - i / 2 : i / 2;  // a long tile, a short one, ...: even shares per thread
      const int64_t bh = j / tiles, tile = j % tiles, b = bh / H, h = bh % H, kvh = b * KV + h / G;
      const int64_t t0 = tile * CAUSAL_TILE, t1 = std::min(T_, t0 + CAUSAL_TILE);
      causal_fast(qp + b * qc.stride(0) + h * qc.stride(1), qs, kpack.data() + kvh * Sp * D / 2, vpack.data() + kvh * Sp * D,
                  t0, t1, off, D, (float)scale, op + b * out.stride(0) + h * out.stride(1), os);
    }
  });
#endif
  return out;
}

// whether causal_attention takes its vectorized path for heads D wide here (else a slow scalar loop: callers
// then prefer PyTorch's attention)
bool causal_attention_fast(int64_t D) { return causal_fast_here(D); }

// which code path the integer kernels take here: "avx512" or "scalar"
std::string isa() { return has_avx512_vnni() && !force_scalar() ? "avx512" : "scalar"; }

}  // namespace

TORCH_LIBRARY(lmlab, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scale, Tensor minimum, int group_size) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("attend_cached(Tensor q, Tensor k, Tensor v, Tensor allowed, float scale) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("causal_attention_fast(int head_dim) -> bool", &causal_attention_fast);
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("bf16_gemv", &bf16_gemv);
  m.impl("f32_gemv", &f32_gemv);
  m.impl("attend_cached", &attend_cached);
  m.impl("causal_attention", &causal_attention);
}
