"""Shared helpers for the benchmarks: configs, random checkpoints, both models, timing, results.

Every benchmark builds one random HuggingFace DeepSeek-V3 folder (the real tensor names and layout,
written by ``tests/hf_fixtures.py``), loads it into our MindSpore model (graph mode, CPU, fp32) and
into transformers' ``DeepseekV3ForCausalLM`` (eager, CPU torch, fp32), so both run identical weights.

Public API::

    setup(threads, frameworks)                   MindSpore graph mode on CPU, torch threads, quiet logs
    tiny_config(total_len) / small_config(**kw)  HF config.json dicts
    Checkpoint(config, seed, std)                a temporary HF folder (.folder, .state, .close())
    build_ours(folder, **runtime)                our DeepseekV3ForCausalLM, weights loaded
    build_theirs(config, state)                  transformers' DeepseekV3ForCausalLM
    Worker("module.Class", *args)                one side of a benchmark in its own process
    time_calls(fn, repeats, warmup)              list of wall seconds
    summary(samples)                             {"median", "min", "max", "runs"}
    machine_info()                               date, cores, load, package versions
    write_results(name, payload, table)          bench/results/<name>.json + markdown on stdout
"""
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# DSV3_SRC=/path/to/a/checkout benchmarks that tree's mindformers_dsv3 and tests (A/B of a patch)
SRC = os.path.abspath(os.environ.get("DSV3_SRC") or ROOT)
for _path in dict.fromkeys([ROOT, SRC]):   # SRC ends up first
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

# Each framework keeps its own thread defaults. OMP_WAIT_POLICY=PASSIVE (once set here) costs torch
# 29-45% of its decode speed on a quiet machine; cross-talk between the two thread pools is avoided
# instead by running each side in its own process (Worker below).
os.environ.setdefault("GLOG_v", "3")                # MindSpore: errors only
os.environ.setdefault("MS_ALLOC_CONF", "enable_vmm:False")

import numpy as np  # noqa: E402

from tests import hf_fixtures as fx  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "bench", "results")


# ----------------------------------------------------------------------------- environment
def setup(threads=2, frameworks=("mindspore", "torch")):
    """MindSpore graph mode on the CPU and/or torch limited to `threads` intra-op threads; quiet loggers."""
    import logging

    if "mindspore" in frameworks:
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        ms.set_seed(0)
    if "torch" in frameworks:
        import torch
        torch.set_num_threads(threads)
    # stock generate logs its config and a use_past warning at INFO/WARNING on every call
    for name in ("mindformers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "mindspore" in frameworks:
        try:
            from mindformers.tools.logger import get_logger
            get_logger().setLevel(logging.ERROR)
        except Exception:  # pragma: no cover - logger layout differs between versions
            pass


# ----------------------------------------------------------------------------- configs
def _yarn_for(config, max_positions):
    """Raise max_position_embeddings and keep max_pos / original_max_pos == factor (see hf_fixtures)."""
    rope = dict(config["rope_scaling"])
    rope["original_max_position_embeddings"] = int(max_positions / rope["factor"])
    return {"max_position_embeddings": max_positions, "rope_scaling": rope}


def tiny_config(total_len=192, **overrides):
    """tests/hf_fixtures.tiny_hf_config with room for `total_len` positions (rounded up to 64)."""
    max_pos = max(128, -(-total_len // 64) * 64)
    base = fx.tiny_hf_config()
    return fx.tiny_hf_config(**{**_yarn_for(base, max_pos), **overrides})


def small_config(total_len=192, **overrides):
    """hidden 512, 8 layers (first dense), 16 routed experts top-4 in 4 groups (2 kept), 1 shared."""
    base = fx.tiny_hf_config()
    max_pos = max(256, -(-total_len // 64) * 64)
    cfg = dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, first_k_dense_replace=1,
        num_attention_heads=8, num_key_value_heads=8,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        intermediate_size=1024, moe_intermediate_size=256,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        num_nextn_predict_layers=0,  # MTP is not run by generate; keep memory and load time down
    )
    cfg.update(_yarn_for(base, max_pos))
    cfg.update(overrides)
    return fx.tiny_hf_config(**cfg)


def describe(config):
    """One-line summary of a config for tables."""
    return (f"h{config['hidden_size']} L{config['num_hidden_layers']} "
            f"E{config['n_routed_experts']}/k{config['num_experts_per_tok']} "
            f"g{config['n_group']}/{config['topk_group']} V{config['vocab_size']}")


# ----------------------------------------------------------------------------- checkpoints and models
class Checkpoint:
    """A random HF DeepSeek-V3 folder in a temporary directory (removed by close())."""

    def __init__(self, config, seed=0, std=None, keep_state=True):
        # N(0, std) weights; 1/sqrt(hidden) keeps activations of the wider configs well scaled
        std = std if std is not None else min(0.15, config["hidden_size"] ** -0.5)
        self.config = copy.deepcopy(config)
        self.state = fx.random_hf_state_dict(config, seed=seed, std=std)
        self._tmp = tempfile.TemporaryDirectory(prefix="dsv3-bench-")
        self.folder = self._tmp.name
        fx.save_hf_folder(self.folder, config, self.state)
        if not keep_state:
            self.state = None

    def close(self):
        self.state = None
        self._tmp.cleanup()
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _argmax_any_axis(model):
    """Stock GenerationMixin.postprocess calls `self.argmax(logits, -1)` (two arguments).

    mindformers_dsv3.kernels.argmax_last takes one; when the model's hook has that signature the
    benchmark wraps it (same op, axis -1) so stock generate runs. Returns True when it had to.
    """
    import inspect
    import mindspore as ms
    from mindspore import ops

    try:
        inspect.signature(model.argmax).bind(None, -1)
        return False
    except TypeError:
        argmax = ops.Argmax(axis=-1, output_type=ms.int32)

        def argmax_axis(x, axis=-1):
            if axis not in (-1, len(x.shape) - 1):
                raise ValueError(f"argmax over axis {axis} is not supported here")
            return argmax(x)

        model.argmax = argmax_axis
        return True


def build_ours(folder, *, seq_length, batch_size=1, use_past=True, block_size=16, num_blocks=None):
    """Our model, fp32 on CPU, graph mode, with the weights of the HF folder."""
    from tests.model_fixtures import build_ms_model

    if num_blocks is None:
        num_blocks = max(16, batch_size * (-(-seq_length // block_size)))
    model = build_ms_model(folder, seq_length=seq_length, batch_size=batch_size, use_past=use_past,
                           block_size=block_size, num_blocks=num_blocks)
    model.bench_argmax_patched = _argmax_any_axis(model)
    return model


def build_theirs(config, state=None, folder=None):
    """transformers' DeepseekV3ForCausalLM (fp32, eval, eager attention) with the same weights
    (`state`, or read back from the HF `folder`)."""
    if state is None:
        config, state = fx.load_hf_folder(folder)
    return fx.build_hf_model(config, state)


# ----------------------------------------------------------------------------- one process per side
def thread_info():
    """Thread settings of the frameworks loaded in this process."""
    info = {}
    if "mindspore" in sys.modules:
        try:
            info["mindspore_runtime_num_threads"] = sys.modules["mindspore"].get_context("runtime_num_threads")
        except Exception:
            pass
    if "torch" in sys.modules:
        info["torch_num_threads"] = sys.modules["torch"].get_num_threads()
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    return info


def _serve(conn, target, args, threads, frameworks):
    import importlib
    import traceback

    try:
        setup(threads, frameworks)
        module, _, name = target.rpartition(".")
        obj = getattr(importlib.import_module(module), name)(*args)
        conn.send((True, None))
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    while True:
        message = conn.recv()
        if message is None:
            return
        method, margs = message
        try:
            conn.send((True, thread_info() if method == "thread_info" else getattr(obj, method)(*margs)))
        except BaseException:
            conn.send((False, traceback.format_exc()))


class Worker:
    """One side of a benchmark (`target` = "module.Class", built with `args`) in its own process.

    MindSpore's thread pool and torch's OpenMP threads never share a process, so neither spins on
    the cores the other is timed on; the parent interleaves the sides' runs so that load from other
    processes hits both alike. Methods run in the worker and return picklable results (time them
    there: the pipe is not timed).
    """

    def __init__(self, target, *args, threads=2, frameworks=("mindspore", "torch")):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.target = target
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, target, args, threads, tuple(frameworks)),
                                daemon=True)
        self.proc.start()
        child.close()
        self._answer()

    def _answer(self):
        try:
            ok, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.target} worker died (exit code {self.proc.exitcode})") from None
        if not ok:
            raise RuntimeError(f"{self.target} worker failed:\n{value}")
        return value

    def call(self, method, *args):
        self.conn.send((method, args))
        return self._answer()

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(30)
        if self.proc.is_alive():  # pragma: no cover - a hung worker
            self.proc.terminate()
            self.proc.join(10)
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def release(*objs):
    for obj in objs:
        del obj
    gc.collect()


# ----------------------------------------------------------------------------- timing
def time_calls(fn, repeats=3, warmup=1):
    """Wall seconds of `repeats` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(samples):
    samples = [float(s) for s in samples]
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "runs": samples}


# ----------------------------------------------------------------------------- reporting
def _version(pkg):
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def machine_info():
    commit = None
    try:
        # the benchmarked tree: DSV3_SRC when set (a snapshot without .git records no commit)
        commit = subprocess.run(["git", "-C", SRC, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        if commit and SRC != ROOT and not os.path.exists(os.path.join(SRC, ".git")):
            commit = None  # git found the enclosing repository, not SRC's own
    except Exception:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mindspore": _version("mindspore"), "mindformers": _version("mindformers"),
        "torch": _version("torch"), "transformers": _version("transformers"),
        "commit": commit,
        "source": SRC,
    }


def markdown_table(columns, rows):
    """columns: list of (key, header, format); rows: list of dicts."""
    def cell(row, key, fmt):
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, fmt) if fmt else str(value)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, k, f) for k, h, f in columns) + " |")
    return "\n".join(lines)


def write_results(name, payload, table):
    """Write bench/results/<name>.json (payload + machine info) and print the markdown table."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=_json_default)
    m = payload["machine"]
    print(f"\n### {name} ({m['date']}, {m['host_cpus']} cpus, load {m['load_avg_1m']:.2f}, "
          f"mindspore {m['mindspore']}, torch {m['torch']})\n")
    print(table)
    print(f"\nwritten: {os.path.relpath(path, ROOT)}")
    return path


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
