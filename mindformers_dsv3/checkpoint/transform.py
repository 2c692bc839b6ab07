"""The dsv3-convert engine: HF <-> MindSpore checkpoints in one streaming, parallel, resumable pass.

A conversion is a *plan* (convert_plan.py) built from the name table (`names.py`) and the config: output files, each an
ordered list of *steps* (one table entry, or one tensor for fp8-to-bf16) that yield the file's output
tensors. A worker writes a file tensor by tensor, the data streamed in row chunks or expert by expert
(FP8 dequantized on the way), under a temporary name, fsynced, then renamed. The parent records each
finished file (size, sha256, tensors) in the manifest, then writes the index and config.json. Nothing
depends on timing or on the number of workers: the output is byte-identical for every `--workers` and
after a resume. Every check on the input runs before the first byte is written.
"""
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace

import numpy as np

from . import fsguard, names, streaming
from .convert_plan import plan_run
from .ranks import layout_record
from .verify import (MANIFEST_FORMAT, MANIFEST_NAME, check, file_record,  # noqa: F401  (API: transform.check)
                     lock_output, remove_temporary, resume_state)
from .errors import CheckpointError
from .safetensors_io import DTYPES, INDEX_NAME, PICKLE_SUFFIXES, open_checkpoint, write_index

AUX_MAX_BYTES = 64 * 1024 * 1024  # small top-level files (tokenizer, generation config) are copied
OUT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "keep": None}


# ----------------------------------------------------------------------------- reading
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

    try:
        finish = fsguard.atomic_write(path, fill, defer=defer)
    except OSError as exc:  # a full disk, `ulimit -f` (EFBIG), a read-only folder
        raise CheckpointError(f"cannot write: {exc.strerror or exc}", path) from None
    record = {**result, "tensors": {o.name: {"dtype": o.dtype, "shape": list(o.shape)} for o in job.outputs}}
    if defer:
        return record, lambda: _finish(finish, path)
    return record


def _finish(finish, path):
    try:
        finish()
    except OSError as exc:
        raise CheckpointError(f"cannot write: {exc.strerror or exc}", path) from None


class _Shapes:
    def __init__(self, ckpt):
        self.ckpt = ckpt

    def __getitem__(self, name):
        return self.ckpt.shape(name)


def _write_step(out, step, src, config, path, kill):
    if step.kind == "to_ms":  # the fast path: streaming.write_output
        o, = step.outputs
        n = streaming.write_output(out, src, step.entry, _Shapes(src.ckpt), config, DTYPES[o.dtype],
                                   getattr(step, "slices", None))
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


def _worker_init(src_dir, block, config, counter, parent):
    fsguard.die_with_parent(parent)  # kill -9 of the parent: no worker goes on writing or waiting
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent handles it
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while spawning
    _WORKER.update(src_dir=src_dir, block=block, config=config, counter=counter)


def _worker_run(out_dir, job, kill):
    w = _WORKER
    if "ckpt" not in w:
        w["ckpt"] = open_checkpoint(w["src_dir"])

    def progress(n):
        with w["counter"].get_lock():
            w["counter"].value += n
    return write_job(out_dir, job, streaming.Source(w["ckpt"], w["block"], progress), w["config"], kill)


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT held back (not lost) while workers are spawned: they start with it blocked, so a Ctrl-C
    then cannot interrupt their start-up; the parent gets it when this ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_workers(pool):
    """Ends the pool's worker processes now (their half-written files stay temporary files)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public API before Python 3.14
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(10)


def _run_serial(jobs, src_dir, out_dir, block, config, record, bar, kill_at):
    """One process; fsync and rename of a file overlap with writing the next one."""
    with open_checkpoint(src_dir) as ckpt, ThreadPoolExecutor(1) as finisher:
        src, previous = streaming.Source(ckpt, block, bar.update), None
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


def _run_jobs(jobs, src_dir, out_dir, block, config, workers, record, bar, kill_at):
    """Runs `jobs` [(plan index, Job)], calling record(job, result) as each file is finished. When
    interrupted (Ctrl-C, an error), the workers are ended and every file reported finished is recorded."""
    if workers <= 1 or len(jobs) <= 1:
        return _run_serial(jobs, src_dir, out_dir, block, config, record, bar, kill_at)
    ctx = mp.get_context("spawn")  # never fork a process that may hold MindSpore threads
    counter, seen, pending = ctx.Value("Q", 0), 0, {}
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init,
                               initargs=(src_dir, block, config, counter, os.getpid()))
    try:
        # largest files first: the last file started is a small one, so workers finish together
        order = sorted(jobs, key=lambda item: (-item[1].in_bytes, item[0]))
        with _sigint_blocked():
            pending = {pool.submit(_worker_run, out_dir, job, index == kill_at): job for index, job in order}
        while pending:
            finished, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            bar.update(counter.value - seen)
            seen = counter.value
            for fut in finished:
                job = pending.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    raise CheckpointError("a worker process died (killed, or out of memory); rerun the same "
                                          "command to resume", out_dir) from None
                record(job, result)
    except BaseException:
        _stop_workers(pool)
        for fut, job in pending.items():  # finished before the stop, not yet recorded
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                record(job, fut.result())
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- manifest and folders
def _json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _write_json(path, obj):
    fsguard.atomic_write(path, lambda fh: fh.write(_json_bytes(obj)))


def _aux_files(src):
    """The small top-level files to copy (tokenizer, generation config): regular files (symlinks
    followed) that resolve inside the input folder (fsguard.input_roots); a link out of it is refused."""
    skip, roots, out = {"config.json", INDEX_NAME, MANIFEST_NAME}, fsguard.input_roots(src), []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (name in skip or name.startswith(".") or name.endswith(".safetensors")
                or name.lower().endswith(PICKLE_SUFFIXES) or not os.path.isfile(path)
                or os.path.getsize(path) > AUX_MAX_BYTES):
            continue
        fsguard.confine(path, roots)
        out.append(name)
    return out


def _copy_aux(src, dst, name):
    with os.fdopen(fsguard.open_regular(os.path.join(src, name), fsguard.input_roots(src)), "rb") as fh:
        fsguard.atomic_write(os.path.join(dst, name), lambda out: shutil.copyfileobj(fh, out))


def convert(mode, src, dst, dtype=None, include_mtp=True, workers=1, config_path=None, progress=True,
            kill_at=None, layout=None, stop_at=None):
    """Runs one conversion ("hf-to-ms", "ms-to-hf" or "fp8-to-bf16"); returns a summary dict.

    `layout` (hf-to-ms only): a MindFormers YAML whose parallel_config gives the ranks; each rank's
    slices go to `dst/rank_<r>/` with its own index (ranks.py). Resumes a killed run in the same
    `dst`, keeping the finished files whose sha256 matches the manifest. Raises CheckpointError before
    writing anything when the input does not match its config, and when another run holds `dst`.
    `kill_at` / `stop_at` (tests): SIGKILL while writing file `kill_at`; SIGSTOP once `stop_at` files are done."""
    from tqdm import tqdm
    src, dst = os.fspath(src), os.fspath(dst)
    dtype = OUT_DTYPES[dtype or ("keep" if mode == "ms-to-hf" else "bf16")]
    p = plan_run(mode, src, dtype, include_mtp, config_path, layout)
    p.aux = p.job_id["aux"] = _aux_files(src)
    lock = lock_output(src, dst)
    try:
        files = resume_state(dst, p.job_id, workers)
        resumed = [j.file for j in p.jobs if j.file in files]
        manifest = {"manifest": MANIFEST_FORMAT, "job": p.job_id, "complete": False,
                    "files": dict(sorted(files.items()))}
        _write_json(os.path.join(dst, MANIFEST_NAME), manifest)  # first: a killed run always leaves one
        for folder in {os.path.dirname(j.file) for j in p.jobs} - {""}:
            os.makedirs(os.path.join(dst, folder), exist_ok=True)
        done_now = []

        def record(job, result):
            files[job.file] = result
            manifest["files"] = dict(sorted(files.items()))
            _write_json(os.path.join(dst, MANIFEST_NAME), manifest)
            done_now.append(job.file)
            if len(done_now) == stop_at:  # test hook: stop like Ctrl-Z with these files finished
                os.kill(os.getpid(), signal.SIGSTOP)

        todo = [(i, j) for i, j in enumerate(p.jobs) if j.file not in files]
        bar = tqdm(total=sum(j.in_bytes for _, j in todo), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=mode, disable=not progress, dynamic_ncols=True)
        try:
            with bar:
                worker_config = SimpleNamespace(**p.config.to_hf_dict())  # plain attributes: no MindSpore in workers
                _run_jobs(todo, src, dst, p.block, worker_config, workers, record, bar, kill_at)
            _finish_folder(src, dst, p, files, manifest)
        except BaseException:
            with contextlib.suppress(OSError):  # every writer has stopped: a rerun resumes from the manifest
                remove_temporary(dst)
            raise
    finally:
        lock.release()
    return {"mode": mode, "tensors": sum(len(j.outputs) for j in p.jobs), "input_tensors": p.in_tensors,
            "files": len(p.jobs), "resumed_files": len(resumed), "bytes_read": sum(j.in_bytes for _, j in todo),
            "bytes_written": sum(o.nbytes for _, j in todo for o in j.outputs), "seconds": time.time() - p.t0}


def _finish_folder(src, dst, p, files, manifest):
    """Index(es), config.json and the copied small files, then the manifest marked complete."""
    extra, jobs, per_rank = [INDEX_NAME, "config.json"], p.jobs, p.per_rank
    if per_rank is None:
        weight_map = {o.name: j.file for j in jobs for o in j.outputs}
        write_index(dst, weight_map, sum(o.nbytes for j in jobs for o in j.outputs))
    else:  # each rank folder: its index (with its place in the layout) and config.json
        for r, rank_jobs in per_rank.items():
            folder = os.path.dirname(rank_jobs[0].file) if rank_jobs else f"rank_{r}"
            weight_map = {o.name: os.path.basename(j.file) for j in rank_jobs for o in j.outputs}
            write_index(os.path.join(dst, folder), weight_map, sum(o.nbytes for j in rank_jobs for o in j.outputs),
                        metadata={"rank": r, **layout_record(p.par_layout)})
            _write_json(os.path.join(dst, folder, "config.json"), p.out_config)
            extra += [f"{folder}/{INDEX_NAME}", f"{folder}/config.json"]
    _write_json(os.path.join(dst, "config.json"), p.out_config)
    for name in p.aux:
        _copy_aux(src, dst, name)
    if per_rank is not None:
        extra.remove(INDEX_NAME)
    for name in extra + p.aux:
        files[name] = file_record(os.path.join(dst, name))
    manifest.update(complete=True, files=dict(sorted(files.items())))
    _write_json(os.path.join(dst, MANIFEST_NAME), manifest)


def format_summary(s):
    """The CLI's one-line summary of a convert() result, byte counts in units.format_bytes."""
    from mindformers_dsv3.units import format_bytes  # here: units imports config (MindSpore), which
    # the spawned workers, importing this module, must not load
    return (f"{s['mode']}: {s['tensors']:,} tensors in {s['files']} files "
            f"({s['resumed_files']} already done) from {s['input_tensors']:,} input tensors; "
            f"read {format_bytes(s['bytes_read'])}, wrote {format_bytes(s['bytes_written'])} in {s['seconds']:.1f} s "
            f"({format_bytes(int(s['bytes_read'] / max(s['seconds'], 1e-9)))}/s read)")


# ----------------------------------------------------------------------------- loading into the model
def load_ms_checkpoint(model, folder, strict=True):
    """Loads a MindSpore-layout folder written by hf-to-ms into `model` with stock MindSpore
    (`ms.load_checkpoint(format="safetensors")`, `ms.load_param_into_net`); returns the number of
    parameters loaded. Every header is checked first (open_checkpoint, then the loader's checks: missing,
    unexpected, dtype and shape against the model's parameters): CheckpointError naming file and tensor."""
    import mindspore as ms
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    table = list(dict.fromkeys(e.ms for e in names.expand(model.config, include_mtp)))
    with open_checkpoint(os.fspath(folder)) as ckpt:
        ckpt.check_names(table, strict=strict, what="parameter")
        for n in table:
            if n not in params:
                raise CheckpointError("no model parameter for this tensor; the name table and the model disagree",
                                      ckpt.file_of(n), n)
            names.check_tensor(n, ckpt.dtype(n), ckpt.shape(n), params[n].shape, file=ckpt.file_of(n))
        files = sorted({ckpt.file_of(n) for n in table})
    values = {}
    for path in files:
        values.update(ms.load_checkpoint(path, format="safetensors"))
    for n in table:
        if values[n].dtype != params[n].dtype:
            values[n] = ms.Parameter(values[n].astype(params[n].dtype), name=n)
    ms.load_param_into_net(model, {n: values[n] for n in table}, strict_load=True)
    return len(table)
