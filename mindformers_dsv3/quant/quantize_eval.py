"""Numpy forwards of a whole (small) model for dsv3-quantize's accuracy figures: the float HF folder, and the
msModelSlim W8A8 folder with the exact arithmetic of reference section 2 (independent of the MindSpore layers).

Static W8A8:   r = bf16(1 / bf16(input_scale)); qx = sat_int8(round_half_even(f32(x) * r + input_offset))
               y = bf16(f32(qx @ W^T + quant_bias) * deq_scale)
W8A8_DYNAMIC:  s = max|x| / 127 per token; qx = clamp(round_half_even(x / s), -128, 127)
               y = bf16(f32(qx @ W^T) * f32(bf16(weight_scale)) * s)
Integer products accumulate exactly (int64 here, int32 on the device). Whole tensors are held in memory:
for the tiny / small benchmark configs, not for a 671B model.
"""
import numpy as np

from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
from mindformers_dsv3.quant import calibrate as cal
from mindformers_dsv3.quant.quantize import FLOAT, STATIC, _BF16


def read_folder(folder):
    """{name: array} of every tensor of a folder (index or shards)."""
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.keys()}


def _bf16(x):
    return np.asarray(x, np.float32).astype(_BF16).astype(np.float32)


def static_linear(x, t):
    """The static W8A8 Linear on x (..., K); `t`: {suffix: array} of its tensors."""
    r = _bf16(1.0 / _bf16(t["input_scale"].reshape(())))
    o = np.float32(t["input_offset"].reshape(()))
    qx = np.clip(np.rint(x.astype(np.float32) * r + o), -128, 127).astype(np.int64)
    acc = qx.reshape(-1, qx.shape[-1]) @ t["weight"].astype(np.int64).T + t["quant_bias"].astype(np.int64)
    y = _bf16(acc.astype(np.float32) * t["deq_scale"].reshape(1, -1).astype(np.float32))
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


def dynamic_linear(x, t):
    """The dynamic W8A8 Linear on x (..., K): per-token symmetric activations."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
    s = np.abs(flat).max(-1, keepdims=True) / np.float32(127.0)
    s = np.where(s > 0, s, np.float32(1.0))
    qx = np.clip(np.rint(flat / s), -128, 127).astype(np.int64)
    acc = qx @ t["weight"].astype(np.int64).T
    y = _bf16(acc.astype(np.float32) * _bf16(t["weight_scale"].reshape(1, -1)) * s)
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


def float_linear(x, t):
    return x.astype(np.float32) @ t["weight"].astype(np.float32).T


class Weights:
    """Tensors by HF name, as float32 for FLOAT ones; `linear(module, x)` runs a Linear by its scheme."""

    def __init__(self, state, desc=None):
        self.state, self.desc = state, desc or {}

    def get(self, name, default=None):
        if name not in self.state:
            return default
        a = self.state[name]
        return a.astype(np.float32) if a.dtype.kind == "f" or a.dtype == _BF16 else a

    def linear(self, module, x):
        kind = self.desc.get(module + ".weight", FLOAT)
        t = {k[len(module) + 1:]: self.get(k) for k in self._members(module)}
        if kind == FLOAT:
            return float_linear(x, t)
        return static_linear(x, t) if kind == STATIC else dynamic_linear(x, t)

    def _members(self, module):
        suffixes = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale",
                    "quant_bias")
        return [f"{module}.{s}" for s in suffixes if f"{module}.{s}" in self.state]


def _mlp(wts, prefix, x, config, layer):
    def swiglu(p, v):
        return wts.linear(p + ".down_proj", cal.silu(wts.linear(p + ".gate_proj", v)) * wts.linear(p + ".up_proj", v))
    if not config.is_moe_layer(layer):
        return swiglu(prefix + "mlp", x)
    ids, weights = cal.route(x, wts.get(prefix + "mlp.gate.weight"),
                             wts.get(prefix + "mlp.gate.e_score_correction_bias"), config)
    out = np.zeros_like(x)
    for e in range(config.n_routed_experts):
        tok, slot = np.nonzero(ids == e)
        if tok.size:
            out[tok] += swiglu(f"{prefix}mlp.experts.{e}", x[tok]) * weights[tok, slot][:, None]
    if config.n_shared_experts:
        out += swiglu(prefix + "mlp.shared_experts", x)
    return out


def forward_logits(wts, config, ids):
    """Logits (B, S, V) of token rows ids (B, S) through the main model (no MTP), float32."""
    eps = config.rms_norm_eps
    h = wts.get("model.embed_tokens.weight")[ids]
    cos_sin = cal.rope_cos_sin(config, ids.shape[1])
    norm_names = ("input_layernorm.weight", "input_layernorm.bias", "self_attn.q_a_layernorm.weight",
                  "self_attn.q_a_layernorm.bias", "self_attn.kv_a_layernorm.weight")
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        w = {n: wts.get(prefix + n) for n in norm_names if prefix + n in wts.state}
        h = h + cal.attention(w, h, config, cos_sin, lin=lambda n, v, p=prefix: wts.linear(p + n, v))
        x = (cal.rms_raw(h, eps) * wts.get(prefix + "post_attention_layernorm.weight")).reshape(-1, h.shape[-1])
        h = h + _mlp(wts, prefix, x, config, layer).reshape(h.shape)
    return cal.final_logits(h, wts.get("model.norm.weight"), wts.get("lm_head.weight"), eps)
