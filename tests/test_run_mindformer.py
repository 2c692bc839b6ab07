"""The ``run_mindformer.py`` flow with the tiny training YAMLs: pretrain -> finetune -> predict.

``run_mindformer.py`` is not in the mindformers wheel (it lives in a MindFormers source checkout). What
it does is small (MindFormers 1.7.0): ``MindFormerConfig(--config, run_mode=--run_mode)``, the CLI
overrides (``--load_checkpoint``, ``--options a.b=c`` via ``merge_from_dict``, ``--num_samples`` ->
``train_dataset.data_loader.num_samples``, ``--output_dir``, ``--predict_data`` -> ``input_data``),
``REGISTER_PATH`` = ``--register_path`` (also appended to ``sys.path``), then ``main``:
``set_output_path``, ``build_context``, ``Trainer(config)`` and ``.train()`` for train *and* finetune,
``.predict(predict_checkpoint=load_checkpoint, input_data=..., batch_size=..., adapter_id=...)`` for
predict. ``stock_flow`` below does exactly that in this process, in a tmp working directory.

With ``MINDFORMERS_HOME`` pointing at a MindFormers 1.7.0 checkout, the script itself runs as a
subprocess for finetune and then predict (``git -C <mindformers repo> archive v1.7.0 | tar -x -C DIR``
makes one).

Single-device MindFormers refuses a checkpoint inside a ``rank_*`` folder (it takes it for a
distributed one), so each step hands the next a copy of the checkpoint outside ``rank_0/``.
"""
import os
import subprocess
import sys

import pytest
from mindformers import MindFormerConfig, Trainer, build_context
from mindformers.tools import set_output_path

from mindformers_dsv3.data import SyntheticLanguage
from tests.training_fixtures import (FINETUNE_YAML, PRETRAIN_YAML, REGISTER_DIR, TOKENIZER_FILE, checkpoints,
                                     history, mean, standalone_copy)

PRETRAIN_STEPS, FINETUNE_STEPS, BATCH = 40, 40, 8
PREDICT_OPTIONS = {"model.model_config.use_past": True, "model.model_config.batch_size": 1,
                   "model.model_config.max_decode_length": 13,   # BOS + 4 prompt words + 8 new
                   "processor.tokenizer.tokenizer_file": TOKENIZER_FILE}
NEW_TOKENS = 8


def stock_flow(config, register_path, run_mode=None, load_checkpoint=None, options=None, num_samples=None,
               output_dir=None, predict_data=None):
    """run_mindformer.py (MindFormers 1.7.0) for these arguments, in this process; returns (config, result)."""
    os.environ["REGISTER_PATH"] = register_path
    if register_path not in sys.path:
        sys.path.append(register_path)
    cfg = MindFormerConfig(config, run_mode=run_mode) if run_mode is not None else MindFormerConfig(config)
    if load_checkpoint is not None:
        cfg.load_checkpoint = load_checkpoint
    if options is not None:
        cfg.merge_from_dict(options)
    if cfg.run_mode == "predict":
        cfg.input_data = predict_data
    if num_samples is not None and cfg.train_dataset and cfg.train_dataset.data_loader:
        cfg.train_dataset.data_loader.num_samples = num_samples
    if output_dir is not None:
        cfg.output_dir = output_dir
    # main(config)
    set_output_path(cfg.output_dir)
    build_context(cfg)
    trainer = Trainer(cfg)
    result = None
    if cfg.run_mode in ("train", "finetune"):
        trainer.train()
    elif cfg.run_mode == "predict":
        result = trainer.predict(predict_checkpoint=cfg.load_checkpoint, input_data=cfg.input_data,
                                 batch_size=cfg.predict_batch_size, adapter_id=cfg.adapter_id)
    return cfg, result


def _language(yaml):
    loader = MindFormerConfig(yaml).train_dataset.data_loader
    return SyntheticLanguage(loader.vocab_size, seed=loader.seed, noise=loader.noise)


def _prompts_and_expected(language, count=2):
    prompts, expected = [], []
    for i in range(count):
        prompt = language.decode(language.prompt(i, 4))
        prompts.append(prompt)
        expected.append(prompt + " " + language.decode(language.continuation(language.encode(prompt), NEW_TOKENS)))
    return prompts, expected


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run_mindformer")
    saved_path = list(sys.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTER_PATH", "")
        mp.chdir(path)
        yield path
    sys.path[:] = saved_path


@pytest.fixture(scope="module")
def pretrained(workdir):
    cfg, _ = stock_flow(PRETRAIN_YAML, REGISTER_DIR, num_samples=PRETRAIN_STEPS * BATCH,
                        output_dir=str(workdir / "pretrain"))
    return cfg


@pytest.fixture(scope="module")
def finetuned(workdir, pretrained):
    start = standalone_copy(checkpoints(pretrained.output_dir)[PRETRAIN_STEPS], workdir / "pretrained")
    cfg, _ = stock_flow(FINETUNE_YAML, REGISTER_DIR, load_checkpoint=start, num_samples=FINETUNE_STEPS * BATCH,
                        output_dir=str(workdir / "finetune"))
    return cfg


def test_pretrain_yaml_trains(pretrained):
    assert pretrained.run_mode == "train"
    assert pretrained.train_dataset.input_columns == ["input_ids"]  # seq_length + 1 ids, shifted by the model
    records = history(pretrained)
    assert [r["global_step"] for r in records] == list(range(1, PRETRAIN_STEPS + 1))
    losses = [r["loss"] for r in records]
    assert mean(losses[-5:]) < 0.6 * mean(losses[:5])
    # the last step is saved even when it is not a multiple of save_checkpoint_steps
    assert PRETRAIN_STEPS in checkpoints(pretrained.output_dir)


def test_finetune_yaml_continues_from_the_pretrained_checkpoint(pretrained, finetuned):
    assert finetuned.run_mode == "finetune"
    assert finetuned.train_dataset.input_columns == ["input_ids", "labels"]
    before = [r["loss"] for r in history(pretrained)]
    after = [r["loss"] for r in history(finetuned)]
    assert len(after) == FINETUNE_STEPS
    # loaded weights, fresh optimizer: it starts where pretraining ended, not at ln(vocab)
    assert after[0] < 0.5 * before[0], (before[0], after[0])
    assert mean(after[-5:]) <= mean(before[-5:]) * 1.1


def test_predict_with_the_finetuned_checkpoint(workdir, finetuned):
    final = standalone_copy(checkpoints(finetuned.output_dir)[FINETUNE_STEPS], workdir / "final")
    prompts, expected = _prompts_and_expected(_language(FINETUNE_YAML))
    cfg, result = stock_flow(FINETUNE_YAML, REGISTER_DIR, run_mode="predict", load_checkpoint=final,
                             options=PREDICT_OPTIONS, output_dir=str(workdir / "predict"), predict_data=prompts)
    assert cfg.run_mode == "predict"
    texts = [r["text_generation_text"][0] for r in result]
    assert texts == expected
    assert os.path.isfile(workdir / "text_generation_result.txt")  # stock predict writes it to the cwd


# ----------------------------------------------------------------------------- the script itself
@pytest.mark.skipif(not os.environ.get("MINDFORMERS_HOME"), reason="MINDFORMERS_HOME (a MindFormers checkout) not set")
def test_run_mindformer_script_finetune_then_predict(tmp_path):
    script = os.path.join(os.environ["MINDFORMERS_HOME"], "run_mindformer.py")
    env = dict(os.environ, REGISTER_PATH="")

    def run(*args):
        cmd = [sys.executable, script, "--register_path", REGISTER_DIR, *args]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\nrc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    run("--config", FINETUNE_YAML)  # the YAML as shipped: 80 steps from random weights
    cfg = MindFormerConfig(FINETUNE_YAML)
    cfg.output_dir = str(tmp_path / "output")
    losses = [r["loss"] for r in history(cfg)]
    assert len(losses) == 80 and mean(losses[-10:]) < 0.6 * mean(losses[:10])
    final = standalone_copy(checkpoints(cfg.output_dir)[80], tmp_path / "final")

    prompts, expected = _prompts_and_expected(_language(FINETUNE_YAML), count=1)
    options = [f"{k}={v}" for k, v in PREDICT_OPTIONS.items()]
    run("--config", FINETUNE_YAML, "--run_mode", "predict", "--load_checkpoint", final,
        "--predict_data", prompts[0], "--options", *options)
    result = (tmp_path / "text_generation_result.txt").read_text(encoding="utf-8")
    assert expected[0] in result, (expected[0], result)
