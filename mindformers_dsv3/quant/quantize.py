"""dsv3-quantize, the arithmetic: W8A8 tensors of msModelSlim checkpoints and the smoothing folds.

Reference: /work/shared/reference/w8a8.md sections 1-3; docs/en/quantization.md ("dsv3-quantize") has the maths.

* Weights: symmetric int8 per output channel in [-127, 127]; ``weight_scale`` is absmax / 127 rounded *up*
  to a bfloat16 value (kernels read it as bf16: ``f32(bf16(weight_scale))``), so no code leaves the range and
  the scale the kernel uses is the one the codes were made with. ``weight_offset`` is zero.
* Static activations (attention q_a / q_proj, kv_a, q_b, o): per tensor, asymmetric min-max over the
  calibration set (zero included): ``input_scale = (max - min) / 255`` rounded up to bf16 (the kernel uses
  ``bf16(1 / bf16(input_scale))``), ``input_offset = round(-128 - min / input_scale)``,
  ``deq_scale = f32(input_scale * weight_scale)``, ``quant_bias = round(bias / deq_scale - input_offset *
  sum_k W_int8[n, k])`` (bias: the smoothing shift pushed through the float weight, else 0). q_a and kv_a
  see the same input and share input_scale / input_offset.
* Dynamic (everything under ``mlp.``): int8 weight + scale; activations quantized per token at run time.
"""
import ml_dtypes
import numpy as np

SMOOTH_CHOICES = ("none", "smoothquant", "outlier-suppression+")
DEFAULT_SMOOTH = "outlier-suppression+"   # upstream's DeepSeek W8A8 YAML: outliers_suppression
DEFAULT_ALPHA = 0.5
STATIC, DYNAMIC, FLOAT = "W8A8", "W8A8_DYNAMIC", "FLOAT"
STATIC_SUFFIXES = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale",
                   "quant_bias")
DYNAMIC_SUFFIXES = ("weight", "weight_scale", "weight_offset")
_BF16 = np.dtype(ml_dtypes.bfloat16)
_S_RANGE = (1e-5, 1e5)


# ----------------------------------------------------------------------------- numbers
def bf16_ceil(x):
    """The smallest bfloat16 value >= x (x > 0), as float32."""
    x = np.asarray(x, np.float32)
    b = x.astype(_BF16)
    bits = b.view(np.uint16).copy()
    bits[b.astype(np.float32) < x] += 1
    return bits.view(_BF16).astype(np.float32)


def quantize_weight(w):
    """float (N, K) -> (int8 (N, K) in [-127, 127], float32 scale (N,), bf16-exact)."""
    w = np.asarray(w, np.float32)
    absmax = np.abs(w).max(1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    scale = np.where(absmax > 0, bf16_ceil(np.maximum(absmax / 127.0, np.float32(1e-30))), np.float32(1.0))
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def static_input_params(lo, hi):
    """(input_scale, input_offset) float32 of a per-tensor activation range [lo, hi] (0 included)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    span = (hi - lo) / 255.0
    scale = float(bf16_ceil(span)) if np.isfinite(span) and span > 0 else 1.0
    offset = float(np.clip(np.rint(-128.0 - lo / scale), -128, 127))
    return np.float32(scale), np.float32(offset)


def dynamic_tensors(w):
    """{suffix: array} of a W8A8_DYNAMIC linear with float weight (N, K)."""
    q, scale = quantize_weight(w)
    return {"weight": q, "weight_scale": scale.reshape(-1, 1),
            "weight_offset": np.zeros((q.shape[0], 1), np.float32)}


def static_tensors(w, input_scale, input_offset, bias=None):
    """{suffix: array} of a W8A8 (static) linear: float weight (N, K), the input's scale / offset, float bias."""
    q, scale = quantize_weight(w)
    deq = (np.float32(input_scale) * scale).astype(np.float32)
    bias = np.zeros(q.shape[0], np.float64) if bias is None else np.asarray(bias, np.float64)
    qbias = np.rint(bias / deq - float(input_offset) * q.sum(1, dtype=np.int64))
    return {"weight": q, "weight_scale": scale.reshape(-1, 1),
            "weight_offset": np.zeros((q.shape[0], 1), np.float32),
            "input_scale": np.array([input_scale], np.float32), "input_offset": np.array([input_offset], np.float32),
            "deq_scale": deq, "quant_bias": np.clip(qbias, -2**31, 2**31 - 1).astype(np.int32)}


def as_dtype(x, dtype):
    """float32 values as stored in `dtype` and read back (what the model will compute with)."""
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


# ----------------------------------------------------------------------------- smoothing
def smooth_factors(act_absmax, weights, alpha):
    """s_j = a_j^alpha / max_i |W_ij|^(1 - alpha) over the weights that read channel j (SmoothQuant),
    1 where a channel is silent, clipped to [1e-5, 1e5]."""
    wmax = np.max([np.abs(w).max(0) for w in weights], axis=0).astype(np.float64)
    act = np.asarray(act_absmax, np.float64)
    ok = (act > 0) & (wmax > 0)
    s = np.ones_like(act)
    s[ok] = act[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
    return np.clip(s, *_S_RANGE).astype(np.float32)


def fold_norm(norm_w, r_lo, r_hi, weights, smooth, alpha, dtype):
    """A norm followed by linears that read its output X = r * norm_w (r: the weightless rmsnorm, per-channel
    extremes r_lo, r_hi). Returns (norm weight, norm bias or None, the linears' float weights, their float bias
    (list, None when no shift), per-tensor (lo, hi) of the smoothed input). X' = (X - z) / s: the norm weight
    becomes w / s, the bias -z / s (outlier-suppression+ only), each W becomes W * s and gains bias W @ z."""
    x_lo, x_hi = np.minimum(r_lo * norm_w, r_hi * norm_w), np.maximum(r_lo * norm_w, r_hi * norm_w)
    z = np.zeros_like(norm_w)
    if smooth == "none":
        s = np.ones_like(norm_w)
    elif smooth == "smoothquant":
        s = smooth_factors(np.maximum(np.abs(x_lo), np.abs(x_hi)), weights, alpha)
    else:
        z = ((x_lo + x_hi) / 2).astype(np.float32)
        s = smooth_factors((x_hi - x_lo) / 2, weights, alpha)
    new_w = as_dtype(norm_w / s, dtype)
    new_b = as_dtype(-z / s, dtype) if smooth == "outlier-suppression+" else None
    lo = np.minimum(r_lo * new_w, r_hi * new_w) + (0 if new_b is None else new_b)
    hi = np.maximum(r_lo * new_w, r_hi * new_w) + (0 if new_b is None else new_b)
    scaled = [w * s[None, :] for w in weights]
    biases = [w.astype(np.float64) @ z.astype(np.float64) for w in weights] if new_b is not None else None
    return new_w, new_b, scaled, biases, (float(lo.min()), float(hi.max()))


def fold_kv_b(kv_b, o_w, lo, hi, smooth, alpha, config, dtype):
    """kv_b -> o_proj, no shift: o's input channel (head h, j) is V row (h, dn + j) of kv_b, so o's columns
    grow by s and those kv_b rows shrink by s. Returns (kv_b as stored, o weight, per-tensor (lo, hi))."""
    if smooth == "none":
        s = np.ones(o_w.shape[1], np.float32)
    else:
        s = smooth_factors(np.maximum(np.abs(lo), np.abs(hi)), [o_w], alpha)
    heads, dn, dv = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    kv = kv_b.reshape(heads, dn + dv, -1).copy()
    kv[:, dn:, :] /= s.reshape(heads, dv)[:, :, None]
    return as_dtype(kv.reshape(kv_b.shape), dtype), o_w * s[None, :], (float((lo / s).min()), float((hi / s).max()))


def attention_tensors(w, stats, config, smooth, alpha, dtypes):
    """The attention tensors of one layer in write order: [(HF suffix, array, description type)].
    `w`: {suffix: float32} of the layer's attention and norm weights; `stats`: calibrate.Stats of the layer;
    `dtypes`: {suffix: numpy dtype} the FLOAT tensors are stored in."""
    out = []
    q_names = (["self_attn.q_a_proj"] if config.q_lora_rank else ["self_attn.q_proj"]) \
        + ["self_attn.kv_a_proj_with_mqa"]
    n_w, n_b, scaled, biases, (lo, hi) = fold_norm(
        w["input_layernorm.weight"], stats.lo["attn_norm"], stats.hi["attn_norm"],
        [w[n + ".weight"] for n in q_names], smooth, alpha, dtypes["input_layernorm.weight"])
    out.append(("input_layernorm.weight", n_w, FLOAT))
    if n_b is not None:
        out.append(("input_layernorm.bias", n_b, FLOAT))
    scale, offset = static_input_params(lo, hi)
    linears = {n: static_tensors(ws, scale, offset, None if biases is None else b)
               for n, ws, b in zip(q_names, scaled, biases or [None] * len(scaled))}
    out += [(f"{q_names[0]}.{k}", v, STATIC) for k, v in linears[q_names[0]].items()]
    if config.q_lora_rank:
        n_w, n_b, (wq,), qb, (lo, hi) = fold_norm(
            w["self_attn.q_a_layernorm.weight"], stats.lo["q_norm"], stats.hi["q_norm"],
            [w["self_attn.q_b_proj.weight"]], smooth, alpha, dtypes["self_attn.q_a_layernorm.weight"])
        out.append(("self_attn.q_a_layernorm.weight", n_w, FLOAT))
        if n_b is not None:
            out.append(("self_attn.q_a_layernorm.bias", n_b, FLOAT))
        tensors = static_tensors(wq, *static_input_params(lo, hi), None if qb is None else qb[0])
        out += [(f"self_attn.q_b_proj.{k}", v, STATIC) for k, v in tensors.items()]
    out += [(f"{q_names[1]}.{k}", v, STATIC) for k, v in linears[q_names[1]].items()]
    out.append(("self_attn.kv_a_layernorm.weight", as_dtype(w["self_attn.kv_a_layernorm.weight"],
                                                          dtypes["self_attn.kv_a_layernorm.weight"]), FLOAT))
    kv_b, o_w, (lo, hi) = fold_kv_b(w["self_attn.kv_b_proj.weight"], w["self_attn.o_proj.weight"],
                                    stats.lo["o_in"], stats.hi["o_in"], smooth, alpha, config,
                                    dtypes["self_attn.kv_b_proj.weight"])
    out.append(("self_attn.kv_b_proj.weight", kv_b, FLOAT))
    tensors = static_tensors(o_w, *static_input_params(lo, hi))
    out += [(f"self_attn.o_proj.{k}", v, STATIC) for k, v in tensors.items()]
    return out


# ----------------------------------------------------------------------------- the tensors of a layer (plan)
def _linear_plan(prefix, n, k, kind):
    shapes = {"weight": ((n, k), "I8"), "weight_scale": ((n, 1), "F32"), "weight_offset": ((n, 1), "F32"),
              "input_scale": ((1,), "F32"), "input_offset": ((1,), "F32"), "deq_scale": ((n,), "F32"),
              "quant_bias": ((n,), "I32")}
    return [(f"{prefix}.{s}", shapes[s][1], shapes[s][0], kind)
            for s in (STATIC_SUFFIXES if kind == STATIC else DYNAMIC_SUFFIXES)]


def attention_plan(config, prefix, float_dtype, smooth):
    """[(name, safetensors dtype, shape, type)] of attention_tensors' output for one layer, in write order.
    `float_dtype`: {HF suffix: safetensors dtype name} of the FLOAT tensors."""
    c, h = config, config.hidden_size
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    shift = smooth == "outlier-suppression+"

    def flt(suffix, shape):
        return (prefix + suffix, float_dtype[suffix], shape, FLOAT)
    out = [flt("input_layernorm.weight", (h,))]
    if shift:
        out.append((prefix + "input_layernorm.bias", float_dtype["input_layernorm.weight"], (h,), FLOAT))
    if c.q_lora_rank:
        out += _linear_plan(prefix + "self_attn.q_a_proj", c.q_lora_rank, h, STATIC)
        out.append(flt("self_attn.q_a_layernorm.weight", (c.q_lora_rank,)))
        if shift:
            out.append((prefix + "self_attn.q_a_layernorm.bias", float_dtype["self_attn.q_a_layernorm.weight"],
                        (c.q_lora_rank,), FLOAT))
        out += _linear_plan(prefix + "self_attn.q_b_proj", c.num_attention_heads * qk, c.q_lora_rank, STATIC)
    else:
        out += _linear_plan(prefix + "self_attn.q_proj", c.num_attention_heads * qk, h, STATIC)
    out += _linear_plan(prefix + "self_attn.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h, STATIC)
    out.append(flt("self_attn.kv_a_layernorm.weight", (c.kv_lora_rank,)))
    out.append(flt("self_attn.kv_b_proj.weight",
                   (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)))
    out += _linear_plan(prefix + "self_attn.o_proj", h, c.num_attention_heads * c.v_head_dim, STATIC)
    return out


def mlp_plan(config, layer, prefix, float_dtype):
    """[(name, dtype, shape, type)] of the layer's post-attention norm and MLP, in write order."""
    c, h = config, config.hidden_size
    out = [(prefix + "post_attention_layernorm.weight", float_dtype["post_attention_layernorm.weight"], (h,), FLOAT)]

    def swiglu(p, inter):
        return (_linear_plan(p + ".gate_proj", inter, h, DYNAMIC) + _linear_plan(p + ".up_proj", inter, h, DYNAMIC)
                + _linear_plan(p + ".down_proj", h, inter, DYNAMIC))
    if not c.is_moe_layer(layer):
        return out + swiglu(prefix + "mlp", c.intermediate_size)
    out.append((prefix + "mlp.gate.weight", float_dtype["mlp.gate.weight"], (c.n_routed_experts, h), FLOAT))
    if c.topk_method == "noaux_tc":
        out.append((prefix + "mlp.gate.e_score_correction_bias", float_dtype["mlp.gate.e_score_correction_bias"],
                    (c.n_routed_experts,), FLOAT))
    for e in range(c.n_routed_experts):
        out += swiglu(f"{prefix}mlp.experts.{e}", c.moe_intermediate_size)
    if c.n_shared_experts:
        out += swiglu(prefix + "mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts)
    return out
