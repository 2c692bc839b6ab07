"""quantization_config (issue 12 item 1): upstream's golden-stick block, the msModelSlim description, the
shipped W8A8 YAMLs, and the refusals (one ConfigError naming the key, the tensor and the file)."""
import copy
import json
import os
import subprocess
import sys

import pytest

from mindformers_dsv3.config import ConfigError, DeepseekV3Config, refuse_unimplemented
from mindformers_dsv3.quant.config import (FLOAT, W8A8, W8A8_DYNAMIC, QuantSpec, description_config,
                                           layer_schemes)
from tests.hf_fixtures import tiny_hf_config
from tests.test_quant_layers import UPSTREAM_BLOCK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W8A8_YAMLS = ["deepseek3_671b/predict_deepseek3_671b_w8a8.yaml", "deepseek_r1_671b/predict_deepseek_r1_671b_w8a8.yaml",
              "deepseek_r1_671b/predict_deepseek_r1_671b_w8a8_ep16.yaml",
              "deepseek_r1_671b/predict_deepseek_r1_671b_w8a8_ep4tp4.yaml"]
RECIPE = {  # reference section 3: the DeepSeek recipe, module by module
    "self_attn.q_a_proj": W8A8, "self_attn.kv_a_proj_with_mqa": W8A8, "self_attn.q_b_proj": W8A8,
    "self_attn.o_proj": W8A8, "self_attn.kv_b_proj": FLOAT, "mlp.gate_up_proj": W8A8_DYNAMIC,
    "mlp.down_proj": W8A8_DYNAMIC, "mlp.shared_experts.gate_up_proj": W8A8_DYNAMIC,
    "mlp.shared_experts.down_proj": W8A8_DYNAMIC, "mlp.experts": W8A8_DYNAMIC, "mlp.gate": FLOAT,
}


def test_upstream_block_gives_the_deepseek_recipe():
    spec = QuantSpec.from_config(UPSTREAM_BLOCK, num_hidden_layers=61)
    for module, scheme in RECIPE.items():
        assert spec.scheme(f"model.layers.7.{module}") == scheme, module
    assert spec.scheme("model.layers.61.self_attn.q_a_proj") == FLOAT        # MTP: FLOAT
    assert spec.scheme("lm_head") == FLOAT and spec.scheme("model.embed_tokens") == FLOAT
    assert spec.norm_bias("model.layers.7.input_layernorm")                  # outlier-suppression+ shift
    assert spec.norm_bias("model.layers.7.self_attn.q_a_layernorm")
    assert not spec.norm_bias("model.layers.7.post_attention_layernorm")
    assert not spec.norm_bias("model.layers.61.input_layernorm")


def test_module_names_hf_or_upstream_and_policies():
    hf_names = dict(UPSTREAM_BLOCK, modules_to_not_convert=["o_proj"], layer_policies={
        r"model\.layers\.[0-2]\.mlp\.down_proj": {"act_quant_granularity": "per_token", "modules_to_not_convert": ["down_proj"],
                                          "outliers_suppression": "none"},
        r".*\.mlp\..*": {"act_quant_granularity": "per_token", "outliers_suppression": "none"}})
    spec = QuantSpec.from_config(hf_names, num_hidden_layers=4)
    assert spec.scheme("model.layers.1.self_attn.o_proj") == FLOAT
    assert spec.scheme("model.layers.1.mlp.down_proj") == FLOAT               # first matching regex wins
    assert spec.scheme("model.layers.3.mlp.down_proj") == W8A8_DYNAMIC
    assert spec.scheme("model.layers.3.self_attn.q_b_proj") == W8A8
    upstream = dict(UPSTREAM_BLOCK, modules_to_not_convert=["lm_head", "attention.wo", "l2q_proj"])
    spec = QuantSpec.from_config(upstream, num_hidden_layers=4)
    assert spec.scheme("model.layers.2.self_attn.o_proj") == FLOAT
    assert spec.scheme("model.layers.2.self_attn.q_b_proj") == FLOAT
    assert not spec.norm_bias("model.layers.2.self_attn.q_a_layernorm")       # its reader is FLOAT now
    assert QuantSpec.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]}) is None
    assert QuantSpec.from_config(None) is None
    assert set(layer_schemes(None, 0).values()) == {FLOAT, False}


@pytest.mark.parametrize("change, key", [
    ({"quant_method": "gptq"}, "quantization_config.quant_method"),
    ({"weight_dtype": "int4"}, "quantization_config.weight_dtype"),
    ({"activation_dtype": "none"}, "quantization_config.activation_dtype"),
    ({"kvcache_dtype": "int8"}, "quantization_config.kvcache_dtype"),
    ({"outliers_suppression": "awq"}, "quantization_config.outliers_suppression"),
    ({"act_quant_granularity": "per_group"}, "quantization_config.act_quant_granularity"),
    ({"weight_quant_granularity": "per_group"}, "quantization_config.weight_quant_granularity"),
    ({"weight_dtyp": "int8"}, "quantization_config.weight_dtyp"),
    ({"modules_to_not_convert": "lm_head"}, "quantization_config.modules_to_not_convert"),
    ({"layer_policies": {"([": {}}}, "quantization_config.layer_policies['([']"),
    ({"layer_policies": {".*": {"act_quant_granularity": "per_token", "outliers_suppression":
                                "outlier-suppression+"}}}, "quantization_config.layer_policies['.*']"),
    ({"layer_policies": {".*w1.*": {"act_quant_granularity": "per_token"}}}, "quantization_config"),  # w1 != w3
    ({"layer_policies": {}, "modules_to_not_convert": []},
     "quantization_config.act_quant_granularity"),                           # routed experts static
    ({"layer_policies": {}}, "quantization_config: model.layers.0.mlp.experts parts"),   # w2 FLOAT, w1 not
])
def test_bad_values_are_refused_naming_the_key(change, key):
    block = copy.deepcopy(UPSTREAM_BLOCK)
    block.update(change)
    with pytest.raises(ConfigError) as err:
        QuantSpec.from_config(block, num_hidden_layers=4)
    assert str(err.value).startswith(key), str(err.value)


def test_config_refuses_through_deepseekv3config():
    hf = tiny_hf_config()
    hf["quantization_config"] = dict(UPSTREAM_BLOCK, kvcache_dtype="int8")
    with pytest.raises(ConfigError, match="kvcache_dtype"):
        DeepseekV3Config.from_hf_config(hf)
    with pytest.raises(ConfigError, match="^quantization: the old W8A8 block"):
        refuse_unimplemented(DeepseekV3Config.from_hf_config(dict(tiny_hf_config(), quantization={"method": "w8a8"})))
    refuse_unimplemented({"quantization": "ptq", "quantization_config": UPSTREAM_BLOCK})   # what stock build_config adds


def _description(layers=2):
    desc = {"model_quant_type": "W8A8_DYNAMIC", "version": "1.0.0", "model.embed_tokens.weight": "FLOAT",
            "lm_head.weight": "FLOAT", "model.layers.1.input_layernorm.bias": "FLOAT",
            "model.layers.1.input_layernorm.module.bias": "FLOAT"}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "o_proj"):
            for t in ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale",
                      "quant_bias"):
                desc[f"{p}self_attn.{m}.{t}"] = "W8A8"
        desc[f"{p}self_attn.kv_b_proj.weight"] = "FLOAT"
        desc[f"{p}input_layernorm.weight"] = "FLOAT"
        mlps = ["mlp."] if i == 0 else ["mlp.shared_experts."] + [f"mlp.experts.{e}." for e in range(4)]
        for mlp in mlps:
            for m in ("gate_proj", "up_proj", "down_proj"):
                desc[f"{p}{mlp}{m}.weight"] = "W8A8_DYNAMIC"
                desc[f"{p}{mlp}{m}.weight_scale"] = "W8A8_DYNAMIC"
        if i:
            desc[f"{p}mlp.gate.weight"] = "FLOAT"
    return desc


def test_description_sets_schemes_tensor_by_tensor(tmp_path):
    desc = _description()
    desc["model.layers.0.self_attn.o_proj.weight"] = "FLOAT"
    (tmp_path / "quant_model_description_w8a8_dynamic.json").write_text(json.dumps(desc))
    hf = tiny_hf_config(num_hidden_layers=2, quantize="w8a8_dynamic", mla_quantize="w8a8")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = DeepseekV3Config.from_hf_config(str(tmp_path))
    spec = config.quant_spec()
    assert config.quantization_config["quant_method"] == "msmodelslim"
    assert spec.scheme("model.layers.0.self_attn.o_proj") == FLOAT
    assert spec.scheme("model.layers.1.self_attn.o_proj") == W8A8
    assert spec.scheme("model.layers.0.mlp.gate_up_proj") == W8A8_DYNAMIC
    assert spec.scheme("model.layers.1.mlp.experts") == W8A8_DYNAMIC
    assert spec.scheme("model.layers.1.self_attn.kv_b_proj") == FLOAT
    assert spec.norm_bias("model.layers.1.input_layernorm") and not spec.norm_bias("model.layers.0.input_layernorm")
    again = QuantSpec.from_config(json.loads(json.dumps(config.quantization_config)), 2)   # round trip
    assert again.scheme("model.layers.1.self_attn.o_proj") == W8A8


@pytest.mark.parametrize("tensor, value, words", [
    ("model.layers.1.mlp.experts.2.down_proj.weight", "FLOAT", "other routed experts of layer 1"),
    ("model.layers.1.self_attn.kv_b_proj.weight", "W8A8", "kv_b_proj"),
    ("model.layers.1.mlp.gate.weight", "W8A8_DYNAMIC", "must be FLOAT"),
    ("model.layers.1.self_attn.q_b_proj.weight", "W4A8_DYNAMIC", "not supported"),
    ("model.layers.1.post_attention_layernorm.bias", "FLOAT", "cannot carry a bias"),
    ("model.layers.0.mlp.up_proj.weight", "FLOAT", "different schemes"),
])
def test_bad_description_is_refused_naming_tensor_and_file(tensor, value, words):
    desc = _description()
    desc[tensor] = value
    with pytest.raises(ConfigError) as err:
        description_config(desc, "/x/quant_model_description.json")
    message = str(err.value)
    assert message.startswith("/x/quant_model_description.json") and words in message, message
    assert tensor in message or "model.layers.0.mlp" in message, message


def test_experts_static_description_is_refused():
    desc = _description()
    for e in range(4):
        for m in ("gate_proj", "up_proj", "down_proj"):
            desc[f"model.layers.1.mlp.experts.{e}.{m}.weight"] = "W8A8"
    with pytest.raises(ConfigError, match="routed experts are W8A8_DYNAMIC or FLOAT"):
        description_config(desc, "d.json")


@pytest.mark.parametrize("rel", W8A8_YAMLS)
def test_shipped_w8a8_yamls_parse_to_the_recipe(rel):
    from mindformers.tools.register.config import MindFormerConfig
    from mindformers_dsv3.config_values import plain
    mc = plain(MindFormerConfig(os.path.join(ROOT, "configs", rel)).model.model_config)
    assert "quantization" not in mc
    mc.pop("parallel_config", None)
    config = DeepseekV3Config(**dict(mc, checkpoint_name_or_path=""))
    spec = config.quant_spec()
    for module, scheme in RECIPE.items():
        assert spec.scheme(f"model.layers.5.{module}") == scheme, (rel, module)


def test_parser_needs_no_mindspore():
    """The planner and the tools parse a plain dict; the module imports no MindSpore."""
    code = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('qc', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'mindspore' not in sys.modules; print(m.QuantSpec.from_config({'quant_method': 'ptq', "
            "'layer_policies': {'.*mlp.*': {'act_quant_granularity': 'per_token'}}}, 3)"
            ".scheme('model.layers.1.mlp.experts'))")
    path = os.path.join(ROOT, "mindformers_dsv3", "quant", "config.py")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == W8A8_DYNAMIC
