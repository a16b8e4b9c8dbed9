// The exact (erf) GELU and its gradient on a CPU, for the MLP of a training step: GELU(x) = x Phi(x), with
// slope Phi(x) + x phi(x). As model._OneExpGELU does in torch ops, Phi comes from Abramowitz & Stegun 7.1.26,
// whose exp(-x^2 / 2) phi reuses; here the A&S reciprocal is a 14-bit estimate refined by one Newton step
// instead of a division, and exp is numerics.h's polynomial. What inductor generates from the torch ops
// spends most of its time in Sleef's exp and a vector division (benchmarks/RESULTS.md).
//
// Storage fp32 or bf16 (as uint16_t), arithmetic fp32; OpenMP over 16-element pieces.
#include <cmath>
#include <cstdint>

#include "numerics.h"

namespace {

using namespace vitscope;

constexpr float SQRT_HALF = 0.70710678118654752f, INV_SQRT_2PI = 0.39894228040143268f;
constexpr float AS_P = 0.3275911f;
constexpr float AS_A[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};

// Phi(x) and exp(-x^2 / 2), one element
inline void cdf_and_exp(float x, float& cdf, float& e) {
    const float z = std::fabs(x) * SQRT_HALF;
    const float t = 1.0f / (1.0f + AS_P * z);
    e = exp_nonpositive(-z * z);
    const float tail = 0.5f * t * (AS_A[0] + t * (AS_A[1] + t * (AS_A[2] + t * (AS_A[3] + t * AS_A[4])))) * e;
    cdf = x >= 0.0f ? 1.0f - tail : tail;
}

inline float gelu(float x) {
    float cdf, e;
    cdf_and_exp(x, cdf, e);
    return x * cdf;
}

inline float gelu_gradient(float x, float grad) {
    float cdf, e;
    cdf_and_exp(x, cdf, e);
    return grad * (cdf + x * e * INV_SQRT_2PI);
}

#if defined(__AVX512F__)
inline void cdf_and_exp(__m512 x, __m512& cdf, __m512& e) {
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(SQRT_HALF));
    const __m512 d = _mm512_fmadd_ps(_mm512_set1_ps(AS_P), z, _mm512_set1_ps(1.0f));
    __m512 t = _mm512_rcp14_ps(d);  // 1 / d to 2^-14, then to ~2^-23 by one Newton step
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(d, t, _mm512_set1_ps(2.0f)));
    e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
    __m512 p = _mm512_set1_ps(AS_A[4]);
    for (int k = 3; k >= 0; --k) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(AS_A[k]));
    const __m512 tail = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(0.5f)), e);
    const __mmask16 nonnegative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
    cdf = _mm512_mask_blend_ps(nonnegative, tail, _mm512_sub_ps(_mm512_set1_ps(1.0f), tail));
}

inline __m512 gelu(__m512 x) {
    __m512 cdf, e;
    cdf_and_exp(x, cdf, e);
    return _mm512_mul_ps(x, cdf);
}

inline __m512 gelu_gradient(__m512 x, __m512 grad) {
    __m512 cdf, e;
    cdf_and_exp(x, cdf, e);
    return _mm512_mul_ps(grad, _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(INV_SQRT_2PI), cdf));
}
#endif

template <typename T>
void forward(const T* x, int64_t n, T* y) {
    const int64_t whole = n / 16 * 16;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < whole; i += 16) {
#if defined(__AVX512F__)
        store16(y + i, gelu(load16(x + i)));
#else
        for (int64_t k = i; k < i + 16; ++k) store(y + k, gelu(load(x + k)));
#endif
    }
    for (int64_t k = whole; k < n; ++k) store(y + k, gelu(load(x + k)));
}

template <typename T>
void backward(const T* x, const T* grad, int64_t n, T* grad_x) {
    const int64_t whole = n / 16 * 16;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < whole; i += 16) {
#if defined(__AVX512F__)
        store16(grad_x + i, gelu_gradient(load16(x + i), load16(grad + i)));
#else
        for (int64_t k = i; k < i + 16; ++k) store(grad_x + k, gelu_gradient(load(x + k), load(grad + k)));
#endif
    }
    for (int64_t k = whole; k < n; ++k) store(grad_x + k, gelu_gradient(load(x + k), load(grad + k)));
}

}  // namespace

extern "C" {

// x and y: n contiguous elements, fp32 or (bf16 != 0) bf16
void vitscope_gelu_forward(const void* x, int64_t n, void* y, int bf16) {
    if (bf16) forward(static_cast<const uint16_t*>(x), n, static_cast<uint16_t*>(y));
    else forward(static_cast<const float*>(x), n, static_cast<float*>(y));
}

// the gradient of GELU's input, from its input x and its output's gradient, all of one dtype
void vitscope_gelu_backward(const void* x, const void* grad, int64_t n, void* grad_x, int bf16) {
    if (bf16) backward(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(grad), n, static_cast<uint16_t*>(grad_x));
    else backward(static_cast<const float*>(x), static_cast<const float*>(grad), n, static_cast<float*>(grad_x));
}

}  // extern "C"
