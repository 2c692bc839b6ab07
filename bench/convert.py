"""dsv3-convert hf-to-ms throughput and memory on a synthetic FP8 checkpoint with real 671B shapes.

The checkpoint has the released layout and tensor shapes (hidden 7168, vocab 129280, 128 heads,
q_lora 1536, kv_lora 512, experts 2048 x 7168, dense MLP 18432, e4m3 weights with float32
128x128 `weight_scale_inv`, bf16 norms / embeddings / heads, float32 router biases), with fewer
layers and experts per layer. The data are random bit patterns (finite FP8 codes, bf16 of moderate
magnitude): converting costs the same for any values.

Measured, in one run on the same disk (the input stays in the page cache for every reader):

* cp:        `cp -r` of the input folder (no fsync), then `sync`, each timed;
* hf-to-ms:  `python -m mindformers_dsv3.checkpoint hf-to-ms IN OUT --dtype bf16` with 1 and 2
             workers: input bytes / conversion seconds (from its summary line; the ~10 s start-up
             importing MindSpore for the config is reported apart), peak RSS of the command and its
             workers (wait4), byte-identical output for both worker counts (manifest sha256s);
* the same with 1 worker on a checkpoint with fewer layers: peak RSS must not grow with size.

Every temporary file is removed at the end, also after an error.

    python bench/convert.py [--experts 64] [--moe-layers 2] [--small-moe-layers 1] [--small-experts 16] [--dir /tmp]
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

from mindformers_dsv3.checkpoint import names  # noqa: E402
from mindformers_dsv3.checkpoint.fp8 import scale_inv_shape  # noqa: E402
from mindformers_dsv3.checkpoint.safetensors_io import write_index  # noqa: E402
from tests import hf_fixtures as fx  # noqa: E402

SHARD_BYTES = 2 * 1024 ** 3
CHUNK = 64 * 1024 ** 2


def synthetic_config(moe_layers, experts, mtp):
    with open(os.path.join(common.ROOT, "tests/fixtures/deepseek_v3_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    groups = min(8, experts)
    config.update(num_hidden_layers=1 + moe_layers, first_k_dense_replace=1, n_routed_experts=experts,
                  n_group=groups, topk_group=min(4, groups), num_nextn_predict_layers=int(mtp),
                  num_experts_per_tok=min(8, min(4, groups) * (experts // groups)))
    return config


def _tensor_spec(config_ns, name):
    """(safetensors dtype, shape, kind) of every tensor the FP8 release holds, scales included."""
    if name.endswith(names.SCALE_SUFFIX):
        return "F32", scale_inv_shape(names.hf_shape(name[:-len(names.SCALE_SUFFIX)], config_ns)), "scale"
    shape = names.hf_shape(name, config_ns)
    if fx.is_quantized_weight(name):
        return "F8_E4M3", shape, "fp8"
    return ("F32", shape, "f32") if names.keeps_float32(name) else ("BF16", shape, "bf16")


def _random_bytes(rng, kind, n):
    if kind == "fp8":  # finite e4m3 codes (bit 6 clear: exponent <= 7, never the NaN code)
        return rng.integers(0, 256, n, dtype=np.uint8) & np.uint8(0xBF)
    if kind == "bf16":  # sign, exponent 120 (2^-7), random mantissa
        bits = rng.integers(0, 1 << 16, n // 2, dtype=np.uint16)
        return ((bits & np.uint16(0x807F)) | np.uint16(0x3C00)).view(np.uint8)
    return rng.uniform(1e-4, 1e-3, n // 4).astype(np.float32).view(np.uint8)  # scales, biases


def write_checkpoint(folder, config):
    """Streams a synthetic FP8 checkpoint to `folder` (shards of about 2 GiB, index, config)."""
    from mindformers_dsv3.config import DeepseekV3Config
    cfg = DeepseekV3Config.from_hf_config(config, seq_length=4096)
    os.makedirs(folder, exist_ok=True)
    specs = {n: _tensor_spec(cfg, n) for n in fx.hf_checkpoint_names(cfg, fp8=True)}
    itemsize = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    sizes = {n: math.prod(s) * itemsize[d] for n, (d, s, _) in specs.items()}
    shards, current, used = [], [], 0
    for name in specs:  # the release's order: layer by layer
        if current and used + sizes[name] > SHARD_BYTES:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    shards.append(current)
    rng, weight_map = np.random.default_rng(0), {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in shard:
            header[name] = {"dtype": specs[name][0], "shape": list(specs[name][1]),
                            "data_offsets": [offset, offset + sizes[name]]}
            offset += sizes[name]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(folder, fname), "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for name in shard:
                left = sizes[name]
                while left:
                    n = min(CHUNK, left)
                    fh.write(_random_bytes(rng, specs[name][2], n).tobytes())
                    left -= n
        weight_map.update(dict.fromkeys(shard, fname))
    write_index(folder, weight_map, sum(sizes.values()))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return sum(sizes.values()), len(specs)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def timed(cmd):
    """(wall seconds, peak RSS bytes of the command and its reaped children, stdout, stderr)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=common.ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return time.time() - t0, usage.ru_maxrss * 1024, out, err


def convert(src, dst, workers):
    cmd = [sys.executable, "-m", "mindformers_dsv3.checkpoint", "hf-to-ms", src, dst, "--dtype", "bf16",
           "--workers", str(workers), "--quiet"]
    wall, rss, out, _ = timed(cmd)
    seconds = float(re.search(r" in ([0-9.]+) s \(", out).group(1))
    with open(os.path.join(dst, "dsv3-convert.manifest.json"), encoding="utf-8") as fh:
        files = {k: v["sha256"] for k, v in json.load(fh)["files"].items()}
    return {"wall_s": wall, "convert_s": seconds, "peak_rss": rss, "out_bytes": folder_bytes(dst),
            "summary": out.strip().splitlines()[0], "sha256": files}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer")
    parser.add_argument("--moe-layers", type=int, default=2, help="MoE layers (after one dense layer)")
    parser.add_argument("--small-moe-layers", type=int, default=1, help="the same for the RSS comparison")
    parser.add_argument("--small-experts", type=int, default=16)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="scratch folder (same disk for all)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dsv3-convert-bench-", dir=args.dir)
    rows, payload = [], {}
    try:
        config = synthetic_config(args.moe_layers, args.experts, mtp=False)
        src = os.path.join(work, "hf")
        t0 = time.time()
        in_bytes, in_tensors = write_checkpoint(src, config)
        print(f"synthetic FP8 checkpoint: {in_tensors} tensors, {in_bytes / 1024 ** 3:.2f} GiB "
              f"({1 + args.moe_layers} layers, {args.experts} experts) in {time.time() - t0:.0f} s", flush=True)
        subprocess.run(["sync"], check=True)
        t0 = time.time()
        subprocess.run(["cp", "-r", src, os.path.join(work, "cp")], check=True)
        cp_s = time.time() - t0
        t0 = time.time()
        subprocess.run(["sync"], check=True)
        sync_s = time.time() - t0
        shutil.rmtree(os.path.join(work, "cp"))
        cp_rate, cps_rate = in_bytes / cp_s, in_bytes / (cp_s + sync_s)

        def rated(row, nbytes, seconds):
            rate = nbytes / seconds
            return {**row, "gib": nbytes / 1024 ** 3, "seconds": seconds, "rate": rate / 2 ** 20,
                    "vs_cp": rate / cp_rate, "vs_cps": rate / cps_rate}
        rows.append(rated({"run": "cp -r (no fsync)"}, in_bytes, cp_s))
        rows.append(rated({"run": "cp -r, then sync"}, in_bytes, cp_s + sync_s))
        results = {}
        for workers in (1, 2):
            dst = os.path.join(work, f"ms{workers}")
            results[workers] = r = convert(src, dst, workers)
            shutil.rmtree(dst)
            rows.append(rated({"run": f"hf-to-ms bf16, {workers} worker(s)", "startup": r["wall_s"] - r["convert_s"],
                               "rss": r["peak_rss"] / 1024 ** 3, "out_gib": r["out_bytes"] / 1024 ** 3},
                              in_bytes, r["convert_s"]))
            print(r["summary"], flush=True)
        identical = results[1]["sha256"] == results[2]["sha256"]
        shutil.rmtree(src)
        small_config = synthetic_config(args.small_moe_layers, args.small_experts, mtp=False)
        small_bytes, _ = write_checkpoint(src, small_config)
        small = convert(src, os.path.join(work, "ms-small"), 1)
        rows.append(rated({"run": "hf-to-ms bf16, 1 worker, smaller checkpoint",
                           "startup": small["wall_s"] - small["convert_s"], "rss": small["peak_rss"] / 1024 ** 3,
                           "out_gib": small["out_bytes"] / 1024 ** 3}, small_bytes, small["convert_s"]))
        keys = ("num_hidden_layers", "n_routed_experts", "num_nextn_predict_layers", "hidden_size", "vocab_size",
                "moe_intermediate_size")
        payload = {"config": {k: config[k] for k in keys},
                   "input_bytes": in_bytes, "input_tensors": in_tensors, "cp_s": cp_s, "sync_s": sync_s,
                   "runs": {str(w): {k: v for k, v in r.items() if k != "sha256"} for w, r in results.items()},
                   "small": {"input_bytes": small_bytes, **{k: v for k, v in small.items() if k != "sha256"}},
                   "speedup_1_to_2_workers": results[1]["convert_s"] / results[2]["convert_s"],
                   "byte_identical_1_vs_2_workers": identical, "rows": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = common.markdown_table(
        [("run", "run", ""), ("gib", "input GiB", ".2f"), ("seconds", "seconds", ".1f"),
         ("startup", "+ start-up s", ".1f"), ("rate", "input MiB/s", ".0f"), ("vs_cp", "vs cp", ".2f"),
         ("vs_cps", "vs cp+sync", ".2f"),
         ("rss", "peak RSS GiB", ".2f"), ("out_gib", "output GiB", ".2f")], rows)
    table += (f"\n\nspeed-up 1 -> 2 workers: {payload['speedup_1_to_2_workers']:.2f}x; "
              f"output byte-identical for 1 and 2 workers: {payload['byte_identical_1_vs_2_workers']}")
    common.write_results("convert", payload, table)


if __name__ == "__main__":
    main()
