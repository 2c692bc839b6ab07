"""MoE scaling: does the forward cost follow the activated experts or the total number of experts?

The "small" config (hidden 512, 8 layers, first dense, vocab 32000) with 16 and with 64 routed experts,
everything else fixed: top-k 4, n_group 4 with topk_group 2, one shared expert, moe_intermediate 256.
A model whose routed-expert work follows the (token, expert) pairs costs about the same with 64 experts
as with 16 (target: t64 / t16 <= 1.15); one that touches every expert's weights grows with E.

Timed: our `forward_logits` (full causal forward, graph mode, compile excluded) and transformers'
forward (eager, no cache) on the same weights, for a few fixed batch shapes. Each side runs in its own
worker process; runs are interleaved so load noise hits every model alike. The 1x1 shape is a decode-sized forward (one token). With 128 tokens x top-4
every one of 64 experts is active too (see the "activated experts" column: E * (1 - (1 - 4/E)^T)),
so there the activated experts themselves grow 4x and so does the expert weight traffic.

`--floor` adds a second table: the routed-expert matmuls of all MoE layers alone, outside any graph
(our CPU kernel called directly, a numpy loop, one numpy read of the expert weights), whose
E=64 - E=16 difference is what the extra expert weights cost by themselves.

    python bench/moe_scaling.py [--quick] [--shapes 1x128,4x64,1x4,1x1] [--experts 16,64] [--repeats N] [--floor]
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


class OursForward:
    """Our models (one per expert count) in a worker process (see common.Worker)."""
    frameworks = ("mindspore",)

    def __init__(self, folders, seq_length):
        self.models = {e: common.build_ours(folder, seq_length=seq_length, use_past=False)
                       for e, folder in folders.items()}

    def forward(self, experts, ids):
        t = time.perf_counter()
        self.models[experts].forward_logits(ids)
        return time.perf_counter() - t


class RoutedFloor:
    """The routed-expert matmuls alone, outside any graph (`--floor`): for each MoE layer of the config,
    rows sorted by expert (random top-k routing of `tokens` tokens), gate_up then down, through
    * "cpu kernel": our CPU grouped-matmul kernel (mindformers_dsv3.kernels, oneDNN sgemm), called directly;
    * "numpy": a per-expert np.matmul loop (what the former numpy host kernel did, without its copies);
    * "weights read": one numpy pass over every expert weight of the layers (sum), no matmul.
    The E=64 - E=16 difference of a row is what that implementation pays for the extra expert weights.
    Where every expert is active (1x128, 4x64) every weight must be read, so the "weights read"
    difference is a floor for any implementation; where few are (1x1, 1x4) it is not (the model then
    multiplies gathered weights of the chosen experts only, see RoutedExperts.few_pair_outputs)."""
    frameworks = ("mindspore",)
    KINDS = ("cpu kernel", "numpy", "weights read")

    def __init__(self, configs, seq_length):  # pylint: disable=unused-argument
        from mindformers_dsv3.kernels import cpu_kernel_library
        path = cpu_kernel_library()
        self.lib = None if path is None else __import__("ctypes").CDLL(path)
        rng = np.random.default_rng(0)
        self.layers, self.top_k = {}, {}
        for e, cfg in configs.items():
            h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
            moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
            self.top_k[e] = cfg["num_experts_per_tok"]
            self.layers[e] = [(rng.standard_normal((e, h, 2 * i), dtype=np.float32) * 0.05,
                               rng.standard_normal((e, i, h), dtype=np.float32) * 0.05) for _ in range(moe_layers)]

    def _kernel(self, x, w, counts, out):
        import ctypes
        arrays = [x, w, counts, out]
        params = (ctypes.c_void_p * 4)(*[a.ctypes.data for a in arrays])
        ndims = (ctypes.c_int * 4)(*[a.ndim for a in arrays])
        dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
        shapes = (ctypes.POINTER(ctypes.c_int64) * 4)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
        dtypes = (ctypes.c_char_p * 4)(*[str(a.dtype).encode() for a in arrays])
        if self.lib.dsv3_gmm(4, params, ndims, shapes, dtypes, None, None) != 0:
            raise RuntimeError("dsv3_gmm failed")

    @staticmethod
    def _numpy(x, w, counts, out):
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                np.matmul(x[start:start + c], w[e], out=out[start:start + c])
                start += c

    def time(self, experts, tokens, kind, seed):
        rng = np.random.default_rng(seed)
        k = self.top_k[experts]
        gate_up0, down0 = self.layers[experts][0]
        pairs = tokens * k
        x = rng.standard_normal((pairs, gate_up0.shape[1]), dtype=np.float32)
        act = rng.standard_normal((pairs, down0.shape[1]), dtype=np.float32)
        gate_up = np.empty((pairs, gate_up0.shape[2]), np.float32)
        out = np.empty((pairs, down0.shape[2]), np.float32)
        counts = [np.bincount(np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).ravel(),
                              minlength=experts).astype(np.int32) for _ in self.layers[experts]]
        if kind == "cpu kernel" and self.lib is None:
            return None
        matmul = self._kernel if kind == "cpu kernel" else self._numpy
        t = time.perf_counter()
        for (w1, w2), c in zip(self.layers[experts], counts):
            if kind == "weights read":
                w1.sum()
                w2.sum()
            else:
                matmul(x, w1, c, gate_up)
                matmul(act, w2, c, out)
        return time.perf_counter() - t


def measure_floor(worker, experts, shapes, repeats):
    rows = []
    for batch, seq in shapes:
        tokens = batch * seq
        times = {(kind, e): [] for kind in RoutedFloor.KINDS for e in experts}
        for rep in range(repeats + 1):                         # the first round warms up
            for kind in RoutedFloor.KINDS:
                for e in experts:
                    value = worker.call("time", e, tokens, kind, rep)
                    if rep and value is not None:
                        times[(kind, e)].append(value)
        for kind in RoutedFloor.KINDS:
            if not times[(kind, experts[0])]:
                continue
            stats = {e: common.summary(times[(kind, e)]) for e in experts}
            lo, hi = stats[experts[0]], stats[experts[-1]]
            row = {"shape": f"{batch}x{seq}", "kind": kind, "ratio": hi["median"] / lo["median"],
                   "diff": 1e3 * (hi["median"] - lo["median"]), "diff_best": 1e3 * (hi["min"] - lo["min"]),
                   "times_s": {str(e): stats[e] for e in experts}}
            for e in experts:
                row[f"t{e}"] = 1e3 * stats[e]["median"]
            rows.append(row)
        print(f"[floor {batch}x{seq}] done", flush=True)
    return rows


class TheirsForward(OursForward):
    """transformers' models in a worker process."""
    frameworks = ("torch",)

    def __init__(self, folders, seq_length):  # pylint: disable=super-init-not-called
        self.models = {e: common.build_theirs(None, folder=folder) for e, folder in folders.items()}

    def forward(self, experts, ids):
        import torch
        with torch.no_grad():
            t = time.perf_counter()
            self.models[experts](torch.from_numpy(ids.astype(np.int64)), use_cache=False)
            return time.perf_counter() - t


def measure(workers, experts, shapes, repeats, vocab):
    """Time every (side, expert count) on each shape, interleaved; returns table rows and raw data."""
    rng = np.random.default_rng(0)
    rows, raw = [], {}
    keys = [(side, e) for side in workers for e in experts]
    for batch, seq in shapes:
        ids = rng.integers(2, vocab, size=(batch, seq)).astype(np.int32)
        times, first = {key: [] for key in keys}, {}
        for side, e in keys:                                  # compile / warm up
            first[(side, e)] = workers[side].call("forward", e, ids)
            workers[side].call("forward", e, ids)
        for _ in range(repeats):
            for side, e in keys:
                times[(side, e)].append(workers[side].call("forward", e, ids))
        shape = f"{batch}x{seq}"
        for side in workers:
            stats = {e: common.summary(times[(side, e)]) for e in experts}
            row = {"shape": shape, "side": "ours (MindSpore graph)" if side == "ours" else "transformers (torch eager)"}
            for e in experts:
                row[f"t{e}"] = 1e3 * stats[e]["median"]
            row["active"] = " / ".join(f"{activated_experts(e, 4, batch * seq):.1f}" for e in experts)
            row["ratio"] = stats[experts[-1]]["median"] / stats[experts[0]]["median"]
            row["ratio_best"] = stats[experts[-1]]["min"] / stats[experts[0]]["min"]
            if side == "ours":
                row["target"] = "ok" if row["ratio"] <= TARGET else f"> {TARGET}"
            rows.append(row)
            raw[f"{side}/{shape}"] = {"times_s": {str(e): stats[e] for e in experts},
                                      "first_call_s": {str(e): first[(side, e)] for e in experts},
                                      "ratio": row["ratio"], "ratio_best": row["ratio_best"]}
        print(f"[{shape}] done", flush=True)
    return rows, raw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, 2 timed repeats")
    parser.add_argument("--shapes", default=None, help="batch x seq list (default 1x128,4x64,1x4,1x1)")
    parser.add_argument("--experts", default="16,64")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    parser.add_argument("--vocab", type=int, default=None, help="override vocab_size (default 32000)")
    parser.add_argument("--no-theirs", action="store_true", help="skip transformers")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--floor", action="store_true",
                        help="also time the routed-expert matmuls alone (our kernel, numpy, one read of the weights)")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes or ("1x128" if args.quick else "1x128,4x64,1x4,1x1"))
    experts = [int(e) for e in args.experts.split(",")]
    repeats = args.repeats or (2 if args.quick else 5)
    seq_length = max(64, -(-max(s for _, s in shapes) // 16) * 16)

    configs = {e: config_for(e, args.vocab) for e in experts}
    checkpoints, workers = {}, {}
    try:
        for e in experts:
            print(f"[E={e}] {common.describe(configs[e])}: building checkpoint", flush=True)
            checkpoints[e] = common.Checkpoint(configs[e], seed=0, keep_state=False)
        folders = {e: checkpoints[e].folder for e in experts}
        sides = [("ours", OursForward)] + ([] if args.no_theirs else [("theirs", TheirsForward)])
        for side, cls in sides:
            print(f"[{side}] building models", flush=True)
            workers[side] = common.Worker(f"moe_scaling.{cls.__name__}", folders, seq_length,
                                          threads=args.threads, frameworks=cls.frameworks)
        for ckpt in checkpoints.values():   # the workers hold the weights now
            ckpt.close()
        rows, raw = measure(workers, experts, shapes, repeats, configs[experts[0]]["vocab_size"])
        threads = {side: worker.call("thread_info") for side, worker in workers.items()}
        floor_rows = []
        if args.floor:
            for worker in workers.values():   # free their memory and cores first
                worker.close()
            workers = {"floor": common.Worker("moe_scaling.RoutedFloor", configs, seq_length,
                                              threads=args.threads, frameworks=RoutedFloor.frameworks)}
            floor_rows = measure_floor(workers["floor"], experts, shapes, repeats)
    finally:
        for worker in workers.values():
            worker.close()
        for ckpt in checkpoints.values():
            ckpt.close()

    lo, hi = experts[0], experts[-1]
    columns = [("shape", "batch x seq", ""), ("side", "model", "")]
    columns += [("active", "activated experts (est.)", "")]
    columns += [(f"t{e}", f"E={e} ms", ".1f") for e in experts]
    columns += [("ratio", f"t{hi}/t{lo}", ".2f"), ("ratio_best", "best-run ratio", ".2f"),
                ("target", f"<= {TARGET}", "")]
    payload = {"threads": threads, "experts": experts, "shapes": [f"{b}x{s}" for b, s in shapes], "repeats": repeats,
               "torch_threads": args.threads, "target_ratio": TARGET,
               "configs": {str(e): configs[e] for e in experts}, "rows": rows, "raw": raw,
               "floor_rows": floor_rows}
    table = common.markdown_table(columns, rows)
    if floor_rows:
        floor_columns = [("shape", "batch x seq", ""), ("kind", "routed-expert matmuls alone", "")]
        floor_columns += [(f"t{e}", f"E={e} ms", ".1f") for e in experts]
        floor_columns += [("ratio", f"t{hi}/t{lo}", ".2f"), ("diff", f"t{hi}-t{lo} ms", ".1f"),
                          ("diff_best", "best-run diff ms", ".1f")]
        table += "\n\n" + common.markdown_table(floor_columns, floor_rows)
    common.write_results("moe_scaling", payload, table)
    ours_ok = all(r["ratio"] <= TARGET for r in rows if r["side"].startswith("ours"))
    return 0 if ours_ok else 1


if __name__ == "__main__":
    sys.exit(main())
