"""The dsv3-convert engine: HF <-> MindSpore checkpoints in one streaming, parallel, resumable pass.

A conversion is a *plan* (convert_plan.py) built from the name table (`names.py`) and the config: output files, each an
ordered list of *steps* (one table entry, or one tensor for fp8-to-bf16) that yield the file's output
tensors. A worker writes a file tensor by tensor, the data streamed in row chunks or expert by expert
(FP8 dequantized on the way), under a temporary name, fsynced, then renamed. The parent records each
finished file (size, sha256, tensors) in the manifest, then writes the index and config.json. Nothing
depends on timing or on the number of workers: the output is byte-identical for every `--workers` and
after a resume. Every check on the input runs before the first byte is written.
"""
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from types import SimpleNamespace

import numpy as np

from . import fp8, names, streaming
from .convert_plan import (_NAME_OF, _listing, load_config, plan_fp8_to_bf16, plan_hf_to_ms, plan_hf_to_ms_ranks,
                           plan_ms_to_hf)
from .ranks import layout_record, rank_folders
from .verify import _TMP, MANIFEST_FORMAT, MANIFEST_NAME, _file_record, check  # noqa: F401  (API: transform.check)
from .errors import CheckpointError
from .safetensors_io import (DTYPES, INDEX_NAME, PICKLE_SUFFIXES, SafetensorsFile, _atomic_write,
                             open_checkpoint, write_index)

CHUNK_BYTES = 32 * 1024 * 1024  # float32 working size of one streamed row chunk
AUX_MAX_BYTES = 64 * 1024 * 1024  # small top-level files (tokenizer, generation config) are copied
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "keep": None}


# ----------------------------------------------------------------------------- reading
def dequantize(q, scale, block, name=None, file=None, dtype=np.float32):
    """Block-FP8 rows -> `dtype`; bit-identical to fp8.dequantize_block_fp8(q, scale).astype(dtype).

    One table lookup per element (streaming.decode_fp8): per block, the 256 codes times the block's
    scale, already rounded to `dtype`. `q` holds whole row blocks from its first row."""
    want = fp8.scale_inv_shape(q.shape, block)
    if scale.shape != want:
        raise CheckpointError(f"weight_scale_inv shape {scale.shape} does not match rows of shape "
                              f"{q.shape}: expected {want}", file, name)
    dtype = np.dtype(dtype)
    out = np.empty(q.shape, dtype)
    if q.size:
        streaming.decode_fp8(q.view(np.uint8), 0, 0, streaming.lookup_tables(scale, dtype), 0, block,
                             out.view(streaming._uint(dtype)))
    return out


class _Source:
    """Reads input tensors as a given dtype, FP8 dequantized with its scale, counting bytes read."""

    def __init__(self, ckpt, block, progress=None):
        self.ckpt, self.block, self.progress, self._seen = ckpt, block, progress, ckpt.bytes_read

    def _tick(self):
        now = self.ckpt.bytes_read
        if self.progress:
            self.progress(now - self._seen)
        self._seen = now

    def _rows(self, name, start, stop, dtype):
        c = self.ckpt
        if c.dtype(name) != fp8.FP8:
            return c.read_rows(name, start, stop).astype(dtype, copy=False)
        br = self.block[0]
        scale = c.read_rows(name + names.SCALE_SUFFIX, start // br, -(-stop // br))
        return dequantize(c.read_rows(name, start, stop), scale, self.block, name, c.file_of(name), dtype)

    def full(self, name, dtype):
        shape = self.ckpt.shape(name)
        out = self._rows(name, 0, shape[0], dtype) if shape else self.ckpt.read(name).astype(dtype)
        self._tick()
        return out

    def rows(self, name, dtype, start=0, stop=None):
        shape = self.ckpt.shape(name)
        stop = shape[0] if stop is None else stop
        if len(shape) < 2:
            yield self.full(name, dtype)[start:stop]
            return
        step = max(1, CHUNK_BYTES // max(1, math.prod(shape[1:]) * 4))
        if self.ckpt.dtype(name) == fp8.FP8:
            step = max(self.block[0], step // self.block[0] * self.block[0])
        for r in range(start, stop, step):
            chunk = self._rows(name, r, min(stop, r + step), dtype)
            self._tick()
            yield chunk


def produce(step, src, config):
    """Yields (output index, array) of one step in write order, each output's arrays concatenated
    along axis 0 making it whole. Derived from names.to_ms / to_hf: copy and fuse are row
    concatenations, stacked experts go one expert at a time (names.expert_to_ms / expert_to_hf)."""
    e, t, outs = step.entry, step.entry.transform, step.outputs
    dt = [DTYPES[o.dtype] for o in outs]
    if step.kind == "to_ms":
        if t in ("copy", "fuse"):
            for n in e.hf:
                for chunk in src.rows(n, dt[0]):
                    yield 0, chunk
        elif t.startswith("experts"):
            per = len(e.hf) // config.n_routed_experts
            for k in range(0, len(e.hf), per):
                yield 0, names.expert_to_ms(t, [src.full(n, dt[0]) for n in e.hf[k:k + per]])[None]
        else:  # a permutation within the tensor: whole
            yield 0, names.to_ms(e, [src.full(n, dt[0]) for n in e.hf], config)
        return
    if t in ("copy", "fuse"):
        start = 0
        for i, o in enumerate(outs):
            for chunk in src.rows(e.ms, dt[i], start, start + o.shape[0]):
                yield i, chunk
            start += o.shape[0]
    elif t.startswith("experts"):
        parts = len(outs) // src.ckpt.shape(e.ms)[0]
        for k in range(src.ckpt.shape(e.ms)[0]):
            for j, part in enumerate(names.expert_to_hf(t, next(src.rows(e.ms, dt[0], k, k + 1))[0])):
                yield k * parts + j, part.astype(dt[k * parts + j], copy=False)
    else:
        for i, part in enumerate(names.to_hf(e, src.full(e.ms, dt[0]), config)):
            yield i, part.astype(dt[i], copy=False)


# ----------------------------------------------------------------------------- writing one file
def _contiguous(a):
    if a.flags.c_contiguous:
        return a
    if a.ndim == 2 and a.strides[0] < a.strides[1]:  # a transposed view
        return names.transposed(a.T)
    return np.ascontiguousarray(a)


def header_bytes(job):
    header, offset = {"__metadata__": dict(job.metadata)}, 0
    for o in job.outputs:
        header[o.name] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_job(folder, job, src, config, kill=False, defer=False):
    """Writes one output file atomically; returns its manifest record. With `defer`, returns
    (record, finish): the file is complete under its temporary name until finish() fsyncs and renames it."""
    path = os.path.join(folder, job.file)
    raw, result = header_bytes(job), {}

    def fill(fh):
        out, ok = streaming.Writer(fh), False
        try:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for step in job.steps:
                _write_step(out, step, src, config, path, kill)
            ok = True
        finally:
            out.close(ok)
        result.update(size=out.size, sha256=out.sha.hexdigest())

    finish = _atomic_write(path, fill, defer=defer)
    record = {**result, "tensors": {o.name: {"dtype": o.dtype, "shape": list(o.shape)} for o in job.outputs}}
    return (record, finish) if defer else record


class _Shapes:
    def __init__(self, ckpt):
        self.ckpt = ckpt

    def __getitem__(self, name):
        return self.ckpt.shape(name)


def _write_step(out, step, src, config, path, kill):
    if step.kind == "to_ms":  # the fast path: streaming.write_output
        o, = step.outputs
        fast = streaming.Source(src.ckpt, src.block, src.progress)
        n = streaming.write_output(out, fast, step.entry, _Shapes(src.ckpt), config, DTYPES[o.dtype],
                                   getattr(step, "slices", None))
        src._seen = src.ckpt.bytes_read
        if n != o.nbytes:
            raise CheckpointError(f"layout transform produced {n} bytes, expected {o.nbytes} "
                                  f"for {o.dtype} {o.shape}", path, o.name)
        if kill:  # test hook: die like `kill -9` with this file half written
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return
    done, cur = [0] * len(step.outputs), 0
    for i, arr in produce(step, src, config):
        o = step.outputs[i]
        if i < cur or any(done[j] != step.outputs[j].nbytes for j in range(cur, i)) \
                or arr.dtype != DTYPES[o.dtype] or done[i] + arr.nbytes > o.nbytes:
            raise CheckpointError(f"layout transform produced {arr.dtype} {arr.shape} out of order "
                                  f"or beyond {o.dtype} {o.shape}", path, o.name)
        cur, done[i] = i, done[i] + arr.nbytes
        out.write(_contiguous(arr))
        if kill:  # test hook: die like `kill -9` with this file half written
            os.killpg(os.getpgid(0), signal.SIGKILL)
    for o, d in zip(step.outputs, done):
        if d != o.nbytes:
            raise CheckpointError(f"layout transform produced {d} bytes, expected {o.nbytes} "
                                  f"for {o.dtype} {o.shape}", path, o.name)


# ----------------------------------------------------------------------------- worker processes
_WORKER = {}


def _worker_init(src_dir, block, config, counter):
    _WORKER.update(src_dir=src_dir, block=block, config=config, counter=counter)


def _worker_run(out_dir, job, kill):
    w = _WORKER
    if "ckpt" not in w:
        w["ckpt"] = open_checkpoint(w["src_dir"])

    def progress(n):
        with w["counter"].get_lock():
            w["counter"].value += n
    return write_job(out_dir, job, _Source(w["ckpt"], w["block"], progress), w["config"], kill)


def _run_jobs(jobs, src_dir, out_dir, block, config, workers, record, bar, kill_at):
    """Runs `jobs` [(plan index, Job)], calling record(job, result) as each file is finished."""
    if workers <= 1 or len(jobs) <= 1:  # fsync and rename of a file overlap with writing the next one
        with open_checkpoint(src_dir) as ckpt, ThreadPoolExecutor(1) as finisher:
            src, previous = _Source(ckpt, block, bar.update), None
            for index, job in jobs:
                if index == kill_at and previous is not None:  # test hook: the files before are finished
                    previous.result()
                result, finish = write_job(out_dir, job, src, config, kill=index == kill_at, defer=True)
                if previous is not None:
                    previous.result()

                def done(job=job, result=result, finish=finish):
                    finish()
                    record(job, result)
                previous = finisher.submit(done)
            if previous is not None:
                previous.result()
        return
    ctx = mp.get_context("spawn")  # never fork a process that may hold MindSpore threads
    counter, seen = ctx.Value("Q", 0), 0
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init,
                             initargs=(src_dir, block, config, counter)) as pool:
        # largest files first: the last file started is a small one, so workers finish together
        order = sorted(jobs, key=lambda item: (-item[1].in_bytes, item[0]))
        pending = {pool.submit(_worker_run, out_dir, job, index == kill_at): job for index, job in order}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                bar.update(counter.value - seen)
                seen = counter.value
                for fut in finished:
                    record(pending.pop(fut), fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


# ----------------------------------------------------------------------------- manifest and folders
def _json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _write_json(path, obj):
    _atomic_write(path, lambda fh: fh.write(_json_bytes(obj)))


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _aux_files(src):
    skip = {"config.json", INDEX_NAME, MANIFEST_NAME}
    out = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (name in skip or name.startswith(".") or name.endswith(".safetensors")
                or name.lower().endswith(PICKLE_SUFFIXES) or not os.path.isfile(path)
                or os.path.getsize(path) > AUX_MAX_BYTES):
            continue
        out.append(name)
    return out


def _prepare_output(src, dst, job_id):
    """Refuses a bad output folder; returns the manifest files already finished (resume)."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
        raise CheckpointError("the output folder is the input folder or inside it; choose another", dst)
    manifest_path = os.path.join(dst, MANIFEST_NAME)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"unreadable manifest ({exc}); choose an empty folder", manifest_path) from None
        if not isinstance(manifest, dict) or manifest.get("job") != job_id:
            raise CheckpointError("the output folder holds a different conversion (mode, options or input "
                                  "differ); choose an empty folder", dst)
        for folder in [dst] + list(rank_folders(dst).values()):
            for name in os.listdir(folder):
                if _TMP.match(name):  # left by a killed run
                    os.unlink(os.path.join(folder, name))
        return {f: r for f, r in manifest["files"].items()
                if os.path.isfile(os.path.join(dst, f)) and os.path.getsize(os.path.join(dst, f)) == r["size"]}
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError("the output path exists and is not a folder", dst)
    if os.path.isdir(dst) and any(not _TMP.match(n) for n in os.listdir(dst)):
        raise CheckpointError("the output folder is not empty and holds no dsv3-convert manifest; "
                              "choose an empty folder", dst)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(dst):
        os.unlink(os.path.join(dst, name))  # temporary files of a run killed before its manifest
    return {}


def convert(mode, src, dst, dtype=None, include_mtp=True, workers=1, config_path=None, progress=True,
            kill_at=None, layout=None):
    """Runs one conversion ("hf-to-ms", "ms-to-hf" or "fp8-to-bf16"); returns a summary dict.

    `layout` (hf-to-ms only): a MindFormers YAML whose parallel_config gives the ranks; each rank's
    slices go to `dst/rank_<r>/` with its own index (ranks.py). Resumes a killed run in the same
    `dst`. Raises CheckpointError before writing anything when the input does not match its config."""
    from tqdm import tqdm
    src, dst = os.fspath(src), os.fspath(dst)
    dtype = OUT_DTYPES[dtype or ("keep" if mode == "ms-to-hf" else "bf16")]
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
        layout = {os.path.basename(f.path): [os.path.getsize(f.path), f.metadata(),
                                             [[n, _NAME_OF[f.dtype(n)], f.shape(n)] for n in f.keys()]]
                  for f in ckpt.files.values()}
        in_tensors = len(ckpt)
    out_config = _output_config(mode, config, hf, dtype, include_mtp)
    aux = _aux_files(src)
    job_id = {"mode": mode, "dtype": dtype or "keep", "mtp": include_mtp, "input": _digest(layout),
              "plan": _digest([[j.file, [[o.name, o.dtype, list(o.shape)] for o in j.outputs],
                                [[s.kind, dataclasses.astuple(s.entry)] + ([s.slices] if s.slices else [])
                                 for s in j.steps]] for j in jobs]),
              "config": _digest(out_config), "aux": aux}
    if par_layout is not None:
        job_id["layout"] = layout_record(par_layout)
    files = _prepare_output(src, dst, job_id)
    resumed = [j.file for j in jobs if j.file in files]
    manifest = {"manifest": MANIFEST_FORMAT, "job": job_id, "complete": False, "files": dict(sorted(files.items()))}
    _write_json(os.path.join(dst, MANIFEST_NAME), manifest)  # first: a killed run always leaves one
    for folder in {os.path.dirname(j.file) for j in jobs} - {""}:
        os.makedirs(os.path.join(dst, folder), exist_ok=True)

    def record(job, result):
        files[job.file] = result
        manifest["files"] = dict(sorted(files.items()))
        _write_json(os.path.join(dst, MANIFEST_NAME), manifest)

    todo = [(i, j) for i, j in enumerate(jobs) if j.file not in files]
    bar = tqdm(total=sum(j.in_bytes for _, j in todo), unit="B", unit_scale=True, unit_divisor=1024,
               desc=mode, disable=not progress, dynamic_ncols=True)
    with bar:
        worker_config = SimpleNamespace(**config.to_hf_dict())  # plain attributes: no MindSpore in workers
        _run_jobs(todo, src, dst, block, worker_config, workers, record, bar, kill_at)
    extra = [INDEX_NAME, "config.json"]
    if per_rank is None:
        weight_map = {o.name: j.file for j in jobs for o in j.outputs}
        write_index(dst, weight_map, sum(o.nbytes for j in jobs for o in j.outputs))
    else:  # each rank folder: its index (with its place in the layout) and config.json
        for r, rank_jobs in per_rank.items():
            folder = os.path.dirname(rank_jobs[0].file) if rank_jobs else f"rank_{r}"
            weight_map = {o.name: os.path.basename(j.file) for j in rank_jobs for o in j.outputs}
            write_index(os.path.join(dst, folder), weight_map, sum(o.nbytes for j in rank_jobs for o in j.outputs),
                        metadata={"rank": r, **layout_record(par_layout)})
            _write_json(os.path.join(dst, folder, "config.json"), out_config)
            extra += [f"{folder}/{INDEX_NAME}", f"{folder}/config.json"]
    _write_json(os.path.join(dst, "config.json"), out_config)
    for name in aux:
        with open(os.path.join(src, name), "rb") as fh:
            _atomic_write(os.path.join(dst, name), lambda out, fh=fh: shutil.copyfileobj(fh, out))
    if per_rank is not None:
        extra.remove(INDEX_NAME)
    for name in extra + aux:
        files[name] = _file_record(os.path.join(dst, name))
    manifest.update(complete=True, files=dict(sorted(files.items())))
    _write_json(os.path.join(dst, MANIFEST_NAME), manifest)
    seconds = time.time() - t0
    summary = {"mode": mode, "tensors": sum(len(j.outputs) for j in jobs), "input_tensors": in_tensors,
               "files": len(jobs), "resumed_files": len(resumed),
               "bytes_read": sum(j.in_bytes for _, j in todo),
               "bytes_written": sum(o.nbytes for _, j in todo for o in j.outputs), "seconds": seconds}
    return summary


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


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_summary(s):
    return (f"{s['mode']}: {s['tensors']:,} tensors in {s['files']} files "
            f"({s['resumed_files']} already done) from {s['input_tensors']:,} input tensors; "
            f"read {_human(s['bytes_read'])}, wrote {_human(s['bytes_written'])} in {s['seconds']:.1f} s "
            f"({_human(s['bytes_read'] / max(s['seconds'], 1e-9))}/s read)")


# ----------------------------------------------------------------------------- loading into the model
def load_ms_checkpoint(model, folder, strict=True):
    """Loads a MindSpore-layout folder written by hf-to-ms into `model` with stock MindSpore
    (`ms.load_checkpoint(format="safetensors")`, `ms.load_param_into_net`); returns the number of
    parameters loaded. Raises CheckpointError for missing, unexpected or mis-shaped parameters."""
    import mindspore as ms
    folder = os.fspath(folder)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError("no *.safetensors files in folder", folder)
    values, where = {}, {}
    for f in files:
        SafetensorsFile(os.path.join(folder, f)).close()  # validates the header first
        for name, value in ms.load_checkpoint(os.path.join(folder, f), format="safetensors").items():
            values[name], where[name] = value, f
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    table = {e.ms: None for e in names.expand(model.config, include_mtp)}  # ordered set
    missing = [n for n in table if n not in values]
    if missing:
        raise CheckpointError(f"{len(missing)} parameter(s) missing: {_listing(missing)}", folder, missing[0])
    unexpected = sorted(n for n in values if n not in params or n not in table)
    if unexpected and strict:
        raise CheckpointError(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}",
                              os.path.join(folder, where[unexpected[0]]), unexpected[0])
    for n in table:
        if tuple(values[n].shape) != tuple(params[n].shape):
            raise CheckpointError(f"shape {tuple(values[n].shape)} does not match model parameter of shape "
                                  f"{tuple(params[n].shape)}", os.path.join(folder, where[n]), n)
        if values[n].dtype != params[n].dtype:
            values[n] = ms.Parameter(values[n].astype(params[n].dtype), name=n)
    ms.load_param_into_net(model, {n: values[n] for n in table}, strict_load=True)
    return len(table)
