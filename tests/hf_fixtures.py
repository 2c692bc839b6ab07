"""Tiny HuggingFace DeepSeek-V3 checkpoints for tests.

Everything here follows the layout of the released DeepSeek-V3 checkpoint: the tensor names of
``model.safetensors.index.json``, RoPE dims stored interleaved (``rope_interleave``), and the MTP
module stored as layer ``num_hidden_layers`` (``enorm``, ``hnorm``, ``eh_proj``, ``embed_tokens``,
``shared_head.{norm,head}`` plus a full decoder layer).

Public API::

    tiny_hf_config(**overrides) -> dict
    hf_tensor_shapes(config) -> dict[str, tuple[int, ...]]
    random_hf_state_dict(config, seed, std=0.15, bias_shift=0.0, *, mtp_shared_copies=True) -> dict[str, np.ndarray]
    save_hf_folder(folder, config, state, shards=1) -> None
    load_hf_folder(folder) -> (config, state)
    is_mtp_name(name, config) -> bool
    build_hf_model(config, state) -> transformers.DeepseekV3ForCausalLM
    write_safetensors(path, tensors, metadata=None) -> int   (byte-identical to the reference writer)
"""
import copy
import json
import os
import re

import numpy as np

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fsguard import atomic_write
from mindformers_dsv3.checkpoint.safetensors_io import DTYPE_NAMES

__all__ = [
    "tiny_hf_config",
    "hf_tensor_shapes",
    "random_hf_state_dict",
    "save_hf_folder",
    "load_hf_folder",
    "is_mtp_name",
    "build_hf_model",
    "write_safetensors",
]


def tiny_hf_config(**overrides):
    """An HF ``config.json`` dict for a tiny DeepSeek-V3 (fp32, CPU-friendly).

    ``max_position_embeddings / rope_scaling.original_max_position_embeddings`` equals
    ``rope_scaling.factor`` on purpose: transformers 4.51.3 derives the YaRN frequency factor from that
    ratio and ignores ``factor`` (the official code uses ``factor``); the real 671B config
    (163840 / 4096 = 40) is consistent in the same way. Keep them consistent when overriding.
    """
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 4,
        # transformers defaults this to 128 (-> 0 kv groups and a crash): it must equal the heads.
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "ep_size": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    config.update(copy.deepcopy(overrides))
    return config


def _layer_shapes(config, layer):
    """Shapes of one decoder layer's tensors (``model.layers.{layer}.`` prefix)."""
    h = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    qk_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    kv_rank = config["kv_lora_rank"]
    q_rank = config.get("q_lora_rank")
    p = f"model.layers.{layer}."
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }
    a = p + "self_attn."
    if q_rank is None:
        shapes[a + "q_proj.weight"] = (n_heads * qk_head, h)
    else:
        shapes[a + "q_a_proj.weight"] = (q_rank, h)
        shapes[a + "q_a_layernorm.weight"] = (q_rank,)
        shapes[a + "q_b_proj.weight"] = (n_heads * qk_head, q_rank)
    shapes[a + "kv_a_proj_with_mqa.weight"] = (kv_rank + config["qk_rope_head_dim"], h)
    shapes[a + "kv_a_layernorm.weight"] = (kv_rank,)
    shapes[a + "kv_b_proj.weight"] = (n_heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), kv_rank)
    shapes[a + "o_proj.weight"] = (h, n_heads * config["v_head_dim"])

    m = p + "mlp."

    def mlp(prefix, inter):
        shapes[prefix + "gate_proj.weight"] = (inter, h)
        shapes[prefix + "up_proj.weight"] = (inter, h)
        shapes[prefix + "down_proj.weight"] = (h, inter)

    if layer >= config["first_k_dense_replace"]:
        n_exp = config["n_routed_experts"]
        shapes[m + "gate.weight"] = (n_exp, h)
        shapes[m + "gate.e_score_correction_bias"] = (n_exp,)
        for e in range(n_exp):
            mlp(f"{m}experts.{e}.", config["moe_intermediate_size"])
        mlp(m + "shared_experts.", config["moe_intermediate_size"] * config["n_shared_experts"])
    else:
        mlp(m, config["intermediate_size"])
    return shapes


def hf_tensor_shapes(config):
    """Every tensor name of the real HF checkpoint layout for ``config`` -> its shape (in a fixed order)."""
    h = config["hidden_size"]
    v = config["vocab_size"]
    n_main = config["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(n_main):
        shapes.update(_layer_shapes(config, layer))
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    for layer in range(n_main, n_main + config.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{layer}."
        shapes[p + "embed_tokens.weight"] = (v, h)
        shapes[p + "enorm.weight"] = (h,)
        shapes[p + "hnorm.weight"] = (h,)
        shapes[p + "eh_proj.weight"] = (h, 2 * h)
        shapes.update(_layer_shapes(config, layer))
        shapes[p + "shared_head.norm.weight"] = (h,)
        shapes[p + "shared_head.head.weight"] = (v, h)
    return shapes


def is_mtp_name(name, config):
    """True for tensors of the MTP module(s): ``model.layers.{L}.*`` with L >= num_hidden_layers."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= config["num_hidden_layers"]


def _is_norm(name):
    return name.endswith("norm.weight")  # *_layernorm, model.norm, enorm, hnorm, shared_head.norm


def random_hf_state_dict(config, seed, std=0.15, bias_shift=0.0, *, mtp_shared_copies=True):
    """Random float32 weights under the real HF names for ``config``.

    Matrices ~ N(0, std); norm weights ~ 1 + 0.1 N(0, 1); router ``e_score_correction_bias`` ~
    U[0.05, 0.5] + ``bias_shift`` (positive by default: transformers 4.51.3 routes correctly only then).
    With ``mtp_shared_copies`` (the released checkpoint's layout) the MTP ``embed_tokens`` and
    ``shared_head.head`` are copies of ``model.embed_tokens`` and ``lm_head``; otherwise they are
    drawn independently (useful to catch a converter that confuses them).
    """
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in hf_tensor_shapes(config).items():
        if name.endswith("e_score_correction_bias"):
            arr = rng.uniform(0.05, 0.5, size=shape) + bias_shift
        elif _is_norm(name):
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            arr = std * rng.standard_normal(shape)
        state[name] = np.ascontiguousarray(arr, dtype=np.float32)
    if mtp_shared_copies:
        for name in state:
            if is_mtp_name(name, config):
                if name.endswith(".embed_tokens.weight"):
                    state[name] = state["model.embed_tokens.weight"].copy()
                elif name.endswith(".shared_head.head.weight"):
                    state[name] = state["lm_head.weight"].copy()
    return state


def save_hf_folder(folder, config, state, shards=1):
    """Write ``config.json``, ``model-0000i-of-0000N.safetensors`` and ``model.safetensors.index.json``.

    Tensors are spread over ``shards`` files in name order, by size; the index always exists (the
    released checkpoints are sharded), even for ``shards=1``.
    """
    from safetensors.numpy import save_file

    if shards < 1:
        raise ValueError("shards must be >= 1")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    keys = list(state)
    total = sum(int(state[n].nbytes) for n in keys)
    per_shard = total / shards
    buckets = [[] for _ in range(shards)]
    acc = 0
    for name in keys:
        idx = min(int(acc // per_shard) if per_shard else 0, shards - 1)
        buckets[idx].append(name)
        acc += int(state[name].nbytes)
    weight_map = {}
    for i, bucket in enumerate(buckets):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: np.ascontiguousarray(state[n]) for n in bucket}
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        for n in bucket:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def load_hf_folder(folder):
    """Read back ``(config, state)`` (numpy arrays) from a folder written by :func:`save_hf_folder`."""
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
        index = json.load(f)
    state = {}
    for fname in sorted(set(index["weight_map"].values())):
        state.update(load_file(os.path.join(folder, fname)))
    return config, state


def build_hf_model(config, state):
    """A transformers ``DeepseekV3ForCausalLM`` (fp32, eval, eager attention) holding ``state``.

    MTP tensors are not part of the transformers model; they are skipped, and anything else
    unexpected or missing is an error.
    """
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if config.get("q_lora_rank") is None:
        raise ValueError("transformers 4.51.3 DeepseekV3 cannot build q_lora_rank=None")
    hf_config = DeepseekV3Config.from_dict(copy.deepcopy(config))
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config).to(torch.float32)
    model.config._attn_implementation = "eager"
    tensors = {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in state.items()}
    result = model.load_state_dict(tensors, strict=False)
    unexpected = [n for n in result.unexpected_keys if not is_mtp_name(n, config)]
    if unexpected or result.missing_keys:
        raise AssertionError(f"missing: {result.missing_keys}; unexpected non-MTP: {unexpected}")
    model.eval()
    return model


# ----------------------------------------------------------------------------- an in-memory safetensors writer
# The reference writer's tensor order (its Rust Dtype enum, descending), then by name.
_WRITE_RANK = {n: i for i, n in enumerate(
    "U64 I64 F64 F32 U32 I32 BF16 F16 U16 I16 F8_E4M3 I8 U8 BOOL".split())}


def _tensor_bytes(arr):
    return memoryview(arr.reshape(-1).view(np.uint8))


def write_safetensors(path, tensors, metadata=None) -> int:
    """Writes ``{name: np.ndarray}`` atomically; returns the data bytes written.

    Output is deterministic and, without metadata, byte-identical to the reference
    library's: tensors ordered by dtype (widest first, as the reference does) then name,
    header padded with spaces to a multiple of 8, metadata keys sorted.
    """
    arrays = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError("invalid tensor name", path, name)
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(f"not a numpy array but {type(arr).__name__}", path, name)
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"unsupported dtype {arr.dtype}", path, name)
        # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError("metadata must map strings to strings", path)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    order = sorted(arrays, key=lambda n: (_WRITE_RANK[DTYPE_NAMES[arrays[n].dtype]], n))
    for name in order:
        arr = arrays[name]
        header[name] = {"dtype": DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def fill(fh):
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name in order:
            fh.write(_tensor_bytes(arrays[name]))

    atomic_write(path, fill)
    return offset


# ----------------------------------------------------------------------------- the released layout's names
def is_quantized_weight(hf_name):
    """FP8 checkpoints quantize the attention and MLP linear weights (experts included); norms, router,
    embeddings, heads and the MTP ``eh_proj`` stay high precision (91,991 tensors in the 671B release)."""
    return ((hf_name.endswith("proj.weight") or hf_name.endswith("_proj_with_mqa.weight"))
            and "gate.weight" not in hf_name and not hf_name.endswith("eh_proj.weight"))


def hf_checkpoint_names(config, fp8=True, include_mtp=True):
    """All tensor names of the released HF layout for `config`, each FP8 weight's `_scale_inv` included."""
    out = list(names.hf_shapes(config, include_mtp))
    if fp8:
        out.extend(n + names.SCALE_SUFFIX for n in list(out) if is_quantized_weight(n))
    return out
