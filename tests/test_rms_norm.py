"""RMSNorm kernel (mindformers_dsv3.kernels.RMSNorm): the CPU `aot` kernel and the composite ops,
forward and both gradients, against a float64 numpy reference."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindformers_dsv3.kernels import RMSNorm, cpu_kernel_library, rms_norm

EPS = 1e-6


def _reference(x, w, dy, eps=EPS):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    scale = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    normed = x * scale
    y = normed * w
    d_w = (dy * normed).reshape(-1, x.shape[-1]).sum(0)
    d_normed = dy * w
    d_x = scale * (d_normed - normed * (d_normed * normed).mean(-1, keepdims=True))
    return y, d_x, d_w


class _Composite(nn.Cell):
    def construct(self, x, w):
        return rms_norm(x, w, EPS)


class _Loss(nn.Cell):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def construct(self, x, w, dy):
        return (self.norm(x, w) * dy).sum()


@pytest.mark.parametrize("kind", ["kernel", "composite"])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 24), (1, 1, 512)])
def test_forward_and_gradients_match_numpy(kind, shape):
    if kind == "kernel" and cpu_kernel_library() is None:
        pytest.skip("no C++ compiler or oneDNN here: the composite is used")
    norm = RMSNorm(EPS) if kind == "kernel" else _Composite()
    if kind == "kernel":
        assert norm.fused is not None
        norm.set_train(False)
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x[0, ...] *= 1e-4                                   # a row of tiny values: eps matters there
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y_ref, dx_ref, dw_ref = _reference(x, w, dy)
    y = norm(Tensor(x), Tensor(w)).asnumpy()
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=1e-6)
    dx, dw = ops.GradOperation(get_all=True)(_Loss(norm))(Tensor(x), Tensor(w), Tensor(dy))[:2]
    np.testing.assert_allclose(dx.asnumpy(), dx_ref, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(dw.asnumpy(), dw_ref, rtol=2e-5, atol=1e-5)


def test_other_dtypes_use_the_composite():
    norm = RMSNorm(EPS)
    x = Tensor(np.ones((2, 8), np.float32)).astype(ms.float16)
    w = Tensor(np.full(8, 2.0, np.float32)).astype(ms.float16)
    y = norm(x, w)
    assert y.dtype == ms.float16
    np.testing.assert_allclose(y.asnumpy().astype(np.float32), 2.0, rtol=1e-3)

