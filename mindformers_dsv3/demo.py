"""`make demo`: finetune a tiny DeepSeek-V3 on a CPU through stock MindFormers, then let it talk.

    python -m mindformers_dsv3.demo [--steps N] [--keep DIR]

1. Trains the tiny model of ``configs/tiny/finetune_deepseek3_tiny.yaml`` (4 layers, 8 experts,
   one MTP layer, aux-loss-free routing biases) from random weights with stock ``Trainer`` (the
   ``run_mindformer.py`` flow: ``MindFormerConfig`` -> ``build_context`` -> ``Trainer(config).train()``)
   on the generated synthetic language of ``mindformers_dsv3/data.py``: every word has one
   successor, with 10% random jumps.
2. Loads the saved safetensors checkpoint into the YAML's model in predict mode (latent KV cache)
   and continues a few prompts with stock ``pipeline("text_generation")`` and the word-level
   ``DeepseekV3Tokenizer`` of ``configs/tiny/synthetic_tokenizer``.
3. Prints each prompt, the model's continuation and the expected one (the successor chain);
   exits 1 if any continuation is wrong.

Everything is written to a temporary folder (removed at the end unless ``--keep DIR``); MindFormers'
full logs are under its ``output/log``.
"""
import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

from mindformers_dsv3.paths import configs_dir, register_dir

# The shipped YAML, tokenizer and REGISTER_PATH shims: beside the package in a source checkout,
# inside it in a wheel install (mindformers_dsv3.paths).
YAML = os.path.join(configs_dir(), "tiny", "finetune_deepseek3_tiny.yaml")
TOKENIZER = os.path.join(configs_dir(), "tiny", "synthetic_tokenizer", "tokenizer.json")
REGISTER = register_dir()
PROMPT_WORDS, NEW_WORDS, NUM_PROMPTS = 4, 12, 3


_STDOUT = sys.stdout


def _say(*parts):
    print(*parts, file=_STDOUT, flush=True)


def _check_data_files():
    for path in (YAML, TOKENIZER, os.path.join(REGISTER, "deepseek3.py")):
        if not os.path.isfile(path):
            raise SystemExit(f"demo: {path} not found; the mindformers-dsv3 install is incomplete (reinstall it)")


def _quiet_mindformers_stdout(output_dir):
    """MindFormers logs INFO to stdout (the full config, every callback); keep stdout for errors only.

    Its logger is created per output folder on first use and the Trainer reuses it; the full INFO
    log still goes to <output_dir>/log/rank_0/info.log.
    """
    import logging
    from mindformers.tools.logger import get_logger
    os.environ["LOCAL_DEFAULT_PATH"] = os.path.realpath(output_dir)  # what set_output_path sets, silently
    for handler in get_logger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def _progress_callback(total_steps, every=10):
    from mindformers_dsv3.training import MoEMonitor

    class Progress(MoEMonitor):
        """Prints the MoEMonitor record every `every` steps (and the compile time of the first step)."""

        def on_train_begin(self, run_context):
            super().on_train_begin(run_context)
            self.start = time.time()

        def on_train_step_end(self, run_context):
            super().on_train_step_end(run_context)
            r = self.history[-1]
            if r["step"] == 1:
                _say(f"  step  1/{total_steps}: graph compiled and first step done in {time.time() - self.start:.1f} s")
            if r["step"] % every == 0 or r["step"] == total_steps:
                _say(f"  step {r['step']:2d}/{total_steps}: loss {r['loss']:.3f} (next token {r['lm_loss']:.3f}, "
                     f"MTP {r['mtp_loss']:.3f}, balance {r['balance_loss']:.5f}), "
                     f"expert load max/mean {r['imbalance']:.2f}, {time.time() - self.start:.0f} s")

    return Progress(per_print_times=10**9)


def train(workdir, steps=None):
    """Finetune through stock Trainer; returns (config, final checkpoint path, history)."""
    from mindformers import MindFormerConfig, Trainer, build_context

    output_dir = os.path.join(workdir, "output")
    _quiet_mindformers_stdout(output_dir)
    cfg = MindFormerConfig(YAML)
    cfg.output_dir = output_dir
    cfg.processor.tokenizer.tokenizer_file = TOKENIZER
    if steps:
        cfg.train_dataset.data_loader.num_samples = steps * cfg.runner_config.batch_size
    total = cfg.train_dataset.data_loader.num_samples // cfg.runner_config.batch_size
    build_context(cfg)
    progress = _progress_callback(total)
    _say(f"[1/2] finetune: {total} steps of {cfg.runner_config.batch_size} x {cfg.model.model_config.seq_length} "
         f"tokens, stock Trainer, {cfg.runner_wrapper.type} + {cfg.optimizer.type} (graph mode, CPU)")
    # Trainer pprints the whole resolved config to stdout: keep it in a file
    with open(os.path.join(output_dir, "trainer_stdout.log"), "w", encoding="utf-8") as out, \
            contextlib.redirect_stdout(out):
        Trainer(cfg, callbacks=[progress]).train()
    folder = os.path.join(cfg.output_dir, "checkpoint", "rank_0")
    saved = sorted((f for f in os.listdir(folder) if f.endswith(".safetensors")),
                   key=lambda f: int(f.rsplit("_", 1)[-1].split(".")[0]))
    if not saved:
        raise SystemExit(f"demo: CheckpointMonitor saved no checkpoint in {folder}")
    return cfg, os.path.join(folder, saved[-1]), progress.history


def generate(cfg, checkpoint, prompts):
    """The YAML's model in predict mode with the trained weights; stock pipeline("text_generation")."""
    import mindspore as ms
    from mindformers import AutoModel, pipeline
    from mindformers.models.build_tokenizer import build_tokenizer

    cfg.model.model_config.use_past = True
    cfg.model.model_config.batch_size = 1
    model = AutoModel.from_config(cfg)
    not_loaded, _ = ms.load_param_into_net(model, ms.load_checkpoint(checkpoint, format="safetensors"))
    # the cache is not trained; CheckpointMonitor leaves the per-step expert loads out
    missing = [name for name in not_loaded if not name.endswith(("latent_cache", "expert_load"))]
    if missing:
        raise SystemExit(f"demo: {checkpoint} lacks {missing[:5]}")
    model.set_train(False)
    tokenizer = build_tokenizer(cfg.processor.tokenizer)
    generator = pipeline("text_generation", model=model, tokenizer=tokenizer)
    outputs = generator(prompts, max_new_tokens=NEW_WORDS, do_sample=False)
    return [out["text_generation_text"][0] for out in outputs]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindformers_dsv3.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the YAML's, 80)")
    parser.add_argument("--keep", metavar="DIR", default=None, help="keep outputs (checkpoints, logs) in DIR")
    args = parser.parse_args(argv)
    _check_data_files()
    os.environ.setdefault("GLOG_v", "3")
    os.environ["REGISTER_PATH"] = REGISTER
    start = time.time()
    workdir = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="dsv3-demo-")
    os.makedirs(workdir, exist_ok=True)
    previous_cwd = os.getcwd()
    os.chdir(workdir)  # auto_register copies register/deepseek3.py into ./modules

    from mindformers_dsv3.data import SyntheticLanguage
    _say(f"DeepSeek-V3 tiny on stock MindFormers, CPU. Config: {YAML}; work folder {workdir}")
    try:
        cfg, checkpoint, history = train(workdir, args.steps)
        loader = cfg.train_dataset.data_loader
        language = SyntheticLanguage(loader.vocab_size, seed=loader.seed, noise=loader.noise)
        first = sum(r["loss"] for r in history[:10]) / len(history[:10])
        last = sum(r["loss"] for r in history[-10:]) / len(history[-10:])
        floor = language.bigram_entropy() * (1 + cfg.model.model_config.mtp_loss_factor)
        _say(f"      loss {first:.3f} -> {last:.3f} (mean of the first / last 10 steps; a perfect model scores "
             f"{floor:.3f}); checkpoint {os.path.relpath(checkpoint, workdir)}")

        prompts = [language.decode(language.prompt(i, PROMPT_WORDS)) for i in range(NUM_PROMPTS)]
        _say(f"[2/2] generate: pipeline('text_generation'), greedy, {NEW_WORDS} new words per prompt, latent KV cache")
        texts = generate(cfg, checkpoint, prompts)
        wrong = 0
        for prompt, text in zip(prompts, texts):
            expected = language.decode(language.continuation(language.encode(prompt), NEW_WORDS))
            continuation = text[len(prompt):].strip() if text.startswith(prompt) else text
            ok = continuation == expected
            wrong += not ok
            _say(f"  prompt:       {prompt}\n  continuation: {continuation}\n  expected:     {expected}\n"
                 f"  {'match' if ok else 'MISMATCH'}")
        _say(f"{'OK' if not wrong else 'FAILED'}: {NUM_PROMPTS - wrong}/{NUM_PROMPTS} continuations as expected; "
             f"total {time.time() - start:.0f} s. MindFormers logs: {os.path.join(cfg.output_dir, 'log')}"
             f"{'' if args.keep else ' (removed; keep them with --keep DIR)'}")
        code = 1 if wrong else 0
    finally:
        os.chdir(previous_cwd)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without C++ static destructors: pyarrow (imported by MindFormers) can abort in its
    # registry destructor at interpreter exit (see tests/conftest.py).
    os._exit(status)
