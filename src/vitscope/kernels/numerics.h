// Numerics shared by vitscope's CPU kernels (attention.cpp, gelu.cpp): fp32 and bf16 (as uint16_t) loads and
// stores with torch's rounding, and an exp for x <= 0, each one element at a time and, with AVX-512, 16.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace vitscope {

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) {
    uint32_t bits = uint32_t(*p) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}
inline void store(float* p, float value) { *p = value; }
inline void store(uint16_t* p, float value) {  // round to nearest even, as torch rounds fp32 to bf16
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        *p = uint16_t((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *p = uint16_t(bits >> 16);
}

// exp(x) for the x <= 0 of a softmax after its maximum is subtracted: 2^n * 2^f with n = round(x log2 e) and a
// degree-6 polynomial for 2^f on [-1/2, 1/2] (relative error ~2e-7). Written so that a loop over it
// vectorises: no calls, no branches. Below -87 it returns exp(-87) ~ 1.6e-38, not 0.
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.0f);
    const float t = x * 1.4426950408889634f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
    const float f = (t - n) * 0.6931471805599453f;     // (t - n) ln 2, in [-0.35, 0.35]
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const int32_t bits = (int32_t(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// out[c] = sum_r partial[r * width + c], the rows summed in order: a kernel's partial sums (per image, per block of
// rows) reduced to the same bits whatever the number of threads that wrote them
inline void sum_rows(const float* partial, int64_t rows, int64_t width, float* out) {
    std::fill(out, out + width, 0.0f);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < width; ++c) out[c] += partial[r * width + c];
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m256i to_bf16(__m512 v) {  // rounded to nearest even, as `store`
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(rounded);
}
inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }


// exp_nonpositive, 16 at a time (the same polynomial; scalef multiplies by 2^n)
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.4426950408889634f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

inline __mmask16 first_lanes(int64_t count) {  // the lanes of a 16-wide piece that hold columns < n
    return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

#endif

}  // namespace vitscope
