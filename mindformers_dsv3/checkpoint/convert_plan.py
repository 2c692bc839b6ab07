"""Conversion plans: which output files a dsv3-convert run writes, and the checks on its input.

A plan is a list of Jobs (one output file each), each an ordered list of Steps (one name-table
entry, or one tensor for fp8-to-bf16) with the Out tensors it yields. Every check on the input
(names, shapes, dtypes, FP8 scales) runs here, before the first byte is written.
"""
import json
import math
import os
import re
from typing import NamedTuple

from . import fp8, names
from .errors import CheckpointError
from .safetensors_io import DTYPES

FLOAT_DTYPES = ("F32", "F16", "BF16")
_NAME_OF = {dt: name for name, dt in DTYPES.items()}


class Out(NamedTuple):
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple

    @property
    def nbytes(self):
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class Step(NamedTuple):
    kind: str  # "to_ms": HF tensors -> entry.ms ; "to_hf": MindSpore entry.ms -> entry.hf
    entry: names.Entry
    outputs: tuple  # Out, in write order
    slices: tuple = None  # to_ms of one rank: per MindSpore dim (start, stop) or None (ranks.rank_slices)


class Job(NamedTuple):
    file: str
    steps: tuple
    in_bytes: int  # input bytes it reads
    metadata: tuple  # safetensors __metadata__ items

    @property
    def outputs(self):
        return [o for s in self.steps for o in s.outputs]



def load_config(source, **overrides):
    """DeepseekV3Config of an HF config.json (a folder holding it, or its path); CheckpointError if bad."""
    from mindformers_dsv3.config import ConfigError, DeepseekV3Config  # imports MindSpore: parent only
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    try:
        with open(path, encoding="utf-8") as fh:
            hf = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the model config ({exc}); pass --config", path) from None
    try:  # runtime keys do not matter here; seq_length must only fit the model
        overrides.setdefault("seq_length", min(4096, int(hf.get("max_position_embeddings") or 4096)))
        return DeepseekV3Config.from_hf_config(hf, **overrides), hf
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid model config: {exc}", path) from None


def _layer_of(name):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _listing(items, limit=5):
    items = sorted(items)
    return ", ".join(map(repr, items[:limit])) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_names(ckpt, expected, allowed, what, config):
    """Missing (expected but absent) and unexpected (present, not allowed) tensors raise."""
    present = set(ckpt.keys())
    missing = [n for n in expected if n not in present]
    if missing:
        hint = (" (the MTP layer is missing: convert with --no-mtp)"
                if all(_layer_of(n) >= config.num_hidden_layers for n in missing) else "")
        raise CheckpointError(f"{len(missing)} {what} tensor(s) missing: {_listing(missing)}{hint}",
                              ckpt.path, sorted(missing)[0])
    unexpected = sorted(present - set(allowed))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) for this config: {_listing(unexpected)}",
                              ckpt.file_of(unexpected[0]), unexpected[0])


def _check_tensor(ckpt, name, shape, fp8_ok):
    dtype, got = _NAME_OF[ckpt.dtype(name)], ckpt.shape(name)
    if got != tuple(shape):
        raise CheckpointError(f"shape {got} does not match the config: expected {tuple(shape)}",
                              ckpt.file_of(name), name)
    if dtype not in FLOAT_DTYPES and not (fp8_ok and dtype == "F8_E4M3"):
        raise CheckpointError(f"dtype {dtype} is not a weight dtype here (expected one of "
                              f"{', '.join(FLOAT_DTYPES + (('F8_E4M3',) if fp8_ok else ()))})",
                              ckpt.file_of(name), name)
    return dtype


def _check_hf(ckpt, config, include_mtp, block):
    """Validates an HF folder (names, shapes, dtypes, FP8 scales); returns {name: shape} to read."""
    shapes = names.hf_shapes(config, include_mtp=True)
    required = names.hf_shapes(config, include_mtp=include_mtp)
    scales = [n + names.SCALE_SUFFIX for n in shapes if n + names.SCALE_SUFFIX in ckpt]
    _check_names(ckpt, required, list(shapes) + scales, "HF", config)
    for name in shapes:
        if name not in ckpt:
            continue
        dtype, scale = _check_tensor(ckpt, name, shapes[name], fp8_ok=True), name + names.SCALE_SUFFIX
        if dtype == "F8_E4M3" and scale not in ckpt:
            raise CheckpointError(f"FP8 weight without its scale {scale!r}", ckpt.file_of(name), name)
        if scale in ckpt:
            if dtype != "F8_E4M3":
                raise CheckpointError(f"has a scale but is {dtype}, not F8_E4M3", ckpt.file_of(scale), scale)
            want = fp8.scale_inv_shape(shapes[name], block) if len(shapes[name]) == 2 else None
            if ckpt.shape(scale) != want:
                raise CheckpointError(f"scale shape {ckpt.shape(scale)} does not match its weight {name!r} "
                                      f"of shape {tuple(shapes[name])}: expected {want} for {block[0]}x{block[1]} "
                                      "blocks", ckpt.file_of(scale), scale)
            if _NAME_OF[ckpt.dtype(scale)] not in FLOAT_DTYPES:
                raise CheckpointError(f"scale dtype {_NAME_OF[ckpt.dtype(scale)]} is not a float",
                                      ckpt.file_of(scale), scale)
    return {n: s for n, s in shapes.items() if n in required}


def _in_bytes(ckpt, hf_names):
    return sum(ckpt.nbytes(n) + (ckpt.nbytes(n + names.SCALE_SUFFIX) if n + names.SCALE_SUFFIX in ckpt else 0)
               for n in hf_names)


def _jobs_by_layer(groups, metadata):
    """{layer: [(Step, in_bytes)]} -> Jobs `model-0000i-of-0000n.safetensors`, global tensors first."""
    keys = sorted(groups)
    return [Job(f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors", tuple(s for s, _ in groups[k]),
                sum(b for _, b in groups[k]), metadata) for i, k in enumerate(keys)]


def _out_dtype(name, dtype, given):
    return "F32" if names.keeps_float32(name) else (dtype or given)


def plan_hf_to_ms(ckpt, config, dtype, include_mtp, block):
    shapes = _check_hf(ckpt, config, include_mtp, block)
    groups = {}
    for e in names.expand(config, include_mtp):
        out = Out(e.ms, _out_dtype(e.ms, dtype, None), tuple(names.ms_shape(e, shapes)))
        groups.setdefault(e.layer, []).append((Step("to_ms", e, (out,)), _in_bytes(ckpt, e.hf)))
    return _jobs_by_layer(groups, (("format", "ms"),))


def plan_hf_to_ms_ranks(ckpt, config, dtype, include_mtp, block, layout_path):
    """One set of files per rank of the layout in `layout_path`: `rank_<r>/model-0000i-of-0000n.safetensors`
    holding exactly rank r's slices (ranks.py). Returns (jobs, Layout, {rank: [its jobs]})."""
    from .ranks import RANK_DIR, rank_plan
    shapes = _check_hf(ckpt, config, include_mtp, block)
    entries = names.expand(config, include_mtp)
    layout, ranks = rank_plan(config, entries, shapes, layout_path)
    jobs, per_rank = [], {}
    for r, held in enumerate(ranks):
        groups = {}
        for e in entries:
            if e.ms not in held:
                continue
            local, slices = held[e.ms]
            out = Out(e.ms, _out_dtype(e.ms, dtype, None), tuple(local))
            frac = math.prod(local) / max(1, math.prod(names.ms_shape(e, shapes)))
            groups.setdefault(e.layer, []).append((Step("to_ms", e, (out,), slices),
                                                   int(_in_bytes(ckpt, e.hf) * frac)))
        folder = RANK_DIR.format(r)
        per_rank[r] = [j._replace(file=f"{folder}/{j.file}") for j in _jobs_by_layer(groups, (("format", "ms"),))]
        jobs += per_rank[r]
    return jobs, layout, per_rank


def plan_ms_to_hf(ckpt, config, dtype, include_mtp):
    hf_shapes = names.hf_shapes(config, include_mtp=True)
    entries = names.expand(config, include_mtp=True)
    shapes = {e.ms: tuple(names.ms_shape(e, hf_shapes)) for e in entries}
    required = [e.ms for e in entries if include_mtp or not e.ms.startswith("model.mtp.")]
    _check_names(ckpt, required, shapes, "MindSpore", config)
    keep = set(required)
    for name in keep:
        _check_tensor(ckpt, name, shapes[name], fp8_ok=False)
    entries = [e for e in entries if e.ms in keep]
    if include_mtp:  # the MTP layer's copies of the embedding and head
        entries += [names.Entry(ms, (hf,), "copy", _layer_of(hf)) for hf, ms in names.shared_hf_names(config).items()]
    groups = {}
    for e in entries:
        outs = tuple(Out(n, _out_dtype(n, dtype, _NAME_OF[ckpt.dtype(e.ms)]), tuple(hf_shapes[n])) for n in e.hf)
        groups.setdefault(e.layer, []).append((Step("to_hf", e, outs), ckpt.nbytes(e.ms)))
    return _jobs_by_layer(groups, (("format", "pt"),))


def plan_fp8_to_bf16(ckpt, config, dtype, include_mtp, block):
    shapes = _check_hf(ckpt, config, include_mtp, block)
    by_file = {}
    for name in sorted(shapes):
        dt = dtype if ckpt.dtype(name) == fp8.FP8 else _NAME_OF[ckpt.dtype(name)]
        step = Step("to_ms", names.Entry(name, (name,), "copy", _layer_of(name)), (Out(name, dt, tuple(shapes[name])),))
        by_file.setdefault(os.path.basename(ckpt.file_of(name)), []).append((step, _in_bytes(ckpt, [name])))
    return [Job(f, tuple(s for s, _ in v), sum(b for _, b in v), (("format", "pt"),))
            for f, v in sorted(by_file.items())]
