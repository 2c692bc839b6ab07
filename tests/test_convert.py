"""dsv3-convert: HF FP8/BF16 <-> MindSpore in one streaming, parallel, resumable, safe pass.

The FP8 fixture follows the released checkpoint's layout: several shards with an index (a weight and
its scale may sit in different shards), `quantization_config`, e4m3 weights with float32 128x128
`weight_scale_inv` (every tiny tensor is one partial block). References are independent: transformers
on weights dequantized with torch, and the official fp8_cast_bf16 formula.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from mindformers_dsv3.checkpoint import cli, names, streaming, transform
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import FP8
from mindformers_dsv3.checkpoint.safetensors_io import INDEX_NAME, open_checkpoint, write_index
from mindformers_dsv3.config import DeepseekV3Config
from tests import hf_fixtures as hf
from tests.fp8_reference import dequantize_block_fp8, quantize_block_fp8
from tests.hf_fixtures import write_safetensors
from tests.model_fixtures import TINY_RUNTIME, build_ms_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 1e-4


# ----------------------------------------------------------------------------- fixtures
def save_folder(folder, config, tensors, shards=3, extra_files=None):
    """HF folder: config.json, round-robin shards by name (a weight and its scale may be apart), index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for j, k in enumerate(keys) if j % shards == i}
        write_safetensors(os.path.join(folder, fname), part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    write_index(folder, weight_map, sum(int(a.nbytes) for a in tensors.values()))
    for name, text in (extra_files or {}).items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    return folder


def quantize_state(state):
    out = {}
    for name, value in state.items():
        if hf.is_quantized_weight(name):
            out[name], out[name + names.SCALE_SUFFIX] = quantize_block_fp8(value)
        else:
            out[name] = value
    return out


def torch_dequant(q, s, block=128):
    """Independent reference: torch's float8 cast, scales repeated over their blocks."""
    w = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).view(torch.float8_e4m3fn).float()
    scale = torch.from_numpy(s).repeat_interleave(block, 0)[:q.shape[0]].repeat_interleave(block, 1)[:, :q.shape[1]]
    return w * scale


def digest(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def tensors_of(folder):
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.keys()}


def run(mode, src, dst, **kw):
    """transform.convert, asserting the input folder is left untouched."""
    before = digest(src)
    try:
        return transform.convert(mode, src, dst, progress=False, **kw)
    finally:
        assert digest(src) == before, "the converter modified its input"


@pytest.fixture(scope="module")
def tiny():
    config = hf.tiny_hf_config()
    return config, hf.random_hf_state_dict(config, seed=0)


@pytest.fixture(scope="module")
def fp8_tensors(tiny):
    return quantize_state(tiny[1])


@pytest.fixture(scope="module")
def fp8_dir(tiny, fp8_tensors, tmp_path_factory):
    config = dict(tiny[0], quantization_config=QC, torch_dtype="bfloat16")
    return save_folder(tmp_path_factory.mktemp("fp8") / "hf", config, fp8_tensors,
                       extra_files={"tokenizer_config.json": '{"model_max_length": 128}\n'})


@pytest.fixture(scope="module")
def ms_fp32(fp8_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ms32") / "ms"
    run("hf-to-ms", fp8_dir, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def ms_bf16(fp8_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ms16") / "ms"
    run("hf-to-ms", fp8_dir, out, dtype="bf16", workers=1)
    return out


@pytest.fixture(scope="module")
def dequantized(tiny, fp8_tensors):
    """The FP8 fixture's weights as float32, dequantized by torch."""
    return {n: (torch_dequant(fp8_tensors[n], fp8_tensors[n + names.SCALE_SUFFIX]).numpy()
                if n + names.SCALE_SUFFIX in fp8_tensors else fp8_tensors[n]) for n in tiny[1]}


@pytest.fixture(scope="module")
def ids(tiny):
    return np.random.RandomState(1).randint(2, tiny[0]["vocab_size"], size=(2, 16))


@pytest.fixture(scope="module")
def reference_logits(tiny, dequantized, ids):
    with torch.no_grad():
        return hf.build_hf_model(tiny[0], dequantized)(torch.tensor(ids)).logits.numpy()


def _tiny_ms_config(folder, **kw):
    return DeepseekV3Config.from_hf_config(folder, **dict(TINY_RUNTIME, use_past=True, **kw))


# ----------------------------------------------------------------------------- the name table
def test_671b_table_covers_all_91991_tensors_of_the_real_checkpoint():
    from mindspore.nn.utils import no_init_parameters
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    config = DeepseekV3Config.from_hf_config(os.path.join(ROOT, "tests/fixtures/deepseek_v3_config.json"))
    listing = hf.hf_checkpoint_names(config, fp8=True)
    assert len(listing) == len(set(listing)) == 91991
    scales = [n for n in listing if n.endswith("weight_scale_inv")]
    # 5 attention projections x 62 layers + 3 dense MLPs x 3 + (256 experts + shared) x 3 x 59 MoE layers
    assert len(scales) == 5 * 62 + 3 * 3 + (256 + 1) * 3 * 59 == 45808
    assert "model.layers.61.eh_proj.weight_scale_inv" not in listing  # bf16 in the release
    assert "model.layers.61.mlp.experts.255.down_proj.weight_scale_inv" in listing
    with no_init_parameters():
        model = DeepseekV3ForCausalLM(config)
    params = {p.name: p for p in model.get_parameters()}
    shapes = names.hf_shapes(config)
    owner = {n: e for e in names.expand(config) for n in e.hf}  # HF name -> its table entry
    shared = names.shared_hf_names(config)
    for name in listing:
        base = name[:-len(names.SCALE_SUFFIX)] if name.endswith(names.SCALE_SUFFIX) else name
        ms_name = owner[base].ms if base in owner else shared[base]
        assert ms_name in params, name
    entries = names.expand(config)
    for e in entries:
        assert tuple(params[e.ms].shape) == tuple(names.ms_shape(e, shapes)), e.ms
    table = {e.ms for e in entries}
    rest = [p for n, p in params.items() if n not in table]
    assert all(not p.requires_grad for p in rest)  # only runtime state (caches, load counters) is left
    assert sum(np.prod(s) for n, s in shapes.items() if not n.startswith("model.layers.61.")) == 671_026_419_200


def test_expert_streaming_equals_the_table_transform(tiny):
    config = _tiny_ms_config_plain(tiny[0])
    for e in names.expand(config):
        if e.transform.startswith("experts"):
            arrays = [tiny[1][n] for n in e.hf]
            whole = names.to_ms(e, arrays, config)
            per = len(e.hf) // config.n_routed_experts
            for k in range(config.n_routed_experts):
                np.testing.assert_array_equal(whole[k], names.expert_to_ms(e.transform, arrays[k * per:(k + 1) * per]))
                for got, want in zip(names.expert_to_hf(e.transform, whole[k]), arrays[k * per:(k + 1) * per]):
                    np.testing.assert_array_equal(got, want)
    a = np.arange(37 * 70, dtype=np.float32).reshape(37, 70)
    np.testing.assert_array_equal(names.transposed(a), a.T)
    np.testing.assert_array_equal(names.transposed(a.astype(BF16)), a.T.astype(BF16))


def _tiny_ms_config_plain(hf_config):
    return DeepseekV3Config.from_hf_config(hf_config, seq_length=32)


# ----------------------------------------------------------------------------- FP8
@pytest.mark.parametrize("shape", [(576, 300), (576, 7168), (130, 129), (5, 7), (256, 128), (0, 3)])
def test_streamed_dequantization_is_bit_exact(tmp_path, monkeypatch, shape):
    """The converter's reader (streaming.Source: row chunks, and blocks starting anywhere, decoded by column
    ranges) against torch's float8 cast times the repeated scales, rounded once to the output dtype."""
    rng = np.random.default_rng(3)
    q, s = quantize_block_fp8(rng.standard_normal(shape).astype(np.float32))
    s *= rng.uniform(0.5, 2.0, s.shape).astype(np.float32)  # scales unrelated to the data
    codes = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape).astype(np.uint8).view(FP8)  # NaN codes too
    write_safetensors(tmp_path / "w.safetensors", {"w": q, "w" + names.SCALE_SUFFIX: s,
                                                   "c": codes, "c" + names.SCALE_SUFFIX: s})
    monkeypatch.setattr(streaming, "ROWS_CHUNK_BYTES", max(1, shape[1]) * 4 * 200)  # 128-row chunks
    want = torch_dequant(q, s).numpy()
    with open_checkpoint(tmp_path / "w.safetensors") as ckpt:
        src = streaming.Source(ckpt, (128, 128))
        chunks = list(src.rows("w", np.float32))
        got = np.concatenate(chunks) if chunks else np.zeros((0, shape[1]), np.float32)
        assert all(c.shape[0] % 128 == 0 for c in chunks[:-1]) and (shape[0] <= 128 or len(chunks) > 1)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(src.full("c", np.float32), torch_dequant(codes, s).numpy())
        for dtype in (BF16, np.float16, np.float32):  # dequantized and rounded in one table lookup
            ref = want.astype(dtype)
            for r0, r1, c0, c1, a, b, j0, j1 in ((0, shape[0], 0, shape[1], 0, shape[0], 0, shape[1]),
                                                 (3, shape[0], 1, shape[1], 1, shape[0] - 3, 2, shape[1] - 1)):
                if min(r1 - r0, c1 - c0, b - a, j1 - j0) <= 0:
                    continue
                out = np.empty((b - a, j1 - j0), dtype)
                src.read("w", r0, r1, c0, c1, dtype).decode(out.view(f"u{out.itemsize}"), a, b, j0, j1)
                assert out.tobytes() == ref[r0 + a:r0 + b, c0 + j0:c0 + j1].tobytes(), (dtype, r0, c0, a, j0)


def test_hf_to_ms_fp8_logits_equal_transformers_on_dequantized_weights(ms_fp32, ids, reference_logits):
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM(_tiny_ms_config(ms_fp32))
    model.set_train(False)
    assert transform.load_ms_checkpoint(model, ms_fp32) == 78
    logits = model.forward_logits(ids)
    assert reference_logits.std() > 0.5
    np.testing.assert_allclose(logits, reference_logits, atol=TOL, rtol=0)


def test_fp8_folder_loads_directly_with_equal_logits(fp8_dir, ids, reference_logits):
    model = build_ms_model(fp8_dir)
    np.testing.assert_allclose(model.forward_logits(ids), reference_logits, atol=TOL, rtol=0)


def test_hf_to_ms_output_is_our_table_layout(ms_fp32, tiny, fp8_tensors):
    config = _tiny_ms_config_plain(tiny[0])
    got = tensors_of(ms_fp32)
    deq = {n: dequantize_block_fp8(fp8_tensors[n], fp8_tensors[n + names.SCALE_SUFFIX])
           if n + names.SCALE_SUFFIX in fp8_tensors else fp8_tensors[n] for n in tiny[1]}
    entries = names.expand(config)
    assert sorted(got) == sorted(e.ms for e in entries)
    for e in entries:
        want = names.to_ms(e, [deq[n] for n in e.hf], config)
        assert got[e.ms].dtype == np.float32
        np.testing.assert_array_equal(got[e.ms], want, err_msg=e.ms)
    with open(os.path.join(ms_fp32, "config.json"), encoding="utf-8") as fh:
        written = json.load(fh)
    assert "quantization_config" not in written and written["torch_dtype"] == "float32"
    assert os.path.isfile(os.path.join(ms_fp32, "tokenizer_config.json"))
    # stock MindSpore reads our files
    import mindspore as ms
    first = sorted(f for f in os.listdir(ms_fp32) if f.endswith(".safetensors"))[0]
    assert "model.embed_tokens.weight" in ms.load_checkpoint(os.path.join(ms_fp32, first), format="safetensors")


def test_stock_mindformers_loads_the_ms_folder_as_is(ms_fp32):
    """Stock Trainer's safetensors path (our names are fixed points of convert_name: no HF conversion)."""
    from mindformers.tools.register import MindFormerConfig
    from mindformers.utils.load_checkpoint_utils import load_safetensors_checkpoint
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    config = _tiny_ms_config(ms_fp32)
    stock, ours = DeepseekV3ForCausalLM(config), DeepseekV3ForCausalLM(config)
    run_config = MindFormerConfig(use_parallel=False, auto_trans_ckpt=False, load_ckpt_format="safetensors",
                                  resume_training=False, model={"model_config": {}})
    files = sorted(str(p) for p in ms_fp32.glob("*.safetensors"))
    load_safetensors_checkpoint(run_config, files, stock, None, str(ms_fp32), None)
    transform.load_ms_checkpoint(ours, ms_fp32)
    want = {p.name: p.asnumpy() for p in ours.get_parameters()}
    for p in stock.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), want[p.name], err_msg=p.name)


def test_bf16_output_keeps_router_bias_fp32_and_loads(ms_bf16, tiny):
    got = tensors_of(ms_bf16)
    assert got["model.layers.1.mlp.router.e_score_correction_bias"].dtype == np.float32
    assert got["model.layers.1.mlp.experts.gate_up_proj"].dtype == BF16
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM(_tiny_ms_config(ms_bf16))
    transform.load_ms_checkpoint(model, ms_bf16)
    param = {p.name: p for p in model.get_parameters()}["model.layers.2.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(param.asnumpy(), got["model.layers.2.self_attn.o_proj.weight"].astype(np.float32))


def test_no_mtp_drops_the_mtp_layer(fp8_dir, tmp_path):
    run("hf-to-ms", fp8_dir, tmp_path / "ms", dtype="bf16", include_mtp=False)
    got = tensors_of(tmp_path / "ms")
    assert not [n for n in got if "mtp" in n] and len(got) == 78 - 4 - 15  # enorm, hnorm, eh_proj, norm + a layer
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    config = _tiny_ms_config(tmp_path / "ms")
    assert config.num_nextn_predict_layers == 0
    assert transform.load_ms_checkpoint(DeepseekV3ForCausalLM(config), tmp_path / "ms") == 59


def test_fp8_to_bf16_matches_the_official_formula(fp8_dir, fp8_tensors, tmp_path):
    run("fp8-to-bf16", fp8_dir, tmp_path / "bf16", workers=2)
    got = tensors_of(tmp_path / "bf16")
    assert sorted(got) == sorted(n for n in fp8_tensors if not n.endswith(names.SCALE_SUFFIX))
    for name, value in got.items():
        if name + names.SCALE_SUFFIX in fp8_tensors:
            want = torch_dequant(fp8_tensors[name], fp8_tensors[name + names.SCALE_SUFFIX]).to(torch.bfloat16)
            assert value.dtype == BF16
            np.testing.assert_array_equal(value.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))
        else:
            assert value.dtype == fp8_tensors[name].dtype
            np.testing.assert_array_equal(value, fp8_tensors[name])
    with open(tmp_path / "bf16" / "config.json", encoding="utf-8") as fh:
        config = json.load(fh)
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert sorted(f for f in os.listdir(tmp_path / "bf16") if f.endswith(".safetensors")) == \
        sorted(f for f in os.listdir(fp8_dir) if f.endswith(".safetensors"))
    assert transform.check(tmp_path / "bf16")["verified"] == "sha256"


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_ms_to_hf_after_hf_to_ms_is_bit_exact_and_transformers_loads_it(tiny, tmp_path, kind, ids):
    config, state = tiny
    if kind == "bf16":  # the released BF16 layout: bf16 weights, float32 router biases
        state = {n: a if names.keeps_float32(n) else a.astype(BF16) for n, a in state.items()}
    src = save_folder(tmp_path / "hf", dict(config, torch_dtype="float32" if kind == "fp32" else "bfloat16"),
                      state, shards=2)
    run("hf-to-ms", src, tmp_path / "ms", dtype=kind, workers=2)
    run("ms-to-hf", tmp_path / "ms", tmp_path / "back")
    back = tensors_of(tmp_path / "back")
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name
    assert transform.check(tmp_path / "back")["tensors"] == len(state)
    if kind == "fp32":
        from transformers import DeepseekV3ForCausalLM
        loaded = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back"), torch_dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        with torch.no_grad():
            want = hf.build_hf_model(config, state)(torch.tensor(ids)).logits
            np.testing.assert_array_equal(loaded(torch.tensor(ids)).logits.numpy(), want.numpy())


# ----------------------------------------------------------------------------- workers, kill, resume, check
def test_workers_give_byte_identical_output(fp8_dir, ms_bf16, tmp_path):
    run("hf-to-ms", fp8_dir, tmp_path / "w2", dtype="bf16", workers=2)
    assert digest(tmp_path / "w2") == digest(ms_bf16)


def test_sigkill_then_rerun_is_byte_identical_and_check_detects_a_flipped_byte(fp8_dir, ms_bf16, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mindformers_dsv3.checkpoint", "hf-to-ms", str(fp8_dir), str(out),
           "--dtype", "bf16", "--quiet"]
    killed = subprocess.run(cmd + ["--debug-kill-after", "2"], cwd=ROOT, capture_output=True, text=True,
                            start_new_session=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with open(out / transform.MANIFEST_NAME, encoding="utf-8") as fh:
        manifest = json.load(fh)
    assert not manifest["complete"] and len(manifest["files"]) == 2  # files 0 and 1 done
    assert [n for n in os.listdir(out) if n.endswith(".tmp")]  # file 2 was half written
    with pytest.raises(CheckpointError, match="not finished"):
        transform.check(out)
    assert cli.main(["hf-to-ms", str(fp8_dir), str(out), "--dtype", "bf16", "--quiet", "--workers", "2"]) == 0
    assert digest(out) == digest(ms_bf16)
    done = subprocess.run([sys.executable, "-m", "mindformers_dsv3.checkpoint", "check", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "78 tensors in 6 files (6 already done)" in rerun.stdout, rerun.stderr
    assert digest(out) == digest(ms_bf16)
    victim = out / "model-00003-of-00006.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model-00003-of-00006\.safetensors.*sha256"):
        transform.check(out)
    assert cli.main(["check", str(out)]) == 1


def test_check_without_manifest_is_structural(fp8_dir):
    assert transform.check(fp8_dir)["verified"].startswith("structure")


def test_refuses_output_equal_to_or_inside_the_input(fp8_dir):
    for dst in (fp8_dir, fp8_dir / "sub"):
        with pytest.raises(CheckpointError, match="inside"):
            run("hf-to-ms", fp8_dir, dst)
    assert not (fp8_dir / "sub").exists()


def test_refuses_a_foreign_or_different_output_folder(fp8_dir, ms_bf16, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        run("hf-to-ms", fp8_dir, tmp_path / "busy")
    with pytest.raises(CheckpointError, match="different conversion"):
        run("hf-to-ms", fp8_dir, ms_bf16, dtype="fp16")


# ----------------------------------------------------------------------------- corrupt inputs
def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _overlap(header):
    """Another tensor of the same size in NORM0's shard now shares NORM0's bytes."""
    size = lambda n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0]  # noqa: E731
    other = next(n for n in sorted(header) if n not in (NORM0, "__metadata__") and size(n) == size(NORM0))
    header[other]["data_offsets"] = header[NORM0]["data_offsets"]


def _shard_of(folder, tensor):
    with open(folder / INDEX_NAME, encoding="utf-8") as fh:
        return folder / json.load(fh)["weight_map"][tensor]


EXP = "model.layers.2.mlp.experts.3.up_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
NORM0 = "model.layers.0.input_layernorm.weight"
CASES = {
    "missing": (lambda t: [t.pop(EXP), t.pop(EXP + "_scale_inv")], None, r"missing.*experts\.3\.up_proj", EXP),
    "unexpected": (lambda t: t.update({"model.layers.0.self_attn.surprise.weight": np.zeros((2, 2), np.float32)}),
                   None, "unexpected", "model.layers.0.self_attn.surprise.weight"),
    "shape": (lambda t: [t.pop(O_PROJ + "_scale_inv"), t.update({O_PROJ: np.zeros((3, 5), np.float32)})],
              None, r"shape \(3, 5\) does not match.*\(64, 64\)", O_PROJ),
    "dtype": (lambda t: t.update({NORM0: np.ones(64, np.int32)}), None, "dtype int32 is not a float type", NORM0),
    "scale shape": (lambda t: t.update({O_PROJ + "_scale_inv": np.ones((2, 2), np.float32)}), None,
                    r"weight_scale_inv shape \(2, 2\) does not match.*expected \(1, 1\)", O_PROJ + "_scale_inv"),
    "scale without fp8": (lambda t: t.update({"model.norm.weight_scale_inv": np.ones((1,), np.float32)}), None,
                          "has a scale 'model.norm.weight_scale_inv' but is float32", "model.norm.weight"),
    "fp8 without scale": (lambda t: t.pop(O_PROJ + "_scale_inv"), None, "without its scale", O_PROJ),
    "mtp layer missing": (lambda t: [t.pop(n) for n in [n for n in t if n.startswith("model.layers.4.")]], None,
                          r"missing: .*\(the MTP layer is missing: convert with --no-mtp\)$", None),
    "truncated": (None, lambda d: _truncate(_shard_of(d, NORM0)), "truncated", None),
    "header length": (None, lambda d: _set_length(_shard_of(d, NORM0)), "header length", None),
    "offsets past the end": (None, lambda d: _rewrite_header(_shard_of(d, NORM0), lambda h: h[NORM0].update(
        data_offsets=[h[NORM0]["data_offsets"][0], 10 ** 9])), "truncated", NORM0),
    "overlapping ranges": (None, lambda d: _rewrite_header(_shard_of(d, NORM0), _overlap), "overlaps", NORM0),
    "not json": (None, lambda d: _garble(_shard_of(d, NORM0)), "not valid JSON", None),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def _set_length(path):
    data = path.read_bytes()
    path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff{]["
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_input_fails_clearly_and_writes_nothing(case, tiny, fp8_tensors, tmp_path):
    edit_tensors, edit_files, pattern, tensor = CASES[case]
    tensors = dict(fp8_tensors)
    if edit_tensors:
        edit_tensors(tensors)
    src = save_folder(tmp_path / "in", dict(tiny[0], quantization_config=QC), tensors)
    if edit_files:
        edit_files(src)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=pattern) as err:
        run("hf-to-ms", src, out)
    message = str(err.value)
    assert str(src) in message  # names the folder or the shard
    if tensor is not None:
        assert repr(tensor) in message, message
    if edit_files:
        assert ".safetensors" in message
    assert not out.exists()
    assert cli.main(["hf-to-ms", str(src), str(out), "--quiet"]) == 1 and not out.exists()


def test_pickle_input_is_refused(tiny, tmp_path):
    src = tmp_path / "pt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny[0]))
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        run("hf-to-ms", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
