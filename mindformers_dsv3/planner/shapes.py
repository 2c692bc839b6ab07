"""The model's parameter shapes for the planner, from a shape-only build.

The planner builds DeepseekV3ForCausalLM from a copy of the config without ``parallel_config`` (one whole
rank) and ``checkpoint_name_or_path`` (a plan never reads weights), inside ``no_init_parameters`` (no weight
memory). A W8A8 ``quantization_config`` stays: the model builds its quantized layers (int8 weights, float32
scales and vectors, int32 quant_bias, norm biases), and the planner counts exactly those parameters and dtypes.
An FP8 checkpoint block (weight_block_size) describes a checkpoint, not the model: it goes. The model needs to
know nothing about the planner.
"""
import copy
import json

from mindformers_dsv3.units import dtype_name

__all__ = ["shape_only_config", "no_init_model", "model_parameters"]

_PARAM_CACHE = {}


def shape_only_config(config):
    """A copy of `config` that builds one whole rank and reads nothing: no parallel_config or checkpoint; the
    W8A8 settings stay, an FP8 checkpoint's block sizes go (the input config is not changed)."""
    single = copy.deepcopy(config)
    single.parallel_config = None
    single.checkpoint_name_or_path = ""
    if single.quant_spec() is None and getattr(single, "quantization_config", None) is not None:
        single.quantization_config = None   # FP8 block sizes: a checkpoint format, the model is bf16
    return single


def no_init_model(config):
    """DeepseekV3ForCausalLM of shape_only_config(config), built without weight memory (no_init_parameters)."""
    from mindspore.nn.utils import no_init_parameters
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    with no_init_parameters():
        return DeepseekV3ForCausalLM(shape_only_config(config))


def model_parameters(config):
    """[(name, shape, dtype name)] of every parameter of DeepseekV3ForCausalLM(config), single rank; cached."""
    key = json.dumps([config.to_hf_dict(), config.param_init_type, config.compute_dtype, config.use_past,
                      config.num_blocks, config.block_size, config.seq_length], sort_keys=True, default=str)
    if key not in _PARAM_CACHE:
        model = no_init_model(config)
        _PARAM_CACHE[key] = [(name, tuple(int(d) for d in p.shape), dtype_name(p.dtype))
                             for name, p in model.parameters_and_names()]
    return _PARAM_CACHE[key]
