"""Loading at scale: all or nothing, FP8 blocks from the checkpoint, no random init, O(1) name hooks.

* corrupt tensors (an int32 norm, a transposed weight, a scale of the wrong shape, a NaN scale) are
  refused naming the file and tensor, and no parameter of an already loaded model changes;
* FP8 with `weight_block_size: [64, 64]` loads equal to an independent dequantization (numpy
  repeat-and-multiply in float32, saved as a float32 folder), into float32 and bfloat16 parameters;
* a model built with `checkpoint_name_or_path` calls no weight initialiser: the parameters the
  checkpoint supplies have no data until the loader sets them; also inside stock's outer
  `no_init_parameters`;
* a set but unloadable `checkpoint_name_or_path` is an error naming the key;
* `convert_name` over the 91,991 names of the 671B release maps every non-scale name and names every
  parameter of the 671B model (built without weights).
"""
import json
import os
import time

import ml_dtypes
import numpy as np
import pytest
from mindspore import Parameter
from mindspore.common import dtype as mstype
from mindspore.common import initializer as ms_init
from mindspore.nn.utils import no_init_parameters

from mindformers_dsv3.checkpoint import hooks, loader, names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import FP8
from mindformers_dsv3.checkpoint.safetensors_io import write_index
from mindformers_dsv3.config import ConfigError, DeepseekV3Config
from mindformers_dsv3.modeling import model as model_module
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from tests import hf_fixtures as hf
from tests.fp8_reference import quantize_block_fp8
from tests.hf_fixtures import write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = dict(compute_dtype="float32", param_init_type="float32", seq_length=32)
BOOKKEEPING = ("expert_load", "last_losses", "latent_cache")  # parameters no checkpoint holds


def _qc(block):
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def _save(folder, config, tensors, shards=3):
    """config.json, round-robin shards (a weight and its scale may sit apart), index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for j, k in enumerate(keys) if j % shards == i}
        write_safetensors(os.path.join(folder, fname), part)
        weight_map.update(dict.fromkeys(part, fname))
    write_index(folder, weight_map, sum(int(a.nbytes) for a in tensors.values()))
    return str(folder)


def _reference_dequant(q, s, block):
    """float32(code) * float32(scale of its block), by repeating the scales: independent of fp8.py."""
    br, bc = block
    full = np.repeat(np.repeat(s.astype(np.float32), br, 0), bc, 1)[:q.shape[0], :q.shape[1]]
    return q.astype(np.float32) * full


def _fp8_state(state, block):
    out = {}
    for name, w in state.items():
        if hf.is_quantized_weight(name) and w.ndim == 2:
            out[name], out[name + names.SCALE_SUFFIX] = quantize_block_fp8(w, block)
        else:
            out[name] = w.astype(ml_dtypes.bfloat16) if not names.keeps_float32(name) else w
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = hf.tiny_hf_config()
    root = tmp_path_factory.mktemp("scale")
    state = hf.random_hf_state_dict(config, seed=3)
    fp8 = _fp8_state(state, (128, 128))
    return config, fp8, _save(root / "fp8", dict(config, quantization_config=_qc((128, 128))), fp8)


def _model(folder, **kw):
    return DeepseekV3ForCausalLM(DeepseekV3Config.from_hf_config(folder, **{**RUNTIME, **kw}))


def _snapshot(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


def _late(config, leaf):
    """A tensor of the last decoder layer: the old loader had set most parameters before reaching it."""
    return f"model.layers.{config['num_hidden_layers'] - 1}.{leaf}"


def _corruptions(config):
    weight = _late(config, "self_attn.kv_a_proj_with_mqa.weight")  # not square
    norm = _late(config, "post_attention_layernorm.weight")
    scale = weight + names.SCALE_SUFFIX

    def int_norm(t):
        t[norm] = np.ones(t[norm].shape, np.int32) * 1065353216  # the bits of float32 1.0
        return norm, "not a float type"

    def transposed(t):
        t[weight], t[scale] = np.ascontiguousarray(t[weight].T), np.ascontiguousarray(t[scale].T)
        return weight, r"transposed\?"

    def scale_shape(t):
        t[scale] = np.ones((t[scale].shape[0], t[scale].shape[1] + 1), np.float32)
        return scale, "weight_scale_inv shape"

    def nan_scale(t):
        t[scale] = t[scale].copy()
        t[scale][0, 0] = np.nan
        return scale, "NaN or infinity"
    return {"int32 norm": int_norm, "transposed": transposed, "scale shape": scale_shape, "NaN scale": nan_scale}


@pytest.mark.parametrize("case", ["int32 norm", "transposed", "scale shape", "NaN scale"])
def test_corrupt_tensor_refused_and_no_parameter_changed(tiny, tmp_path, case):
    config, tensors, good = tiny
    model = _model(good, checkpoint_name_or_path=good)
    before = _snapshot(model)
    bad_tensors = dict(tensors)
    tensor, reason = _corruptions(config)[case](bad_tensors)
    bad = _save(tmp_path / "bad", dict(config, quantization_config=_qc((128, 128))), bad_tensors)
    with pytest.raises(CheckpointError, match=reason) as err:
        loader.load_hf_checkpoint(model, bad)
    assert err.value.tensor == tensor and err.value.file.endswith(".safetensors"), str(err.value)
    assert os.path.dirname(err.value.file) == bad
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_block_size_comes_from_quantization_config(tiny, tmp_path):
    config, tensors, _ = tiny
    wrong = _save(tmp_path / "wrong", dict(config, quantization_config=_qc((64, 64))), tensors)
    with pytest.raises(CheckpointError, match="64x64 blocks"):
        loader.load_hf_checkpoint(_model(wrong), wrong)
    none = _save(tmp_path / "none", config, tensors)
    with pytest.raises(CheckpointError, match="no quantization_config") as err:
        loader.load_hf_checkpoint(_model(none), none)
    assert err.value.file.endswith("config.json")


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_fp8_64x64_blocks_equal_an_independent_dequantization(tmp_path, param_dtype):
    config = hf.tiny_hf_config(hidden_size=160, intermediate_size=192, moe_intermediate_size=96)
    state = hf.random_hf_state_dict(config, seed=5)
    block = (64, 64)
    tensors = _fp8_state(state, block)
    reference = {}
    for name, value in tensors.items():
        if name.endswith(names.SCALE_SUFFIX):
            continue
        scale = tensors.get(name + names.SCALE_SUFFIX)
        reference[name] = value.astype(np.float32) if scale is None else _reference_dequant(value, scale, block)
    assert sum(t.dtype == FP8 for t in tensors.values()) > 20
    assert any(s.shape[1] == 3 for n, s in tensors.items() if n.endswith(names.SCALE_SUFFIX))  # ragged edge
    fp8_dir = _save(tmp_path / "fp8", dict(config, quantization_config=_qc(block)), tensors)
    ref_dir = _save(tmp_path / "ref", config, reference)
    got = _model(fp8_dir, param_init_type=param_dtype, checkpoint_name_or_path=fp8_dir)
    want = _model(ref_dir, checkpoint_name_or_path=ref_dir)  # float32 parameters
    want = {p.name: p.asnumpy() for p in want.get_parameters()}
    checked = 0
    for p in got.get_parameters():
        if p.name.endswith(BOOKKEEPING):
            continue
        expect = want[p.name]
        if p.dtype == mstype.bfloat16:  # rounded once from the float32 product
            expect, checked = expect.astype(ml_dtypes.bfloat16).astype(np.float32), checked + 1
        np.testing.assert_array_equal(p.astype(mstype.float32).asnumpy(), expect, err_msg=p.name)
    assert checked > 20 if param_dtype == "bfloat16" else checked == 0


class _InitCounter:
    """Counts calls of the weight initialisers (Normal) and records has_init when the loader starts."""

    def __init__(self, monkeypatch):
        self.normal, self.at_load = 0, None
        real_init, real_load = ms_init.Normal._initialize, model_module.load_hf_checkpoint

        def counting(init_self, arr):
            self.normal += 1
            return real_init(init_self, arr)

        def recording(model, path, **kw):
            self.at_load = {p.name: p.has_init for p in model.get_parameters()}
            return real_load(model, path, **kw)
        monkeypatch.setattr(ms_init.Normal, "_initialize", counting)
        monkeypatch.setattr(model_module, "load_hf_checkpoint", recording)


def test_checkpoint_build_calls_no_initialiser(tiny, monkeypatch):
    _, _, good = tiny
    counter = _InitCounter(monkeypatch)
    _model(good, use_past=True, block_size=16, num_blocks=4)  # without a checkpoint: random init
    assert counter.normal > 10 and counter.at_load is None
    counter.normal = 0
    model = _model(good, use_past=True, block_size=16, num_blocks=4, checkpoint_name_or_path=good)
    assert counter.normal == 0
    supplied = {e.ms for e in names.expand(model.config)}
    delayed = {n for n, has_init in counter.at_load.items() if has_init}
    assert {n for n in supplied if "weight" in n and "norm" not in n} <= delayed
    for p in model.get_parameters():  # loaded or initialised after the load
        assert not p.has_init, p.name
        if p.name.endswith("latent_cache"):
            assert not p.asnumpy().any()


def test_build_inside_stock_no_init_parameters(tiny):
    """Stock create_network_without_param_init builds inside its own no_init_parameters."""
    _, _, good = tiny
    reference = _snapshot(_model(good, checkpoint_name_or_path=good))
    with no_init_parameters():
        model = _model(good, checkpoint_name_or_path=good)
        after = Parameter(ms_init.initializer("normal", (2, 2)), name="after")
        assert after.has_init  # the model's own no_init_parameters did not switch the outer one off
        plain = _model(good)
    assert any(p.has_init for p in plain.get_parameters())  # stock loads and initialises it later
    got = _snapshot(model)
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("bad", ["does/not/exist", "deepseek3_671b", "FILE"])
def test_set_but_unloadable_checkpoint_is_an_error(tiny, bad):
    _, _, good = tiny
    path = os.path.join(good, "config.json") if bad == "FILE" else bad
    with pytest.raises(ConfigError, match=r"model_config\.checkpoint_name_or_path=.*is not a folder"):
        _model(good, checkpoint_name_or_path=path)


def test_progress_on_stderr_for_a_slow_load(tiny, monkeypatch, capfd):
    _, _, good = tiny
    model = _model(good)
    monkeypatch.setattr(loader, "PROGRESS_DELAY_S", 0.0)
    loader.load_hf_checkpoint(model, good)
    err = capfd.readouterr().err
    assert "loading fp8" in err and "B/s" in err


# ------------------------------------------------------------------ the stock name hooks
def test_convert_name_over_the_671b_release():
    from mindformers_dsv3.planner.shapes import model_parameters
    config = DeepseekV3Config.from_hf_config(os.path.join(ROOT, "tests", "fixtures", "deepseek_v3_config.json"))
    release = hf.hf_checkpoint_names(config, fp8=True)
    assert len(release) == len(set(release)) == 91991
    t0 = time.perf_counter()
    mapped, refused, known, table = set(), 0, 0, names.hf_to_ms(config)
    for name in release:
        try:
            ms_name = hooks.convert_name(config, name)
        except CheckpointError as exc:
            assert name.endswith(names.SCALE_SUFFIX) and "model.model_config.checkpoint_name_or_path" in str(exc)
            refused += 1
            continue
        mapped.add(ms_name)
        known += name in table
    assert known == len(release) - refused  # every non-scale name is one the table maps
    assert time.perf_counter() - t0 < 60  # a guard only: the figure is in bench/load.py
    assert refused == sum(n.endswith(names.SCALE_SUFFIX) for n in release) > 40000
    params = {n for n, _, _ in model_parameters(config)}
    assert len(params) > 900
    assert {n for n in params if not n.endswith(BOOKKEEPING)} == mapped


def test_convert_name_refuses_hf_names_for_a_split_model(tiny):
    config = DeepseekV3Config.from_hf_config(tiny[0], **RUNTIME)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert hooks.convert_name(config, name) == name
    with pytest.raises(CheckpointError, match=r"split model.*model\.model_config\.checkpoint_name_or_path"):
        hooks.convert_name(config, name, split=True)
    assert hooks.convert_name(config, "model.layers.1.mlp.router.weight", split=True) == \
        "model.layers.1.mlp.router.weight"  # a MindSpore name passes


def test_convert_weight_dict_checks_like_the_loader(tiny):
    config_json, tensors, _ = tiny
    config = DeepseekV3Config.from_hf_config(dict(config_json, quantization_config=_qc((128, 128))), **RUNTIME)
    norm = _late(config_json, "post_attention_layernorm.weight")
    with pytest.raises(CheckpointError, match="not a float type") as err:
        hooks.convert_weight_dict(config, {norm: np.ones(tensors[norm].shape, np.int32)})
    assert err.value.tensor == norm
    o_proj = _late(config_json, "self_attn.o_proj.weight")
    scale = tensors[o_proj + names.SCALE_SUFFIX].copy()
    scale[0, 0] = np.inf
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        hooks.convert_weight_dict(config, {o_proj: tensors[o_proj], o_proj + names.SCALE_SUFFIX: scale})
    out = hooks.convert_weight_dict(config, {o_proj: tensors[o_proj],
                                             o_proj + names.SCALE_SUFFIX: tensors[o_proj + names.SCALE_SUFFIX]})
    want = _reference_dequant(tensors[o_proj], tensors[o_proj + names.SCALE_SUFFIX], (128, 128))
    np.testing.assert_array_equal(out[o_proj].asnumpy(), want)
