"""Tiny msModelSlim-layout W8A8 DeepSeek-V3 folders for tests, quantized with plain numpy.

The DeepSeek recipe (/work/shared/reference/w8a8.md section 3) on a random tiny HF model (hf_fixtures):

* attention ``q_a_proj``, ``kv_a_proj_with_mqa``, ``q_b_proj``, ``o_proj``: ``W8A8`` (static): int8 weights
  symmetric per output channel (clamp [-127, 127]), activations per tensor asymmetric from the min / max
  each Linear's input reaches on a few calibration sequences (golden-stick's rule:
  ``scale = (max - min) / 255``, ``offset = round(-128 - min / scale)``); ``deq_scale`` and ``quant_bias``
  by the calibrator's identities (reference section 1);
* everything under ``mlp.`` (dense MLP, shared and routed experts): ``W8A8_DYNAMIC``;
* ``kv_b_proj``, the router, embeddings, norms, ``lm_head``, and the MTP layer: ``FLOAT`` (bfloat16, as the
  released files; the router's ``e_score_correction_bias`` stays float32);
* ``norm_bias``: a smoothing shift on chosen norms (default ``model.layers.1.input_layernorm`` and
  ``model.layers.2.self_attn.q_a_layernorm``): the norm's
  output is centred per channel (``bias = -(max + min) / 2`` over the calibration inputs) and the shift is
  pushed through the Linears it feeds (``bias_fp = W @ -bias``, folded into ``quant_bias``), so the model
  still computes the float function.

Public API::

    quantize_state(config, state, calib_ids, norm_bias=...) -> (qstate, desc)
    dequantized_state(config, state, qstate, desc) -> float state (weight-only dequantized, no norm bias)
    save_w8a8_folder(folder, config, qstate, desc, shards=2, layout="msmodelslim") -> None
    make_w8a8_folder(folder, seed=..., vocab=None, **kw) -> (config, float state, qstate, desc)
    description(desc) -> the description file's JSON object
"""
import json
import os
import re

import ml_dtypes
import numpy as np

from tests import hf_fixtures as hf
from tests.reference.numpy_w8a8 import W8A8Forward

STATIC = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_b_proj", "self_attn.o_proj")
NORM_FEEDS = {"input_layernorm": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
              "self_attn.q_a_layernorm": ("self_attn.q_b_proj",)}
DEFAULT_NORM_BIAS = ("model.layers.1.input_layernorm", "model.layers.2.self_attn.q_a_layernorm")
SHARD = "quant_model_weight_w8a8_dynamic-{:05d}-of-{:05d}.safetensors"
INDEX = "quant_model_weight_w8a8_dynamic.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
BF16 = np.dtype(ml_dtypes.bfloat16)


def scheme_of(weight_name, config):
    """The recipe's scheme of an HF ``*.weight`` (MTP layer: FLOAT)."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)\.weight$", weight_name)
    if not m or int(m.group(1)) >= config["num_hidden_layers"]:
        return "FLOAT"
    inner = m.group(2)
    if inner in STATIC:
        return "W8A8"
    if inner.startswith("mlp.") and inner.endswith("_proj"):
        return "W8A8_DYNAMIC"
    return "FLOAT"


def quantize_weight(w):
    """Symmetric per-row int8: (int8 [N, K], f32 scale [N, 1]); clamp [-127, 127]."""
    w = np.asarray(w, np.float32)
    scale = (np.abs(w).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1))
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def _calibrate(config, state, calib_ids):
    """{Linear prefix: (per-channel min, per-channel max)} of every static Linear's float input."""
    stats = {}

    def observe(prefix, x):
        if scheme_of(prefix + ".weight", config) != "W8A8":
            return
        flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        lo, hi = flat.min(axis=0), flat.max(axis=0)
        if prefix in stats:
            lo, hi = np.minimum(lo, stats[prefix][0]), np.maximum(hi, stats[prefix][1])
        stats[prefix] = (lo, hi)

    W8A8Forward(config, state, {}, observe=observe).logits(np.asarray(calib_ids))
    return stats


def _static_tensors(prefix, w, lo, hi, shift):
    """The W8A8 tensors of one Linear; the input is x - shift (shift None: 0), its range [lo, hi] (before)."""
    q, ws = quantize_weight(w)
    bias_fp = np.zeros(w.shape[0]) if shift is None else np.asarray(w, np.float64) @ shift
    if shift is not None:
        lo, hi = lo - shift, hi - shift
    lo, hi = min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)
    scale = np.float32(max(hi - lo, 1e-6) / 255)
    offset = np.float32(np.clip(np.rint(-128 - lo / scale), -128, 127))
    deq = (scale * ws.reshape(-1)).astype(np.float32)
    qsum = q.astype(np.int64).sum(axis=1)
    qbias = np.rint(bias_fp / deq.astype(np.float64) - float(offset) * qsum).astype(np.int32)
    return {prefix + ".weight": q, prefix + ".weight_scale": ws, prefix + ".weight_offset": np.zeros_like(ws),
            prefix + ".input_scale": np.array([scale], np.float32),
            prefix + ".input_offset": np.array([offset], np.float32),
            prefix + ".deq_scale": deq, prefix + ".quant_bias": qbias}


def quantize_state(config, state, calib_ids, norm_bias=DEFAULT_NORM_BIAS):
    """(qstate {HF name: array}, desc {HF name: scheme}) of the float `state` by the DeepSeek recipe."""
    stats = _calibrate(config, state, calib_ids)
    shifts = {}  # Linear prefix -> the shift of its input
    qstate, desc = {}, {}
    for norm in norm_bias:
        layer, kind = re.match(r"(model\.layers\.\d+\.)(.*)$", norm).groups()
        lo, hi = stats[layer + NORM_FEEDS[kind][0]]
        shift = (lo + hi) / 2
        qstate[norm + ".bias"] = (-shift).astype(np.float32)
        desc[norm + ".bias"] = "FLOAT"
        shifts.update({layer + lin: shift for lin in NORM_FEEDS[kind]})
    for name, value in state.items():
        scheme = scheme_of(name, config) if name.endswith(".weight") else "FLOAT"
        if scheme == "FLOAT":
            keep = name.endswith("e_score_correction_bias")
            qstate[name] = np.asarray(value, np.float32 if keep else BF16)
            desc[name] = "FLOAT"
            continue
        prefix = name[:-len(".weight")]
        if scheme == "W8A8":
            tensors = _static_tensors(prefix, value, *stats[prefix], shifts.get(prefix))
        else:
            q, ws = quantize_weight(value)
            tensors = {name: q, prefix + ".weight_scale": ws, prefix + ".weight_offset": np.zeros_like(ws)}
        qstate.update(tensors)
        desc.update({n: scheme for n in tensors})
    return qstate, desc


def dequantized_state(config, state, qstate, desc):
    """The weight-only dequantized float model: `state` with every int8 weight replaced by int8 * scale (the
    FLOAT tensors as stored, bfloat16-rounded); no norm bias (its shift is pushed through, the float model
    computes the same function without it)."""
    out = {}
    for name in state:
        if desc.get(name, "FLOAT") == "FLOAT":
            out[name] = np.asarray(qstate[name], np.float32)
        else:
            out[name] = qstate[name].astype(np.float32) * qstate[name + "_scale"]
    return out


def description(desc):
    return {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "group_size": 0, **desc}


def save_w8a8_folder(folder, config, qstate, desc, shards=2, layout="msmodelslim",
                     description_name=DESCRIPTION):
    """config.json (+ ``quantize``, ``mla_quantize``), the description, and the tensors. layout:
    ``msmodelslim`` (``quant_model_weight_w8a8_dynamic-*.safetensors`` + its index), ``hf``
    (``model-*.safetensors`` + ``model.safetensors.index.json``) or ``single`` (one file, no index)."""
    os.makedirs(folder, exist_ok=True)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg.update(quantize="w8a8_dynamic", mla_quantize="w8a8")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(folder, description_name), "w", encoding="utf-8") as f:
        json.dump(description(desc), f, indent=2)
    if layout == "single":
        hf.write_safetensors(os.path.join(folder, "quant_model_weight_w8a8_dynamic.safetensors"), qstate)
        return
    pattern, index = ((SHARD, INDEX) if layout == "msmodelslim"
                      else ("model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json"))
    keys = list(qstate)
    weight_map = {}
    for i in range(shards):
        fname = pattern.format(i + 1, shards)
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        hf.write_safetensors(os.path.join(folder, fname), {n: qstate[n] for n in part})
        weight_map.update({n: fname for n in part})
    total = sum(int(qstate[n].nbytes) for n in keys)
    with open(os.path.join(folder, index), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_w8a8_folder(folder, seed=3, vocab=None, norm_bias=DEFAULT_NORM_BIAS, calib_seed=99, std=0.05, **save):
    """A tiny random HF model (hf_fixtures), quantized and written; returns (config, float state, qstate, desc)."""
    config = hf.tiny_hf_config(**({"vocab_size": vocab} if vocab else {}))
    state = hf.random_hf_state_dict(config, seed=seed, std=std)
    calib = np.random.default_rng(calib_seed).integers(2, config["vocab_size"], size=(4, 24))
    qstate, desc = quantize_state(config, state, calib, norm_bias)
    save_w8a8_folder(folder, config, qstate, desc, **save)
    return config, state, qstate, desc
