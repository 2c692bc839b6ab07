"""REGISTER_PATH shim: MindFormers' `auto_register: deepseek3.<Class>` copies this file and imports
the copy; re-exporting keeps the class identity the installed package's (mindformers_dsv3)."""
from mindformers_dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3Tokenizer  # noqa: F401
from mindformers_dsv3.training import DeepseekV3TrainOneStepCell, MoEMonitor  # noqa: F401
from mindformers_dsv3.data import SyntheticLanguageDataLoader  # noqa: F401
