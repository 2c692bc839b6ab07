"""Loading a real-shape FP8 checkpoint through the shipped route, against a cold `cp -r` of it.

The checkpoint is the synthetic FP8 folder bench/convert.py writes (the released layout and tensor
shapes: hidden 7168, vocab 129280, experts 2048 x 7168, e4m3 weights with float32 128x128 scales,
bf16 norms / embedding / head), here with 2 layers (1 dense + 1 MoE) and 16 routed experts, no MTP.
It is written once and cached under `--dir` (default: <tmp>/dsv3-load-bench/), reused by later runs.

Measured, each after dropping the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root;
without it the script says so and the figures are warm-cache ones):

* cp:    `cp -r` of the folder into the same scratch folder (no fsync), then the copy is removed;
* load:  for each thread setting of `--threads` (default: the loader's own, i.e. $DSV3_LOAD_THREADS or
         the CPUs of this process, then 1: the speed-up of threading side by side), a child process builds `DeepseekV3Config.from_hf_config(folder, checkpoint_name_or_path=folder)`
         and `DeepseekV3ForCausalLM(config)` (bf16 parameters, the constructor loads the folder): the
         seconds of the constructor (build + load) and, apart, of importing MindSpore / MindFormers;
         its peak RSS (getrusage, measured before any check) against the parameters' bytes;
* check: sampled rows of some parameters (FP8 attention, fused FP8 MLP, stacked FP8 experts, bf16
         embedding) equal the file contents dequantized independently (float32 code x block scale,
         rounded once to bf16).

Every load is compared with the `cp` measured just before it (cp, load, cp, load, ...: on a shared
machine both move with the other jobs). Prints a markdown table and writes bench/results/load.json;
exit status 1 if a spot check fails.

    python bench/load.py [--experts 16] [--moe-layers 1] [--dir /tmp/dsv3-load-bench] [--fresh]
                         [--threads auto,1]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import convert  # noqa: E402  (the synthetic checkpoint writer)

DONE = "bench-load.complete"  # marker: the cached folder was written to the end


def drop_caches():
    """True when the page cache was dropped (root), else False."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def cached_checkpoint(root, moe_layers, experts, fresh):
    """The synthetic folder under `root`, written unless a complete one is there; (folder, bytes, tensors)."""
    folder = os.path.join(root, f"hf-{1 + moe_layers}l-{experts}e")
    marker = os.path.join(folder, DONE)
    if fresh or not os.path.exists(marker):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.time()
        nbytes, tensors = convert.write_checkpoint(folder, convert.synthetic_config(moe_layers, experts, mtp=False))
        with open(marker, "w", encoding="utf-8") as fh:
            json.dump({"bytes": nbytes, "tensors": tensors}, fh)
        print(f"wrote {folder}: {tensors} tensors, {nbytes / 2 ** 30:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
    with open(marker, encoding="utf-8") as fh:
        info = json.load(fh)
    return folder, info["bytes"], info["tensors"]


# ----------------------------------------------------------------------------- the child: load and check
def _reference_rows(ckpt, name, rows, block):
    """Rows of an HF tensor as float32, FP8 dequantized independently (code x its block's scale)."""
    import numpy as np
    from mindformers_dsv3.checkpoint import names
    data = np.concatenate([ckpt.read_rows(name, int(r), int(r) + 1) for r in rows]).astype(np.float32)
    sname = name + names.SCALE_SUFFIX
    if sname in ckpt:
        scale = ckpt.read(sname).astype(np.float32)
        data *= np.repeat(scale[rows // block[0]], block[1], axis=1)[:, :data.shape[1]]
    return data


def _spot_checks(model, folder):
    """{parameter: True/False} for sampled rows of a few parameters against the files."""
    import ml_dtypes
    import numpy as np
    from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
    params = {p.name: p for p in model.get_parameters()}
    rng = np.random.default_rng(0)
    cfg = model.config
    inter = cfg.moe_intermediate_size
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        block = json.load(fh)["quantization_config"]["weight_block_size"]
    out = {}
    with open_checkpoint(folder) as ckpt:
        def same(got, name, rows):
            want = _reference_rows(ckpt, name, rows, block).astype(ml_dtypes.bfloat16)
            return bool(np.array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16)))
        for ms_name, hf_name in (("model.embed_tokens.weight", "model.embed_tokens.weight"),
                                 ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight"),
                                 ("model.layers.0.self_attn.q_a_proj.weight",
                                  "model.layers.0.self_attn.q_a_proj.weight")):
            value = params[ms_name].asnumpy()
            rows = np.sort(rng.choice(value.shape[0], 64, replace=False))
            out[ms_name] = same(value[rows], hf_name, rows)
        fused = params["model.layers.0.mlp.gate_up_proj.weight"].asnumpy()  # [gate; up] rows
        half = fused.shape[0] // 2
        rows = np.sort(rng.choice(half, 64, replace=False))
        out["model.layers.0.mlp.gate_up_proj.weight"] = (
            same(fused[rows], "model.layers.0.mlp.gate_proj.weight", rows)
            and same(fused[half + rows], "model.layers.0.mlp.up_proj.weight", rows))
        stacked = params["model.layers.1.mlp.experts.gate_up_proj"].asnumpy()  # (E, H, 2I): gate.T | up.T
        for e in (0, cfg.n_routed_experts - 1):
            rows = np.sort(rng.choice(inter, 32, replace=False))
            out[f"model.layers.1.mlp.experts.gate_up_proj[{e}]"] = (
                same(stacked[e][:, rows].T, f"model.layers.1.mlp.experts.{e}.gate_proj.weight", rows)
                and same(stacked[e][:, inter + rows].T, f"model.layers.1.mlp.experts.{e}.up_proj.weight", rows))
    return out


def child(folder, result_path):
    t0 = time.time()
    from mindformers_dsv3.config import DeepseekV3Config
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    import mindspore as ms
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    imported = time.time()
    rss_imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = DeepseekV3Config.from_hf_config(folder, checkpoint_name_or_path=folder, seq_length=4096)
    model = DeepseekV3ForCausalLM(config)
    loaded = time.time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    param_bytes = sum(p.nbytes for p in model.get_parameters())
    from mindformers_dsv3.checkpoint import fp8
    checks = _spot_checks(model, folder)
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump({"threads_used": fp8.load_threads(), "import_s": imported - t0, "load_s": loaded - imported, "peak_rss": peak,
                   "rss_after_import": rss_imported, "param_bytes": param_bytes,
                   "stats": model.checkpoint_stats, "checks": checks, "names": _name_hook_timing()}, fh)


def _name_hook_timing():
    """Stock convert_name over the 91,991 tensor names of the 671B release (rebuilt from its config)."""
    from mindformers_dsv3.checkpoint import hooks
    from tests import hf_fixtures as fx
    from mindformers_dsv3.checkpoint.errors import CheckpointError
    from mindformers_dsv3.config import DeepseekV3Config
    config = DeepseekV3Config.from_hf_config(os.path.join(common.ROOT, "tests", "fixtures", "deepseek_v3_config.json"))
    release = fx.hf_checkpoint_names(config, fp8=True)
    t0, refused = time.perf_counter(), 0
    for name in release:
        try:
            hooks.convert_name(config, name)
        except CheckpointError:
            refused += 1  # FP8 scales: refused, naming model.model_config.checkpoint_name_or_path
    return {"names": len(release), "refused_scales": refused, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- the parent
def _cold_cp(folder, scratch):
    """Seconds of a `cp -r` of `folder` after dropping the page cache; the copy is removed after."""
    copy = os.path.join(scratch, "cp-copy")
    shutil.rmtree(copy, ignore_errors=True)
    drop_caches()
    t0 = time.time()
    subprocess.run(["cp", "-r", folder, copy], check=True)
    seconds = time.time() - t0
    shutil.rmtree(copy)
    return seconds


def _cold_load(folder, scratch, threads):
    """The child's result (build + load of the model, cold) with DSV3_LOAD_THREADS=`threads` ('auto': unset)."""
    env = dict(os.environ)
    env.pop("DSV3_LOAD_THREADS", None)
    if threads != "auto":
        env["DSV3_LOAD_THREADS"] = threads
    result = os.path.join(scratch, "load-result.json")
    drop_caches()
    load_avg = os.getloadavg()[0]
    t0 = time.time()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder, result], check=True,
                   cwd=common.ROOT, env=env)
    wall = time.time() - t0
    with open(result, encoding="utf-8") as fh:
        return {**json.load(fh), "child_wall_s": wall, "load_avg_1m_at_start": load_avg}


def _rows(runs, nbytes):
    gib, rows = 2 ** 30, []
    for run in runs:
        cp_s, r = run["cp_s"], run["load"]
        rows.append({"run": f"cp -r (cold), before {r['threads_used']} thread(s)", "seconds": cp_s,
                     "rate": nbytes / cp_s / 2 ** 20, "vs_cp": 1.0})
        rows.append({"run": f"build + load, {r['threads_used']} thread(s) (cold; load avg {r['load_avg_1m_at_start']:.1f})",
                     "seconds": r["load_s"], "rate": nbytes / r["load_s"] / 2 ** 20, "vs_cp": r["load_s"] / cp_s,
                     "rss": r["peak_rss"] / gib, "params": r["param_bytes"] / gib,
                     "over": (r["peak_rss"] - r["param_bytes"]) / gib})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=16, help="routed experts of the MoE layer(s)")
    parser.add_argument("--moe-layers", type=int, default=1, help="MoE layers after the one dense layer")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dsv3-load-bench"),
                        help="where the checkpoint is cached (and copied once by cp)")
    parser.add_argument("--fresh", action="store_true", help="write the checkpoint again")
    parser.add_argument("--threads", default="auto,1",
                        help="comma-separated DSV3_LOAD_THREADS settings to load with, each after its own cold cp "
                             "('auto': the loader's default, the CPUs of the process); default auto,1")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    settings = [t.strip() for t in args.threads.split(",") if t.strip()]
    if not settings or any(t != "auto" and not (t.isdigit() and int(t) > 0) for t in settings):
        parser.error(f"--threads {args.threads!r}: give 'auto' or positive integers, comma-separated")
    os.makedirs(args.dir, exist_ok=True)
    folder, nbytes, ntensors = cached_checkpoint(args.dir, args.moe_layers, args.experts, args.fresh)
    print(f"checkpoint: {folder} ({ntensors} tensors, {nbytes / 2 ** 30:.2f} GiB); cached for later runs", flush=True)
    cold = drop_caches()
    if not cold:
        print("cannot drop the page cache (not root): cp and load read a warm cache", flush=True)
    runs = []
    for threads in settings:
        cp_s = _cold_cp(folder, args.dir)
        r = _cold_load(folder, args.dir, threads)
        runs.append({"threads": threads, "cp_s": cp_s, "load": r, "load_over_cp": r["load_s"] / cp_s})
        print(f"threads {threads} ({r['threads_used']}): load {r['load_s']:.1f} s, cp {cp_s:.1f} s, "
              f"{r['load_s'] / cp_s:.2f}x", flush=True)
    gib, first = 2 ** 30, runs[0]["load"]
    payload = {"folder": folder, "bytes": nbytes, "tensors": ntensors, "cold_cache": cold, "runs": runs,
               "rows": _rows(runs, nbytes)}
    table = common.markdown_table(
        [("run", "run", ""), ("seconds", "seconds", ".1f"), ("rate", "MiB/s of the folder", ".0f"),
         ("vs_cp", "time / cp", ".2f"), ("rss", "peak RSS GiB", ".2f"), ("params", "parameters GiB", ".2f"),
         ("over", "RSS - parameters GiB", ".2f")], payload["rows"])
    checks = {k: all(run["load"]["checks"][k] for run in runs) for k in first["checks"]}
    table += (f"\n\nimport of MindSpore/MindFormers in the child: {first['import_s']:.1f} s (RSS after import "
              f"{first['rss_after_import'] / gib:.2f} GiB); child process, import included: "
              + ", ".join(f"{run['load']['child_wall_s']:.1f} s" for run in runs) + "; spot checks: "
              + ", ".join(f"{k} {'ok' if v else 'DIFFERS'}" for k, v in checks.items())
              + f"\n\nstock convert_name over the {first['names']['names']:,} names of the 671B release: "
              f"{first['names']['seconds']:.2f} s ({first['names']['refused_scales']:,} FP8 scale names refused)")
    common.write_results("load", payload, table)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
