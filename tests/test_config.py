"""DeepseekV3Config: HF config.json, upstream YAML names, validation, MindFormers registry."""
import copy
import importlib
import json
import math
import os
import shutil

import mindspore as ms
import pytest
from mindformers.models.build_config import build_model_config
from mindformers.modules.transformer.moe import MoEConfig
from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

from mindformers_dsv3.config import ConfigError, DeepseekV3Config, dtype_of, yarn_mscale

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
V3_JSON = os.path.join(FIXTURES, "deepseek_v3_config.json")
R1_JSON = os.path.join(FIXTURES, "deepseek_r1_config.json")
REAL_SOFTMAX_SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # 0.13523377...


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MindFormers' logger writes ./output/log under the current directory


def _raw(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _yaml_model_config(tmp_path, text):
    path = tmp_path / "model.yaml"
    path.write_text(text, encoding="utf-8")
    return MindFormerConfig(str(path)).model.model_config


# ----------------------------------------------------------------------------- real HF configs
@pytest.mark.parametrize("path", [V3_JSON, R1_JSON])
def test_real_config_json_loads_every_field(path):
    raw = _raw(path)
    cfg = DeepseekV3Config.from_hf_config(path)
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    assert cfg.softmax_scale == pytest.approx(REAL_SOFTMAX_SCALE, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(0.1352337, abs=1e-7)
    assert cfg.qk_head_dim == 192
    assert cfg.num_dense_layers == 3
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    assert cfg.quantization_config["weight_block_size"] == [128, 128]


def test_r1_and_v3_share_the_architecture():
    v3, r1 = DeepseekV3Config.from_hf_config(V3_JSON), DeepseekV3Config.from_hf_config(R1_JSON)
    strip = lambda d: {k: v for k, v in d.items() if k != "transformers_version"}  # noqa: E731
    assert strip(v3.to_hf_dict()) == strip(r1.to_hf_dict())


def test_defaults_are_the_671b_architecture():
    hf = DeepseekV3Config.from_hf_config(V3_JSON, quantization_config=None).to_hf_dict()
    default = DeepseekV3Config().to_hf_dict()
    hf.pop("transformers_version")
    assert default == hf


def test_from_folder_dict_and_overrides(tmp_path):
    shutil.copy(V3_JSON, tmp_path / "config.json")
    from_dir = DeepseekV3Config.from_hf_config(tmp_path)
    raw = _raw(V3_JSON)
    before = copy.deepcopy(raw)
    from_dict = DeepseekV3Config.from_hf_config(raw)
    assert from_dir.to_hf_dict() == from_dict.to_hf_dict()
    small = DeepseekV3Config.from_hf_config(raw, num_layers=4, first_k_dense_replace=1, rope_scaling=None)
    assert (small.num_hidden_layers, small.first_k_dense_replace, small.rope_scaling) == (4, 1, None)
    assert small.softmax_scale == pytest.approx(192 ** -0.5)
    small.rope_scaling = {"mutated": True}
    from_dict.quantization_config["fmt"] = "e5m2"
    assert raw == before  # the caller's dict is never touched


def test_to_hf_dict_round_trip_and_transformers_reads_it(tmp_path):
    cfg = DeepseekV3Config.from_hf_config(V3_JSON)
    out = cfg.to_hf_dict()
    raw = _raw(V3_JSON)
    assert {k: out[k] for k in raw if k != "auto_map"} == {k: v for k, v in raw.items() if k != "auto_map"}
    (tmp_path / "config.json").write_text(json.dumps(out), encoding="utf-8")
    again = DeepseekV3Config.from_hf_config(tmp_path)
    assert again.to_hf_dict() == out
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(theirs).__name__ == "DeepseekV3Config"
    for key in ("num_hidden_layers", "n_routed_experts", "q_lora_rank", "kv_lora_rank", "topk_group", "n_group"):
        assert getattr(theirs, key) == out[key]


def test_transformers_derived_keys_are_checked():
    raw = dict(_raw(V3_JSON), qk_head_dim=192, head_dim=64, rope_interleave=True, dtype="bfloat16")
    assert DeepseekV3Config.from_hf_config(raw).qk_head_dim == 192
    with pytest.raises(ConfigError, match="^qk_head_dim"):
        DeepseekV3Config.from_hf_config(dict(raw, qk_head_dim=128))


# ----------------------------------------------------------------------------- upstream YAML names
SMALL_UPSTREAM = """
model:
  model_config:
    type: DeepseekV3Config
    auto_register: deepseek3_config.DeepseekV3Config
    seq_length: 64
    hidden_size: 64
    num_layers: 3
    num_heads: 4
    n_kv_heads: 4
    max_position_embedding: 256
    intermediate_size: 96
    kv_lora_rank: 16
    q_lora_rank: 24
    qk_rope_head_dim: 8
    v_head_dim: 16
    qk_nope_head_dim: 16
    vocab_size: 320
    rms_norm_eps: 1.0e-5
    theta: 50000.0
    init_method_std: 0.01
    mtp_depth: 0
    extend_method: "YARN"
    scaling_factor:
      beta_fast: 16.0
      beta_slow: 2.0
      factor: 8.0
      mscale: 0.5
      mscale_all_dim: 0.5
      original_max_position_embeddings: 32
    compute_dtype: "fp32"
    param_init_type: "float32"
    use_flash_attention: True
    qkv_concat: False
    multiple_of: 256
    moe_config:
      expert_num: 16
      num_experts_chosen: 3
      shared_expert_num: 2
      routed_scaling_factor: 1.5
      first_k_dense_replace: 1
      moe_intermediate_size: 32
      n_group: 4
      topk_group: 2
      norm_topk_prob: False
      balance_via_topk_bias: False
      use_gating_sigmoid: False
      topk_bias_update_rate: 0.01
      aux_loss_types: ["expert"]
      aux_loss_factors: [0.002]
      routing_policy: "TopkRouterV2"
      capacity_factor: 1.5
      use_gmm: True
  arch:
    type: DeepseekV3ForCausalLM
"""

SMALL_HF_NAMES = """
model:
  model_config:
    type: DeepseekV3Config
    seq_length: 64
    hidden_size: 64
    num_hidden_layers: 3
    num_attention_heads: 4
    num_key_value_heads: 4
    max_position_embeddings: 256
    intermediate_size: 96
    kv_lora_rank: 16
    q_lora_rank: 24
    qk_rope_head_dim: 8
    v_head_dim: 16
    qk_nope_head_dim: 16
    vocab_size: 320
    rms_norm_eps: 1.0e-5
    rope_theta: 50000.0
    initializer_range: 0.01
    num_nextn_predict_layers: 0
    rope_scaling: {type: yarn, beta_fast: 16, beta_slow: 2, factor: 8, mscale: 0.5, mscale_all_dim: 0.5,
                   original_max_position_embeddings: 32}
    compute_dtype: "float32"
    param_init_type: "float32"
    n_routed_experts: 16
    num_experts_per_tok: 3
    n_shared_experts: 2
    routed_scaling_factor: 1.5
    first_k_dense_replace: 1
    moe_intermediate_size: 32
    n_group: 4
    topk_group: 2
    norm_topk_prob: False
    topk_method: group_limited_greedy
    scoring_func: softmax
    bias_update_rate: 0.01
    seq_balance_loss_alpha: 0.002
"""


def test_upstream_yaml_names_equal_hf_names(tmp_path):
    upstream_yaml = _yaml_model_config(tmp_path, SMALL_UPSTREAM)
    upstream = DeepseekV3Config(**upstream_yaml)
    hf = DeepseekV3Config(**_yaml_model_config(tmp_path, SMALL_HF_NAMES))
    assert upstream.to_hf_dict() == hf.to_hf_dict()
    runtime = ("compute_dtype", "param_init_type", "bias_update_rate", "seq_balance_loss_alpha", "seq_length")
    assert [getattr(upstream, k) for k in runtime] == [getattr(hf, k) for k in runtime]
    assert (hf.num_hidden_layers, hf.n_routed_experts, hf.scoring_func, hf.topk_method) == (
        3, 16, "softmax", "group_limited_greedy")
    assert hf.softmax_scale == pytest.approx(24 ** -0.5 * (0.05 * math.log(8) + 1) ** 2)
    assert "moe_config" in upstream_yaml and not hasattr(upstream, "use_flash_attention")


def test_moe_config_as_mindformers_moeconfig_object():
    moe = MoEConfig(expert_num=16, num_experts_chosen=3, shared_expert_num=2, n_group=4, topk_group=2,
                    first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=1.5,
                    balance_via_topk_bias=True, topk_bias_update_rate=0.01, use_gating_sigmoid=True,
                    router_dense_type="bfloat16", routing_policy="TopkRouterV2")
    cfg = DeepseekV3Config(num_hidden_layers=3, moe_config=moe)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.n_group) == (16, 3, 2, 4)
    assert (cfg.topk_method, cfg.scoring_func, cfg.router_dense_type) == ("noaux_tc", "sigmoid", "bfloat16")
    assert (cfg.first_k_dense_replace, cfg.bias_update_rate) == (1, 0.01)
    # a default MoEConfig (what Trainer injects when the YAML has none) changes nothing
    assert DeepseekV3Config(moe_config=MoEConfig()).to_hf_dict() == DeepseekV3Config().to_hf_dict()
    assert "moe_config" not in cfg.to_dict()


def test_real_upstream_predict_yaml_matches_the_hf_config(tmp_path):
    """The 671B predict YAML of research/deepseek3 (model_config + its top-level moe_config), via the
    legacy build path stock Trainer uses: build_model_config with injected parallel_config / moe_config."""
    text = """
moe_config: {expert_num: 256, num_experts_chosen: 8, routing_policy: TopkRouterV2, shared_expert_num: 1,
             routed_scaling_factor: 2.5, first_k_dense_replace: 3, moe_intermediate_size: 2048, topk_group: 4,
             n_group: 8, use_gating_sigmoid: True, balance_via_topk_bias: True, topk_bias_update_rate: 0.001}
model:
  model_config:
    {type: DeepseekV3Config, batch_size: 1, seq_length: 4096, hidden_size: 7168, num_layers: 61, num_heads: 128,
     max_position_embeddings: 163840, intermediate_size: 18432, kv_lora_rank: 512, q_lora_rank: 1536,
     qk_rope_head_dim: 64, v_head_dim: 128, qk_nope_head_dim: 128, vocab_size: 129280, multiple_of: 256,
     rms_norm_eps: 1.0e-6, bos_token_id: 0, eos_token_id: 1, pad_token_id: 1, ignore_token_id: -100,
     compute_dtype: bfloat16, layernorm_compute_type: bfloat16, softmax_compute_type: bfloat16,
     rotary_dtype: bfloat16, router_dense_type: bfloat16, param_init_type: bfloat16,
     scaling_factor: {beta_fast: 32.0, beta_slow: 1.0, factor: 40.0, mscale: 1.0, mscale_all_dim: 1.0,
                      original_max_position_embeddings: 4096},
     use_past: True, extend_method: YARN, use_flash_attention: True, block_size: 16, num_blocks: 512, offset: 0,
     checkpoint_name_or_path: "", repetition_penalty: 1, max_decode_length: 1024, top_k: 1, top_p: 1,
     theta: 10000.0, do_sample: False, is_dynamic: True, qkv_concat: False, ffn_concat: False,
     auto_map: {AutoConfig: deepseek3_config.DeepseekV3Config, AutoModel: deepseek3.DeepseekV3ForCausalLM}}
"""
    path = tmp_path / "predict.yaml"
    path.write_text(text, encoding="utf-8")
    yaml_cfg = MindFormerConfig(str(path))
    assert yaml_cfg.moe_config["group_wise_a2a"] is False  # the template filled every MoEConfig default in
    parallel = TransformerOpParallelConfig(data_parallel=1, model_parallel=1)
    expected = DeepseekV3Config.from_hf_config(V3_JSON, quantization_config=None).to_hf_dict()
    expected.pop("transformers_version")
    # Trainer injects the top-level moe_config as a dict, or as a MoEConfig when use_legacy is set
    for moe in (yaml_cfg.moe_config, MoEConfig(**yaml_cfg.moe_config)):
        cfg = build_model_config(yaml_cfg.model.model_config,
                                 default_args={"parallel_config": parallel, "moe_config": moe})
        assert type(cfg) is DeepseekV3Config
        assert cfg.to_hf_dict() == expected
    assert cfg.softmax_scale == pytest.approx(REAL_SOFTMAX_SCALE, rel=1e-12)
    assert cfg.parallel_config is parallel and cfg.use_past and cfg.compute_dtype == "bfloat16"
    # MindFormers serialises it (repr, GenerationConfig) and rebuilds it from to_dict (AutoModel.from_config)
    assert "DeepseekV3Config" in repr(cfg)
    rebuilt = DeepseekV3Config(**cfg.to_dict())
    assert rebuilt.to_hf_dict() == cfg.to_hf_dict()
    assert isinstance(cfg.to_dict()["parallel_config"], dict)


# issue 11 item 9: a moe_config value equal to a MindFormers default is never ignored silently
_TOP_LEVEL_MOE = """
run_mode: predict
moe_config: {{expert_num: 16, num_experts_chosen: {chosen}, shared_expert_num: 1, routed_scaling_factor: 2.5,
             first_k_dense_replace: 1, moe_intermediate_size: 32, n_group: 4, topk_group: 2,
             use_gating_sigmoid: True, balance_via_topk_bias: True, topk_bias_update_rate: 0.001}}
model:
  model_config: {{type: DeepseekV3Config, num_layers: 3{extra}}}
"""


def _built_from_top_level_moe(tmp_path, chosen, extra=""):
    """Stock Trainer's path: the YAML's top-level moe_config (filled by MindFormers' template) is injected."""
    path = tmp_path / "moe.yaml"
    path.write_text(_TOP_LEVEL_MOE.format(chosen=chosen, extra=extra), encoding="utf-8")
    yaml_cfg = MindFormerConfig(str(path))
    assert yaml_cfg.moe_config["cur_layer"] == 0   # the template wrote every MoEConfig key in
    return [build_model_config(yaml_cfg.model.model_config, default_args={"moe_config": moe})
            for moe in (yaml_cfg.moe_config, MoEConfig(**yaml_cfg.moe_config))]


def test_moe_config_value_equal_to_a_mindformers_default_is_never_ignored(tmp_path):
    # num_experts_chosen: 1 is MoEConfig's default: it used to vanish (the config kept 8 experts per token)
    partial = DeepseekV3Config(num_hidden_layers=3, moe_config={"expert_num": 16, "num_experts_chosen": 1,
                                                                "n_group": 4, "topk_group": 2})
    assert (partial.n_routed_experts, partial.num_experts_per_tok) == (16, 1)
    message = (r"moe_config.num_experts_chosen=1 equals MindFormers' default, .* it would set "
               r"num_experts_per_tok=1 instead of the default 8: set num_experts_per_tok in model_config$")
    with pytest.raises(ConfigError, match=message):   # stock build_model_config prefixes the class name
        _built_from_top_level_moe(tmp_path, chosen=1)
    with pytest.raises(ConfigError, match="^" + message):   # a MoEConfig object built by hand: the same
        DeepseekV3Config(num_hidden_layers=3, moe_config=MoEConfig(
            expert_num=16, num_experts_chosen=1, n_group=4, topk_group=2, first_k_dense_replace=1,
            moe_intermediate_size=32, routed_scaling_factor=2.5, balance_via_topk_bias=True,
            topk_bias_update_rate=0.001, use_gating_sigmoid=True, shared_expert_num=1))
    # said in model_config, it is unambiguous; a non-default value in the moe_config is taken as before
    for cfg in _built_from_top_level_moe(tmp_path, chosen=1, extra=", num_experts_per_tok: 1"):
        assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group) == (16, 1, 4)
    for cfg in _built_from_top_level_moe(tmp_path, chosen=2):
        assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.first_k_dense_replace) == (16, 2, 1)
    # a default that equals what the config uses anyway is no ambiguity (norm_topk_prob: True here)
    assert all(cfg.norm_topk_prob is True for cfg in _built_from_top_level_moe(tmp_path, chosen=2))


def test_yaml_without_top_level_moe_config_keeps_the_model_defaults(tmp_path):
    """MindFormers' template writes a moe_config of its own defaults into every YAML (a few differ from
    MoEConfig's: aux_loss_types None / [], ep_extend_tp); Trainer injects it: nothing is taken from it."""
    path = tmp_path / "plain.yaml"
    path.write_text("run_mode: predict\nmodel:\n  model_config: {type: DeepseekV3Config, num_layers: 3}\n",
                    encoding="utf-8")
    yaml_cfg = MindFormerConfig(str(path))
    assert yaml_cfg.moe_config["aux_loss_types"] is None and yaml_cfg.moe_config["ep_extend_tp"] is True
    expected = DeepseekV3Config(num_hidden_layers=3).to_hf_dict()
    for moe in (yaml_cfg.moe_config, MoEConfig(**yaml_cfg.moe_config), MoEConfig()):
        cfg = build_model_config(yaml_cfg.model.model_config, default_args={"moe_config": moe})
        assert cfg.to_hf_dict() == expected


def test_left_out_moe_config_key_whose_default_would_change_the_model_is_refused(tmp_path):
    """A top-level moe_config without use_gating_sigmoid gets MindFormers' False written in: softmax routing
    or a user's omission? Refused, naming the key, rather than guessed either way."""
    path = tmp_path / "moe.yaml"
    path.write_text(_TOP_LEVEL_MOE.format(chosen=2, extra="").replace("use_gating_sigmoid: True, ", ""),
                    encoding="utf-8")
    yaml_cfg = MindFormerConfig(str(path))
    with pytest.raises(ConfigError, match=r"moe_config.use_gating_sigmoid=False .*set scoring_func in model_config"):
        build_model_config(yaml_cfg.model.model_config, default_args={"moe_config": yaml_cfg.moe_config})
    path.write_text(_TOP_LEVEL_MOE.format(chosen=2, extra=", scoring_func: softmax").replace(
        "use_gating_sigmoid: True, ", ""), encoding="utf-8")
    yaml_cfg = MindFormerConfig(str(path))
    cfg = build_model_config(yaml_cfg.model.model_config, default_args={"moe_config": yaml_cfg.moe_config})
    assert cfg.scoring_func == "softmax"


def test_parallel_config_kept_as_given_and_serialisable():
    as_dict = {"data_parallel": 2, "model_parallel": 4}
    cfg = DeepseekV3Config(parallel_config=as_dict)
    assert cfg.parallel_config == as_dict
    assert cfg.to_dict()["parallel_config"] == as_dict and "parallel_config" in json.loads(cfg.to_json_string())
    assert DeepseekV3Config().to_dict()["parallel_config"] is None


def test_extend_method_none_and_aux_loss_types():
    assert DeepseekV3Config(extend_method="None").rope_scaling is None
    cfg = DeepseekV3Config(moe_config={"aux_loss_types": ["expert"], "aux_loss_factors": [0.0003]})
    assert cfg.seq_balance_loss_alpha == 0.0003
    with pytest.raises(ConfigError, match="^moe_config.aux_loss_types"):
        DeepseekV3Config(moe_config={"aux_loss_types": ["device"], "aux_loss_factors": [0.1]})
    with pytest.raises(ConfigError, match="^extend_method"):
        DeepseekV3Config(extend_method="PI")


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, key", [
    (dict(n_routed_experts=10, n_group=4, topk_group=2, num_experts_per_tok=2), "n_routed_experts=10 must be "
                                                                                  "divisible by n_group=4"),
    (dict(topk_group=9), "topk_group"),
    (dict(num_experts_per_tok=129), "num_experts_per_tok"),
    (dict(first_k_dense_replace=62), "first_k_dense_replace"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(compute_dtype="float64"), "compute_dtype"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(hidden_size="7168"), "hidden_size='7168' must be a positive int (got str)"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(kv_lora_rank=-1), "kv_lora_rank"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
    (dict(use_past="yes"), "use_past"),
    (dict(use_past=True, seq_length=4100), "seq_length"),
    (dict(seq_length=200000), "seq_length"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(num_layers=4, num_hidden_layers=61), "num_hidden_layers"),
    (dict(z_loss_factor=0.1), "z_loss_factor"),
    (dict(moe_config={"expert_num": 12, "n_group": 8}), "n_routed_experts"),
    (dict(moe_config=[1, 2]), "moe_config"),
])
def test_validation_errors_start_with_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        DeepseekV3Config(**kwargs)
    assert str(err.value).startswith(key), str(err.value)
    assert isinstance(err.value, ValueError)


# issue 10 item 7: nonsense that was accepted
@pytest.mark.parametrize("kwargs, start", [
    (dict(rope_theta=math.inf), "rope_theta=inf must be a finite number > 0"),
    (dict(rope_theta=math.nan), "rope_theta=nan"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"),
    (dict(rope_theta=0), "rope_theta=0"),
    (dict(rms_norm_eps=math.inf), "rms_norm_eps=inf"),
    (dict(routed_scaling_factor=math.nan), "routed_scaling_factor=nan"),
    (dict(initializer_range=-math.inf), "initializer_range=-inf"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(attention_dropout=math.nan), "attention_dropout=nan"),
    (dict(theta=math.inf), "theta=inf"),   # the upstream alias names itself
    (dict(rope_scaling={**DeepseekV3Config().rope_scaling, "factor": 0}), "rope_scaling.factor=0"),
    (dict(rope_scaling={**DeepseekV3Config().rope_scaling, "mscale": math.inf}), "rope_scaling.mscale=inf"),
    (dict(eos_token_id=129280), "eos_token_id=129280 is outside the vocabulary"),
    (dict(bos_token_id=200000), "bos_token_id=200000 is outside the vocabulary"),
    (dict(pad_token_id=129280), "pad_token_id=129280"),
    (dict(eos_token_id=[1, 129281]), "eos_token_id=[1, 129281] is outside the vocabulary"),
    (dict(vocab_size=64, eos_token_id=64), "eos_token_id=64 is outside the vocabulary: ids run from 0 to "
                                           "vocab_size - 1 = 63"),
])
def test_nonsense_values_are_refused_naming_the_key(kwargs, start):
    with pytest.raises(ConfigError) as err:
        DeepseekV3Config(**kwargs)
    assert str(err.value).startswith(start), str(err.value)


def test_nonsense_in_a_yaml_and_an_hf_config_is_refused(tmp_path):
    mc = _yaml_model_config(tmp_path, "model:\n  model_config:\n    rope_theta: .inf\n    eos_token_id: 3\n")
    with pytest.raises(ConfigError, match="^rope_theta=inf"):
        DeepseekV3Config(**mc.to_dict())
    hf = {**_raw(V3_JSON), "eos_token_id": 129280}
    with pytest.raises(ConfigError, match="^eos_token_id=129280 is outside the vocabulary"):
        DeepseekV3Config.from_hf_config(hf)
    assert DeepseekV3Config(vocab_size=64, eos_token_id=63, bos_token_id=0, pad_token_id=[63]).eos_token_id == 63


# issue 9 item 7: a short model with no seq_length set
@pytest.mark.parametrize("positions, extra, want", [
    (128, {}, 128),
    (163840, {}, 4096),
    (4096, {}, 4096),
    (100, {"use_past": True, "block_size": 16}, 96),   # a multiple of block_size under use_past
    (100, {}, 100),
    (128, {"seq_length": 64}, 64),                    # set by the user: kept
])
def test_from_hf_config_defaults_seq_length_to_the_positions(tmp_path, positions, extra, want):
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**_raw(V3_JSON), "max_position_embeddings": positions}))
    cfg = DeepseekV3Config.from_hf_config(str(folder), **extra)
    assert cfg.seq_length == want and cfg.max_position_embeddings == positions


def test_an_explicit_seq_length_beyond_the_positions_is_still_refused(tmp_path):
    hf = {**_raw(V3_JSON), "max_position_embeddings": 128}
    with pytest.raises(ConfigError, match="^seq_length=4096 exceeds max_position_embeddings=128"):
        DeepseekV3Config.from_hf_config(hf, seq_length=4096)


def test_incomplete_yarn_names_the_missing_parameter():
    rope = dict(DeepseekV3Config().rope_scaling)
    del rope["mscale_all_dim"]
    with pytest.raises(ConfigError, match="^rope_scaling.*'mscale_all_dim'"):
        DeepseekV3Config(rope_scaling=rope)


def test_unknown_keys_suggest_the_closest_name():
    with pytest.raises(ConfigError, match=r"^num_hiden_layers: unknown .*'num_hidden_layers'"):
        DeepseekV3Config(num_hiden_layers=3)
    with pytest.raises(ConfigError, match=r"^moe_config.expert_nums: unknown .*'expert_num'"):
        DeepseekV3Config(moe_config={"expert_nums": 8})
    with pytest.raises(ConfigError, match="^moe_config.enable_sdrop"):  # a real MoEConfig field with no meaning here
        DeepseekV3Config(moe_config=MoEConfig(enable_sdrop=True))


def test_validate_rechecks_after_mutation_and_allowed_values():
    cfg = DeepseekV3Config(q_lora_rank=None, num_hidden_layers=4, num_attention_heads=16, compute_dtype="bf16")
    assert cfg.q_lora_rank is None and cfg.num_key_value_heads == 16 and cfg.compute_dtype == "bfloat16"
    cfg.n_group = 7
    with pytest.raises(ConfigError, match="^n_routed_experts"):
        cfg.validate()


def test_layer_helpers_and_mscale():
    cfg = DeepseekV3Config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert cfg.num_dense_layers == 4
    assert yarn_mscale(1.0, 1.0) == 1.0 and yarn_mscale(40, 1.0) == pytest.approx(0.1 * math.log(40) + 1)
    no_all_dim = dict(DeepseekV3Config().rope_scaling, mscale_all_dim=0)
    assert DeepseekV3Config(rope_scaling=no_all_dim).softmax_scale == pytest.approx(192 ** -0.5)


def test_dtype_of():
    assert dtype_of("fp32") == dtype_of("float32") == ms.float32
    assert dtype_of("bf16") == dtype_of("bfloat16") == dtype_of(ms.bfloat16) == ms.bfloat16
    assert dtype_of("FP16") == ms.float16
    with pytest.raises(ConfigError, match="^compute_dtype"):
        dtype_of("int8", "compute_dtype")


# ----------------------------------------------------------------------------- registry contract
def test_registry_legacy_name_is_ours():
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "DeepseekV3Config") is DeepseekV3Config


def test_registry_mcore_name_still_resolves_to_mindformers(monkeypatch):
    build_context = importlib.import_module("mindformers.core.context.build_context")  # the package shadows it
    from mindformers.models.deepseek3.configuration_deepseek_v3 import DeepseekV3Config as Theirs

    class _NotLegacy:  # stands in for the MF context singleton that is_legacy_model() consults
        def get_context(self, key):
            return False if key == "use_legacy" else None

    was_legacy = build_context.is_legacy_model()
    monkeypatch.setattr(build_context.MFContextOperator, "_instance", _NotLegacy())
    assert build_context.is_legacy_model() is False
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "DeepseekV3Config") is Theirs
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "deepseek_v3") is Theirs
    monkeypatch.undo()
    assert build_context.is_legacy_model() == was_legacy
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "DeepseekV3Config") is DeepseekV3Config
