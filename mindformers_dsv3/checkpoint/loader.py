"""Load a HuggingFace DeepSeek-V3 safetensors folder straight into our model.

Tensor by tensor through the name table: each MindSpore parameter is built from
its HF tensors (FP8 weights dequantized on the fly with their `weight_scale_inv`)
and set in place; nothing is copied to disk.

A rank of a split model (`model.parallel`, mindformers_dsv3.parallel.comm) reads only its slices of
the unified checkpoint: the rows / columns of a transformed parameter map to rows / columns of its HF
tensor(s) (`_slice_plan`), read with `read_slice`; routed experts read only the local experts'
tensors. FP8 slices read their scale blocks and the 128-row / column blocks around the slice.

A folder written by `dsv3-convert hf-to-ms --layout YAML` (`rank_<r>/` folders) is loaded by
`load_rank_checkpoint`: each rank reads its own folder, whose tensors already are its local parameters.
"""
import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import DEFAULT_BLOCK, FP8, dequantize_block_fp8
from mindformers_dsv3.checkpoint.ranks import LAYOUT_KEYS, RANK_DIR, layout_record, rank_folders
from mindformers_dsv3.checkpoint.safetensors_io import INDEX_NAME, open_checkpoint

_NP_OF_MS = {ms.float32: np.float32, ms.float16: np.float16}


def read_hf_tensor(ckpt, name, dtype=np.float32):
    """One HF tensor as `dtype`, dequantizing FP8 with `<name>_scale_inv` when present."""
    scale_name = name + names.SCALE_SUFFIX
    array = ckpt.read(name)
    if scale_name in ckpt:
        array = dequantize_block_fp8(array, ckpt.read(scale_name), name=name)
    elif array.dtype == FP8:
        raise CheckpointError(f"FP8 tensor without its scale {scale_name!r}", ckpt.file_of(name), name)
    return array.astype(dtype, copy=False)


def read_hf_slice(ckpt, name, axis, start, stop, dtype=np.float32):
    """tensor[start:stop] along `axis` of one HF tensor as `dtype`, FP8 dequantized.

    FP8: the slice is widened to whole scale blocks (block_fp8 edges), dequantized, then cut."""
    scale_name = name + names.SCALE_SUFFIX
    if scale_name not in ckpt:
        array = ckpt.read_slice(name, axis, start, stop)
        if array.dtype == FP8:
            raise CheckpointError(f"FP8 tensor without its scale {scale_name!r}", ckpt.file_of(name), name)
        return array.astype(dtype, copy=False)
    block = DEFAULT_BLOCK[axis]
    lo, hi = (start // block) * block, min(-(-stop // block) * block, ckpt.shape(name)[axis])
    weight = ckpt.read_slice(name, axis, lo, hi)
    scale = ckpt.read_slice(scale_name, axis, lo // block, -(-hi // block))
    full = dequantize_block_fp8(weight, scale, name=name)
    cut = [slice(None)] * full.ndim
    cut[axis] = slice(start - lo, stop - lo)
    return full[tuple(cut)].astype(dtype, copy=False)


def _read_entry_slice(ckpt, entry, slices, config):
    """The local value of `entry`'s parameter; slices: per MindSpore dim (start, stop), or None (whole)."""
    t = entry.transform
    if t in ("experts_gate_up", "experts_down"):
        per = len(entry.hf) // config.n_routed_experts
        e0, e1 = slices[0] or (0, config.n_routed_experts)
        inner = slices[2] if t == "experts_gate_up" else slices[1]
        stacked = []
        for e in range(e0, e1):
            parts = entry.hf[e * per:(e + 1) * per]
            if inner is None:
                arrays = [read_hf_tensor(ckpt, n) for n in parts]
            elif t == "experts_gate_up":  # HF gate / up (I, H): the same rows of each
                arrays = [read_hf_slice(ckpt, n, 0, inner[0] // 2, inner[1] // 2) for n in parts]
            else:  # HF down (H, I): columns
                arrays = [read_hf_slice(ckpt, n, 1, inner[0], inner[1]) for n in parts]
            stacked.append(names.expert_to_ms(t, arrays))
        return np.stack(stacked)
    dims = [d for d, s in enumerate(slices) if s is not None]
    if len(dims) != 1 or t not in ("copy", "rope_heads", "fuse"):
        raise CheckpointError(f"no slice rule for transform {t!r} split on dims {dims}", ckpt.path, entry.hf[0])
    d = dims[0]
    a, b = slices[d]
    if t == "fuse":  # [gate; up] rows: the same rows of each half
        arrays = [read_hf_slice(ckpt, n, d, a // 2, b // 2) for n in entry.hf]
    else:  # copy; rope_heads on whole heads (the per-head permutation applies to the slice)
        arrays = [read_hf_slice(ckpt, entry.hf[0], d, a, b)]
    return names.to_ms(entry, arrays, config)


def _to_param_value(value, param):
    if param.dtype == ms.bfloat16:
        return Tensor(value.astype(np.float32)).astype(ms.bfloat16)
    return Tensor(value.astype(_NP_OF_MS.get(param.dtype, np.float32), copy=False))


def expected_hf_names(config, include_mtp=True):
    """All HF tensor names a checkpoint for `config` holds (MTP copies included, scales excluded)."""
    out = {n for e in names.expand(config, include_mtp) for n in e.hf}
    if include_mtp:
        out.update(names.shared_hf_names(config))
    return out


def load_hf_checkpoint(model, hf_dir, strict=True, stats=None):
    """Fill `model`'s parameters from the HF folder `hf_dir`; returns the number of tensors read.

    Raises CheckpointError naming the tensor and file for a missing, unexpected or
    mis-shaped tensor. With strict=False, unexpected tensors are ignored. A rank of a split
    model (`model.parallel`) reads only its slices. `stats` (a dict), when given, receives
    `bytes_read` (tensor bytes read from disk) and `bytes_checkpoint` (the tensors' total).
    """
    if rank_folders(hf_dir):  # written by `dsv3-convert hf-to-ms --layout`
        return load_rank_checkpoint(model, hf_dir, strict=strict, stats=stats)
    config = model.config
    par = getattr(model, "parallel", None)
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    entries = names.expand(config, include_mtp)
    with open_checkpoint(hf_dir) as ckpt:
        present = set(ckpt.keys())
        expected = expected_hf_names(config, include_mtp)
        missing = sorted(n for n in expected if n not in present)
        if missing:
            raise CheckpointError(f"{len(missing)} tensor(s) missing, first {missing[:5]}",
                                  hf_dir, missing[0])
        scales = {n + names.SCALE_SUFFIX for n in expected}
        unexpected = sorted(n for n in present if n not in expected and n not in scales)
        if unexpected and strict:
            raise CheckpointError(f"{len(unexpected)} unexpected tensor(s), first {unexpected[:5]}",
                                  ckpt.file_of(unexpected[0]), unexpected[0])
        count = 0
        for entry in entries:
            param = params.get(entry.ms)
            if param is None:
                raise CheckpointError("no model parameter for this tensor; the name table and the "
                                      "model disagree", hf_dir, entry.ms)
            slices = par.param_slices(entry.ms, tuple(param.shape)) if par is not None else None
            if slices is None:
                value = names.to_ms(entry, [read_hf_tensor(ckpt, n) for n in entry.hf], config)
            else:
                value = _read_entry_slice(ckpt, entry, slices, config)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"shape {tuple(value.shape)} after layout transform does not match model parameter "
                    f"{entry.ms!r} of shape {tuple(param.shape)}", ckpt.file_of(entry.hf[0]), entry.hf[0])
            param.set_data(_to_param_value(value, param))
            count += len(entry.hf)
        if stats is not None:
            stats["bytes_read"] = ckpt.bytes_read
            stats["bytes_checkpoint"] = sum(ckpt.nbytes(n) for n in present)
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
    try:
        with open(index, encoding="utf-8") as fh:
            meta = json.load(fh)["metadata"]
        got = {k: meta[k] for k in LAYOUT_KEYS + ("world",)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
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
    tensor is already the rank's local parameter (same names and shapes). Raises CheckpointError naming
    the file and tensor for a missing, unexpected or mis-shaped tensor, or a layout that is not the
    model's; returns the number of tensors read."""
    sub = _rank_folder(model, os.fspath(folder))
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    expected = [e.ms for e in names.expand(model.config, include_mtp)]
    with open_checkpoint(sub) as ckpt:
        present = set(ckpt.keys())
        missing = [n for n in expected if n not in present]
        if missing:
            raise CheckpointError(f"{len(missing)} tensor(s) missing, first {missing[:5]}", sub, missing[0])
        unexpected = sorted(present - set(expected))
        if unexpected and strict:
            raise CheckpointError(f"{len(unexpected)} unexpected tensor(s), first {unexpected[:5]}",
                                  ckpt.file_of(unexpected[0]), unexpected[0])
        for name in expected:
            param = params.get(name)
            if param is None:
                raise CheckpointError("no model parameter for this tensor; the name table and the model disagree",
                                      ckpt.file_of(name), name)
            if tuple(ckpt.shape(name)) != tuple(param.shape):
                raise CheckpointError(f"shape {tuple(ckpt.shape(name))} does not match this rank's parameter of "
                                      f"shape {tuple(param.shape)}", ckpt.file_of(name), name)
            param.set_data(_to_param_value(ckpt.read(name), param))
        if stats is not None:
            stats["bytes_read"] = ckpt.bytes_read
            stats["bytes_checkpoint"] = sum(ckpt.nbytes(n) for n in present)
    return len(expected)
