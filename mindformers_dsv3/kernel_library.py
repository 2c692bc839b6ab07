"""The CPU kernel library: build of ``csrc/dsv3_cpu.cc``, and where a built copy may be loaded from.

The library is compiled on first use into a cache folder and loaded by `ctypes` and by MindSpore's
`ops.Custom(func_type="aot")`. Loading a shared library runs its code, so a cached copy is used
only from a folder that is not a symbolic link, is owned by the current user and is not writable
by group or others, and only if the file itself passes the same checks; otherwise the library is
built afresh into a private `tempfile.mkdtemp()` folder.
"""
import atexit
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile

import mindspore as ms

logger = logging.getLogger(__name__)

__all__ = ["cpu_kernel_library"]

# CPU: a small C++ library (compiled on first use with the system g++, linked against the oneDNN
# that ships inside MindSpore) run as `ops.Custom(func_type="aot")` kernels. They get pointers to
# MindSpore's own buffers: no copy of the expert weights or activations per call, and the output is
# written in place. A `pyfunc` kernel would get a copy of every input (all expert weights, each call)
# and its result is copied back. oneDNN's sgemm is also 2-3x faster than numpy's OpenBLAS on the
# few-row matmuls of small groups. Without a compiler the numpy (pyfunc) kernels are used.
# The source is the package data file csrc/dsv3_cpu.cc.
_SOURCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "dsv3_cpu.cc")


def _cpu_source():
    """The C++ source shipped as package data (mindformers_dsv3/csrc/dsv3_cpu.cc), as bytes."""
    with open(_SOURCE_FILE, "rb") as f:
        return f.read()


def _cpu_threads():
    try:
        threads = int(ms.get_context("runtime_num_threads") or 0)
    except Exception:  # pragma: no cover
        threads = 0
    return max(1, min(threads or os.cpu_count() or 1, os.cpu_count() or 1))


_CPU_LIBRARY = {}


def cpu_kernel_library():
    """Path of the compiled CPU kernel library (built once per source and MindSpore install, cached
    under $XDG_CACHE_HOME/mindformers_dsv3/kernels or ~/.cache/..., else under
    $TMPDIR/mindformers_dsv3-<uid>, each only where private to this user), or None when it cannot
    be built here."""
    if "path" in _CPU_LIBRARY:
        return _CPU_LIBRARY["path"]
    path = None
    try:
        path = _build_cpu_library()
        ctypes.CDLL(path).dsv3_set_threads(_cpu_threads())
    except Exception as err:  # no compiler, no oneDNN in this MindSpore build, read-only disk ...
        logger.warning("mindformers_dsv3: CPU grouped-matmul kernels unavailable (%s); using numpy "
                       "host kernels (slower).", err)
        path = None
    _CPU_LIBRARY["path"] = path
    return path


def untrusted(path, folder):
    """Why `path` (a folder if `folder`, else a regular file) must not be loaded from, or None:
    it must not be a symbolic link, must be owned by this user and not writable by group or others."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not (stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)):
        return "is not a " + ("folder" if folder else "regular file")
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _untrusted_ancestor(folder):
    """Why a folder above `folder` would let another user swap it, or None: each must be owned by this
    user or root, and be writable by group or others only with the sticky bit (as /tmp)."""
    path = os.path.dirname(os.path.realpath(folder))
    while True:
        info = os.lstat(path)
        if info.st_uid not in (0, os.getuid()):
            return f"is inside {path}, owned by uid {info.st_uid}"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            return f"is inside {path}, writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _cache_folder():
    """The first kernel cache folder that can be created and is private to this user, or None."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in (os.path.join(cache, "mindformers_dsv3", "kernels"),
                   os.path.join(tempfile.gettempdir(), f"mindformers_dsv3-{os.getuid()}")):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            why = untrusted(folder, folder=True) or _untrusted_ancestor(folder)
        except OSError:
            continue
        if why is None:
            return folder
        logger.warning("mindformers_dsv3: kernel cache folder %s %s: not used (make it private to "
                       "this user, e.g. chmod 700, to cache the build)", folder, why)
    return None


def _private_folder():
    folder = tempfile.mkdtemp(prefix="mindformers_dsv3-kernels-")   # mode 0700, owned by this user
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _mindspore_lib():
    return os.path.join(os.path.dirname(os.path.abspath(ms.__file__)), "lib")


def library_name(source=None):
    """File name of the library for this source and MindSpore install (its cache key)."""
    source = _cpu_source() if source is None else source
    digest = hashlib.sha256(source + (_mindspore_lib() + ms.__version__).encode()).hexdigest()[:16]
    return f"dsv3_cpu_{digest}.so"


def _build_cpu_library():
    ms_lib = _mindspore_lib()
    if not os.path.exists(os.path.join(ms_lib, "libdnnl.so.2")):
        raise FileNotFoundError(f"no libdnnl.so.2 in {ms_lib}")
    code = _cpu_source()   # read once: the bytes compiled are the bytes named by the cache key
    folder = _cache_folder() or _private_folder()
    target = os.path.join(folder, library_name(code))
    if os.path.lexists(target):
        why = untrusted(target, folder=False)
        if why is None:
            return target
        logger.warning("mindformers_dsv3: cached kernel library %s %s: rebuilt", target, why)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:   # concurrent builders: atomic rename
        source = os.path.join(tmp, "dsv3_cpu.cc")
        with open(source, "wb") as f:
            f.write(code)
        built = os.path.join(tmp, "dsv3_cpu.so")
        cmd = [os.environ.get("CXX", "g++"), "-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread", "-o", built,
               source, f"-L{ms_lib}", "-l:libdnnl.so.2", f"-Wl,-rpath,{ms_lib}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.chmod(built, 0o755)   # not group-writable whatever the umask: the check above accepts it
        os.replace(built, target)
    return target
