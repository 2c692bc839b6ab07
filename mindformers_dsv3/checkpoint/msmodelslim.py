"""msModelSlim W8A8 folders: the checks before a byte is loaded, and the small W8A8 vectors.

An msModelSlim folder (docs/en/checkpoint.md, "W8A8 folders") holds, beside the FLOAT tensors (bf16 as in
the source), per quantized Linear an int8 `weight` [N, K] and f32 vectors: `weight_scale` / `weight_offset`
[N, 1], static ones also `input_scale` / `input_offset` [1], `deq_scale` [N] (f32, or int64 holding the
f32 bit pattern) and `quant_bias` int32 [N]; routed experts one by one; a smoothing shift as a FLOAT
norm `bias`; and `quant_model_description*.json` (tensor -> W8A8 | W8A8_DYNAMIC | FLOAT). Which tensors the
model takes is the name table's (names.expand / names.quant_tensors, driven by the model's QuantSpec); the
int8 weights stream through hf_read like float ones. Here:

* `check_folder`: the description against the folder (every tensor it names exists) and against the
  model's quantization (each Linear's scheme), every header (int8 weights, vector dtypes and shapes,
  float tensors by names.check_tensor), then every vector read and its values checked (`weight_offset`
  zeros, scales finite and > 0, `input_offset` an integer in [-128, 127]): all before the first parameter
  changes. Returns the vectors (small: a few bytes per weight row).
* `vector_value`: a vector parameter's (local) value from those arrays, with the weight's row transform
  (split inference: the rank's rows, parallel/layout.py param_rule; a row-parallel static Linear's
  `quant_bias` is held by the first tensor-parallel rank, zeros elsewhere).
* `check_source`: the same header and value checks on a {name: array} dict (the stock hooks' route).
"""
import os

import numpy as np

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError, listing
from mindformers_dsv3.checkpoint.fsguard import input_roots, read_json
from mindformers_dsv3.parallel.layout import param_rule

DESCRIPTION = "quant_model_description"  # quant_model_description.json, ..._w8a8_dynamic.json, ...
SCHEMES = ("W8A8", "W8A8_DYNAMIC", "FLOAT")
_INT8, _INT32, _INT64, _F32 = (np.dtype(t) for t in (np.int8, np.int32, np.int64, np.float32))
_FLOATS = names.FLOAT_DTYPES[:3]  # f32, f16, bf16
_VECTOR_DTYPES = {"weight_scale": _FLOATS, "weight_offset": _FLOATS + (_INT8,), "input_scale": _FLOATS,
                  "input_offset": _FLOATS + (_INT8,), "deq_scale": _FLOATS + (_INT64,), "quant_bias": (_INT32,),
                  "bias": _FLOATS}


def description_of(folder):
    """(path, {tensor: scheme}) of the folder's one `quant_model_description*.json`, or (None, None)."""
    found = sorted(n for n in os.listdir(folder) if n.startswith(DESCRIPTION) and n.endswith(".json"))
    if not found:
        return None, None
    if len(found) > 1:
        raise CheckpointError(f"more than one quantization description ({listing(found)}); keep one", folder)
    path = os.path.join(folder, found[0])
    raw = read_json(path, input_roots(folder), "the quantization description")
    return path, {k: v.upper() for k, v in raw.items() if "." in k and isinstance(v, str)}


def _folder(ckpt):
    return ckpt.path if os.path.isdir(ckpt.path) else os.path.dirname(ckpt.path)


def applies(ckpt, config):
    """Whether loading `ckpt` into a model of `config` takes the W8A8 route (a W8A8 model or a description)."""
    return names.quant_spec(config) is not None or description_of(_folder(ckpt))[0] is not None


def _check_description(ckpt, desc_path, desc, quant, shapes):
    """Every tensor the description names is in the folder; each Linear's scheme is the model's."""
    for name in sorted(desc):
        if name not in ckpt:
            raise CheckpointError(f"named in the description {os.path.basename(desc_path)!r} but not in the "
                                  "checkpoint", desc_path, name)
        if desc[name] not in SCHEMES:
            raise CheckpointError(f"scheme {desc[name]!r} is not one of {', '.join(SCHEMES)}", desc_path, name)
    for name in shapes:
        if not name.endswith(".weight") or name not in desc:
            continue
        want = quant.get(name, "FLOAT")
        if desc[name] != want:
            raise CheckpointError(f"the description says {desc[name]} but the model's quantization_config makes "
                                  f"it {want}: build the model's config from this folder "
                                  "(DeepseekV3Config.from_hf_config), or use a checkpoint quantized as the YAML says",
                                  desc_path, name)


def check_header(name, scheme, dtype, shape, want, file=None):
    """One W8A8-model tensor's header: `scheme` None for a float tensor (names.check_tensor), else an int8
    weight or a W8A8 vector of its allowed dtypes; vectors may be [N] or [N, 1]. CheckpointError naming it."""
    dtype, shape, leaf = np.dtype(dtype), tuple(shape), name.rsplit(".", 1)[-1]
    if scheme is None or (leaf == "weight" and scheme == "FLOAT"):
        names.check_tensor(name, dtype, shape, want, file=file)
        return
    if leaf == "weight":
        if dtype != _INT8:
            raise CheckpointError(f"dtype {dtype}, but a {scheme} weight is int8 (a float weight here would be "
                                  "read as integer codes)", file, name)
        if shape != tuple(want):
            raise CheckpointError(f"shape {shape} does not match the model's {tuple(want)}", file, name)
        return
    allowed = _VECTOR_DTYPES["bias" if leaf == "bias" else leaf]
    if dtype not in allowed:
        raise CheckpointError(f"dtype {dtype} is not one of {', '.join(map(str, allowed))} for a {leaf}", file, name)
    if [d for d in shape if d != 1] != [d for d in want if d != 1] or len(shape) > 2:
        raise CheckpointError(f"shape {shape} does not match the model's {tuple(want)}", file, name)


def check_values(name, array, file=None):
    """A W8A8 vector's values -> the array to load (f32; quant_bias int32; an int64 deq_scale's f32 bits)."""
    leaf = name.rsplit(".", 1)[-1]
    a = np.asarray(array)
    if leaf == "quant_bias":
        return a.astype(_INT32, copy=False)
    if leaf == "deq_scale" and a.dtype == _INT64:
        a = (a & 0xFFFFFFFF).astype(np.uint32).view(_F32)
    a = a.astype(_F32)
    if not np.isfinite(a).all():
        raise CheckpointError(f"holds {int((~np.isfinite(a)).sum())} non-finite value(s)", file, name)
    if leaf == "weight_offset" and np.any(a != 0):
        raise CheckpointError(f"holds nonzero values (max |offset| {float(np.abs(a).max()):g}): int8 weights are "
                              "symmetric here; an asymmetric weight would be loaded wrong", file, name)
    if leaf in ("weight_scale", "input_scale", "deq_scale") and np.any(a <= 0):
        raise CheckpointError(f"holds {int((a <= 0).sum())} value(s) <= 0; a scale is positive", file, name)
    if leaf == "input_offset" and (np.any(a != np.rint(a)) or np.any(np.abs(a + 0.5) > 128)):
        raise CheckpointError(f"value {a.reshape(-1)[:1]} is not an integer zero point in [-128, 127]", file, name)
    return a


def _is_vector_tensor(name, quant):
    leaf = name.rsplit(".", 1)[-1]
    return name in quant and (leaf in names.QUANT_LEAVES or leaf == "bias")


def check_folder(ckpt, config, include_mtp, strict):
    """All checks of a W8A8 load (module doc); returns {HF name: vector array} of every W8A8 vector."""
    folder = _folder(ckpt)
    desc_path, desc = description_of(folder)
    quant = names.quant_tensors(config, include_mtp)
    if not quant:
        raise CheckpointError(f"an msModelSlim W8A8 folder (it has {os.path.basename(desc_path)}) but the model is "
                              "not quantized: build its config from this folder (DeepseekV3Config.from_hf_config) "
                              "or give model_config.quantization_config", desc_path)
    shapes = names.hf_shapes(config, include_mtp)
    if desc is not None:
        _check_description(ckpt, desc_path, desc, quant, shapes)
    offsets = {n for n in quant if n.endswith("." + names.QUANT_CHECKED)}
    ckpt.check_names(shapes, allowed=lambda n: n in offsets or ".module." in n, strict=strict)
    for name, want in shapes.items():
        check_header(name, quant.get(name), ckpt.dtype(name), ckpt.shape(name), want, ckpt.file_of(name))
    present = [n for n in sorted(offsets) if n in ckpt]
    for name in present:
        check_header(name, quant[name], ckpt.dtype(name), ckpt.shape(name), names.hf_shape(name, config),
                     ckpt.file_of(name))
    vectors = {}
    for name in [n for n in shapes if _is_vector_tensor(n, quant)] + present:
        value = check_values(name, ckpt.read(name), ckpt.file_of(name))
        if name not in offsets:
            vectors[name] = value
    return vectors


def _slice_arrays(entry, arrays, slices):
    """The HF vectors a rank's slice of `entry`'s parameter is made of (rows of each, whole heads)."""
    t = entry.transform
    if t == "stack_scale":
        per = 2 if entry.ms.endswith("gate_up_scale") else 1
        e0, e1 = slices[0] or (0, len(arrays) // per)
        c0, c1 = slices[1] if len(slices) > 1 and slices[1] is not None else (0, None)
        arrays = arrays[e0 * per:e1 * per]
        return [a.reshape(-1)[c0 // per:None if c1 is None else c1 // per] for a in arrays]
    dims = [d for d, s in enumerate(slices) if s is not None]
    if dims != [0] or t not in ("copy", "rope_heads", "fuse"):
        raise CheckpointError(f"no slice rule for transform {t!r} split on dims {dims}", tensor=entry.hf[0])
    a, b = slices[0]
    if t == "fuse":  # [gate; up]: the same rows of each half
        return [x.reshape(-1)[a // 2:b // 2] for x in arrays]
    return [x.reshape(-1)[a:b] for x in arrays]


def _row_parallel_rest(entry, par):
    """A static row-parallel Linear's `quant_bias` on a tensor-parallel rank other than the first: each rank's
    int32 sum covers its K slice, so the whole bias is added once (quant/layers.py ROW_PARALLEL_QUANT_BIAS)."""
    if par is None or par.mp == 1 or par.tp_rank == 0 or not entry.ms.endswith(".quant_bias"):
        return False
    return param_rule(entry.ms[:-len("quant_bias")] + "weight")[3] == (None, "mp")


def vector_value(vectors, entry, slices, config, dtype, par=None):
    """The (local: `slices`, per MindSpore dim (start, stop) or None) value of a W8A8 vector parameter of the
    rank `par` (a ParallelContext, None for a whole model)."""
    arrays = [vectors[n] for n in entry.hf]
    if slices is not None:
        arrays = _slice_arrays(entry, arrays, slices)
    value = names.to_ms(entry, arrays, config).astype(dtype, copy=False)
    return np.zeros_like(value) if _row_parallel_rest(entry, par) else np.ascontiguousarray(value)


def check_source(config, source, dtype_of, as_numpy):
    """The stock hooks' route: headers and vector values of the table's tensors in `source` ({HF name:
    tensor}); returns {HF name: checked vector array}. `dtype_of` / `as_numpy`: the hooks' readers."""
    quant = names.quant_tensors(config)
    table = names.hf_to_ms(config)
    vectors = {}
    for name, value in source.items():
        if name not in table and name not in quant:
            continue
        check_header(name, quant.get(name), dtype_of(value), tuple(value.shape), names.hf_shape(name, config))
        if _is_vector_tensor(name, quant):
            vectors[name] = check_values(name, as_numpy(value))
    return vectors
