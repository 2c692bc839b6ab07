"""Calibration for dsv3-quantize: the calibration text, and a numpy float forward of one decoder layer at a time.

The tool keeps only the calibration hidden states (rows x seq x hidden, float32) between layers. For each
layer it reads that layer's float weights (HF names and layout: RoPE dims interleaved), runs the layer on the
hidden states in float32 numpy and records, per channel, the minimum and maximum of the inputs of the
statically quantized linears:

* ``attn_norm``: rmsnorm(x) *before* the input_layernorm weight (the input of q_a / q_proj and kv_a is that
  times the norm weight, plus the smoothing bias: an affine map per channel, so the per-tensor range after
  smoothing follows exactly from these per-channel extremes);
* ``q_norm``: rmsnorm(q_a(x)) before the q_a_layernorm weight (the input of q_b);
* ``o_in``: the attention output (the input of o_proj).

The forward is numpy, not our MindSpore DecoderLayer: no graph build per layer, the weights stay in HF
layout, and the statistics come from plain arrays. tests/test_quantize.py checks it against the MindSpore
model (float logits of the whole stack equal within float32 rounding). Semantics follow docs/en/architecture.md:
MLA with YaRN RoPE on interleaved pairs, sigmoid / softmax routing with group-limited top-k and the selection
bias, shared experts, SwiGLU.
"""
import json
import math
import os

import numpy as np

from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fsguard import read_text

ATTN_CHUNK = 64  # query rows per attention block (bounds the score matrix)


# ----------------------------------------------------------------------------- calibration text
def read_texts(path):
    """The "text" of every line of a jsonl file; CheckpointError naming the file and line for anything else."""
    texts = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CheckpointError(f"line {number}: not JSON ({exc})", path) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CheckpointError(f'line {number}: expected an object {{"text": "..."}}', path)
        texts.append(record["text"])
    if not texts:
        raise CheckpointError('no calibration text: one {"text": ...} object per line expected', path)
    return texts


def tokenizer_file(model_dir, given):
    """The tokenizer.json to use: `given` (a file or a folder holding one), else the model folder's."""
    path = given or model_dir
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError("no tokenizer.json here; pass --tokenizer FILE_OR_FOLDER", path)
    return path


def calibration_ids(texts, tok_path, vocab_size, bos_id, samples, seq_len):
    """Token rows (n <= samples, seq_len): the texts encoded (BOS before each when the config has one),
    concatenated and cut into rows; a stream shorter than one row gives one shorter row."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(tok_path)
    except Exception as exc:  # pylint: disable=broad-except - the tokenizers library raises its own types
        raise CheckpointError(f"cannot read the tokenizer: {exc}", tok_path) from None
    stream = []
    for text in texts:
        if bos_id is not None:
            stream.append(int(bos_id))
        stream.extend(tok.encode(text, add_special_tokens=False).ids)
        if len(stream) >= samples * seq_len:
            break
    ids = np.asarray(stream, np.int64)
    if ids.size and ids.max() >= vocab_size:
        raise CheckpointError(f"the tokenizer gives id {int(ids.max())}, outside the model's vocabulary of "
                              f"{vocab_size}", tok_path)
    rows = min(samples, ids.size // seq_len)
    if rows == 0:
        return ids[None, :]
    return ids[:rows * seq_len].reshape(rows, seq_len)


# ----------------------------------------------------------------------------- statistics
class Stats:
    """Per-channel running minimum and maximum of named activations."""

    def __init__(self):
        self.lo, self.hi = {}, {}

    def add(self, key, x):
        x = x.reshape(-1, x.shape[-1])
        lo, hi = x.min(0), x.max(0)
        if key in self.lo:
            np.minimum(self.lo[key], lo, out=self.lo[key])
            np.maximum(self.hi[key], hi, out=self.hi[key])
        else:
            self.lo[key], self.hi[key] = lo.astype(np.float32), hi.astype(np.float32)


# ----------------------------------------------------------------------------- the float forward
def rms_raw(x, eps):
    """rmsnorm(x) without its weight, float32."""
    x = x.astype(np.float32, copy=False)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def rope_cos_sin(config, length):
    """cos, sin (length, rope_dim / 2) of the model's YaRN RoPE (attention factor included)."""
    from mindformers_dsv3.modeling.rope import rope_tables  # numpy; the model's own tables
    cos, sin = rope_tables(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling, length)
    half = config.qk_rope_head_dim // 2
    return cos[:, :half], sin[:, :half]


def rope_interleaved(x, cos, sin):
    """Rotate the interleaved pairs (2i, 2i+1) of x (..., S, [heads,] D) by frequency i (HF layout)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def _mm(x, w):
    """x (..., K) @ w.T for an (N, K) weight, float32."""
    return x @ w.T


def attention(w, x, config, cos_sin, stats=None, lin=None):
    """MLA of one layer on hidden states x (B, S, H) (before input_layernorm); `w`: {HF suffix: float32 array}.
    Returns the attention output after o_proj (B, S, H); records attn_norm, q_norm, o_in in `stats`.
    `lin(module suffix, x)`: how a Linear runs (default: float, weight `w[suffix + ".weight"]`)."""
    lin = lin or (lambda name, v: _mm(v, w[name + ".weight"]))
    b, s, _ = x.shape
    heads, dn, dr, dv = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                         config.v_head_dim)
    eps = config.rms_norm_eps
    r = rms_raw(x, eps)
    if stats is not None:
        stats.add("attn_norm", r)
    xn = r * w["input_layernorm.weight"] + w.get("input_layernorm.bias", 0.0)
    if config.q_lora_rank:
        qr = rms_raw(lin("self_attn.q_a_proj", xn), eps)
        if stats is not None:
            stats.add("q_norm", qr)
        q = lin("self_attn.q_b_proj", qr * w["self_attn.q_a_layernorm.weight"]
                + w.get("self_attn.q_a_layernorm.bias", 0.0))
    else:
        q = lin("self_attn.q_proj", xn)
    q = q.reshape(b, s, heads, dn + dr)
    cos, sin = cos_sin
    q_pe = rope_interleaved(q[..., dn:], cos[:s, None, :], sin[:s, None, :])
    kv = lin("self_attn.kv_a_proj_with_mqa", xn)
    latent = rms_raw(kv[..., :config.kv_lora_rank], eps) * w["self_attn.kv_a_layernorm.weight"]
    k_pe = rope_interleaved(kv[..., config.kv_lora_rank:], cos[:s], sin[:s])            # (B, S, dr)
    kvb = lin("self_attn.kv_b_proj", latent).reshape(b, s, heads, dn + dv)
    k_nope = kvb[..., :dn].transpose(0, 2, 3, 1)                                        # (B, h, dn, S)
    v = kvb[..., dn:].transpose(0, 2, 1, 3)                                             # (B, h, S, dv)
    qn, qp = q[..., :dn].transpose(0, 2, 1, 3), q_pe.transpose(0, 2, 1, 3)              # (B, h, S, d)
    kp = k_pe.transpose(0, 2, 1)[:, None]                                               # (B, 1, dr, S)
    out = np.empty((b, heads, s, dv), np.float32)
    scale = config.softmax_scale
    for i0 in range(0, s, ATTN_CHUNK):                                                  # causal, by query block
        i1 = min(s, i0 + ATTN_CHUNK)
        scores = (qn[:, :, i0:i1] @ k_nope[..., :i1] + qp[:, :, i0:i1] @ kp[..., :i1]) * scale
        mask = np.arange(i1)[None, :] > np.arange(i0, i1)[:, None]
        scores = np.where(mask, -np.inf, scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, i0:i1] = (scores / scores.sum(-1, keepdims=True)) @ v[:, :, :i1]
    out = out.transpose(0, 2, 1, 3)
    out = out.reshape(b, s, heads * dv)
    if stats is not None:
        stats.add("o_in", out)
    return lin("self_attn.o_proj", out)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, gate, up, down):
    return _mm(silu(_mm(x, gate)) * _mm(x, up), down)


def route(x, gate_w, bias, config):
    """DeepSeek-V3 routing of x (N, H): expert ids (N, k) and weights (N, k), float32 (see Router in moe.py)."""
    logits = _mm(x.astype(np.float32), gate_w.astype(np.float32))
    if config.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores + bias[None, :] if (config.topk_method == "noaux_tc" and bias is not None) else scores.copy()
    n, e = choice.shape
    if config.topk_method != "greedy" and config.n_group > 1:
        grouped = choice.reshape(n, config.n_group, e // config.n_group)
        if config.topk_method == "noaux_tc":
            group_score = np.sort(grouped, -1)[..., -2:].sum(-1)
        else:
            group_score = grouped.max(-1)
        keep = np.argsort(-group_score, -1, kind="stable")[:, :config.topk_group]
        kept = np.zeros((n, config.n_group), bool)
        np.put_along_axis(kept, keep, True, -1)
        choice = np.where(np.repeat(kept, e // config.n_group, -1), choice, -np.inf)
    ids = np.argsort(-choice, -1, kind="stable")[:, :config.num_experts_per_tok]
    weights = np.take_along_axis(scores, ids, -1)
    if config.norm_topk_prob and config.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return ids, (weights * config.routed_scaling_factor).astype(np.float32)


def final_logits(hidden, norm_w, head_w, eps):
    """Logits (B, S, V) of the last hidden states, float32."""
    return _mm(rms_raw(hidden, eps) * norm_w, head_w)


def log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare_logits(ref, other, labels=None):
    """Agreement figures of two logits arrays (..., V): greedy top-1 agreement, mean KL(ref || other), and the
    perplexities of both on `labels` (the next tokens, same leading shape), when given."""
    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(other.astype(np.float64))
    out = {"top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).mean()),
           "mean_kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean())}
    if labels is not None:
        pick = labels[..., None]
        out["ppl_ref"] = float(math.exp(-np.take_along_axis(lp, pick, -1).mean()))
        out["ppl_other"] = float(math.exp(-np.take_along_axis(lq, pick, -1).mean()))
        out["ppl_increase"] = out["ppl_other"] / out["ppl_ref"] - 1.0
    return out
