"""`dsv3-convert check`: a converted folder against its manifest (sizes, sha256, tensors, indices); the
output folder of a run: refused when unsafe, locked, and what a resumed run keeps (by sha256)."""
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from .errors import CheckpointError, listing
from .fsguard import LOCK_NAME, OutputLock, open_regular, read_json
from .ranks import rank_folders
from .safetensors_io import DTYPE_NAMES, INDEX_NAME, SafetensorsFile, open_checkpoint

MANIFEST_NAME = "dsv3-convert.manifest.json"
MANIFEST_FORMAT = "dsv3-convert manifest 1"
_TMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # fsguard.atomic_write's temporary names


def file_record(path):
    """{size, sha256} of a file (its manifest record)."""
    sha = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            sha.update(block)
        return {"size": os.fstat(fh.fileno()).st_size, "sha256": sha.hexdigest()}


# ----------------------------------------------------------------------------- the output folder of a run
def lock_output(src, dst):
    """Refuses an output folder that is the input folder or inside it, or a path that is not a folder;
    creates the folder and returns its OutputLock, taken (a second run into it is refused)."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
        raise CheckpointError("the output folder is the input folder or inside it; choose another", dst)
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError("the output path exists and is not a folder", dst)
    try:
        os.makedirs(dst, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the output folder: {exc.strerror}", dst) from None
    return OutputLock(dst).acquire()


def remove_temporary(dst):
    """Removes the temporary files a stopped run left in `dst` and its rank folders (hold the lock)."""
    for folder in [dst] + list(rank_folders(dst).values()):
        for name in os.listdir(folder):
            if _TMP.match(name):
                os.unlink(os.path.join(folder, name))


def resume_state(dst, job_id, workers=1):
    """In a locked output folder: the manifest records of the finished files a rerun keeps, each
    verified by its sha256 (a file that changed is written again); temporary files are removed. A
    folder holding another conversion, or files that are not ours, is refused."""
    manifest_path = os.path.join(dst, MANIFEST_NAME)
    if not os.path.lexists(manifest_path):
        if any(not _TMP.match(n) and n != LOCK_NAME for n in os.listdir(dst)):
            raise CheckpointError("the output folder is not empty and holds no dsv3-convert manifest; "
                                  "choose an empty folder", dst)
        remove_temporary(dst)  # of a run killed before its manifest
        return {}
    try:
        with os.fdopen(open_regular(manifest_path), encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = dict(manifest["files"]) if manifest.get("job") == job_id else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError) as exc:
        raise CheckpointError(f"unreadable manifest ({exc}); choose an empty folder", manifest_path) from None
    if files is None:
        raise CheckpointError("the output folder holds a different conversion (mode, options or input "
                              "differ); choose an empty folder", dst)
    remove_temporary(dst)
    sized = {f: r for f, r in files.items() if os.path.isfile(os.path.join(dst, f))
             and os.path.getsize(os.path.join(dst, f)) == r["size"]}
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib and reads release the GIL
        got = dict(zip(sized, pool.map(lambda f: file_record(os.path.join(dst, f))["sha256"], sized)))
    return {f: r for f, r in sized.items() if got[f] == r["sha256"]}


def check(folder):
    """Verifies a folder against its manifest (names, shapes, dtypes, sizes, sha256) and index.
    Without a manifest, checks the index and every header (structure only). Returns a summary dict;
    raises CheckpointError listing every problem."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        with open_checkpoint(folder) as ckpt:
            return {"files": len(ckpt.files), "tensors": len(ckpt), "verified": "structure (no manifest)"}
    manifest = read_json(path, None, "the manifest")  # a regular file only: a FIFO is refused, not waited on
    try:
        listed = dict(manifest["files"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"unreadable manifest: {exc!r}", path) from None
    problems, tensors = [], 0
    if not manifest.get("complete"):
        problems.append((folder, "conversion not finished: rerun the same command to resume"))
    folders = {"": folder, **{os.path.relpath(p, folder): p for p in rank_folders(folder).values()}}
    for rel, path in folders.items():
        problems += [(os.path.join(path, n), "temporary file of an unfinished write") for n in os.listdir(path)
                     if _TMP.match(n)]
        problems += [(os.path.join(path, n), "safetensors file not in the manifest") for n in sorted(os.listdir(path))
                     if n.endswith(".safetensors") and os.path.join(rel, n) not in listed]
    for name, rec in sorted(listed.items()):
        fpath = os.path.join(folder, name)
        if not os.path.isfile(fpath):
            problems.append((fpath, "missing"))
            continue
        got = file_record(fpath)
        if got["size"] != rec["size"]:
            problems.append((fpath, f"size {got['size']} != {rec['size']} in the manifest"))
        elif got["sha256"] != rec["sha256"]:
            problems.append((fpath, "sha256 differs from the manifest: the file changed or is corrupt"))
        if "tensors" in rec and got["size"] == rec["size"]:
            try:
                with SafetensorsFile(fpath) as f:
                    found = {n: {"dtype": DTYPE_NAMES[f.dtype(n)], "shape": list(f.shape(n))} for n in f.keys()}
            except CheckpointError as exc:
                problems.append((fpath, exc.reason))
                continue
            if found != rec["tensors"]:
                bad = [n for n in set(found) | set(rec["tensors"]) if found.get(n) != rec["tensors"].get(n)]
                problems.append((fpath, f"tensors differ from the manifest: {listing(bad)}"))
            tensors += len(found)
    for name in sorted(n for n in listed if os.path.basename(n) == INDEX_NAME):  # each folder's index
        index, rel = os.path.join(folder, name), os.path.dirname(name)
        if problems or not os.path.isfile(index):
            continue
        weight_map = read_json(index, None, "the index").get("weight_map", {})
        want = {t: os.path.basename(f) for f, r in listed.items() if os.path.dirname(f) == rel
                for t in r.get("tensors", {})}
        if weight_map != want:
            problems.append((index, "weight_map does not match the manifest"))
    if problems:
        lines = "; ".join(f"{p}: {why}" for p, why in problems[:10])
        raise CheckpointError(f"{len(problems)} problem(s): {lines}", problems[0][0])
    return {"files": len(listed), "tensors": tensors, "verified": "sha256"}
