"""MoE scaling: does the forward cost follow the activated experts or the total number of experts?

The "small" config (hidden 512, 8 layers, first dense, vocab 32000) with 16 and with 64 routed experts,
everything else fixed: top-k 4, n_group 4 with topk_group 2, one shared expert, moe_intermediate 256.
A model whose routed-expert work follows the (token, expert) pairs costs about the same with 64 experts
as with 16 (target: t64 / t16 <= 1.15); one that touches every expert's weights grows with E.

Timed: our `forward_logits` (full causal forward, graph mode, compile excluded) and transformers'
forward (eager, no cache) on the same weights, for a few fixed batch shapes, interleaved so load noise
hits every model alike. The 1x1 shape is a decode-sized forward (one token). With 128 tokens x top-4
every one of 64 experts is active too (see the "activated experts" column: E * (1 - (1 - 4/E)^T)),
so there the activated experts themselves grow 4x and so does the expert weight traffic.

    python bench/moe_scaling.py [--quick] [--shapes 1x128,4x64,1x1] [--experts 16,64] [--repeats N]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

TARGET = 1.15


def parse_shapes(text):
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]


def config_for(experts, vocab=None):
    # n_group stays 4 (topk_group 2): groups grow from 4 to 16 experts, the structure is unchanged
    kw = {"n_routed_experts": experts, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2}
    if vocab:
        kw["vocab_size"] = vocab
    return common.small_config(**kw)


def activated_experts(experts, top_k, tokens):
    """Expected distinct experts one MoE layer uses for `tokens` tokens under uniform routing."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def ours_forward(model):
    return lambda ids: model.forward_logits(ids)


def theirs_forward(model):
    import torch

    def run(ids):
        with torch.no_grad():
            return model(torch.from_numpy(ids.astype(np.int64)), use_cache=False).logits.numpy()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, 2 timed repeats")
    parser.add_argument("--shapes", default=None, help="batch x seq list (default 1x128,4x64,1x1)")
    parser.add_argument("--experts", default="16,64")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--vocab", type=int, default=None, help="override vocab_size (default 32000)")
    parser.add_argument("--no-theirs", action="store_true", help="skip transformers")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes or ("1x128" if args.quick else "1x128,4x64,1x1"))
    experts = [int(e) for e in args.experts.split(",")]
    repeats = args.repeats or (2 if args.quick else 5)
    common.setup(args.threads)
    seq_length = max(64, -(-max(s for _, s in shapes) // 16) * 16)

    models, configs = {}, {}
    for e in experts:
        cfg = config_for(e, args.vocab)
        configs[e] = cfg
        print(f"[E={e}] {common.describe(cfg)}: building checkpoint and models", flush=True)
        with common.Checkpoint(cfg, seed=0) as ckpt:
            ours = common.build_ours(ckpt.folder, seq_length=seq_length, use_past=False)
            models[("ours", e)] = ours_forward(ours)
            if not args.no_theirs:
                models[("theirs", e)] = theirs_forward(common.build_theirs(cfg, ckpt.state))
        common.release()

    rng = np.random.default_rng(0)
    rows, raw = [], {}
    for batch, seq in shapes:
        ids = rng.integers(2, configs[experts[0]]["vocab_size"], size=(batch, seq)).astype(np.int32)
        times = {key: [] for key in models}
        first = {}
        for key, fn in models.items():                       # compile / warm up
            t = time.perf_counter()
            fn(ids)
            first[key] = time.perf_counter() - t
            fn(ids)
        for _ in range(repeats):
            for key, fn in models.items():
                t = time.perf_counter()
                fn(ids)
                times[key].append(time.perf_counter() - t)
        shape = f"{batch}x{seq}"
        for side in ("ours", "theirs"):
            if (side, experts[0]) not in models:
                continue
            stats = {e: common.summary(times[(side, e)]) for e in experts}
            base = stats[experts[0]]["median"]
            row = {"shape": shape, "side": "ours (MindSpore graph)" if side == "ours" else "transformers (torch eager)"}
            for e in experts:
                row[f"t{e}"] = 1e3 * stats[e]["median"]
            row["active"] = " / ".join(f"{activated_experts(e, 4, batch * seq):.1f}" for e in experts)
            row["ratio"] = stats[experts[-1]]["median"] / base
            row["ratio_best"] = stats[experts[-1]]["min"] / stats[experts[0]]["min"]
            if side == "ours":
                row["target"] = "ok" if row["ratio"] <= TARGET else f"> {TARGET}"
            rows.append(row)
            raw[f"{side}/{shape}"] = {"times_s": {str(e): stats[e] for e in experts},
                                      "first_call_s": {str(e): first[(side, e)] for e in experts},
                                      "ratio": row["ratio"], "ratio_best": row["ratio_best"]}
        print(f"[{shape}] done", flush=True)

    lo, hi = experts[0], experts[-1]
    columns = [("shape", "batch x seq", ""), ("side", "model", "")]
    columns += [("active", "activated experts (est.)", "")]
    columns += [(f"t{e}", f"E={e} ms", ".1f") for e in experts]
    columns += [("ratio", f"t{hi}/t{lo}", ".2f"), ("ratio_best", "best-run ratio", ".2f"),
                ("target", f"<= {TARGET}", "")]
    payload = {"experts": experts, "shapes": [f"{b}x{s}" for b, s in shapes], "repeats": repeats,
               "torch_threads": args.threads, "target_ratio": TARGET,
               "configs": {str(e): configs[e] for e in experts}, "rows": rows, "raw": raw}
    common.write_results("moe_scaling", payload, common.markdown_table(columns, rows))
    ours_ok = all(r["ratio"] <= TARGET for r in rows if r["side"].startswith("ours"))
    return 0 if ours_ok else 1


if __name__ == "__main__":
    sys.exit(main())
