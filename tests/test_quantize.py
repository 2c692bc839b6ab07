"""dsv3-quantize: the msModelSlim W8A8 folder it writes (format, description, the identities of reference
section 1, the smoothing folds reconstructed from the float input), resumability after kill -9, bad input,
FP8 input, and the numpy float forward it calibrates with against our MindSpore model."""
import hashlib
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
from tests.fp8_reference import quantize_block_fp8
from tests.hf_fixtures import random_hf_state_dict, save_hf_folder, tiny_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs", "tiny", "synthetic_tokenizer", "tokenizer.json")
SMOOTHS = ("none", "smoothquant", "outlier-suppression+")
STATIC = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_b_proj", "self_attn.o_proj")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "mindformers_dsv3.quant.cli", *map(str, args), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _calibration(path, n=24, words=40):
    from mindformers_dsv3.data import SyntheticLanguage
    lang = SyntheticLanguage(128, seed=0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": lang.decode(lang.prompt(i, words))}) + "\n")
    return path


def _tree_digest(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _read(folder):
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.keys()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant")
    cfg = tiny_hf_config()
    src = base / "src"
    state = random_hf_state_dict(cfg, 0)
    save_hf_folder(str(src), cfg, state, shards=2)
    with open(TOKENIZER, "rb") as fh, open(src / "tokenizer.json", "wb") as out:
        out.write(fh.read())
    return {"dir": src, "state": state, "config": cfg, "calib": _calibration(base / "calib.jsonl"), "base": base}


@pytest.fixture(scope="module")
def outputs(source):
    out = {}
    for smooth in SMOOTHS:
        folder = source["base"] / f"out-{smooth}"
        _cli(source["dir"], folder, "--calib", source["calib"], "--smooth", smooth, "--samples", 6, "--seq-len", 32)
        out[smooth] = folder
    return out


# ----------------------------------------------------------------------------- the folder
@pytest.mark.parametrize("smooth", SMOOTHS)
def test_folder_layout_description_and_config(source, outputs, smooth):
    folder = outputs[smooth]
    files = sorted(os.listdir(folder))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"quant_model_weight_w8a8_dynamic-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert not [f for f in files if f.endswith((".npy", ".tmp"))]
    index = json.load(open(folder / "quant_model_weight_w8a8_dynamic.safetensors.index.json"))
    desc = json.load(open(folder / "quant_model_description.json"))
    config = json.load(open(folder / "config.json"))
    assert config["quantize"] == "w8a8_dynamic" and config["mla_quantize"] == "w8a8"
    assert {k: v for k, v in config.items() if k not in ("quantize", "mla_quantize")} == source["config"]
    assert desc["model_quant_type"] == "W8A8_DYNAMIC" and desc["version"] == "1.0.0"
    tensors = {k: v for k, v in desc.items() if k not in ("model_quant_type", "version", "group_size", "metadata",
                                                          "optional")}
    assert set(tensors) == set(index["weight_map"])
    state = _read(folder)
    assert set(state) == set(tensors)
    mtp = f"model.layers.{source['config']['num_hidden_layers']}."
    for name, kind in tensors.items():
        if name.startswith(mtp) or not name.startswith("model.layers.") or "norm" in name \
                or ".kv_b_proj." in name or ".mlp.gate." in name:
            want = "FLOAT"
        elif ".mlp." in name:
            want = "W8A8_DYNAMIC"
        else:
            want = "W8A8"
        assert kind == want, name
        leaf = name.rsplit(".", 1)[1]
        if kind != "FLOAT":
            assert state[name].dtype == {"weight": np.int8, "quant_bias": np.int32}.get(leaf, np.float32), name
    biases = sorted(n for n in tensors if n.endswith("norm.bias"))
    assert bool(biases) == (smooth == "outlier-suppression+")
    if biases:  # one per input_layernorm and q_a_layernorm of every decoder layer, listed FLOAT
        assert len(biases) == 2 * source["config"]["num_hidden_layers"]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias", f"{mtp}eh_proj.weight"):
        np.testing.assert_array_equal(state[name], source["state"][name])


@pytest.mark.parametrize("smooth", SMOOTHS)
def test_quantized_tensors_keep_the_identities(source, outputs, smooth):
    """Reference section 1 from the output alone: symmetric int8 in [-127, 127] with zero offsets,
    deq_scale = f32(input_scale * weight_scale), integer-valued offsets; q_a and kv_a share their input."""
    state = _read(outputs[smooth])
    weights = [n[:-len(".weight")] for n in state if n.endswith(".weight") and state[n].dtype == np.int8]
    assert len(weights) == 4 * 4 + 3 + 3 * (3 * 8 + 3)
    for p in weights:
        q = state[p + ".weight"]
        assert q.min() >= -127 and q.max() <= 127
        assert state[p + ".weight_scale"].shape == (q.shape[0], 1) and (state[p + ".weight_scale"] > 0).all()
        scale = state[p + ".weight_scale"]
        np.testing.assert_array_equal(scale, scale.astype(BF16).astype(np.float32))  # bf16-exact: kernels read bf16
        assert (state[p + ".weight_offset"] == 0).all() and state[p + ".weight_offset"].shape == (q.shape[0], 1)
        if p + ".input_scale" not in state:
            continue
        s, o = state[p + ".input_scale"], state[p + ".input_offset"]
        assert s.shape == (1,) and o.shape == (1,) and o[0] == np.rint(o[0]) and -128 <= o[0] <= 127
        assert state[p + ".deq_scale"].shape == (q.shape[0],) and state[p + ".quant_bias"].shape == (q.shape[0],)
        np.testing.assert_array_equal(state[p + ".deq_scale"], (s * scale[:, 0]).astype(np.float32))
    for layer in range(4):
        a, b = f"model.layers.{layer}.self_attn.q_a_proj", f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa"
        for leaf in (".input_scale", ".input_offset"):
            np.testing.assert_array_equal(state[a + leaf], state[b + leaf])


@pytest.mark.parametrize("smooth", SMOOTHS)
def test_smoothing_folds_reconstruct_the_float_layer(source, outputs, smooth):
    """From the float input and the output: s = norm_w / norm_w', z = -bias' * s; then int8 * weight_scale is
    W * s within half a step per row, and quant_bias = round(W z / deq - offset * sum W_int8) (+-1)."""
    state, src = _read(outputs[smooth]), source["state"]
    for layer in range(4):
        p = f"model.layers.{layer}."
        pairs = [("input_layernorm", ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"]),
                 ("self_attn.q_a_layernorm", ["self_attn.q_b_proj"])]
        for norm, linears in pairs:
            s = src[p + norm + ".weight"] / state[p + norm + ".weight"]
            if smooth == "none":
                np.testing.assert_array_equal(s, 1.0)
            z = -state.get(p + norm + ".bias", np.zeros_like(s)) * s
            for lin in linears:
                q, ws = state[p + lin + ".weight"].astype(np.float64), state[p + lin + ".weight_scale"]
                target = src[p + lin + ".weight"] * s[None, :]
                assert (np.abs(q * ws - target) <= ws * 0.5 + 1e-6 * np.abs(target)).all(), p + lin
                bias = src[p + lin + ".weight"].astype(np.float64) @ z
                want = np.rint(bias / state[p + lin + ".deq_scale"]
                               - state[p + lin + ".input_offset"][0] * q.sum(1))
                assert np.abs(state[p + lin + ".quant_bias"] - want).max() <= 1, p + lin
        # kv_b -> o: o's columns times s, kv_b's V rows divided by s (no shift)
        kv_src, kv = src[p + "self_attn.kv_b_proj.weight"], state[p + "self_attn.kv_b_proj.weight"]
        heads, dn, dv = 4, 16, 16
        v_src, v = kv_src.reshape(heads, dn + dv, -1)[:, dn:], kv.reshape(heads, dn + dv, -1)[:, dn:]
        np.testing.assert_array_equal(kv_src.reshape(heads, dn + dv, -1)[:, :dn],
                                      kv.reshape(heads, dn + dv, -1)[:, :dn])
        s = (v_src / v).mean(-1).reshape(-1)
        q, ws = state[p + "self_attn.o_proj.weight"].astype(np.float64), state[p + "self_attn.o_proj.weight_scale"]
        target = src[p + "self_attn.o_proj.weight"] * s[None, :]
        assert (np.abs(q * ws - target) <= ws * 0.5 + 1e-5 * np.abs(target)).all()
        if smooth == "none":
            np.testing.assert_array_equal(kv, kv_src)


def test_static_range_covers_the_calibration_input(source, outputs):
    """The first layer's q_a input range from the float model on the calibration rows: every value quantizes
    inside [-128, 127] without clipping more than rounding (min-max calibration)."""
    from mindformers_dsv3.config import DeepseekV3Config
    from mindformers_dsv3.quant import calibrate as cal
    config = DeepseekV3Config.from_hf_config(str(source["dir"]), seq_length=64)
    texts = cal.read_texts(str(source["calib"]))
    ids = cal.calibration_ids(texts, TOKENIZER, 128, config.bos_token_id, 6, 32)
    state, src = _read(outputs["outlier-suppression+"]), source["state"]
    x = src["model.embed_tokens.weight"][ids]
    xn = cal.rms_raw(x, config.rms_norm_eps) * state["model.layers.0.input_layernorm.weight"] \
        + state["model.layers.0.input_layernorm.bias"]
    s, o = state["model.layers.0.self_attn.q_a_proj.input_scale"][0], \
        state["model.layers.0.self_attn.q_a_proj.input_offset"][0]
    q = xn / s + o
    assert q.min() >= -128.5 - 1e-3 and q.max() <= 127.5 + 1e-3
    assert q.max() - q.min() > 250  # the range is used, not wasted


def test_float_forward_matches_our_model(source):
    """The numpy forward the calibration runs (calibrate.attention, route, swiglu) equals our MindSpore
    model's logits on the same float weights (fp32)."""
    from mindspore import Tensor
    from mindformers_dsv3.config import DeepseekV3Config
    from mindformers_dsv3.quant import quantize_eval as qe
    from tests.model_fixtures import build_ms_model
    config = DeepseekV3Config.from_hf_config(str(source["dir"]), seq_length=64)
    ids = np.random.default_rng(1).integers(0, 128, (2, 24))
    ours = qe.forward_logits(qe.Weights(source["state"]), config, ids)
    model = build_ms_model(str(source["dir"]), use_past=False)
    theirs = np.asarray(model.forward_logits(Tensor(ids.astype(np.int32)))).reshape(ours.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- resume, bad input, FP8
def test_resume_after_kill_is_byte_identical(source, outputs, tmp_path):
    out = tmp_path / "out"
    args = (source["dir"], out, "--calib", source["calib"], "--samples", 6, "--seq-len", 32)
    killed = _cli(*args, "--debug-kill-at", 3, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = json.load(open(out / "dsv3-convert.manifest.json"))
    assert not manifest["complete"] and any(n.endswith(".npy") for n in manifest["files"])
    done = _cli(*args)
    assert "(3 already done)" in done.stdout, done.stdout
    first = _tree_digest(outputs["outlier-suppression+"])
    again = _tree_digest(out)
    assert {k: v for k, v in again.items() if not k.startswith(".")} == \
        {k: v for k, v in first.items() if not k.startswith(".") and k != "dsv3-convert.manifest.json"} | \
        {"dsv3-convert.manifest.json": again["dsv3-convert.manifest.json"]}
    check = subprocess.run([sys.executable, "-m", "mindformers_dsv3.checkpoint", "check", str(out)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr


def _one_line_error(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv3-quantize: error:"), proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_refused_naming_it(source, tmp_path):
    before = _tree_digest(source["dir"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "bi bep"}\n{"txt": 3}\n')
    out = tmp_path / "out"
    _one_line_error(_cli(source["dir"], out, "--calib", bad, check=False), str(bad), "line 2")
    assert not out.exists()
    _one_line_error(_cli(source["dir"], out, "--calib", source["calib"], "--tokenizer", tmp_path, check=False),
                    "tokenizer.json")
    _one_line_error(_cli(source["dir"], source["dir"] / "inside", "--calib", source["calib"], check=False),
                    "input folder or inside it")
    # a tensor missing from the input: named, with its file
    broken = tmp_path / "broken"
    state = dict(source["state"])
    del state["model.layers.2.self_attn.o_proj.weight"]
    save_hf_folder(str(broken), source["config"], state)
    _one_line_error(_cli(broken, out, "--calib", source["calib"], "--tokenizer", TOKENIZER, check=False),
                    "model.layers.2.self_attn.o_proj.weight", "missing")
    assert not out.exists()
    assert _tree_digest(source["dir"]) == before


def test_an_output_folder_is_not_an_input(source, outputs, tmp_path):
    proc = _cli(outputs["none"], tmp_path / "again", "--calib", source["calib"], check=False)
    _one_line_error(proc, "already quantized")


def test_fp8_input(source, tmp_path):
    """An FP8 folder (e4m3 + weight_scale_inv): FLOAT tensors come out bf16 (dequantized), the config loses the
    FP8 quantization_config and says bfloat16."""
    cfg = dict(source["config"], quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                      "activation_scheme": "dynamic", "weight_block_size": [16, 16]})
    state = {}
    for name, value in source["state"].items():
        if value.ndim == 2 and "norm" not in name and "embed" not in name and "head" not in name \
                and not name.endswith("mlp.gate.weight"):
            state[name], state[name + "_scale_inv"] = quantize_block_fp8(value, (16, 16))
        else:
            state[name] = value.astype(BF16)
    src = tmp_path / "fp8"
    save_hf_folder(str(src), cfg, state)
    out = tmp_path / "out"
    _cli(src, out, "--calib", source["calib"], "--tokenizer", TOKENIZER, "--samples", 4, "--seq-len", 32)
    result = _read(out)
    assert result["model.layers.0.self_attn.kv_b_proj.weight"].dtype == BF16
    assert result["model.embed_tokens.weight"].dtype == BF16
    assert result["model.layers.0.self_attn.q_a_proj.weight"].dtype == np.int8
    config = json.load(open(out / "config.json"))
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- accuracy on the trained model
def trained_tiny_folder(workdir, steps=80):
    """The demo-trained tiny model (`python -m mindformers_dsv3.demo`, stock Trainer, a real subprocess) as an
    fp32 HF folder with the synthetic tokenizer: the MindSpore checkpoint mapped back through names.to_hf."""
    import mindspore as ms
    from mindformers import MindFormerConfig
    from mindformers_dsv3.checkpoint import names
    from mindformers_dsv3.config import DeepseekV3Config, plain
    workdir = os.fspath(workdir)
    demo = os.path.join(workdir, "demo")
    proc = subprocess.run([sys.executable, "-m", "mindformers_dsv3.demo", "--steps", str(steps), "--keep", demo],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    folder = os.path.join(demo, "output", "checkpoint", "rank_0")
    saved = sorted((f for f in os.listdir(folder) if f.endswith(".safetensors")),
                   key=lambda f: int(f.rsplit("_", 1)[-1].split(".")[0])) if os.path.isdir(folder) else []
    assert saved, proc.stdout[-2000:] + proc.stderr[-2000:]
    mc = plain(MindFormerConfig(os.path.join(ROOT, "configs", "tiny", "finetune_deepseek3_tiny.yaml"))
               .model.model_config)
    config = DeepseekV3Config(**{k: v for k, v in mc.items() if k not in ("type", "auto_register")})
    params = ms.load_checkpoint(os.path.join(folder, saved[-1]), format="safetensors")
    state = {}
    for e in names.expand(config):
        for n, a in zip(e.hf, names.to_hf(e, params[e.ms].asnumpy().astype(np.float32), config)):
            state[n] = np.ascontiguousarray(a)
    for hf, ms_name in names.shared_hf_names(config).items():
        state[hf] = params[ms_name].asnumpy().astype(np.float32)
    hf = dict(config.to_hf_dict(), torch_dtype="float32")
    out = os.path.join(workdir, "trained")
    save_hf_folder(out, hf, state)
    with open(TOKENIZER, "rb") as fh, open(os.path.join(out, "tokenizer.json"), "wb") as dst:
        dst.write(fh.read())
    return out


def language_texts(path, data_seed, rows, length):
    """`rows` samples of the demo's synthetic language (another data_seed than training) as jsonl text."""
    from mindformers_dsv3.data import SyntheticLanguage
    lang = SyntheticLanguage(128, seed=0, noise=0.1, data_seed=data_seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"text": lang.decode(lang.sample(i, length))}) + "\n")
    return path


def held_out_ids(rows=16, length=64):
    from mindformers_dsv3.data import SyntheticLanguage
    lang = SyntheticLanguage(128, seed=0, noise=0.1, data_seed=4)
    return np.stack([lang.sample(i, length) for i in range(rows)]).astype(np.int32)


def model_logits(folder, ids):
    """forward_logits of our model loaded from `folder` (float HF, or msModelSlim W8A8: from_hf_config reads
    its description) on token rows ids."""
    from mindspore import Tensor
    from tests.model_fixtures import build_ms_model
    model = build_ms_model(folder, use_past=False, seq_length=ids.shape[1])
    return np.asarray(model.forward_logits(Tensor(ids))).reshape(ids.shape + (-1,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    folder = trained_tiny_folder(base, steps=80)
    calib = language_texts(base / "calib.jsonl", 3, 64, 64)
    out = {}
    for smooth in SMOOTHS:
        out[smooth] = base / f"w8a8-{smooth}"
        _cli(folder, out[smooth], "--calib", calib, "--smooth", smooth, "--samples", 32, "--seq-len", 64)
    return folder, out


@pytest.mark.parametrize("smooth", SMOOTHS)
def test_accuracy_on_the_trained_model(trained, smooth):
    """Issue 12 acceptance: dsv3-quantize output, loaded by our model (from_hf_config + load_hf_checkpoint),
    against the float model on held-out text: top-1 agreement >= 95%, mean KL <= 0.05, perplexity +3% at most."""
    from mindformers_dsv3.quant.calibrate import compare_logits
    folder, out = trained
    ids = held_out_ids()
    ref, quant = model_logits(folder, ids), model_logits(str(out[smooth]), ids)
    figures = compare_logits(ref[:, :-1], quant[:, :-1], ids[:, 1:].astype(np.int64))
    assert figures["top1_agreement"] >= 0.95, figures
    assert figures["mean_kl"] <= 0.05, figures
    assert figures["ppl_increase"] <= 0.03, figures
    assert figures["ppl_ref"] < 4.0, figures  # the model did learn the language (uniform: 124)


@pytest.mark.parametrize("smooth", ["none", "outlier-suppression+"])
def test_description_reads_back_as_the_deepseek_recipe(source, outputs, smooth):
    """The description the tool writes, read by the one parser (quant/config.py: description_config +
    QuantSpec), gives the DeepSeek recipe module by module, and a norm bias exactly where the shift went."""
    from mindformers_dsv3.quant.config import QuantSpec, description_config, layer_schemes
    path = outputs[smooth] / "quant_model_description.json"
    spec = QuantSpec.from_config(description_config(json.load(open(path)), str(path)), 4)
    for layer in range(4):
        got = layer_schemes(spec, layer)
        for module in ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_b_proj", "self_attn.o_proj"):
            assert got[module] == "W8A8", (layer, module)
        assert got["self_attn.kv_b_proj"] == "FLOAT"
        mlp = ("mlp.gate_up_proj", "mlp.down_proj") if layer == 0 else \
            ("mlp.experts", "mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj")
        for module in mlp:
            assert got[module] == "W8A8_DYNAMIC", (layer, module)
        for norm in ("input_layernorm", "self_attn.q_a_layernorm"):
            assert got[norm] == (smooth == "outlier-suppression+"), (layer, norm)
    assert spec.scheme("model.layers.4.self_attn.q_a_proj") == "FLOAT"  # the MTP layer
