"""W8A8 (issue 12): dsv3-quantize's accuracy, weight memory, throughput, and W8A8 vs float CPU decode speed.

1. Accuracy: the demo-trained tiny model (`python -m mindformers_dsv3.demo`, stock Trainer) quantized by
   dsv3-quantize with each `--smooth`, loaded by our model (from_hf_config + load_hf_checkpoint), against the
   float model on held-out text of the same synthetic language: greedy top-1 agreement, mean KL(float || w8a8),
   perplexity of each (targets: >= 95%, <= 0.05, +3% at most).
2. The small config (hidden 512, 8 layers, 16 experts top-4; bench/common.py), random weights, calibrated on
   a synthetic language (a 4096-word tokenizer written for it): dsv3-quantize wall time and input MB/s;
   weight bytes of the quantized layers against their bf16 bytes (as stored: int8 + weight_scale +
   weight_offset + static vectors; as the model holds them: no weight_offset); greedy decode of 64 tokens
   after a 128-token prompt, W8A8 and float in their own worker processes, interleaved (bench/decode.py's
   measure): tokens/s and the ratio (target W8A8 >= 1.0x float).

    python bench/quant.py [--quick] [--steps 80] [--repeats 3] [--skip-accuracy] [--skip-decode]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import decode  # noqa: E402

import numpy as np  # noqa: E402

SMOOTHS = ("none", "smoothquant", "outlier-suppression+")


def accuracy(workdir, steps):
    """{smooth: figures} on the demo-trained tiny model."""
    from mindformers_dsv3.quant import quantize_run
    from mindformers_dsv3.quant.calibrate import compare_logits
    from tests.test_quantize import held_out_ids, language_texts, model_logits, trained_tiny_folder
    t0 = time.time()
    folder = trained_tiny_folder(workdir, steps=steps)
    print(f"[accuracy] demo model trained ({steps} steps) and exported in {time.time() - t0:.0f} s", flush=True)
    calib = language_texts(os.path.join(workdir, "calib.jsonl"), 3, 64, 64)
    ids = held_out_ids()
    ref = model_logits(folder, ids)
    out = {}
    for smooth in SMOOTHS:
        dst = os.path.join(workdir, f"w8a8-{smooth}")
        s = quantize_run.quantize(folder, dst, calib, smooth=smooth, samples=32, seq_len=64, progress=False)
        figures = compare_logits(ref[:, :-1], model_logits(dst, ids)[:, :-1], ids[:, 1:].astype(np.int64))
        figures["quantize_s"] = s["seconds"]
        out[smooth] = figures
        print(f"[accuracy] {smooth}: {figures}", flush=True)
    return out


def layer_bytes(src, dst):
    """Bytes of the quantized layers: W8A8 folder as stored / as the model holds them, and their bf16 bytes."""
    from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
    desc = json.load(open(os.path.join(dst, "quant_model_description.json"), encoding="utf-8"))
    stored = held = bf16 = 0
    with open_checkpoint(dst) as out, open_checkpoint(src) as inp:
        for name in out.keys():
            if desc.get(name, "FLOAT") == "FLOAT":
                continue
            nbytes = out.nbytes(name)
            stored += nbytes
            held += 0 if name.endswith("weight_offset") else nbytes
            if name.endswith(".weight"):
                bf16 += 2 * int(np.prod(inp.shape(name)))
    return {"stored_bytes": stored, "model_bytes": held, "bf16_bytes": bf16,
            "ratio_stored": stored / bf16, "ratio_model": held / bf16}


def small(workdir, repeats, run_decode):
    from mindformers_dsv3.data import SyntheticLanguage
    from mindformers_dsv3.quant import quantize_run
    config = common.small_config(decode.PROMPT_LEN + decode.NEW_TOKENS)
    result = {"shape": common.describe(config)}
    lang = SyntheticLanguage(4096, seed=0, noise=0.1, data_seed=3)  # ids < 4096 of the 32000 (word list limit)
    with common.Checkpoint(config, seed=0, keep_state=False) as ckpt:
        lang.write_tokenizer(ckpt.folder)
        calib = os.path.join(workdir, "small_calib.jsonl")
        with open(calib, "w", encoding="utf-8") as f:
            for i in range(32):
                f.write(json.dumps({"text": lang.decode(lang.sample(i, 256))}) + "\n")
        dst = os.path.join(workdir, "small-w8a8")
        in_bytes = sum(os.path.getsize(os.path.join(ckpt.folder, n)) for n in os.listdir(ckpt.folder)
                       if n.endswith(".safetensors"))
        s = quantize_run.quantize(ckpt.folder, dst, calib, samples=16, seq_len=256, progress=False)
        result["quantize"] = {"seconds": s["seconds"], "input_bytes": in_bytes, "tensors": s["tensors"],
                              "input_MB_per_s": in_bytes / s["seconds"] / 1e6,
                              "calibration_tokens": s["calibration_tokens"]}
        result["memory"] = layer_bytes(ckpt.folder, dst)
        print(f"[small] quantize {result['quantize']}\n[small] memory {result['memory']}", flush=True)
        if run_decode:
            result["decode"] = decode_speed(ckpt.folder, dst, config, repeats)
    return result


def decode_speed(float_dir, w8a8_dir, config, repeats):
    prompt = np.random.default_rng(0).integers(2, config["vocab_size"], size=(1, decode.PROMPT_LEN)).astype(np.int32)
    eos = config["vocab_size"] + 7
    workers = {}
    try:
        for side, folder in (("float", float_dir), ("w8a8", w8a8_dir)):
            workers[side] = common.Worker("decode.OursSide", folder, decode.PROMPT_LEN + decode.NEW_TOKENS,
                                          threads=2, frameworks=("mindspore",))
        out = decode.measure(workers, prompt, repeats, eos)
    finally:
        for w in workers.values():
            w.close()
    same = np.array(out["float"]["tokens"]) == np.array(out["w8a8"]["tokens"])
    out["agree_tokens"] = int(same.sum())
    for key in ("tok_per_s", "tok_per_s_best", "decode_tok_per_s"):
        out[f"ratio_{key}"] = out["w8a8"][key] / out["float"][key]
    print(f"[small] decode float {out['float']['tok_per_s']:.1f} tok/s, w8a8 {out['w8a8']['tok_per_s']:.1f} tok/s "
          f"({out['ratio_tok_per_s']:.2f}x; best runs {out['ratio_tok_per_s_best']:.2f}x), same tokens "
          f"{out['agree_tokens']}/{decode.NEW_TOKENS}", flush=True)
    return out


def table(result):
    rows = ["| --smooth | top-1 agreement | mean KL | ppl float | ppl W8A8 | ppl change | quantize s |",
            "|---|---|---|---|---|---|---|"]
    for smooth, f in result.get("accuracy", {}).items():
        rows.append(f"| {smooth} | {100 * f['top1_agreement']:.2f}% | {f['mean_kl']:.2e} | {f['ppl_ref']:.4f} | "
                    f"{f['ppl_other']:.4f} | {100 * f['ppl_increase']:+.3f}% | {f['quantize_s']:.1f} |")
    s = result.get("small")
    if s:
        m, q = s["memory"], s["quantize"]
        rows += ["", "| small config | value |", "|---|---|",
                 f"| dsv3-quantize | {q['seconds']:.1f} s, {q['input_MB_per_s']:.1f} MB/s of fp32 input, "
                 f"{q['calibration_tokens']} calibration tokens |",
                 f"| quantized layers / bf16 (as stored) | {m['ratio_stored']:.3f} |",
                 f"| quantized layers / bf16 (model parameters) | {m['ratio_model']:.3f} |"]
        d = s.get("decode")
        if d:
            rows += [f"| decode float tok/s (64 new, median / best) | {d['float']['tok_per_s']:.1f} / "
                     f"{d['float']['tok_per_s_best']:.1f} |",
                     f"| decode W8A8 tok/s (64 new, median / best) | {d['w8a8']['tok_per_s']:.1f} / "
                     f"{d['w8a8']['tok_per_s_best']:.1f} |",
                     f"| W8A8 / float | {d['ratio_tok_per_s']:.2f}x (best runs {d['ratio_tok_per_s_best']:.2f}x; "
                     f"steady decode {d['ratio_decode_tok_per_s']:.2f}x) |",
                     f"| same greedy tokens | {d['agree_tokens']}/{decode.NEW_TOKENS} |"]
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed decode repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80, help="demo training steps")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    common.setup(2, frameworks=("mindspore",))
    workdir = tempfile.mkdtemp(prefix="dsv3-bench-quant-")
    result = {"machine": common.machine_info()}
    try:
        if not args.skip_accuracy:
            result["accuracy"] = accuracy(workdir, args.steps)
        result["small"] = small(workdir, 1 if args.quick else args.repeats, not args.skip_decode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    common.write_results("quant", result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
