"""Reading the parameters of a HuggingFace DeepSeek-V3 folder, fast and without extra copies.

Each parameter's value is built directly in the parameter's dtype: FP8 dequantized block by block
through lookup tables (fp8.dequantize_into) into a bfloat16 / float32 buffer, routed experts written
transposed into their stacked buffer (FP8: the one-byte codes are transposed, then dequantized in
place), fused [gate; up] written half by half. For a whole model, a thread works ahead of the
conversion: it reads the next tensors and maps the next output buffers with their pages already in
(`alloc`, without holding the GIL), and the kernel is asked to read each file ahead. A large tensor is
decoded and transposed by `threads` threads (fp8.load_threads(): $DSV3_LOAD_THREADS or the CPUs this
process may run on) over disjoint row ranges; the values do not depend on the thread count. Used by
loader.load_hf_checkpoint, which checks every header first.
"""
import ctypes
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mindformers_dsv3.checkpoint import fp8, names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import DEFAULT_BLOCK, FP8
from mindformers_dsv3.checkpoint.names import transpose_into

AHEAD_JOBS = 3  # reads / buffers the thread prepares ahead of the conversion
POPULATE_BYTES = 16 << 20  # buffers from this size are mapped with their pages already in
READ_CHUNK = 4 << 20  # bytes per read of the read-ahead thread
ADVISE_FILES = 2  # files the kernel is asked to read ahead: the one being read and the next


def _libc_madvise():
    """libc's madvise through ctypes (which releases the GIL during the call), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _libc_madvise()
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault the range in, writable, in one call


def alloc(shape, dtype):
    """An uninitialised array; a large one is an anonymous mapping whose pages the kernel fills in one call
    (madvise MADV_POPULATE_WRITE, through ctypes so other threads run meanwhile; Python's MAP_POPULATE
    holds the GIL): on the VMs measured, faulting fresh pages one by one ran at 0.3-0.8 GB/s, populating
    at about 2 GB/s. Without that call (older kernels) the pages fault in as written. The array keeps its
    mapping alive (a parameter built on it, too)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < POPULATE_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(shape, dtype)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(mapping, dtype).reshape(shape)
    if _MADVISE is not None:
        _MADVISE(array.ctypes.data, nbytes, MADV_POPULATE_WRITE)  # a hint: on failure pages fault as written
    return array


def _advise_willneed(path):
    """Ask the kernel to read the file into the page cache in the background (a hint; errors ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def out_shape(entry, ckpt, quantized):
    """Shape of the buffer `entry`'s whole value is written into, or None when it is the read array itself
    (a tensor stored in the parameter's dtype) or comes from a transform's own copy."""
    shapes = [tuple(ckpt.shape(n)) for n in entry.hf]
    t = entry.transform
    if t.startswith("experts"):
        per = 2 if t == "experts_gate_up" else 1  # [gate, up] or [down] per expert, transposed and stacked
        return (len(shapes) // per, shapes[0][1], sum(s[0] for s in shapes[:per]))
    if t == "fuse":
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    return shapes[0] if entry.hf[0] in quantized else None


class Reader:
    """Reads HF tensors (whole, into a buffer, transposed, or a slice) in a given dtype, FP8 dequantized with
    the scales read (and value-checked) up front. `whole`: [(entry, dtype)] of the parameters that will be
    built whole, in that order (`reads`: plain tensor names, after them): a thread then reads their tensors
    and maps their buffers ahead. `threads`: threads that decode / transpose a large tensor (default
    fp8.load_threads())."""

    def __init__(self, ckpt, block, quantized, whole=(), advise=False, reads=(), threads=None):
        self.ckpt, self.block, self.scales, self.advise, self._advised = ckpt, block, {}, advise, set()
        self.threads = fp8.load_threads() if threads is None else threads
        for name in quantized:
            sname = name + names.SCALE_SUFFIX
            scale = ckpt.read(sname).astype(np.float32, copy=False)
            fp8.check_scale_values(scale, ckpt.file_of(sname), sname)
            self.scales[name] = scale
        self._jobs = []  # (key, function, args) in the order the conversion asks for them
        for entry, dtype in whole:
            shape = out_shape(entry, ckpt, self.scales)
            if shape is not None:
                self._jobs.append((("out", entry.ms), alloc, (shape, dtype)))
            self._jobs.extend((n, self._read, (n,)) for n in entry.hf)
        self._jobs.extend((n, self._read, (n,)) for n in reads)  # plain tensors (per-rank folders)
        self._next, self._pending, self._codes = 0, {}, None
        self._files = list(dict.fromkeys(ckpt.file_of(key) for key, fn, _ in self._jobs if fn == self._read))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dsv3-read") if self._jobs else None
        self._fill()

    def _fill(self):
        while self._next < len(self._jobs) and len(self._pending) < AHEAD_JOBS:
            key, fn, args = self._jobs[self._next]
            self._next += 1
            self._pending[key] = self._pool.submit(fn, *args)

    def _take(self, key, fn, *args):
        future = self._pending.pop(key, None)
        if future is None:
            return fn(*args)
        value = future.result()
        self._fill()
        return value

    def close(self):
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()

    def _read(self, name):
        """The tensor's bytes as stored, in a fresh (populated) array, read in chunks of READ_CHUNK bytes
        (on the disks measured, faster than one read of the whole tensor); the first read of a file asks
        the kernel to read it and the next file ahead (POSIX_FADV_WILLNEED) when the whole model is loaded."""
        if self.advise:  # this file and the next one the jobs read: the disk stays busy while we convert
            path = self.ckpt.file_of(name)
            i = self._files.index(path) if path in self._files else None
            for ahead in [path] if i is None else self._files[i:i + ADVISE_FILES]:
                if ahead not in self._advised:
                    self._advised.add(ahead)
                    _advise_willneed(ahead)
        shape = self.ckpt.shape(name)
        if len(shape) != 2:
            return self.ckpt.read(name)
        out = alloc(shape, self.ckpt.dtype(name))
        step = max(1, READ_CHUNK // max(1, out[:1].nbytes))
        for r in range(0, shape[0], step):
            part = out[r:r + step]
            self.ckpt.read_block_into(name, r, r + part.shape[0], 0, shape[1], part.reshape(-1).view(np.uint8))
        return out

    def out(self, entry, shape, dtype):
        """The buffer `entry`'s whole value is written into (mapped ahead when scheduled)."""
        return self._take(("out", entry.ms), alloc, shape, dtype)

    def tensor(self, name, dtype, out=None):
        """The whole tensor as a C-contiguous `dtype` array (`out`, or a fresh one)."""
        raw = self._take(name, self._read, name)
        if name in self.scales:
            out = alloc(raw.shape, dtype) if out is None else out
            return fp8.dequantize_into(raw, self.scales[name], out, self.block, threads=self.threads)
        return raw if raw.dtype == dtype else raw.astype(dtype)

    def into(self, name, out):
        """The whole tensor written into `out` (its shape, contiguous rows)."""
        raw = self._take(name, self._read, name)
        if name in self.scales:
            fp8.dequantize_into(raw, self.scales[name], out, self.block, threads=self.threads)
        else:
            np.copyto(out, raw, casting="unsafe")
        return out

    def transposed_into(self, name, out):
        """The whole 2-D tensor, transposed, written into `out` (contiguous rows). FP8: the one-byte codes
        are transposed, then dequantized straight into `out` (half the bytes a bf16 transpose moves). A large
        tensor: each thread transposes (and decodes) its own range of out's rows (whole scale blocks)."""
        raw = self._take(name, self._read, name)
        rows = out.shape[0]
        parts = fp8.split_rows(rows, min(self.threads, raw.size // fp8.MIN_SPLIT_ELEMS), self.block[1])
        if name not in self.scales:
            src = raw if raw.dtype == out.dtype else raw.astype(out.dtype)
            fp8.run_parts(lambda a, b: transpose_into(src[:, a:b], out[a:b]), parts)
            return out
        if self._codes is None or self._codes.size < raw.size:
            self._codes = np.empty(raw.size, np.uint8)  # reused: one expert matrix's codes, transposed
        codes = self._codes[:raw.size].reshape(raw.shape[::-1])
        scale, block = np.ascontiguousarray(self.scales[name].T), self.block[::-1]
        src = raw.view(np.uint8)

        def part(a, b):  # out rows a:b = source columns a:b; their scale rows from block a // block[0] on
            transpose_into(src[:, a:b], codes[a:b])
            fp8.dequantize_into(codes[a:b].view(FP8), scale[a // block[0]:], out[a:b], block, (a, 0))
        fp8.run_parts(part, parts)
        return out

    def slice(self, name, axis, start, stop, dtype):
        """tensor[start:stop] along `axis` as `dtype`; FP8 read in whole blocks around the slice, then cut."""
        return read_hf_slice(self.ckpt, name, axis, start, stop, dtype, self.block, self.scales.get(name))


def read_hf_slice(ckpt, name, axis, start, stop, dtype=np.float32, block=DEFAULT_BLOCK, scale=None):
    """tensor[start:stop] along `axis` of one HF tensor as `dtype`, FP8 dequantized (`scale`: its whole
    `<name>_scale_inv` when already read). FP8: the slice is widened to whole scale blocks, then cut."""
    dtype = np.dtype(dtype)
    if ckpt.dtype(name) != FP8:
        return np.ascontiguousarray(ckpt.read_slice(name, axis, start, stop).astype(dtype, copy=False))
    sname = name + names.SCALE_SUFFIX
    if sname not in ckpt:
        raise CheckpointError(f"FP8 tensor without its scale {sname!r}", ckpt.file_of(name), name)
    shape, b = ckpt.shape(name), block[axis]
    lo, hi = (start // b) * b, min(-(-stop // b) * b, shape[axis])
    if scale is None:
        fp8.check_scale(shape, ckpt.shape(sname), ckpt.dtype(sname), block, ckpt.file_of(sname), sname)
        scale = ckpt.read_slice(sname, axis, lo // b, -(-hi // b)).astype(np.float32, copy=False)
        fp8.check_scale_values(scale, ckpt.file_of(sname), sname)
    else:
        scale = scale[lo // b:-(-hi // b)] if axis == 0 else scale[:, lo // b:-(-hi // b)]
    codes = np.ascontiguousarray(ckpt.read_slice(name, axis, lo, hi))
    full = fp8.dequantize_into(codes, scale, np.empty(codes.shape, dtype), block)
    if (lo, hi) == (start, stop):
        return full
    cut = [slice(None)] * full.ndim
    cut[axis] = slice(start - lo, stop - lo)
    return np.ascontiguousarray(full[tuple(cut)])


def _read_block(reader, name, r0, r1, c0, c1, dtype):
    """tensor[r0:r1, c0:c1] of a 2-D HF tensor as `dtype` (FP8 read in whole scale blocks around it)."""
    rows, cols = reader.ckpt.shape(name)
    if (c0, c1) == (0, cols):
        return reader.slice(name, 0, r0, r1, dtype)
    if (r0, r1) == (0, rows):
        return reader.slice(name, 1, c0, c1, dtype)
    return np.ascontiguousarray(reader.slice(name, 0, r0, r1, dtype)[:, c0:c1])


def _experts(reader, entry, config, dtype, slices=None):
    """Stacked routed experts (E_local, H, 2I) / (E_local, I, H) from per-expert HF tensors, written expert
    by expert into one buffer; which experts and which part of each: names.expert_blocks of `slices`."""
    shapes = {n: tuple(reader.ckpt.shape(n)) for n in entry.hf}
    experts = names.expert_blocks(entry, shapes, config, slices)
    first = experts[0]
    out = reader.out(entry, (len(experts), first[0][4] - first[0][3], sum(b[2] - b[1] for b in first)), dtype)
    for k, blocks in enumerate(experts):
        col = 0
        for name, r0, r1, c0, c1 in blocks:
            if (r0, r1, c0, c1) == (0,) + shapes[name][:1] + (0,) + shapes[name][1:]:  # whole: transposed in place
                reader.transposed_into(name, out[k][:, col:col + r1 - r0])
            else:
                transpose_into(_read_block(reader, name, r0, r1, c0, c1, dtype), out[k][:, col:col + r1 - r0])
            col += r1 - r0
    return out


def read_entry(reader, entry, config, dtype):
    """The value of `entry`'s whole parameter, built in `dtype`."""
    t = entry.transform
    if t.startswith("experts"):
        return _experts(reader, entry, config, dtype)
    shape = out_shape(entry, reader.ckpt, reader.scales)
    if t == "fuse":
        out, row = reader.out(entry, shape, dtype), 0
        for n in entry.hf:
            rows = reader.ckpt.shape(n)[0]
            reader.into(n, out[row:row + rows])
            row += rows
        return out
    value = reader.tensor(entry.hf[0], dtype, None if shape is None else reader.out(entry, shape, dtype))
    return value if t == "copy" else names.to_ms(entry, [value], config)


def read_entry_slice(reader, entry, slices, config, dtype):
    """The local value of `entry`'s parameter; slices: per MindSpore dim (start, stop), or None (whole)."""
    t = entry.transform
    if t.startswith("experts"):
        return _experts(reader, entry, config, dtype, slices)
    dims = [d for d, s in enumerate(slices) if s is not None]
    if len(dims) != 1 or t not in ("copy", "rope_heads", "fuse"):
        raise CheckpointError(f"no slice rule for transform {t!r} split on dims {dims}", reader.ckpt.path,
                              entry.hf[0])
    d = dims[0]
    a, b = slices[d]
    if t == "fuse":  # [gate; up] rows: the same rows of each half
        return np.concatenate([reader.slice(n, d, a // 2, b // 2, dtype) for n in entry.hf], axis=d)
    # copy; rope_heads on whole heads (the per-head permutation applies to the slice)
    return names.to_ms(entry, [reader.slice(entry.hf[0], d, a, b, dtype)], config)
