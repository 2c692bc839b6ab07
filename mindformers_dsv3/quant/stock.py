"""Stock MindFormers and a W8A8 ``quantization_config``: the one patch (docs/en/architecture.md, patches).

Stock ``build_network`` (Trainer, pipeline, AutoModel) builds the model, then, when
``model_config.quantization_config`` is set, imports ``mindformers.modules.quantizers`` and runs
golden-stick's PTQ on the network. This plugin builds its W8A8 layers itself from the same block, so
there is nothing left to convert; but that import needs golden-stick (``mindspore_gs``, Ascend only)
and fails without it. Where (and only where) the stock module cannot be imported, a stand-in is
registered under its name: its ``AutoQuantizer`` returns this plugin's models unchanged and refuses any
other model with the original import error. Where golden-stick is installed nothing is replaced.
"""
import importlib
import sys
import types

__all__ = ["install_stock_quantizer_fallback"]

_NAME = "mindformers.modules.quantizers"


class _BuiltQuantizer:
    """What stock build_network calls: ``preprocess_model(network, config=...)``."""

    def __init__(self, quantization_config, missing):
        self.quantization_config = quantization_config
        self.missing = missing

    def preprocess_model(self, model, **kwargs):
        if type(model).__module__.startswith("mindformers_dsv3."):
            return model                  # the W8A8 layers were built from quantization_config already
        raise ModuleNotFoundError(self.missing)

    def postprocess_model(self, model, **kwargs):
        return model


class _AutoQuantizer:
    missing = ""

    @classmethod
    def from_config(cls, quantization_config, **kwargs):
        return _BuiltQuantizer(quantization_config, cls.missing)


def install_stock_quantizer_fallback():
    """Register the stand-in when stock ``mindformers.modules.quantizers`` cannot be imported; returns
    whether it did."""
    if _NAME in sys.modules:
        return False
    try:
        importlib.import_module(_NAME)
        return False
    except ImportError as err:
        missing = f"{_NAME} cannot be imported ({err}): golden-stick quantization is not available here"
    module = types.ModuleType(_NAME, __doc__)
    auto = type("AutoQuantizer", (_AutoQuantizer,), {"missing": missing})
    module.AutoQuantizer = auto
    module.__all__ = ["AutoQuantizer"]
    sys.modules[_NAME] = module
    return True
