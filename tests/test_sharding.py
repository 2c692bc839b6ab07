"""Training layouts (mindformers_dsv3/parallel/sharding.py) against the planner.

MindSpore's semi-auto / auto parallel does not compile on a CPU (docs/en/parallel.md, section 9), so
these tests check what the sharding tells MindSpore, read back from MindSpore's own objects where it
can be (primitive ``in_strategy`` attributes, ``Cell.pipeline_stage``, ``param_info.param_strategy``
set by ``Cell.shard``), for the tiny config and the 671B pretrain / finetune YAMLs (built without
allocating weights):

* every strategy divides its tensor's dims and fits the devices of a stage;
* every parameter's per-device shape equals the planner's ``rank_shards`` shape, stage by stage;
* the pipeline stage of every parameter's cell equals the planner's stage;
* bad layouts and tampered strategies are caught.
"""
import copy
import math
import os

import mindspore as ms
import pytest
from mindformers.tools.register.config import MindFormerConfig
from mindspore.nn.utils import no_init_parameters

from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from mindformers_dsv3.parallel.layout import LayoutError
from mindformers_dsv3.parallel import sharding as sharding_mod
from mindformers_dsv3.planner.plan import make_plan
from mindformers_dsv3.planner.sharding_check import check_against_plan
from mindformers_dsv3.parallel.sharding import apply_training_sharding, effective_stage, \
    training_sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny", "pretrain_deepseek3_tiny.yaml")
PRETRAIN = os.path.join(ROOT, "configs", "deepseek3_671b", "pretrain_deepseek3_671b.yaml")
FINETUNE = os.path.join(ROOT, "configs", "deepseek3_671b", "finetune_deepseek3_671b.yaml")
_MODELS = {}


def _tree(yaml, overrides=None):
    cfg = MindFormerConfig(yaml)
    if overrides:
        cfg.merge_from_dict(dict(overrides))
    return cfg


def _model(yaml, overrides=None):
    """(whole model built without weights, DeepseekV3Config, parallel_config dict) of a YAML."""
    tree = _tree(yaml, overrides)
    mc = tree.model.model_config.to_dict()
    mc.pop("quantization", None)
    key = (yaml, repr(sorted(mc.items())))
    if key not in _MODELS:
        config = DeepseekV3Config(**mc)
        with no_init_parameters():
            _MODELS[key] = (DeepseekV3ForCausalLM(config), config)
    model, config = _MODELS[key]
    return model, config, tree.parallel_config.to_dict()


def _tiny_overrides(dp=1, mp=1, pp=1, ep=1, sp=False, vocab_emb_dp=False, offset=None):
    out = {"parallel_config.data_parallel": dp, "parallel_config.model_parallel": mp,
           "parallel_config.pipeline_stage": pp, "parallel_config.expert_parallel": ep,
           "parallel_config.micro_batch_num": max(pp, 1), "parallel_config.use_seq_parallel": sp,
           "parallel_config.vocab_emb_dp": vocab_emb_dp, "use_parallel": True}
    if offset is not None:
        out["model.model_config.offset"] = offset
    return out


TINY_LAYOUTS = {  # dp, mp, pp, ep, use_seq_parallel, vocab_emb_dp, offset
    "dp2-ep2": (2, 1, 1, 2, False, False, None),
    "mp2-sp": (1, 2, 1, 1, True, False, None),
    "dp2-mp2-ep4-sp": (2, 2, 1, 4, True, False, None),
    "mp2-pp2-ep2-vocab_dp": (1, 2, 2, 2, False, True, None),
    "pp4": (1, 1, 4, 1, False, False, None),
    "dp2-mp2-pp2-ep2-sp": (2, 2, 2, 2, True, False, None),
    "pp3-offset": (1, 2, 3, 2, False, False, [0, 1, 0]),
}


def _tiny(name):
    dp, mp, pp, ep, sp, vdp, offset = TINY_LAYOUTS[name]
    overrides = _tiny_overrides(dp, mp, pp, ep, sp, vdp, offset)
    model, config, pc = _model(TINY, overrides)
    p = make_plan(TINY, devices=dp * mp * pp, overrides=overrides)
    return model, config, pc, p


# ----------------------------------------------------------------------------- the sharding equals the plan
@pytest.mark.parametrize("name", sorted(TINY_LAYOUTS))
def test_tiny_sharding_equals_the_plan(name):
    model, config, pc, p = _tiny(name)
    sh = training_sharding(model, pc, offset=config.offset)
    assert sh.problems() == []
    assert check_against_plan(sh, p) == []
    lo = sh.layout
    names = {n for n, _ in model.parameters_and_names()}
    assert set(sh.params) == names  # a training build has no cache: every parameter is placed
    for prm in sh.params.values():
        assert all(d % w == 0 for d, w in zip(prm.shape, prm.strategy)), prm
        assert (lo.dp * lo.mp) % math.prod(prm.strategy) == 0, prm
    for stage in p.stages:  # every rank of a stage holds the planner's shards
        for rank in range(stage.index * lo.dp * lo.mp, (stage.index + 1) * lo.dp * lo.mp):
            assert {n: s.local_shape for n, s in p.rank_shards(rank).items()} == sh.local_shapes(stage.index)
    # every weight of a Linear / the router is fixed by its MatMul, the rest by Cell.shard or propagation
    assert all(prm.anchor.startswith(("op ", "cell ")) for prm in sh.params.values()
               if prm.name.endswith(("proj.weight", "lm_head.weight", "router.weight", "embed_tokens.weight",
                                     "layernorm.weight", "norm.weight", "gate_up_proj", "down_proj")))


def test_tiny_strategies_by_hand():
    """dp2 mp2 ep4 with sequence parallel: the MatMul strategies MindSpore receives, written out."""
    model, config, pc, _ = _tiny("dp2-mp2-ep4-sp")
    sh = training_sharding(model, pc, offset=config.offset)
    attn = "model.layers.1.self_attn"
    assert sh.ops[f"{attn}.q_b_proj.matmul"].in_strategy == ((2, 1), (2, 1))          # column: heads over mp
    assert sh.ops[f"{attn}.o_proj.matmul"].in_strategy == ((2, 2), (1, 2))            # row
    assert sh.ops[f"{attn}.o_proj.matmul"].out_strategy == ((4, 1),)                  # reduce-scatter (SP)
    assert sh.ops[f"{attn}.q_a_proj.matmul"].in_strategy == ((4, 1), (1, 1))          # latent: tokens split
    assert sh.ops["model.layers.1.mlp.router.matmul"].in_strategy == ((4, 1), (1, 1))
    assert sh.ops["model.layers.0.mlp.down_proj.matmul"].out_strategy == ((4, 1),)
    assert sh.ops["lm_head.matmul"].in_strategy == ((2, 1), (2, 1))                   # vocabulary over mp
    experts = sh.cells["model.layers.1.mlp.experts"]
    assert experts.parameter_plan == {"model.layers.1.mlp.experts.gate_up_proj": (4, 1, 1),
                                      "model.layers.1.mlp.experts.down_proj": (4, 1, 1)}
    assert sh.params["model.layers.1.mlp.experts.gate_up_proj"].local_shape == (2, 64, 64)  # 8/4 whole experts
    assert sh.cells["model.embed_tokens"].parameter_plan == {"model.embed_tokens.weight": (2, 1)}
    assert sh.cells["model.layers.1.input_layernorm"].in_strategy == ((2, 2, 1),)          # (dp, sp, 1)


@pytest.mark.parametrize("yaml", [PRETRAIN, FINETUNE], ids=["pretrain", "finetune"])
def test_671b_training_yaml_sharding_equals_the_plan(yaml):
    model, config, pc = _model(yaml)
    sh = training_sharding(model, pc, offset=config.offset)
    p = make_plan(yaml, devices=1024)
    assert (sh.layout.dp, sh.layout.mp, sh.layout.pp, sh.layout.ep) == (16, 4, 16, 8)
    assert sh.problems() == [] and check_against_plan(sh, p) == []
    assert [len(r) for r in sh.stage_ranges] == [3] + [4] * 13 + [3, 3]
    # stages of the cells MindSpore will run: decoder layers by offset, embedding first, head + MTP last
    assert sh.cell_stages["model.embed_tokens"] == 0
    assert sh.cell_stages["model.layers.3"] == 1 and sh.cell_stages["model.layers.60"] == 15
    assert sh.cell_stages["model.mtp.0"] == sh.cell_stages["lm_head"] == sh.cell_stages["model.norm"] == 15
    for layer, stage in [(0, 0), (2, 0), (3, 1), (54, 13), (55, 14), (57, 14), (58, 15)]:
        assert effective_stage(f"model.layers.{layer}.self_attn.o_proj.weight", sh.cell_stages) == stage
    local = sh.local_shapes()
    assert local["model.layers.5.self_attn.q_b_proj.weight"] == (128 // 4 * 192, 1536)
    assert local["model.layers.5.self_attn.o_proj.weight"] == (7168, 128 // 4 * 128)
    assert local["model.layers.5.mlp.experts.gate_up_proj"] == (256 // 8, 7168, 2 * 2048)
    assert local["model.layers.5.mlp.shared_experts.down_proj.weight"] == (7168, 2048 // 4)
    assert local["model.embed_tokens.weight"] == local["lm_head.weight"] == (129280 // 4, 7168)
    assert sh.ops["model.layers.5.self_attn.o_proj.matmul"].out_strategy == ((64, 1),)  # use_seq_parallel
    # per device, the heaviest stage's planner bytes are those of these shapes
    last = p.stages[-1]
    assert last.weight_bytes == sum(math.prod(s) * 4 for s in sh.local_shapes(15).values())


# ----------------------------------------------------------------------------- read back from MindSpore objects
def _prim_weight_shapes(model, sh):
    cells = dict(model.cells_and_names())
    out = {}
    for op in sh.ops.values():
        owner, attr = op.path.rsplit(".", 1)
        prim = getattr(cells[owner], attr)
        x, w = prim.attrs["in_strategy"]
        assert x[1] == w[1]
        weight = dict(cells[owner].parameters_and_names())["weight"]
        out[op.weight] = tuple(d // s for d, s in zip(weight.shape, w))
    return out


@pytest.mark.parametrize("name", ["dp2-mp2-pp2-ep2-sp", "pp3-offset"])
def test_applied_strategies_and_stages_read_back(name):
    dp, mp, pp, ep, sp, vdp, offset = TINY_LAYOUTS[name]
    overrides = _tiny_overrides(dp, mp, pp, ep, sp, vdp, offset)
    tree = _tree(TINY, overrides)
    mc = tree.model.model_config.to_dict()
    with no_init_parameters():
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**mc))  # a fresh model: apply() changes it
    pc = tree.parallel_config.to_dict()
    sh = training_sharding(model, pc, offset=mc.get("offset")).apply(model)
    p = make_plan(TINY, devices=dp * mp * pp, overrides=overrides)
    assert sh.applied and sorted(sh.deferred) == sorted(sh.cells)  # no communication: Cell.shard deferred
    shapes = _prim_weight_shapes(model, sh)
    cells = dict(model.cells_and_names())
    for stage in p.stages:
        planned = {s.name: s.local_shape for s in stage.shards}
        for weight, shape in shapes.items():
            if weight in planned:
                assert shape == planned[weight], weight
        stages = {c: cells[c].pipeline_stage for c in sh.cell_stages}  # as MindSpore's cells carry them
        for pname in planned:
            tagged = effective_stage(pname, stages)
            assert tagged == stage.index or (tagged is None and sh.params[pname].kind == "other"), pname
    for path, stage in sh.cell_stages.items():
        assert cells[path].pipeline_stage == stage
    assert all(cells[f"model.layers.{i}"].pipeline_stage == s for s, r in enumerate(p.stages) for i in r.layers)


def test_cell_shard_parameter_plan_through_mindspore(monkeypatch):
    """With a (faked) device count, MindSpore's own Cell.shard takes every parameter_plan: it checks
    divisibility and stores param_info.param_strategy, which must give the planner's shapes."""
    dp, mp, pp, ep, sp, vdp, offset = TINY_LAYOUTS["dp2-mp2-ep4-sp"]
    overrides = _tiny_overrides(dp, mp, pp, ep, sp, vdp, offset)
    tree = _tree(TINY, overrides)
    with no_init_parameters():
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**tree.model.model_config.to_dict()))
    monkeypatch.setattr(ms.communication.management, "get_group_size", lambda group=None: 4)
    monkeypatch.setattr(sharding_mod, "_group_size", lambda: 4)
    fully_use_devices = ms.get_algo_parameters("fully_use_devices")
    try:
        sh = training_sharding(model, tree.parallel_config.to_dict()).apply(model)
    finally:
        ms.set_algo_parameters(fully_use_devices=fully_use_devices)
    assert sh.deferred == []
    planned = {s.name: s.local_shape for s in make_plan(TINY, devices=4, overrides=overrides).stages[0].shards}
    params = dict(model.parameters_and_names())
    seen = 0
    for cell in sh.cells.values():
        for pname in cell.parameter_plan:
            strategy = tuple(params[pname].param_info.param_strategy)
            assert tuple(d // s for d, s in zip(params[pname].shape, strategy)) == planned[pname], pname
            seen += 1
    assert seen == sum(len(c.parameter_plan) for c in sh.cells.values()) > 0


# ----------------------------------------------------------------------------- checks that fail
def test_bad_training_layouts_raise_naming_the_keys():
    model, config, pc = _model(TINY, _tiny_overrides())
    bad = dict(pc, model_parallel=3)
    with pytest.raises(LayoutError, match="num_attention_heads=4.*model_parallel=3"):
        training_sharding(model, bad)
    with pytest.raises(LayoutError, match="expert_parallel=3"):
        training_sharding(model, dict(pc, data_parallel=3, expert_parallel=3))
    with pytest.raises(LayoutError, match="micro_batch_num=1 must be >= parallel_config.pipeline_stage=2"):
        training_sharding(model, dict(pc, pipeline_stage=2, micro_batch_num=1))
    with pytest.raises(LayoutError, match="seq_length=66 is not divisible"):
        m2, c2, pc2 = _model(TINY, dict(_tiny_overrides(), **{"model.model_config.seq_length": 66}))
        training_sharding(m2, dict(pc2, model_parallel=4, use_seq_parallel=True))


def test_tampered_strategies_are_caught():
    model, config, pc, p = _tiny("dp2-mp2-pp2-ep2-sp")
    sh = training_sharding(model, pc, offset=config.offset)
    name = "model.layers.1.self_attn.q_b_proj.weight"
    good = sh.params[name]
    sh.params[name] = type(good)(good.name, good.kind, good.shape, (1, 1), good.stages, good.anchor)
    assert any("q_b_proj" in m for m in sh.problems())           # the MatMul still splits it 2 ways
    assert any(name in m for m in check_against_plan(sh, p))     # and the planner holds a half
    sh.params[name] = good
    sh.cell_stages["model.layers.1"] = 1                          # layer 1 belongs to stage 0
    assert any("model.layers.1." in m for m in sh.problems())
    assert check_against_plan(sh, make_plan(TINY, devices=8, overrides=_tiny_overrides(2, 2, 2, 2, True, False,
                                                                                  [1, -1]))) != []


# ----------------------------------------------------------------------------- the model-build hook
def test_hook_applies_only_to_parallel_training_builds():
    model, config, pc = _model(TINY, _tiny_overrides(1, 2, 2, 2))
    config = copy.deepcopy(config)  # the cached models' config stays untouched
    config.parallel_config = pc
    assert ms.get_auto_parallel_context("parallel_mode") == "stand_alone"
    assert apply_training_sharding(model, config) is None
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel")
    try:
        with no_init_parameters():
            built = DeepseekV3ForCausalLM(config)
        assert built.sharding is None                  # the constructor only builds cells
        built.check_pipeline_stage()                   # stock Trainer's post-build hook: the training path
        assert getattr(built, "sharding", None) is not None and built.sharding.applied
        assert built.model.layers[3].pipeline_stage == 1 and built.lm_head.pipeline_stage == 1
        assert built.model.layers[1].self_attn.o_proj.matmul.attrs["in_strategy"] == ((1, 2), (1, 2))
        predict = copy.deepcopy(config)
        predict.use_past = True
        assert apply_training_sharding(model, predict) is None   # predict builds split themselves
    finally:
        ms.reset_auto_parallel_context()


# ----------------------------------------------------------------------------- dsv3-plan --sharding, the YAMLs
def test_cli_sharding_table(capsys):
    from mindformers_dsv3.planner.cli import EXIT_INVALID, EXIT_OK, main
    assert main([PRETRAIN, "--sharding"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "per-device shapes and pipeline stages equal the plan" in out
    assert "model.layers.*.mlp.experts.gate_up_proj" in out and "(32, 7168, 4096)" in out
    predict = os.path.join(ROOT, "configs", "deepseek3_671b", "predict_deepseek3_671b.yaml")
    assert main([predict, "--sharding"]) == EXIT_INVALID
    assert "MindSpore sharding is for train / finetune" in capsys.readouterr().err


@pytest.mark.parametrize("yaml", [PRETRAIN, FINETUNE], ids=["pretrain", "finetune"])
def test_671b_training_yaml_selects_sharding_propagation(yaml):
    parallel = _tree(yaml).parallel
    assert parallel.parallel_mode == 2 and parallel.search_mode == "sharding_propagation"  # auto parallel
