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


_CODE_VALUES = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)  # e4m3 code -> value
_LOOKUP_ELEMS = 1 << 17  # elements per table lookup: the index and output rows stay in the L2 cache


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


def check_scale(weight_shape, scale_shape, scale_dtype, block, file=None, tensor=None):
    """CheckpointError naming `file` and `tensor` unless (shape, dtype) fit a block-FP8 weight of
    `weight_shape` with `block` blocks: a float scale of shape (ceil(rows / br), ceil(cols / bc))."""
    br, bc = _block(block)
    if len(weight_shape) != 2:
        raise CheckpointError(f"an FP8 weight must be 2-D, got shape {tuple(weight_shape)}", file, tensor)
    want = scale_inv_shape(weight_shape, (br, bc))
    if tuple(scale_shape) != want:
        raise CheckpointError(f"weight_scale_inv shape {tuple(scale_shape)} does not match weight shape "
                              f"{tuple(weight_shape)}: expected {want} for {br}x{bc} blocks "
                              "(quantization_config.weight_block_size)", file, tensor)
    if np.dtype(scale_dtype) not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        raise CheckpointError(f"weight_scale_inv dtype is {np.dtype(scale_dtype)}, expected float32", file, tensor)


def check_scale_values(scale, file=None, tensor=None):
    """CheckpointError unless every block scale is finite (a NaN or infinite scale poisons a block)."""
    s = np.asarray(scale, np.float32)
    if not np.isfinite(s).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(s))[0])
        raise CheckpointError(f"weight_scale_inv holds NaN or infinity (first at block {bad})", file, tensor)


def _lookup_tables(scale, dtype):
    """Per row block, the values of the 256 codes times each column block's scale, rounded once to
    `dtype`, as unsigned bits: (R, C * 256); entry [r, 256 c + k] = dtype(scale[r, c] * e4m3(k))."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as astype gives
        table = (np.asarray(scale, np.float32)[:, :, None] * _CODE_VALUES).astype(dtype)
    return table.view(f"u{dtype.itemsize}").reshape(table.shape[0], -1)


def dequantize_into(codes, scale, out, block=DEFAULT_BLOCK):
    """out[...] = block-FP8 `codes` (2-D, starting on a block corner) times their block scales, rounded once
    from float32 to out's dtype: one table lookup per element, no float32 intermediate of the tensor.

    `scale` has scale_inv_shape(codes.shape, block); `out` is a float array of codes' shape (any float
    dtype: float32, float16, bfloat16) whose rows are contiguous (a column range of a wider array will do).
    Returns `out`."""
    br, bc = _block(block)
    rows, cols = codes.shape
    if out.shape != codes.shape or (cols > 1 and out.strides[1] != out.itemsize):
        raise ValueError(f"out must have contiguous rows and shape {codes.shape}, got {out.shape}")
    codes = np.ascontiguousarray(codes)
    if not rows or not cols:
        return out
    tables = _lookup_tables(scale, out.dtype)
    index = np.uint16 if tables.shape[1] <= 1 << 16 else np.uint32
    offsets = ((np.arange(cols) // bc) * 256).astype(index)
    bits = out.view(tables.dtype)
    u8 = codes.view(np.uint8)
    step = max(1, min(br, _LOOKUP_ELEMS // cols))
    idx = np.empty((step, cols), index)
    for r0 in range(0, rows, br):
        table = tables[r0 // br]
        for r in range(r0, min(rows, r0 + br), step):
            n = min(step, rows - r, r0 + br - r)
            np.add(u8[r:r + n], offsets, out=idx[:n], dtype=index)
            np.take(table, idx[:n], out=bits[r:r + n], mode="clip")  # "clip": out is written directly
    return out


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
