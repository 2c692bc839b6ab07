"""HuggingFace <-> MindSpore checkpoints: name table, safetensors I/O, FP8, loading."""
