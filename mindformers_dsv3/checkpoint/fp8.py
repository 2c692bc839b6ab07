"""DeepSeek block FP8: float8 e4m3fn weights with one float32 ``weight_scale_inv`` per block.

W[i, j] = float(fp8[i, j]) * scale_inv[i // 128, j // 128]; scale_inv has shape
(ceil(rows / 128), ceil(cols / 128)), and edges need not be multiples of 128 (576 x 7168).
"""
import math

import ml_dtypes
import numpy as np

from .errors import CheckpointError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite e4m3fn; ml_dtypes casts anything beyond it to NaN
DEFAULT_BLOCK = (128, 128)


def _block(block):
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
                    for b in block)):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def scale_inv_shape(shape, block=DEFAULT_BLOCK):
    """The ``weight_scale_inv`` shape that goes with a 2-D weight ``shape``."""
    br, bc = _block(block)
    return (math.ceil(shape[0] / br), math.ceil(shape[1] / bc))


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
                         name=None):
    """Block-FP8 weight -> ``out_dtype`` (computed in float32).

    Peak memory: the float32 result plus 1/128 of it for the expanded scales (plus the
    ``out_dtype`` copy when it is not float32).
    """
    br, bc = _block(block)
    w = np.asarray(weight_fp8)
    s = np.asarray(scale_inv)
    if w.dtype != FP8:
        raise CheckpointError(f"weight dtype is {w.dtype}, expected float8_e4m3fn", tensor=name)
    if w.ndim != 2:
        raise CheckpointError(f"weight must be 2-D, got shape {w.shape}", tensor=name)
    want = scale_inv_shape(w.shape, (br, bc))
    if s.shape != want:
        raise CheckpointError(f"weight_scale_inv shape {s.shape} does not match weight shape "
                              f"{w.shape}: expected {want} for {br}x{bc} blocks", tensor=name)
    if not np.issubdtype(s.dtype, np.floating) and s.dtype != np.dtype(ml_dtypes.bfloat16):
        raise CheckpointError(f"weight_scale_inv dtype is {s.dtype}, expected float32",
                              tensor=name)
    out = w.astype(np.float32)
    if out.size:
        col_scale = _column_scales(s.astype(np.float32), w.shape[1], bc)
        _apply_row_blocks(out, col_scale, br, lambda a, b: np.multiply(a, b, out=a))
    return out if np.dtype(out_dtype) == np.float32 else out.astype(out_dtype)


def quantize_block_fp8(w, block=DEFAULT_BLOCK):
    """2-D float weight -> (float8_e4m3fn weight, float32 scale_inv), DeepSeek's layout.

    scale_inv = block amax / 448 (1 for all-zero blocks); q = clip(w / scale_inv, +-448)
    cast with round-to-nearest-even. Non-finite inputs are refused.
    """
    br, bc = _block(block)
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


_SUPPORTED_METHODS = ("fp8",)
_SUPPORTED_FMTS = ("e4m3",)


def is_fp8_config(quantization_config):
    """True for DeepSeek's block-FP8 ``quantization_config``, False for none at all.

    Any other method, format or activation scheme raises ValueError naming the key.
    """
    qc = quantization_config
    if not qc:
        return False
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a mapping, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method not in _SUPPORTED_METHODS:
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported "
                         f"(supported: {', '.join(_SUPPORTED_METHODS)})")
    fmt = qc.get("fmt", "e4m3")
    if fmt not in _SUPPORTED_FMTS:
        raise ValueError(f"quantization_config.fmt={fmt!r} is not supported "
                         f"(supported: {', '.join(_SUPPORTED_FMTS)})")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme={scheme!r} is not supported "
                         "(only 'dynamic': static schemes carry input scales we do not map)")
    return True


def block_size_of(quantization_config):
    """``weight_block_size`` of an FP8 ``quantization_config`` as a (rows, cols) tuple."""
    if not is_fp8_config(quantization_config):
        raise ValueError("quantization_config is empty: the checkpoint is not FP8")
    size = quantization_config.get("weight_block_size")
    if size is None:
        raise ValueError("quantization_config.weight_block_size is missing: per-tensor FP8 "
                         "is not supported, only block FP8")
    try:
        return _block(tuple(size) if isinstance(size, list) else size)
    except ValueError:
        raise ValueError(f"quantization_config.weight_block_size={size!r} must be two "
                         "positive ints") from None
