"""The one error type of the checkpoint package."""
import os


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or converted as asked.

    The message always starts with the file (or folder) and, where one is
    involved, the tensor: ``"/ckpt/model-00001.safetensors: tensor 'x': ..."``.
    Both are also kept as attributes, ``file`` and ``tensor``.
    """

    def __init__(self, message, file=None, tensor=None):
        self.file = os.fspath(file) if file is not None else None
        self.tensor = tensor
        self.reason = message
        prefix = ""
        if self.file is not None:
            prefix += f"{self.file}: "
        if tensor is not None:
            prefix += f"tensor {tensor!r}: "
        super().__init__(prefix + message)


def listing(names, limit=5):
    """`'a', 'b', 'c' and 4 more`: sorted names for a one-line message."""
    names = sorted(names)
    return ", ".join(map(repr, names[:limit])) + (f" and {len(names) - limit} more" if len(names) > limit else "")
