// Scaled dot-product attention on the CPU, bfloat16 and float32, for AVX-512 (with AVX-512-BF16 for bfloat16).
//
// Flash attention (Dao et al. 2022, "FlashAttention", algorithm 1): for each block of queries, the keys are read
// block by block; scores S = q k^T are computed into registers, the float32 softmax is kept online (running max
// m and sum l, earlier partial outputs rescaled by exp(m_old - m_new)), and P v is accumulated in float32.
// bfloat16 products use VDPBF16PS (pairs of bfloat16 multiplied exactly, summed in float32); P is rounded to
// bfloat16 before P v, as aten's bfloat16 flash kernel does. Work is split over (batch x head, query block)
// tasks that threads take from one atomic counter: no barrier between blocks.
//
// Layouts: q (B, H, N, D), k and v (B, H, M, D), any strides with the last dimension contiguous; the output is
// (B, N, H, D) contiguous (returned as its (B, H, N, D) view, so merging the heads afterwards is free).
// k is first repacked per head as [key group of 16][pair of dims][16 keys x 2] (bfloat16) or [group][dim][16]
// (float32); v (bfloat16 only) as [pair of keys][16-dim chunk][16 dims x 2 keys]. D must be a multiple of 8.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SP_HAVE_AVX512 1
#include <immintrin.h>
#else
#define SP_HAVE_AVX512 0
#endif
#if SP_HAVE_AVX512 && defined(__AVX512BF16__)
#define SP_HAVE_BF16 1
#else
#define SP_HAVE_BF16 0
#endif

namespace {

int64_t capabilities() { return (SP_HAVE_AVX512 ? 1 : 0) | (SP_HAVE_BF16 ? 2 : 0); }

#if SP_HAVE_AVX512

constexpr int ROWS = 4;         // query rows per micro-tile
constexpr int LANES = 16;       // keys per vector of scores
constexpr int BLOCK_GROUPS = 4; // key vectors per key block (64 keys)
constexpr int MAX_CHUNKS = 5;   // 16-dim output chunks per pass of P v (ROWS x 5 accumulators)

// 2^t for t <= 0 (t = log2(e) * (s - m)): t = n + f with f in [-1/2, 1/2], 2^f by its Taylor polynomial in
// f ln 2, then scaled by 2^n. Degree 6 (relative error < 2e-7) for float32; degree 4 (< 5e-5, far below the
// 4e-3 of rounding P to bfloat16) for bfloat16.
template <int DEGREE>
inline __m512 exp2_neg(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291076284772e-3f);
  if (DEGREE >= 6) {
    p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One task's view of the problem: one (batch, head), rows [row0, row0 + rows) of the queries.
template <typename T>
struct Head {
  const T* q;          // first query row of the task
  int64_t q_stride;    // elements between query rows
  const T* k_packed;   // this head's packed keys
  const T* v;          // bfloat16: this head's packed values; float32: the value rows
  int64_t v_stride;    // float32: elements between value rows
  T* out;              // first output row of the task
  int64_t out_stride;  // elements between output rows
  int64_t rows, keys, dim;
  float log2e_scale;   // softmax scale times log2(e)
};

// Per-thread scratch: the running output, max and sum (16 partial sums) of a task's rows, a micro-tile's P.
template <typename T>
struct Scratch {
  std::vector<float> out, max, sum;
  std::vector<T> q_pad;  // a short last micro-tile's query rows, zero-padded
  alignas(64) T p[ROWS * BLOCK_GROUPS * LANES];
};

// ---- scores: S = q k^T for ROWS query rows and G groups of 16 keys ---------------------------------------------

// One step of the inner product by element type: bfloat16 takes a pair of dims per step (VDPBF16PS on the keys
// packed as [16 keys x 2]), float32 one dim (FMA on 16 keys).
template <typename T>
struct ScoreStep;

#if SP_HAVE_BF16
template <>
struct ScoreStep<c10::BFloat16> {
  using Vec = __m512bh;
  static constexpr int DIMS = 2;
  static inline Vec load_keys(const c10::BFloat16* kp) { return (__m512bh)_mm512_loadu_si512(kp); }
  static inline Vec broadcast(const c10::BFloat16* q) {  // the pair q[0], q[1] in every lane
    int32_t pair;
    std::memcpy(&pair, q, sizeof(pair));
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static inline __m512 fma(__m512 acc, Vec q, Vec k) { return _mm512_dpbf16_ps(acc, q, k); }
};
#endif

template <>
struct ScoreStep<float> {
  using Vec = __m512;
  static constexpr int DIMS = 1;
  static inline Vec load_keys(const float* kp) { return _mm512_loadu_ps(kp); }
  static inline Vec broadcast(const float* q) { return _mm512_set1_ps(*q); }
  static inline __m512 fma(__m512 acc, Vec q, Vec k) { return _mm512_fmadd_ps(q, k, acc); }
};

template <int G, typename T>
inline void scores(const T* q, int64_t q_stride, const T* kp, int64_t dim, __m512 (&acc)[ROWS][BLOCK_GROUPS]) {
  using Step = ScoreStep<T>;
  const int64_t steps = dim / Step::DIMS;
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    typename Step::Vec kv[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) kv[g] = Step::load_keys(kp + (g * steps + s) * (Step::DIMS * LANES));
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const typename Step::Vec qb = Step::broadcast(q + r * q_stride + Step::DIMS * s);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] = Step::fma(acc[r][g], qb, kv[g]);
    }
  }
}

// ---- probabilities: P = exp(S - m) written for P v, in bfloat16 (pairs of keys) or float32 ---------------------

inline void store_p(c10::BFloat16* dst, __m512 lo, __m512 hi) {
#if SP_HAVE_BF16
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#endif
}
inline void store_p(float* dst, __m512 lo, __m512 hi) {
  _mm512_storeu_ps(dst, lo);
  _mm512_storeu_ps(dst + LANES, hi);
}

// The online softmax for one micro-tile and one key block: updates max and sum, writes P, returns the factors
// alpha = exp(m_old - m_new) by which the rows' earlier outputs must be scaled. `last_lanes`: valid keys of the
// block's last group.
template <typename T, int G>
inline void softmax_block(__m512 (&acc)[ROWS][BLOCK_GROUPS], int last_lanes, float scale, float* max, float* sum,
                          T* p, float* alpha) {
  const __mmask16 valid = (__mmask16)((1u << last_lanes) - 1u);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r) {
    acc[r][G - 1] = _mm512_mask_mov_ps(minus_inf, valid, acc[r][G - 1]);
    __m512 m = acc[r][0];
#pragma GCC unroll 4
    for (int g = 1; g < G; ++g) m = _mm512_max_ps(m, acc[r][g]);
    const float m_new = std::max(max[r], _mm512_reduce_max_ps(m));
    alpha[r] = std::exp2((max[r] - m_new) * scale);
    max[r] = m_new;
    const __m512 shift = _mm512_set1_ps(m_new * scale);
    const __m512 s = _mm512_set1_ps(scale);
    __m512 total = zero;
    __m512 e[BLOCK_GROUPS + 1];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      e[g] = exp2_neg<std::is_same<T, float>::value ? 6 : 4>(_mm512_fmsub_ps(acc[r][g], s, shift));
      if (g == G - 1) e[g] = _mm512_maskz_mov_ps(valid, e[g]);
      total = _mm512_add_ps(total, e[g]);
    }
    e[G] = zero;
    float* sum_r = sum + r * LANES;  // the row's sum, kept as 16 partial sums (added up at the end)
    _mm512_storeu_ps(sum_r, _mm512_fmadd_ps(_mm512_loadu_ps(sum_r), _mm512_set1_ps(alpha[r]), total));
#pragma GCC unroll 2
    for (int g = 0; g < G; g += 2) store_p(p + r * BLOCK_GROUPS * LANES + g * LANES, e[g], e[g + 1]);
  }
}

// ---- P v: out[r] = alpha[r] out[r] + sum_j p[r, j] v[j], for C chunks of 16 dims (+ a tail of 8) ----------------

// ROWS rows of C 16-dim chunks (+ a tail of 8 dims) of the running output, in registers while P v runs.
template <int C, bool TAIL>
struct OutTile {
  __m512 acc[ROWS][C > 0 ? C : 1];
  __m256 tail[ROWS];

  inline void load(const float* out, int64_t dim, const float* alpha) {  // scaled by alpha = exp(m_old - m_new)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 5
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(a, _mm512_loadu_ps(out + r * dim + c * LANES));
      if (TAIL) tail[r] = _mm256_mul_ps(_mm512_castps512_ps256(a), _mm256_loadu_ps(out + r * dim + C * LANES));
    }
  }

  inline void store(float* out, int64_t dim) const {
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 5
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * dim + c * LANES, acc[r][c]);
      if (TAIL) _mm256_storeu_ps(out + r * dim + C * LANES, tail[r]);
    }
  }
};

#if SP_HAVE_BF16
template <int C, bool TAIL>
inline void pv_chunks(const c10::BFloat16* p, const c10::BFloat16* vp, int64_t pair_stride, int64_t pairs,
                      float* out, int64_t dim, const float* alpha) {
  OutTile<C, TAIL> o;
  o.load(out, dim, alpha);
  for (int64_t j = 0; j < pairs; ++j) {
    const c10::BFloat16* vj = vp + j * pair_stride;
    __m512bh vv[C > 0 ? C : 1];
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vj + c * 32);
    __m256bh vt;
    if (TAIL) vt = (__m256bh)_mm256_loadu_si256((const __m256i*)(vj + C * 32));
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      int32_t pair;
      std::memcpy(&pair, p + r * BLOCK_GROUPS * LANES + 2 * j, sizeof(pair));
      const __m512i pb = _mm512_set1_epi32(pair);
#pragma GCC unroll 5
      for (int c = 0; c < C; ++c) o.acc[r][c] = _mm512_dpbf16_ps(o.acc[r][c], (__m512bh)pb, vv[c]);
      if (TAIL) o.tail[r] = _mm256_dpbf16_ps(o.tail[r], (__m256bh)_mm512_castsi512_si256(pb), vt);
    }
  }
  o.store(out, dim);
}
#endif

template <int C, bool TAIL>
inline void pv_chunks(const float* p, const float* v, int64_t v_stride, int64_t keys, float* out, int64_t dim,
                      const float* alpha) {
  OutTile<C, TAIL> o;
  o.load(out, dim, alpha);
  for (int64_t j = 0; j < keys; ++j) {
    const float* vj = v + j * v_stride;
    __m512 vv[C > 0 ? C : 1];
#pragma GCC unroll 5
    for (int c = 0; c < C; ++c) vv[c] = _mm512_loadu_ps(vj + c * LANES);
    __m256 vt;
    if (TAIL) vt = _mm256_loadu_ps(vj + C * LANES);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * BLOCK_GROUPS * LANES + j]);
#pragma GCC unroll 5
      for (int c = 0; c < C; ++c) o.acc[r][c] = _mm512_fmadd_ps(pb, vv[c], o.acc[r][c]);
      if (TAIL) o.tail[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(pb), vt, o.tail[r]);
    }
  }
  o.store(out, dim);
}

template <typename T, bool TAIL>
inline void pv_dispatch(int chunks, const T* p, const T* v, int64_t stride, int64_t n, float* out, int64_t dim,
                        const float* alpha) {
  switch (chunks) {
    case 0: pv_chunks<0, TAIL>(p, v, stride, n, out, dim, alpha); break;
    case 1: pv_chunks<1, TAIL>(p, v, stride, n, out, dim, alpha); break;
    case 2: pv_chunks<2, TAIL>(p, v, stride, n, out, dim, alpha); break;
    case 3: pv_chunks<3, TAIL>(p, v, stride, n, out, dim, alpha); break;
    case 4: pv_chunks<4, TAIL>(p, v, stride, n, out, dim, alpha); break;
    default: pv_chunks<5, TAIL>(p, v, stride, n, out, dim, alpha); break;
  }
}

// P v over all output dims, MAX_CHUNKS chunks per pass; `v` points at the block's first key (pair).
template <typename T>
inline void pv(const T* p, const T* v, int64_t stride, int64_t n, float* out, int64_t dim, const float* alpha) {
  const int full = static_cast<int>(dim / LANES);
  const bool tail = dim % LANES != 0;
  const int64_t elems = std::is_same<T, float>::value ? 1 : 2;  // bfloat16: chunks hold two keys
  int c0 = 0;
  bool last = false;
  while (!last) {
    const int chunks = std::min(MAX_CHUNKS, full - c0);
    last = c0 + MAX_CHUNKS >= full;
    const T* vc = v + c0 * LANES * elems;
    if (last && tail) pv_dispatch<T, true>(chunks, p, vc, stride, n, out + c0 * LANES, dim, alpha);
    else pv_dispatch<T, false>(chunks, p, vc, stride, n, out + c0 * LANES, dim, alpha);
    c0 += MAX_CHUNKS;
  }
}

// ---- one task ---------------------------------------------------------------------------------------------------

// The value pointer and stride for a key block starting at key `key0`, and the count P v runs over.
inline const c10::BFloat16* block_values(const Head<c10::BFloat16>& h, int64_t key0) {
  return h.v + (key0 / 2) * 2 * h.dim;
}
inline const float* block_values(const Head<float>& h, int64_t key0) { return h.v + key0 * h.v_stride; }
inline int64_t value_stride(const Head<c10::BFloat16>& h) { return 2 * h.dim; }
inline int64_t value_stride(const Head<float>& h) { return h.v_stride; }
inline int64_t block_steps(const Head<c10::BFloat16>&, int64_t groups, int64_t) { return groups * LANES / 2; }
inline int64_t block_steps(const Head<float>&, int64_t, int64_t valid_keys) { return valid_keys; }

template <typename T, int G>
void tile_block(const Head<T>& h, Scratch<T>& s, const T* q, int64_t q_stride, int64_t tile, int64_t key0) {
  const int64_t groups_before = key0 / LANES;
  const T* kp = h.k_packed + groups_before * LANES * h.dim;
  const int64_t valid = std::min<int64_t>(G * LANES, h.keys - key0);
  __m512 acc[ROWS][BLOCK_GROUPS];
  scores<G>(q, q_stride, kp, h.dim, acc);
  float alpha[ROWS];
  const int64_t r0 = tile * ROWS;
  softmax_block<T, G>(acc, static_cast<int>(valid - (G - 1) * LANES), h.log2e_scale, s.max.data() + r0,
                      s.sum.data() + r0 * LANES, s.p, alpha);
  pv<T>(s.p, block_values(h, key0), value_stride(h), block_steps(h, G, valid), s.out.data() + r0 * h.dim, h.dim,
        alpha);
}

template <typename T>
void tile_block_any(int groups, const Head<T>& h, Scratch<T>& s, const T* q, int64_t qs, int64_t tile, int64_t k0) {
  switch (groups) {
    case 1: tile_block<T, 1>(h, s, q, qs, tile, k0); break;
    case 2: tile_block<T, 2>(h, s, q, qs, tile, k0); break;
    case 3: tile_block<T, 3>(h, s, q, qs, tile, k0); break;
    default: tile_block<T, 4>(h, s, q, qs, tile, k0); break;
  }
}

inline void store_row(c10::BFloat16* dst, const float* src, float inv, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) dst[c] = c10::BFloat16(src[c] * inv);
}
inline void store_row(float* dst, const float* src, float inv, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c) dst[c] = src[c] * inv;
}

template <typename T>
void run_task(const Head<T>& h, Scratch<T>& s) {
  const int64_t tiles = (h.rows + ROWS - 1) / ROWS, padded = tiles * ROWS;
  s.out.assign(padded * h.dim, 0.0f);
  s.max.assign(padded, -std::numeric_limits<float>::infinity());
  s.sum.assign(padded * LANES, 0.0f);
  const int64_t short_rows = h.rows - (tiles - 1) * ROWS;
  if (short_rows < ROWS) {  // the last micro-tile's rows, zero-padded to ROWS
    s.q_pad.assign(ROWS * h.dim, T(0));
    for (int64_t r = 0; r < short_rows; ++r)
      std::memcpy(s.q_pad.data() + r * h.dim, h.q + ((tiles - 1) * ROWS + r) * h.q_stride, h.dim * sizeof(T));
  }
  const int64_t block = BLOCK_GROUPS * LANES;
  for (int64_t key0 = 0; key0 < h.keys; key0 += block) {
    const int groups = static_cast<int>((std::min(block, h.keys - key0) + LANES - 1) / LANES);
    for (int64_t t = 0; t < tiles; ++t) {
      const bool pad = t == tiles - 1 && short_rows < ROWS;
      const T* q = pad ? s.q_pad.data() : h.q + t * ROWS * h.q_stride;
      tile_block_any<T>(groups, h, s, q, pad ? h.dim : h.q_stride, t, key0);
    }
  }
  for (int64_t r = 0; r < h.rows; ++r)
    store_row(h.out + r * h.out_stride, s.out.data() + r * h.dim,
              1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(s.sum.data() + r * LANES)), h.dim);
}

// ---- packing ----------------------------------------------------------------------------------------------------

// keys (M, D) rows -> [group][pair][16 keys x 2] (bfloat16) / [group][dim][16 keys] (float32), zero-padded keys.
template <typename T>
void pack_keys(const T* k, int64_t stride, int64_t keys, int64_t dim, T* dst) {
  const int64_t groups = (keys + LANES - 1) / LANES;
  const int64_t per = std::is_same<T, float>::value ? 1 : 2;  // elements per packed lane
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < dim; c += per)
      for (int64_t l = 0; l < LANES; ++l) {
        const int64_t key = g * LANES + l;
        T* d = dst + ((g * dim + c) * LANES) + l * per;
        for (int64_t e = 0; e < per; ++e) d[e] = key < keys ? k[key * stride + c + e] : T(0);
      }
}

// bfloat16 values (M, D) rows -> [pair of keys][chunk of 16 dims][16 dims x 2 keys] (+ a tail of 8 dims x 2).
void pack_values(const c10::BFloat16* v, int64_t stride, int64_t keys, int64_t dim, c10::BFloat16* dst) {
  const int64_t pairs = (keys + LANES - 1) / LANES * LANES / 2;
  for (int64_t j = 0; j < pairs; ++j)
    for (int64_t c = 0; c < dim; ++c)
      for (int64_t e = 0; e < 2; ++e) {
        const int64_t key = 2 * j + e;
        dst[j * 2 * dim + (c / LANES) * 2 * LANES + (c % LANES) * 2 + e] =
            key < keys ? v[key * stride + c] : c10::BFloat16(0.0f);
      }
}

// ---- the operator -----------------------------------------------------------------------------------------------

template <typename T>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, double scale,
                    int64_t block_rows) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), M = k.size(2), D = q.size(3);
  const int64_t groups = (M + LANES - 1) / LANES, per_head = groups * LANES * D;
  const bool bf16 = !std::is_same<T, float>::value;
  at::Tensor kp = at::empty({B * H * per_head}, q.options());
  at::Tensor vp = bf16 ? at::empty({B * H * per_head}, q.options()) : at::Tensor();
  const T* qd = q.data_ptr<T>();
  const T* kd = k.data_ptr<T>();
  const T* vd = v.data_ptr<T>();
  T* kpd = kp.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hh = bh % H;
      pack_keys<T>(kd + b * k.stride(0) + hh * k.stride(1), k.stride(2), M, D, kpd + bh * per_head);
      if constexpr (!std::is_same<T, float>::value)
        pack_values(vd + b * v.stride(0) + hh * v.stride(1), v.stride(2), M, D, vp.data_ptr<T>() + bh * per_head);
    }
  });
  const int64_t blocks = (N + block_rows - 1) / block_rows, tasks = B * H * blocks;
  std::atomic<int64_t> next{0};
  const float log2e_scale = static_cast<float>(scale * 1.4426950408889634);
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s;
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t t = next++; t < tasks; t = next++) {
        const int64_t bh = t / blocks, row0 = (t % blocks) * block_rows, b = bh / H, hh = bh % H;
        Head<T> h;
        h.q = qd + b * q.stride(0) + hh * q.stride(1) + row0 * q.stride(2);
        h.q_stride = q.stride(2);
        h.k_packed = kpd + bh * per_head;
        h.v = bf16 ? vp.data_ptr<T>() + bh * per_head : vd + b * v.stride(0) + hh * v.stride(1);
        h.v_stride = v.stride(2);
        h.out = out.data_ptr<T>() + b * out.stride(0) + hh * out.stride(1) + row0 * out.stride(2);
        h.out_stride = out.stride(2);
        h.rows = std::min(block_rows, N - row0);
        h.keys = M;
        h.dim = D;
        h.log2e_scale = log2e_scale;
        run_task<T>(h, s);
      }
  });
}

#endif  // SP_HAVE_AVX512

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     int64_t block_rows) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "stablepipe attention: q, k, v must be (B, H, N, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtypes differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.sizes() == v.sizes(), "shapes differ");
  TORCH_CHECK(q.size(3) == k.size(3) && q.size(3) % 8 == 0, "head size must match and be a multiple of 8");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "last dimension must be contiguous");
  TORCH_CHECK(k.size(2) > 0 && block_rows > 0, "need at least one key and block_rows > 0");
  // (B, N, H, D) memory, returned as its (B, H, N, D) view
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
#if SP_HAVE_AVX512
  if (q.scalar_type() == at::kFloat) {
    attention_impl<float>(q, k, v, out, scale, block_rows);
    return out;
  }
#if SP_HAVE_BF16
  if (q.scalar_type() == at::kBFloat16) {
    attention_impl<c10::BFloat16>(q, k, v, out, scale, block_rows);
    return out;
  }
#endif
#endif
  TORCH_CHECK(false, "stablepipe attention: this build has no kernel for ", q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(stablepipe_kernels, m) {
  m.def("capabilities() -> int", &capabilities);
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale, int block_rows) -> Tensor", &attention);
}
