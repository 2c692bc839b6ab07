"""DeepSeek-V3 / DeepSeek-R1 plugin for stock MindFormers."""
__version__ = "0.1.0"
