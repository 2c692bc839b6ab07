"""Shared test set-up: MindSpore graph mode on the CPU, fp32, one context per session."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# MindSpore and torch each bring an OpenMP runtime whose idle threads spin; on 2 cores they starve
# each other (a tiny torch step 0.06 s -> 6.9 s) unless waiting threads sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GLOG_v", "3")          # MindSpore: errors only
os.environ.setdefault("MS_ALLOC_CONF", "enable_vmm:False")


@pytest.fixture(scope="session", autouse=True)
def mindspore_cpu_graph_mode():
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)
    yield


@pytest.fixture(autouse=True, scope="module")
def fresh_run_mode():
    """Stock MindFormers records the run mode in os.environ["RUN_MODE"]; after a predict, a later
    Trainer.train in the same process skips its global-batch set-up (MFLossMonitor then fails).
    Each test module starts without it."""
    saved = os.environ.pop("RUN_MODE", None)
    yield
    os.environ.pop("RUN_MODE", None)
    if saved is not None:
        os.environ["RUN_MODE"] = saved


# msrun on 2 shared cores: a worker busy compiling can miss the scheduler's heartbeats for
# longer than MindSpore's default node timeout; give the cluster minutes, not seconds.
MSRUN_ENV = {"MS_NODE_TIMEOUT": "900", "MS_TOPO_TIMEOUT": "900"}


def free_port():
    """A free TCP port on loopback for msrun's scheduler."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun_env(**extra):
    """Environment for an msrun child: the venv's bin first on PATH, generous cluster timeouts."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    for key, value in MSRUN_ENV.items():
        env.setdefault(key, value)
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- the wheel, installed alone
@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """Built from a copy of what the wheel is made of: setuptools' in-tree build/ folder of the checkout
    (shared with other runs) could carry stale modules into it."""
    out, tree = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("tree")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    for name in ("mindformers_dsv3", "register", "configs"):
        shutil.copytree(os.path.join(ROOT, name), tree / name, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(tree)], check=True, capture_output=True, timeout=600)
    (path,) = out.glob("mindformers_dsv3-*.whl")
    return path


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory):
    """(python of a fresh venv holding only the wheel, an empty work folder outside the checkout, env)."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w", encoding="utf-8") as fh:
        fh.write(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", purelib,
                    str(wheel)], check=True, capture_output=True, timeout=600)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REGISTER_PATH")}
    env["XDG_CACHE_HOME"] = str(root / "cache")   # a fresh kernel cache: the build runs from the installed .cc
    return python, work, env


_EXIT_STATUS = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without running C++ static destructors.

    pyarrow (imported by MindFormers through `datasets`) aborts in its function-registry
    destructor at exit once torch and MindSpore have both run in the process
    ("corrupted size vs. prev_size"), turning a green run into exit code 134. Every
    report has been written by now; flush and exit with pytest's own status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS["code"])
