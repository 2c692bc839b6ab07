"""The one declarative table of HuggingFace <-> MindSpore weight names and layouts.

Every direction (direct loading, hf-to-ms, ms-to-hf, per-rank slicing) derives from
`expand(config)`; no other module spells a weight name.

A row maps one MindSpore parameter to the HF tensor(s) it is made of, with a
layout transform that has an exact inverse:

* copy             the same array;
* rope_heads       q_b_proj / q_proj rows: the last qk_rope_head_dim rows of each
                   head are stored interleaved in HF; we keep them as two halves;
* rope_tail        kv_a_proj_with_mqa rows: the last qk_rope_head_dim rows, likewise;
* fuse             [gate; up] stacked along rows into one (2I, H) matrix;
* experts_gate_up  per-expert [gate; up], transposed and stacked: (E, H, 2I);
* experts_down     per-expert down, transposed and stacked: (E, I, H).
"""
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Tuple

import ml_dtypes
import numpy as np

from .errors import CheckpointError
from .fp8 import DEFAULT_BLOCK, FP8, check_scale

# (MindSpore suffix, HF suffix(es), transform, condition) inside one decoder block
_ATTENTION = [
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy", None),
    ("post_attention_layernorm.weight", ("post_attention_layernorm.weight",), "copy", None),
    ("self_attn.q_a_proj.weight", ("self_attn.q_a_proj.weight",), "copy", "q_lora"),
    ("self_attn.q_a_layernorm.weight", ("self_attn.q_a_layernorm.weight",), "copy", "q_lora"),
    ("self_attn.q_b_proj.weight", ("self_attn.q_b_proj.weight",), "rope_heads", "q_lora"),
    ("self_attn.q_proj.weight", ("self_attn.q_proj.weight",), "rope_heads", "no_q_lora"),
    ("self_attn.kv_a_proj_with_mqa.weight", ("self_attn.kv_a_proj_with_mqa.weight",), "rope_tail", None),
    ("self_attn.kv_a_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), "copy", None),
    ("self_attn.kv_b_proj.weight", ("self_attn.kv_b_proj.weight",), "copy", None),
    ("self_attn.o_proj.weight", ("self_attn.o_proj.weight",), "copy", None),
]
_DENSE_MLP = [
    ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fuse", None),
    ("mlp.down_proj.weight", ("mlp.down_proj.weight",), "copy", None),
]
_MOE = [
    ("mlp.router.weight", ("mlp.gate.weight",), "copy", None),
    ("mlp.router.e_score_correction_bias", ("mlp.gate.e_score_correction_bias",), "copy", "noaux_tc"),
    ("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
     "experts_gate_up", None),
    ("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",), "experts_down", None),
    ("mlp.shared_experts.gate_up_proj.weight",
     ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"), "fuse", "shared"),
    ("mlp.shared_experts.down_proj.weight", ("mlp.shared_experts.down_proj.weight",), "copy", "shared"),
]
_GLOBAL = [
    ("model.embed_tokens.weight", ("model.embed_tokens.weight",), "copy", None),
    ("model.norm.weight", ("model.norm.weight",), "copy", None),
    ("lm_head.weight", ("lm_head.weight",), "copy", None),
]
_MTP = [
    ("enorm.weight", ("enorm.weight",), "copy", None),
    ("hnorm.weight", ("hnorm.weight",), "copy", None),
    ("eh_proj.weight", ("eh_proj.weight",), "copy", None),
    ("norm.weight", ("shared_head.norm.weight",), "copy", None),
]
# HF tensors of an MTP layer that duplicate a main-model tensor: (HF suffix, MindSpore name)
_MTP_SHARED = [("embed_tokens.weight", "model.embed_tokens.weight"),
               ("shared_head.head.weight", "lm_head.weight")]

SCALE_SUFFIX = "_scale_inv"  # FP8 checkpoints: `<name>_scale_inv` beside each quantized `<name>`

# W8A8 (msModelSlim) rows, by the scheme the model's QuantSpec gives each module (docs/en/checkpoint.md).
# MindSpore suffix of a float Linear row -> the QuantSpec module inside the layer (fused: gate|up, experts)
_QUANT_MODULES = {
    "self_attn.q_a_proj.weight": "self_attn.q_a_proj", "self_attn.q_b_proj.weight": "self_attn.q_b_proj",
    "self_attn.q_proj.weight": "self_attn.q_proj", "self_attn.kv_b_proj.weight": "self_attn.kv_b_proj",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj.weight": "self_attn.o_proj",
    "mlp.gate_up_proj.weight": "mlp.gate_up_proj", "mlp.down_proj.weight": "mlp.down_proj",
    "mlp.shared_experts.gate_up_proj.weight": "mlp.shared_experts.gate_up_proj",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.down_proj",
    "mlp.experts.gate_up_proj": "mlp.experts", "mlp.experts.down_proj": "mlp.experts",
}
# per scheme: (vectors of N rows, transformed as the weight's rows; per-tensor vectors, copied)
_QUANT_VECTORS = {"W8A8": (("weight_scale", "deq_scale", "quant_bias"), ("input_scale", "input_offset")),
                  "W8A8_DYNAMIC": (("weight_scale",), ())}
_EXPERT_SCALES = {"mlp.experts.gate_up_proj": "mlp.experts.gate_up_scale",
                  "mlp.experts.down_proj": "mlp.experts.down_scale"}
_NORM_BIASES = {"input_layernorm.weight": "input_layernorm", "self_attn.q_a_layernorm.weight": "self_attn.q_a_layernorm"}
QUANT_CHECKED = "weight_offset"  # HF [N, 1] zeros beside each int8 weight: checked on load, not a parameter
# HF quant leaf -> its shape from the weight's rows N (weight_scale / weight_offset are stored [N, 1])
QUANT_LEAVES = {"weight_scale": lambda n: (n, 1), "weight_offset": lambda n: (n, 1), "deq_scale": lambda n: (n,),
                "quant_bias": lambda n: (n,), "input_scale": lambda n: (1,), "input_offset": lambda n: (1,)}
_VECTOR_SUFFIXES = tuple("." + leaf for leaf in QUANT_LEAVES) + ("_scale", ".bias")


@dataclass(frozen=True)
class Entry:
    ms: str                 # MindSpore parameter name
    hf: Tuple[str, ...]     # HF tensor names, in the order the transform takes them
    transform: str
    layer: int              # HF layer index, -1 for global tensors


def _holds(cond, config):
    return {None: True,
            "q_lora": bool(config.q_lora_rank),
            "no_q_lora": not config.q_lora_rank,
            "noaux_tc": config.topk_method == "noaux_tc",
            "shared": bool(config.n_shared_experts)}[cond]


def _block_entries(config, hf_layer, ms_prefix, moe, spec=None):
    """(Entry, scheme) of one decoder block: scheme None for a float row, else the W8A8 scheme of a quantized
    module's rows (its int8 weight and vectors) or FLOAT for a norm bias."""
    rows = _ATTENTION + (_MOE if moe else _DENSE_MLP)
    hf_prefix = f"model.layers.{hf_layer}."
    for ms_suffix, hf_suffixes, transform, cond in rows:
        if not _holds(cond, config):
            continue
        if transform.startswith("experts"):
            names = tuple(hf_prefix + s.format(e=e) for e in range(config.n_routed_experts) for s in hf_suffixes)
        else:
            names = tuple(hf_prefix + s for s in hf_suffixes)
        entry = Entry(ms_prefix + ms_suffix, names, transform, hf_layer)
        module = _QUANT_MODULES.get(ms_suffix) if spec is not None else None
        scheme = spec.scheme(hf_prefix + module) if module else "FLOAT"
        yield entry, (None if scheme == "FLOAT" else scheme)
        if spec is not None:
            yield from _quant_rows(spec, entry, hf_prefix, ms_prefix, ms_suffix, scheme)


def _quant_rows(spec, entry, hf_prefix, ms_prefix, ms_suffix, scheme):
    """(Entry, scheme) of the W8A8 vectors beside the float row `entry` of a quantized module (scales, offsets,
    deq_scale, quant_bias); a norm bias (smoothing shift) beside its norm's weight."""
    if ms_suffix in _NORM_BIASES:
        if spec.norm_bias(hf_prefix + _NORM_BIASES[ms_suffix]):
            yield Entry(entry.ms[:-len("weight")] + "bias", (entry.hf[0][:-len("weight")] + "bias",), "copy",
                        entry.layer), "FLOAT"
        return
    if scheme == "FLOAT":
        return
    rows, per_tensor = _QUANT_VECTORS[scheme]
    if ms_suffix in _EXPERT_SCALES:  # stacked (E, 2I) / (E, H) from the per-expert [N, 1] scales
        yield Entry(ms_prefix + _EXPERT_SCALES[ms_suffix], tuple(n[:-len("weight")] + "weight_scale" for n in entry.hf),
                    "stack_scale", entry.layer), scheme
        return
    base = entry.ms[:-len("weight")]
    for leaf in rows:
        yield Entry(base + leaf, tuple(n[:-len("weight")] + leaf for n in entry.hf), entry.transform, entry.layer), scheme
    for leaf in per_tensor:
        yield Entry(base + leaf, (entry.hf[0][:-len("weight")] + leaf,), "copy", entry.layer), scheme


def quant_spec(config):
    """The model's W8A8 QuantSpec (`config.quant_spec()`), or None: a float model, or one quantizing nothing."""
    get = getattr(config, "quant_spec", None)
    spec = get() if callable(get) else None
    if spec is None or not spec.any_quantized(config.num_hidden_layers + config.num_nextn_predict_layers):
        return None
    return spec


def _rows(config, include_mtp, spec):
    rows = [(Entry(ms, hf, t, -1), None) for ms, hf, t, _ in _GLOBAL]
    for i in range(config.num_hidden_layers):
        rows.extend(_block_entries(config, i, f"model.layers.{i}.", config.is_moe_layer(i), spec))
    if include_mtp:
        for j in range(config.num_nextn_predict_layers):
            layer = config.num_hidden_layers + j
            prefix = f"model.layers.{layer}."
            rows.extend((Entry(f"model.mtp.{j}.{ms}", (prefix + hf[0],), t, layer), None) for ms, hf, t, _ in _MTP)
            rows.extend(_block_entries(config, layer, f"model.mtp.{j}.layer.", config.is_moe_layer(layer), spec))
    return rows


def expand(config, include_mtp=True):
    """Every (MindSpore parameter <- HF tensors) entry of a model built from `config` (a W8A8 model: with the
    rows of its int8 weights' vectors and its norm biases, by `quant_spec(config)`)."""
    return [e for e, _ in _rows(config, include_mtp, quant_spec(config))]


def quant_tensors(config, include_mtp=True):
    """{HF name: scheme} of every W8A8 tensor of a W8A8 model's table (int8 weights, their vectors and
    their checked-only `weight_offset`s: the weight's scheme; norm biases: FLOAT); {} for a float model."""
    spec = quant_spec(config)
    out = {}
    for entry, scheme in (_rows(config, include_mtp, spec) if spec is not None else ()):
        if scheme is None:
            continue
        out.update((n, scheme) for n in entry.hf)
        if entry.ms.endswith(".weight") or entry.transform.startswith("experts"):
            out.update((n[:-len("weight")] + QUANT_CHECKED, scheme) for n in entry.hf)
    return out


def is_vector(ms_name):
    """Whether a W8A8 / norm-bias parameter is a vector ([N], [1], (E, N)) read from [N] / [N, 1] tensors."""
    return ms_name.endswith(_VECTOR_SUFFIXES)


# the config fields the table depends on (is_moe_layer reads first_k_dense_replace and moe_layer_freq)
TABLE_FIELDS = ("num_hidden_layers", "num_nextn_predict_layers", "first_k_dense_replace", "moe_layer_freq",
                "n_routed_experts", "q_lora_rank", "topk_method", "n_shared_experts")


def table_key(config):
    """The values of TABLE_FIELDS: two configs with the same key have the same name table."""
    return tuple(getattr(config, f) for f in TABLE_FIELDS)


_TABLES = {}  # table_key -> {HF name: MindSpore name}; a few configs per process


def hf_to_ms(config):
    """{HF tensor name: MindSpore parameter name} for `config` (MTP copies of the embedding and head map
    to the main ones), built once per table_key: a read-only mapping, O(1) per name."""
    qc = getattr(config, "quantization_config", None)  # W8A8: the table has its rows (kept below: a live id)
    key = (repr(table_key(config)), id(qc))  # repr: a YAML may hand a list where the table wants a scalar
    table = _TABLES.get(key)
    if table is None:
        out = {hf: e.ms for e in expand(config) for hf in e.hf}
        out.update(shared_hf_names(config))
        if len(_TABLES) >= 8:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = (MappingProxyType(out), qc)
    return table[0]


def shared_hf_names(config):
    """HF names that duplicate another tensor (MTP embedding and head): {HF name: MindSpore name}."""
    out = {}
    for j in range(config.num_nextn_predict_layers):
        layer = config.num_hidden_layers + j
        for hf, ms in _MTP_SHARED:
            out[f"model.layers.{layer}.{hf}"] = ms
    return out


# ---------------------------------------------------------------- HF shapes
def hf_shape(hf_name, config):
    """Shape of the HF tensor `hf_name` (a weight or bias, not a scale) for `config`."""
    c, leaf = config, ".".join(hf_name.split(".")[-2:])
    h, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    inter = (c.moe_intermediate_size * c.n_shared_experts if ".shared_experts." in hf_name
             else c.moe_intermediate_size if ".experts." in hf_name else c.intermediate_size)
    shapes = {
        "embed_tokens.weight": (c.vocab_size, h), "lm_head.weight": (c.vocab_size, h),
        "head.weight": (c.vocab_size, h), "eh_proj.weight": (h, 2 * h),
        "q_a_proj.weight": (c.q_lora_rank, h), "q_a_layernorm.weight": (c.q_lora_rank,),
        "q_b_proj.weight": (heads * qk, c.q_lora_rank), "q_proj.weight": (heads * qk, h),
        "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, h),
        "kv_a_layernorm.weight": (c.kv_lora_rank,),
        "kv_b_proj.weight": (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        "o_proj.weight": (h, heads * c.v_head_dim),
        "gate_proj.weight": (inter, h), "up_proj.weight": (inter, h), "down_proj.weight": (h, inter),
        "gate.weight": (c.n_routed_experts, h), "gate.e_score_correction_bias": (c.n_routed_experts,),
    }
    if leaf in shapes:
        return shapes[leaf]
    last = hf_name.rsplit(".", 1)[-1]
    if last in QUANT_LEAVES:  # W8A8 vectors: from the weight's rows
        return QUANT_LEAVES[last](hf_shape(hf_name[:-len(last)] + "weight", config)[0])
    if leaf.endswith("norm.bias"):  # a smoothing shift
        return hf_shape(hf_name[:-len("bias")] + "weight", config)
    if leaf.endswith("norm.weight"):  # input/post_attention layernorm, model.norm, enorm, hnorm, shared_head.norm
        return (h,)
    raise ValueError(f"no shape rule for HF tensor {hf_name!r}")


def hf_shapes(config, include_mtp=True):
    """Every HF tensor of a checkpoint for `config` (MTP copies included, FP8 scales not) -> its shape."""
    names = [n for e in expand(config, include_mtp) for n in e.hf]
    if include_mtp:
        names.extend(shared_hf_names(config))
    return {n: hf_shape(n, config) for n in names}


def ms_shape(entry, shapes):
    """Shape of the MindSpore parameter of `entry`, given {HF name: shape} of its tensors."""
    s = [tuple(shapes[n]) for n in entry.hf]
    if is_vector(entry.ms):  # W8A8 vectors: [N] / [N, 1] tensors, 1-D parameters ((E, N) stacked)
        n = [math.prod(x) for x in s]
        if entry.transform == "stack_scale":
            per = 2 if entry.ms.endswith("gate_up_scale") else 1
            return (len(n) // per, sum(n[:per]))
        return (sum(n),)
    if entry.transform == "fuse":
        return (sum(x[0] for x in s),) + s[0][1:]
    if entry.transform == "experts_gate_up":
        return (len(s) // 2, s[0][1], s[0][0] + s[1][0])
    if entry.transform == "experts_down":
        return (len(s), s[0][1], s[0][0])
    return s[0]


FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64))


def check_tensor(name, dtype, shape, want, scale=None, block=DEFAULT_BLOCK, file=None, scale_file=None):
    """One HF tensor's header against the name table: a float dtype, or FP8 with a float32 scale of the
    block grid's shape; `want` is the table's shape. `scale`: (dtype, shape) of `<name>_scale_inv`, None
    when absent. Raises CheckpointError naming the file and tensor.
    The one check of a tensor's header: the loader, the per-rank loader and the hooks share it."""
    dtype, shape = np.dtype(dtype), tuple(shape)
    scale_name = name + SCALE_SUFFIX
    if dtype != FP8 and dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype} is not a float type (bfloat16, float16, float32, or float8_e4m3fn "
                              "with its scale); its bits would be misread as weights", file, name)
    if shape != tuple(want):
        hint = " (transposed?)" if len(shape) == 2 and shape == tuple(want)[::-1] else ""
        raise CheckpointError(f"shape {shape} does not match the model's {tuple(want)}{hint}", file, name)
    if dtype == FP8:
        if scale is None:
            raise CheckpointError(f"FP8 tensor without its scale {scale_name!r}", file, name)
        check_scale(shape, scale[1], scale[0], block, scale_file or file, scale_name)
    elif scale is not None:
        raise CheckpointError(f"has a scale {scale_name!r} but is {dtype}, not float8_e4m3fn", file, name)


def keeps_float32(name):
    """Tensors stored in float32 whatever the checkpoint dtype: the router's selection bias (HF or ours)."""
    return name.endswith("e_score_correction_bias")


# ---------------------------------------------------------------- layout transforms
def _rope_perm(dim):
    """Interleaved (HF) -> halves (ours): new[k] = old[perm[k]]."""
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _head_rope_rows(config, total_rows):
    head = config.qk_nope_head_dim + config.qk_rope_head_dim
    idx = np.arange(total_rows).reshape(-1, head)[:, config.qk_nope_head_dim:]
    return idx


def to_ms(entry, arrays, config):
    """HF arrays (in entry.hf order) -> the MindSpore parameter value."""
    t = entry.transform
    if is_vector(entry.ms):  # W8A8 vectors ([N, 1] scales): 1-D, then the weight's row transform
        arrays = [np.asarray(a).reshape(-1) for a in arrays]
        if t == "stack_scale":
            per = 2 if entry.ms.endswith("gate_up_scale") else 1
            return np.stack([np.concatenate(arrays[k:k + per]) for k in range(0, len(arrays), per)])
    if t == "copy":
        return arrays[0]
    if t == "fuse":
        return np.concatenate(arrays, axis=0)
    if t == "rope_heads":
        rows = _head_rope_rows(config, arrays[0].shape[0])
        perm = _rope_perm(config.qk_rope_head_dim)
        out = np.array(arrays[0], copy=True)
        out[rows.reshape(-1)] = arrays[0][rows[:, perm].reshape(-1)]
        return out
    if t == "rope_tail":
        rope = config.qk_rope_head_dim
        rows = np.arange(arrays[0].shape[0] - rope, arrays[0].shape[0])
        out = np.array(arrays[0], copy=True)
        out[rows] = arrays[0][rows[_rope_perm(rope)]]
        return out
    if t in ("experts_gate_up", "experts_down"):
        per = len(arrays) // config.n_routed_experts
        return np.stack([expert_to_ms(t, arrays[k:k + per]) for k in range(0, len(arrays), per)])
    raise ValueError(f"unknown transform {t!r} for {entry.ms}")


def to_hf(entry, value, config):
    """The MindSpore parameter value -> HF arrays (in entry.hf order); exact inverse of to_ms (W8A8 vectors:
    1-D, a `weight_scale` is [N, 1] in HF)."""
    t = entry.transform
    if t == "stack_scale":
        per = 2 if entry.ms.endswith("gate_up_scale") else 1
        return [part.reshape(-1, 1) for row in value for part in np.split(row, per)]
    if entry.ms.endswith("weight_scale"):
        return [a.reshape(-1, 1) for a in to_hf(Entry(entry.ms + "_1d", entry.hf, t, entry.layer), value.reshape(-1), config)]
    if t == "copy":
        return [value]
    if t == "fuse":
        half = value.shape[0] // 2
        return [value[:half], value[half:]]
    if t == "rope_heads":
        rows = _head_rope_rows(config, value.shape[0])
        perm = _rope_perm(config.qk_rope_head_dim)
        out = np.array(value, copy=True)
        out[rows[:, perm].reshape(-1)] = value[rows.reshape(-1)]
        return [out]
    if t == "rope_tail":
        rope = config.qk_rope_head_dim
        rows = np.arange(value.shape[0] - rope, value.shape[0])
        out = np.array(value, copy=True)
        out[rows[_rope_perm(rope)]] = value[rows]
        return [out]
    if t in ("experts_gate_up", "experts_down"):
        return [part for k in range(value.shape[0]) for part in expert_to_hf(t, value[k])]
    raise ValueError(f"unknown transform {t!r} for {entry.ms}")


# Stacked experts, one expert at a time (streaming converters write the stack expert by expert):
# to_ms(entry, arrays)[k] == expert_to_ms(t, expert k's arrays); to_hf likewise.
def expert_to_ms(transform, arrays):
    """One expert's HF arrays ([gate, up] or [down]) -> its slice of the stacked parameter."""
    return transposed(np.concatenate(arrays, axis=0) if transform == "experts_gate_up" else arrays[0])


def expert_to_hf(transform, value):
    """One expert's slice of the stacked parameter -> its HF arrays (transposed views)."""
    if transform == "experts_gate_up":
        half = value.shape[1] // 2
        return [value[:, :half].T, value[:, half:].T]
    return [value.T]


def expert_blocks(entry, shapes, config, slices=None):
    """The one expert-slicing rule (converter: streaming.pieces; loader: hf_read). Per routed expert of the
    `experts_*` entry held by `slices` (per MindSpore dim (start, stop) or None; None: all of it), the HF
    blocks (name, r0, r1, c0, c1) its slice is the transpose of, stacked along rows; `shapes`: {HF name:
    shape}. A slice of the stacked (E, H, 2I) [gate; up] splits both halves alike: the same rows of each."""
    def span(dim, size):
        s = slices[dim] if slices is not None and dim < len(slices) else None
        return s if s is not None else (0, size)
    per = len(entry.hf) // config.n_routed_experts
    out = []
    for e in range(*span(0, config.n_routed_experts)):
        hf = entry.hf[e * per:(e + 1) * per]
        if entry.transform == "experts_gate_up":  # (H, 2I) = [gate; up].T
            inter, hidden = shapes[hf[0]]
            (a, b), (h0, h1) = span(2, 2 * inter), span(1, hidden)
            out.append([(n, a // 2, b // 2, h0, h1) for n in hf])
        else:  # (I, H) = down.T
            hidden, inter = shapes[hf[0]]
            (a, b), (h0, h1) = span(1, inter), span(2, hidden)
            out.append([(hf[0], h0, h1, a, b)])
    return out


def transpose_into(src, dst, step=None):
    """dst[...] = src.T (2-D), copied in blocks of `step` source rows (about 3x faster than numpy's
    element-strided copy for the 2048 x 7168 expert matrices); the one blocked transpose."""
    step = step or (128 if src.itemsize == 1 else 32 if src.itemsize == 2 else 8)
    for r in range(0, src.shape[0], step):
        dst[:, r:r + step] = src[r:r + step].T
    return dst


def transposed(a):
    """`a.T` of a 2-D array as a new C-contiguous array (transpose_into)."""
    return transpose_into(a, np.empty(a.shape[::-1], a.dtype))
