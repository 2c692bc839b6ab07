"""An independent numpy W8A8 forward pass of an msModelSlim-layout DeepSeek-V3 state (test oracle).

The structure is numpy_dsv3's (HF tensor names, interleaved RoPE, official routing); every Linear goes
through :meth:`W8A8Forward.linear`, which picks its scheme from the description map
(``desc[prefix + ".weight"]``: ``"W8A8"`` / ``"W8A8_DYNAMIC"`` / ``"FLOAT"``) and does the arithmetic of
/work/shared/reference/w8a8.md section 2 with exact integers:

static (per-tensor asymmetric activations)::

    r   = bf16(1 / bf16(input_scale));  o = int8(input_offset)
    qx  = saturate_int8(round_half_even(f32(x) * f32(r) + o))
    acc = sum_k qx[m, k] * W[n, k]                          (exact, int64)
    y   = f32(acc + quant_bias[n]) * deq_scale[n]

dynamic (per-token symmetric)::

    s[m] = max_k |f32(x[m, k])| / 127   (f32; a zero row quantizes to zeros)
    qx   = clamp(round_half_even(f32(x) / s[m]), -128, 127)
    y    = f32(acc) * f32(bf16(weight_scale[n])) * s[m]      (f32, left to right)

``bf16_out``: the output y rounded to bfloat16 (a bf16 model on Ascend); False keeps the f32 result (what a
float32 model on a CPU computes). Routed experts: gate and up share the token's scale (one w13
quant-matmul), SwiGLU, a fresh dynamic quantization, down. A norm with a ``<norm>.bias`` tensor (the
smoothing shift) is ``rmsnorm(x) * w + bias``. Float parts run in float64, as numpy_dsv3.

``observe(prefix, x)``, when given, sees the (float) input of every Linear: the fixture writer calibrates
static activation ranges with it. ``row_split`` (tensor parallelism of split inference): each
``down_proj`` (dense, shared, routed experts: row-parallel, dynamic) runs as that many K slices, each
quantized per token with its own scale, the float results summed (quant/layers.py's rule).

Public API::

    W8A8Forward(config, state, desc, bf16_out=False, observe=None, row_split=1)
        .linear(prefix, x) / .attention / .mlp / .moe / .layer / .hidden / .logits(input_ids)
    forward_logits(config, state, desc, input_ids, bf16_out=False) -> (batch, seq, vocab) float64
    greedy(config, state, desc, prompt, new_tokens, bf16_out=False) -> list of token ids (prompt included)
    quant_static(x, input_scale, input_offset) -> int array;  quant_dynamic(x) -> (int array, scales)
"""
import ml_dtypes
import numpy as np

from tests.reference import numpy_dsv3 as ref

__all__ = ["W8A8Forward", "forward_logits", "greedy", "quant_static", "quant_dynamic", "bf16"]

F32 = np.float32


def bf16(x):
    """Round to bfloat16 (nearest even), returned as float32."""
    return np.asarray(x, F32).astype(ml_dtypes.bfloat16).astype(F32)


def quant_static(x, input_scale, input_offset):
    """Per-tensor asymmetric int8 codes of x (..., K) as int64 (values in [-128, 127])."""
    r = bf16(F32(1.0) / bf16(np.asarray(input_scale, F32).reshape(-1)[0]))
    o = F32(np.int8(np.asarray(input_offset).reshape(-1)[0]))
    q = np.rint(np.asarray(x, F32) * r + o)  # f32 multiply, f32 add, round half to even
    return np.clip(q, -128, 127).astype(np.int64)


def quant_dynamic(x):
    """Per-row symmetric int8 codes of x (M, K) as int64, and the f32 row scales (M, 1)."""
    x = np.asarray(x, F32)
    s = (np.max(np.abs(x), axis=-1, keepdims=True) / F32(127)).astype(F32)
    safe = np.where(s > 0, s, F32(1))
    q = np.where(s > 0, np.rint(x / safe), 0)
    return np.clip(q, -128, 127).astype(np.int64), s


def _int_matmul(q, weight):
    """Exact integer q (M, K) @ W (N, K)^T in int64 (int32 never overflows here: |sum| < 2^31)."""
    acc = q @ np.asarray(weight, np.int64).T
    assert np.abs(acc).max(initial=0) < 2 ** 31
    return acc


class W8A8Forward:
    """The forward pass of one (config.json dict, {HF name: array}, description) triple."""

    def __init__(self, config, state, desc, bf16_out=False, observe=None, row_split=1):
        self.config, self.state, self.desc = config, state, desc
        self.bf16_out, self.observe, self.row_split = bf16_out, observe, row_split

    def w(self, name):
        return np.asarray(self.state[name], dtype=np.float64)

    def _out(self, y):
        return (bf16(y) if self.bf16_out else np.asarray(y, F32)).astype(np.float64)

    def linear(self, prefix, x):
        """y = x @ W^T of the Linear `prefix` (HF name without `.weight`) in its described scheme."""
        x = np.asarray(x)
        if self.observe is not None:
            self.observe(prefix, x)
        scheme = self.desc.get(prefix + ".weight", "FLOAT")
        lead, k = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, k)
        weight = self.state[prefix + ".weight"]
        if scheme == "FLOAT":
            y = flat.astype(np.float64) @ np.asarray(weight, np.float64).T
        elif scheme == "W8A8":
            acc = _int_matmul(quant_static(flat, self.state[prefix + ".input_scale"],
                                           self.state[prefix + ".input_offset"]), weight)
            qb = np.asarray(self.state[prefix + ".quant_bias"], np.int64).reshape(-1)
            deq = np.asarray(self.state[prefix + ".deq_scale"], F32).reshape(-1)
            y = self._out((acc + qb).astype(F32) * deq)
        elif scheme == "W8A8_DYNAMIC":
            ws = bf16(np.asarray(self.state[prefix + ".weight_scale"], F32).reshape(-1))
            parts = self.row_split if prefix.endswith("down_proj") else 1
            y = 0
            for xs, ws_k in zip(np.split(flat, parts, axis=1), np.split(np.asarray(weight), parts, axis=1)):
                q, s = quant_dynamic(xs)
                y = y + self._out(_int_matmul(q, ws_k).astype(F32) * ws * s)
        else:
            raise ValueError(f"{prefix}: unknown scheme {scheme!r}")
        return y.reshape(lead + (y.shape[-1],))

    def norm(self, name, x):
        """rmsnorm(x) * w (+ bias when the state holds `<name>.bias`)."""
        out = ref.rms_norm(x, self.w(name + ".weight"), self.config["rms_norm_eps"])
        if name + ".bias" in self.state:
            out = out + self.w(name + ".bias")
        return out

    def attention(self, prefix, x):
        """Naive MLA over a full causal sequence (numpy_dsv3.attention with quantized projections)."""
        c = self.config
        b, s, _ = x.shape
        heads, d_nope, d_rope, d_v = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                      c["v_head_dim"])
        a = prefix + "self_attn."
        q = self.linear(a + "q_b_proj", self.norm(a + "q_a_layernorm", self.linear(a + "q_a_proj", x)))
        q = q.reshape(b, s, heads, d_nope + d_rope)
        q_nope, q_pe = q[..., :d_nope], q[..., d_nope:]
        kv_a = self.linear(a + "kv_a_proj_with_mqa", x)
        c_kv, k_pe = kv_a[..., :c["kv_lora_rank"]], kv_a[..., c["kv_lora_rank"]:]
        kv = self.linear(a + "kv_b_proj", self.norm(a + "kv_a_layernorm", c_kv)).reshape(b, s, heads, d_nope + d_v)
        k_nope, v = kv[..., :d_nope], kv[..., d_nope:]
        cos, sin = ref.rope_cos_sin(c, np.arange(s))
        q_pe = ref.apply_rope_interleaved(q_pe, cos[:, None, :], sin[:, None, :])
        k_pe = ref.apply_rope_interleaved(k_pe, cos, sin)
        scores = np.einsum("bihd,bjhd->bhij", q_nope, k_nope) + np.einsum("bihr,bjr->bhij", q_pe, k_pe)
        scores = np.where(np.tril(np.ones((s, s), dtype=bool)), scores * ref.softmax_scale(c), -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("bhij,bjhd->bihd", probs, v).reshape(b, s, heads * d_v)
        return self.linear(a + "o_proj", out)

    def mlp(self, prefix, x):
        """down(silu(gate x) * up x); gate and up see the same quantized x (one fused w13)."""
        h = ref.silu(self.linear(prefix + "gate_proj", x)) * self.linear(prefix + "up_proj", x)
        return self.linear(prefix + "down_proj", h)

    def moe(self, prefix, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        bias_name = prefix + "gate.e_score_correction_bias"
        bias = self.w(bias_name) if bias_name in self.state else None
        idx, weight = ref.route(flat, self.w(prefix + "gate.weight"), bias, self.config)
        out = np.zeros_like(flat, dtype=np.float64)
        for e in np.unique(idx):
            tok, slot = np.nonzero(idx == e)
            out[tok] += weight[tok, slot][:, None] * self.mlp(f"{prefix}experts.{e}.", flat[tok])
        if self.config.get("n_shared_experts"):
            out += self.mlp(prefix + "shared_experts.", flat)
        return out.reshape(shape)

    def layer(self, index, h):
        p = f"model.layers.{index}."
        h = h + self.attention(p, self.norm(p + "input_layernorm", h))
        x = self.norm(p + "post_attention_layernorm", h)
        if index >= self.config["first_k_dense_replace"]:
            return h + self.moe(p + "mlp.", x)
        return h + self.mlp(p + "mlp.", x)

    def hidden(self, input_ids):
        h = self.w("model.embed_tokens.weight")[np.asarray(input_ids)]
        for index in range(self.config["num_hidden_layers"]):
            h = self.layer(index, h)
        return h

    def logits(self, input_ids):
        h = self.norm("model.norm", self.hidden(input_ids))
        return self.linear("lm_head", h)


def forward_logits(config, state, desc, input_ids, bf16_out=False, row_split=1):
    """Logits (batch, seq, vocab), float64, for full causal sequences starting at position 0."""
    return W8A8Forward(config, state, desc, bf16_out, row_split=row_split).logits(input_ids)


def greedy(config, state, desc, prompt, new_tokens, bf16_out=False):
    """Greedy continuation by full recomputation (no cache): prompt + `new_tokens` ids, and the top-1 margins
    (logit of the best minus the second best) of each step."""
    model = W8A8Forward(config, state, desc, bf16_out)
    ids, margins = [int(t) for t in prompt], []
    for _ in range(new_tokens):
        last = model.logits(np.asarray([ids]))[0, -1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ids.append(int(np.argmax(last)))
    return ids, margins
