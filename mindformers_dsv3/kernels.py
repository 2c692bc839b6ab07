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
