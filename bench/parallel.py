"""Decode speed of split inference over msrun on this CPU: TP=1 vs TP=2 vs EP=2 (report only).

The "small" config (bench/common.py: hidden 512, 8 layers, 16 routed experts top-4, vocab 32000),
random weights in a temporary HF folder; each layout runs tests/dist/parallel_infer.py under msrun
(one process per rank; TP=1 is msrun with one worker, the whole model) and times stock greedy
``generate`` with the paged latent cache: ``generate(1)`` (prefill + first token) and ``generate(N)``
after a warm-up call; decode tok/s = batch x (N - 1) / (t_N - t_1).

    .venv/bin/python bench/parallel.py [--quick] [--new 32] [--prompt 64] [--repeats 2]
                                       [--layouts 1x1x1,1x2x1,1x2x2,2x1x2]

Layouts are DPxMPxEP (data_parallel x model_parallel x expert_parallel): 1x1x1 = one process,
1x2x1 = TP=2 (experts split by width), 1x2x2 = EP=2 (attention TP=2, 8 whole experts per rank),
2x1x2 = data-parallel attention 2 + EP=2 (batch 2, one sequence per rank). On 2 shared cores the
split runs mostly measure communication and scheduling overhead, not a speed-up: no target.
"""
import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402  (puts the repo root on sys.path)

DEFAULT_LAYOUTS = "1x1x1,1x2x1,1x2x2,2x1x2"
NAMES = {"1x1x1": "TP=1 (one process)", "1x2x1": "TP=2", "1x2x2": "EP=2 (attention TP=2)",
         "2x1x2": "DP-attention=2 + EP=2"}


def world_of(layout):
    dp, mp, _ = (int(x) for x in layout.rstrip("v").split("x"))
    return dp * mp


def run_group(layouts, folder, root, args):
    """One msrun for the layouts of one world size; returns {layout: [rank records]}."""
    from tests.test_parallel_infer import run_msrun
    world = world_of(layouts[0])
    batch = int(layouts[0].split("x")[0])      # one sequence per data-parallel rank
    rng = np.random.RandomState(0)
    inputs = {"batch": batch, "fed": np.zeros((batch, 1), np.int64), "new_tokens": np.array([args.new] * batch)}
    for i in range(batch):
        inputs[f"prompt{i}"] = rng.randint(2, 32000, size=args.prompt)
    group_root = os.path.join(root, f"w{world}_b{batch}")
    os.makedirs(group_root, exist_ok=True)
    os.symlink(folder, os.path.join(group_root, "hf"))
    np.savez(os.path.join(group_root, "inputs.npz"), **inputs)
    seq = -(-(args.prompt + args.new + 1) // 64) * 64
    blocks = batch * seq // 16
    out = run_msrun(world, layouts, group_root, os.path.join(group_root, "out"),
                    extra=["--bench", str(args.new), "--repeats", str(args.repeats), "--batch-size", str(batch),
                           "--seq-length", str(seq), "--num-blocks", str(blocks)], timeout=3600)
    results = {}
    for layout in layouts:
        records = []
        for r in range(world):
            with open(os.path.join(out, layout, f"rank{r}.json"), encoding="utf-8") as f:
                records.append(json.load(f))
        results[layout] = records
    return results


def summarise(layout, records, args):
    dp = int(layout.split("x")[0])
    runs = records[0]["runs"]                      # every rank runs the same steps
    batch = dp * records[0]["local_batch"]
    decode = [batch * (args.new - 1) / max(r["generate_s"] - r["generate1_s"], 1e-9) for r in runs]
    tok = [batch * args.new / r["generate_s"] for r in runs]
    return {"layout": layout, "name": NAMES.get(layout, layout), "ranks": len(records), "batch": batch,
            "tok_s": common.summary(tok)["median"], "decode_tok_s": common.summary(decode)["median"],
            "decode_best": max(decode), "generate1_ms": 1000 * common.summary([r["generate1_s"] for r in runs])["median"],
            "first_call_s": records[0]["first_call_s"], "build_s": records[0]["build_s"], "runs": runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS)
    ap.add_argument("--new", type=int, default=32, help="new tokens per timed generate")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 new tokens, one repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.new, args.repeats = 16, 1
    layouts = args.layouts.split(",")
    config = common.small_config(total_len=args.prompt + args.new + 1)
    rows = []
    with common.Checkpoint(config, seed=0) as ckpt, tempfile.TemporaryDirectory(prefix="dsv3-par-") as root:
        by_world = {}
        for layout in layouts:
            by_world.setdefault((world_of(layout), layout.split("x")[0]), []).append(layout)
        results = {}
        for group in by_world.values():
            results.update(run_group(group, ckpt.folder, root, args))
    for layout in layouts:
        rows.append(summarise(layout, results[layout], args))
    columns = [("name", "layout", None), ("layout", "DPxMPxEP", None), ("ranks", "ranks", None),
               ("batch", "batch", None), ("decode_tok_s", "decode tok/s", ".1f"), ("decode_best", "best run", ".1f"),
               ("tok_s", f"tok/s ({args.new} new)", ".1f"), ("generate1_ms", "generate(1) ms", ".0f"),
               ("first_call_s", "first call s", ".1f")]
    payload = {"config": config, "describe": common.describe(config), "prompt": args.prompt, "new": args.new,
               "repeats": args.repeats, "rows": rows}
    common.write_results("parallel", payload, common.markdown_table(columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
