"""Careful, streaming safetensors reading and atomic writing: no torch, no mmap, no pickle.

A file's header is parsed and validated in full when it is opened; tensor bytes are read
only on request, each read filling a fresh array with exactly the bytes asked for
(``os.preadv``), so a 4 GiB shard costs nothing until one tensor of it is read.
``bytes_read`` counts tensor bytes read from disk (header bytes are not counted).
"""
import difflib
import json
import math
import os
import threading
import warnings
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .errors import CheckpointError, listing
from .fsguard import atomic_write, input_roots, open_regular, read_json

MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# read_slice on an inner axis reads each outer row's run by itself when the run is at least
# this long; shorter runs are gathered by reading spans of whole rows, at most CHUNK_BYTES each.
MIN_RUN_BYTES = 4096
CHUNK_BYTES = 16 * 1024 * 1024

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}  # numpy dtype -> safetensors dtype name


class TensorInfo(NamedTuple):
    dtype: np.dtype
    shape: tuple
    begin: int  # offsets relative to the start of the data section
    end: int


def _pickle_refusal(path):
    return CheckpointError(
        "pickle-based checkpoint refused: we never unpickle (PyTorch .bin/.pt/.pth and "
        "Lightning .ckpt are pickles; a MindSpore .ckpt is not safetensors either); "
        "convert to safetensors", path)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_header(raw, path, data_size):
    """Validates a JSON header; returns ({name: TensorInfo}, metadata)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"header is not valid JSON: {exc}", path) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"header is a JSON {type(header).__name__}, not an object", path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError("__metadata__ must be an object of strings", path)
    infos = {}
    for name, entry in header.items():
        def fail(msg, name=name):
            return CheckpointError(msg, path, name)
        if not isinstance(entry, dict):
            raise fail("header entry is not an object")
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise fail(f"unknown or unsupported dtype {entry.get('dtype')!r} "
                       f"(supported: {', '.join(DTYPES)})")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"shape must be a list of non-negative ints, got {shape!r}")
        offs = entry.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise fail(f"data_offsets must be two ints, got {offs!r}")
        begin, end = offs
        if begin < 0 or begin > end:
            raise fail(f"data_offsets [{begin}, {end}] are not an ordered range")
        if end > data_size:
            raise fail(f"file is truncated: the tensor ends at byte {end} of the data section "
                       f"but the data section holds only {data_size} bytes (file has "
                       f"{8 + len(raw) + data_size} bytes, needs {8 + len(raw) + end})")
        want = math.prod(shape) * dtype.itemsize
        if end - begin != want:
            raise fail(f"byte size {end - begin} does not match shape {shape} x "
                       f"{entry['dtype']} ({want} bytes)")
        infos[name] = TensorInfo(dtype, tuple(shape), begin, end)
    spans = sorted((i.begin, i.end, n) for n, i in infos.items() if i.end > i.begin)
    prev = None
    for begin, end, name in spans:
        if prev is not None and begin < prev[1]:
            raise CheckpointError(f"data range [{begin}, {end}) overlaps tensor {prev[2]!r} "
                                  f"[{prev[0]}, {prev[1]})", path, name)
        if prev is None or end > prev[1]:
            prev = (begin, end, name)
    return infos, dict(meta)


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsFile(_Closing):
    """One .safetensors file: validated header, tensors read on demand. Only a regular file is opened
    (a FIFO or a folder is refused at once); with `roots`, only one that resolves inside them."""

    def __init__(self, path, roots=None):
        self.path = os.fspath(path)
        if self.path.lower().endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal(self.path)
        self._fd = open_regular(self.path, roots)
        self._lock = threading.Lock()
        self.bytes_read = 0
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise CheckpointError(f"file is {size} bytes, too short for a safetensors "
                                  "header (8-byte length prefix)", self.path)
        head = np.empty(8, np.uint8)
        self._read_into(head, 0, None)
        head = head.tobytes()
        n, problem = int.from_bytes(head, "little"), None
        if n > MAX_HEADER_BYTES:
            problem = f"header length {n} is absurd (limit {MAX_HEADER_BYTES})"
        elif n > size - 8:
            problem = f"header length {n} is larger than the file ({size} bytes)"
        if problem:
            # a zip (torch.save) or a bare pickle starts so; only judged once the header is
            # invalid anyway, since a valid header length can start with the same bytes
            if head.startswith(b"PK\x03\x04") or (head[0] == 0x80 and 2 <= head[1] <= 5):
                raise _pickle_refusal(self.path)
            raise CheckpointError(problem + ": truncated or not safetensors", self.path)
        self._data_start = 8 + n
        raw = np.empty(n, np.uint8)
        self._read_into(raw, 8, None)
        self.bytes_read = 0
        self._infos, self._meta = _parse_header(raw.tobytes(), self.path, size - 8 - n)

    def _read_into(self, buf, offset, name):
        if self._fd is None:
            raise CheckpointError("file is closed", self.path, name)
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(self._fd, [view[done:]], offset + done)
                else:
                    with self._lock:
                        os.lseek(self._fd, offset + done, os.SEEK_SET)
                        got = os.readv(self._fd, [view[done:]])
            except OSError as exc:
                raise CheckpointError(f"cannot read: {exc.strerror}", self.path, name) from None
            if got <= 0:
                raise CheckpointError(f"file shrank while reading: wanted {len(view)} bytes "
                                      f"at offset {offset}, got {done}", self.path, name)
            done += got
        self.bytes_read += done

    def info(self, name) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._infos), n=3)
            raise CheckpointError("no such tensor" + (f"; closest: {close}" if close else ""),
                                  self.path, name) from None

    def keys(self):
        return sorted(self._infos)

    def __contains__(self, name):
        return name in self._infos

    def shape(self, name):
        return self.info(name).shape

    def dtype(self, name):
        return self.info(name).dtype

    def nbytes(self, name):
        info = self.info(name)
        return info.end - info.begin

    def metadata(self):
        return dict(self._meta)

    def read(self, name) -> np.ndarray:
        """The whole tensor, in a fresh array, reading exactly its bytes."""
        info = self.info(name)
        out = np.empty(info.end - info.begin, np.uint8)
        self._read_into(out, self._data_start + info.begin, name)
        return out.view(info.dtype).reshape(info.shape)

    def read_rows(self, name, start, stop) -> np.ndarray:
        return self.read_slice(name, 0, start, stop)

    def read_block_into(self, name, r0, r1, c0, c1, out):
        """tensor[r0:r1, c0:c1] of a 2-D tensor into the uint8 buffer `out` (exactly its size), with no
        fresh allocation: one read for whole rows; otherwise one read per row when a row's run is at
        least MIN_RUN_BYTES, else whole rows through a temporary buffer."""
        info = self.info(name)
        if len(info.shape) != 2:
            raise CheckpointError(f"read_block_into needs a 2-D tensor, got shape {info.shape}", self.path, name)
        rows, cols = info.shape
        if not (0 <= r0 <= r1 <= rows and 0 <= c0 <= c1 <= cols):
            raise CheckpointError(f"block [{r0}:{r1}, {c0}:{c1}] out of range for shape {info.shape}",
                                  self.path, name)
        size, row = info.dtype.itemsize, cols * info.dtype.itemsize
        run = (c1 - c0) * size
        if out.nbytes != (r1 - r0) * run:
            raise CheckpointError(f"buffer of {out.nbytes} bytes for a block of {(r1 - r0) * run}", self.path, name)
        base = self._data_start + info.begin + r0 * row
        if out.nbytes == 0:
            return out
        if run == row:
            self._read_into(out, base, name)
        elif run >= MIN_RUN_BYTES:
            view = out.reshape(r1 - r0, run)
            for r in range(r1 - r0):
                self._read_into(view[r], base + r * row + c0 * size, name)
        else:
            full = np.empty((r1 - r0) * row, np.uint8)
            self._read_into(full, base, name)
            out.reshape(r1 - r0, run)[:] = full.reshape(r1 - r0, row)[:, c0 * size:c1 * size]
        return out

    def read_slice(self, name, axis, start, stop) -> np.ndarray:
        """tensor[..., start:stop, ...] along ``axis``, reading as little as practical.

        Axis 0 (or any axis with only size-1 axes before it, or a slice spanning whole rows)
        is one contiguous read of exactly the slice. Otherwise every outer row holds one
        run of the slice: runs of at least MIN_RUN_BYTES are read one by one (exactly the
        slice's bytes); shorter runs are gathered from spans of whole rows of at most
        CHUNK_BYTES (the bytes between runs are read too). ``bytes_read`` tells.
        """
        info = self.info(name)
        shape, ndim = info.shape, len(info.shape)
        if not _is_int(axis) or not -ndim <= axis < ndim:
            raise CheckpointError(f"axis {axis!r} out of range for shape {shape}",
                                  self.path, name)
        axis %= ndim
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= shape[axis]):
            raise CheckpointError(f"slice [{start}, {stop}) out of range for axis {axis} "
                                  f"of shape {shape}", self.path, name)
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1:]) * info.dtype.itemsize
        run, row = (stop - start) * inner, shape[axis] * inner
        base = self._data_start + info.begin + start * inner
        out = np.empty(outer * run, np.uint8)
        if out.size == 0:
            pass
        elif outer == 1 or run == row:
            self._read_into(out, base, name)
        elif run >= MIN_RUN_BYTES or row > CHUNK_BYTES:
            for o in range(outer):
                self._read_into(out[o * run:(o + 1) * run], base + o * row, name)
        else:
            per = max(1, CHUNK_BYTES // row)
            for o0 in range(0, outer, per):
                k = min(per, outer - o0)
                buf = np.empty((k - 1) * row + run, np.uint8)
                self._read_into(buf, base + o0 * row, name)
                rows = np.lib.stride_tricks.as_strided(buf, (k, run), (row, 1))
                out[o0 * run:(o0 + k) * run].reshape(k, run)[:] = rows
        return out.view(info.dtype).reshape(shape[:axis] + (stop - start,) + shape[axis + 1:])

    def close(self):
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __repr__(self):
        return f"SafetensorsFile({self.path!r}, {len(self._infos)} tensors)"


class CheckpointFolder(_Closing):
    """Tensors of one checkpoint (folder with or without an index, or one file) by name."""

    def __init__(self, path, files, weight_map, index_metadata=None):
        self.path = os.fspath(path)
        self.files = files  # shard file name -> SafetensorsFile
        self.weight_map = weight_map  # tensor name -> shard file name
        self.index_metadata = index_metadata or {}

    def keys(self):
        return sorted(self.weight_map)

    def __contains__(self, name):
        return name in self.weight_map

    def __len__(self):
        return len(self.weight_map)

    def file_of(self, name):
        try:
            return self.files[self.weight_map[name]].path
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self.weight_map), n=3)
            raise CheckpointError("no such tensor in the checkpoint" +
                                  (f"; closest: {close}" if close else ""),
                                  self.path, name) from None

    def check_names(self, expected, allowed=None, strict=True, what="tensor", hint=None):
        """The one missing / unexpected check: CheckpointError naming the folder and the first of `expected`
        that is absent, or (`strict`) the file of the first present name neither expected nor `allowed`
        (a predicate). `hint`: missing names -> text appended to the message ('' for none)."""
        missing = [n for n in expected if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{len(missing)} {what}(s) missing: {listing(missing)}"
                                  + (hint(missing) if hint else ""), self.path, min(missing))
        expected = set(expected)
        unexpected = sorted(n for n in self.weight_map if n not in expected and not (allowed and allowed(n)))
        if unexpected and strict:
            raise CheckpointError(f"{len(unexpected)} unexpected {what}(s): {listing(unexpected)}",
                                  self.file_of(unexpected[0]), unexpected[0])

    def _file(self, name):
        self.file_of(name)
        return self.files[self.weight_map[name]]

    def _forward(method):  # noqa: N805  (builds methods that ask the tensor's shard)
        def call(self, name, *args):
            return getattr(self._file(name), method)(name, *args)
        call.__name__, call.__qualname__ = method, f"CheckpointFolder.{method}"
        call.__doc__ = getattr(SafetensorsFile, method).__doc__
        return call

    shape, dtype, nbytes = _forward("shape"), _forward("dtype"), _forward("nbytes")
    read, read_rows, read_slice = _forward("read"), _forward("read_rows"), _forward("read_slice")
    read_block_into = _forward("read_block_into")
    del _forward

    @property
    def bytes_read(self):
        return sum(f.bytes_read for f in self.files.values())

    def close(self):
        for f in self.files.values():
            f.close()


def open_checkpoint(path, strict=True) -> CheckpointFolder:
    """Opens an HF folder (with or without model.safetensors.index.json, or another single
    `*.safetensors.index.json`: _index_path) or one file.

    With an index, every listed shard must exist and hold the names mapped to it; tensors
    found in those shards but missing from the index raise (``strict``) or only warn.
    Only regular files resolving inside the folder (or a cache snapshot's blobs: fsguard) are read.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path) and os.path.basename(path) != INDEX_NAME:
        f = SafetensorsFile(path)  # named by the caller: not confined; refused unless a regular file
        return CheckpointFolder(path, {os.path.basename(path): f},
                                {n: os.path.basename(path) for n in f.keys()})
    folder = os.path.dirname(path) if os.path.exists(path) and not os.path.isdir(path) else path
    if not os.path.isdir(folder):
        raise CheckpointError("no such file or folder", path)
    roots = input_roots(folder)
    entries = sorted(os.listdir(folder))
    shards = [e for e in entries if e.endswith(".safetensors")]
    index_path = _index_path(folder, entries)
    if not shards and not os.path.lexists(index_path):
        pickles = [e for e in entries if e.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(f"only pickle-based weights here ({listing(pickles, 3)}): "
                                  "refused: we never unpickle; convert to safetensors", folder)
        raise CheckpointError("no *.safetensors files in folder", folder)
    files = {}
    try:
        if os.path.lexists(index_path):
            return _open_indexed(folder, index_path, files, strict, roots)
        weight_map = {}
        for shard in shards:
            files[shard] = f = SafetensorsFile(os.path.join(folder, shard), roots)
            for name in f.keys():
                if name in weight_map:
                    raise CheckpointError(f"tensor is in both {weight_map[name]!r} and "
                                          f"{shard!r} (and there is no index)", folder, name)
                weight_map[name] = shard
        return CheckpointFolder(folder, files, weight_map)
    except BaseException:
        for f in files.values():
            f.close()
        raise


def _index_path(folder, entries):
    """model.safetensors.index.json, else the folder's one other `*.safetensors.index.json` (msModelSlim:
    quant_model_weight_w8a8_dynamic.safetensors.index.json); several others are refused."""
    others = [e for e in entries if e.endswith(".safetensors.index.json") and e != INDEX_NAME]
    if INDEX_NAME in entries or not others:
        return os.path.join(folder, INDEX_NAME)
    if len(others) > 1:
        raise CheckpointError(f"{len(others)} safetensors indexes ({listing(others)}) and no {INDEX_NAME}: "
                              "keep the one that lists the shards", folder)
    return os.path.join(folder, others[0])


def _open_indexed(folder, index_path, files, strict, roots):
    index = read_json(index_path, roots, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError("'weight_map' must map tensor names to shard file names",
                              index_path)
    for name, shard in weight_map.items():
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(f"shard {shard!r} is outside the folder", index_path, name)
    missing = [s for s in set(weight_map.values())
               if not os.path.exists(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(f"the index lists {len(missing)} shard(s) that do not exist: "
                              f"{listing(missing)}", index_path)
    by_shard = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    for shard in sorted(by_shard):
        files[shard] = f = SafetensorsFile(os.path.join(folder, shard), roots)
        absent = sorted(by_shard[shard].difference(f.keys()))
        if absent:
            raise CheckpointError(f"listed in the index but not in this shard "
                                  f"({len(absent)} tensor(s): {listing(absent)})",
                                  f.path, absent[0])
        extra = sorted(n for n in f.keys() if n not in weight_map)
        if extra:
            msg = (f"{len(extra)} tensor(s) in this shard are missing from the index: "
                   f"{listing(extra)}")
            if strict:
                raise CheckpointError(msg, f.path, extra[0])
            warnings.warn(str(CheckpointError(msg + " (ignored)", f.path)), stacklevel=3)
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return CheckpointFolder(folder, files, dict(weight_map), meta)


def write_index(folder, weight_map, total_size, filename=INDEX_NAME, metadata=None):
    """Writes ``model.safetensors.index.json`` (HF layout) atomically; returns its path. ``metadata``
    (JSON values) goes beside ``total_size``."""
    if not (isinstance(weight_map, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise CheckpointError("weight_map must map tensor names to shard file names", folder)
    if not _is_int(total_size) or total_size < 0:
        raise CheckpointError(f"total_size must be a non-negative int, got {total_size!r}",
                              folder)
    text = json.dumps({"metadata": {**(metadata or {}), "total_size": total_size},
                       "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
    path = os.path.join(os.fspath(folder), filename)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    return path
