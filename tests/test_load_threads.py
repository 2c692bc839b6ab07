"""Loading with several threads (fp8.load_threads, DSV3_LOAD_THREADS) gives the bits of one thread.

* hf_read.Reader.transposed_into (the routed experts' path: codes transposed, then decoded, each thread
  on its own rows of the output) equals torch's float8 cast of the file contents, transposed, for any
  thread count, with edges that are not multiples of the block;
* a whole FP8 model (64 x 64 blocks, ragged edges, routed experts) loaded with 3 threads, every tensor
  split (MIN_SPLIT_ELEMS forced to 1), equals the same model loaded with one thread, bit for bit;
* a bad DSV3_LOAD_THREADS is refused naming the variable before any parameter changes.
"""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from mindformers_dsv3.checkpoint import fp8, hf_read, loader, names
from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from tests import hf_fixtures as hf
from tests.fp8_reference import quantize_block_fp8

torch = pytest.importorskip("torch")

BLOCK = (64, 64)
QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}


def _fp8_folder(folder, config, seed):
    """config.json and one shard: the quantizable weights FP8 with 64 x 64 block scales, the rest bf16 / fp32."""
    tensors = {}
    for name, w in hf.random_hf_state_dict(config, seed=seed).items():
        if hf.is_quantized_weight(name) and w.ndim == 2:
            tensors[name], tensors[name + names.SCALE_SUFFIX] = quantize_block_fp8(w, BLOCK)
        else:
            tensors[name] = w if names.keeps_float32(name) else w.astype(ml_dtypes.bfloat16)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(dict(config, quantization_config=QC), fh)
    hf.write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return str(folder), tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = hf.tiny_hf_config(hidden_size=160, intermediate_size=192, moe_intermediate_size=96)
    return config, *_fp8_folder(tmp_path_factory.mktemp("threads") / "fp8", config, seed=7)


def _split_everything(monkeypatch):
    """Every tensor is split between the threads; returns the list of part counts run_parts saw."""
    seen, real = [], fp8.run_parts
    monkeypatch.setattr(fp8, "MIN_SPLIT_ELEMS", 1)
    monkeypatch.setattr(fp8, "run_parts", lambda fn, ranges: (seen.append(len(ranges)), real(fn, ranges)))
    return seen


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_transposed_expert_equals_torch(tmp_path, monkeypatch, threads):
    seen = _split_everything(monkeypatch)
    w = np.random.default_rng(threads).standard_normal((130, 200)).astype(np.float32)  # 3 x 4 blocks, ragged
    codes, scale = quantize_block_fp8(w, BLOCK)
    hf.write_safetensors(str(tmp_path / "e.safetensors"), {"w": codes, "w" + names.SCALE_SUFFIX: scale})
    t = torch.from_numpy(codes.view(np.uint8)).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(scale).repeat_interleave(64, 0)[:130].repeat_interleave(64, 1)[:, :200]
    want = (t * s).to(torch.bfloat16).T.contiguous().view(torch.int16).numpy()
    with open_checkpoint(str(tmp_path / "e.safetensors")) as ckpt:
        reader = hf_read.Reader(ckpt, BLOCK, ["w"], threads=threads)
        wide = np.zeros((200, 300), ml_dtypes.bfloat16)  # the expert's columns of a stacked buffer
        got = reader.transposed_into("w", wide[:, 50:180])
        reader.close()
    np.testing.assert_array_equal(got.view(np.int16), want)
    assert not wide[:, :50].any() and not wide[:, 180:].any()
    assert max(seen) == min(threads, 4)  # 200 output rows: 4 row blocks of 64 at most


def _load(folder, monkeypatch, threads):
    monkeypatch.setenv(fp8.THREADS_ENV, str(threads))
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf_config(
        folder, compute_dtype="float32", param_init_type="bfloat16", seq_length=32, checkpoint_name_or_path=folder))
    return {p.name: p.asnumpy().view(np.uint16) if p.asnumpy().dtype.itemsize == 2 else p.asnumpy().view(np.uint32)
            for p in model.get_parameters()}


def test_model_loaded_with_three_threads_equals_one(tiny, monkeypatch):
    _, folder, tensors = tiny
    assert any(s.shape[1] == 3 for n, s in tensors.items() if n.endswith(names.SCALE_SUFFIX))  # 160 = 2.5 blocks
    one = _load(folder, monkeypatch, 1)
    seen = _split_everything(monkeypatch)
    three = _load(folder, monkeypatch, 3)
    assert seen.count(3) > 20, seen  # the FP8 weights and the experts were decoded in three parts
    assert one.keys() == three.keys()
    for name, bits in one.items():
        np.testing.assert_array_equal(three[name], bits, err_msg=name)


def test_bad_thread_count_is_refused_before_any_parameter_changes(tiny, monkeypatch):
    _, folder, _ = tiny
    monkeypatch.setenv(fp8.THREADS_ENV, "1")
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf_config(
        folder, compute_dtype="float32", param_init_type="bfloat16", seq_length=32, checkpoint_name_or_path=folder))
    before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    monkeypatch.setenv(fp8.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="DSV3_LOAD_THREADS='many' must be a positive integer"):
        loader.load_hf_checkpoint(model, folder)
    for p in model.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name], err_msg=p.name)
