"""What the planner reads: a YAML (path, MindFormerConfig, dict) or a DeepseekV3Config -> its settings, a
summary of its W8A8 settings (``model_config.quantization_config``, parsed by quant/config.py), and the layout
check of those settings (``validate_layout``: no model build).

The layout rules themselves are the runtime's (``parallel.checks.config_layout_problems``): the planner, the
split model and the training layouts apply the same list.
"""
import os

from mindformers_dsv3.config import ConfigError, DeepseekV3Config, plain, refuse_unimplemented
from mindformers_dsv3.parallel.checks import config_layout_problems
from mindformers_dsv3.parallel.layout import Layout, LayoutError
from mindformers_dsv3.parallel.recompute import read_recompute_config, recompute_config_of

__all__ = ["quant_summary", "read_settings", "validated", "validate_layout"]


def quant_summary(config):
    """What the plan reports of the W8A8 settings: None (not W8A8), else {form, schemes used}. The schemes
    themselves are the model's (``config.quant_spec()``: quant/config.py, the one parser); the planner counts
    the parameters the quantized model builds."""
    spec = config.quant_spec()
    if spec is None or not spec.any_quantized(config.num_hidden_layers):
        return None
    from mindformers_dsv3.quant.config import QUANTIZABLE
    used = sorted({spec.scheme(f"model.layers.{i}.{m}") for i in range(config.num_hidden_layers)
                   for m in QUANTIZABLE} - {"FLOAT"})
    return {"form": spec.source, "schemes": used}


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
                    batch_size=cfg.batch_size, quantization=quant_summary(cfg),
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
    config = DeepseekV3Config(**mc)   # checks quantization_config (QuantSpec), naming the key
    mode = run_mode or tree.get("run_mode") or ("predict" if config.use_past else "train")
    training = mode in ("train", "finetune")
    parallel = tree.get("parallel") or {}
    recompute = read_recompute_config(tree.get("recompute_config"))
    return dict(config=config, parallel_config=tree.get("parallel_config"), run_mode=mode, offset=config.offset,
                batch_size=(tree.get("runner_config") or {}).get("batch_size", 1) if training else config.batch_size,
                quantization=quant_summary(config),
                max_device_memory=(tree.get("context") or {}).get("max_device_memory"),
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
    quant = st["quantization"]
    problems = config_layout_problems(config, layout, devices=devices, offset=st["offset"],
                                      batch_size=st["batch_size"], use_parallel=st["use_parallel"],
                                      recompute=st["recompute"])
    if quant and training:
        problems.append("model_config.quantization_config (W8A8) is for predict only; remove it for train/finetune")
    if problems:
        raise LayoutError(problems)
    return layout, quant, (devices if devices is not None else layout.world)
