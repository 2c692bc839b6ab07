"""Speculative decoding with the MTP layer: tokens/s with and without it, in the same run.

Per model: plain greedy `generate` and `generate` with `num_speculative_tokens` = k (each k given), batch 1,
greedy, the same prompts and weights, compile excluded (one warm-up call); the runs are interleaved (plain,
k=1, k=2, ..., plain, ...) and the best of `--repeats` is kept. Printed per k: tokens/s of
both, acceptance rate, tokens per main-model forward (`model.speculative_stats`), `speed-up <x>`, and
whether the tokens are identical (they must be).

* tiny-trained: the demo's tiny model (configs/tiny/finetune_deepseek3_tiny.yaml, one MTP layer) trained
  with the MTP loss through stock Trainer (`mindformers_dsv3.demo.train`; about 5 minutes on 2 cores),
  or the checkpoint given with --checkpoint (e.g. from `python -m mindformers_dsv3.demo --keep DIR`);
  prompts of the synthetic language.
* small: bench/common.small_config with one MTP layer, random weights (the random MTP layer's drafts are
  almost never accepted: the figure shows the cost of drafting when it does not pay).

    python bench/mtp.py [--configs tiny-trained,small] [--k 1,2] [--new-tokens 48] [--checkpoint PATH]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

PROMPTS = 4          # prompts per measurement, generated one after another (batch 1)


def _timed(model, prompts, new_tokens, eos):
    """(seconds, generated tokens, outputs, [stats per call]) of greedy generate over `prompts` (batch 1)."""
    outs, stats, total = [], [], 0
    start = time.perf_counter()
    for prompt in prompts:
        out = model.generate([prompt], max_new_tokens=new_tokens, do_sample=False, eos_token_id=[eos])
        outs.append(np.asarray(out[0]).tolist())
        total += len(outs[-1]) - len(prompt)
        stats.append(getattr(model, "speculative_stats", None))
    return time.perf_counter() - start, total, outs, stats


def compare(name, build, ks, prompts, new_tokens, eos, repeats):
    """Plain vs each k, runs interleaved (plain, k1, k2, ..., plain, ...) so that the machine's load hits all
    alike; the best run of each is kept. Returns one row per k."""
    models = {k: build(k) for k in [0] + list(ks)}
    runs = {k: [] for k in models}
    for k, model in models.items():
        _timed(model, prompts[:1], new_tokens, eos)      # compile
    for _ in range(repeats):
        for k, model in models.items():
            runs[k].append(_timed(model, prompts, new_tokens, eos))
    best = {k: min(r[0] for r in runs[k]) for k in runs}
    reference, total = runs[0][0][2], runs[0][0][1]
    rows = []
    for k in ks:
        stats = runs[k][0][3]
        drafted = sum(s["num_drafted"] for s in stats)
        accepted = sum(s["num_accepted"] for s in stats)
        forwards = sum(s["num_forwards"] for s in stats)
        generated = sum(s["num_generated"] for s in stats)
        row = {"config": name, "k": k, "plain_tok_s": total / best[0], "spec_tok_s": runs[k][0][1] / best[k],
               "acceptance": accepted / drafted if drafted else 0.0,
               "tokens_per_forward": generated / forwards if forwards else 0.0,
               "identical": all(r[2] == reference for r in runs[k]),
               "plain_runs_s": [r[0] for r in runs[0]], "spec_runs_s": [r[0] for r in runs[k]]}
        row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
        rows.append(row)
        print(f"[{name}] k={k}: plain {row['plain_tok_s']:.1f} tok/s, speculative {row['spec_tok_s']:.1f} tok/s, "
              f"acceptance {row['acceptance']:.3f}, {row['tokens_per_forward']:.2f} tokens/forward, "
              f"identical tokens: {row['identical']}", flush=True)
        print(f"speed-up {row['speedup']:.2f}", flush=True)
    common.release(*models.values())
    return rows


# ----------------------------------------------------------------------------- the demo-trained tiny model
def _train(workdir):
    from mindformers_dsv3 import demo
    print("[tiny-trained] training the demo's tiny model (stock Trainer, MTP loss)", flush=True)
    _, checkpoint, _ = demo.train(workdir)
    return checkpoint


def tiny_trained(ks, new_tokens, repeats, checkpoint=None):
    import mindspore as ms
    from mindformers import AutoModel, MindFormerConfig
    from mindformers_dsv3.data import SyntheticLanguage
    from mindformers_dsv3.demo import TOKENIZER, YAML
    from mindformers_dsv3.paths import register_dir

    os.environ["REGISTER_PATH"] = register_dir()
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-mtp-") as workdir:
        cwd = os.getcwd()
        os.chdir(workdir)   # auto_register writes ./modules
        try:
            checkpoint = checkpoint or _train(workdir)
            cfg = MindFormerConfig(YAML)
            cfg.processor.tokenizer.tokenizer_file = TOKENIZER
            loader = cfg.train_dataset.data_loader
            language = SyntheticLanguage(loader.vocab_size, seed=loader.seed, noise=loader.noise)
            params = ms.load_checkpoint(checkpoint, format="safetensors")

            def build(k):
                cfg.model.model_config.use_past = True
                cfg.model.model_config.batch_size = 1
                cfg.model.model_config.num_speculative_tokens = k
                model = AutoModel.from_config(cfg)
                ms.load_param_into_net(model, params)
                model.set_train(False)
                return model

            prompts = [[0] + language.prompt(100 + i, 4) for i in range(PROMPTS)]
            eos = loader.vocab_size + 7     # never produced: every call generates new_tokens
            common.setup(frameworks=("mindspore",))
            return compare("tiny-trained", build, ks, prompts, new_tokens, eos, repeats)
        finally:
            os.chdir(cwd)


def small(ks, new_tokens, repeats):
    from tests.model_fixtures import build_ms_model
    config = common.small_config(256, num_nextn_predict_layers=1)
    prompts = [np.random.default_rng(i).integers(2, config["vocab_size"], 16).tolist() for i in range(PROMPTS)]
    with common.Checkpoint(config, seed=0, keep_state=False) as ckpt:
        def build(k):
            return build_ms_model(ckpt.folder, seq_length=128, batch_size=1, num_blocks=8, num_speculative_tokens=k)
        return compare("small", build, ks, prompts, new_tokens, config["vocab_size"] + 7, repeats)


COLUMNS = [("config", "model", ""), ("k", "k", ""), ("plain_tok_s", "plain tok/s", ".1f"),
           ("spec_tok_s", "speculative tok/s", ".1f"), ("speedup", "speed-up", ".2f"),
           ("acceptance", "acceptance", ".3f"), ("tokens_per_forward", "tokens/forward", ".2f"),
           ("identical", "same tokens", "")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny-trained,small", help="comma list of: tiny-trained, small")
    parser.add_argument("--k", default="1,2", help="num_speculative_tokens values (comma list)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best kept)")
    parser.add_argument("--checkpoint", default=None, help="a trained tiny checkpoint (skips training)")
    args = parser.parse_args(argv)
    common.setup(frameworks=("mindspore",))
    ks = [int(k) for k in args.k.split(",")]
    rows = []
    for name in args.configs.split(","):
        if name == "tiny-trained":
            rows += tiny_trained(ks, args.new_tokens, args.repeats, args.checkpoint)
        elif name == "small":
            rows += small(ks, args.new_tokens, args.repeats)
        else:
            parser.error(f"unknown config {name!r} (tiny-trained, small)")
    payload = {"new_tokens": args.new_tokens, "prompts": PROMPTS, "batch": 1, "repeats": args.repeats, "rows": rows}
    common.write_results("mtp", payload, common.markdown_table(COLUMNS, rows))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
