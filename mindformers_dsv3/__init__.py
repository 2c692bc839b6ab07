"""DeepSeek-V3 / DeepSeek-R1 plugin for stock MindFormers.

Importing a class registers it with MindFormers (config, model, tokenizer);
`register/` holds one-line shims for `REGISTER_PATH` / `auto_register`.
Attributes load lazily so `import mindformers_dsv3` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DeepseekV3Config": "mindformers_dsv3.config",
    "ConfigError": "mindformers_dsv3.config",
    "DeepseekV3ForCausalLM": "mindformers_dsv3.modeling.model",
    "DeepseekV3Tokenizer": "mindformers_dsv3.tokenizer",
    "load_hf_checkpoint": "mindformers_dsv3.checkpoint.loader",
    "CheckpointError": "mindformers_dsv3.checkpoint.errors",
    "DeepseekV3TrainOneStepCell": "mindformers_dsv3.training",
    "MoEMonitor": "mindformers_dsv3.training",
    "SyntheticLanguageDataLoader": "mindformers_dsv3.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mindformers_dsv3' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
