"""The model hooks stock MindFormers calls to load a HuggingFace safetensors folder.

`Trainer` with `load_checkpoint: <HF folder>` and `load_ckpt_format: safetensors`
reads every tensor with `mindspore.load_checkpoint`, asks the model whether a name
is a HuggingFace one (`convert_name`), converts the dict (`convert_weight_dict`)
and the index (`convert_map_dict`). All three derive from the name table.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import dequantize_block_fp8


def hf_to_ms_names(config):
    """{HF tensor name: MindSpore parameter name} (experts of a layer share one stacked parameter)."""
    out = {hf: e.ms for e in names.expand(config) for hf in e.hf}
    out.update(names.shared_hf_names(config))
    return out


FP8_THROUGH_STOCK = (
    "an FP8 HuggingFace checkpoint (it has '*_scale_inv' tensors) cannot go through `load_checkpoint`: "
    "MindSpore 2.7.1's safetensors reader has no F8_E4M3 dtype. Set `model.model_config."
    "checkpoint_name_or_path` to this folder instead (the model streams and dequantizes it), or convert "
    "it once with `dsv3-convert hf-to-ms` / `fp8-to-bf16`")


def convert_name(config, name):
    """The MindSpore name of an HF tensor; MindSpore names and unknown names map to themselves.

    Stock MindFormers calls this on every tensor name of a `load_checkpoint` folder before it
    reads any data, so an FP8 folder is refused here with a clear message.
    """
    if name.endswith(names.SCALE_SUFFIX):
        raise CheckpointError(FP8_THROUGH_STOCK, tensor=name)
    return hf_to_ms_names(config).get(name, name)


def _as_numpy(value):
    if isinstance(value, (Tensor, Parameter)):
        if value.dtype == ms.bfloat16:
            value = value.astype(ms.float32)
        return value.asnumpy()
    return np.asarray(value)


def convert_weight_dict(config, source):
    """{HF name: tensor} -> {MindSpore name: Parameter}. Names already in MindSpore form pass through.

    FP8 weights are dequantized with their `<name>_scale_inv`; MTP copies of the embedding
    and head are dropped (the model shares the main ones). An entry with only some of its
    HF tensors present raises CheckpointError naming the missing one.
    """
    target = {}
    consumed = set()
    for entry in names.expand(config):
        present = [n for n in entry.hf if n in source]
        if not present:
            continue
        if len(present) != len(entry.hf):
            missing = next(n for n in entry.hf if n not in source)
            raise CheckpointError(f"needed with {present[0]!r} to build {entry.ms!r}", tensor=missing)
        arrays = []
        for name in entry.hf:
            array = _as_numpy(source[name])
            scale = name + names.SCALE_SUFFIX
            if scale in source:
                array = dequantize_block_fp8(array, _as_numpy(source[scale]), name=name)
                consumed.add(scale)
            arrays.append(array.astype(np.float32, copy=False))
        value = names.to_ms(entry, arrays, config)
        target[entry.ms] = Parameter(Tensor(value), name=entry.ms)
        consumed.update(entry.hf)
    consumed.update(n for n in names.shared_hf_names(config) if n in source)
    for name, value in source.items():
        if name not in consumed:
            target[name] = value
    return target


def convert_map_dict(config, weight_map):
    """{HF name: shard file} -> {MindSpore name: shard file of its first HF tensor}."""
    mapping = hf_to_ms_names(config)
    out = {}
    for name, shard in weight_map.items():
        if name.endswith(names.SCALE_SUFFIX):
            continue
        out.setdefault(mapping.get(name, name), shard)
    return out
