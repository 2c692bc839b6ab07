"""The layout planner (mindformers_dsv3.planner): production YAMLs, bad layouts, byte accounting, CLI.

* every 671B YAML under configs/ passes the planner for its target (devices, 64 GB) and fits;
* the bad layouts of issue 5 fail with errors naming the keys;
* the tiny single-rank plan equals what the tiny model really allocates (weights and latent cache),
  and the per-rank shards of multi-rank tiny layouts match hand-computed slices;
* `dsv3-plan` exit codes: 0 fits, 1 invalid, 2 usage, 3 does not fit.
"""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from mindformers.tools.register.config import MindFormerConfig

from mindformers_dsv3.config import ConfigError, DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from mindformers_dsv3.parallel.layout import KINDS, LayoutError, param_rule
from mindformers_dsv3.planner.cli import EXIT_INVALID, EXIT_NO_FIT, EXIT_OK, main
from mindformers_dsv3.planner.plan import make_plan
from mindformers_dsv3.planner.settings import validate_layout
from mindformers_dsv3.units import GiB, parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = os.path.join(CONFIGS, "tiny", "predict_deepseek3_tiny.yaml")
V3 = os.path.join(CONFIGS, "deepseek3_671b", "predict_deepseek3_671b.yaml")
PRETRAIN = os.path.join(CONFIGS, "deepseek3_671b", "pretrain_deepseek3_671b.yaml")

# YAML -> (target devices, dp, mp, pp, ep, W8A8)
TARGETS = {
    "deepseek3_671b/predict_deepseek3_671b.yaml": (32, 1, 32, 1, 1, False),
    "deepseek3_671b/predict_deepseek3_671b_w8a8.yaml": (16, 1, 16, 1, 1, True),
    "deepseek_r1_671b/predict_deepseek_r1_671b.yaml": (32, 1, 32, 1, 1, False),
    "deepseek_r1_671b/predict_deepseek_r1_671b_w8a8.yaml": (16, 1, 16, 1, 1, True),
    "deepseek_r1_671b/predict_deepseek_r1_671b_w8a8_ep16.yaml": (16, 4, 4, 1, 16, True),
    "deepseek_r1_671b/predict_deepseek_r1_671b_w8a8_ep4tp4.yaml": (16, 4, 4, 1, 4, True),
    "deepseek3_671b/pretrain_deepseek3_671b.yaml": (1024, 16, 4, 16, 8, False),
    "deepseek3_671b/finetune_deepseek3_671b.yaml": (1024, 16, 4, 16, 8, False),
}
BASES = {"deepseek3_671b/predict_deepseek3_671b.yaml", "deepseek3_671b/pretrain_deepseek3_671b.yaml"}


def _rel(path):
    return os.path.relpath(path, CONFIGS)


# ----------------------------------------------------------------------------- production YAMLs
def test_every_671b_yaml_has_a_target():
    found = {_rel(p) for p in glob.glob(os.path.join(CONFIGS, "*671b", "*.yaml"))}
    assert found == set(TARGETS), f"YAMLs without a planner target (or missing): {found ^ set(TARGETS)}"


OLD_BLOCK_REFUSED = "quantization: the old W8A8 block is not read"
# the upstream golden-stick block of the shipped W8A8 YAMLs (reference section 4), for the tiny model
PTQ = {"quant_method": "ptq", "weight_dtype": "int8", "activation_dtype": "int8", "kvcache_dtype": "none",
       "outliers_suppression": "outlier-suppression+", "modules_to_not_convert": ["lm_head", "w2", "lkv2kv"],
       "algorithm_args": {},
       "layer_policies": {r".*\.feed_forward\..*": {
           "quant_method": "ptq", "activation_dtype": "int8", "weight_dtype": "int8", "kvcache_dtype": "none",
           "act_quant_granularity": "per_token", "weight_quant_granularity": "per_channel",
           "outliers_suppression": "None", "modules_to_not_convert": [], "algorithm_args": {}}}}


@pytest.mark.parametrize("rel", sorted(TARGETS))
def test_production_yaml_fits_its_target(rel):
    devices, dp, mp, pp, ep, w8a8 = TARGETS[rel]
    p = make_plan(os.path.join(CONFIGS, rel), devices=devices, device_memory="64GB").check()
    assert (p.layout.dp, p.layout.mp, p.layout.pp, p.layout.ep) == (dp, mp, pp, ep)
    assert p.devices == devices and p.fits
    if w8a8:  # sized from the quantized model the build makes: int8 weights, float32 / int32 vectors
        assert p.quantization["schemes"] == ["W8A8", "W8A8_DYNAMIC"]
        dtypes = {d for (_, d) in p.worst.weights}
        assert {"int8", "float32", "int32", "bfloat16"} == dtypes
    else:
        assert not p.quantization
    if p.run_mode == "predict":
        assert p.worst.cache_bytes_per_token == 70_272  # (512 + 64) x 61 x 2 B, whole on every TP rank
        assert p.worst.tokens_fit >= p.worst.cache_tokens >= 4096


@pytest.mark.parametrize("rel", sorted(set(TARGETS) - BASES))
def test_production_yaml_is_a_small_diff_from_its_base(rel):
    with open(os.path.join(CONFIGS, rel), encoding="utf-8") as f:
        text = f.read()
    keys = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line.startswith("base_config:") for line in keys), f"{rel}: no base_config"
    assert len(keys) <= 45, f"{rel}: {len(keys)} YAML lines; keep it a small diff from its base"


def test_bf16_671b_per_rank_figures():
    p = make_plan(V3, devices=32)
    stage = p.stages[0]
    c = p.config
    routed = (c.num_hidden_layers - c.first_k_dense_replace + c.num_nextn_predict_layers) * c.n_routed_experts \
        * 3 * c.hidden_size * c.moe_intermediate_size * 2
    assert stage.per_kind()["routed_experts"] + sum(  # MTP's experts are reported under "mtp"
        s.bytes for s in stage.shards if s.kind == "mtp" and ".experts." in s.name) == routed // 32
    assert stage.per_kind()["embedding"] == c.vocab_size * c.hidden_size * 2 // 32
    assert 40 * GiB < stage.weight_bytes < 44 * GiB
    assert stage.cache_tokens == 512 * 16


def _quantized_module(name):
    """The HF-style module of a MindSpore parameter that the DeepSeek recipe quantizes (None: FLOAT)."""
    if not name.startswith("model.layers."):
        return None
    for part in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj",
                 "mlp.gate_up_proj", "mlp.down_proj", "mlp.shared_experts.gate_up_proj",
                 "mlp.shared_experts.down_proj", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                 "mlp.experts.gate_up_scale", "mlp.experts.down_scale"):
        if f".{part}" in name:
            return part
    return None


def test_w8a8_bytes_are_int8_plus_scales():
    """The W8A8 671B plan on 16 ranks against the bf16 plan of the same layout: every quantized weight is the
    same shape in int8, plus its vectors (the contract's parameters); the other parameters are unchanged; the
    quantized layers' bytes are <= 0.55x their bf16 bytes."""
    bf16 = make_plan(V3, devices=16, overrides={"parallel_config.model_parallel": 16}).stages[0]
    w8a8 = make_plan(os.path.join(CONFIGS, "deepseek3_671b", "predict_deepseek3_671b_w8a8.yaml"), devices=16).stages[0]
    by_name = {s.name: s for s in w8a8.shards}
    quant_bytes = float_bytes = 0
    for s in bf16.shards:
        q = by_name.pop(s.name)
        module = _quantized_module(s.name)
        assert q.local_shape == s.local_shape, s.name
        assert q.dtype == ("int8" if module else s.dtype), s.name
        if module:
            quant_bytes += q.bytes
            float_bytes += s.bytes
    extra = {}
    for name, q in by_name.items():  # what quantization adds: vectors of the quantized modules, norm biases
        leaf = name.rsplit(".", 1)[1]
        if leaf == "bias":
            assert name.endswith(("input_layernorm.bias", "q_a_layernorm.bias")) and q.dtype == "float32", name
            continue
        assert _quantized_module(name) or name.startswith("model.mtp."), name
        extra[leaf] = extra.get(leaf, 0) + 1
        assert q.dtype == ("int32" if leaf == "quant_bias" else "float32"), name
        quant_bytes += q.bytes
    layers = 61
    assert extra == {"weight_scale": layers * 4 + 3 * 2 + 58 * 2, "input_scale": layers * 4,
                     "input_offset": layers * 4, "deq_scale": layers * 4, "quant_bias": layers * 4,
                     "gate_up_scale": 58, "down_scale": 58}
    assert quant_bytes <= 0.55 * float_bytes, quant_bytes / float_bytes


def test_plan_from_a_config_object_and_parallel_config():
    config = DeepseekV3Config(**_tiny_model_config(), parallel_config={"data_parallel": 1, "model_parallel": 2,
                                                                        "expert_parallel": 2})
    p = make_plan(config, devices=2)
    assert (p.layout.mp, p.layout.ep, p.layout.etp, p.run_mode) == (2, 2, 1, "predict")
    with pytest.raises(LayoutError, match="data_parallel \\* model_parallel \\* pipeline_stage = 1 \\* 2 \\* 1 = 2 "
                                          "does not equal the 4 devices"):
        validate_layout(config, devices=4)


def test_plan_reads_a_mindformers_parallel_config_object():
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    pc = TransformerOpParallelConfig(data_parallel=2, model_parallel=2, expert_parallel=4, vocab_emb_dp=False)
    p = make_plan(DeepseekV3Config(**_tiny_model_config(batch_size=2), parallel_config=pc), devices=4)
    assert (p.layout.dp, p.layout.mp, p.layout.ep, p.layout.etp) == (2, 2, 4, 1)


def test_vocab_emb_dp_replicates_embedding_and_lm_head():
    p = make_plan(TINY, devices=2, overrides={"parallel_config.model_parallel": 2, "parallel_config.vocab_emb_dp": True,
                                         "use_parallel": True})
    kinds = p.stages[0].per_kind()
    assert kinds["embedding"] == kinds["lm_head"] == 128 * 64 * 4  # whole on every rank
    with pytest.raises(LayoutError) as err:  # 129280 % 48 != 0, but a replicated vocabulary is not split
        validate_layout(V3, devices=48, overrides={"parallel_config.model_parallel": 48,
                                                   "parallel_config.vocab_emb_dp": True})
    assert "vocab_size" not in str(err.value) and "num_attention_heads" in str(err.value)


# ----------------------------------------------------------------------------- bad layouts
@pytest.mark.parametrize("overrides, devices, keys", [
    ({"parallel_config.model_parallel": 48}, 48, ["model_config.num_attention_heads=128", "model_parallel=48"]),
    ({"parallel_config.data_parallel": 1, "parallel_config.model_parallel": 48, "parallel_config.expert_parallel": 48,
      "parallel_config.vocab_emb_dp": True}, 48, ["model_config.n_routed_experts=256", "expert_parallel=48"]),
    ({"parallel_config.model_parallel": 16}, 32, ["data_parallel * model_parallel * pipeline_stage", "32 devices"]),
    ({"parallel_config.expert_parallel": 64}, 32, ["parallel_config.expert_parallel=64 must divide"]),
    ({"parallel_config.model_parallel": 3, "parallel_config.vocab_emb_dp": False}, 3,
     ["model_config.vocab_size=129280", "vocab_emb_dp"]),
    ({"parallel_config.data_parallel": 2, "parallel_config.model_parallel": 16}, 32,
     ["model_config.batch_size=1 is not divisible by parallel_config.data_parallel=2"]),
    ({"parallel_config.use_seq_parallel": True}, 32, ["use_seq_parallel"]),
    ({"model.model_config.num_blocks": 128}, 32, ["model_config.num_blocks * block_size"]),
    ({"context.max_device_memory": "70GB"}, 32, ["context.max_device_memory"]),
])
def test_bad_predict_layouts_name_the_keys(overrides, devices, keys):
    with pytest.raises(LayoutError) as err:
        make_plan(V3, devices=devices, device_memory="64GB", overrides=overrides)
    for key in keys:
        assert key in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides, keys", [
    ({"model.model_config.offset": 0}, ["model_config.num_hidden_layers=61 is not divisible by "
                                        "parallel_config.pipeline_stage=16", "model_config.offset"]),
    ({"model.model_config.offset": [1] * 16}, ["model_config.offset", "sum to", "13"]),
    ({"model.model_config.offset": [1] * 15}, ["model_config.offset has 15 entries"]),
    ({"parallel_config.micro_batch_num": 8}, ["parallel_config.micro_batch_num=8 must be >= "
                                              "parallel_config.pipeline_stage=16"]),
    ({"recompute_config.recompute": [1, 2]}, ["recompute_config.recompute has 2 entries"]),
])
def test_bad_training_layouts_name_the_keys(overrides, keys):
    with pytest.raises(LayoutError) as err:
        make_plan(PRETRAIN, devices=1024, overrides=overrides)
    for key in keys:
        assert key in str(err.value), str(err.value)


def test_all_problems_are_reported_together():
    with pytest.raises(LayoutError) as err:
        validate_layout(V3, devices=48, overrides={"parallel_config.model_parallel": 48,
                                                   "parallel_config.expert_parallel": 48})
    text = str(err.value)
    assert "num_attention_heads" in text and "n_routed_experts" in text and len(err.value.problems) >= 3


def test_does_not_fit_names_the_keys():
    p = make_plan(V3, devices=8, overrides={"parallel_config.model_parallel": 8})
    assert not p.fits
    with pytest.raises(LayoutError, match="parallel_config.model_parallel"):
        p.check()
    p = make_plan(V3, devices=32, overrides={"model.model_config.num_blocks": 40000})
    assert not p.fits and "model_config.num_blocks" in p.fit_problems()[0]


@pytest.mark.parametrize("source", [V3, "config"])
def test_a_bad_quantization_config_is_refused_as_the_build_refuses_it(source):
    """quant/config.py is the one parser: the planner refuses what the config refuses, with its message."""
    bad = dict(PTQ, weight_dtype="int4")
    with pytest.raises(ConfigError) as built:
        DeepseekV3Config(**_tiny_model_config(), quantization_config=bad)
    assert "weight_dtype" in str(built.value)
    with pytest.raises(ConfigError) as planned:
        if source == "config":  # a YAML tree (a DeepseekV3Config with it cannot even be made)
            make_plan({"model": {"model_config": _tiny_model_config(quantization_config=bad)}})
        else:
            make_plan(source, overrides={"model.model_config.quantization_config": bad})
    assert str(planned.value) == str(built.value)


def test_w8a8_is_for_predict_only():
    with pytest.raises(LayoutError, match="quantization_config \\(W8A8\\) is for predict only"):
        make_plan(PRETRAIN, devices=1024, overrides={"model.model_config.quantization_config": PTQ})


@pytest.mark.parametrize("source", [V3, PRETRAIN, "config"])
def test_the_old_quantization_block_is_refused_as_the_build_refuses_it(source):
    """Whatever the model build refuses, the planner refuses with the same message (issue 9 item 7):
    predict and training YAMLs, and a DeepseekV3Config."""
    quant = {"method": "w8a8"}
    if source == "config":
        config = DeepseekV3Config(**_tiny_model_config(), quantization=quant)
        with pytest.raises(ConfigError) as planned:
            make_plan(config)
        with pytest.raises(ConfigError) as built:
            DeepseekV3ForCausalLM(config)
        assert str(planned.value) == str(built.value)
    else:
        with pytest.raises(ConfigError) as planned:
            make_plan(source, overrides={"model.model_config.quantization": quant})
    assert str(planned.value).startswith(OLD_BLOCK_REFUSED)


def test_parse_size():
    assert parse_size("64GB") == 64 * GiB == parse_size("64 GiB") == parse_size(64 * GiB)
    assert parse_size("512MB") == 512 << 20
    with pytest.raises(ValueError, match="--device-memory|device memory"):
        parse_size("lots")


# ----------------------------------------------------------------------------- tiny: real allocation
def _tiny_model_config(**changes):
    mc = MindFormerConfig(TINY).model.model_config.to_dict()
    mc.update(changes)
    return mc


def _kind_bytes(model):
    out = {}
    for name, p in model.parameters_and_names():
        kind = param_rule(name)[0]
        out[kind] = out.get(kind, 0) + int(np.prod(p.shape)) * p.itemsize
    return out


def test_tiny_single_rank_plan_equals_the_model_allocation():
    p = make_plan(TINY)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**_tiny_model_config()))  # real, initialised weights
    real = _kind_bytes(model)
    stage = p.stages[0]
    assert p.layout.world == 1 and len(p.stages) == 1
    assert stage.weight_bytes == sum(b for k, b in real.items() if k != "cache")
    assert dict(stage.per_kind()) == {k: b for k, b in real.items() if k != "cache"}
    assert set(stage.per_kind()) <= set(KINDS)
    assert stage.cache_bytes == model.kv_cache_allocated_bytes() == real["cache"] > 0
    assert stage.cache_bytes_per_token == model.kv_cache_bytes_per_token() == (16 + 8) * 4 * 4


def _kind_dtype_bytes(model):
    out = {}
    for name, p in model.parameters_and_names():
        key = (param_rule(name)[0], str(p.dtype).lower())
        out[key] = out.get(key, 0) + int(np.prod(p.shape)) * p.itemsize
    return out


def test_tiny_w8a8_plan_equals_the_model_allocation():
    """W8A8 sizing: the planner's bytes of the tiny model with the upstream block equal, kind by kind and dtype by
    dtype, what the real quantized model allocates (int8 weights, float32 scales and vectors, int32 quant_bias,
    norm biases)."""
    p = make_plan(TINY, overrides={"model.model_config.quantization_config": PTQ})
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**_tiny_model_config(quantization_config=PTQ)))
    real = {k: b for k, b in _kind_dtype_bytes(model).items() if k[0] != "cache"}
    names = {"Int8": "int8", "Float32": "float32", "Int32": "int32", "int8": "int8", "float32": "float32",
             "int32": "int32"}
    real = {(k, names.get(d, d)): b for (k, d), b in real.items()}
    stage = p.stages[0]
    assert dict(stage.weights) == real
    assert {d for _, d in real} == {"int8", "float32", "int32"}
    assert stage.weight_bytes < make_plan(TINY).stages[0].weight_bytes
    assert p.quantization == {"form": "ptq", "schemes": ["W8A8", "W8A8_DYNAMIC"]}


def test_a_plan_never_reads_the_checkpoint(tmp_path):
    """The planner builds its shape-only model from a copy of the config without parallel, checkpoint and
    quantization settings: a YAML naming an unloadable folder plans, where the model build itself refuses it."""
    from mindformers_dsv3.planner.shapes import shape_only_config
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    config = DeepseekV3Config(**_tiny_model_config(checkpoint_name_or_path=str(folder)),
                              parallel_config={"data_parallel": 2})
    with pytest.raises(Exception):                      # the real build reads (and refuses) the folder
        DeepseekV3ForCausalLM(config)
    single = shape_only_config(config)
    assert single.checkpoint_name_or_path == "" and single.parallel_config is None
    assert config.checkpoint_name_or_path == str(folder) and config.parallel_config == {"data_parallel": 2}
    p = make_plan(TINY, overrides={"model.model_config.checkpoint_name_or_path": str(folder)})
    assert p.stages[0].weight_bytes == make_plan(TINY).stages[0].weight_bytes > 0


def _tiny_expected(dp, mp, ep, training=False):
    """Hand-computed per-rank values (not bytes) of the tiny model's sharded kinds."""
    h, heads, qr, kr, dr, dn, dv, vocab = 64, 4, 32, 16, 8, 16, 16, 128
    experts, inter, moe, layers, moe_layers = 8, 128, 32, 4, 3
    etp = 1 if training else dp * mp // ep
    attention = qr * h + heads * (dn + dr) * qr // mp + (kr + dr) * h + heads * (dn + dv) * kr // mp \
        + h * heads * dv // mp
    return {"attention": layers * attention,
            "dense_mlp": (layers - moe_layers) * 3 * h * inter // mp,
            "shared_experts": moe_layers * 3 * h * moe // mp,
            "routed_experts": moe_layers * (experts // ep) * 3 * h * moe // etp,
            "embedding": vocab * h // mp, "lm_head": vocab * h // mp}


@pytest.mark.parametrize("dp, mp, ep", [(1, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2), (1, 4, 4), (2, 2, 4)])
def test_tiny_multi_rank_shards_match_hand_slices(dp, mp, ep):
    p = make_plan(TINY, devices=dp * mp, overrides={"parallel_config.data_parallel": dp,
                                                "parallel_config.model_parallel": mp,
                                                "parallel_config.expert_parallel": ep,
                                                "model.model_config.batch_size": dp, "use_parallel": True})
    stage = p.stages[0]
    values = {}
    for s in stage.shards:
        values[s.kind] = values.get(s.kind, 0) + s.numel
    for kind, expected in _tiny_expected(dp, mp, ep).items():
        assert values[kind] == expected, (kind, values[kind], expected)
    for s in stage.shards:  # every slice is the global tensor divided by the ways of its split dims
        ways = math.prod(s.global_shape) // math.prod(s.local_shape)
        spec = param_rule(s.name)[3] or ()
        assert ways == math.prod(p.layout.ways(a) for a in spec), s.name
    for rank in range(dp * mp):
        coords = p.layout.coords(rank)
        assert coords["ep_rank"] < ep and coords["etp_rank"] < p.layout.etp
        assert set(p.rank_shards(rank)) == {s.name for s in stage.shards}
    assert stage.cache_bytes_per_token == (16 + 8) * 4 * 4  # latent whole on every TP rank


def test_tiny_pipeline_stages_partition_the_model():
    single = make_plan(TINY, run_mode="train")
    p = make_plan(TINY, devices=2, run_mode="train", overrides={"parallel_config.pipeline_stage": 2,
                                                            "parallel_config.micro_batch_num": 2,
                                                            "use_parallel": True})
    first, last = p.stages
    assert (list(first.layers), list(last.layers)) == ([0, 1], [2, 3])
    # the embedding lives in stage 0 only: MTP's lookup runs there and its output is sent to the last stage
    assert "embedding" in first.per_kind() and "embedding" not in last.per_kind()
    every_rank = first.per_kind().get("other", 0)  # model-level buffers (e.g. last_losses) live on every stage
    assert first.weight_bytes + last.weight_bytes - every_rank == single.stages[0].weight_bytes
    assert "lm_head" not in first.per_kind() and "mtp" in last.per_kind() and "mtp" not in first.per_kind()
    assert first.activation_terms["in_flight"] == 2 and last.activation_terms["in_flight"] == 1
    assert first.gradient_bytes == first.weight_bytes and first.optimizer_bytes == 2 * first.weight_bytes


# ----------------------------------------------------------------------------- CLI
def test_cli_exit_codes(capsys):
    assert main([TINY]) == EXIT_OK
    assert "verdict   FITS" in capsys.readouterr().out
    assert main([V3, "--devices", "48", "--set", "parallel_config.model_parallel=48"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "model_config.num_attention_heads=128" in err and "parallel_config.model_parallel=48" in err
    assert main([PRETRAIN, "--set", "model.model_config.offset=0"]) == EXIT_INVALID
    assert "model_config.offset" in capsys.readouterr().err
    assert main([V3, "--devices", "8", "--set", "parallel_config.model_parallel=8"]) == EXIT_NO_FIT
    assert "does not fit" in capsys.readouterr().err
    assert main([V3, "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["stages"][0]["cache_bytes_per_token"] == 70_272
    with pytest.raises(SystemExit) as usage:
        main([V3, "--set", "no-equals-sign"])
    assert usage.value.code == 2


def test_python_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "mindformers_dsv3.planner", TINY, "--devices", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_INVALID, proc.stdout + proc.stderr
    assert "does not equal the 2 devices" in proc.stderr


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_docs_figures_are_current(lang):
    from mindformers_dsv3.planner.report import update_doc
    path = os.path.join(ROOT, "docs", lang, "parallel.md")
    assert update_doc(path, ROOT, check=True), \
        f"{path}: stale planner figures; run python -m mindformers_dsv3.planner.report --update " \
        "docs/en/parallel.md docs/zh/parallel.md"


# ----------------------------------------------------------------------------- CLI: bad input, one line
DSV3_PLAN = os.path.join(os.path.dirname(sys.executable), "dsv3-plan")
BAD_YAMLS = {  # name -> (files to write, what the one line must name)
    "empty": ({"c.yaml": ""}, ["is empty"]),
    "list": ({"c.yaml": "- model\n- parallel_config\n"}, ["holds a YAML list"]),
    "missing-base": ({"c.yaml": "base_config: gone.yaml\nrun_mode: predict\n"}, ["gone.yaml", "does not exist"]),
    "self-base": ({"c.yaml": "base_config: c.yaml\nrun_mode: predict\n"}, ["makes a cycle", "c.yaml -> "]),
    "cycle": ({"c.yaml": "base_config: [b.yaml]\n", "b.yaml": "base_config: ./c.yaml\n"},
              ["makes a cycle", "b.yaml"]),
    "not-yaml": ({"c.yaml": "model: [1\n"}, ["cannot be read as YAML"]),
    "mixed-keys": ({"c.yaml": "1: a\nb: 2\n"}, ["MindFormers cannot read the YAML chain", "TypeError"]),
    "too-deep": ({"c.yaml": "".join("  " * i + f"k{i}:\n" for i in range(12)) + "  " * 12 + "v: 1\n"},
                 ["MindFormers cannot read the YAML chain", "nesting depth"]),
}


def _run_plan(*args, cwd):
    proc = subprocess.run([DSV3_PLAN, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, GLOG_v="3"))
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return proc.returncode, lines[0]


@pytest.mark.skipif(not os.path.exists(DSV3_PLAN), reason="dsv3-plan console script not installed in this venv")
@pytest.mark.parametrize("case", sorted(BAD_YAMLS))
def test_cli_bad_yaml_is_one_line(tmp_path, case):
    files, words = BAD_YAMLS[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    rc, line = _run_plan("c.yaml", cwd=tmp_path)
    assert rc == EXIT_INVALID and line.startswith("dsv3-plan: c.yaml: ")
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("key, hint", [
    ("parallel_config.model_paralel", "did you mean 'parallel_config.model_parallel'?"),
    ("paralel_config.model_parallel", "did you mean 'parallel_config'?"),
    ("model.model_confg.num_layers", "did you mean 'model.model_config'?"),
    ("model.model_config.rope_thetaa", "did you mean 'rope_theta'?"),
    ("parallel_config.model_parallel.ways", "is a value, not a section"),
])
def test_unknown_set_key_is_refused_with_did_you_mean(capsys, key, hint):
    """Issue 10 item 7: a typo in --set was ignored and the plan said FITS."""
    assert main([TINY, "--set", f"{key}=2"]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key.split(".")[-1] in err and hint in err, err


@pytest.mark.skipif(not os.path.exists(DSV3_PLAN), reason="dsv3-plan console script not installed in this venv")
def test_cli_set_typo_is_one_line(tmp_path):
    rc, line = _run_plan(TINY, "--set", "parallel_config.model_paralel=2", cwd=tmp_path)
    assert rc == EXIT_INVALID and line == (f"dsv3-plan: {TINY}: --set parallel_config.model_paralel: no key "
                                           "'model_paralel' in parallel_config; did you mean "
                                           "'parallel_config.model_parallel'?")


@pytest.mark.skipif(not os.path.exists(DSV3_PLAN), reason="dsv3-plan console script not installed in this venv")
def test_cli_plans_the_w8a8_yaml(tmp_path):
    path = os.path.join(CONFIGS, "deepseek3_671b", "predict_deepseek3_671b_w8a8.yaml")
    proc = subprocess.run([DSV3_PLAN, path, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, GLOG_v="3"))
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    plan = json.loads("\n".join(lines[lines.index("{"):]))  # MindSpore may log a line before it
    assert plan["fits"] and plan["quantization"]["schemes"] == ["W8A8", "W8A8_DYNAMIC"]
    assert plan["stages"][0]["weights"]["routed_experts/int8"] > 30 * GiB
