// The exact (erf) GELU and its gradient on a CPU, for the MLP of a training step: GELU(x) = x Phi(x), with
// slope Phi(x) + x phi(x). As fastpath.OneExpGELU does in torch ops, Phi comes from Abramowitz & Stegun 7.1.26,
// whose exp(-x^2 / 2) phi reuses; here the A&S reciprocal is a 14-bit estimate refined by one Newton step
// instead of a division, and exp is numerics.h's polynomial. What inductor generates from the torch ops
// spends most of its time in Sleef's exp and a vector division (docs/performance.md#gelu-kernel).
//
// The GELU of a linear layer's output takes the layer's bias too, so the layer can be a plain matmul: ATen's
// addmm with a bias first copies the bias into every row of its output and then adds the product to it, two
// more passes over a (tokens, 512) tensor; and the backward sums the bias's gradient as it writes the input's.
//
// Storage fp32 or bf16 (as uint16_t), arithmetic fp32; OpenMP over rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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

// Rows of C elements, each plus a bias (fp32, one per column; none where bias is null), fp32 or bf16 storage.
// y[r][c] = GELU(x[r][c] + bias[c])
template <typename T>
void forward(const T* x, int64_t rows, int64_t C, const float* bias, T* y) {
    const int64_t whole = C / 16 * 16;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * C;
        T* yr = y + r * C;
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c < whole; c += 16) {
            const __m512 z = load16(xr + c);
            store16(yr + c, gelu(bias ? _mm512_add_ps(z, _mm512_loadu_ps(bias + c)) : z));
        }
#endif
        for (; c < C; ++c) store(yr + c, gelu(load(xr + c) + (bias ? bias[c] : 0.0f)));
    }
}

// Rows summed into one partial sum of the bias's gradient per block of this many rows, the blocks then summed in
// order: the same sums whatever the number of threads.
constexpr int64_t BIAS_BLOCK = 64;

// grad_x[r][c] = GELU'(z) grad[r][c] with z = x[r][c] + bias[c]; where grad_bias is not null, also
// grad_bias[c] = sum_r grad_x[r][c] (in fp32, before grad_x is rounded to its dtype)
template <typename T>
void backward(const T* x, const T* grad, int64_t rows, int64_t C, const float* bias, T* grad_x, float* grad_bias) {
    const int64_t whole = C / 16 * 16, blocks = (rows + BIAS_BLOCK - 1) / BIAS_BLOCK;
    std::vector<float> partial(grad_bias ? blocks * C : 0);
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
        float* sums = grad_bias ? partial.data() + block * C : nullptr;
        if (sums) std::fill(sums, sums + C, 0.0f);
        for (int64_t r = block * BIAS_BLOCK; r < std::min(rows, (block + 1) * BIAS_BLOCK); ++r) {
            const T *xr = x + r * C, *gr = grad + r * C;
            T* out = grad_x + r * C;
            int64_t c = 0;
#if defined(__AVX512F__)
            for (; c < whole; c += 16) {
                __m512 z = load16(xr + c);
                if (bias) z = _mm512_add_ps(z, _mm512_loadu_ps(bias + c));
                const __m512 g = gelu_gradient(z, load16(gr + c));
                store16(out + c, g);
                if (sums) _mm512_storeu_ps(sums + c, _mm512_add_ps(_mm512_loadu_ps(sums + c), g));
            }
#endif
            for (; c < C; ++c) {
                const float g = gelu_gradient(load(xr + c) + (bias ? bias[c] : 0.0f), load(gr + c));
                store(out + c, g);
                if (sums) sums[c] += g;
            }
        }
    }
    if (grad_bias) sum_rows(partial.data(), blocks, C, grad_bias);
}

}  // namespace

extern "C" {

// x and y: rows of C contiguous elements, fp32 or (bf16 != 0) bf16; bias: C fp32 values added to each row
// first, or null
void vitscope_gelu_forward(const void* x, int64_t rows, int64_t C, const float* bias, void* y, int bf16) {
    if (bf16) forward(static_cast<const uint16_t*>(x), rows, C, bias, static_cast<uint16_t*>(y));
    else forward(static_cast<const float*>(x), rows, C, bias, static_cast<float*>(y));
}

// the gradient of GELU's input, from its input x (before the bias), the bias (or null) and its output's gradient,
// x, grad and grad_x of one dtype; with grad_bias not null, the bias's gradient too (C fp32 values)
void vitscope_gelu_backward(const void* x, const void* grad, int64_t rows, int64_t C, const float* bias, void* grad_x,
                            float* grad_bias, int bf16) {
    if (bf16) backward(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(grad), rows, C, bias,
                       static_cast<uint16_t*>(grad_x), grad_bias);
    else backward(static_cast<const float*>(x), static_cast<const float*>(grad), rows, C, bias,
                  static_cast<float*>(grad_x), grad_bias);
}

}  // extern "C"
