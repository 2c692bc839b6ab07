"""Test-side block FP8: DeepSeek's quantizer (to build FP8 fixtures) and a checked whole-tensor dequantizer
(the library decodes through fp8.dequantize_into). Tests compare against torch and loop references."""
import numpy as np

from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import DEFAULT_BLOCK, FP8, check_block, check_scale, dequantize_into, scale_inv_shape

FP8_MAX = 448.0  # largest finite e4m3fn; ml_dtypes casts anything beyond it to NaN


def _column_scales(scale, cols, bc):
    """(R, C) block scales -> (R, cols): each block's scale repeated over its columns."""
    return np.repeat(scale, bc, axis=1)[:, :cols]


def _apply_row_blocks(out, col_scale, br, op):
    """op(out rows of block r, col_scale[r]) for every row block, in place, without
    materialising a full-size scale array: full blocks through a (R0, br, cols) view."""
    rows = out.shape[0]
    full = rows // br
    if full:
        op(out[:full * br].reshape(full, br, out.shape[1]), col_scale[:full, None, :])
    if rows % br:
        op(out[full * br:], col_scale[full][None, :])


def dequantize_block_fp8(weight_fp8, scale_inv, block=DEFAULT_BLOCK, out_dtype=np.float32,
                         name=None, file=None):
    """Block-FP8 weight -> ``out_dtype``, each value float32(fp8) * float32(scale) rounded once to
    ``out_dtype``. Checks dtypes and the scale's shape (errors name `file` and the tensor `name`).
    Peak memory: the result plus small lookup tables."""
    w = np.asarray(weight_fp8)
    s = np.asarray(scale_inv)
    if w.dtype != FP8:
        raise CheckpointError(f"weight dtype is {w.dtype}, expected float8_e4m3fn", file, name)
    if w.ndim != 2:
        raise CheckpointError(f"weight must be 2-D, got shape {w.shape}", file, name)
    check_scale(w.shape, s.shape, s.dtype if np.issubdtype(s.dtype, np.floating) else np.dtype(np.int64),
                block, file, name)
    return dequantize_into(np.ascontiguousarray(w), s, np.empty(w.shape, out_dtype), block)


def quantize_block_fp8(w, block=DEFAULT_BLOCK):
    """2-D float weight -> (float8_e4m3fn weight, float32 scale_inv), DeepSeek's layout.

    scale_inv = block amax / 448 (1 for all-zero blocks); q = clip(w / scale_inv, +-448)
    cast with round-to-nearest-even. Non-finite inputs are refused.
    """
    br, bc = check_block(block)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {w.shape}")
    x = w.astype(np.float32)  # the working copy; divided in place below
    if not np.isfinite(x).all():
        raise ValueError("weight holds NaN or infinity; cannot quantize")
    rows, cols = x.shape
    if x.size == 0:
        return x.astype(FP8), np.ones(scale_inv_shape(x.shape, (br, bc)), np.float32)
    amax = np.maximum.reduceat(np.abs(x), np.arange(0, rows, br), axis=0)
    amax = np.maximum.reduceat(amax, np.arange(0, cols, bc), axis=1)
    scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
    scale[scale == 0] = 1.0
    _apply_row_blocks(x, _column_scales(scale, cols, bc), br,
                      lambda a, b: np.divide(a, b, out=a))
    np.clip(x, -FP8_MAX, FP8_MAX, out=x)
    return x.astype(FP8), scale
