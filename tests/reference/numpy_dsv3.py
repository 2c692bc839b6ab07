"""An independent float64 numpy DeepSeek-V3 forward pass (test oracle).

Semantics follow DeepSeek's official inference code (deepseek-ai/DeepSeek-V3 ``inference/model.py``)
read against an HF-format checkpoint (HF ``config.json`` names and tensor names), with two
deliberate choices documented in ``/work/shared/design.md``:

* the YaRN frequency correction is applied for every sequence length (transformers does this; the
  official code only when ``max_seq_len > original_seq_len``);
* cos/sin are scaled by ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)``
  (1.0 for the released config, where both are 1.0; the official code has no such factor).

RoPE is applied to **interleaved** pairs (dims (0,1), (2,3), ... are one complex number), which is
how the checkpoint stores the rope rows of ``q_b_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa``.

Routing masks dropped groups with ``-inf`` (official), not 0.0 (transformers 4.51.3 bug).

Public API::

    rms_norm(x, weight, eps) -> ndarray
    yarn_mscale(scale, mscale=1.0) -> float
    rope_inv_freq(config) -> ndarray (qk_rope_head_dim // 2,)
    rope_attention_factor(config) -> float (cos/sin multiplier)
    rope_cos_sin(config, positions) -> (cos, sin), each (len(positions), qk_rope_head_dim // 2)
    apply_rope_interleaved(x, cos, sin) -> ndarray
    softmax_scale(config) -> float
    route(hidden, gate_weight, bias, config) -> (topk_idx (T, k) int64, topk_weight (T, k) float64)
    moe(config, state, prefix, x) -> ndarray
    attention(config, state, prefix, x, positions=None) -> ndarray
    decoder_layer(config, state, layer, h, positions=None) -> ndarray
    forward_hidden(config, state, input_ids) -> (batch, seq, hidden), before the final norm
    forward_logits(config, state, input_ids) -> (batch, seq, vocab)
    mtp_logits(config, state, input_ids, hidden_last=None, depth=0) -> (batch, seq - 1, vocab)
"""
import math

import numpy as np

__all__ = [
    "rms_norm",
    "silu",
    "yarn_mscale",
    "rope_inv_freq",
    "rope_attention_factor",
    "rope_cos_sin",
    "apply_rope_interleaved",
    "softmax_scale",
    "route",
    "mlp",
    "moe",
    "attention",
    "decoder_layer",
    "forward_hidden",
    "forward_logits",
    "mtp_logits",
]


def _w(state, name):
    return np.asarray(state[name], dtype=np.float64)


def _linear(x, weight):
    """y = x @ W^T with W stored (out, in) as in torch / the checkpoint."""
    return x @ weight.T


def rms_norm(x, weight, eps):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------- RoPE / YaRN


def yarn_mscale(scale, mscale=1.0):
    """0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(config):
    rs = config.get("rope_scaling")
    if rs is None:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        raise NotImplementedError(f"rope_scaling type {kind!r}")
    return rs


def rope_inv_freq(config):
    """Inverse frequencies of the qk_rope_head_dim/2 rotating pairs, YaRN-corrected when configured."""
    dim = config["qk_rope_head_dim"]
    base = float(config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = _yarn(config)
    if rs is None:
        return inv_freq
    factor = float(rs["factor"])
    original = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast", 32)
    beta_slow = rs.get("beta_slow", 1)

    def correction_dim(num_rotations):
        # the dim index whose wavelength makes num_rotations turns over the original context
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    smooth = 1.0 - ramp  # 1 -> keep the original (high) frequency, 0 -> interpolate (divide by factor)
    return inv_freq / factor * (1.0 - smooth) + inv_freq * smooth


def rope_attention_factor(config):
    """yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim); 1.0 without YaRN.

    Missing keys default to mscale=1, mscale_all_dim=0 (as DeepSeek's HF remote code), which gives
    1 + 0.1 ln(factor): configs should carry both (the released ones do, both 1.0 -> factor 1).
    """
    rs = _yarn(config)
    if rs is None:
        return 1.0
    factor = float(rs["factor"])
    return yarn_mscale(factor, rs.get("mscale", 1.0)) / yarn_mscale(factor, rs.get("mscale_all_dim", 0.0))


def rope_cos_sin(config, positions):
    """cos and sin of position * inv_freq (one column per rotating pair), times the YaRN attention factor."""
    angles = np.outer(np.asarray(positions, dtype=np.float64), rope_inv_freq(config))
    a = rope_attention_factor(config)
    return np.cos(angles) * a, np.sin(angles) * a


def apply_rope_interleaved(x, cos, sin):
    """Rotate interleaved pairs: (x[2i] + j x[2i+1]) * (cos_i + j sin_i), per position.

    ``x``: (..., seq, [heads,] rope_dim) is handled by broadcasting ``cos``/``sin`` of shape
    (seq, rope_dim // 2); pass them already expanded for other layouts.
    """
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = z * (cos + 1j * sin)
    out = np.empty(x.shape, dtype=np.float64)
    out[..., 0::2] = rot.real
    out[..., 1::2] = rot.imag
    return out


def softmax_scale(config):
    """qk_head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim set."""
    scale = (config["qk_nope_head_dim"] + config["qk_rope_head_dim"]) ** -0.5
    rs = _yarn(config)
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs["factor"]), rs["mscale_all_dim"])
        scale *= m * m
    return scale


# --------------------------------------------------------------------------------------- MLA


def attention(config, state, prefix, x, positions=None):
    """Naive (non-absorbed) MLA over a full causal sequence. ``x``: (batch, seq, hidden), normed."""
    b, s, _ = x.shape
    n_heads = config["num_attention_heads"]
    d_nope = config["qk_nope_head_dim"]
    d_rope = config["qk_rope_head_dim"]
    d_v = config["v_head_dim"]
    kv_rank = config["kv_lora_rank"]
    eps = config["rms_norm_eps"]
    a = prefix + "self_attn."
    if positions is None:
        positions = np.arange(s)

    if config.get("q_lora_rank") is None:
        q = _linear(x, _w(state, a + "q_proj.weight"))
    else:
        q_latent = rms_norm(_linear(x, _w(state, a + "q_a_proj.weight")), _w(state, a + "q_a_layernorm.weight"), eps)
        q = _linear(q_latent, _w(state, a + "q_b_proj.weight"))
    q = q.reshape(b, s, n_heads, d_nope + d_rope)
    q_nope, q_pe = q[..., :d_nope], q[..., d_nope:]

    kv_a = _linear(x, _w(state, a + "kv_a_proj_with_mqa.weight"))
    c_kv, k_pe = kv_a[..., :kv_rank], kv_a[..., kv_rank:]  # k_pe: (b, s, d_rope), one for all heads
    kv = _linear(rms_norm(c_kv, _w(state, a + "kv_a_layernorm.weight"), eps), _w(state, a + "kv_b_proj.weight"))
    kv = kv.reshape(b, s, n_heads, d_nope + d_v)
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]

    cos, sin = rope_cos_sin(config, positions)  # (s, d_rope/2)
    q_pe = apply_rope_interleaved(q_pe, cos[:, None, :], sin[:, None, :])
    k_pe = apply_rope_interleaved(k_pe, cos, sin)

    # score[b, h, i, j] = q_i . k_j over [nope | rope]; the rope part of k is shared by all heads.
    scores = np.einsum("bihd,bjhd->bhij", q_nope, k_nope) + np.einsum("bihr,bjr->bhij", q_pe, k_pe)
    scores = scores * softmax_scale(config)
    causal = np.tril(np.ones((s, s), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    probs = _softmax(scores, axis=-1)
    out = np.einsum("bhij,bjhd->bihd", probs, v).reshape(b, s, n_heads * d_v)
    return _linear(out, _w(state, a + "o_proj.weight"))


# --------------------------------------------------------------------------------------- MLP / MoE


def mlp(state, prefix, x):
    """down(silu(gate x) * up x) for the tensors ``{prefix}{gate,up,down}_proj.weight``."""
    g = _linear(x, _w(state, prefix + "gate_proj.weight"))
    u = _linear(x, _w(state, prefix + "up_proj.weight"))
    return _linear(silu(g) * u, _w(state, prefix + "down_proj.weight"))


def route(hidden, gate_weight, bias, config):
    """Group-limited top-k routing (noaux_tc). ``hidden``: (T, H) -> (idx (T, k), weight (T, k)).

    Experts come sorted by biased score, best first. Weights are the unbiased scores of the
    chosen experts, normalised when ``norm_topk_prob``, times ``routed_scaling_factor``.
    """
    hidden = np.asarray(hidden, dtype=np.float64).reshape(-1, np.shape(gate_weight)[1])
    logits = _linear(hidden, np.asarray(gate_weight, dtype=np.float64))
    n_exp = logits.shape[1]
    k = config["num_experts_per_tok"]
    n_group = config.get("n_group", 1) or 1
    topk_group = config.get("topk_group", n_group) or n_group
    scoring = config.get("scoring_func", "sigmoid")
    if scoring == "sigmoid":
        scores = _sigmoid(logits)
    elif scoring == "softmax":
        scores = _softmax(logits, axis=-1)
    else:
        raise NotImplementedError(scoring)

    choice = scores if bias is None else scores + np.asarray(bias, dtype=np.float64)[None, :]
    if n_group > 1:
        per_group = n_exp // n_group
        if k > topk_group * per_group:
            raise ValueError("num_experts_per_tok exceeds the experts of the kept groups")
        grouped = choice.reshape(-1, n_group, per_group)
        if bias is None:
            group_score = grouped.max(axis=-1)
        else:
            group_score = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
        kept = np.argsort(-group_score, axis=-1, kind="stable")[:, :topk_group]
        keep = np.zeros(group_score.shape, dtype=bool)
        np.put_along_axis(keep, kept, True, axis=-1)
        choice = np.where(np.repeat(keep, per_group, axis=-1), choice, -np.inf)

    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    weight = np.take_along_axis(scores, idx, axis=-1)
    if config.get("norm_topk_prob", True) and k > 1:
        weight = weight / weight.sum(axis=-1, keepdims=True)
    weight = weight * config.get("routed_scaling_factor", 1.0)
    return idx.astype(np.int64), weight


def moe(config, state, prefix, x):
    """Routed experts (weighted by :func:`route`) plus shared experts. ``prefix`` ends with ``mlp.``."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    bias_name = prefix + "gate.e_score_correction_bias"
    bias = _w(state, bias_name) if bias_name in state else None
    idx, weight = route(flat, _w(state, prefix + "gate.weight"), bias, config)
    out = np.zeros_like(flat)
    for e in np.unique(idx):
        tok, slot = np.nonzero(idx == e)
        out[tok] += weight[tok, slot][:, None] * mlp(state, f"{prefix}experts.{e}.", flat[tok])
    if config.get("n_shared_experts"):
        out += mlp(state, prefix + "shared_experts.", flat)
    return out.reshape(shape)


# --------------------------------------------------------------------------------------- model


def decoder_layer(config, state, layer, h, positions=None):
    """Pre-norm block: h + attn(norm(h)), then + mlp/moe(norm(.))."""
    p = f"model.layers.{layer}."
    eps = config["rms_norm_eps"]
    h = h + attention(config, state, p, rms_norm(h, _w(state, p + "input_layernorm.weight"), eps), positions)
    x = rms_norm(h, _w(state, p + "post_attention_layernorm.weight"), eps)
    if layer >= config["first_k_dense_replace"]:
        return h + moe(config, state, p + "mlp.", x)
    return h + mlp(state, p + "mlp.", x)


def forward_hidden(config, state, input_ids):
    """Hidden states after the last decoder layer, before ``model.norm``: (batch, seq, hidden)."""
    ids = np.asarray(input_ids)
    h = _w(state, "model.embed_tokens.weight")[ids]
    for layer in range(config["num_hidden_layers"]):
        h = decoder_layer(config, state, layer, h)
    return h


def forward_logits(config, state, input_ids):
    """Logits (batch, seq, vocab), float64, for a full causal sequence starting at position 0."""
    h = forward_hidden(config, state, input_ids)
    h = rms_norm(h, _w(state, "model.norm.weight"), config["rms_norm_eps"])
    return _linear(h, _w(state, "lm_head.weight"))


def mtp_logits(config, state, input_ids, hidden_last=None, depth=0):
    """Logits of MTP module ``depth`` (checkpoint layer ``num_hidden_layers + depth``).

    Position i combines the hidden state of token i with the embedding of token i+1 and predicts
    token i+2: ``eh_proj([enorm(emb(t_{i+1})), hnorm(h_i)])`` -> decoder layer (causal, positions
    0..seq-2) -> ``shared_head.norm`` -> ``shared_head.head``. Returns (batch, seq - 1, vocab).

    ``hidden_last`` (batch, seq, hidden) is the previous depth's output; for depth 0 it defaults to
    the main model's output *after* ``model.norm`` (the vLLM / SGLang convention). The embedding order
    [emb, hidden] in the concat follows vLLM / SGLang (``eh_proj`` is (hidden, 2*hidden)).
    Only depth 0 has a default ``hidden_last``.
    """
    ids = np.asarray(input_ids)
    eps = config["rms_norm_eps"]
    layer = config["num_hidden_layers"] + depth
    p = f"model.layers.{layer}."
    if hidden_last is None:
        if depth != 0:
            raise ValueError("hidden_last is required for depth > 0")
        hidden_last = rms_norm(forward_hidden(config, state, ids), _w(state, "model.norm.weight"), eps)
    hidden_last = np.asarray(hidden_last, dtype=np.float64)
    emb = _w(state, p + "embed_tokens.weight")[ids[:, 1:]]
    x = np.concatenate(
        [rms_norm(emb, _w(state, p + "enorm.weight"), eps), rms_norm(hidden_last[:, :-1], _w(state, p + "hnorm.weight"), eps)],
        axis=-1,
    )
    h = _linear(x, _w(state, p + "eh_proj.weight"))
    h = decoder_layer(config, state, layer, h)
    h = rms_norm(h, _w(state, p + "shared_head.norm.weight"), eps)
    return _linear(h, _w(state, p + "shared_head.head.weight"))
