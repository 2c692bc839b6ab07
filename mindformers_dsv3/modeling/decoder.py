"""One transformer block: MLA attention plus a dense MLP or DeepSeekMoE."""
import mindspore as ms
from mindspore import Tensor, nn

from mindformers_dsv3.modeling.attention import MLAttention
from mindformers_dsv3.modeling.layers import GatedMLP, RMSNorm
from mindformers_dsv3.modeling.moe import MoE
from mindformers_dsv3.parallel.comm import GroupAllReduce
from mindformers_dsv3.quant.config import layer_schemes


class DecoderLayer(nn.Cell):
    def __init__(self, config, layer_idx, num_cache_slots, param_dtype, compute_dtype, par=None):
        super().__init__()
        eps = config.rms_norm_eps
        q = layer_schemes(config.quant_spec(), layer_idx)   # W8A8 scheme of each module (quant/config.py)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, param_dtype, bias=q["input_layernorm"])
        self.self_attn = MLAttention(config, num_cache_slots, param_dtype, compute_dtype, par, schemes=q)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, param_dtype)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoE(config, param_dtype, compute_dtype, par, schemes=q)
        else:
            ways = par.mp if par is not None else 1
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, std=config.initializer_range,
                                param_dtype=param_dtype, compute_dtype=compute_dtype, ways=ways,
                                reduce=GroupAllReduce(par.tp_group) if ways > 1 else None,
                                schemes=(q["mlp.gate_up_proj"], q["mlp.down_proj"]))

    def construct(self, x, cos, sin, mask, write_rows=None, write_slots=None, read_slots=None):
        """Returns (hidden, balance loss of this layer: 0 for dense layers and at inference)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, write_rows, write_slots, read_slots)
        if self.is_moe:
            out, aux = self.mlp(self.post_attention_layernorm(h))
            return h + out, aux
        return h + self.mlp(self.post_attention_layernorm(h)), Tensor(0.0, ms.float32)
