"""Load a HuggingFace DeepSeek-V3 safetensors folder straight into our model.

All or nothing: every header (name, dtype, shape, FP8 scale shape and values) is checked against the
name table and the model's parameters before the first parameter changes; then the tensors are read in
table (file) order, each parameter's value built directly in the parameter's dtype (FP8 dequantized
block by block through lookup tables into a bfloat16 / float32 buffer; hf_read.py) and handed
to the parameter without a copy (`Tensor.from_numpy`); nothing is copied to disk. The FP8 block size
comes from the folder's config.json (`quantization_config.weight_block_size`).

A rank of a split model (`model.parallel`, mindformers_dsv3.parallel.comm) reads only its slices of
the unified checkpoint: the rows / columns of a transformed parameter map to rows / columns of its HF
tensor(s) (`hf_read.read_entry_slice`), read with `read_slice`; routed experts read only the local experts'
tensors. FP8 slices read the row / column blocks around the slice.

A folder written by `dsv3-convert hf-to-ms --layout YAML` (`rank_<r>/` folders) is loaded by
`load_rank_checkpoint`: each rank reads its own folder, whose tensors already are its local parameters.
"""
import os
import sys

import ml_dtypes
import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindformers_dsv3.checkpoint import fp8, msmodelslim, names
from mindformers_dsv3.checkpoint.names import check_tensor
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import DEFAULT_BLOCK, FP8
from mindformers_dsv3.checkpoint.fsguard import input_roots, read_json
from mindformers_dsv3.checkpoint.hf_read import Reader, read_entry, read_entry_slice
from mindformers_dsv3.checkpoint.hf_read import read_hf_slice  # noqa: F401  (API)
from mindformers_dsv3.checkpoint.ranks import LAYOUT_KEYS, RANK_DIR, layout_record, rank_folders
from mindformers_dsv3.checkpoint.safetensors_io import INDEX_NAME, open_checkpoint

NP_OF_MS = {ms.float32: np.dtype(np.float32), ms.float16: np.dtype(np.float16),
            ms.bfloat16: np.dtype(ml_dtypes.bfloat16), ms.int8: np.dtype(np.int8), ms.int32: np.dtype(np.int32)}
PROGRESS_DELAY_S = 3.0  # a load that takes longer shows a progress bar on stderr


# ----------------------------------------------------------------------------- checks (no data read)
def checkpoint_block(path, config=None):
    """The FP8 block (rows, cols) of the checkpoint at `path`: its config.json's
    quantization_config.weight_block_size; without a config.json, the model config's; else 128 x 128."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.json")
    if os.path.lexists(cfg_path):  # a FIFO, a folder or a link out of the folder is refused, not skipped
        qc = read_json(cfg_path, input_roots(folder), "the model config").get("quantization_config")
        if not qc:
            raise CheckpointError("the checkpoint holds FP8 tensors but config.json has no quantization_config "
                                  "(its weight_block_size gives the FP8 block size)", cfg_path)
        where = cfg_path
    else:
        qc, where = getattr(config, "quantization_config", None), "model_config.quantization_config"
        if not qc:
            return DEFAULT_BLOCK
    try:
        return fp8.block_size_of(qc)
    except ValueError as exc:
        raise CheckpointError(str(exc), where) from None


def _check_folder(ckpt, config, include_mtp, strict):
    """Names, dtypes and shapes of every tensor of `ckpt` against the table; returns (block, [FP8 names])."""
    shapes = names.hf_shapes(config, include_mtp)
    present = set(ckpt.keys())
    ckpt.check_names(shapes, allowed=lambda n: n.endswith(names.SCALE_SUFFIX) and n[:-len(names.SCALE_SUFFIX)] in shapes,
                     strict=strict)
    quantized = [n for n in shapes if ckpt.dtype(n) == FP8]
    block = checkpoint_block(ckpt.path, config) if quantized else DEFAULT_BLOCK
    for name, want in shapes.items():
        sname = name + names.SCALE_SUFFIX
        scale = (ckpt.dtype(sname), ckpt.shape(sname)) if sname in present else None
        check_tensor(name, ckpt.dtype(name), ckpt.shape(name), want, scale, block, ckpt.file_of(name),
                     ckpt.file_of(sname) if scale else None)
    return block, quantized


def _local_shape(shape, slices):
    return tuple(shape) if slices is None else tuple(d if s is None else s[1] - s[0] for d, s in zip(shape, slices))


def _np_dtype(param):
    return NP_OF_MS.get(param.dtype, np.dtype(np.float32))


def param_value(value, param):
    """`value` as a Tensor of the parameter's dtype, sharing value's memory when it already fits."""
    want = _np_dtype(param)
    if value.dtype != want:
        value = value.astype(want)
    return Tensor.from_numpy(np.ascontiguousarray(value))


class _Progress:
    """Bytes read, as a tqdm bar on stderr once the load has taken PROGRESS_DELAY_S."""

    def __init__(self, ckpt, total, what):
        from tqdm import tqdm
        self.ckpt, self.seen = ckpt, ckpt.bytes_read
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, file=sys.stderr,
                        delay=PROGRESS_DELAY_S, mininterval=1.0, leave=False, disable=False)

    def update(self):
        now = self.ckpt.bytes_read
        self.bar.update(now - self.seen)
        self.seen = now

    def close(self):
        self.bar.close()


def _plan(model, ckpt, entries, params):
    """[(entry, param, slices)], after checking each parameter exists with the shape its slices give."""
    par = getattr(model, "parallel", None)
    out = []
    for entry in entries:
        param = params.get(entry.ms)
        if param is None:
            raise CheckpointError("no model parameter for this tensor; the name table and the model disagree",
                                  ckpt.path, entry.ms)
        shape = tuple(names.ms_shape(entry, {n: ckpt.shape(n) for n in entry.hf}))
        slices = par.param_slices(entry.ms, tuple(param.shape)) if par is not None else None
        if _local_shape(shape, slices) != tuple(param.shape):
            raise CheckpointError(f"shape {_local_shape(shape, slices)} after layout transform does not match "
                                  f"model parameter {entry.ms!r} of shape {tuple(param.shape)}",
                                  ckpt.file_of(entry.hf[0]), entry.hf[0])
        out.append((entry, param, slices))
    return out


def load_hf_checkpoint(model, hf_dir, strict=True, stats=None):
    """Fill `model`'s parameters from the HF folder `hf_dir`; returns the number of tensors read.

    Raises CheckpointError naming the tensor and file for a missing, unexpected, mis-typed or
    mis-shaped tensor, a bad FP8 scale, before any parameter changes. With strict=False, unexpected
    tensors are ignored. A rank of a split model (`model.parallel`) reads only its slices. `stats`
    (a dict), when given, receives `bytes_read` (tensor bytes read from disk) and `bytes_checkpoint`.
    """
    if rank_folders(hf_dir):  # written by `dsv3-convert hf-to-ms --layout`
        return load_rank_checkpoint(model, hf_dir, strict=strict, stats=stats)
    config = model.config
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    entries = names.expand(config, include_mtp)
    with open_checkpoint(hf_dir) as ckpt:
        vectors = None  # an msModelSlim W8A8 folder: its checked vectors (msmodelslim.py)
        if msmodelslim.applies(ckpt, config):
            vectors, block, quantized = msmodelslim.check_folder(ckpt, config, include_mtp, strict), DEFAULT_BLOCK, []
        else:
            block, quantized = _check_folder(ckpt, config, include_mtp, strict)
        plan = _plan(model, ckpt, entries, params)
        whole = [(e, _np_dtype(p)) for e, p, s in plan if s is None and not names.is_vector(e.ms)]  # read ahead
        total = sum(ckpt.nbytes(n) for e, _, s in plan for n in e.hf)
        progress = _Progress(ckpt, total, f"loading {os.path.basename(os.path.normpath(hf_dir))}")
        count, reader = 0, None
        try:
            # reads and checks every scale (the last check); a whole model reads whole files: read ahead
            reader = Reader(ckpt, block, quantized, whole, advise=getattr(model, "parallel", None) is None)
            for entry, param, slices in plan:
                if vectors is not None and names.is_vector(entry.ms):
                    value = msmodelslim.vector_value(vectors, entry, slices, config, _np_dtype(param),
                                                     getattr(model, "parallel", None))
                elif slices is None:
                    value = read_entry(reader, entry, config, _np_dtype(param))
                else:
                    value = read_entry_slice(reader, entry, slices, config, _np_dtype(param))
                param.set_data(param_value(value, param))
                del value
                count += len(entry.hf)
                progress.update()
        finally:
            if reader is not None:
                reader.close()
            progress.close()
        if stats is not None:
            stats["bytes_read"] = ckpt.bytes_read
            stats["bytes_checkpoint"] = sum(ckpt.nbytes(n) for n in ckpt.keys())
    return count


def _rank_folder(model, folder):
    """This rank's folder of a per-rank checkpoint, after checking it was written for the model's layout."""
    par = getattr(model, "parallel", None)
    rank = par.rank if par is not None else 0
    want = layout_record(par.layout) if par is not None else None
    folders = rank_folders(folder)
    sub = folders.get(rank)
    if sub is None:
        raise CheckpointError(f"no {RANK_DIR.format(rank)} folder for this rank (the folder holds {len(folders)} "
                              "rank folder(s)); convert with the YAML this model runs (dsv3-convert --layout)", folder)
    index = os.path.join(sub, INDEX_NAME)
    meta = read_json(index, input_roots(folder), "the per-rank index").get("metadata")
    try:
        got = {k: meta[k] for k in LAYOUT_KEYS + ("world",)}
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"not a per-rank index written by dsv3-convert --layout ({exc})", index) from None
    if want is None:
        want = {**got, "world": 1}
    if got != want or meta.get("rank") != rank:
        diff = ", ".join(f"{k}: checkpoint {got.get(k)!r}, model {want.get(k)!r}" for k in want if got.get(k) != want[k])
        raise CheckpointError(f"written for another parallel layout ({diff or 'rank differs'}); convert again with "
                              "the YAML this model runs (dsv3-convert hf-to-ms --layout)", index)
    return sub


def load_rank_checkpoint(model, folder, strict=True, stats=None):
    """Loads this rank's `rank_<r>/` of a folder written by `dsv3-convert hf-to-ms --layout YAML`: every
    tensor is already the rank's local parameter (same names and shapes). Every name, dtype and shape is
    checked before the first parameter changes (CheckpointError naming the file and tensor; also for a
    layout that is not the model's); returns the number of tensors read."""
    sub = _rank_folder(model, os.fspath(folder))
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    expected = [e.ms for e in names.expand(model.config, include_mtp)]
    with open_checkpoint(sub) as ckpt:
        ckpt.check_names(expected, strict=strict)
        for name in expected:
            param = params.get(name)
            if param is None:
                raise CheckpointError("no model parameter for this tensor; the name table and the model disagree",
                                      ckpt.file_of(name), name)
            check_tensor(name, ckpt.dtype(name), ckpt.shape(name), param.shape, file=ckpt.file_of(name))
        progress = _Progress(ckpt, sum(ckpt.nbytes(n) for n in expected), f"loading {os.path.basename(sub)}")
        reader = Reader(ckpt, DEFAULT_BLOCK, (), reads=expected, advise=True)
        try:
            for name in expected:
                params[name].set_data(param_value(reader.tensor(name, _np_dtype(params[name])), params[name]))
                progress.update()
        finally:
            reader.close()
            progress.close()
        if stats is not None:
            stats["bytes_read"] = ckpt.bytes_read
            stats["bytes_checkpoint"] = sum(ckpt.nbytes(n) for n in ckpt.keys())
    return len(expected)
