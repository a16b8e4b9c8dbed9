// Multi-head self-attention on a CPU for the small shapes of an MNIST ViT: softmax(Q K^T * scale) V, forward
// and backward, in one of two forms, OpenMP over their pieces of work. The lane form (head sizes that are not
// multiples of 16, the seed size's 8): 16 images of one head at a time, one image per vector lane, with all of
// their tokens in fp32 scratch. The row form (head sizes 16, 32, ...): one image and head at a time, each
// product a register-blocked matrix product (see "The row form" below).
//
// At the seed size (17 tokens of head size 8), ATen runs this core as 1024 matmuls of 17x17x8 per layer at
// ~25 GFLOP/s, and softmax and the q/k/v layouts are more passes over memory: 35-43% of a compiled training
// step (docs/performance.md#attention-kernel). Here the scores never leave the cache and q, k and v are read where the qkv
// projection wrote them, (B, T, 3, H, d); the output is written as (B, T, H, d), the layout the output
// projection reads. The forward saves the probabilities, and the backward reads them and writes the gradient
// of the whole qkv tensor in its own layout.
//
// Plain C++ with no torch headers, so it compiles in a few seconds; vitscope/cpu_attention.py builds it with
// -O3 -march=native -fopenmp (the OpenMP runtime is the one torch has already loaded) and calls it through
// ctypes. Storage is fp32 or bf16 (as uint16_t); arithmetic is fp32 either way.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "numerics.h"

namespace {

using namespace vitscope;

// Sixteen images' tokens for one head at a time, each image a lane of the vectors: every step of the
// attention of one (image, head) pair becomes a 16-wide vector operation, with no horizontal sums and no
// loop remainders at the odd token counts (17, 50) these models have. Arrays are [token][channel][lane].
constexpr int64_t L = 16;

struct Group {  // which images and head a block of lanes holds
    int64_t b0, lanes, h;
};

// Groups run image-block-major, the heads of one block of 16 images one after another: they read the same
// cache lines of qkv, and each thread's share of the groups is its own share of the images. (Head-major, each
// thread read every image's rows once per head, and the gathers waited on those loads.)
inline Group group_of(int64_t g, int64_t batch, int64_t heads) {
    const int64_t b0 = (g / heads) * L;
    return {b0, std::min(L, batch - b0), g % heads};
}

#if defined(__AVX512F__)
// Moving 16 images' rows into lanes and back is a transpose. With AVX-512 it is done 16 x 16 floats at a time
// in registers, from and to 8-element pieces of the rows (head sizes that are multiples of 8): at head size
// 16 in bf16 the element-by-element form took more time than the attention's arithmetic.
#define VITSCOPE_TILES 1

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m512 join(__m256 low, __m256 high) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(low)), _mm256_castps_pd(high), 1));
}
inline void store_halves(float* low, float* high, __m512 v) {
    _mm256_storeu_ps(low, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(high, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline void store_halves(uint16_t* low, uint16_t* high, __m512 v) {  // rounded to nearest even, as `store`
    const __m256i packed = to_bf16(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(low), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high), _mm256_extracti128_si256(packed, 1));
}

inline void store_low(float* p, __m512 v) { _mm256_storeu_ps(p, _mm512_castps512_ps256(v)); }
inline void store_low(uint16_t* p, __m512 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(to_bf16(v)));
}

// r[a][b] -> r[b][a] for 16 rows of 16 floats
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {  // r[4k + j], 128-bit lane q: rows 4k..4k+3 of column 4q + j
        r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {
        const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        const __m512 u2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        const __m512 u3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[8 + j] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
        t[4 + j] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    for (int k = 0; k < 16; ++k) r[k] = t[k];
}
#endif

// x[m][l] with m = i * d + c: (rows[b0 + l][i][offset + c] + bias[c]) * scale (no bias where it is null), zeros in
// the lanes past the batch's end
template <typename T, int DC>
void gather(const T* rows, int64_t n, int64_t row_stride, int64_t offset, int64_t d_rt, const float* bias,
            float scale, const Group& g, float* x) {
    const int64_t d = DC ? DC : d_rt;
    int64_t m0 = 0;
    const T* first = rows + g.b0 * n * row_stride + offset;
#ifdef VITSCOPE_TILES
    if (g.lanes == L && d % 8 == 0) {
        const __m512 factor = _mm512_set1_ps(scale);
        for (; m0 + 16 <= n * d; m0 += 16) {  // two 8-element pieces of each image's rows
            const T* low = first + (m0 / d) * row_stride + m0 % d;
            const T* high = first + ((m0 + 8) / d) * row_stride + (m0 + 8) % d;
            __m512 r[16];
            for (int64_t l = 0; l < L; ++l) r[l] = join(load8(low + l * n * row_stride), load8(high + l * n * row_stride));
            transpose16(r);
            if (bias)
                for (int64_t k = 0; k < 16; ++k) r[k] = _mm512_add_ps(r[k], _mm512_set1_ps(bias[(m0 + k) % d]));
            for (int64_t k = 0; k < 16; ++k) _mm512_storeu_ps(x + (m0 + k) * L, _mm512_mul_ps(r[k], factor));
        }
        if (m0 + 8 <= n * d) {  // the last 8 elements (n * d an odd multiple of 8): a tile half zeros
            const T* low = first + (m0 / d) * row_stride + m0 % d;
            __m512 r[16];
            for (int64_t l = 0; l < L; ++l) r[l] = join(load8(low + l * n * row_stride), _mm256_setzero_ps());
            transpose16(r);
            for (int64_t k = 0; k < 8; ++k) {
                if (bias) r[k] = _mm512_add_ps(r[k], _mm512_set1_ps(bias[(m0 + k) % d]));
                _mm512_storeu_ps(x + (m0 + k) * L, _mm512_mul_ps(r[k], factor));
            }
            m0 += 8;
        }
    }
#endif
    if (g.lanes < L) std::fill(x + m0 * L, x + n * d * L, 0.0f);
    for (int64_t l = 0; l < g.lanes; ++l) {
        const T* r = first + l * n * row_stride;
        for (int64_t m = m0; m < n * d; ++m)
            x[m * L + l] = (load(r + (m / d) * row_stride + m % d) + (bias ? bias[m % d] : 0.0f)) * scale;
    }
}

template <typename T, int DC>
void scatter(const float* x, int64_t n, int64_t row_stride, int64_t offset, int64_t d_rt, float scale,
             const Group& g, T* rows) {
    const int64_t d = DC ? DC : d_rt;
    int64_t m0 = 0;
    T* first = rows + g.b0 * n * row_stride + offset;
#ifdef VITSCOPE_TILES
    if (g.lanes == L && d % 8 == 0) {
        const __m512 factor = _mm512_set1_ps(scale);
        for (; m0 + 16 <= n * d; m0 += 16) {
            T* low = first + (m0 / d) * row_stride + m0 % d;
            T* high = first + ((m0 + 8) / d) * row_stride + (m0 + 8) % d;
            __m512 r[16];
            for (int64_t k = 0; k < 16; ++k) r[k] = _mm512_mul_ps(_mm512_loadu_ps(x + (m0 + k) * L), factor);
            transpose16(r);
            for (int64_t l = 0; l < L; ++l) store_halves(low + l * n * row_stride, high + l * n * row_stride, r[l]);
        }
        if (m0 + 8 <= n * d) {  // the last 8 elements, as in gather
            T* low = first + (m0 / d) * row_stride + m0 % d;
            __m512 r[16];
            for (int64_t k = 0; k < 16; ++k)
                r[k] = k < 8 ? _mm512_mul_ps(_mm512_loadu_ps(x + (m0 + k) * L), factor) : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t l = 0; l < L; ++l) store_low(low + l * n * row_stride, r[l]);
            m0 += 8;
        }
    }
#endif
    for (int64_t l = 0; l < g.lanes; ++l) {
        T* r = first + l * n * row_stride;
        for (int64_t m = m0; m < n * d; ++m) store(r + (m / d) * row_stride + m % d, x[m * L + l] * scale);
    }
}

// the bias of one part (0 q, 1 k, 2 v) of head h, or null
inline const float* bias_of(const float* bias, int64_t part, int64_t dim, int64_t h, int64_t d) {
    return bias ? bias + part * dim + h * d : nullptr;
}

// one group's q (scaled), k and v from qkv (B, T, 3, H, d) and its bias (3, H, d) or null
template <typename T, int DC>
void gather_qkv(const T* qkv, const float* bias, int64_t n, int64_t heads, int64_t d, float scale, const Group& g,
                float* q, float* k, float* v) {
    const int64_t dim = heads * d;
    gather<T, DC>(qkv, n, 3 * dim, g.h * d, d, bias_of(bias, 0, dim, g.h, d), scale, g, q);
    gather<T, DC>(qkv, n, 3 * dim, dim + g.h * d, d, bias_of(bias, 1, dim, g.h, d), 1.0f, g, k);
    gather<T, DC>(qkv, n, 3 * dim, 2 * dim + g.h * d, d, bias_of(bias, 2, dim, g.h, d), 1.0f, g, v);
}

// sums[(b0 + l) * row_stride + c] = sum_j x[j][c][l]: one group's column sums of a gradient, image by image (the
// bias's gradient before the sum over images)
template <int DC>
void lane_column_sums(const float* x, int64_t n, int64_t d_rt, const Group& g, int64_t row_stride, float* sums) {
    const int64_t d = DC ? DC : d_rt;
    for (int64_t c = 0; c < d; ++c) {
        float acc[L] = {};
        for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) acc[l] += x[(j * d + c) * L + l];
        }
        for (int64_t l = 0; l < g.lanes; ++l) sums[(g.b0 + l) * row_stride + c] = acc[l];
    }
}

// s[j][l] = a_i . b_j, lane by lane: the scores of query i (a = q, b = k), or dO_i . v_j (a = dO, b = v)
template <int DC>
inline void dots(const float* a, const float* b, int64_t i, int64_t n, int64_t d_rt, float* s) {
    const int64_t d = DC ? DC : d_rt;
    const float* ai = a + i * d * L;
    for (int64_t j = 0; j < n; ++j) {
        const float* bj = b + j * d * L;
        float acc[L] = {};
        for (int64_t c = 0; c < d; ++c) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) acc[l] += ai[c * L + l] * bj[c * L + l];
        }
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) s[j * L + l] = acc[l];
    }
}

// y[c][l] = scale * sum_j w_j[l] m[j][c][l], with w_j = w + j * w_stride: a row of weights times a matrix,
// lane by lane (o_i = p_i V, dq_i = ds_i K, dk_j = DS[:, j]^T Q, dv_j = P[:, j]^T dO). Eight channels at a
// time are summed in registers.
template <int DC>
inline void weighted_sum(const float* w, int64_t w_stride, const float* m, int64_t n, int64_t d_rt, float scale,
                         float* y) {
    const int64_t d = DC ? DC : d_rt;
    constexpr int64_t C = 8;
    int64_t c0 = 0;
    for (; c0 + C <= d; c0 += C) {
        float acc[C][L] = {};
        for (int64_t j = 0; j < n; ++j) {
            const float* wj = w + j * w_stride;
            const float* mj = m + (j * d + c0) * L;
            for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
                for (int64_t l = 0; l < L; ++l) acc[c][l] += wj[l] * mj[c * L + l];
            }
        }
        for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) y[(c0 + c) * L + l] = acc[c][l] * scale;
        }
    }
    if constexpr (DC == 0 || DC % C != 0) for (; c0 < d; ++c0) {  // head sizes not a multiple of 8
        float acc[L] = {};
        for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) acc[l] += w[j * w_stride + l] * m[(j * d + c0) * L + l];
        }
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) y[c0 * L + l] = acc[l] * scale;
    }
}

// Forward: out (B, T, H, d) and the probabilities P, [group][i][j][lane], which the backward reads.
template <typename T, int DC>
void forward(const T* qkv, const float* bias, int64_t batch, int64_t n, int64_t heads, int64_t d_rt, float scale, T* out,
             float* probs) {
    const int64_t d = DC ? DC : d_rt;
    const int64_t dim = heads * d;
    const int64_t groups = heads * ((batch + L - 1) / L);
#pragma omp parallel
    {
        std::vector<float> q(n * d * L), k(n * d * L), v(n * d * L), o(n * d * L);
#pragma omp for schedule(static)
        for (int64_t gi = 0; gi < groups; ++gi) {
            const Group g = group_of(gi, batch, heads);
            gather_qkv<T, DC>(qkv, bias, n, heads, d, scale, g, q.data(), k.data(), v.data());
            float* p_group = probs + gi * n * n * L;
            for (int64_t i = 0; i < n; ++i) {
                float* s = p_group + i * n * L;
                dots<DC>(q.data(), k.data(), i, n, d, s);
                float top[L], total[L] = {};
#pragma omp simd
                for (int64_t l = 0; l < L; ++l) top[l] = s[l];
                for (int64_t j = 1; j < n; ++j) {
#pragma omp simd
                    for (int64_t l = 0; l < L; ++l) top[l] = std::max(top[l], s[j * L + l]);
                }
                for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
                    for (int64_t l = 0; l < L; ++l) {
                        const float e = exp_nonpositive(s[j * L + l] - top[l]);
                        s[j * L + l] = e;
                        total[l] += e;
                    }
                }
                float inverse[L];  // one division per lane, not per score (vdivps is ~16x a multiply)
#pragma omp simd
                for (int64_t l = 0; l < L; ++l) inverse[l] = 1.0f / total[l];
                for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
                    for (int64_t l = 0; l < L; ++l) s[j * L + l] *= inverse[l];
                }
                weighted_sum<DC>(s, L, v.data(), n, d, 1.0f, o.data() + i * d * L);
            }
            scatter<T, DC>(o.data(), n, dim, g.h * d, d, 1.0f, g, out);
        }
    }
}

// sums: null, or (B, 3 * H * d) for each image's sums of the gradient over its tokens
template <typename T, int DC>
void backward(const T* qkv, const float* bias, const T* grad_out, const float* probs, int64_t batch, int64_t n,
              int64_t heads, int64_t d_rt, float scale, T* grad_qkv, float* sums) {
    const int64_t d = DC ? DC : d_rt;
    const int64_t dim = heads * d, row_stride = 3 * dim;
    const int64_t groups = heads * ((batch + L - 1) / L);
#pragma omp parallel
    {
        const int64_t size = n * d * L;
        std::vector<float> q(size), k(size), v(size), go(size), grad(size), ds(n * n * L);
#pragma omp for schedule(static)
        for (int64_t gi = 0; gi < groups; ++gi) {
            const Group g = group_of(gi, batch, heads);
            gather_qkv<T, DC>(qkv, bias, n, heads, d, scale, g, q.data(), k.data(), v.data());
            gather<T, DC>(grad_out, n, dim, g.h * d, d, nullptr, 1.0f, g, go.data());
            const float* p = probs + gi * n * n * L;
            for (int64_t i = 0; i < n; ++i) {  // d scores: ds_ij = p_ij (dO_i . v_j - sum_j' p_ij' dO_i . v_j')
                const float* pi = p + i * n * L;
                float* dsi = ds.data() + i * n * L;
                dots<DC>(go.data(), v.data(), i, n, d, dsi);
                float dot[L] = {};
                for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
                    for (int64_t l = 0; l < L; ++l) dot[l] += pi[j * L + l] * dsi[j * L + l];
                }
                for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
                    for (int64_t l = 0; l < L; ++l) dsi[j * L + l] = pi[j * L + l] * (dsi[j * L + l] - dot[l]);
                }
                weighted_sum<DC>(dsi, L, k.data(), n, d, scale, grad.data() + i * d * L);  // dq_i
            }
            scatter<T, DC>(grad.data(), n, row_stride, g.h * d, d, 1.0f, g, grad_qkv);
            if (sums) lane_column_sums<DC>(grad.data(), n, d, g, row_stride, sums + g.h * d);
            for (int64_t j = 0; j < n; ++j)  // dk_j = sum_i ds_ij q_i (q holds the scale already)
                weighted_sum<DC>(ds.data() + j * L, n * L, q.data(), n, d, 1.0f, grad.data() + j * d * L);
            scatter<T, DC>(grad.data(), n, row_stride, dim + g.h * d, d, 1.0f, g, grad_qkv);
            if (sums) lane_column_sums<DC>(grad.data(), n, d, g, row_stride, sums + dim + g.h * d);
            for (int64_t j = 0; j < n; ++j)  // dv_j = sum_i p_ij dO_i
                weighted_sum<DC>(p + j * L, n * L, go.data(), n, d, 1.0f, grad.data() + j * d * L);
            scatter<T, DC>(grad.data(), n, row_stride, 2 * dim + g.h * d, d, 1.0f, g, grad_qkv);
            if (sums) lane_column_sums<DC>(grad.data(), n, d, g, row_stride, sums + 2 * dim + g.h * d);
        }
    }
}

// ---- The row form: one (image, head) pair at a time, for head sizes that are multiples of 16 ----
//
// At the mid size (50 tokens, head size 32) the lane form above is load-bound: each of its multiply-adds
// reads both operands from memory. Here each pair's q, k and v are copied into fp32 scratch (k or v also
// transposed, with its token axis padded to a multiple of 16), and every product of the attention is one
// register-blocked matrix product, `matmul`: a panel of R rows by 16 * NV columns summed in registers, the
// B row loaded once per k and each A element broadcast. The probabilities are saved as (B * H, T, T padded).

inline int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }

// rows of a panel for NV 16-wide vectors: R * NV accumulators, NV B vectors and one broadcast in 32 registers
template <int NV>
constexpr int panel_rows = NV == 1 ? 24 : NV == 2 ? 12 : NV == 3 ? 8 : 6;

// c[r][0:16 NV] = scale * sum_k a[r * am + k * ak] * b[k * ldb + 0:16 NV], r < R
template <int NV, int R>
inline void panel(const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, int64_t K, float scale,
                  float* c, int64_t ldc) {
#if defined(__AVX512F__)
    __m512 acc[R][NV];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m512 row[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) row[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
        const float* column = a + k * ak;
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) {
            const __m512 x = _mm512_set1_ps(column[r * am]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, row[v], acc[r][v]);
        }
    }
    const __m512 factor = _mm512_set1_ps(scale);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, _mm512_mul_ps(acc[r][v], factor));
#else
    for (int r = 0; r < R; ++r) {
        float acc[16 * NV] = {};
        for (int64_t k = 0; k < K; ++k) {
            const float x = a[r * am + k * ak];
#pragma omp simd
            for (int w = 0; w < 16 * NV; ++w) acc[w] += x * b[k * ldb + w];
        }
        for (int w = 0; w < 16 * NV; ++w) c[r * ldc + w] = acc[w] * scale;
    }
#endif
}

// the last rows < R of a product, as a panel of exactly that many rows
template <int NV, int R>
inline void last_panel(int64_t rows, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, int64_t K,
                       float scale, float* c, int64_t ldc) {
    if constexpr (R > 1) {
        if (rows < R) return last_panel<NV, R - 1>(rows, a, am, ak, b, ldb, K, scale, c, ldc);
    }
    panel<NV, R>(a, am, ak, b, ldb, K, scale, c, ldc);
}

template <int NV>
void matmul_columns(int64_t M, int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
                    float scale, float* c, int64_t ldc) {
    constexpr int R = panel_rows<NV>;
    int64_t m = 0;
    for (; m + R <= M; m += R) panel<NV, R>(a + m * am, am, ak, b, ldb, K, scale, c + m * ldc, ldc);
    if (m < M) last_panel<NV, R - 1>(M - m, a + m * am, am, ak, b, ldb, K, scale, c + m * ldc, ldc);
}

// C (M x W) = scale * A B, with A's element (m, k) at a[m * am + k * ak] (A or a transposed A), B (K x W) with
// rows ldb apart, W a multiple of 16
void matmul(int64_t M, int64_t W, int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
            float scale, float* c, int64_t ldc) {
    int64_t w = 0;
    for (; w + 64 <= W; w += 64) matmul_columns<4>(M, K, a, am, ak, b + w, ldb, scale, c + w, ldc);
    switch ((W - w) / 16) {
        case 1: matmul_columns<1>(M, K, a, am, ak, b + w, ldb, scale, c + w, ldc); break;
        case 2: matmul_columns<2>(M, K, a, am, ak, b + w, ldb, scale, c + w, ldc); break;
        case 3: matmul_columns<3>(M, K, a, am, ak, b + w, ldb, scale, c + w, ldc); break;
        default: break;
    }
}

// x[i][c] = (rows[i * stride + c] + bias[c]) * scale (no bias where it is null), for n rows of d (a multiple of 16)
template <typename T>
void load_rows(const T* rows, int64_t n, int64_t stride, int64_t d, const float* bias, float scale, float* x) {
#if defined(__AVX512F__)
    const __m512 factor = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; c += 16) {
            const __m512 value = load16(rows + i * stride + c);
            _mm512_storeu_ps(x + i * d + c, _mm512_mul_ps(bias ? _mm512_add_ps(value, _mm512_loadu_ps(bias + c)) : value, factor));
        }
#else
    for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; ++c) x[i * d + c] = (load(rows + i * stride + c) + (bias ? bias[c] : 0.0f)) * scale;
#endif
}

// x[c][j] = rows[j * stride + c] + bias[c] (no bias where it is null), zeros for the padding j >= n
template <typename T>
void load_transposed(const T* rows, int64_t n, int64_t stride, int64_t d, const float* bias, int64_t np, float* x) {
#if defined(__AVX512F__)
    for (int64_t j0 = 0; j0 < np; j0 += 16)  // 16 x 16 blocks, transposed in registers
        for (int64_t c0 = 0; c0 < d; c0 += 16) {
            const __m512 b = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
            __m512 r[16];
            for (int64_t j = 0; j < 16; ++j)
                r[j] = j0 + j < n ? _mm512_add_ps(load16(rows + (j0 + j) * stride + c0), b) : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(x + (c0 + c) * np + j0, r[c]);
        }
#else
    for (int64_t c = 0; c < d; ++c) std::fill(x + c * np + n, x + (c + 1) * np, 0.0f);
    for (int64_t j = 0; j < n; ++j)
        for (int64_t c = 0; c < d; ++c) x[c * np + j] = load(rows + j * stride + c) + (bias ? bias[c] : 0.0f);
#endif
}

template <typename T>
void store_rows(const float* x, int64_t n, int64_t d, T* rows, int64_t stride) {
#if defined(__AVX512F__)
    for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; c += 16) store16(rows + i * stride + c, _mm512_loadu_ps(x + i * d + c));
#else
    for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; ++c) store(rows + i * stride + c, x[i * d + c]);
#endif
}

// sums[c] = sum_i x[i * d + c], for n rows of d
inline void column_sums(const float* x, int64_t n, int64_t d, float* sums) {
    std::fill(sums, sums + d, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) sums[c] += x[i * d + c];
    }
}

// softmax over s[0:n] in place; the padding s[n:np] set to 0
#if defined(__AVX512F__)
// In intrinsics: GCC leaves the maximum's reduction scalar and branchy without -ffast-math (~40% of the
// forward at 50 tokens).
inline void softmax_row(float* s, int64_t n, int64_t np) {
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    __m512 top = lowest;
    for (int64_t j = 0; j < n; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(lowest, first_lanes(n - j), s + j));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < np; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(first_lanes(n - j), exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift)));
        _mm512_storeu_ps(s + j, e);
        total = _mm512_add_ps(total, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t j = 0; j < np; j += 16) _mm512_storeu_ps(s + j, _mm512_mul_ps(_mm512_loadu_ps(s + j), inverse));
}
#else
inline void softmax_row(float* s, int64_t n, int64_t np) {
    float top = s[0];
    for (int64_t j = 1; j < n; ++j) top = std::max(top, s[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        s[j] = exp_nonpositive(s[j] - top);
        total += s[j];
    }
    const float inverse = 1.0f / total;
    for (int64_t j = 0; j < n; ++j) s[j] *= inverse;
    std::fill(s + n, s + np, 0.0f);
}
#endif

template <typename T>
void forward_rows(const T* qkv, const float* bias, int64_t batch, int64_t n, int64_t heads, int64_t d, float scale,
                  T* out, float* probs) {
    const int64_t dim = heads * d, stride = 3 * dim, np = padded(n);
#pragma omp parallel
    {
        std::vector<float> q(n * d), kt(d * np), v(n * d), o(n * d);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * heads; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            const T* rows = qkv + b * n * stride + h * d;
            load_rows(rows, n, stride, d, bias_of(bias, 0, dim, h, d), scale, q.data());
            load_transposed(rows + dim, n, stride, d, bias_of(bias, 1, dim, h, d), np, kt.data());
            load_rows(rows + 2 * dim, n, stride, d, bias_of(bias, 2, dim, h, d), 1.0f, v.data());
            float* p = probs + bh * n * np;
            matmul(n, np, d, q.data(), d, 1, kt.data(), np, 1.0f, p, np);  // scores
            for (int64_t i = 0; i < n; ++i) softmax_row(p + i * np, n, np);
            matmul(n, d, n, p, np, 1, v.data(), d, 1.0f, o.data(), d);  // P V
            store_rows(o.data(), n, d, out + b * n * dim + h * d, dim);
        }
    }
}

// sums: null, or (B, 3 * H * d) for each image's sums of the gradient over its tokens
template <typename T>
void backward_rows(const T* qkv, const float* bias, const T* grad_out, const float* probs, int64_t batch, int64_t n,
                   int64_t heads, int64_t d, float scale, T* grad_qkv, float* sums) {
    const int64_t dim = heads * d, stride = 3 * dim, np = padded(n);
#pragma omp parallel
    {
        std::vector<float> q(n * d), k(n * d), vt(d * np), go(n * d), ds(n * np), grad(n * d);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * heads; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            const T* rows = qkv + b * n * stride + h * d;
            T* grad_rows = grad_qkv + b * n * stride + h * d;
            float* image_sums = sums ? sums + b * stride + h * d : nullptr;
            load_rows(rows, n, stride, d, bias_of(bias, 0, dim, h, d), scale, q.data());
            load_rows(rows + dim, n, stride, d, bias_of(bias, 1, dim, h, d), 1.0f, k.data());
            load_transposed(rows + 2 * dim, n, stride, d, bias_of(bias, 2, dim, h, d), np, vt.data());
            load_rows(grad_out + b * n * dim + h * d, n, dim, d, nullptr, 1.0f, go.data());
            const float* p = probs + bh * n * np;
            matmul(n, np, d, go.data(), d, 1, vt.data(), np, 1.0f, ds.data(), np);  // dP = dO V^T
            for (int64_t i = 0; i < n; ++i) {  // dS = P * (dP - rowsum(P * dP)); 0 in the padding, where P is
                const float* pi = p + i * np;
                float* dsi = ds.data() + i * np;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t j = 0; j < np; ++j) dot += pi[j] * dsi[j];
#pragma omp simd
                for (int64_t j = 0; j < np; ++j) dsi[j] = pi[j] * (dsi[j] - dot);
            }
            matmul(n, d, n, ds.data(), np, 1, k.data(), d, scale, grad.data(), d);  // dQ = scale dS K
            store_rows(grad.data(), n, d, grad_rows, stride);
            if (image_sums) column_sums(grad.data(), n, d, image_sums);
            matmul(n, d, n, ds.data(), 1, np, q.data(), d, 1.0f, grad.data(), d);  // dK = dS^T (scale Q)
            store_rows(grad.data(), n, d, grad_rows + dim, stride);
            if (image_sums) column_sums(grad.data(), n, d, image_sums + dim);
            matmul(n, d, n, p, 1, np, go.data(), d, 1.0f, grad.data(), d);  // dV = P^T dO
            store_rows(grad.data(), n, d, grad_rows + 2 * dim, stride);
            if (image_sums) column_sums(grad.data(), n, d, image_sums + 2 * dim);
        }
    }
}

// The lane form: head size 8 (the seed size's) with a loop length known at compile time; others the general
// path. (Multiples of 16 take the row form.)
#define VITSCOPE_DISPATCH(FN, T, D, ...)                  \
    switch (D) {                                          \
        case 8: FN<T, 8>(__VA_ARGS__); break;             \
        default: FN<T, 0>(__VA_ARGS__); break;            \
    }

}  // namespace

extern "C" {

// qkv (B, T, 3, H, d) contiguous; bias: the qkv layer's (3, H, d) in fp32, added to qkv first, or null; out
// (B, T, H, d); probs fp32, in the row form (B * H, T, T padded to a multiple of 16), in the lane form
// (H * ceil(B / 16), T, T, 16), [group][query][key][lane]. bf16 != 0: qkv and out are bf16.
void vitscope_attention_forward(const void* qkv, const float* bias, int64_t batch, int64_t n, int64_t heads, int64_t d,
                                float scale, void* out, float* probs, int bf16) {
    if (d % 16 == 0) {
        if (bf16) forward_rows(static_cast<const uint16_t*>(qkv), bias, batch, n, heads, d, scale, static_cast<uint16_t*>(out), probs);
        else forward_rows(static_cast<const float*>(qkv), bias, batch, n, heads, d, scale, static_cast<float*>(out), probs);
    } else if (bf16) {
        VITSCOPE_DISPATCH(forward, uint16_t, d, static_cast<const uint16_t*>(qkv), bias, batch, n, heads, d, scale,
                          static_cast<uint16_t*>(out), probs)
    } else {
        VITSCOPE_DISPATCH(forward, float, d, static_cast<const float*>(qkv), bias, batch, n, heads, d, scale,
                          static_cast<float*>(out), probs)
    }
}

// grad_out (B, T, H, d) contiguous, of qkv's dtype; grad_qkv (B, T, 3, H, d), every element written; with
// grad_bias not null, the bias's gradient too, (3, H, d) in fp32: the sums over images (in order, whatever the
// number of threads) of each image's sums over its tokens, taken before grad_qkv is rounded to its dtype.
void vitscope_attention_backward(const void* qkv, const float* bias, const void* grad_out, const float* probs,
                                 int64_t batch, int64_t n, int64_t heads, int64_t d, float scale, void* grad_qkv,
                                 float* grad_bias, int bf16) {
    const int64_t width = 3 * heads * d;
    std::vector<float> sums(grad_bias ? batch * width : 0);
    float* image_sums = grad_bias ? sums.data() : nullptr;
    if (d % 16 == 0) {
        if (bf16) backward_rows(static_cast<const uint16_t*>(qkv), bias, static_cast<const uint16_t*>(grad_out), probs, batch, n, heads, d, scale, static_cast<uint16_t*>(grad_qkv), image_sums);
        else backward_rows(static_cast<const float*>(qkv), bias, static_cast<const float*>(grad_out), probs, batch, n, heads, d, scale, static_cast<float*>(grad_qkv), image_sums);
    } else if (bf16) {
        VITSCOPE_DISPATCH(backward, uint16_t, d, static_cast<const uint16_t*>(qkv), bias,
                          static_cast<const uint16_t*>(grad_out), probs, batch, n, heads, d, scale,
                          static_cast<uint16_t*>(grad_qkv), image_sums)
    } else {
        VITSCOPE_DISPATCH(backward, float, d, static_cast<const float*>(qkv), bias, static_cast<const float*>(grad_out),
                          probs, batch, n, heads, d, scale, static_cast<float*>(grad_qkv), image_sums)
    }
    if (grad_bias) sum_rows(sums.data(), batch, width, grad_bias);
}

}  // extern "C"
