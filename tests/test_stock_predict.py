"""The production predict path, as a user runs it: the shipped tiny predict YAML, unedited, through the
stock script (`run_mindformer.py` when MINDFORMERS_HOME points at a MindFormers 1.7.0 checkout, else
tests/dist/stock_predict.py, which does what the script does: MindFormerConfig + CLI overrides,
build_context, Trainer(config).predict(predict_checkpoint=config.load_checkpoint, ...)), in one process
and under msrun with TP=2 and TP=2 + EP=2.

The checkpoint is given the way the shipped 671B predict YAMLs take it: `model.model_config.
checkpoint_name_or_path` (here on the command line, `--options`), with `load_checkpoint: null` as shipped.
The folder is a FP8 HuggingFace checkpoint (block-quantized projections + scale_inv, like the release);
the expected text is the greedy continuation of transformers' DeepseekV3ForCausalLM holding the weights
dequantized here, independently of the plugin's loader, decoded with the `tokenizers` library.
"""
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from tests import hf_fixtures as hf
from tests.conftest import free_port, msrun_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny", "predict_deepseek3_tiny.yaml")
TOKENIZER = os.path.join(ROOT, "configs", "tiny", "synthetic_tokenizer", "tokenizer.json")
REGISTER = os.path.join(ROOT, "register")
MIRROR = os.path.join(ROOT, "tests", "dist", "stock_predict.py")
PROMPT = "bi bep bop"
MAX_LENGTH = 64          # the YAML's max_decode_length: prompt + new tokens
FP8_MAX = 448.0
BLOCK = 128


def stock_script():
    home = os.environ.get("MINDFORMERS_HOME")
    return os.path.join(home, "run_mindformer.py") if home else MIRROR


def _quantize(weight):
    """(fp8 e4m3 weight, float32 scale_inv per 128x128 block), DeepSeek's layout; and the dequantized weight."""
    rows, cols = weight.shape
    scale = np.ones((-(-rows // BLOCK), -(-cols // BLOCK)), np.float32)
    q = np.empty(weight.shape, ml_dtypes.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = weight[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            scale[i, j] = max(float(np.abs(block).max()) / FP8_MAX, 1e-12)
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = np.clip(block / scale[i, j], -FP8_MAX, FP8_MAX)
    dequantized = q.astype(np.float32) * np.repeat(np.repeat(scale, BLOCK, 0), BLOCK, 1)[:rows, :cols]
    return q, scale, dequantized


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    """A tiny FP8 HF folder; returns (folder, the dequantized float32 state for the reference)."""
    from safetensors.numpy import save_file

    config = hf.tiny_hf_config()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    state = hf.random_hf_state_dict(config, seed=3)
    folder = tmp_path_factory.mktemp("fp8")
    stored, reference = {}, {}
    for name, value in state.items():
        if name.endswith("proj.weight") and ".eh_proj." not in name:
            q, scale, deq = _quantize(value.astype(np.float32))
            stored[name], stored[name + "_scale_inv"], reference[name] = q, scale, deq
        else:
            stored[name] = reference[name] = value
    names = sorted(stored)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: np.ascontiguousarray(stored[n]) for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder), config, reference


@pytest.fixture(scope="module")
def expected_text(fp8_folder):
    """transformers' greedy continuation of PROMPT (BOS first, as the tokenizer config says), decoded."""
    import torch
    from tokenizers import Tokenizer

    _, config, reference = fp8_folder
    tokenizer = Tokenizer.from_file(TOKENIZER)
    ids = [tokenizer.token_to_id("<｜begin▁of▁sentence｜>")] + tokenizer.encode(PROMPT).ids
    model = hf.build_hf_model(config, reference)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_length=MAX_LENGTH, do_sample=False,
                             eos_token_id=config["eos_token_id"], pad_token_id=config["eos_token_id"])
    text = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    assert len(text.split()) > len(PROMPT.split()) + 5, text   # a real continuation, not the prompt alone
    return text


def _options(folder, **layout):
    pairs = [f"model.model_config.checkpoint_name_or_path={folder}"]
    pairs += [f"parallel_config.{k}={v}" for k, v in layout.items()]
    return ["--options", *pairs]


def _result_text(workdir):
    """The text stock predict wrote to text_generation_result.txt in its working directory."""
    with open(os.path.join(workdir, "text_generation_result.txt"), encoding="utf-8") as fh:
        raw = fh.read()
    start = raw.index("'text_generation_text': ['") + len("'text_generation_text': ['")
    return raw[start:raw.index("']", start)]


def _fail(cmd, proc, logs=None):
    tails = [proc.stdout[-3000:], proc.stderr[-3000:]]
    for name in sorted(os.listdir(logs)) if logs and os.path.isdir(logs) else ():
        with open(os.path.join(logs, name), encoding="utf-8", errors="replace") as fh:
            tails.append(f"--- {name}\n" + fh.read()[-3000:])
    return f"{' '.join(cmd)}\nrc={proc.returncode}\n" + "\n".join(tails)


def test_one_process_predict_equals_the_reference(tmp_path, fp8_folder, expected_text):
    cmd = [sys.executable, stock_script(), "--config", TINY_YAML, "--register_path", REGISTER,
           "--predict_data", PROMPT, *_options(fp8_folder[0])]
    # from another working directory: the YAML's relative tokenizer path is found in the plugin's data root
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, _fail(cmd, proc)
    assert _result_text(tmp_path) == expected_text


@pytest.mark.parametrize("layout", [dict(model_parallel=2), dict(model_parallel=2, expert_parallel=2)],
                         ids=["tp2", "tp2-ep2"])
def test_msrun_split_predict_equals_the_reference(tmp_path, fp8_folder, expected_text, layout):
    logs = str(tmp_path / "logs")
    cmd = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
           f"--master_port={free_port()}", "--join=True", f"--log_dir={logs}", stock_script(),
           "--config", TINY_YAML, "--register_path", REGISTER, "--predict_data", PROMPT, "--use_parallel", "True",
           *_options(fp8_folder[0], **layout)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=msrun_env(PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, _fail(cmd, proc, logs)
    assert _result_text(tmp_path) == expected_text
    for rank in (0, 1):  # every rank generated the whole text
        with open(os.path.join(logs, f"worker_{rank}.log"), encoding="utf-8", errors="replace") as fh:
            assert f"'text_generation_text': ['{expected_text}']" in fh.read()


# ----------------------------------------------------------------------------- upstream-shaped YAML
# The keys and layout of MindFormers' research/deepseek3/deepseek3_671b/predict_deepseek3_671b.yaml
# (v1.7.0): upstream module names in auto_register / auto_map, upstream key names (num_layers, num_heads,
# scaling_factor + extend_method, theta, top-level moe_config), is_dynamic, load_checkpoint with
# auto_trans_ckpt, the stock LlamaTokenizerFast. Sizes are the tiny model's and dtypes float32 for the CPU.
UPSTREAM_YAML = """
seed: 0
output_dir: './output'
run_mode: 'predict'
use_parallel: False
load_checkpoint: "{checkpoint}"
load_ckpt_format: "safetensors"
auto_trans_ckpt: True
trainer:
  type: CausalLanguageModelingTrainer
  model_name: 'DeepSeekV3'
parallel_config:
  model_parallel: 1
  pipeline_stage: 1
  expert_parallel: 1
  vocab_emb_dp: False
context:
  mode: 0
  device_target: 'CPU'
  device_id: 0
parallel:
  parallel_mode: "STAND_ALONE"
  full_batch: False
model:
  model_config:
    type: DeepseekV3Config
    auto_register: deepseek3_config.DeepseekV3Config
    batch_size: 1
    seq_length: 64
    hidden_size: 64
    num_layers: 4
    num_heads: 4
    max_position_embeddings: 128
    intermediate_size: 128
    kv_lora_rank: 16
    q_lora_rank: 32
    qk_rope_head_dim: 8
    v_head_dim: 16
    qk_nope_head_dim: 16
    vocab_size: 128
    multiple_of: 256
    rms_norm_eps: 1.0e-6
    bos_token_id: 0
    eos_token_id: 1
    pad_token_id: 1
    ignore_token_id: -100
    compute_dtype: "float32"
    layernorm_compute_type: "float32"
    softmax_compute_type: "float32"
    rotary_dtype: "float32"
    router_dense_type: "float32"
    param_init_type: "float32"
    scaling_factor:
      beta_fast: 32.0
      beta_slow: 1.0
      factor: 4.0
      mscale: 1.0
      mscale_all_dim: 1.0
      original_max_position_embeddings: 32
    use_past: True
    extend_method: "YARN"
    use_flash_attention: True
    block_size: 16
    num_blocks: 16
    offset: 0
    checkpoint_name_or_path: ""
    repetition_penalty: 1
    max_decode_length: {max_length}
    top_k: 1
    top_p: 1
    theta: 10000.0
    do_sample: False
    is_dynamic: True
    qkv_concat: False
    ffn_concat: False
    auto_map:
      AutoConfig: deepseek3_config.DeepseekV3Config
      AutoModel: deepseek3.DeepseekV3ForCausalLM
  arch:
    type: DeepseekV3ForCausalLM
    auto_register: deepseek3.DeepseekV3ForCausalLM
moe_config:
  expert_num: 8
  num_experts_chosen: 2
  routing_policy: "TopkRouterV2"
  shared_expert_num: 1
  routed_scaling_factor: 2.5
  first_k_dense_replace: 1
  moe_intermediate_size: 32
  topk_group: 2
  n_group: 4
  use_gating_sigmoid: True
  balance_via_topk_bias: True
  topk_bias_update_rate: 0.001
processor:
  return_tensors: ms
  tokenizer:
    unk_token: '<unk>'
    bos_token: '<｜begin▁of▁sentence｜>'
    eos_token: '<｜end▁of▁sentence｜>'
    pad_token: '<｜end▁of▁sentence｜>'
    type: LlamaTokenizerFast
    vocab_file: '{tokenizer}'
    tokenizer_file: '{tokenizer}'
  type: LlamaProcessor
"""


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory, fp8_folder):
    """The reference weights (FP8 dequantized) as a float32 HF folder: what upstream's route can read."""
    _, config, reference = fp8_folder
    folder = tmp_path_factory.mktemp("float")
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    hf.save_hf_folder(folder, plain, {n: np.asarray(v, np.float32) for n, v in reference.items()}, shards=2)
    return str(folder)


def test_upstream_shaped_yaml_predicts(tmp_path, float_folder, expected_text):
    yaml = tmp_path / "predict_deepseek3_upstream.yaml"
    yaml.write_text(UPSTREAM_YAML.format(checkpoint=float_folder, tokenizer=TOKENIZER, max_length=MAX_LENGTH),
                    encoding="utf-8")
    cmd = [sys.executable, stock_script(), "--config", str(yaml), "--register_path", REGISTER,
           "--predict_data", PROMPT]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, _fail(cmd, proc)
    assert _result_text(tmp_path) == expected_text


# ----------------------------------------------------------------------------- a wheel, no source tree
def test_the_wheel_alone_predicts_with_the_shipped_yaml(installed, tmp_path, fp8_folder, expected_text):
    """A venv holding only the built wheel (tests/conftest.py `installed`), a folder outside the checkout."""
    python, _, env = installed
    venv = os.path.dirname(os.path.dirname(python))
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([python, "-c", "import mindformers_dsv3; print(mindformers_dsv3.__file__)"], cwd=work,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(venv), where   # the installed wheel, not the source tree
    paths = dict(line.split("=", 1) for line in subprocess.run(
        [python, "-m", "mindformers_dsv3", "paths"], cwd=work, env=env, check=True, capture_output=True,
        text=True).stdout.split())
    assert paths["register"].startswith(venv) and paths["configs"].startswith(venv), paths
    script = stock_script()
    if script == MIRROR:   # the stand-in for run_mindformer.py is a file of the test tree: take a copy
        script = str(work / "run_mindformer.py")
        with open(MIRROR, encoding="utf-8") as src, open(script, "w", encoding="utf-8") as dst:
            dst.write(src.read())
    yaml = os.path.join(paths["configs"], "tiny", "predict_deepseek3_tiny.yaml")
    cmd = [python, script, "--config", yaml, "--register_path", paths["register"], "--predict_data", PROMPT,
           *_options(fp8_folder[0])]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, _fail(cmd, proc)
    assert _result_text(work) == expected_text


# ----------------------------------------------------------------------------- is_dynamic: True
def test_is_dynamic_generates_the_same_tokens_as_static_shapes(float_folder):
    """Stock generate with `is_dynamic: True` (upstream's YAMLs) feeds the prompts unpadded; the model compiles
    a prefill graph per prompt length. A ragged batch, two calls: the tokens equal static shapes'."""
    from tests.model_fixtures import build_ms_model
    prompts = [[5, 95, 123, 7, 9], [5, 95]]
    outputs = {}
    for dynamic in (False, True):
        model = build_ms_model(float_folder, is_dynamic=dynamic)
        first = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=[-1])
        again = model.generate(prompts[::-1], max_new_tokens=6, do_sample=False, eos_token_id=[-1])
        outputs[dynamic] = ([list(map(int, t)) for t in first], [list(map(int, t)) for t in again])
    assert outputs[True] == outputs[False]
    assert [len(t) for t in outputs[True][0]] == [len(p) + 6 for p in prompts]
