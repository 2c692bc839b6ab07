"""Greedy decode speed: ours (stock MindFormers generate, graph mode) vs transformers (eager, CPU torch).

Batch 1, a 128-token prompt, 64 new tokens, greedy, identical fp32 weights, for the tiny test config
and a "small" config (hidden 512, 8 layers, 16 experts top-4). Per model and config:

* generate(64):  end-to-end `generate(..., max_new_tokens=64)` (compile excluded: one warm-up first);
* generate(1):   the same call with one new token = time to first token (prefill + one sampling);
* decode tok/s:  63 / (t64 - t1), the steady per-token rate;
* raw forward:   the model alone, without the generate loop: ours calls the cell directly the way
                 stock generate does (prefill padded to seq_length, then one token per step through
                 the paged cache); theirs calls forward with past_key_values. generate step - raw step
                 is the host-side cost of the generate loop.

Both models must produce the same 64 tokens (agreement is printed). EOS is set to an id the models
cannot produce so that both always generate 64 tokens. Each model runs in its own worker process
(no thread pool of the other framework beside it); the parent interleaves their runs.

    python bench/decode.py [--quick] [--configs tiny,small] [--repeats N]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 128, 64


# ----------------------------------------------------------------------------- ours
def ours_generate(model, prompt, new_tokens, eos):
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_past=True, eos_token_id=[eos])
    return np.asarray(out[0][prompt.shape[1]:])


def _set_phase(model, prefill):
    if hasattr(model, "set_cache_phase"):
        model.set_cache_phase(prefill=prefill)
    else:  # before the model had the hook: stock generate's own phase names
        model.add_flags_custom(is_first_iteration=prefill)
        model.phase = "prefill" if prefill else "increment"


def ours_raw(model, prompt, new_tokens):
    """The cell called as stock generate calls it, without GenerationMixin; returns times and tokens."""
    from mindspore import Tensor
    from mindformers.modules.block_tables import BlockTables

    cfg = model.config
    mgr = BlockTables(cfg.num_blocks, cfg.block_size, cfg.seq_length)
    mgr.init_cache_engine(1)
    lengths = np.array([prompt.shape[1]], dtype=np.int32)
    padded = np.full((1, cfg.seq_length), 1, dtype=np.int32)
    padded[0, :prompt.shape[1]] = prompt[0]
    finished = [False]
    t0 = time.perf_counter()
    block_tables, slots = mgr.assemble_pa_full_inputs(cfg.seq_length, lengths, finished)
    _set_phase(model, prefill=True)
    logits = model(Tensor(padded), batch_valid_length=Tensor(lengths.reshape(1, -1)),
                   block_tables=Tensor(block_tables), slot_mapping=Tensor(slots)).asnumpy()
    # the prefill returns every padded position's logits, or only the last valid one's
    token = int((logits[lengths[0] - 1] if logits.shape[0] > 1 else logits[0]).argmax())
    prefill = time.perf_counter() - t0
    tokens, steps = [token], []
    _set_phase(model, prefill=False)
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        lengths = lengths + 1
        block_tables, slots = mgr.assemble_pa_inc_inputs(lengths, finished)
        logits = model(Tensor(np.array([[token]], dtype=np.int32)),
                       batch_valid_length=Tensor(lengths.reshape(1, -1)),
                       block_tables=Tensor(block_tables), slot_mapping=Tensor(slots)).asnumpy()
        token = int(logits[0].argmax())
        tokens.append(token)
        steps.append(time.perf_counter() - t)
    mgr.clear_cache()
    _set_phase(model, prefill=True)
    return prefill, steps, np.array(tokens)


# ----------------------------------------------------------------------------- theirs
def theirs_generate(model, prompt, new_tokens, eos):
    import torch
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt.astype(np.int64)), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=0, use_cache=True,
                             eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones_like(
                                 torch.from_numpy(prompt.astype(np.int64))))
    return out[0, prompt.shape[1]:].numpy()


def theirs_raw(model, prompt, new_tokens):
    import torch
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.from_numpy(prompt.astype(np.int64)), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - t0
        past, tokens, steps = out.past_key_values, [token], []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            steps.append(time.perf_counter() - t)
    return prefill, steps, np.array(tokens)


# ----------------------------------------------------------------------------- the two sides
class OursSide:
    """Our model in a worker process (see common.Worker)."""
    frameworks = ("mindspore",)
    generate_fn, raw_fn = staticmethod(ours_generate), staticmethod(ours_raw)

    def __init__(self, folder, seq_length):
        self.model = common.build_ours(folder, seq_length=seq_length, batch_size=1)

    def generate(self, prompt, new_tokens, eos):
        t = time.perf_counter()
        tokens = self.generate_fn(self.model, prompt, new_tokens, eos)
        return time.perf_counter() - t, tokens

    def raw(self, prompt, new_tokens):
        return self.raw_fn(self.model, prompt, new_tokens)


class TheirsSide(OursSide):
    """transformers' model in a worker process."""
    frameworks = ("torch",)
    generate_fn, raw_fn = staticmethod(theirs_generate), staticmethod(theirs_raw)

    def __init__(self, folder, seq_length):  # pylint: disable=super-init-not-called
        self.model = common.build_theirs(None, folder=folder)


SIDES = {"ours": OursSide, "theirs": TheirsSide}


def measure(workers, prompt, repeats, eos):
    """Warm every side up, then time the sides interleaved so load noise hits them alike."""
    tokens, samples, first_call, threads = {}, {}, {}, {}
    for side, worker in workers.items():
        first_call[side], tokens[side] = worker.call("generate", prompt, NEW_TOKENS, eos)  # compiles ours
        worker.call("generate", prompt, 1, eos)
        worker.call("raw", prompt, 2)                           # the direct call compiles its own graphs
        threads[side] = worker.call("thread_info")
        samples[side] = {"t64": [], "t1": [], "raw_prefill": [], "raw_step": []}
    for _ in range(repeats):
        for side, worker in workers.items():
            rec = samples[side]
            seconds, again = worker.call("generate", prompt, NEW_TOKENS, eos)
            rec["t64"].append(seconds)
            rec["t1"].append(worker.call("generate", prompt, 1, eos)[0])
            pre, steps, raw_tokens = worker.call("raw", prompt, NEW_TOKENS)
            rec["raw_prefill"].append(pre)
            rec["raw_step"].append(float(np.median(steps)))
            if not np.array_equal(again, tokens[side]) or not np.array_equal(raw_tokens, tokens[side]):
                print(f"WARNING: {side}: generate and the raw loop disagree or vary between runs",
                      file=sys.stderr)
    out = {}
    for side, rec in samples.items():
        s64, s1 = common.summary(rec["t64"]), common.summary(rec["t1"])
        step = (s64["median"] - s1["median"]) / (NEW_TOKENS - 1)
        raw_step = common.summary(rec["raw_step"])["median"]
        out[side] = {
            "threads": threads[side],
            "first_call_s": first_call[side],
            "generate64_s": s64, "generate1_s": s1,
            "tok_per_s": NEW_TOKENS / s64["median"],
            "tok_per_s_best": NEW_TOKENS / s64["min"],
            "decode_step_ms": 1e3 * step,
            "decode_tok_per_s": 1.0 / step,
            "raw_prefill_ms": common.summary([1e3 * x for x in rec["raw_prefill"]]),
            "raw_step_ms": common.summary([1e3 * x for x in rec["raw_step"]]),
            "loop_overhead_ms": 1e3 * (step - raw_step),
            "tokens": np.asarray(tokens[side]).tolist(),
        }
    return out


def run_config(name, config, repeats, seed=0, theirs=True, threads=2):
    print(f"[{name}] {common.describe(config)}: building checkpoint and both models", flush=True)
    prompt = np.random.default_rng(seed).integers(2, config["vocab_size"], size=(1, PROMPT_LEN)).astype(np.int32)
    eos = config["vocab_size"] + 7                          # never produced: always 64 new tokens
    result = {"config": name, "shape": common.describe(config), "hf_config": config}
    sides = ["ours", "theirs"] if theirs else ["ours"]
    workers = {}
    with common.Checkpoint(config, seed=seed, keep_state=False) as ckpt:
        try:
            for side in sides:
                cls = SIDES[side]
                workers[side] = common.Worker(f"decode.{cls.__name__}", ckpt.folder, PROMPT_LEN + NEW_TOKENS,
                                              threads=threads, frameworks=cls.frameworks)
            print(f"[{name}] measuring ({repeats} repeats)", flush=True)
            result.update(measure(workers, prompt, repeats, eos))
        finally:
            for worker in workers.values():
                worker.close()
    if not theirs:
        return result
    a, b = np.array(result["ours"]["tokens"]), np.array(result["theirs"]["tokens"])
    same = a == b
    result["agree_tokens"] = int(same.sum())
    result["first_mismatch"] = None if same.all() else int(np.argmin(same))
    result["ratio_tok_per_s"] = result["ours"]["tok_per_s"] / result["theirs"]["tok_per_s"]
    result["ratio_tok_per_s_best"] = result["ours"]["tok_per_s_best"] / result["theirs"]["tok_per_s_best"]
    result["ratio_decode"] = result["ours"]["decode_tok_per_s"] / result["theirs"]["decode_tok_per_s"]
    print(f"[{name}] agreement {result['agree_tokens']}/{NEW_TOKENS}"
          + ("" if result["first_mismatch"] is None else f", first mismatch at {result['first_mismatch']}"),
          flush=True)
    return result


COLUMNS = [
    ("config", "config", ""), ("side", "model", ""),
    ("tok_s", "tok/s (64 new)", ".1f"), ("ratio", "ours/theirs", ".2f"),
    ("best", "best run tok/s", ".1f"), ("best_ratio", "ours/theirs", ".2f"),
    ("ttft", "generate(1) ms", ".1f"), ("dec", "decode tok/s", ".1f"), ("dec_ratio", "ours/theirs", ".2f"),
    ("raw_pre", "raw prefill ms", ".1f"), ("raw_step", "raw step ms", ".2f"),
    ("loop", "loop overhead ms/step", ".2f"), ("agree", "same tokens", ""),
]


def table(results):
    rows = []
    for r in results:
        for side, label in (("ours", "ours (MindSpore graph)"), ("theirs", "transformers (torch eager)")):
            if side not in r:
                continue
            m = r[side]
            rows.append({
                "config": r["config"], "side": label, "tok_s": m["tok_per_s"], "best": m["tok_per_s_best"],
                "ttft": 1e3 * m["generate1_s"]["median"], "dec": m["decode_tok_per_s"],
                "raw_pre": m["raw_prefill_ms"]["median"], "raw_step": m["raw_step_ms"]["median"], "loop": m["loop_overhead_ms"],
                "ratio": r.get("ratio_tok_per_s") if side == "ours" else None,
                "best_ratio": r.get("ratio_tok_per_s_best") if side == "ours" else None,
                "dec_ratio": r.get("ratio_decode") if side == "ours" else None,
                "agree": f"{r['agree_tokens']}/{NEW_TOKENS}" if side == "ours" and "agree_tokens" in r else None,
            })
    return common.markdown_table(COLUMNS, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat per measurement")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 1)")
    parser.add_argument("--configs", default="tiny,small", help="comma list of: tiny, small")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--ours-only", action="store_true", help="skip transformers (A/B of our model)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    makers = {"tiny": lambda: common.tiny_config(PROMPT_LEN + NEW_TOKENS),
              "small": lambda: common.small_config(PROMPT_LEN + NEW_TOKENS)}
    results = [run_config(name, makers[name](), repeats, theirs=not args.ours_only, threads=args.threads)
               for name in args.configs.split(",")]
    payload = {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "batch": 1, "repeats": repeats,
               "torch_threads": args.threads, "results": results}
    common.write_results("decode", payload, table(results))
    return 0 if all(r.get("agree_tokens", NEW_TOKENS) == NEW_TOKENS for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
