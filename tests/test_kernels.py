"""CPU grouped matmul (mindformers_dsv3.kernels.GroupedMatmul): forward and both gradients of every
CPU backend against numpy, with uneven groups, empty groups and rows past the last group (the split
case's extra group, which no weight multiplies and which must come out 0)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindformers_dsv3.kernels import GroupedMatmul, cpu_kernel_library

BACKENDS = ["aot", "numpy"]

# (counts, rows, k, n): uneven, with empty groups (first, middle, last), all rows in one group,
# and rows past sum(counts)
CASES = [
    ([5, 0, 3, 1, 0, 7], 16, 24, 40),
    ([0, 0, 9, 0], 9, 24, 40),
    ([2, 4, 0, 1], 10, 24, 40),          # 3 rows of an extra group: output and grad_x rows 0, no weight
    ([0, 0, 0], 4, 24, 40),              # nothing multiplied at all
    # enough work (rows x k x n >= 2 x 2^21) for the CPU kernel to split the groups over 2 threads
    ([80, 1, 40, 0, 100, 3, 0, 29], 260, 128, 168),
]


def _reference(x, w, counts, dy):
    rows = x.shape[0]
    y = np.zeros((rows, w.shape[2]), np.float64)
    dx = np.zeros(x.shape, np.float64)
    dw = np.zeros(w.shape, np.float64)
    start = 0
    for e, c in enumerate(counts):
        sl = slice(start, start + c)
        y[sl] = x[sl].astype(np.float64) @ w[e]
        dx[sl] = dy[sl].astype(np.float64) @ w[e].T
        dw[e] = x[sl].T.astype(np.float64) @ dy[sl]
        start += c
    return y, dx, dw


class _Loss(nn.Cell):
    def __init__(self, gmm):
        super().__init__()
        self.gmm = gmm

    def construct(self, x, w, counts, dy):
        return (self.gmm(x, w, counts) * dy).sum()


def _skip_unavailable(backend):
    if backend == "aot" and cpu_kernel_library() is None:
        pytest.skip("CPU kernel library cannot be built here (no g++ or no oneDNN)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,rows,k,n", CASES)
def test_forward_and_gradients_match_numpy(backend, counts, rows, k, n):
    _skip_unavailable(backend)
    rng = np.random.default_rng(len(counts) * 100 + rows)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((len(counts), k, n)).astype(np.float32)
    dy = rng.standard_normal((rows, n)).astype(np.float32)
    y_ref, dx_ref, dw_ref = _reference(x, w, counts, dy)
    gmm = GroupedMatmul(backend=backend)
    assert gmm.backend == backend
    c = Tensor(np.array(counts, np.int32))
    y = gmm(Tensor(x), Tensor(w), c).asnumpy()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    dx, dw = ms.grad(_Loss(gmm), grad_position=(0, 1))(Tensor(x), Tensor(w), c, Tensor(dy))
    np.testing.assert_allclose(dx.asnumpy(), dx_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw.asnumpy(), dw_ref, rtol=1e-5, atol=1e-4)
    if sum(counts) < rows:
        assert not y[sum(counts):].any() and not dx.asnumpy()[sum(counts):].any()


def test_backends_agree_inside_a_graph_with_weights_as_parameters():
    """The aot kernels read MindSpore's own Parameter buffers: an in-graph weight update between
    calls must be seen by the next call (no stale host copy)."""
    _skip_unavailable("aot")
    rng = np.random.default_rng(7)
    counts = Tensor(np.array([3, 0, 5], np.int32))
    x = Tensor(rng.standard_normal((8, 16)).astype(np.float32))
    w0 = rng.standard_normal((3, 16, 12)).astype(np.float32)

    class Step(nn.Cell):
        def __init__(self, backend):
            super().__init__()
            self.w = ms.Parameter(Tensor(w0))
            self.gmm = GroupedMatmul(backend=backend)

        def construct(self, x, counts):
            y = self.gmm(x, self.w, counts)
            return ops.depend(y, ops.assign(self.w, self.w * 2.0))

    outs = {}
    for backend in BACKENDS:
        step = Step(backend)
        outs[backend] = [step(x, counts).asnumpy() for _ in range(3)]
    for i in range(3):
        np.testing.assert_allclose(outs["aot"][i], outs["numpy"][i], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(outs["aot"][i], outs["aot"][0] * 2 ** i, rtol=1e-5, atol=1e-4)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        GroupedMatmul(backend="cuda")
