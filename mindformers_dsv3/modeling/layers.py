"""Small building blocks: linear, RMSNorm, embedding, gated MLP."""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_dsv3.kernels import rms_norm, silu


def normal_param(shape, std, dtype, name=None):
    return Parameter(initializer(Normal(sigma=std), shape, dtype), name=name)


class Linear(nn.Cell):
    """y = x @ W^T (+ b); W is stored (out, in), the HuggingFace layout."""

    def __init__(self, in_features, out_features, bias=False, std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = normal_param((out_features, in_features), std, param_dtype)
        self.bias = Parameter(Tensor(np.zeros(out_features), param_dtype)) if bias else None
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).astype(self.compute_dtype),
                        self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.astype(self.compute_dtype)
        return y.reshape(shape[:-1] + (self.out_features,))


class RMSNorm(nn.Cell):
    def __init__(self, dim, eps, param_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(dim), param_dtype))
        self.eps = eps

    def construct(self, x):
        return rms_norm(x, self.weight, self.eps)


class Embedding(nn.Cell):
    def __init__(self, vocab_size, hidden_size, std=0.02, param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.weight = normal_param((vocab_size, hidden_size), std, param_dtype)
        self.compute_dtype = compute_dtype

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0).astype(self.compute_dtype)


class GatedMLP(nn.Cell):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one (2I, H) matrix."""

    def __init__(self, hidden_size, intermediate_size, std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, std=std,
                                   param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, std=std,
                                param_dtype=param_dtype, compute_dtype=compute_dtype)

    def construct(self, x):
        gate_up = self.gate_up_proj(x)
        gate = gate_up[..., :self.intermediate_size]
        up = gate_up[..., self.intermediate_size:]
        return self.down_proj(silu(gate) * up)
