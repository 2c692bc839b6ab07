"""Data parallel over msrun on the CPU: two workers equal one process with the same global batch.

``tests/dist/dp_train.py`` finetunes configs/tiny/finetune_deepseek3_tiny.yaml through stock Trainer:
once under ``msrun --worker_num=2 --local_worker_num=2`` with ``use_parallel: True``,
``parallel_mode: 0`` (data parallel), ``data_parallel: 2`` and 2 sequences per rank, and once as a
single process with 4 sequences per step (the same samples: rank r reads samples r, r + 2, ...). Both
start from the same seeded random weights. After N steps:

* the mean of the two ranks' losses equals the single process's loss at every step (fp32, 1e-5);
* every weight, optimizer moment and routing bias equals the single process's (1e-5): gradients are
  averaged over ranks by the train-step wrapper and expert loads are all-reduced before the bias update;
* both ranks hold bit-identical weights.

The monitoring buffers ``last_losses`` and ``expert_load`` hold each rank's own batch and are not compared.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import free_port, msrun_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist", "dp_train.py")
STEPS, GLOBAL_BATCH = 6, 4
PER_RANK_BUFFERS = ("last_losses", "expert_load")
TIMEOUT = 900


def _env():
    env = msrun_env(GLOG_v="3")
    env.pop("REGISTER_PATH", None)
    return env


def _tail(path, n=3000):
    if not os.path.isfile(path):
        return f"({path} missing)"
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the msrun job and the single-process reference side by side; wait for both."""
    out = tmp_path_factory.mktemp("msrun")
    env = _env()
    msrun = shutil.which("msrun", path=env["PATH"])
    if msrun is None:
        pytest.skip("msrun (installed with mindspore) is not on PATH")
    common = ["--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH)]
    dp_cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
              f"--log_dir={out / 'msrun_log'}", WORKER, "--out", str(out / "dp"), "--data-parallel", "2", *common]
    single_cmd = [sys.executable, WORKER, "--out", str(out / "single"), *common]
    with open(out / "msrun.out", "w") as dp_log, open(out / "single.out", "w") as single_log:
        dp = subprocess.Popen(dp_cmd, cwd=out, env=env, stdout=dp_log, stderr=subprocess.STDOUT)
        single = subprocess.Popen(single_cmd, cwd=out, env=env, stdout=single_log, stderr=subprocess.STDOUT)
        try:
            single_rc, dp_rc = single.wait(timeout=TIMEOUT), dp.wait(timeout=TIMEOUT)
        finally:
            for proc in (dp, single):
                if proc.poll() is None:
                    proc.kill()
    assert single_rc == 0, f"single process rc={single_rc}\n{_tail(out / 'single.out')}"
    logs = "\n".join(f"--- {name}\n{_tail(out / 'msrun_log' / name)}"
                     for name in ("scheduler.log", "worker_0.log", "worker_1.log"))
    assert dp_rc == 0, f"msrun rc={dp_rc}\n{_tail(out / 'msrun.out')}\n{logs}"
    return out


def _history(run_dir, rank):
    with open(os.path.join(run_dir, "output", f"moe_history_rank_{rank}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _weights(run_dir, rank):
    folder = os.path.join(run_dir, "output", "checkpoint", f"rank_{rank}")
    files = [f for f in os.listdir(folder) if f.endswith(f"_{STEPS}.safetensors")]
    assert len(files) == 1, os.listdir(folder)
    state = load_file(os.path.join(folder, files[0]))
    return {k: v for k, v in state.items() if v.dtype.kind == "f" and not k.endswith(PER_RANK_BUFFERS)}


def test_losses_equal_single_process(runs):
    single = _history(runs / "single", 0)
    rank0, rank1 = _history(runs / "dp", 0), _history(runs / "dp", 1)
    assert [r["global_step"] for r in single] == list(range(1, STEPS + 1))
    assert [r["global_step"] for r in rank0] == [r["global_step"] for r in rank1] == list(range(1, STEPS + 1))
    for ref, a, b in zip(single, rank0, rank1):
        assert a["loss"] != b["loss"]  # each rank's own half of the batch
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
            assert (a[key] + b[key]) / 2 == pytest.approx(ref[key], abs=1e-5, rel=1e-5), (ref["global_step"], key)


def test_weights_equal_single_process(runs):
    single, dp = _weights(runs / "single", 0), _weights(runs / "dp", 0)
    assert set(single) == set(dp)
    assert any(k.startswith("adam_m.") for k in single)  # optimizer moments are compared too
    for name, value in single.items():
        np.testing.assert_allclose(dp[name], value, atol=1e-5, rtol=0, err_msg=name)
    biases = [k for k in single if k.endswith("e_score_correction_bias")]
    assert len(biases) == 4 and all(np.abs(single[k]).max() > 0 for k in biases)  # the bias update ran


def test_ranks_hold_identical_weights(runs):
    rank0, rank1 = _weights(runs / "dp", 0), _weights(runs / "dp", 1)
    assert set(rank0) == set(rank1)
    for name, value in rank0.items():
        np.testing.assert_array_equal(rank1[name], value, err_msg=name)
