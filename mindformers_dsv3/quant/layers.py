"""W8A8 layers: a quantized Linear (static or dynamic activations) and the parameters of the quantized
routed experts. The arithmetic is the kernel seam's (kernels.QuantMatmul / GroupedQuantMatmul;
docs/en/quantization.md); parameter names, dtypes and shapes are the ones the loader and the planner
expect (for a Linear at prefix P):

* ``P.weight`` int8 (N, K), ``P.weight_scale`` float32 (N,);
* static (W8A8) only: ``P.input_scale`` float32 (1,), ``P.input_offset`` float32 (1,) (an integer-valued
  zero point), ``P.deq_scale`` float32 (N,) (= input_scale * weight_scale), ``P.quant_bias`` int32 (N,).

Split inference: rows (column-parallel) or columns (row-parallel) slice like the float weight; the
(N,) vectors follow the rows; input_scale / input_offset are replicated. Row-parallel static layers
(o_proj): every rank's int32 sum covers its K slice only, and sum over ranks of those sums is the whole
sum, so the whole ``quant_bias`` (which holds ``-input_offset * sum_k W[n, k]`` over all of K) is added
once: the first rank of the tensor-parallel group holds it, the others hold zeros
(``ROW_PARALLEL_QUANT_BIAS``). Row-parallel dynamic layers (down_proj, the experts' down) quantize
each rank's slice per token with its own scale.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, nn
from mindspore.common.initializer import Constant, Initializer, initializer

from mindformers_dsv3.kernels import QuantMatmul

__all__ = ["QuantLinear", "RandomInt8", "ROW_PARALLEL_QUANT_BIAS", "int8_param", "scale_param"]

ROW_PARALLEL_QUANT_BIAS = "first tensor-parallel rank holds quant_bias, the other ranks zeros"
# initial values of a model built without a checkpoint (random tests, the planner): weights uniform
# in [-127, 127] times a scale that gives about the float init's spread, activations in about [-4, 4]
_INIT_INPUT_SCALE = 4.0 / 127


class RandomInt8(Initializer):
    """Uniform int8 in [-127, 127] (the symmetric weight range; reference section 5)."""

    def _initialize(self, arr):
        arr[...] = np.random.randint(-127, 128, size=arr.shape).astype(arr.dtype)


def int8_param(shape, name=None):
    return Parameter(initializer(RandomInt8(), shape, ms.int8), name=name, requires_grad=False)


def scale_param(shape, value, dtype=ms.float32, name=None):
    return Parameter(initializer(Constant(value), shape, dtype), name=name, requires_grad=False)


def weight_scale_for(std):
    """A per-channel weight scale that makes uniform int8 codes spread about as N(0, std)."""
    return float(std) * np.sqrt(3.0) / 127.0 if std else 1.0 / 127.0


class QuantLinear(nn.Cell):
    """y = dequant(quant(x) @ W^T): int8 weight (out, in), the HuggingFace layout; W8A8 static
    (``static=True``, per-tensor asymmetric activations) or W8A8_DYNAMIC (per-token symmetric)."""

    PARALLEL_ROLE = "linear"  # what parallel/sharding.py shards it as

    def __init__(self, in_features, out_features, static, std=0.02, compute_dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.static = bool(static)
        self.scheme = "W8A8" if self.static else "W8A8_DYNAMIC"
        self.compute_dtype = compute_dtype
        w_scale = weight_scale_for(std)
        self.weight = int8_param((out_features, in_features))
        self.weight_scale = scale_param((out_features,), w_scale)
        if self.static:
            self.input_scale = scale_param((1,), _INIT_INPUT_SCALE)
            self.input_offset = scale_param((1,), 0.0)
            self.deq_scale = scale_param((out_features,), float(np.float32(_INIT_INPUT_SCALE) * np.float32(w_scale)))
            self.quant_bias = scale_param((out_features,), 0, ms.int32)
        self.matmul = QuantMatmul(self.static)

    def construct(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.static:
            y = self.matmul(flat, self.weight, self.input_scale, self.input_offset, self.deq_scale, self.quant_bias)
        else:
            y = self.matmul(flat, self.weight, self.weight_scale)
        return y.astype(self.compute_dtype).reshape(shape[:-1] + (self.out_features,))
