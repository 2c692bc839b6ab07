"""DeepSeek block FP8: float8 e4m3fn weights with one float32 ``weight_scale_inv`` per block.

W[i, j] = float(fp8[i, j]) * scale_inv[i // 128, j // 128]; scale_inv has shape
(ceil(rows / 128), ceil(cols / 128)), and edges need not be multiples of 128 (576 x 7168).

Large tensors can be decoded by several threads over disjoint row ranges (`threads`; the loader passes
`load_threads()`): numpy's add and take release the GIL, and each element is computed exactly as by one
thread, so the result is bit-identical whatever the thread count.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from .errors import CheckpointError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
DEFAULT_BLOCK = (128, 128)


def check_block(block):
    """`block` as a (rows, cols) tuple of positive ints; ValueError otherwise."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0
                    for b in block)):
        raise ValueError(f"block must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def scale_inv_shape(shape, block=DEFAULT_BLOCK):
    """The ``weight_scale_inv`` shape that goes with a 2-D weight ``shape``."""
    br, bc = check_block(block)
    return (math.ceil(shape[0] / br), math.ceil(shape[1] / bc))


_CODE_VALUES = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)  # e4m3 code -> value
_LOOKUP_ELEMS = 1 << 17  # elements per table lookup: the index and output rows stay in the L2 cache


def check_scale(weight_shape, scale_shape, scale_dtype, block, file=None, tensor=None):
    """CheckpointError naming `file` and `tensor` unless (shape, dtype) fit a block-FP8 weight of
    `weight_shape` with `block` blocks: a float scale of shape (ceil(rows / br), ceil(cols / bc))."""
    br, bc = check_block(block)
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


THREADS_ENV = "DSV3_LOAD_THREADS"  # threads the loader decodes with; default: the CPUs this process may use
MIN_SPLIT_ELEMS = 1 << 20  # a smaller tensor (or part) is decoded by one thread: splitting costs more


def load_threads():
    """Threads to decode and transpose with: $DSV3_LOAD_THREADS when set, else the CPUs this process may
    run on (os.sched_getaffinity). ValueError naming the variable unless it is a positive int."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        return max(1, len(cpus))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r} must be a positive integer (threads to load with)")
    return int(raw)


_POOLS = {}  # workers -> ThreadPoolExecutor, shared by every caller of run_parts in this process
_POOLS_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the parent's threads


def split_rows(rows, parts, align=1, origin=0):
    """Up to `parts` (start, stop) ranges covering range(rows), of about equal size, each inner boundary
    at a multiple of `align` in the whole tensor's grid (`origin`: the index of row 0 there)."""
    parts = max(1, min(parts, rows))
    bounds = [0]
    for k in range(1, parts):
        cut = (origin + rows * k // parts + align // 2) // align * align - origin  # the nearest grid line
        if bounds[-1] < cut < rows:
            bounds.append(cut)
    bounds.append(rows)
    return list(zip(bounds[:-1], bounds[1:]))


def run_parts(fn, ranges):
    """fn(start, stop) for each range: the first on the calling thread, the others on a shared pool of
    threads (numpy releases the GIL in its copies, add and take); returns when all are done, raising the
    first error after that."""
    if len(ranges) < 2:
        for a, b in ranges:
            fn(a, b)
        return
    with _POOLS_LOCK:
        pool = _POOLS.get(len(ranges) - 1)
        if pool is None:
            pool = _POOLS[len(ranges) - 1] = ThreadPoolExecutor(len(ranges) - 1, thread_name_prefix="dsv3-decode")
    futures = [pool.submit(fn, a, b) for a, b in ranges[1:]]
    error = None
    try:
        fn(*ranges[0])
    except BaseException as exc:  # noqa: BLE001  (re-raised once the other parts stopped writing)
        error = exc
    for future in futures:
        exc = future.exception()
        error = error or exc
    if error is not None:
        raise error


def dequantize_into(codes, scale, out, block=DEFAULT_BLOCK, origin=(0, 0), threads=1):
    """out[...] = block-FP8 `codes` (2-D) times their block scales, rounded once from float32 to out's
    dtype: one table lookup per element (per block, the 256 code values times the block's scale, already
    rounded), no float32 intermediate of the tensor. The one FP8 decoder of the loader, hooks and converter.

    `origin`: (row, column) of codes[0, 0] in the whole tensor (a chunk or a column range of it); `scale`
    holds the block scales from block (origin[0] // br, origin[1] // bc) on, covering codes (a tensor
    from its corner: scale_inv_shape(codes.shape, block)). `codes` may be any 2-D view; `out` is a float
    array of codes' shape (float32, float16, bfloat16) with contiguous rows (a column range of a wider
    array will do). `threads`: up to that many threads decode disjoint row ranges (whole row blocks) of a
    tensor of at least MIN_SPLIT_ELEMS elements; bit-identical to one thread. Returns `out`."""
    br, bc = check_block(block)
    rows, cols = codes.shape
    if out.shape != codes.shape or (rows and cols > 1 and out.strides[1] != out.itemsize):
        raise ValueError(f"out must have contiguous rows and shape {codes.shape}, got {out.shape}")
    if not rows or not cols:
        return out
    r0, c0 = origin
    parts = split_rows(rows, min(threads, rows * cols // MIN_SPLIT_ELEMS), br, r0) if threads > 1 else [(0, rows)]

    def part(a, b):  # rows a:b, with the scale rows of their blocks only
        s0, s1 = (r0 + a) // br - r0 // br, (r0 + b - 1) // br - r0 // br + 1
        _dequantize_rows(codes[a:b], scale[s0:s1], out[a:b], (br, bc), (r0 + a, c0))
    run_parts(part, parts)
    return out


def _dequantize_rows(codes, scale, out, block, origin):
    """dequantize_into on one thread (arguments checked there)."""
    (br, bc), (rows, cols), (r0, c0) = block, codes.shape, origin
    tables = _lookup_tables(scale, out.dtype)
    index = np.uint16 if tables.shape[1] <= 1 << 16 else np.uint32
    offsets = ((np.arange(c0, c0 + cols) // bc - c0 // bc) * 256).astype(index)
    bits, u8 = out.view(tables.dtype), codes.view(np.uint8)
    step = max(1, min(br, _LOOKUP_ELEMS // cols))
    idx = np.empty((min(step, rows), cols), index)
    r = 0
    while r < rows:
        block_end = min(rows, ((r0 + r) // br + 1) * br - r0)  # rows up to here share one table
        table = tables[(r0 + r) // br - r0 // br]
        while r < block_end:
            n = min(step, block_end - r)
            np.add(u8[r:r + n], offsets, out=idx[:n], dtype=index)
            np.take(table, idx[:n], out=bits[r:r + n], mode="clip")  # "clip": out is written directly
            r += n


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
        return check_block(tuple(size) if isinstance(size, list) else size)
    except ValueError:
        raise ValueError(f"quantization_config.weight_block_size={size!r} must be two "
                         "positive ints") from None
