"""The model hooks stock MindFormers calls to load a HuggingFace safetensors folder.

`Trainer` with `load_checkpoint: <HF folder>` and `load_ckpt_format: safetensors`
reads every tensor with `mindspore.load_checkpoint`, asks the model whether a name
is a HuggingFace one (`convert_name`), converts the dict (`convert_weight_dict`)
and the index (`convert_map_dict`). All derive from the name table, built once per
config (`names.hf_to_ms`), so each hook costs O(1) per tensor name. Tensors are checked
with `names.check_tensor`, as the loader's and FP8 dequantized with fp8.py, as the loader does.
An msModelSlim W8A8 model (config.quant_spec()): int8 weights stay int8, the W8A8 vectors and headers are
checked by msmodelslim.check_source (the loader's checks), `weight_offset`s are checked and dropped.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor

from mindformers_dsv3.checkpoint import fp8, msmodelslim, names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.loader import NP_OF_MS
from mindformers_dsv3.checkpoint.names import check_tensor

KEY = "model.model_config.checkpoint_name_or_path"


def hf_to_ms_names(config):
    """{HF tensor name: MindSpore parameter name} (experts of a layer share one stacked parameter); a copy."""
    return dict(names.hf_to_ms(config))


FP8_THROUGH_STOCK = (
    "an FP8 HuggingFace checkpoint (it has '*_scale_inv' tensors) cannot go through `load_checkpoint`: "
    f"MindSpore 2.7.1's safetensors reader has no F8_E4M3 dtype. Set `{KEY}` to this folder instead, with "
    "`load_checkpoint: null` (the model streams and dequantizes it), or convert it once with `dsv3-convert "
    "hf-to-ms` / `fp8-to-bf16`")
SPLIT_THROUGH_STOCK = (
    "a split model (parallel_config over several ranks) cannot load a HuggingFace checkpoint through the "
    "top-level `load_checkpoint`: stock MindFormers does not slice it for this model. Set `load_checkpoint: null` "
    f"(not '': stock Trainer.predict drops `{KEY}` for any string) and `{KEY}` to the folder (each rank reads "
    "its own slices)")


def convert_name(config, name, split=False):
    """The MindSpore name of an HF tensor; MindSpore names and unknown names map to themselves.

    Stock MindFormers calls this on every tensor name of a `load_checkpoint` folder before it
    reads any data, so an FP8 folder, or any HF folder for a split model (`split`), is refused
    here with the key to use instead.
    """
    if name.endswith(names.SCALE_SUFFIX):
        raise CheckpointError(FP8_THROUGH_STOCK, tensor=name)
    ms_name = names.hf_to_ms(config).get(name)
    if ms_name is None:
        return name
    if split:
        raise CheckpointError(SPLIT_THROUGH_STOCK, tensor=name)
    return ms_name


def _dtype_of(value):
    if isinstance(value, (Tensor, Parameter)):
        known = NP_OF_MS.get(value.dtype)
        return known if known is not None else np.dtype(ms.dtype_to_nptype(value.dtype))
    return np.asarray(value).dtype


def _as_numpy(value):
    if isinstance(value, (Tensor, Parameter)):
        if value.dtype == ms.bfloat16:
            value = value.astype(ms.float32)
        return value.asnumpy()
    return np.asarray(value)


def _block(config):
    qc = getattr(config, "quantization_config", None)
    try:
        return fp8.block_size_of(qc) if qc else fp8.DEFAULT_BLOCK
    except ValueError as exc:
        raise CheckpointError(f"model_config.quantization_config: {exc}") from None


def _check(config, source, block):
    """Every HF tensor of `source` that the table knows: dtype, shape, FP8 scale (before converting any)."""
    table = names.hf_to_ms(config)
    for name, value in source.items():
        if name not in table:
            continue
        sname = name + names.SCALE_SUFFIX
        scale = source.get(sname)
        scale_info = (_dtype_of(scale), tuple(scale.shape)) if scale is not None else None
        check_tensor(name, _dtype_of(value), tuple(value.shape), names.hf_shape(name, config), scale_info, block)
        if scale is not None:
            fp8.check_scale_values(_as_numpy(scale), tensor=sname)


def convert_weight_dict(config, source):
    """{HF name: tensor} -> {MindSpore name: Parameter}. Names already in MindSpore form pass through.

    Every HF tensor is checked first (dtype, shape, FP8 scale); FP8 weights are dequantized with
    their `<name>_scale_inv`; MTP copies of the embedding and head are dropped (the model shares the
    main ones). An entry with only some of its HF tensors present raises CheckpointError naming the
    missing one.
    """
    w8a8 = names.quant_spec(config) is not None  # msModelSlim: int8 weights kept, vectors checked (msmodelslim.py)
    block = fp8.DEFAULT_BLOCK if w8a8 else _block(config)
    vectors = msmodelslim.check_source(config, source, _dtype_of, _as_numpy) if w8a8 else _check(config, source, block)
    target, consumed = {}, set(n for n in vectors or () if n.endswith("." + names.QUANT_CHECKED))
    for entry in names.expand(config):
        present = [n for n in entry.hf if n in source]
        if not present:
            continue
        if len(present) != len(entry.hf):
            missing = next(n for n in entry.hf if n not in source)
            raise CheckpointError(f"needed with {present[0]!r} to build {entry.ms!r}", tensor=missing)
        arrays = []
        for name in entry.hf:
            if vectors and name in vectors:
                arrays.append(vectors[name])
                continue
            array = _as_numpy(source[name])
            scale = name + names.SCALE_SUFFIX
            if scale in source:
                out = np.empty(array.shape, np.float32)
                array = fp8.dequantize_into(np.ascontiguousarray(array), _as_numpy(source[scale]), out, block)
                consumed.add(scale)
            arrays.append(array if array.dtype == np.int8 else array.astype(np.float32, copy=False))
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
    mapping = names.hf_to_ms(config)
    out = {}
    for name, shard in weight_map.items():
        if name.endswith((names.SCALE_SUFFIX, "." + names.QUANT_CHECKED)):
            continue
        out.setdefault(mapping.get(name, name), shard)
    return out
