"""Shared test set-up: MindSpore graph mode on the CPU, fp32, one context per session."""
import os
import sys

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
