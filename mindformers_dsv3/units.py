"""Units shared by every layer: dtype names and sizes, byte counts and sizes as text.

One table of dtype sizes (``DTYPE_BYTES``, by canonical name), one normaliser of dtype spellings
(``dtype_name``), one byte formatter (``format_bytes``) and one size parser (``parse_size``).
Imports nothing of the package except ``config.ConfigError`` (the error a bad size raises).
"""
from mindformers_dsv3.config import ConfigError

__all__ = ["GiB", "DTYPE_BYTES", "dtype_name", "dtype_bytes", "format_bytes", "format_count", "parse_size"]

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int32": 4, "int64": 8, "bool": 1}
_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def dtype_name(dtype):
    """Canonical name of a dtype: a MindSpore dtype, 'bf16' / 'fp32' / 'fp16' or a name ('BFloat16' -> 'bfloat16')."""
    name = str(dtype).lower()
    return _ALIASES.get(name, name)


def dtype_bytes(dtype):
    """Bytes of one value of `dtype` (any spelling dtype_name accepts)."""
    return DTYPE_BYTES[dtype_name(dtype)]


def format_bytes(n):
    """Bytes in GiB (2**30), or MiB / B for small amounts (tiny models): '1,234.56 GiB', '3.25 MiB', '512 B'."""
    if abs(n) >= GiB or n == 0:
        return f"{n / GiB:,.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):,.2f} MiB"
    return f"{n:,} B"


def format_count(n):
    """A count with a B / M / K suffix: 1.23B, 45.60M, 7.00K, 12."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return str(n)


def parse_size(value, key="device memory"):
    """Bytes of '64GB' / '61 GB' / '64GiB' / 68719476736.  GB means 2**30 bytes, as in MindSpore."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a size; use e.g. '64GB' (GB = 2**30 bytes)") from None
