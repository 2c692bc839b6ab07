"""The one seam between portable reference ops and device-specific fused ops.

Every op here has a portable implementation that runs on a plain CPU (fp32
compute) and is the numerical reference. Where an Ascend fused kernel exists
(RmsNorm, GroupedMatmul, ...) it is chosen here, on the device target, and
nowhere else in the model code.
"""
import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile

import numpy as np
import mindspore as ms
from mindspore import ops, nn

logger = logging.getLogger(__name__)

__all__ = ["on_ascend", "rms_norm", "RMSNorm", "silu", "GroupedMatmul", "route_kernel", "cpu_kernel_library"]


def on_ascend():
    """True when the MindSpore device target is Ascend."""
    try:
        return ms.get_context("device_target") == "Ascend"
    except Exception:  # pragma: no cover - context not initialised
        return False


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""
    dtype = x.dtype
    xf = x.astype(ms.float32)
    var = ops.mean(ops.square(xf), -1, keep_dims=True)
    y = xf * ops.rsqrt(var + eps)
    return (y * weight.astype(ms.float32)).astype(dtype)


def silu(x):
    return ops.silu(x)


# ---------------------------------------------------------------- grouped matmul
# CPU: a small C++ library (compiled on first use with the system g++, linked against the oneDNN
# that ships inside MindSpore) run as `ops.Custom(func_type="aot")` kernels. They get pointers to
# MindSpore's own buffers: no copy of the expert weights or activations per call, and the output is
# written in place. A `pyfunc` kernel would get a copy of every input (all expert weights, each call)
# and its result is copied back. oneDNN's sgemm is also 2-3x faster than numpy's OpenBLAS on the
# few-row matmuls of small groups. Without a compiler the numpy (pyfunc) kernels are used.
_CPU_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
"""


def _cpu_threads():
    try:
        threads = int(ms.get_context("runtime_num_threads") or 0)
    except Exception:  # pragma: no cover
        threads = 0
    return max(1, min(threads or os.cpu_count() or 1, os.cpu_count() or 1))


_CPU_LIBRARY = {}


def cpu_kernel_library():
    """Path of the compiled CPU kernel library (built once per source and MindSpore install, cached
    under $XDG_CACHE_HOME/mindformers_dsv3 or ~/.cache), or None when it cannot be built here."""
    if "path" in _CPU_LIBRARY:
        return _CPU_LIBRARY["path"]
    path = None
    try:
        path = _build_cpu_library()
        ctypes.CDLL(path).dsv3_set_threads(_cpu_threads())
    except Exception as err:  # no compiler, no oneDNN in this MindSpore build, read-only disk ...
        logger.warning("mindformers_dsv3: CPU grouped-matmul kernels unavailable (%s); using numpy "
                       "host kernels (slower).", err)
        path = None
    _CPU_LIBRARY["path"] = path
    return path


def _build_cpu_library():
    ms_lib = os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")
    if not os.path.exists(os.path.join(ms_lib, "libdnnl.so.2")):
        raise FileNotFoundError(f"no libdnnl.so.2 in {ms_lib}")
    digest = hashlib.sha256((_CPU_SOURCE + ms_lib + ms.__version__).encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "mindformers_dsv3", "kernels")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        folder = os.path.join(tempfile.gettempdir(), f"mindformers_dsv3-{os.getuid()}")
        os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"dsv3_cpu_{digest}.so")
    if os.path.exists(target):
        return target
    with tempfile.TemporaryDirectory(dir=folder) as tmp:   # concurrent builders: atomic rename
        source = os.path.join(tmp, "dsv3_cpu.cc")
        with open(source, "w", encoding="utf-8") as f:
            f.write(_CPU_SOURCE)
        built = os.path.join(tmp, "dsv3_cpu.so")
        cmd = [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-o", built,
               source, f"-L{ms_lib}", "-l:libdnnl.so.2", f"-Wl,-rpath,{ms_lib}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.replace(built, target)
    return target


def _gmm_forward(x, w, counts):
    """Rows of x are sorted by group; rows of group e are multiplied by w[e]."""
    out = np.zeros((x.shape[0], w.shape[2]), dtype=x.dtype)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            np.matmul(x[start:start + c], w[e], out=out[start:start + c])
            start += c
    return out


def _gmm_grad_x(dy, w, counts):
    dx = np.zeros((dy.shape[0], w.shape[1]), dtype=dy.dtype)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            np.matmul(dy[start:start + c], w[e].T, out=dx[start:start + c])
            start += c
    return dx


def _gmm_grad_w(x, dy, counts, w):
    dw = np.zeros(w.shape, dtype=w.dtype)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            dw[e] = x[start:start + c].T @ dy[start:start + c]
            start += c
    return dw


def _custom(func, out_shape, out_dtype, func_type, bprop=None):
    return ops.Custom(func, out_shape=out_shape, out_dtype=out_dtype, func_type=func_type, bprop=bprop)


class GroupedMatmul(nn.Cell):
    """y[rows of group e] = x[rows of group e] @ w[e] for rows sorted by group.

    `counts` (E,) int32 holds the rows of each group; rows past sum(counts) (an extra group that no
    weight multiplies) come out 0. Work is proportional to the number of rows, not to the number of
    groups times the rows: the cost of a routed-expert layer follows the activated experts. On
    Ascend this is the fused GroupedMatmul kernel; on a CPU the `aot` kernels of
    `cpu_kernel_library()` (float32; other dtypes, or `backend="numpy"`, use numpy host kernels),
    each with its backward (grad_x = dy @ w[e]^T per group, grad_w[e] = x_e^T @ dy_e), so training
    works on CPU too.
    """

    def __init__(self, backend=None):
        super().__init__()
        self.ascend = on_ascend()
        self.backend = "ascend" if self.ascend else (backend or ("aot" if cpu_kernel_library() else "numpy"))
        if self.ascend:  # pragma: no cover - needs an Ascend device
            from mindspore.ops.auto_generate.gen_ops_prim import GroupedMatmul as _Gmm
            self.gmm = _Gmm(split_item=3, group_type=0)
            self.cumsum = ops.CumSum()
            return
        self.host = self._kernels("numpy")
        self.native = self.host if self.backend == "numpy" else self._kernels(self.backend)

    @staticmethod
    def _kernels(backend):
        if backend == "aot":
            lib = cpu_kernel_library()
            if lib is None:
                raise RuntimeError("CPU kernel library unavailable: use backend='numpy'")
            fwd, grad_x, grad_w = (f"{lib}:dsv3_gmm", f"{lib}:dsv3_gmm_t", f"{lib}:dsv3_gmm_dw")
        elif backend == "numpy":
            fwd, grad_x, grad_w = _gmm_forward, _gmm_grad_x, _gmm_grad_w
        else:
            raise ValueError(f"GroupedMatmul backend must be 'aot' or 'numpy', got {backend!r}")
        func_type = "aot" if backend == "aot" else "pyfunc"
        grad_x = _custom(grad_x, lambda d, w, c: (d[0], w[1]), lambda d, w, c: d, func_type)
        grad_w = _custom(grad_w, lambda x, d, c, w: w, lambda x, d, c, w: w, func_type)

        def bprop(x, w, counts, out, dout):
            return grad_x(dout, w, counts), grad_w(x, dout, counts, w), ops.zeros_like(counts)

        return _custom(fwd, lambda x, w, c: (x[0], w[2]), lambda x, w, c: x, func_type, bprop)

    def construct(self, x, w, counts):
        if self.ascend:  # pragma: no cover
            group_list = self.cumsum(counts.astype(ms.int64), 0)
            return self.gmm([x], [w], None, None, None, None, None, group_list)[0]
        if x.dtype == ms.float32 and w.dtype == ms.float32:
            return self.native(x, w, counts.astype(ms.int32))
        return self.host(x, w, counts)


# ---------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Cell):
    """`rms_norm` as one kernel where one exists: Ascend's fused RmsNorm; on a CPU the `aot` kernel
    of `cpu_kernel_library()` for float32 outside training (it has a backward, the composite's
    gradient written out, for gradients taken in eval mode); elsewhere, and in training, the composite.
    Called as norm(x, weight)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = float(eps)
        self.ascend = on_ascend()
        self.fused = None
        if not self.ascend and cpu_kernel_library():
            self.eps_tensor = ms.Tensor([self.eps], ms.float32)
            eps_value = self.eps

            def bprop(x, weight, eps, out, dout):
                h = x.shape[-1]
                scale = ops.rsqrt(ops.mean(ops.square(x), -1, keep_dims=True) + eps_value)
                normed = x * scale
                d_weight = (dout * normed).reshape(-1, h).sum(0)
                d_normed = dout * weight
                d_x = scale * (d_normed - normed * ops.mean(d_normed * normed, -1, keep_dims=True))
                return d_x, d_weight, ops.zeros_like(eps)

            self.fused = _custom(f"{cpu_kernel_library()}:dsv3_rms_norm", lambda x, w, e: x, lambda x, w, e: x,
                                 "aot", bprop)

    def construct(self, x, weight):
        if self.ascend:  # pragma: no cover - needs an Ascend device
            return ops.rms_norm(x, weight.astype(x.dtype), self.eps)[0]
        # training keeps the composite: MindSpore's recompute cannot take a custom op's bprop (graph cycle)
        if self.fused is not None and not self.training and x.dtype == ms.float32 and weight.dtype == ms.float32:
            return self.fused(x, weight, self.eps_tensor)
        return rms_norm(x, weight, self.eps)


# ---------------------------------------------------------------- routing
_ROUTE_METHODS = {"noaux_tc": 0, "greedy": 1, "group_limited_greedy": 2}


def route_kernel(top_k, n_group, topk_group, method, sigmoid, normalize, scaling):
    """DeepSeek-V3 routing as one CPU `aot` kernel for inference, or None where the library is not
    available (and on Ascend). Returns (op, cfg): op(logits (N,E) f32, bias (E,) f32, cfg) -> ids
    (N,k) int32, weights (N,k) f32, the semantics of modeling/moe.py Router.construct (which stays
    the reference and the training path); about 15 graph ops per MoE layer become one."""
    if on_ascend() or not cpu_kernel_library():
        return None
    cfg = ms.Tensor(np.array([top_k, n_group, topk_group, _ROUTE_METHODS[method], float(sigmoid),
                              float(normalize), scaling, 0.0], np.float32))
    op = _custom(f"{cpu_kernel_library()}:dsv3_route", lambda l, b, c: ((l[0], top_k), (l[0], top_k)),
                 lambda l, b, c: (ms.int32, ms.float32), "aot")
    return op, cfg
