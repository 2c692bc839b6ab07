"""Conversion plans: which output files a dsv3-convert run writes, and the checks on its input.

A plan is a list of Jobs (one output file each), each an ordered list of Steps (one name-table
entry, or one tensor for fp8-to-bf16) with the Out tensors it yields. Every check on the input
(names, shapes, dtypes, FP8 scales) runs here, before the first byte is written.
"""
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from types import SimpleNamespace
from typing import NamedTuple

from . import fp8, names
from .errors import CheckpointError
from .fsguard import input_roots, read_json
from .ranks import layout_record
from .safetensors_io import DTYPE_NAMES, DTYPES, open_checkpoint


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
    """DeepseekV3Config of an HF config.json (a folder holding it, or its path); CheckpointError if bad.
    A folder's config.json is read only when it resolves inside the folder (fsguard.input_roots)."""
    folder = os.path.isdir(source)
    path = os.path.join(source, "config.json") if folder else source
    try:
        hf = read_json(path, input_roots(source) if folder else None, "the model config")
    except CheckpointError as exc:
        raise CheckpointError(exc.reason + ("; pass --config" if "cannot open" in exc.reason else ""), path) from None
    from mindformers_dsv3.config import ConfigError, DeepseekV3Config  # imports MindSpore: parent only
    try:  # runtime keys do not matter here; seq_length must only fit the model
        overrides.setdefault("seq_length", min(4096, int(hf.get("max_position_embeddings") or 4096)))
        return DeepseekV3Config.from_hf_config(hf, **overrides), hf
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid model config: {exc}", path) from None


def _layer_of(name):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _mtp_hint(config):
    """check_names hint: when only the MTP layer's tensors are missing, suggest --no-mtp."""
    def hint(missing):
        return (" (the MTP layer is missing: convert with --no-mtp)"
                if all(_layer_of(n) >= config.num_hidden_layers for n in missing) else "")
    return hint


def _check_hf(ckpt, config, include_mtp, block):
    """Validates an HF folder (names, shapes, dtypes, FP8 scales and their values) with the loader's
    checks (CheckpointFolder.check_names, names.check_tensor, fp8.check_scale_values); returns
    {name: shape} to read."""
    shapes = names.hf_shapes(config, include_mtp=True)
    required = names.hf_shapes(config, include_mtp=include_mtp)
    suffix = names.SCALE_SUFFIX
    ckpt.check_names(required, allowed=lambda n: n in shapes or (n.endswith(suffix) and n[:-len(suffix)] in shapes),
                     what="HF tensor", hint=_mtp_hint(config))
    for name, want in shapes.items():
        if name not in ckpt:
            continue
        sname = name + suffix
        scale = (ckpt.dtype(sname), ckpt.shape(sname)) if sname in ckpt else None
        names.check_tensor(name, ckpt.dtype(name), ckpt.shape(name), want, scale, block, ckpt.file_of(name),
                           ckpt.file_of(sname) if scale else None)
        if scale:  # read whole (1/16384 of its weight): a NaN or inf scale would poison its block
            fp8.check_scale_values(ckpt.read(sname), ckpt.file_of(sname), sname)
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
    from .convert_ranks import rank_plan
    from .ranks import RANK_DIR
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
    ckpt.check_names(required, allowed=lambda n: n in shapes, what="MindSpore tensor")
    keep = set(required)
    for name in sorted(keep):
        names.check_tensor(name, ckpt.dtype(name), ckpt.shape(name), shapes[name], file=ckpt.file_of(name))
    entries = [e for e in entries if e.ms in keep]
    if include_mtp:  # the MTP layer's copies of the embedding and head
        entries += [names.Entry(ms, (hf,), "copy", _layer_of(hf)) for hf, ms in names.shared_hf_names(config).items()]
    groups = {}
    for e in entries:
        outs = tuple(Out(n, _out_dtype(n, dtype, DTYPE_NAMES[ckpt.dtype(e.ms)]), tuple(hf_shapes[n])) for n in e.hf)
        groups.setdefault(e.layer, []).append((Step("to_hf", e, outs), ckpt.nbytes(e.ms)))
    return _jobs_by_layer(groups, (("format", "pt"),))


def plan_fp8_to_bf16(ckpt, config, dtype, include_mtp, block):
    shapes = _check_hf(ckpt, config, include_mtp, block)
    if not any(ckpt.dtype(n) == fp8.FP8 for n in shapes):
        raise CheckpointError("no FP8 (F8_E4M3) weights here: fp8-to-bf16 only dequantizes FP8 checkpoints; "
                              "this one needs no conversion (hf-to-ms converts it to our layout)", ckpt.path)
    by_file = {}
    for name in sorted(shapes):
        dt = dtype if ckpt.dtype(name) == fp8.FP8 else DTYPE_NAMES[ckpt.dtype(name)]
        step = Step("to_ms", names.Entry(name, (name,), "copy", _layer_of(name)), (Out(name, dt, tuple(shapes[name])),))
        by_file.setdefault(os.path.basename(ckpt.file_of(name)), []).append((step, _in_bytes(ckpt, [name])))
    return [Job(f, tuple(s for s, _ in v), sum(b for _, b in v), (("format", "pt"),))
            for f, v in sorted(by_file.items())]


# ----------------------------------------------------------------------------- a whole run
def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_run(mode, src, dtype, include_mtp, config_path, layout):
    """Validates the input and plans a dsv3-convert run (nothing written): a namespace of the jobs, the
    config, FP8 block, output config and the job's identity (`job_id`, recorded in the manifest)."""
    with open_checkpoint(src) as ckpt:  # refuses pickles, validates the index and every header
        if not os.path.isdir(src):
            raise CheckpointError("the input must be a checkpoint folder (with its config.json)", src)
        config, hf = load_config(config_path or src)
        t0 = time.time()  # conversion time, without the start-up (the config import loads MindSpore)
        try:
            qc = hf.get("quantization_config")
            block = fp8.block_size_of(qc) if qc else fp8.DEFAULT_BLOCK
        except ValueError as exc:
            raise CheckpointError(str(exc), config_path or os.path.join(src, "config.json")) from None
        per_rank = par_layout = None
        if layout is not None and mode != "hf-to-ms":
            raise CheckpointError(f"--layout is for hf-to-ms only, not {mode}", layout)
        if mode == "hf-to-ms" and layout is not None:
            jobs, par_layout, per_rank = plan_hf_to_ms_ranks(ckpt, config, dtype or "BF16", include_mtp, block,
                                                             os.fspath(layout))
        elif mode == "hf-to-ms":
            jobs = plan_hf_to_ms(ckpt, config, dtype or "BF16", include_mtp, block)
        elif mode == "ms-to-hf":
            jobs = plan_ms_to_hf(ckpt, config, dtype, include_mtp)
        elif mode == "fp8-to-bf16":
            jobs = plan_fp8_to_bf16(ckpt, config, dtype or "BF16", include_mtp, block)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        layout_in = {os.path.basename(f.path): [os.path.getsize(f.path), f.metadata(),
                                                [[n, DTYPE_NAMES[f.dtype(n)], f.shape(n)] for n in f.keys()]]
                     for f in ckpt.files.values()}
        in_tensors = len(ckpt)
    out_config = _output_config(mode, config, hf, dtype, include_mtp)
    job_id = {"mode": mode, "dtype": dtype or "keep", "mtp": include_mtp, "input": _digest(layout_in),
              "plan": _digest([[j.file, [[o.name, o.dtype, list(o.shape)] for o in j.outputs],
                                [[s.kind, dataclasses.astuple(s.entry)] + ([s.slices] if s.slices else [])
                                 for s in j.steps]] for j in jobs]),
              "config": _digest(out_config), "aux": []}  # the caller lists the small files it copies
    if par_layout is not None:
        job_id["layout"] = layout_record(par_layout)
    return SimpleNamespace(jobs=jobs, per_rank=per_rank, par_layout=par_layout, config=config, block=block,
                           out_config=out_config, aux=[], job_id=job_id, in_tensors=in_tensors, t0=t0)


def _output_config(mode, config, hf, dtype, include_mtp):
    names_of = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    if mode == "fp8-to-bf16":  # HF to HF: the input's config.json, minus quantization_config
        out = {k: v for k, v in hf.items() if k != "quantization_config"}
        out["torch_dtype"] = names_of[dtype or "BF16"]
    else:
        out = config.to_hf_dict()
        out.pop("quantization_config", None)
        out["torch_dtype"] = names_of.get(dtype, out.get("torch_dtype") or "bfloat16")
    if not include_mtp:
        out["num_nextn_predict_layers"] = 0
    return out
