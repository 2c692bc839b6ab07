"""Training through stock MindFormers ``Trainer`` on a CPU, from configs/tiny/finetune_deepseek3_tiny.yaml.

The flow is run_mindformer.py's: ``MindFormerConfig(yaml)`` + overrides, ``REGISTER_PATH``,
``build_context``, ``Trainer(config).train()`` (the script calls ``train()`` for finetune too), in a tmp
working directory. All runs start from one safetensors checkpoint whose routers are strongly
imbalanced (two experts per MoE layer carry a +0.3 selection bias, so every token picks them), and
read the same synthetic data:

* ``balanced``  bias_update_rate 0.01, 80 steps, checkpoints at steps 40 and 80;
* ``unbalanced`` bias_update_rate 0 (same start, same data);
* ``resumed``   resumes ``balanced`` from its step-40 checkpoint (weights, AdamW moments, step, data
  position) and must retrace its steps 41-80;
* predict: ``Trainer.predict`` with ``balanced``'s final checkpoint continues prompts of the synthetic
  language exactly.

The MoEMonitor callback (from the YAML) writes one JSON record per step; the tests read those.
"""
import os

import numpy as np
import mindspore as ms
import pytest
from mindformers import AutoModel, Trainer, build_context

from mindformers_dsv3.data import SyntheticLanguage
from tests.training_fixtures import (FINETUNE_YAML, REGISTER_DIR, checkpoints, history, mean,
                                     standalone_copy, training_config)

STEPS, SAVE_AT, BATCH = 80, 40, 8
SKEW, SKEWED_EXPERTS = 0.3, (0, 2)   # experts 0 and 2 sit in different groups (4 groups of 2)
BIAS = "e_score_correction_bias"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """cwd = a tmp dir (auto_register writes ./modules there), REGISTER_PATH = register/."""
    path = tmp_path_factory.mktemp("training")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTER_PATH", REGISTER_DIR)
        mp.chdir(path)
        yield path


@pytest.fixture(scope="module")
def skewed_start(workdir):
    """A safetensors checkpoint of the YAML's model with strongly imbalanced routing biases."""
    cfg = training_config(FINETUNE_YAML, workdir / "init")
    build_context(cfg)
    ms.set_seed(7)
    model = AutoModel.from_config(cfg)
    for name, param in model.parameters_and_names():
        if name.endswith(BIAS):
            bias = np.zeros(param.shape, np.float32)
            bias[list(SKEWED_EXPERTS)] = SKEW
            param.set_data(ms.Tensor(bias))
    os.makedirs(workdir / "init", exist_ok=True)
    path = os.path.join(workdir, "init", "skewed_start.safetensors")
    ms.save_checkpoint(model, path, format="safetensors")
    return path


def _train(workdir, name, load_checkpoint, resume=False, **model_keys):
    cfg = training_config(FINETUNE_YAML, workdir / name, steps=STEPS, batch_size=BATCH, save_steps=SAVE_AT,
                          **model_keys)
    cfg.load_checkpoint = load_checkpoint
    cfg.resume_training = resume
    build_context(cfg)
    Trainer(cfg).train()
    return {"history": history(cfg), "checkpoints": checkpoints(cfg.output_dir), "config": cfg}


@pytest.fixture(scope="module")
def balanced(workdir, skewed_start):
    return _train(workdir, "balanced", skewed_start, bias_update_rate=0.01)


@pytest.fixture(scope="module")
def unbalanced(workdir, skewed_start):
    return _train(workdir, "unbalanced", skewed_start, bias_update_rate=0.0)


@pytest.fixture(scope="module")
def resumed(workdir, balanced):
    start = standalone_copy(balanced["checkpoints"][SAVE_AT], workdir / "resume_from")
    return _train(workdir, "resumed", start, resume=True, bias_update_rate=0.01)


def _biases(path):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path, format="safetensors").items() if k.endswith(BIAS)}


# ----------------------------------------------------------------------------- losses
def test_loss_falls(balanced):
    losses = [r["loss"] for r in balanced["history"]]
    assert len(losses) == STEPS
    assert all(np.isfinite(losses))
    first, last = mean(losses[:10]), mean(losses[-10:])
    assert last < 0.6 * first, (first, last)


def test_mtp_loss_is_logged_and_falls(balanced):
    mtp = [r["mtp_loss"] for r in balanced["history"]]
    lm = [r["lm_loss"] for r in balanced["history"]]
    assert mean(mtp[:10]) > 3.0  # about ln(128) at the start: a real next-next-token loss
    assert mean(mtp[-10:]) < 0.6 * mean(mtp[:10]), (mean(mtp[:10]), mean(mtp[-10:]))
    factor = balanced["config"].model.model_config.mtp_loss_factor
    for r in balanced["history"]:
        assert r["loss"] == pytest.approx(r["lm_loss"] + factor * r["mtp_loss"] + r["balance_loss"], rel=1e-5)
        assert r["balance_loss"] > 0  # seq_balance_loss_alpha > 0 in the YAML
    assert mean(lm[-10:]) < 0.6 * mean(lm[:10])


# ----------------------------------------------------------------------------- routing balance
def test_router_biases_move(balanced, skewed_start):
    start, end = _biases(skewed_start), _biases(balanced["checkpoints"][STEPS])
    assert set(start) == set(end) and len(start) == 4  # 3 MoE decoder layers + the MTP layer
    for name in start:
        moved = end[name] - start[name]
        assert np.abs(moved).max() > 0.05, name
        # the favoured experts were overloaded: their bias went down
        assert (moved[list(SKEWED_EXPERTS)] < 0).all(), (name, moved)


def test_balancing_lowers_expert_load_imbalance(balanced, unbalanced, skewed_start):
    on = mean(r["imbalance"] for r in balanced["history"][-10:])
    off = mean(r["imbalance"] for r in unbalanced["history"][-10:])
    # two experts of eight take every token at the start: max/mean = 4
    assert balanced["history"][0]["imbalance"] == pytest.approx(4.0)
    assert off > 3.0, off
    assert on < 0.6 * off, (on, off)
    # without balancing the biases stay where they started
    start, end = _biases(skewed_start), _biases(unbalanced["checkpoints"][STEPS])
    for name in start:
        np.testing.assert_array_equal(start[name], end[name])


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_safetensors_with_optimizer_state(balanced):
    assert sorted(balanced["checkpoints"]) == [SAVE_AT, STEPS]
    names = set(ms.load_checkpoint(balanced["checkpoints"][STEPS], format="safetensors"))
    assert any(n.startswith("adam_m.") for n in names) and any(n.startswith("adam_v.") for n in names)
    assert "global_step" in names and "step_num" in names


def test_resume_reproduces_the_loss_curve(balanced, resumed):
    full = {r["global_step"]: r for r in balanced["history"]}
    again = resumed["history"]
    assert [r["global_step"] for r in again] == list(range(SAVE_AT + 1, STEPS + 1))
    for r in again:
        ref = full[r["global_step"]]
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
            assert r[key] == pytest.approx(ref[key], abs=1e-5, rel=1e-5), (r["global_step"], key)
    end_full = ms.load_checkpoint(balanced["checkpoints"][STEPS], format="safetensors")
    end_again = ms.load_checkpoint(resumed["checkpoints"][STEPS - SAVE_AT], format="safetensors")
    for name, value in end_full.items():
        if name.startswith("model.") or name.startswith("lm_head."):
            np.testing.assert_allclose(end_again[name].asnumpy(), value.asnumpy(), atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- predict
def test_trained_checkpoint_predicts_the_language(balanced, workdir):
    ckpt = standalone_copy(balanced["checkpoints"][STEPS], workdir / "final")
    cfg = training_config(FINETUNE_YAML, workdir / "predict")
    cfg.run_mode = "predict"
    cfg.load_checkpoint = ckpt
    cfg.model.model_config.use_past = True
    cfg.model.model_config.batch_size = 1
    new_tokens, prompt_words = 12, 4
    cfg.model.model_config.max_decode_length = 1 + prompt_words + new_tokens  # BOS + prompt + new
    build_context(cfg)
    loader = cfg.train_dataset.data_loader
    language = SyntheticLanguage(loader.vocab_size, seed=loader.seed, noise=loader.noise)
    prompts = [language.decode(language.prompt(i, prompt_words)) for i in range(3)]
    outputs = Trainer(cfg).predict(predict_checkpoint=ckpt, input_data=prompts)
    for prompt, out in zip(prompts, outputs):
        text = out["text_generation_text"][0]
        expected = prompt + " " + language.decode(language.continuation(language.encode(prompt), new_tokens))
        assert text == expected, (prompt, text, expected)


# ----------------------------------------------------------------------------- the data (no training)
def test_synthetic_language_is_deterministic_and_learnable():
    language = SyntheticLanguage(128, seed=0, noise=0.1)
    again = SyntheticLanguage(128, seed=0, noise=0.1)
    np.testing.assert_array_equal(language.sample(5, 65), again.sample(5, 65))
    assert not np.array_equal(language.sample(5, 65), language.sample(6, 65))
    sample = language.sample(0, 4001)
    assert sample[0] == 0 and (sample[1:] >= language.first_id).all() and (sample < 128).all()
    follows = np.mean(language.successor[sample[1:-1]] == sample[2:])
    assert 0.85 < follows < 0.95  # 1 - noise (+ noise / words)
    # the successor table is one cycle through every word
    word, seen = int(language.word_ids[0]), set()
    for _ in range(len(language.word_ids)):
        seen.add(word)
        word = int(language.successor[word])
    assert seen == set(language.word_ids.tolist())
    prompt = language.prompt(0, 4)
    assert language.encode(language.decode(prompt)) == prompt
    assert language.continuation(prompt, 3) == [int(language.successor[prompt[-1]]),
                                                int(language.successor[language.successor[prompt[-1]]]),
                                                int(language.successor[language.successor[language.successor[prompt[-1]]]])]


def test_shipped_tokenizer_matches_the_language(tmp_path):
    from mindformers_dsv3 import DeepseekV3Tokenizer
    from tests.training_fixtures import TOKENIZER_FILE
    language = SyntheticLanguage(128)
    written = language.write_tokenizer(str(tmp_path))
    with open(written, encoding="utf-8") as a, open(TOKENIZER_FILE, encoding="utf-8") as b:
        assert a.read() == b.read(), "configs/tiny/synthetic_tokenizer is stale: python -m mindformers_dsv3.data " \
                                     "--write-tokenizer configs/tiny/synthetic_tokenizer"
    tok = DeepseekV3Tokenizer(tokenizer_file=TOKENIZER_FILE)
    prompt = language.prompt(3, 6)
    assert tok.encode(language.decode(prompt)) == [0] + prompt  # BOS + the words
    assert tok.decode([0] + prompt, skip_special_tokens=True) == language.decode(prompt)


def test_data_loader_columns_shards_and_errors():
    from mindformers_dsv3.data import SyntheticLanguageDataLoader
    language = SyntheticLanguage(128)
    one = SyntheticLanguageDataLoader(vocab_size=128, seq_length=16, num_samples=6, column_names=["input_ids"])
    rows = [r[0].asnumpy() for r in one.create_tuple_iterator()]
    assert len(rows) == 6 and rows[0].shape == (17,)
    np.testing.assert_array_equal(rows[4], language.sample(4, 17))
    pair = SyntheticLanguageDataLoader(vocab_size=128, seq_length=16, num_samples=2,
                                       column_names=["input_ids", "labels"])
    ids, labels = (t.asnumpy() for t in next(pair.create_tuple_iterator()))
    np.testing.assert_array_equal(ids[1:], labels[:-1])
    shard = SyntheticLanguageDataLoader(vocab_size=128, seq_length=16, num_samples=6, num_shards=2, shard_id=1)
    np.testing.assert_array_equal([r[0].asnumpy() for r in shard.create_tuple_iterator()], rows[1::2])
    with pytest.raises(TypeError, match="seq_lenght"):
        SyntheticLanguageDataLoader(vocab_size=128, seq_lenght=16)
    with pytest.raises(ValueError, match="seq_length"):
        SyntheticLanguageDataLoader(vocab_size=128)
    with pytest.raises(ValueError, match="input_columns"):
        SyntheticLanguageDataLoader(vocab_size=128, seq_length=16, column_names=["text"])
    with pytest.raises(ValueError, match="dataset_dir"):
        SyntheticLanguageDataLoader(vocab_size=128, seq_length=16, dataset_dir="/data")
