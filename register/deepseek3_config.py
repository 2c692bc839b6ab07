"""REGISTER_PATH shim for upstream `research/deepseek3` YAMLs (`auto_register: deepseek3_config.DeepseekV3Config`,
`auto_map: AutoConfig: deepseek3_config.DeepseekV3Config`): the same class as `deepseek3.DeepseekV3Config`."""
from mindformers_dsv3 import DeepseekV3Config  # noqa: F401
