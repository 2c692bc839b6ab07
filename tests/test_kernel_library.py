"""The CPU kernel library is loaded only from a folder private to this user (issue 10 item 2).

A real shared library whose constructor records being loaded is planted under the cache name the
plugin would use; `cpu_kernel_library()` runs in a fresh subprocess (as a user's process would) and
must never load it when the folder or the file is a symbolic link, owned by another user, or
writable by group or others. The control case (a private folder and file of this user) shows that
the planted library is loaded when trusted, so the other cases can fail."""
import os
import shutil
import subprocess
import sys

import pytest

from mindformers_dsv3.kernel_library import library_name

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("g++") is None,
                                reason="needs gcc and g++")

_PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char *marker = getenv("DSV3_PLANTED_MARKER");
  FILE *f = marker ? fopen(marker, "a") : NULL;
  if (f) { fputs("loaded\n", f); fclose(f); }
}
void dsv3_set_threads(int n) { (void)n; }
"""

_PROBE = ("import os; from mindformers_dsv3.kernel_library import cpu_kernel_library as f; p = f(); "
          "print('RESULT', p, os.path.exists(p) if p else None)")
OTHER_UID = 54321


@pytest.fixture(scope="module")
def planted_so(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted.c").write_text(_PLANTED)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / "planted.so"), str(folder / "planted.c")],
                   check=True)
    return folder / "planted.so"


def _plant(planted_so, folder, mode=0o755):
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / library_name()
    shutil.copyfile(planted_so, target)
    os.chmod(target, mode)
    return target


def _probe(tmp_path, cache_home):
    marker = tmp_path / "marker"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home), TMPDIR=str(tmpdir), DSV3_PLANTED_MARKER=str(marker))
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    path, exists = line[len("RESULT "):].rsplit(" ", 1)
    return path, exists == "True", marker.exists(), done.stderr


def test_private_cache_is_used(tmp_path, planted_so):
    """Control: a library in a private folder of this user is the cache, and is loaded."""
    kernels = tmp_path / "cache" / "mindformers_dsv3" / "kernels"
    target = _plant(planted_so, kernels)
    os.chmod(kernels, 0o700)
    path, _, loaded, _ = _probe(tmp_path, tmp_path / "cache")
    assert path == str(target) and loaded


def test_folder_writable_by_others_is_not_loaded(tmp_path, planted_so):
    kernels = tmp_path / "cache" / "mindformers_dsv3" / "kernels"
    target = _plant(planted_so, kernels)
    os.chmod(kernels, 0o777)
    path, exists, loaded, err = _probe(tmp_path, tmp_path / "cache")
    assert not loaded and path != str(target) and exists
    assert "writable by group or others" in err and str(kernels) in err
    assert target.read_bytes() == planted_so.read_bytes()   # nothing built into the open folder


def test_private_folder_inside_a_folder_others_can_write_is_not_loaded(tmp_path, planted_so):
    """Others could rename the private folder away and put their own in its place."""
    kernels = tmp_path / "cache" / "mindformers_dsv3" / "kernels"
    target = _plant(planted_so, kernels)
    os.chmod(kernels, 0o700)
    os.chmod(kernels.parent, 0o777)
    path, exists, loaded, err = _probe(tmp_path, tmp_path / "cache")
    assert not loaded and path != str(target) and exists
    assert f"is inside {kernels.parent}, writable by group or others (mode 777)" in err


def test_tmp_fallback_folder_of_another_user_is_not_loaded(tmp_path, planted_so):
    """The issue's case: the cache folder cannot be made, so $TMPDIR/mindformers_dsv3-<uid> is tried,
    and another user made it first (a different owner, or a mode that lets others write)."""
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("")
    fallback = tmp_path / "tmp" / f"mindformers_dsv3-{os.getuid()}"
    target = _plant(planted_so, fallback)
    if os.getuid() == 0:
        os.chown(fallback, OTHER_UID, OTHER_UID)
        os.chown(target, OTHER_UID, OTHER_UID)
        os.chmod(fallback, 0o755)
    else:
        os.chmod(fallback, 0o777)
    path, exists, loaded, _ = _probe(tmp_path, not_a_folder)
    assert not loaded and exists and not path.startswith(str(fallback))
    assert os.path.dirname(path).startswith(str(tmp_path / "tmp" / "mindformers_dsv3-kernels-"))


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "other-owner"])
def test_untrusted_file_in_private_folder_is_rebuilt(tmp_path, planted_so, kind):
    kernels = tmp_path / "cache" / "mindformers_dsv3" / "kernels"
    kernels.mkdir(parents=True)
    os.chmod(kernels, 0o700)
    target = kernels / library_name()
    if kind == "symlink":
        os.symlink(planted_so, target)
    elif kind == "group-writable":
        _plant(planted_so, kernels, mode=0o775)
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        _plant(planted_so, kernels)
        os.chown(target, OTHER_UID, OTHER_UID)
    path, exists, loaded, _ = _probe(tmp_path, tmp_path / "cache")
    assert not loaded and path == str(target) and exists
    info = os.lstat(target)   # replaced by this user's own build, private
    assert not os.path.islink(target) and info.st_uid == os.getuid() and not info.st_mode & 0o022
    assert target.read_bytes() != planted_so.read_bytes()
