"""Small building blocks: linear, RMSNorm, embedding, gated MLP.

With a `ParallelContext` (`par`, split inference; mindformers_dsv3.parallel.comm) the embedding is
vocabulary-parallel over the tensor-parallel group and the gated MLP holds its column / row slices;
`par=None` is the whole layer.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers_dsv3.kernels import RMSNorm as FusedRMSNorm, silu
from mindformers_dsv3.parallel.comm import GroupAllReduce
from mindformers_dsv3.quant.config import FLOAT, W8A8
from mindformers_dsv3.quant.layers import QuantLinear
from mindformers_dsv3.quant.stock import install_stock_quantizer_fallback

install_stock_quantizer_fallback()   # stock build_network with a W8A8 quantization_config (quant/stock.py)


def normal_param(shape, std, dtype, name=None):
    return Parameter(initializer(Normal(sigma=std), shape, dtype), name=name)


class Linear(nn.Cell):
    """y = x @ W^T (+ b); W is stored (out, in), the HuggingFace layout."""

    PARALLEL_ROLE = "linear"  # what parallel/sharding.py shards it as

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


def linear(in_features, out_features, scheme=FLOAT, std=0.02, param_dtype=ms.float32,
           compute_dtype=ms.float32, bias=False):
    """A Linear for a quantization scheme (quant/config.py): FLOAT -> Linear, W8A8 / W8A8_DYNAMIC -> QuantLinear."""
    if scheme == FLOAT:
        return Linear(in_features, out_features, bias=bias, std=std, param_dtype=param_dtype,
                      compute_dtype=compute_dtype)
    if bias:
        raise ValueError("a quantized Linear has no float bias (it is folded into quant_bias)")
    return QuantLinear(in_features, out_features, static=scheme == W8A8, std=std, compute_dtype=compute_dtype)


class RMSNorm(nn.Cell):
    """rmsnorm(x) * weight (+ bias: the smoothing shift of a W8A8 checkpoint, float32, when `bias`)."""

    PARALLEL_ROLE = "norm"  # what parallel/sharding.py shards it as

    def __init__(self, dim, eps, param_dtype=ms.float32, bias=False):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(dim), param_dtype))
        self.bias = Parameter(Tensor(np.zeros(dim), ms.float32)) if bias else None
        self.eps = eps
        self.norm = FusedRMSNorm(eps)

    def construct(self, x):
        y = self.norm(x, self.weight)
        if self.bias is not None:
            y = (y.astype(ms.float32) + self.bias).astype(y.dtype)
        return y


class Embedding(nn.Cell):
    """Token embedding; vocabulary-parallel over mp with `par` (unless vocab_emb_dp): rank t holds rows
    [t * V / mp, (t + 1) * V / mp), looks up the ids it holds, zeros the others, and the tp group sums."""

    PARALLEL_ROLE = "embedding"  # what parallel/sharding.py shards it as

    def __init__(self, vocab_size, hidden_size, std=0.02, param_dtype=ms.float32, compute_dtype=ms.float32,
                 par=None):
        super().__init__()
        self.ways = par.vocab_ways if par is not None else 1
        local = vocab_size // self.ways
        self.first = par.vocab_rank * local if par is not None else 0
        self.local_vocab = local
        self.weight = normal_param((local, hidden_size), std, param_dtype)
        self.compute_dtype = compute_dtype
        self.reduce = GroupAllReduce(par.tp_group) if self.ways > 1 else None

    def construct(self, input_ids):
        if self.reduce is None:
            return ops.gather(self.weight, input_ids, 0).astype(self.compute_dtype)
        local = input_ids - self.first
        inside = ops.logical_and(local >= 0, local < self.local_vocab)
        rows = ops.gather(self.weight, ops.where(inside, local, ops.zeros_like(local)), 0).astype(self.compute_dtype)
        rows = ops.where(inside.reshape(inside.shape + (1,)), rows, ops.zeros_like(rows))
        return self.reduce(rows)


class GatedMLP(nn.Cell):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one (2I, H) matrix; `schemes` (gate|up,
    down) quantize them (quant/config.py).

    Split `ways` ways (tensor parallel): this rank holds [gate rows; up rows] of its I / ways slice
    (column-parallel) and the matching columns of down (row-parallel); its output is a partial sum,
    summed by `reduce` (a GroupAllReduce) when given, else by the caller (MoE folds it into its own).
    """

    def __init__(self, hidden_size, intermediate_size, std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32, ways=1, reduce=None, schemes=(FLOAT, FLOAT)):
        super().__init__()
        self.intermediate_size = intermediate_size // ways
        kw = dict(std=std, param_dtype=param_dtype, compute_dtype=compute_dtype)
        self.gate_up_proj = linear(hidden_size, 2 * self.intermediate_size, schemes[0], **kw)
        self.down_proj = linear(self.intermediate_size, hidden_size, schemes[1], **kw)
        self.reduce = reduce

    def construct(self, x):
        gate_up = self.gate_up_proj(x)
        gate = gate_up[..., :self.intermediate_size]
        up = gate_up[..., self.intermediate_size:]
        out = self.down_proj(silu(gate) * up)
        if self.reduce is not None:
            out = self.reduce(out)
        return out
