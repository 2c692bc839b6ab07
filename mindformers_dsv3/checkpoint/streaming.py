"""The hot loop of dsv3-convert: HF tensors -> one output tensor's bytes, chunk by chunk.

An output tensor (a whole MindSpore parameter, or one rank's slice of it) is described by `pieces()`
as blocks of HF tensors, derived from the name table (`names.to_ms` gives the row permutation of the
RoPE transforms, `names.ms_shape` the stacking), so this file spells no weight name:

* rows:    the output's rows are the rows [r0, r1) x columns [c0, c1) of one or more HF tensors, one
           after another (copy, [gate; up] fusion), optionally permuted within the block (RoPE);
* experts: per expert, the transpose of its HF blocks stacked along rows ([gate; up] or down);
* whole:   1-D and 0-D tensors (norms, biases): read whole, transformed by `names.to_ms`.

Per chunk the work is: read the bytes into a reused buffer (`read_block_into`), decode into the
writer's next pooled buffer, hand it to the writer thread, which hashes (sha256) and writes it while the
next chunk is decoded. FP8 is decoded by `fp8.dequantize_into` (the loader's decoder: one table lookup
per element, rounded once from the float32 product to the output dtype).
"""
import hashlib
import math
import queue
import threading

import numpy as np

from . import fp8, names
from .errors import CheckpointError

OUT_CHUNK = 2 << 20      # target bytes of one output chunk handed to the writer (cache-friendly)
POOL_BUFFER = 16 << 20   # capacity of a pooled output buffer; a larger chunk gets its own array
TRANSPOSE_ROWS = 128     # rows per step of a blocked transpose
ROWS_CHUNK_BYTES = 32 << 20  # float32 working size of one chunk of Source.rows (ms-to-hf)


def _uint(dtype):
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


# ----------------------------------------------------------------------------- the writer thread
class Writer:
    """Hashes (sha256) buffers in one thread and writes them in another (hashlib and file writes release
    the GIL), at most `depth` waiting at each, so decoding the next chunk overlaps with both and a
    plain copy is not held up by hashing and writing one after the other. `buffer(n)` hands out reused
    output buffers, returned to the pool once written: no page faults on fresh memory per chunk."""

    def __init__(self, fh, depth=3):
        self.fh, self.sha, self.size, self.error = fh, hashlib.sha256(), 0, None
        self.queue, self._to_write = queue.Queue(depth), queue.Queue(depth)
        self._free, self._pool, self._limit = queue.SimpleQueue(), set(), 2 * depth + 3
        self.threads = [threading.Thread(target=self._hash, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for t in self.threads:
            t.start()

    def _hash(self):
        for item in iter(self.queue.get, None):
            try:
                if self.error is None:
                    self.sha.update(item[0])
            except BaseException as exc:  # reported to the producer on its next write or close
                self.error = exc
            self._to_write.put(item)
        self._to_write.put(None)

    def _write(self):
        for data, pooled in iter(self._to_write.get, None):
            try:
                if self.error is None:
                    self.fh.write(data)
            except BaseException as exc:  # reported to the producer on its next write or close
                self.error = exc
            finally:
                if pooled is not None:
                    self._free.put(pooled)

    def buffer(self, nbytes):
        """A uint8 array of `nbytes` to fill and pass to write() (pooled up to POOL_BUFFER bytes)."""
        if nbytes > POOL_BUFFER:
            return np.empty(nbytes, np.uint8)
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if len(self._pool) < self._limit:
                buf = np.empty(POOL_BUFFER, np.uint8)
                self._pool.add(id(buf))
            else:
                buf = self._free.get()
        return buf[:nbytes]

    def write(self, data):
        if self.error is not None:
            raise self.error
        base = getattr(data, "base", None)
        pooled = base if base is not None and id(base) in self._pool else None
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        self.size += len(data)
        self.queue.put((data, pooled))

    def close(self, ok=True):
        if not ok:
            self.error = self.error or RuntimeError("aborted")
        self.queue.put(None)
        for t in self.threads:
            t.join()
        if ok and self.error is not None:
            raise self.error


class _Block:
    """Rows [r0, r1) x columns [c0, c1) of one input tensor, as read: FP8 codes with their lookup
    tables, or values of any float dtype."""

    def __init__(self, src, name, r0, r1, c0, c1, dtype, role):
        ckpt = src.ckpt
        self.r0, self.c0, self.block, self.dtype = r0, c0, src.block, np.dtype(dtype)
        in_dtype = ckpt.dtype(name)
        self.fp8 = in_dtype == fp8.FP8
        buf = src.scratch.get((r1 - r0) * (c1 - c0) * in_dtype.itemsize, role)
        ckpt.read_block_into(name, r0, r1, c0, c1, buf)
        self.data = buf.view(in_dtype).reshape(r1 - r0, c1 - c0)
        if self.fp8:  # the scale rows of these rows (all columns)
            self.scale = ckpt.read_rows(name + names.SCALE_SUFFIX, r0 // src.block[0], -(-r1 // src.block[0]))
        src.tick()

    def decode(self, out, a=0, b=None, j0=0, j1=None):
        """out (unsigned view, C-contiguous) = rows a:b, columns j0:j1 (relative) in out's dtype."""
        b = self.data.shape[0] if b is None else b
        j1 = self.data.shape[1] if j1 is None else j1
        if self.fp8:
            (br, bc), row, col = self.block, self.r0 + a, self.c0 + j0
            first = self.r0 // br
            scale = self.scale[row // br - first:-(-(self.r0 + b) // br) - first, col // bc:-(-(self.c0 + j1) // bc)]
            fp8.dequantize_into(self.data[a:b, j0:j1], scale, out.view(self.dtype), self.block, (row, col))
        else:
            np.copyto(out.view(self.dtype), self.data[a:b, j0:j1], casting="unsafe")  # == astype


class _Scratch:
    """Reused input buffers (one per role), grown as needed."""

    def __init__(self):
        self._bufs = {}

    def get(self, nbytes, role=0):
        buf = self._bufs.get(role)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[role] = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes]


# ----------------------------------------------------------------------------- what an output is made of
def pieces(entry, shapes, config, slices=None):
    """How the value of `entry`'s parameter (or its slice: per MindSpore dim (start, stop) or None) is
    made of HF blocks (name, r0, r1, c0, c1). Returns ("rows", [blocks], perm or None),
    ("experts", [[blocks of one expert], ...], None) or ("whole", [names], None)."""
    t = entry.transform

    def span(dim, size):
        s = slices[dim] if slices is not None and dim < len(slices) else None
        return s if s is not None else (0, size)
    if t in ("experts_gate_up", "experts_down"):
        return "experts", names.expert_blocks(entry, shapes, config, slices), None
    shape = shapes[entry.hf[0]]
    if len(shape) != 2:
        return "whole", list(entry.hf), None
    rows, cols = sum(shapes[n][0] for n in entry.hf), shape[1]
    (a, b), (c0, c1) = span(0, rows), span(1, cols)
    if t == "fuse":  # [gate; up] rows: a rank holds the same rows of each half
        return "rows", [(n, a // 2, b // 2, c0, c1) for n in entry.hf], None
    perm = None
    if t != "copy":  # a row permutation (RoPE): the table's own transform applied to row numbers
        perm = names.to_ms(entry, [np.arange(a, b)[:, None]], config)[:, 0] - a
        if sorted(perm.tolist()) != list(range(b - a)):
            raise CheckpointError(f"transform {t!r} is not a row permutation", tensor=entry.ms)
    return "rows", [(entry.hf[0], a, b, c0, c1)], perm


def _closed_ends(perm):
    """Ends k where perm maps [0, k) onto itself: where a permuted block can be cut."""
    return np.flatnonzero(np.maximum.accumulate(perm) == np.arange(len(perm))) + 1


class Source:
    """The converter's reader of input tensors (both directions), counting bytes read for the progress bar:
    blocks for write_output (`read`), whole tensors (`full`) and row chunks (`rows`) as a given dtype,
    FP8 dequantized with its scale."""

    def __init__(self, ckpt, block, progress=None):
        self.ckpt, self.block, self.progress, self._seen = ckpt, block, progress, ckpt.bytes_read
        self.scratch = _Scratch()

    def tick(self):
        now = self.ckpt.bytes_read
        if self.progress:
            self.progress(now - self._seen)
        self._seen = now

    def read(self, name, r0, r1, c0, c1, dtype, role=0):
        return _Block(self, name, r0, r1, c0, c1, dtype, role)

    def _rows(self, name, start, stop, dtype):
        c = self.ckpt
        if c.dtype(name) != fp8.FP8:
            return c.read_rows(name, start, stop).astype(dtype, copy=False)
        br = self.block[0]
        scale, codes = c.read_rows(name + names.SCALE_SUFFIX, start // br, -(-stop // br)), c.read_rows(name, start, stop)
        return fp8.dequantize_into(codes, scale, np.empty(codes.shape, dtype), self.block, (start, 0))

    def full(self, name, dtype):
        """The whole tensor as `dtype`."""
        shape = self.ckpt.shape(name)
        out = self._rows(name, 0, shape[0], dtype) if shape else self.ckpt.read(name).astype(dtype)
        self.tick()
        return out

    def rows(self, name, dtype, start=0, stop=None):
        """Yields rows start:stop of the tensor as `dtype`, in chunks of about ROWS_CHUNK_BYTES (FP8: whole
        row blocks)."""
        shape = self.ckpt.shape(name)
        stop = shape[0] if stop is None else stop
        if len(shape) < 2:
            yield self.full(name, dtype)[start:stop]
            return
        step = max(1, ROWS_CHUNK_BYTES // max(1, math.prod(shape[1:]) * 4))
        if self.ckpt.dtype(name) == fp8.FP8:
            step = max(self.block[0], step // self.block[0] * self.block[0])
        for r in range(start, stop, step):
            chunk = self._rows(name, r, min(stop, r + step), dtype)
            self.tick()
            yield chunk


def write_output(out, src, entry, shapes, config, dtype, slices=None):
    """Writes the bytes of `entry`'s parameter (or its slice) as `dtype` to the Writer `out`; returns
    the number of bytes written."""
    dtype = np.dtype(dtype)
    kind, parts, perm = pieces(entry, shapes, config, slices)
    if kind == "whole":
        value = names.to_ms(entry, [src.ckpt.read(n) for n in parts], config)
        src.tick()
        if slices is not None:
            value = value[tuple(slice(*s) if s else slice(None) for s in slices)]
        value = np.ascontiguousarray(value.astype(dtype))
        out.write(value)
        return value.nbytes
    if kind == "experts":
        return sum(_write_expert(out, src, blocks, dtype) for blocks in parts)
    return sum(_write_rows(out, src, block, dtype, perm) for block in parts)


def _rows_per_chunk(row_bytes, align):
    rows = max(1, OUT_CHUNK // max(1, row_bytes))
    return max(align, rows // align * align)


def _write_rows(out, src, part, dtype, perm):
    name, r0, r1, c0, c1 = part
    cols, bits = c1 - c0, _uint(dtype)
    fp8_in = src.ckpt.dtype(name) == fp8.FP8
    step = _rows_per_chunk(cols * dtype.itemsize, src.block[0] if fp8_in else 1)
    if perm is None:
        ends, a = [], r0
        while a < r1:  # FP8: chunks end on row-block boundaries (one scale read per block)
            a = min(r1, (a // step + 1) * step) if fp8_in else min(r1, a + step)
            ends.append(a - r0)
    else:
        closed, ends, a = _closed_ends(perm), [], 0
        while a < r1 - r0:
            ok = closed[(closed > a) & (closed <= a + step)]
            a = int(ok[-1] if len(ok) else closed[closed > a][0])
            ends.append(a)
    written, a = 0, 0
    for b in ends:
        n = b - a
        buf = out.buffer(n * cols * dtype.itemsize)
        view = buf.view(bits).reshape(n, cols)
        same = not fp8_in and perm is None and src.ckpt.dtype(name) == dtype
        if same:  # read straight into the output buffer
            src.ckpt.read_block_into(name, r0 + a, r0 + b, c0, c1, buf)
            src.tick()
        else:
            block = src.read(name, r0 + a, r0 + b, c0, c1, dtype)
            if perm is None:
                block.decode(view)
            else:
                tmp = src.scratch.get(n * cols * dtype.itemsize, "perm").view(bits).reshape(n, cols)
                block.decode(tmp)
                np.take(tmp, perm[a:b] - a, axis=0, out=view, mode="clip")
        out.write(buf)
        written += buf.nbytes
        a = b
    return written


def _write_expert(out, src, parts, dtype):
    """One expert: the transpose of its blocks stacked along rows, written in column chunks."""
    bits = _uint(dtype)
    blocks = [src.read(name, r0, r1, c0, c1, dtype, role=i) for i, (name, r0, r1, c0, c1) in enumerate(parts)]
    rows = sum(b.data.shape[0] for b in blocks)
    cols = blocks[0].data.shape[1]
    step = max(TRANSPOSE_ROWS, OUT_CHUNK // max(1, rows * dtype.itemsize) // TRANSPOSE_ROWS * TRANSPOSE_ROWS)
    written = 0
    for j0 in range(0, cols, step):
        w = min(step, cols - j0)
        buf = out.buffer(w * rows * dtype.itemsize)
        view = buf.view(bits).reshape(w, rows)
        p0 = 0
        for b in blocks:
            n = b.data.shape[0]
            tmp = src.scratch.get(n * w * dtype.itemsize, "expert").view(bits).reshape(n, w)
            b.decode(tmp, j0=j0, j1=j0 + w)
            names.transpose_into(tmp, view[:, p0:p0 + n], TRANSPOSE_ROWS)
            p0 += n
        out.write(buf)
        written += buf.nbytes
    return written

