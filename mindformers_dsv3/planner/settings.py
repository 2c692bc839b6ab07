"""What the planner reads: a YAML (path, MindFormerConfig, dict) or a DeepseekV3Config -> its settings, the
W8A8 settings, and the layout check of those settings (``validate_layout``: no model build).

The layout rules themselves are the runtime's (``parallel.checks.config_layout_problems``): the planner, the
split model and the training layouts apply the same list.
"""
import os

from mindformers_dsv3.config import ConfigError, DeepseekV3Config, plain, refuse_unimplemented
from mindformers_dsv3.parallel.checks import config_layout_problems
from mindformers_dsv3.parallel.layout import Layout, LayoutError
from mindformers_dsv3.parallel.recompute import read_recompute_config, recompute_config_of
from mindformers_dsv3.units import dtype_name

__all__ = ["QUANT_KINDS", "quant_settings", "is_quantized", "read_settings", "validated", "validate_layout"]

QUANT_KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
_QUANT_DEFAULTS = {"method": "w8a8", "weight_dtype": "int8", "activation_dtype": "int8",
                   "weight_granularity": "per_channel", "activation_granularity": "per_token",
                   "scale_dtype": "float32", "modules_to_not_convert": ["kv_b_proj"]}


def quant_settings(quantization):
    """Normalised W8A8 settings of ``model_config.quantization`` (None: not quantized); errors name the key."""
    if quantization is None:
        return None
    key = "model_config.quantization"
    if not isinstance(quantization, dict):
        quantization = dict(quantization) if hasattr(quantization, "items") else quantization
    if not isinstance(quantization, dict):
        raise ConfigError(f"{key}={quantization!r} must be a dict such as {{method: w8a8}}")
    unknown = set(quantization) - set(_QUANT_DEFAULTS)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; known: {sorted(_QUANT_DEFAULTS)}")
    q = {**_QUANT_DEFAULTS, **quantization}
    fixed = {"method": "w8a8", "weight_dtype": "int8", "activation_dtype": "int8",
             "weight_granularity": "per_channel", "activation_granularity": "per_token"}
    for name, only in fixed.items():
        if str(q[name]).lower() != only:
            raise ConfigError(f"{key}.{name}={q[name]!r} is not supported; use {only!r}")
    q["scale_dtype"] = dtype_name(q["scale_dtype"])
    if q["scale_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"{key}.scale_dtype={q['scale_dtype']!r} must be 'float32' or 'bfloat16'")
    q["modules_to_not_convert"] = list(q["modules_to_not_convert"] or [])
    return q


def is_quantized(name, sub_kind, quant):
    if quant is None or sub_kind not in QUANT_KINDS or name.endswith(".bias"):
        return False
    parts = set(name.split("."))
    return not any(m in parts for m in quant["modules_to_not_convert"])


def _yaml_tree(source, overrides):
    from mindformers.tools.register.config import MindFormerConfig
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        cfg = MindFormerConfig(path)
    else:
        cfg = source if isinstance(source, MindFormerConfig) else MindFormerConfig(**plain(source))
    if overrides:
        cfg.merge_from_dict(dict(overrides))
    return plain(cfg)


def read_settings(source, run_mode, overrides):
    """Everything the planner reads, from a YAML (path / tree) or a DeepseekV3Config."""
    if isinstance(source, DeepseekV3Config):
        cfg = source
        refuse_unimplemented(cfg)  # what the model build refuses (config.py): the same message
        mode = run_mode or ("predict" if cfg.use_past else "train")
        return dict(config=cfg, parallel_config=cfg.parallel_config, run_mode=mode, offset=cfg.offset,
                    batch_size=cfg.batch_size, quantization=getattr(cfg, "quantization", None),
                    max_device_memory=None, explicit_pool=False, device_num=None, use_parallel=None,
                    recompute=recompute_config_of(cfg.parallel_config),
                    parallel_optimizer=False, grad_shard=False, source="DeepseekV3Config")
    tree = _yaml_tree(source, overrides)
    explicit_pool = "context.max_device_memory" in (overrides or {})
    if not explicit_pool and isinstance(source, (str, os.PathLike)):
        # MindFormers' template fills in 58GB when a YAML (and its bases) does not set it
        from mindformers.tools.register.config import MindFormerConfig
        raw = MindFormerConfig._file2dict(os.fspath(source))  # pylint: disable=protected-access
        explicit_pool = "max_device_memory" in (raw.get("context") or {})
    if "model" not in tree:  # a bare model_config
        tree = {"model": {"model_config": tree}, "run_mode": run_mode or "predict"}
    mc = dict((tree.get("model") or {}).get("model_config") or {})
    if not mc:
        raise ConfigError("model.model_config is missing")
    refuse_unimplemented(mc)  # what the model build refuses (config.py): the same message
    quantization = mc.pop("quantization", None)
    config = DeepseekV3Config(**mc)
    mode = run_mode or tree.get("run_mode") or ("predict" if config.use_past else "train")
    training = mode in ("train", "finetune")
    parallel = tree.get("parallel") or {}
    recompute = read_recompute_config(tree.get("recompute_config"))
    return dict(config=config, parallel_config=tree.get("parallel_config"), run_mode=mode, offset=config.offset,
                batch_size=(tree.get("runner_config") or {}).get("batch_size", 1) if training else config.batch_size,
                quantization=quantization, max_device_memory=(tree.get("context") or {}).get("max_device_memory"),
                explicit_pool=explicit_pool, device_num=tree.get("device_num"), use_parallel=tree.get("use_parallel"),
                recompute=recompute,
                parallel_optimizer=bool(parallel.get("enable_parallel_optimizer", False)),
                grad_shard=bool((parallel.get("parallel_optimizer_config") or {}).get("gradient_accumulation_shard",
                                                                                       False)),
                source=os.fspath(source) if isinstance(source, (str, os.PathLike)) else "config")


def validate_layout(source, devices=None, run_mode=None, overrides=None):
    """The layout checks alone (no model build): raises LayoutError naming the keys; returns the Layout."""
    st = read_settings(source, run_mode, overrides)
    return validated(st, devices)[0]


def validated(st, devices):
    """(Layout, W8A8 settings, device count) of read_settings' result; LayoutError naming the keys."""
    config, training = st["config"], st["run_mode"] in ("train", "finetune")
    layout = Layout.from_parallel_config(st["parallel_config"], training=training)
    devices = devices if devices is not None else st["device_num"]
    quant = quant_settings(st["quantization"])
    problems = config_layout_problems(config, layout, devices=devices, offset=st["offset"],
                                      batch_size=st["batch_size"], use_parallel=st["use_parallel"],
                                      recompute=st["recompute"])
    if quant and training:
        problems.append("model_config.quantization (W8A8) is for predict only; remove it for train/finetune")
    if problems:
        raise LayoutError(problems)
    return layout, quant, (devices if devices is not None else layout.world)
