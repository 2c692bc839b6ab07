"""The one seam between portable reference ops and device-specific fused ops.

Every op here has a portable implementation that runs on a plain CPU (fp32
compute) and is the numerical reference. Where an Ascend fused kernel exists
(RmsNorm, GroupedMatmul, ...) it is chosen here, on the device target, and
nowhere else in the model code.
"""
import numpy as np
import mindspore as ms
from mindspore import ops, nn

from .kernel_library import cpu_kernel_library

__all__ = ["on_ascend", "rms_norm", "RMSNorm", "silu", "GroupedMatmul", "route_kernel", "cpu_kernel_library",
           "QuantMatmul", "GroupedQuantMatmul"]


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
# CPU: the `aot` kernels of a small C++ library (kernel_library.py: compiled on first use, linked
# against the oneDNN inside MindSpore). They get pointers to MindSpore's own buffers: no copy of the
# expert weights or activations per call. Without a compiler the numpy (pyfunc) kernels are used.


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


# ---------------------------------------------------------------- W8A8 (docs/en/quantization.md)
# CPU: the `aot` kernels dsv3_qmm_static / dsv3_qmm_dynamic / dsv3_qgmm (exact int32 sums of int8 x int8;
# activation quantization inside the kernel). Without the library: the same arithmetic in numpy (pyfunc).
# Ascend: QuantV2 / DynamicQuant + QuantBatchMatmul / GroupedMatmulV4 (not runnable here: untested).


def _bf16_round(v):
    """float32 -> bfloat16 -> float32, round to nearest even."""
    u = np.ascontiguousarray(v, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return u.view(np.float32)


def _quantize_dynamic(x):
    s = (np.abs(x).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.rint(x / safe), -128, 127).astype(np.int32)
    return np.where(s > 0, q, 0), s


def _qmm_dynamic(x, w, scale):
    q, s = _quantize_dynamic(x)
    acc = q @ w.astype(np.int32).T
    return (acc.astype(np.float32) * _bf16_round(scale) * s).astype(np.float32)


def _qmm_static(x, w, input_scale, input_offset, deq_scale, quant_bias):
    recip = _bf16_round(np.float32(1) / _bf16_round(input_scale.astype(np.float32)))
    offset = np.float32(np.int8(input_offset.reshape(-1)[0]))
    q = np.clip(np.rint(x * recip + offset), -128, 127).astype(np.int32)
    acc = q @ w.astype(np.int32).T + quant_bias
    return (acc.astype(np.float32) * deq_scale).astype(np.float32)


def _qgmm(x, w, scale, counts):
    out = np.zeros((x.shape[0], w.shape[2]), np.float32)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            q, s = _quantize_dynamic(x[start:start + c])
            acc = q @ w[e].astype(np.int32)
            out[start:start + c] = acc.astype(np.float32) * _bf16_round(scale[e]) * s
            start += c
    return out


def _qgmm_ids(x, w, scale, ids):
    per = ids.shape[0] // x.shape[0]
    out = np.zeros((ids.shape[0], w.shape[2]), np.float32)
    for p, e in enumerate(ids.tolist()):
        if 0 <= e < w.shape[0]:
            q, s = _quantize_dynamic(x[p // per:p // per + 1])
            out[p] = (q @ w[e].astype(np.int32)).astype(np.float32) * _bf16_round(scale[e]) * s
    return out


class QuantMatmul(nn.Cell):
    """W8A8 linear y (M, N) float32 = x (M, K) times an int8 weight (N, K) (reference section 2).

    `static=True`: construct(x, w, input_scale, input_offset, deq_scale, quant_bias), per-tensor
    asymmetric activations; `static=False`: construct(x, w, weight_scale), per-token symmetric.
    """

    def __init__(self, static, backend=None):
        super().__init__()
        self.static = static
        self.ascend = on_ascend()
        if self.ascend:  # pragma: no cover - needs an Ascend device
            from mindspore.ops.auto_generate import gen_ops_prim as prims
            self.quant = prims.QuantV2() if static else prims.DynamicQuantExt()
            self.qbmm = prims.QuantBatchMatmul(transpose_x2=True, dtype=ms.bfloat16)
            return
        lib = cpu_kernel_library() if backend != "numpy" else None
        n_in = 6 if static else 3
        name = "dsv3_qmm_static" if static else "dsv3_qmm_dynamic"
        func = f"{lib}:{name}" if lib else (_qmm_static if static else _qmm_dynamic)
        self.op = _custom(func, lambda x, w, *rest: (x[0], w[0]), lambda x, *rest: ms.float32,
                          "aot" if lib else "pyfunc")
        self.n_in = n_in

    def construct(self, x, w, *params):
        if self.ascend:  # pragma: no cover - needs an Ascend device
            return self._ascend(x, w, *params)
        return self.op(x.astype(ms.float32), w, *params)

    def _ascend(self, x, w, *params):  # pragma: no cover - needs an Ascend device
        x = x.astype(ms.bfloat16)
        if self.static:
            input_scale, input_offset, deq_scale, quant_bias = params
            recip = (1.0 / input_scale.astype(ms.bfloat16)).astype(ms.bfloat16)
            qx = self.quant(x, recip, input_offset.astype(ms.bfloat16), False, "ROUND", ms.int8)
            return self.qbmm(qx, w, deq_scale, None, quant_bias).astype(ms.float32)
        qx, token_scale = self.quant(x, None)
        return self.qbmm(qx, w, params[0].astype(ms.bfloat16), None, None, token_scale).astype(ms.float32)


class GroupedQuantMatmul(nn.Cell):
    """Grouped dynamic W8A8 (routed experts): rows of x (R, K) sorted by group, w (E, K, N) int8,
    scale (E, N) float32, counts (E,) int32 -> (R, N) float32; every row quantized per token; rows
    past sum(counts) come out 0."""

    def __init__(self, backend=None):
        super().__init__()
        self.ascend = on_ascend()
        if self.ascend:  # pragma: no cover - needs an Ascend device
            from mindspore.ops.auto_generate import gen_ops_prim as prims
            self.quant = prims.DynamicQuantExt()
            self.gmm = prims.GroupedMatmulV4()
            self.cumsum = ops.CumSum()
            return
        lib = cpu_kernel_library() if backend != "numpy" else None
        self.op = _custom(f"{lib}:dsv3_qgmm" if lib else _qgmm, lambda x, w, s, c: (x[0], w[2]),
                          lambda x, w, s, c: ms.float32, "aot" if lib else "pyfunc")
        self.by_ids = _custom(f"{lib}:dsv3_qgmm_ids" if lib else _qgmm_ids, lambda x, w, s, i: (i[0], w[2]),
                              lambda x, w, s, i: ms.float32, "aot" if lib else "pyfunc")

    def pairs(self, x, w, scale, ids):
        """CPU, few pairs (decode): pair p multiplies expert ids[p] (no sorting); x holds one row per pair,
        or one per token (P = tokens * top_k, pair p reads row p // top_k); ids outside [0, E) -> 0."""
        return self.by_ids(x.astype(ms.float32), w, scale, ids.astype(ms.int32))

    def construct(self, x, w, scale, counts):
        if self.ascend:  # pragma: no cover - needs an Ascend device
            qx, token_scale = self.quant(x.astype(ms.bfloat16), None)
            group_list = self.cumsum(counts.astype(ms.int64), 0)
            out = self.gmm([qx], [w], None, [scale.astype(ms.bfloat16)], None, None, None, [token_scale],
                           group_list, split_item=3, group_type=0, output_dtype=ms.bfloat16)[0]
            return out.astype(ms.float32)
        return self.op(x.astype(ms.float32), w, scale, counts.astype(ms.int32))
