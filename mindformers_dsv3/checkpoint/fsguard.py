"""File-system guards of the checkpoint tools: what may be read, how files are opened, who writes.

* Confinement: a file of a checkpoint folder is read only when its real path (every symlink resolved)
  lies inside the folder's real path, or, for a folder laid out as a HuggingFace cache snapshot
  (`<repo>/snapshots/<rev>/`), inside that repository's `<repo>/blobs/`, where the cache's symlinks
  (`<file> -> ../../blobs/<hash>`) point. Anything else is refused, naming the link.
* Atomic writes: a temporary file in the same folder, fsynced, then renamed over the target.
* Regular files only: files are opened non-blocking and checked with fstat before the first read, so a
  FIFO, a device or a folder named like a checkpoint file is refused at once instead of hanging.
* The output lock: one `dsv3-convert` at a time per output folder (`flock` on a lock file there; the
  kernel drops the lock when its holder dies, so a stale lock never blocks).
* Workers die with their parent (PR_SET_PDEATHSIG on Linux, and a parent-pid watchdog everywhere).
"""
import json
import os
import secrets
import signal
import socket
import stat
import sys
import threading
import time

from .errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the output folder is not locked there
    fcntl = None

LOCK_NAME = ".dsv3-convert.lock"
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


# ----------------------------------------------------------------------------- confinement
def input_roots(folder):
    """The real folders a checkpoint folder's files may resolve into (see the module docstring)."""
    real = os.path.realpath(folder)
    roots = [real]
    snapshots = os.path.dirname(real)
    if os.path.basename(snapshots) == "snapshots":  # HuggingFace cache: <repo>/snapshots/<rev>
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return tuple(roots)


def _inside(real, roots):
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def confine(path, roots):
    """The real path of `path`, which must resolve inside one of `roots`; else CheckpointError naming it."""
    real = os.path.realpath(path)
    if not _inside(real, roots):
        raise CheckpointError(f"resolves outside the checkpoint folder (to {real}): refused; only files inside "
                              "the folder (or, in a HuggingFace cache snapshot, its ../../blobs/) are read", path)
    return real


# ----------------------------------------------------------------------------- opening
def _kind(mode):
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path, roots=None):
    """A read-only descriptor of the regular file `path` (confined to `roots` when given).

    Opened with O_NONBLOCK, so a FIFO never blocks, then checked with fstat: anything but a regular file
    raises CheckpointError. With `roots`, the opened file's own path (/proc/self/fd on Linux) is checked
    again, so a link swapped after the first check is caught too."""
    path = os.fspath(path)
    if roots is not None:
        confine(path, roots)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot open: {exc.strerror}", path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"is {_kind(mode)}, not a regular file: refused", path)
        if roots is not None and os.path.isdir("/proc/self/fd"):
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                opened = None
            if opened is not None and opened.startswith(os.sep) and not _inside(opened, roots):
                raise CheckpointError(f"resolves outside the checkpoint folder (to {opened}): refused", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_text(path, roots=None, limit=256 << 20):
    """The UTF-8 text of a small regular file (see open_regular)."""
    fd = open_regular(path, roots)
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise CheckpointError(f"cannot read: {exc.strerror}", path) from None
    if len(data) > limit:
        raise CheckpointError(f"larger than {limit} bytes: not a config or index file", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"not UTF-8 text: {exc}", path) from None


def read_json(path, roots=None, what="file"):
    """A JSON object from a small regular file; CheckpointError naming the file for anything else."""
    text = read_text(path, roots)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"cannot read {what}: not valid JSON: {exc}", path) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"cannot read {what}: a JSON {type(value).__name__}, not an object", path)
    return value


# ----------------------------------------------------------------------------- writing
def atomic_write(path, fill, defer=False):
    """Writes through a temporary file in the same folder, fsyncs, then renames.

    With ``defer``, returns after ``fill`` and a flush: the caller runs the returned function to fsync
    and rename (e.g. in another thread, while it writes the next file); until then only the temporary
    file exists, and a failure in either step removes it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)  # the umask applies, as for a plain open()
    fh = os.fdopen(fd, "wb")

    def abort():
        try:
            fh.close()
        except OSError:
            pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass

    try:
        fill(fh)
        fh.flush()
    except BaseException:
        abort()
        raise

    def finish():
        try:
            os.fsync(fh.fileno())
            fh.close()
            os.replace(tmp, path)
        except BaseException:
            abort()
            raise
        try:  # make the rename itself durable; not possible everywhere
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    if defer:
        return finish
    finish()
    return None


# ----------------------------------------------------------------------------- the output lock
class OutputLock:
    """An exclusive, non-blocking `flock` on `folder/.dsv3-convert.lock`, holding the holder's pid and
    host. A second holder is refused with the first one's pid and host; the kernel releases the lock
    when the holder dies (also by `kill -9`), so a lock file left behind never blocks."""

    def __init__(self, folder):
        self.folder, self.path, self.fd = os.fspath(folder), os.path.join(os.fspath(folder), LOCK_NAME), None

    def acquire(self):
        if fcntl is None:
            return self
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise CheckpointError(f"cannot create the lock file: {exc.strerror}", self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise CheckpointError(f"the output folder is in use by another dsv3-convert ({holder}); "
                                      "wait for it to finish, or stop it and rerun", self.folder) from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder removed after we opened it
                info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
                self.fd = fd
                return self
            os.close(fd)
        raise CheckpointError("cannot take the lock: its file keeps being replaced", self.path)

    def release(self):
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.unlink(self.path)  # while holding it: a waiter re-checks the inode (acquire)
            except OSError:
                pass
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _holder(fd):
    for _ in range(20):  # the holder writes its record right after taking the lock
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
        time.sleep(0.05)
    return "holder unknown"


# ----------------------------------------------------------------------------- worker processes
def die_with_parent(parent_pid, interval=0.5):
    """Makes this (worker) process exit when `parent_pid` is no longer its parent: the kernel kills it
    with SIGKILL on Linux (PR_SET_PDEATHSIG), and a watchdog thread exits it everywhere else."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, name="dsv3-parent-watch", daemon=True).start()
