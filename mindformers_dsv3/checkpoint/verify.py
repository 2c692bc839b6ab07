"""`dsv3-convert check`: a converted folder against its manifest (sizes, sha256, tensors, indices)."""
import hashlib
import json
import os
import re

from .convert_plan import _NAME_OF, _listing
from .errors import CheckpointError
from .ranks import rank_folders
from .safetensors_io import INDEX_NAME, SafetensorsFile, open_checkpoint

MANIFEST_NAME = "dsv3-convert.manifest.json"
MANIFEST_FORMAT = "dsv3-convert manifest 1"
_TMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # safetensors_io._atomic_write's temporary names


def _file_record(path):
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            sha.update(block)
    return {"size": os.path.getsize(path), "sha256": sha.hexdigest()}


def check(folder):
    """Verifies a folder against its manifest (names, shapes, dtypes, sizes, sha256) and index.
    Without a manifest, checks the index and every header (structure only). Returns a summary dict;
    raises CheckpointError listing every problem."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        with open_checkpoint(folder) as ckpt:
            return {"files": len(ckpt.files), "tensors": len(ckpt), "verified": "structure (no manifest)"}
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        listed = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable manifest: {exc}", path) from None
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
        got = _file_record(fpath)
        if got["size"] != rec["size"]:
            problems.append((fpath, f"size {got['size']} != {rec['size']} in the manifest"))
        elif got["sha256"] != rec["sha256"]:
            problems.append((fpath, "sha256 differs from the manifest: the file changed or is corrupt"))
        if "tensors" in rec and got["size"] == rec["size"]:
            try:
                with SafetensorsFile(fpath) as f:
                    found = {n: {"dtype": _NAME_OF[f.dtype(n)], "shape": list(f.shape(n))} for n in f.keys()}
            except CheckpointError as exc:
                problems.append((fpath, exc.reason))
                continue
            if found != rec["tensors"]:
                bad = [n for n in set(found) | set(rec["tensors"]) if found.get(n) != rec["tensors"].get(n)]
                problems.append((fpath, f"tensors differ from the manifest: {_listing(bad)}"))
            tensors += len(found)
    for name in sorted(n for n in listed if os.path.basename(n) == INDEX_NAME):  # each folder's index
        index, rel = os.path.join(folder, name), os.path.dirname(name)
        if problems or not os.path.isfile(index):
            continue
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        want = {t: os.path.basename(f) for f, r in listed.items() if os.path.dirname(f) == rel
                for t in r.get("tensors", {})}
        if weight_map != want:
            problems.append((index, "weight_map does not match the manifest"))
    if problems:
        lines = "; ".join(f"{p}: {why}" for p, why in problems[:10])
        raise CheckpointError(f"{len(problems)} problem(s): {lines}", problems[0][0])
    return {"files": len(listed), "tensors": tensors, "verified": "sha256"}
