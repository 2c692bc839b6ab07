// The CPU kernel library of mindformers_dsv3 (see kernel_library.py): compiled on first use with the
// system g++ and linked against the oneDNN inside MindSpore; run as ops.Custom(func_type="aot") kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <thread>
#include <vector>

extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                          const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                          float *C, int64_t ldc);

static int g_threads = 1;
extern "C" void dsv3_set_threads(int n) { g_threads = n < 1 ? 1 : n; }

namespace {
// Row offsets of the groups: group e holds rows [start[e], start[e+1]); rows past the last group
// (the split case's extra group, not multiplied) are left to the caller.
bool Offsets(const int32_t *counts, int64_t groups, int64_t rows, std::vector<int64_t> *start) {
  start->assign(groups + 1, 0);
  for (int64_t e = 0; e < groups; ++e) {
    if (counts[e] < 0) return false;
    (*start)[e + 1] = (*start)[e] + counts[e];
  }
  return (*start)[groups] <= rows;
}

// fn(e) for every group, the groups split into contiguous parts of about equal cost over the threads.
template <class F>
void ForGroups(int64_t groups, const std::vector<int64_t> &cost, int64_t min_cost, F fn) {
  int64_t total = 0;
  for (int64_t e = 0; e < groups; ++e) total += cost[e];
  int parts = g_threads;
  if (parts > 1 && total < min_cost * parts) parts = static_cast<int>(total / min_cost);
  if (parts <= 1) {
    for (int64_t e = 0; e < groups; ++e) fn(e);
    return;
  }
  std::vector<int64_t> bound(parts + 1, groups);
  bound[0] = 0;
  int64_t acc = 0;
  int p = 1;
  for (int64_t e = 0; e < groups && p < parts; ++e) {
    acc += cost[e];
    while (p < parts && acc * parts >= total * p) bound[p++] = e + 1;
  }
  auto run = [&](int q) { for (int64_t e = bound[q]; e < bound[q + 1]; ++e) fn(e); };
  std::vector<std::thread> pool;
  for (int q = 1; q < parts; ++q) pool.emplace_back(run, q);
  run(0);
  for (auto &t : pool) t.join();
}

bool Is(const char *dtype, const char *want) { return std::strcmp(dtype, want) == 0; }
}  // namespace

// y (R,N): rows of group e of x (R,K) times w[e] (K,N) (transposed: dy (R,N) times w[e]^T -> (R,K)).
static int Gmm(void **params, int *ndims, int64_t **shapes, const char **dtypes, bool trans) {
  if (ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 1 || !Is(dtypes[0], "float32") ||
      !Is(dtypes[1], "float32") || !Is(dtypes[2], "int32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const int32_t *counts = static_cast<const int32_t *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t rows = shapes[0][0], in = shapes[0][1], groups = shapes[1][0];
  const int64_t k = shapes[1][1], n = shapes[1][2], out = trans ? k : n;
  if (in != (trans ? n : k) || shapes[2][0] != groups) return 2;
  std::vector<int64_t> start;
  if (!Offsets(counts, groups, rows, &start)) return 3;
  std::vector<int64_t> cost(groups);
  for (int64_t e = 0; e < groups; ++e) cost[e] = (start[e + 1] - start[e]) * k * n;
  ForGroups(groups, cost, int64_t(1) << 21, [&](int64_t e) {
    const int64_t c = start[e + 1] - start[e];
    if (c == 0) return;
    if (trans)
      dnnl_sgemm('N', 'T', c, k, n, 1.f, x + start[e] * n, n, w + e * k * n, n, 0.f, y + start[e] * k, k);
    else
      dnnl_sgemm('N', 'N', c, n, k, 1.f, x + start[e] * k, k, w + e * k * n, n, 0.f, y + start[e] * n, n);
  });
  if (start[groups] < rows) std::memset(y + start[groups] * out, 0, sizeof(float) * (rows - start[groups]) * out);
  return 0;
}

extern "C" int dsv3_gmm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                        void *stream, void *extra) {
  return nparam == 4 ? Gmm(params, ndims, shapes, dtypes, false) : 9;
}

extern "C" int dsv3_gmm_t(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  return nparam == 4 ? Gmm(params, ndims, shapes, dtypes, true) : 9;
}

// dw (E,K,N): dw[e] = x[rows of e]^T (K,c) times dy[rows of e] (c,N); zero for an empty group.
// Inputs x (R,K), dy (R,N), counts (E,), w (E,K,N) (for its shape only).
extern "C" int dsv3_gmm_dw(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 1 || ndims[3] != 3 ||
      !Is(dtypes[0], "float32") || !Is(dtypes[1], "float32") || !Is(dtypes[2], "int32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  const int32_t *counts = static_cast<const int32_t *>(params[2]);
  float *dw = static_cast<float *>(params[4]);
  const int64_t rows = shapes[0][0], k = shapes[0][1], n = shapes[1][1], groups = shapes[3][0];
  if (shapes[1][0] != rows || shapes[3][1] != k || shapes[3][2] != n || shapes[2][0] != groups) return 2;
  std::vector<int64_t> start;
  if (!Offsets(counts, groups, rows, &start)) return 3;
  std::vector<int64_t> cost(groups);
  for (int64_t e = 0; e < groups; ++e) cost[e] = (start[e + 1] - start[e] + 1) * k * n;
  ForGroups(groups, cost, int64_t(1) << 21, [&](int64_t e) {
    const int64_t c = start[e + 1] - start[e];
    float *out = dw + e * k * n;
    if (c == 0)
      std::memset(out, 0, sizeof(float) * k * n);
    else
      dnnl_sgemm('T', 'N', k, n, c, 1.f, x + start[e] * k, k, dy + start[e] * n, n, 0.f, out, n);
  });
  return 0;
}

// DeepSeek-V3 routing of N tokens over E experts as one kernel (inference): logits (N,E) float32,
// bias (E,) float32, cfg (8,) float32 = [top_k, n_group, topk_group, method (0 noaux_tc, 1 greedy,
// 2 group_limited_greedy), sigmoid (1) or softmax (0), normalize, scaling, unused] -> ids (N,k)
// int32, weights (N,k) float32. Same semantics as modeling/moe.py Router.construct; exact ties go to
// the lower index (MindSpore's and torch's TopK leave their order unspecified).
extern "C" int dsv3_route(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 1 || !Is(dtypes[0], "float32") ||
      !Is(dtypes[1], "float32") || !Is(dtypes[2], "float32"))
    return 1;
  const float *logits = static_cast<const float *>(params[0]);
  const float *bias = static_cast<const float *>(params[1]);
  const float *cfg = static_cast<const float *>(params[2]);
  int32_t *ids = static_cast<int32_t *>(params[3]);
  float *weights = static_cast<float *>(params[4]);
  const int64_t n = shapes[0][0], e = shapes[0][1];
  const int k = static_cast<int>(cfg[0]), groups = static_cast<int>(cfg[1]), keep = static_cast<int>(cfg[2]);
  const int method = static_cast<int>(cfg[3]);
  const bool sigmoid = cfg[4] > 0.5f, normalize = cfg[5] > 0.5f;
  const float scaling = cfg[6];
  if (shapes[1][0] != e || k < 1 || k > e || groups < 1 || e % groups || keep < 1 || keep > groups) return 2;
  const int64_t per = e / groups;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> scores(e), choice(e), group_score(groups);
  std::vector<int> order(std::max<int64_t>(e, groups));
  auto better = [](const float *v) { return [v](int a, int b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }; };
  for (int64_t t = 0; t < n; ++t) {
    const float *row = logits + t * e;
    if (sigmoid) {
      for (int64_t j = 0; j < e; ++j) scores[j] = 1.f / (1.f + std::exp(-row[j]));
    } else {
      float top = row[0], sum = 0.f;
      for (int64_t j = 1; j < e; ++j) top = std::max(top, row[j]);
      for (int64_t j = 0; j < e; ++j) sum += (scores[j] = std::exp(row[j] - top));
      for (int64_t j = 0; j < e; ++j) scores[j] /= sum;
    }
    for (int64_t j = 0; j < e; ++j) choice[j] = method == 0 ? scores[j] + bias[j] : scores[j];
    if (method != 1 && groups > 1) {
      for (int g = 0; g < groups; ++g) {
        const float *c = choice.data() + g * per;
        if (method == 0) {  // sum of the group's two best
          float a = neg_inf, b = neg_inf;
          for (int64_t j = 0; j < per; ++j) {
            if (c[j] > a) { b = a; a = c[j]; } else if (c[j] > b) { b = c[j]; }
          }
          group_score[g] = per > 1 ? a + b : a;
        } else {
          float a = neg_inf;
          for (int64_t j = 0; j < per; ++j) a = std::max(a, c[j]);
          group_score[g] = a;
        }
      }
      for (int g = 0; g < groups; ++g) order[g] = g;
      std::partial_sort(order.begin(), order.begin() + keep, order.begin() + groups, better(group_score.data()));
      std::vector<char> kept(groups, 0);
      for (int i = 0; i < keep; ++i) kept[order[i]] = 1;
      for (int g = 0; g < groups; ++g)
        if (!kept[g]) std::fill(choice.begin() + g * per, choice.begin() + (g + 1) * per, neg_inf);
    }
    for (int64_t j = 0; j < e; ++j) order[j] = static_cast<int>(j);
    std::partial_sort(order.begin(), order.begin() + k, order.begin() + e, better(choice.data()));
    float total = 0.f;
    for (int i = 0; i < k; ++i) total += scores[order[i]];
    for (int i = 0; i < k; ++i) {
      ids[t * k + i] = order[i];
      const float w = scores[order[i]];
      weights[t * k + i] = (normalize && k > 1 ? w / (total + 1e-20f) : w) * scaling;
    }
  }
  return 0;
}

// y = x * rsqrt(mean(x^2, last dim) + eps) * w for x (..., H), w (H,), eps (1,): RMSNorm as one
// kernel (the composite is six graph ops, each a separate launch on a CPU).
extern "C" int dsv3_rms_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 4 || ndims[0] < 1 || ndims[1] != 1 || !Is(dtypes[0], "float32") || !Is(dtypes[1], "float32") ||
      !Is(dtypes[2], "float32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t h = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != h || h == 0) return 2;
  int64_t rows = 1;
  for (int i = 0; i + 1 < ndims[0]; ++i) rows *= shapes[0][i];
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * h;
    float *yr = y + r * h;
    float sum = 0.f;
    for (int64_t i = 0; i < h; ++i) sum += xr[i] * xr[i];
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
    for (int64_t i = 0; i < h; ++i) yr[i] = xr[i] * scale * w[i];
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// W8A8 (docs/en/quantization.md, reference section 2): int8 x int8 products summed exactly in int32.
// AVX2 cores where the CPU has AVX2 (checked at run time), plain loops elsewhere; integer sums do not
// depend on the order, so every version gives the same bits.
namespace {

// float -> bfloat16 -> float, round to nearest even (NaN kept quiet)
float Bf16Round(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    u = (u & 0xffff0000u) | ((u & 0xffffu) ? 0x400000u : 0u);
  } else {
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  }
  std::memcpy(&v, &u, 4);
  return v;
}

int8_t SaturateRound(float v) {  // round half to even, then clamp to [-128, 127]
  float r = std::nearbyint(v);
  if (!(r > -128.f)) r = -128.f;  // NaN -> -128 (as the clamp of a NaN compare)
  if (r > 127.f) r = 127.f;
  return static_cast<int8_t>(r);
}

// per-token symmetric: s = max|x| / 127, q = clamp(rint(x / s)); an all-zero row gives s = 0, q = 0
float QuantizeRowDynamic(const float *x, int64_t k, int8_t *q) {
  float top = 0.f;
  for (int64_t i = 0; i < k; ++i) top = std::max(top, std::fabs(x[i]));
  const float s = top / 127.f;
  for (int64_t i = 0; i < k; ++i) q[i] = s > 0.f ? SaturateRound(x[i] / s) : 0;
  return s;
}

template <class F>
void ForParts(int64_t items, int64_t cost, F fn) {  // fn(begin, end) over about equal parts of [0, items)
  int parts = g_threads;
  if (cost < (int64_t(1) << 20) * parts) parts = static_cast<int>(std::max<int64_t>(1, cost >> 20));
  parts = static_cast<int>(std::min<int64_t>(parts, items));
  if (parts <= 1) {
    fn(int64_t(0), items);
    return;
  }
  std::vector<std::thread> pool;
  for (int p = 1; p < parts; ++p) pool.emplace_back(fn, items * p / parts, items * (p + 1) / parts);
  fn(int64_t(0), items / parts);
  for (auto &t : pool) t.join();
}
// ---- the integer cores. Rows are taken up to 4 at a time so that each weight byte read serves 4 rows
// (prefill). AVX2: int8 widened to int16, products summed in pairs into int32 (vpmaddwd: exact, no
// saturation; |a*b + c*d| <= 2 * 128 * 128); other CPUs: the plain loops.
constexpr int kRows = 4;
constexpr int64_t kTransposeRows = 8;  // grouped: from this many rows of one expert, transpose its weight once

void DotRowsPlain(const int8_t *w, const int16_t *const *q, int rows, int64_t k, int32_t *out) {
  for (int r = 0; r < rows; ++r) {
    int32_t acc = 0;
    for (int64_t i = 0; i < k; ++i) acc += static_cast<int32_t>(q[r][i]) * static_cast<int32_t>(w[i]);
    out[r] = acc;
  }
}

__attribute__((target("avx2"))) void DotRowsAvx2(const int8_t *w, const int16_t *const *q, int rows, int64_t k,
                                                 int32_t *out) {
  __m256i acc[kRows];
  for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + i)));
    for (int r = 0; r < rows; ++r) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q[r] + i));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, qv));
    }
  }
  for (int r = 0; r < rows; ++r) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), acc[r]);
    int32_t sum = 0;
    for (int l = 0; l < 8; ++l) sum += lanes[l];
    for (int64_t j = i; j < k; ++j) sum += static_cast<int32_t>(q[r][j]) * static_cast<int32_t>(w[j]);
    out[r] = sum;
  }
}

// acc[r] (n) += sum_i q[r][i] * w[i, :] (the grouped (E, K, N) layout)
void AxpyRowsPlain(const int8_t *const *q, int rows, const int8_t *w, int64_t k, int64_t n, int32_t *const *acc) {
  for (int r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const int32_t a = q[r][i];
      if (a == 0) continue;
      const int8_t *row = w + i * n;
      for (int64_t j = 0; j < n; ++j) acc[r][j] += a * static_cast<int32_t>(row[j]);
    }
}

__attribute__((target("avx2"))) void AxpyRowsAvx2(const int8_t *const *q, int rows, const int8_t *w, int64_t k,
                                                  int64_t n, int32_t *const *acc) {
  int64_t i = 0;
  for (; i + 2 <= k; i += 2) {  // two weight rows at once: (w[i, j], w[i+1, j]) pairs times (q[i], q[i+1])
    __m256i pair[kRows];
    for (int r = 0; r < rows; ++r)
      pair[r] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(q[r][i])) |
                                  (static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(q[r][i + 1])))
                                   << 16)));
    const int8_t *w0 = w + i * n, *w1 = w0 + n;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w0 + j)));
      const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w1 + j)));
      const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
      for (int r = 0; r < rows; ++r) {
        const __m256i plo = _mm256_madd_epi16(lo, pair[r]), phi = _mm256_madd_epi16(hi, pair[r]);
        __m256i *dst = reinterpret_cast<__m256i *>(acc[r] + j);
        _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), _mm256_permute2x128_si256(plo, phi, 0x20)));
        _mm256_storeu_si256(dst + 1,
                            _mm256_add_epi32(_mm256_loadu_si256(dst + 1), _mm256_permute2x128_si256(plo, phi, 0x31)));
      }
    }
    for (; j < n; ++j)
      for (int r = 0; r < rows; ++r)
        acc[r][j] += static_cast<int32_t>(q[r][i]) * w0[j] + static_cast<int32_t>(q[r][i + 1]) * w1[j];
  }
  for (; i < k; ++i)
    for (int r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) acc[r][j] += static_cast<int32_t>(q[r][i]) * w[i * n + j];
}

int g_plain = 0;  // tests: dsv3_force_plain(1) runs the plain loops on an AVX2 CPU too

bool HasAvx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes && !g_plain;
}

void DotRows(const int8_t *w, const int16_t *const *q, int rows, int64_t k, int32_t *out) {
  HasAvx2() ? DotRowsAvx2(w, q, rows, k, out) : DotRowsPlain(w, q, rows, k, out);
}

void AxpyRows(const int8_t *const *q, int rows, const int8_t *w, int64_t k, int64_t n, int32_t *const *acc) {
  HasAvx2() ? AxpyRowsAvx2(q, rows, w, k, n, acc) : AxpyRowsPlain(q, rows, w, k, n, acc);
}

// y[r, j] = epilogue(r, j, acc) for the M x N outputs of q (M, K) times w (N, K)^T, split over the threads;
// the codes are widened to int16 once (not once per weight row)
template <class E>
void MatmulNK(const int8_t *q8, const int8_t *w, int64_t m, int64_t k, int64_t n, E epilogue) {
  std::vector<int16_t> wide(q8, q8 + m * k);
  const int16_t *q = wide.data();
  ForParts(n, m * n * k, [&](int64_t lo, int64_t hi) {
    const int16_t *rows[kRows];
    int32_t out[kRows];
    for (int64_t r0 = 0; r0 < m; r0 += kRows) {
      const int count = static_cast<int>(std::min<int64_t>(kRows, m - r0));
      for (int r = 0; r < count; ++r) rows[r] = q + (r0 + r) * k;
      for (int64_t j = lo; j < hi; ++j) {
        DotRows(w + j * k, rows, count, k, out);
        for (int r = 0; r < count; ++r) epilogue(r0 + r, j, out[r]);
      }
    }
  });
}

}  // namespace

extern "C" void dsv3_force_plain(int plain) { g_plain = plain; }

// Dynamic W8A8 linear: x (M,K) f32, w (N,K) int8, weight_scale (N) f32 -> y (M,N) f32,
// y = f32(acc) * bf16(weight_scale[n]) * s[m].
extern "C" int dsv3_qmm_dynamic(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 1 || !Is(dtypes[0], "float32") ||
      !Is(dtypes[1], "int8") || !Is(dtypes[2], "float32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int8_t *w = static_cast<const int8_t *>(params[1]);
  const float *ws = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || shapes[2][0] != n) return 2;
  std::vector<int8_t> q(m * k);
  std::vector<float> s(m), scale(n);
  for (int64_t r = 0; r < m; ++r) s[r] = QuantizeRowDynamic(x + r * k, k, q.data() + r * k);
  for (int64_t j = 0; j < n; ++j) scale[j] = Bf16Round(ws[j]);
  MatmulNK(q.data(), w, m, k, n, [&](int64_t r, int64_t j, int32_t acc) {
    y[r * n + j] = static_cast<float>(acc) * scale[j] * s[r];
  });
  return 0;
}

// Static W8A8 linear: x (M,K) f32, w (N,K) int8, input_scale (1), input_offset (1), deq_scale (N) f32,
// quant_bias (N) int32 -> y (M,N) f32: q = sat(rint(x * bf16(1 / bf16(input_scale)) + offset)),
// y = f32(acc + quant_bias[n]) * deq_scale[n].
extern "C" int dsv3_qmm_static(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 7 || ndims[0] != 2 || ndims[1] != 2 || !Is(dtypes[0], "float32") || !Is(dtypes[1], "int8") ||
      !Is(dtypes[2], "float32") || !Is(dtypes[3], "float32") || !Is(dtypes[4], "float32") ||
      !Is(dtypes[5], "int32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int8_t *w = static_cast<const int8_t *>(params[1]);
  const float in_scale = *static_cast<const float *>(params[2]);
  const float offset = static_cast<float>(static_cast<int8_t>(*static_cast<const float *>(params[3])));
  const float *deq = static_cast<const float *>(params[4]);
  const int32_t *qbias = static_cast<const int32_t *>(params[5]);
  float *y = static_cast<float *>(params[6]);
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || shapes[4][0] != n || shapes[5][0] != n) return 2;
  const float recip = Bf16Round(1.f / Bf16Round(in_scale));
  std::vector<int8_t> q(m * k);
  for (int64_t i = 0; i < m * k; ++i) {
    volatile float scaled = x[i] * recip;  // two roundings, as the reference: no fused multiply-add
    q[i] = SaturateRound(scaled + offset);
  }
  MatmulNK(q.data(), w, m, k, n, [&](int64_t r, int64_t j, int32_t acc) {
    y[r * n + j] = static_cast<float>(acc + qbias[j]) * deq[j];
  });
  return 0;
}

// Grouped dynamic W8A8 (routed experts): x (R,K) f32 rows sorted by group, w (E,K,N) int8, scale (E,N) f32,
// counts (E) int32 -> y (R,N) f32; each row quantized per token; rows past sum(counts) come out 0.
extern "C" int dsv3_qgmm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 2 || ndims[3] != 1 ||
      !Is(dtypes[0], "float32") || !Is(dtypes[1], "int8") || !Is(dtypes[2], "float32") || !Is(dtypes[3], "int32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int8_t *w = static_cast<const int8_t *>(params[1]);
  const float *ws = static_cast<const float *>(params[2]);
  const int32_t *counts = static_cast<const int32_t *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t rows = shapes[0][0], k = shapes[0][1], groups = shapes[1][0], n = shapes[1][2];
  if (shapes[1][1] != k || shapes[2][0] != groups || shapes[2][1] != n || shapes[3][0] != groups) return 2;
  std::vector<int64_t> start;
  if (!Offsets(counts, groups, rows, &start)) return 3;
  std::vector<int64_t> cost(groups);
  for (int64_t e = 0; e < groups; ++e) cost[e] = (start[e + 1] - start[e]) * k * n;
  ForGroups(groups, cost, int64_t(1) << 20, [&](int64_t e) {
    const int64_t c = start[e + 1] - start[e];
    if (c == 0) return;
    std::vector<float> scale(n), s(c);
    for (int64_t j = 0; j < n; ++j) scale[j] = Bf16Round(ws[e * n + j]);
    std::vector<int8_t> q(c * k);
    for (int64_t r = 0; r < c; ++r) s[r] = QuantizeRowDynamic(x + (start[e] + r) * k, k, q.data() + r * k);
    float *out = y + start[e] * n;
    const int8_t *we = w + e * k * n;
    if (c >= kTransposeRows) {  // many rows: the expert's (K, N) weight transposed once, then row dots
      std::vector<int8_t> wt(n * k);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < n; ++j) wt[j * k + i] = we[i * n + j];
      std::vector<int16_t> wide(q.begin(), q.end());
      const int16_t *rows_[kRows];
      int32_t dots[kRows];
      for (int64_t r0 = 0; r0 < c; r0 += kRows) {
        const int count = static_cast<int>(std::min<int64_t>(kRows, c - r0));
        for (int r = 0; r < count; ++r) rows_[r] = wide.data() + (r0 + r) * k;
        for (int64_t j = 0; j < n; ++j) {
          DotRows(wt.data() + j * k, rows_, count, k, dots);
          for (int r = 0; r < count; ++r) out[(r0 + r) * n + j] = static_cast<float>(dots[r]) * scale[j] * s[r0 + r];
        }
      }
      return;
    }
    std::vector<int32_t> acc(kRows * n);
    const int8_t *qrows[kRows];
    int32_t *arows[kRows];
    for (int64_t r0 = 0; r0 < c; r0 += kRows) {
      const int count = static_cast<int>(std::min<int64_t>(kRows, c - r0));
      for (int r = 0; r < count; ++r) qrows[r] = q.data() + (r0 + r) * k, arows[r] = acc.data() + r * n;
      std::fill(acc.begin(), acc.end(), 0);
      AxpyRows(qrows, count, we, k, n, arows);
      for (int r = 0; r < count; ++r)
        for (int64_t j = 0; j < n; ++j) out[(r0 + r) * n + j] = static_cast<float>(arows[r][j]) * scale[j] * s[r0 + r];
    }
  });
  if (start[groups] < rows) std::memset(y + start[groups] * n, 0, sizeof(float) * (rows - start[groups]) * n);
  return 0;
}

// Routed experts at decode (fewer pairs than experts): pair p multiplies its own expert ids[p], no sorting.
// x (R,K) f32 with R = P (row p) or R * top_k = P (row p / top_k), w (E,K,N) int8, scale (E,N) f32,
// ids (P) int32 -> y (P,N) f32; each row quantized per token; an id outside [0, E) gives a zero row.
extern "C" int dsv3_qgmm_ids(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 2 || ndims[3] != 1 ||
      !Is(dtypes[0], "float32") || !Is(dtypes[1], "int8") || !Is(dtypes[2], "float32") || !Is(dtypes[3], "int32"))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int8_t *w = static_cast<const int8_t *>(params[1]);
  const float *ws = static_cast<const float *>(params[2]);
  const int32_t *ids = static_cast<const int32_t *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t rows = shapes[0][0], k = shapes[0][1], groups = shapes[1][0], n = shapes[1][2], pairs = shapes[3][0];
  if (shapes[1][1] != k || shapes[2][0] != groups || shapes[2][1] != n || rows == 0 || pairs % rows) return 2;
  const int64_t per = pairs / rows;
  ForParts(pairs, pairs * k * n, [&](int64_t lo, int64_t hi) {
    std::vector<int8_t> q(k);
    std::vector<int32_t> acc(n);
    for (int64_t p = lo; p < hi; ++p) {
      float *out = y + p * n;
      const int64_t e = ids[p];
      if (e < 0 || e >= groups) {
        std::memset(out, 0, sizeof(float) * n);
        continue;
      }
      const float s = QuantizeRowDynamic(x + (p / per) * k, k, q.data());
      std::fill(acc.begin(), acc.end(), 0);
      const int8_t *qrow = q.data();
      int32_t *arow = acc.data();
      AxpyRows(&qrow, 1, w + e * k * n, k, n, &arow);
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(acc[j]) * Bf16Round(ws[e * n + j]) * s;
    }
  });
  return 0;
}
