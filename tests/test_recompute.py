"""recompute_config: one decision (parallel/recompute.py) applied by the training build and used by the planner.

* the reader follows MindFormers 1.7.0's forms and names the key of a wrong value;
* the decision (whole layers per stage, MTP as the last layer, select parts) by hand;
* the model's recomputed cells (read back from MindSpore's cell scopes) equal the planner's decision;
* a tiny training step (graph mode, CPU) gives the same loss and gradients with and without recompute
  (1e-6), and MindSpore really recomputes (more MatMuls in the validated graph).
"""
import glob
import os
import re
import shutil

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from mindformers_dsv3.config import ConfigError, DeepseekV3Config
from mindformers_dsv3.planner import activations
from mindformers_dsv3.parallel.layout import Layout, LayoutError
from mindformers_dsv3.planner.plan import make_plan
from mindformers_dsv3.parallel.recompute import (DEFAULT, LayerRecompute, RecomputeConfig, read_recompute_config,
                                                 recompute_config_of, recompute_layers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny", "pretrain_deepseek3_tiny.yaml")
PRETRAIN = os.path.join(ROOT, "configs", "deepseek3_671b", "pretrain_deepseek3_671b.yaml")


def tiny_config(**overrides):
    from mindformers import MindFormerConfig
    mc = MindFormerConfig(TINY).model.model_config
    kwargs = {k: v for k, v in mc.items() if k not in ("type", "auto_register")}
    kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def recomputed_cells(model):
    """Paths of the cells MindSpore was told to recompute (outermost ones), read from the cells' scopes."""
    marked = {path for path, cell in model.cells_and_names()
              if path and (getattr(cell, "_scope", None) or "").startswith("recompute_")}
    return {p for p in marked if not any(p.startswith(q + ".") for q in marked)}


def decided_cells(decisions):
    out = set()
    for d in decisions:
        out |= {d.path} if d.full else {f"{d.path}.{p}" for p in d.parts}
    return out


# ----------------------------------------------------------------------------- reading recompute_config
def test_reader_follows_mindformers_forms():
    assert read_recompute_config(None) == RecomputeConfig()
    rc = read_recompute_config({"recompute": [3, 4, True, False], "select_recompute": False,
                                "parallel_optimizer_comm_recompute": True, "mp_comm_recompute": False,
                                "recompute_slice_activation": True})
    assert rc.recompute == (3, 4, 1 << 30, 0) and rc.select == () and rc.active
    assert rc.layer_kwargs() == {"mp_comm_recompute": False, "parallel_optimizer_comm_recompute": True,
                                 "recompute_slice_activation": True}
    assert read_recompute_config({"select_recompute": True}).select == ((DEFAULT, True),)
    assert read_recompute_config({"select_recompute": [1, 0]}).select == ((DEFAULT, (1, 0)),)
    assert read_recompute_config({"select_recompute": ["self_attn", r"mlp\.experts"]}).select == \
        (("self_attn", True), (r"mlp\.experts", True))
    assert read_recompute_config({"select_recompute": {"mlp.shared_experts": [2, 1]}}).select == \
        (("mlp.shared_experts", (2, 1)),)
    assert not read_recompute_config({"recompute": False, "select_recompute": False}).active


def test_reader_reads_mindformers_objects():
    from mindformers.modules.transformer import TransformerOpParallelConfig, TransformerRecomputeConfig
    rc = TransformerRecomputeConfig(recompute=[1, 2], select_recompute=["self_attn"], mp_comm_recompute=False)
    assert read_recompute_config(rc) == RecomputeConfig(recompute=(1, 2), select=(("self_attn", True),),
                                                        mp_comm_recompute=False)
    pc = TransformerOpParallelConfig(data_parallel=1, model_parallel=1, recompute=rc)
    assert recompute_config_of(pc) == read_recompute_config(rc)
    assert recompute_config_of({"data_parallel": 1, "recompute": {"recompute": True}}).recompute is True
    assert recompute_config_of(None) == RecomputeConfig() == recompute_config_of({"data_parallel": 2})


@pytest.mark.parametrize("value, key", [
    ({"recompute": True, "recompute_layers": 2}, "recompute_layers"),
    ({"recompute": "yes"}, "recompute_config.recompute"),
    ({"recompute": [1, -1]}, "recompute_config.recompute"),
    ({"recompute": [[1, 2], [2, 1]]}, "recompute_config.recompute"),
    ({"mp_comm_recompute": 1}, "recompute_config.mp_comm_recompute"),
    ({"parallel_optimizer_comm_recompute": "True"}, "recompute_config.parallel_optimizer_comm_recompute"),
    ({"recompute_slice_activation": None, "select_recompute": 3}, "recompute_config.select_recompute"),
    ({"select_recompute": [r"feed_forward\.mul"]}, "recompute_config.select_recompute"),
    ({"select_recompute": {"self_attn": "all"}}, "recompute_config.select_recompute['self_attn']"),
    ({"select_recompute": ["mlp(("]}, "recompute_config.select_recompute"),
    ({"select_comm_recompute": True}, "recompute_config.select_comm_recompute"),
    ({"select_recompute_exclude": {"mlp": True}}, "recompute_config.select_recompute_exclude"),
])
def test_wrong_keys_and_values_name_the_key(value, key):
    with pytest.raises(ConfigError) as err:
        read_recompute_config(value)
    assert key in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- the decision
def test_decision_whole_layers_per_stage_and_mtp():
    config = tiny_config()   # 4 layers (0 dense, 1-3 MoE) + 1 MTP
    full = {d.index: d.full for d in recompute_layers(config, RecomputeConfig(recompute=True))}
    assert full == {0: True, 1: True, 2: True, 3: True, 4: True}
    d = recompute_layers(config, RecomputeConfig(recompute=(1, 2)), pp=2)
    assert [x.full for x in d] == [True, False, True, True, True]     # MTP (4) follows layer 3
    assert [x.path for x in d] == ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
                                   "model.mtp.0.layer"]
    d = recompute_layers(config, RecomputeConfig(recompute=(3, 0)), pp=2, offset=[1, -1])   # stages 0-2 | 3
    assert [x.full for x in d] == [True, True, True, False, False]
    with pytest.raises(ConfigError, match="recompute_config.recompute has 3 entries"):
        recompute_layers(config, RecomputeConfig(recompute=(1, 1, 1)), pp=2)


def test_decision_select_parts():
    config = tiny_config()
    d = recompute_layers(config, read_recompute_config({"select_recompute": True}))
    assert [x.parts for x in d] == [("mlp",), ("mlp.shared_experts",), ("mlp.shared_experts",),
                                    ("mlp.shared_experts",), ("mlp.shared_experts",)]
    # whole layers win; select counts the first layers of each stage; a part inside a chosen part is dropped
    rc = read_recompute_config({"recompute": [1, 0], "select_recompute": {"mlp": [2, 1], r"mlp\.shared_.*": True,
                                                                           "self_attn": [0, 1]}})
    d = recompute_layers(config, rc, pp=2)
    assert [(x.full, x.parts) for x in d] == [
        (True, ()), (False, ("mlp",)), (False, ("self_attn", "mlp")), (False, ("mlp.shared_experts",)),
        (False, ("mlp.shared_experts",))]
    assert all(isinstance(x, LayerRecompute) for x in d)
    with pytest.raises(ConfigError, match=r"recompute_config.select_recompute\['mlp'\] has 1 entries"):
        recompute_layers(config, read_recompute_config({"select_recompute": {"mlp": [1]}}), pp=2)


# ----------------------------------------------------------------------------- model build == planner
def _build(config):
    """The model as the training path gets it: built, then the stock Trainer's post-build hook."""
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM(config)
    model.check_pipeline_stage()
    return model


def test_the_constructor_only_builds_cells():
    """recompute_config is applied on the training path (check_pipeline_stage / the train-step wrapper), not
    by the constructor; applying it twice changes nothing."""
    from mindspore.nn.utils import no_init_parameters
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    with no_init_parameters():
        model = DeepseekV3ForCausalLM(tiny_config(parallel_config={"recompute": {"recompute": True}}))
    assert model.recomputed is None and recomputed_cells(model) == set()
    model.apply_training_layout()
    first = model.recomputed
    assert first and recomputed_cells(model) == decided_cells(first)
    model.apply_training_layout()
    assert model.recomputed is first


@pytest.mark.parametrize("recompute", [
    {"recompute": True},
    {"recompute": False, "select_recompute": True},
    {"select_recompute": {"self_attn": True, r"mlp\.experts": True}, "mp_comm_recompute": False},
])
def test_model_recomputes_what_the_planner_assumes(recompute):
    from mindspore.nn.utils import no_init_parameters
    parallel_config = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, "recompute": recompute}
    config = tiny_config(parallel_config=parallel_config)
    with no_init_parameters():
        model = _build(config)
    from mindformers import MindFormerConfig
    yaml = MindFormerConfig(TINY)
    yaml.recompute_config = recompute
    the_plan = make_plan(yaml)
    decisions = recompute_layers(the_plan.config, the_plan.settings["recompute"])
    assert [(d.index, d.full, d.parts) for d in model.recomputed] == [(d.index, d.full, d.parts) for d in decisions]
    assert recomputed_cells(model) == decided_cells(decisions) != set()
    stage = the_plan.stages[0]
    expected = activations.training(the_plan.config, the_plan.layout, stage.layers, 0, True,
                                    the_plan.settings["batch_size"], {d.index: d for d in decisions})
    assert stage.activation_terms == expected


def test_predict_and_plain_builds_recompute_nothing():
    from mindspore.nn.utils import no_init_parameters
    with no_init_parameters():
        predict = _build(tiny_config(use_past=True, parallel_config={"recompute": {"recompute": True}}))
        plain = _build(tiny_config())
    assert predict.recomputed is None and recomputed_cells(predict) == set()
    assert plain.recomputed is None and recomputed_cells(plain) == set()


def test_stock_trainer_config_path_reaches_the_model():
    """MindFormers' build_parallel_config puts the YAML's recompute_config into parallel_config.recompute."""
    from mindspore.nn.utils import no_init_parameters
    from mindformers import MindFormerConfig
    from mindformers.core.parallel_config import build_parallel_config
    cfg = MindFormerConfig(TINY)
    cfg.recompute_config = MindFormerConfig(recompute=True, mp_comm_recompute=False)
    build_parallel_config(cfg)
    with no_init_parameters():
        model = _build(tiny_config(parallel_config=cfg.parallel_config))
    assert recomputed_cells(model) == {"model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3",
                                       "model.mtp.0.layer"}


def test_planner_estimate_follows_the_decision():
    def acts(**ov):
        p = make_plan(PRETRAIN, overrides={f"recompute_config.{k}": v for k, v in ov.items()})
        return [s.activation_bytes for s in p.stages], p
    shipped, p = acts()
    none, _ = acts(recompute=False)
    full, _ = acts(recompute=True)
    select, _ = acts(recompute=False, select_recompute=True)
    attn, _ = acts(recompute=False, select_recompute=["self_attn"])
    assert all(f <= s <= n for f, s, n in zip(full, shipped, none))
    assert all(f < a < s < n for f, a, s, n in zip(full, attn, select, none))
    assert full[-1] < shipped[-1]                     # recompute True also recomputes the MTP layer
    assert p.stages[0].activation_terms["recomputed_layers"] == 3
    with pytest.raises(LayoutError, match=r"recompute_config.select_recompute has 2 entries"):
        make_plan(PRETRAIN, overrides={"recompute_config.select_recompute": [1, 2]})
    with pytest.raises(ConfigError, match="recompute_config: unknown key"):
        make_plan(PRETRAIN, overrides={"recompute_config.recompute_layer": 1})


# ----------------------------------------------------------------------------- a real training step
class _Step(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.grad = ms.value_and_grad(model, None, model.trainable_params())

    def construct(self, input_ids):
        return self.grad(input_ids)


def _loss_and_grads(config, weights, tokens, graphs=None):
    model = _build(config)
    for p in model.trainable_params():
        p.set_data(Tensor(weights[p.name]))
    model.set_train(True)
    if graphs:
        ms.set_context(save_graphs=1, save_graphs_path=graphs)
    try:
        loss, grads = _Step(model)(Tensor(tokens))
    finally:
        if graphs:
            ms.set_context(save_graphs=0)
    matmuls = None
    if graphs:
        path = sorted(glob.glob(os.path.join(graphs, "*_validate_*.ir")))[-1]
        with open(path, encoding="utf-8") as f:
            matmuls = len(re.findall(r"PrimFunc_MatMul\(", f.read()))
        shutil.rmtree(graphs, ignore_errors=True)
    names = [p.name for p in model.trainable_params()]
    return float(loss.asnumpy()), {n: g.asnumpy() for n, g in zip(names, grads)}, model, matmuls


def test_training_step_with_recompute_equals_without(tmp_path):
    small = dict(num_hidden_layers=2, seq_length=16, batch_size=2)          # layer 0 dense, 1 MoE, + MTP
    base = tiny_config(**small)
    ms.set_seed(0)
    weights = {p.name: p.asnumpy() for p in _build(base).trainable_params()}
    tokens = np.random.default_rng(0).integers(0, base.vocab_size, (2, base.seq_length + 1)).astype(np.int32)
    loss0, grads0, _, mm0 = _loss_and_grads(base, weights, tokens, str(tmp_path / "plain"))
    for recompute in ({"recompute": True, "mp_comm_recompute": True, "parallel_optimizer_comm_recompute": False,
                       "recompute_slice_activation": True},
                      {"select_recompute": {"self_attn": True, "mlp": True}}):
        config = tiny_config(parallel_config={"recompute": recompute}, **small)
        loss, grads, model, mm = _loss_and_grads(config, weights, tokens, str(tmp_path / "rc"))
        assert model.recomputed and recomputed_cells(model) == decided_cells(model.recomputed)
        assert mm > mm0, f"no forward MatMul recomputed ({mm} vs {mm0}): recompute did not take effect"
        assert abs(loss - loss0) <= 1e-6, (recompute, loss, loss0)
        assert set(grads) == set(grads0)
        worst = max(float(np.abs(grads[n] - grads0[n]).max()) for n in grads)
        assert worst <= 1e-6, (recompute, worst)
        assert max(float(np.abs(g).max()) for g in grads0.values()) > 1e-4   # the gradients are not all ~0
