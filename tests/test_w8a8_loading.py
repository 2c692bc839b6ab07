"""msModelSlim W8A8 folders load into the W8A8 model (issue 12, item 3 and its acceptance).

The folder (tests/w8a8_fixtures.py) is a tiny random DeepSeek-V3 quantized by the DeepSeek recipe with plain
numpy: static attention (q_a, kv_a, q_b, o), dynamic MLP and experts, FLOAT kv_b / router / head, smoothing
shifts as `model.layers.1.input_layernorm.bias` and `model.layers.2.self_attn.q_a_layernorm.bias`. The oracle
is tests/reference/numpy_w8a8.py (exact integer arithmetic of the reference's section 2), not our loader: the model's logits must match it far more
closely than a weight-only dequantized float model (the same int8 weights, float activations) does, and
cached greedy generation must give the oracle's tokens.
"""
import json
import os
import shutil

import numpy as np
import pytest

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint
from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from tests import hf_fixtures as hf
from tests import w8a8_fixtures as wf
from tests.model_fixtures import TINY_RUNTIME, build_ms_model
from tests.reference import numpy_dsv3, numpy_w8a8

IDS = np.random.default_rng(5).integers(2, 128, size=(2, 12))
PROMPT = [4, 24, 104, 83, 117, 65, 78]  # the reference's top-1 margins >= 0.06 (checked below)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w8a8"))
    config, state, qstate, desc = wf.make_w8a8_folder(path)
    return path, config, state, qstate, desc


@pytest.fixture(scope="module")
def model(folder):
    return build_ms_model(folder[0])


def _params(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters() if not p.name.endswith("latent_cache")}


def test_parameters_are_the_checkpoints(folder, model):
    _, config, _, qstate, _ = folder
    p = {x.name: x for x in model.get_parameters()}
    a = "model.layers.1.self_attn."
    assert str(p[a + "q_a_proj.weight"].dtype) == "Int8" and str(p[a + "q_a_proj.quant_bias"].dtype) == "Int32"
    np.testing.assert_array_equal(p[a + "q_a_proj.weight"].asnumpy(), qstate[a + "q_a_proj.weight"])
    np.testing.assert_array_equal(p[a + "o_proj.deq_scale"].asnumpy(), qstate[a + "o_proj.deq_scale"])
    np.testing.assert_array_equal(p["model.layers.1.input_layernorm.bias"].asnumpy(),
                                  qstate["model.layers.1.input_layernorm.bias"])
    np.testing.assert_array_equal(p["model.layers.2.self_attn.q_a_layernorm.bias"].asnumpy(),
                                  qstate["model.layers.2.self_attn.q_a_layernorm.bias"])
    m = "model.layers.2.mlp."
    e = 5
    gate, up = (qstate[f"{m}experts.{e}.{w}_proj.weight"] for w in ("gate", "up"))
    np.testing.assert_array_equal(p[m + "experts.gate_up_proj"].asnumpy()[e], np.concatenate([gate, up]).T)
    np.testing.assert_array_equal(p[m + "experts.down_proj"].asnumpy()[e], qstate[f"{m}experts.{e}.down_proj.weight"].T)
    scales = np.concatenate([qstate[f"{m}experts.{e}.{w}_proj.weight_scale"][:, 0] for w in ("gate", "up")])
    np.testing.assert_array_equal(p[m + "experts.gate_up_scale"].asnumpy()[e], scales)
    np.testing.assert_array_equal(p[m + "shared_experts.gate_up_proj.weight_scale"].asnumpy(), np.concatenate(
        [qstate[f"{m}shared_experts.{w}_proj.weight_scale"][:, 0] for w in ("gate", "up")]))
    # kv_b stays float (bf16 in the file, exact in float32)
    np.testing.assert_array_equal(p[a + "kv_b_proj.weight"].asnumpy(), qstate[a + "kv_b_proj.weight"].astype(np.float32))


def test_forward_logits_match_the_numpy_w8a8_reference(folder, model):
    _, config, state, qstate, desc = folder
    want = numpy_w8a8.forward_logits(config, qstate, desc, IDS)
    got = model.forward_logits(IDS)
    dequantized = numpy_dsv3.forward_logits(config, wf.dequantized_state(config, state, qstate, desc), IDS)
    err_model = float(np.abs(got - want).max())
    err_weight_only = float(np.abs(dequantized - want).max())
    print(f"max |logit error| vs numpy W8A8: model {err_model:.3g}, weight-only dequantized float "
          f"{err_weight_only:.3g} (ratio {err_weight_only / max(err_model, 1e-30):.0f}x)")
    assert err_model < 1e-4  # measured 5.5e-7 (float32 vs float64 float parts)
    assert err_model * 1000 < err_weight_only  # measured 0.049: about 9e4x


def test_cached_greedy_generation_equals_the_reference(folder, model):
    _, config, _, qstate, desc = folder
    want, margins = numpy_w8a8.greedy(config, qstate, desc, PROMPT, NEW_TOKENS)
    assert min(margins) > 1e-2, f"the reference's top-1 margins {margins} are too thin to compare"
    out = model.generate([PROMPT], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert [int(t) for t in out[0]] == want


def _blank(path, **kw):
    """A model built for the folder's config, nothing loaded."""
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf_config(path, **dict(TINY_RUNTIME, use_past=True), **kw))
    model.set_train(False)
    return model


@pytest.fixture(scope="module")
def blank(folder):
    return _blank(folder[0])


@pytest.mark.parametrize("layout, description", [
    ("hf", wf.DESCRIPTION),                                   # model-*.safetensors + model.safetensors.index.json
    ("single", "quant_model_description_w8a8_dynamic.json"),  # one unsharded file, --mindie_format's name
    ("msmodelslim", "quant_model_description_w8a8_dynamic.json"),
])
def test_index_and_description_variants_load_the_same(tmp_path, folder, model, blank, layout, description):
    _, config, _, qstate, desc = folder
    wf.save_w8a8_folder(tmp_path, config, qstate, desc, shards=3, layout=layout, description_name=description)
    load_hf_checkpoint(blank, str(tmp_path))
    want, got = _params(model), _params(blank)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_checkpoint_name_or_path_loads_the_folder(folder, model):
    path = folder[0]
    loaded = _blank(path, checkpoint_name_or_path=path)  # the constructor streams it (stock hook load_checkpoint)
    np.testing.assert_array_equal(loaded.forward_logits(IDS), model.forward_logits(IDS))


def _bad_missing_named(qstate, desc):
    desc["model.layers.0.self_attn.q_a_proj.smooth_scale"] = "W8A8"
    return "model.layers.0.self_attn.q_a_proj.smooth_scale", wf.DESCRIPTION, "not in the checkpoint"


def _bad_float_weight(qstate, desc):
    name = "model.layers.2.self_attn.q_b_proj.weight"
    qstate[name] = qstate[name].astype(np.float32)
    return name, "quant_model_weight_w8a8_dynamic.safetensors", "is int8"


def _bad_scale_shape(qstate, desc):
    name = "model.layers.0.mlp.down_proj.weight_scale"
    qstate[name] = qstate[name][:-1]
    return name, "quant_model_weight_w8a8_dynamic.safetensors", "does not match the model's (64, 1)"


def _bad_expert_scale_shape(qstate, desc):
    name = "model.layers.3.mlp.experts.6.gate_proj.weight_scale"
    qstate[name] = np.ones((1, 1), np.float32)
    return name, "quant_model_weight_w8a8_dynamic.safetensors", "does not match"


def _bad_weight_offset(qstate, desc):
    name = "model.layers.3.mlp.shared_experts.up_proj.weight_offset"
    qstate[name] = qstate[name].copy()
    qstate[name][3] = 1.0
    return name, "quant_model_weight_w8a8_dynamic.safetensors", "nonzero"


def _bad_scheme(qstate, desc):
    name = "model.layers.2.self_attn.o_proj.weight"
    desc.update({n: "W8A8_DYNAMIC" for n in desc if n.startswith(name[:-len("weight")])})
    return name, wf.DESCRIPTION, "the description says W8A8_DYNAMIC but the model's quantization_config makes it W8A8"


def _bad_absent(qstate, desc):
    name = "model.layers.1.self_attn.q_b_proj.deq_scale"
    del qstate[name], desc[name]
    return name, None, "missing"


@pytest.mark.parametrize("spoil", [_bad_missing_named, _bad_float_weight, _bad_scale_shape, _bad_expert_scale_shape,
                                   _bad_weight_offset, _bad_scheme, _bad_absent])
def test_bad_folder_is_refused_naming_tensor_and_file(tmp_path, folder, blank, spoil):
    _, config, _, qstate, desc = folder
    qstate, desc = dict(qstate), dict(desc)
    tensor, file, reason = spoil(qstate, desc)
    wf.save_w8a8_folder(tmp_path, config, qstate, desc, layout="single")
    before = _params(blank)
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(blank, str(tmp_path))
    assert err.value.tensor == tensor and reason in str(err.value), str(err.value)
    assert os.path.basename(err.value.file) == (file or os.path.basename(str(tmp_path))), str(err.value)
    after = _params(blank)
    assert all(np.array_equal(before[n], after[n]) for n in before), "a refused load changed parameters"


def test_w8a8_folder_into_a_float_model_is_refused(tmp_path, folder):
    path, config = folder[:2]
    float_dir = tmp_path / "float"
    hf.save_hf_folder(float_dir, config, hf.random_hf_state_dict(config, seed=1))
    with pytest.raises(CheckpointError, match="not quantized") as err:
        load_hf_checkpoint(_blank(str(float_dir)), path)
    assert os.path.basename(err.value.file) == wf.DESCRIPTION


def test_stock_hooks_convert_what_mindspore_reads(tmp_path, folder, model):
    """The stock route (load_checkpoint: <folder>): MindSpore's own safetensors reader, then the model's hooks."""
    import mindspore as ms
    path, config, _, qstate, desc = folder
    source = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            source.update(ms.load_checkpoint(os.path.join(path, name), format="safetensors"))
    blank = _blank(path)
    assert blank.convert_name("model.layers.2.mlp.experts.3.down_proj.weight_scale") == "model.layers.2.mlp.experts.down_scale"
    converted = blank.convert_weight_dict(dict(source))
    ms.load_param_into_net(blank, converted)
    want, got = _params(model), _params(blank)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    name = "model.layers.3.mlp.shared_experts.up_proj.weight_offset"
    source[name] = ms.Parameter(ms.Tensor(np.ones((32, 1), np.float32)), name=name)
    with pytest.raises(CheckpointError, match="nonzero") as err:
        blank.convert_weight_dict(source)
    assert err.value.tensor == name


class _Shard:
    """The parameters one rank of a split W8A8 model holds (local shapes by parallel/layout.py), nothing else."""

    def __init__(self, config, par, params):
        self.config, self.parallel, self.params = config, par, params

    def get_parameters(self):
        return iter(self.params)


def _shard(config, par, whole):
    from mindspore import Parameter, Tensor
    from mindformers_dsv3.parallel.layout import local_shape, param_rule
    params = []
    for entry in names.expand(config):
        full = whole[entry.ms]
        shape = local_shape(full.shape, param_rule(entry.ms)[3], par.layout)
        params.append(Parameter(Tensor(np.zeros(shape, full.dtype)), name=entry.ms))
    return _Shard(config, par, params)


def _local_of(name, full, slices):
    """A parameter's expected local value: fused [gate; up] (weights and scales) keep their halves' rows."""
    index = tuple(slice(*s) if s else slice(None) for s in slices)
    fused = {"gate_up_proj.weight": 0, "gate_up_proj.weight_scale": 0, "experts.gate_up_proj": 2,
             "experts.gate_up_scale": 1}
    dim = next((d for suffix, d in fused.items() if name.endswith(suffix)), None)
    if dim is None or slices[dim] is None:
        return full[index]
    a, b = slices[dim]
    inner = list(index)
    inner[dim] = slice(a // 2, b // 2)
    return np.concatenate([p[tuple(inner)] for p in np.split(full, 2, axis=dim)], axis=dim)


@pytest.mark.parametrize("layout", ["1x2x1", "1x2x2", "1x4x2"])
def test_rank_slices_reassemble_the_whole_w8a8_model(folder, model, layout):
    """Split inference: each rank reads its slices of the unified msModelSlim folder (int8 weights, their
    vectors, expert scales); a row-parallel static quant_bias (o_proj) is held by the first TP rank only."""
    from mindformers_dsv3.parallel.comm import ParallelContext
    from mindformers_dsv3.parallel.layout import Layout
    path = folder[0]
    whole = _params(model)
    dp, mp, ep = (int(x) for x in layout.split("x"))
    layout_obj = Layout.from_parallel_config(dict(data_parallel=dp, model_parallel=mp, expert_parallel=ep))
    config = DeepseekV3Config.from_hf_config(path, **dict(TINY_RUNTIME, use_past=True))
    split = set()
    for rank in range(dp * mp):
        par = ParallelContext(layout_obj, rank, dp * mp)
        shard = _shard(config, par, whole)
        load_hf_checkpoint(shard, path)
        for param in shard.params:
            got, slices = param.asnumpy(), par.param_slices(param.name, tuple(param.shape))
            want = whole[param.name] if slices is None else _local_of(param.name, whole[param.name], slices)
            if param.name.endswith("o_proj.quant_bias") and par.tp_rank > 0:
                want = np.zeros_like(want)
            split.update([param.name] if slices is not None else [])
            np.testing.assert_array_equal(got, want, err_msg=f"{param.name} rank {rank}")
    assert {"model.layers.1.self_attn.q_b_proj.deq_scale", "model.layers.0.mlp.gate_up_proj.weight_scale",
            "model.layers.2.mlp.experts.gate_up_scale"} <= split


def _reference_steps(folder, prompts, fed, row_split):
    """The numpy W8A8 logits at the positions cached_step_logits returns (last prompt position, each fed token)."""
    _, config, _, qstate, desc = folder
    out = []
    for prompt, more in zip(prompts, fed):
        seq = np.concatenate([prompt, more])[None]
        logits = numpy_w8a8.forward_logits(config, qstate, desc, seq, row_split=row_split)[0]
        out.append(logits[len(prompt) - 1:])
    return np.stack(out)


def test_msrun_two_ranks_load_their_slices(folder, model, tmp_path):
    """msrun TP=2 (1x2x1): each rank builds the W8A8 model from YAML keys (quantization_config from the
    description) and loads its slices through checkpoint_name_or_path (tests/dist/w8a8_infer.py). Its cached
    logits equal the numpy W8A8 reference run as TP=2 (each row-parallel dynamic down_proj quantizes its K
    slice per token), which differs from the whole model by quantization noise."""
    import subprocess
    import sys
    from tests.conftest import free_port, msrun_env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ids = np.random.RandomState(1).randint(2, 128, size=(2, 16))
    prompts, fed = [ids[0, :9], ids[1, :4]], np.stack([ids[0, 9:16], ids[1, 4:11]])
    np.savez(tmp_path / "inputs.npz", batch=2, prompt0=prompts[0], prompt1=prompts[1], fed=fed,
             new_tokens=np.array([NEW_TOKENS, NEW_TOKENS]))
    out, logs = tmp_path / "out", tmp_path / "logs"
    cmd = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
           f"--master_port={free_port()}", "--join=True", f"--log_dir={logs}",
           os.path.join(root, "tests", "dist", "w8a8_infer.py"), "--hf", folder[0],
           "--inputs", str(tmp_path / "inputs.npz"), "--out", str(out), "--layouts", "1x2x1"]
    proc = subprocess.run(cmd, cwd=root, env=msrun_env(PYTHONPATH=root), capture_output=True, text=True,
                          timeout=1200)
    tails = "".join(open(os.path.join(logs, n), errors="replace").read()[-3000:] for n in sorted(os.listdir(logs))
                    ) if proc.returncode and os.path.isdir(logs) else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + tails
    split_ref = _reference_steps(folder, prompts, fed, row_split=2)
    whole_ref = _reference_steps(folder, prompts, fed, row_split=1)
    noise = float(np.abs(split_ref - whole_ref).max())
    for rank in range(2):
        got = np.load(out / "1x2x1" / f"rank{rank}.npz")["logits"]
        err = float(np.abs(got - split_ref).max())
        print(f"rank {rank}: max |logit error| vs the TP=2 numpy reference {err:.3g}; "
              f"TP=2 vs whole reference {noise:.3g}; vs whole reference {float(np.abs(got - whole_ref).max()):.3g}")
        assert err < 1e-4 and err * 100 < noise
