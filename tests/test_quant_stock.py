"""The tiny W8A8 YAML (configs/tiny/predict_deepseek3_tiny_w8a8.yaml: upstream's quantization_config block)
through the stock predict path (run_mindformer.py when MINDFORMERS_HOME is set, else its mirror
tests/dist/stock_predict.py: Trainer(config).predict -> pipeline("text_generation")) on a tiny msModelSlim
W8A8 folder (tests/w8a8_fixtures.py). The expected text is the greedy continuation of the independent
numpy W8A8 reference (tests/reference/numpy_w8a8.py) of the same folder, decoded with `tokenizers`.
Also: the folder's description decides per tensor (norm biases of two layers only, where the YAML's
outlier-suppression+ block would put one on every layer), and a block that disagrees on a scheme is
refused naming the module and the file."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers_dsv3.config import ConfigError, DeepseekV3Config
from tests import w8a8_fixtures as wf
from tests.reference import numpy_w8a8
from tests.test_quant_layers import UPSTREAM_BLOCK
from tests.test_stock_predict import PROMPT, REGISTER, ROOT, TOKENIZER, _fail, _result_text, stock_script

W8A8_YAML = os.path.join(ROOT, "configs", "tiny", "predict_deepseek3_tiny_w8a8.yaml")
MAX_LENGTH = 64          # the YAML's max_decode_length


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("w8a8")
    config, _, qstate, desc = wf.make_w8a8_folder(str(path))
    return str(path), config, qstate, desc


def _reference_text(config, qstate, desc):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(TOKENIZER)
    ids = [tokenizer.token_to_id("<｜begin▁of▁sentence｜>")] + tokenizer.encode(PROMPT).ids
    model = numpy_w8a8.W8A8Forward(config, qstate, desc)
    margins = []
    while len(ids) < MAX_LENGTH:
        last = model.logits(np.asarray([ids]))[0, -1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ids.append(int(np.argmax(last)))
        if ids[-1] == config["eos_token_id"]:
            break
    return tokenizer.decode(ids, skip_special_tokens=True), min(margins)


def test_description_decides_where_the_block_agrees(folder):
    path, config, _, _ = folder
    from mindformers.tools.register.config import MindFormerConfig
    from mindformers_dsv3.config_values import plain
    mc = plain(MindFormerConfig(W8A8_YAML).model.model_config)
    mc.update(checkpoint_name_or_path=path)
    spec = DeepseekV3Config(**mc).quant_spec()
    assert spec.source == "msmodelslim"
    assert spec.norm_bias("model.layers.1.input_layernorm")
    assert not spec.norm_bias("model.layers.3.input_layernorm")        # the block alone would say True
    bad = dict(UPSTREAM_BLOCK, modules_to_not_convert=["lm_head", "w2", "lkv2kv", "o_proj"])
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.o_proj is FLOAT here but W8A8 in .*"
                                          r"quant_model_description"):
        DeepseekV3Config(**dict(mc, quantization_config=bad))


def test_stock_predict_of_the_tiny_w8a8_yaml_equals_the_reference(tmp_path, folder):
    path, config, qstate, desc = folder
    expected, margin = _reference_text(config, qstate, desc)
    cmd = [sys.executable, stock_script(), "--config", W8A8_YAML, "--register_path", REGISTER,
           "--predict_data", PROMPT, "--options", f"model.model_config.checkpoint_name_or_path={path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, _fail(cmd, proc)
    assert _result_text(tmp_path) == expected, f"smallest top-1 margin of the reference: {margin:.3g}"
