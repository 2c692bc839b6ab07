"""Finetune step speed: ours (MindSpore graph mode, DeepseekV3TrainOneStepCell + AdamWeightDecay) vs
transformers' DeepseekV3ForCausalLM + torch.optim.AdamW (eager, CPU), same weights, same batch, same run.

One step = forward, backward, global-norm clipping (both sides, max norm 1.0) and an optimizer update
on a batch of ``--batch`` x ``--seq`` tokens (default 2 x 256), fp32. Ours runs the full DeepSeek-V3
objective: next-token loss + 0.3 x MTP loss (``num_nextn_predict_layers: 1``) + the sequence-wise
balance loss, then the aux-loss-free router-bias update. transformers 4.51.3 has no MTP and no bias
update, so ours is also measured with MTP off (the same work as theirs). Steps alternate between the
models (round robin) so that load from other processes hits all of them alike; each model has
untimed warm-up steps first (our graph compile is reported separately).

    python bench/train.py [--quick] [--configs small,tiny] [--repeats N] [--batch 2] [--seq 256]

Writes bench/results/train.json and prints a markdown table: median step time, tokens/s and
ours/theirs.
"""
import argparse
import os
import sys
import time

# MindSpore and torch each bring an OpenMP runtime; with the default (active) wait policy their idle
# threads spin and starve each other: on 2 shared cores the transformers step took 6.9 s instead of
# 0.06 s (tiny) and ours 3x longer. Passive waiting must be set before either runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from tests import hf_fixtures as fx  # noqa: E402

LR = 1e-4


# ----------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, folder, batch, seq):
        import mindspore as ms
        from mindspore import Tensor, nn
        from mindformers_dsv3.training import DeepseekV3TrainOneStepCell
        from tests.model_fixtures import build_ms_model

        self.model = build_ms_model(folder, use_past=False, seq_length=seq, batch_size=batch)
        self.model.set_train(True)
        optimizer = nn.AdamWeightDecay(self.model.trainable_params(), learning_rate=LR, beta1=0.9, beta2=0.999,
                                       eps=1e-8, weight_decay=0.0)
        self.step_cell = DeepseekV3TrainOneStepCell(self.model, optimizer, use_clip_grad=True, max_grad_norm=1.0)
        self.step_cell.set_train(True)
        self.tensor, self.ms = Tensor, ms
        self.losses = []

    def step(self, tokens):
        """tokens: (batch, seq + 1) int32; the model shifts them into inputs and labels."""
        loss = self.step_cell(self.tensor(tokens))[0]
        lm, mtp, balance = (float(v) for v in self.model.last_losses.asnumpy())
        self.losses.append({"loss": float(loss.asnumpy()), "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance})


# ----------------------------------------------------------------------------- theirs
class Theirs:
    def __init__(self, config, state):
        import torch

        self.torch = torch
        self.model = common.build_theirs(config, state)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.0)
        self.losses = []

    def step(self, tokens):
        torch = self.torch
        ids = torch.from_numpy(tokens.astype(np.int64))
        inputs, labels = ids[:, :-1], ids[:, 1:]
        logits = self.model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append({"loss": float(loss.detach())})


# ----------------------------------------------------------------------------- driver
def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_config(name, config, batch, seq, repeats, warmup, seed=0):
    tokens_per_step = batch * seq
    rng = np.random.default_rng(seed)
    data = [rng.integers(2, config["vocab_size"], size=(batch, seq + 1)).astype(np.int32)
            for _ in range(warmup + repeats)]
    print(f"[{name}] {common.describe(config)}, MTP 1: building checkpoint and the models", flush=True)
    result = {"config": name, "shape": common.describe(config), "hf_config": config, "batch": batch, "seq": seq}
    with common.Checkpoint(config, seed=seed) as ckpt, tempfile.TemporaryDirectory(prefix="dsv3-bench-") as no_mtp:
        # the same weights without the MTP layer: an HF folder of num_nextn_predict_layers 0
        no_mtp_config = dict(config, num_nextn_predict_layers=0)
        fx.save_hf_folder(no_mtp, no_mtp_config,
                          {k: v for k, v in ckpt.state.items() if not fx.is_mtp_name(k, config)})
        runners = {}
        compile_s = {}
        for key, folder in (("ours_mtp", ckpt.folder), ("ours", no_mtp)):
            runners[key] = Ours(folder, batch, seq)
            compile_s[key] = _timed(runners[key].step, data[0])  # graph compile + first step
        runners["theirs"] = Theirs(config, ckpt.state)
        runners["theirs"].step(data[0])
        times = {key: [] for key in runners}
        for i in range(1, warmup + repeats):
            for key, runner in runners.items():
                elapsed = _timed(runner.step, data[i])
                if i >= warmup:
                    times[key].append(elapsed)
            print(f"[{name}] step {i}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in runners if times[k]),
                  flush=True)
        for key, runner in runners.items():
            s = common.summary(times[key])
            result[key] = {"step_s": s, "tok_per_s": tokens_per_step / s["median"],
                           "tok_per_s_best": tokens_per_step / s["min"], "first_losses": runner.losses[:3],
                           "compile_and_first_step_s": compile_s.get(key)}
        # same weights and data: the first step's next-token loss must agree (MTP off vs transformers)
        result["first_lm_loss"] = {"ours": runners["ours"].losses[0]["lm_loss"],
                                   "theirs": runners["theirs"].losses[0]["loss"]}
        del runners
        common.release()
    theirs, theirs_best = result["theirs"]["tok_per_s"], result["theirs"]["tok_per_s_best"]
    result["ratio"] = result["ours"]["tok_per_s"] / theirs
    result["ratio_mtp"] = result["ours_mtp"]["tok_per_s"] / theirs
    # best step against best step: on a shared machine the least disturbed steps of each side
    result["ratio_best"] = result["ours"]["tok_per_s_best"] / theirs_best
    result["ratio_mtp_best"] = result["ours_mtp"]["tok_per_s_best"] / theirs_best
    return result


COLUMNS = [("config", "config", ""), ("side", "model", ""), ("objective", "objective", ""),
           ("step", "median step s", ".3f"), ("best", "best step s", ".3f"), ("tok_s", "tokens/s", ".0f"),
           ("ratio", "ours/theirs", ".2f"), ("ratio_best", "best-step ratio", ".2f"),
           ("compile", "compile + 1st step s", ".1f")]


def table(results):
    rows = []
    for r in results:
        sides = (("ours_mtp", "ours (MindSpore graph)", "LM + 0.3 MTP + balance, bias update", r["ratio_mtp"],
                  r.get("ratio_mtp_best")),
                 ("ours", "ours (MindSpore graph)", "LM + balance, bias update", r["ratio"], r.get("ratio_best")),
                 ("theirs", "transformers + torch AdamW", "LM", None, None))
        for key, label, objective, ratio, ratio_best in sides:
            m = r[key]
            rows.append({"config": f"{r['config']} {r['batch']}x{r['seq']}", "side": label, "objective": objective,
                         "step": m["step_s"]["median"], "best": m["step_s"]["min"], "tok_s": m["tok_per_s"],
                         "ratio": ratio, "ratio_best": ratio_best, "compile": m["compile_and_first_step_s"]})
    return common.markdown_table(COLUMNS, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed steps per model")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per model (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (incl. the first)")
    parser.add_argument("--configs", default="small", help="comma list of: small, tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    common.setup(args.threads)
    total = args.seq + 1
    makers = {"tiny": lambda: common.tiny_config(total),
              "small": lambda: common.small_config(total, num_nextn_predict_layers=1)}
    results = [run_config(name, makers[name](), args.batch, args.seq, repeats, max(args.warmup, 1))
               for name in args.configs.split(",")]
    payload = {"batch": args.batch, "seq": args.seq, "repeats": repeats, "torch_threads": args.threads,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "learning_rate": LR, "results": results}
    common.write_results("train", payload, table(results))
    for r in results:
        print(f"[{r['config']}] first-step next-token loss: ours {r['first_lm_loss']['ours']:.6f}, "
              f"transformers {r['first_lm_loss']['theirs']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
