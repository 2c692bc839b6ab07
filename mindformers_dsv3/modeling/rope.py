"""Rotary position embedding with YaRN scaling (DeepSeek-V3 semantics).

The HuggingFace checkpoint stores the rotary dims of q_b_proj / kv_a_proj_with_mqa
interleaved ((0,1), (2,3), ... pairs). The checkpoint table de-interleaves them at
load time, so the model rotates halves: rotate_half([x1, x2]) = [-x2, x1] (as x @ R).
"""
import math

import numpy as np
import mindspore as ms
from mindspore import ops

from mindformers_dsv3.config import yarn_mscale


def _correction_dim(num_rotations, dim, base, max_pos):
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(dim, base, rope_scaling=None):
    """Inverse frequencies (dim // 2,) and the attention factor applied to cos/sin.

    With YaRN the frequency correction is applied whatever the sequence length
    (as transformers does), so short and long prompts see the same positions.
    """
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if not rope_scaling or rope_scaling.get("type", rope_scaling.get("rope_type")) != "yarn":
        return inv_freq, 1.0
    factor = float(rope_scaling["factor"])
    original = rope_scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = rope_scaling["beta_fast"], rope_scaling["beta_slow"]
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    inv_freq = inv_freq / factor * (1.0 - extrapolation) + inv_freq * extrapolation
    attention_factor = (yarn_mscale(factor, rope_scaling["mscale"])
                        / yarn_mscale(factor, rope_scaling["mscale_all_dim"]))
    return inv_freq, attention_factor


def rope_tables(dim, base, rope_scaling, max_len):
    """cos, sin tables of shape (max_len, dim) as float32 numpy arrays."""
    inv_freq, attention_factor = inv_frequencies(dim, base, rope_scaling)
    freqs = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * attention_factor).astype(np.float32)
    sin = (np.sin(emb) * attention_factor).astype(np.float32)
    return cos, sin


def rotate_half_matrix(dim):
    """R (dim, dim) with x @ R = rotate_half(x) = [-x2, x1]: one matmul instead of two slices, a
    negation and a concat per call (each a separate kernel launch on a CPU). Exact: every output is
    one input times +-1 plus zeros."""
    half = dim // 2
    r = np.zeros((dim, dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def apply_rope(x, cos, sin, rotation):
    """x * cos + rotate_half(x) * sin for x (..., S, [heads,] D), cos/sin broadcastable to it;
    `rotation` is rotate_half_matrix(D) as a Tensor."""
    dtype = x.dtype
    xf = x.astype(ms.float32)
    turned = ops.matmul(xf.reshape(-1, xf.shape[-1]), rotation).reshape(xf.shape)  # 2-D: no broadcast
    return (xf * cos + turned * sin).astype(dtype)
