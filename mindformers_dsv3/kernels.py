"""The one seam between portable reference ops and device-specific fused ops.

Every op here has a portable implementation that runs on a plain CPU (fp32
compute) and is the numerical reference. Where an Ascend fused kernel exists
(RmsNorm, GroupedMatmul, ...) it is chosen here, on the device target, and
nowhere else in the model code.
"""
import numpy as np
import mindspore as ms
from mindspore import ops, nn

__all__ = ["on_ascend", "rms_norm", "silu", "GroupedMatmul", "argmax"]


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
    return x * ops.sigmoid(x)


def argmax(x, dim=-1):
    """Argmax with a CPU kernel (stock GenerationMixin's mint.argmax is Ascend-only)."""
    return ops.Argmax(axis=dim, output_type=ms.int32)(x)


# ---------------------------------------------------------------- grouped matmul
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


def _pyfunc(func, out_shape, out_dtype):
    return ops.Custom(func, out_shape=out_shape, out_dtype=out_dtype, func_type="pyfunc")


class GroupedMatmul(nn.Cell):
    """y[rows of group e] = x[rows of group e] @ w[e] for rows sorted by group.

    Work is proportional to the number of rows, not to the number of groups
    times the rows: the cost of a routed-expert layer follows the activated
    experts. On Ascend this is the fused GroupedMatmul kernel; elsewhere a
    host kernel (numpy) with its own backward, so training works on CPU too.
    """

    def __init__(self):
        super().__init__()
        self.ascend = on_ascend()
        if self.ascend:  # pragma: no cover - needs an Ascend device
            from mindspore.ops.auto_generate.gen_ops_prim import GroupedMatmul as _Gmm
            self.gmm = _Gmm(split_item=3, group_type=0)
            self.cumsum = ops.CumSum()
        else:
            grad_x = _pyfunc(_gmm_grad_x, lambda d, w, c: (d[0], w[1]), lambda d, w, c: d)
            grad_w = _pyfunc(_gmm_grad_w, lambda x, d, c, w: w, lambda x, d, c, w: w)

            def bprop(x, w, counts, out, dout):
                return grad_x(dout, w, counts), grad_w(x, dout, counts, w), ops.zeros_like(counts)

            self.gmm = ops.Custom(_gmm_forward, out_shape=lambda x, w, c: (x[0], w[2]),
                                  out_dtype=lambda x, w, c: x, func_type="pyfunc", bprop=bprop)

    def construct(self, x, w, counts):
        if self.ascend:  # pragma: no cover
            group_list = self.cumsum(counts.astype(ms.int64), 0)
            return self.gmm([x], [w], None, None, None, None, None, group_list)[0]
        return self.gmm(x, w, counts)
