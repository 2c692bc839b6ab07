"""The value checks of DeepseekV3Config: ``ConfigError``, dtype names, and one check per kind of value.

A check takes ``(key, value)`` and returns the (normalised) value, or raises ``ConfigError`` whose
message starts with the key. ``config.py`` holds the table of fields that uses them.
"""
import copy
import math
import numbers
from collections.abc import Mapping

import mindspore as ms

__all__ = ['ANYTHING', 'BOOL', 'ConfigError', 'DTYPE', 'INT', 'NONNEG', 'NONNEG_INT', 'POSITIVE',
           'POSITIVE_INT', 'POSITIVE_INT_OR_NONE', 'STR_OR_NONE', 'TOKEN_IDS', 'YARN_KEYS', 'check', 'choice',
           'dict_or_none', 'dtype_name', 'dtype_of', 'is_int', 'is_num', 'plain', 'rope_scaling']


from mindformers_dsv3.quant.config import ConfigError  # noqa: E402  (MindSpore-free home: the planner's parser)


# ----------------------------------------------------------------------------- dtypes
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16"}
_MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def dtype_name(value, key="dtype"):
    """Canonical dtype name ('float32' | 'float16' | 'bfloat16') of a name or a mindspore dtype."""
    name = value.lower() if isinstance(value, str) else str(value).lower()
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"{key}={value!r} is not a known dtype; use one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


def dtype_of(name, key="dtype"):
    """mindspore dtype for 'float32'/'fp32', 'float16'/'fp16', 'bfloat16'/'bf16' (or a mindspore dtype)."""
    return _MS_DTYPES[dtype_name(name, key)]


# ----------------------------------------------------------------------------- value checks
# A check takes (key, value) and returns the (normalised) value or raises ConfigError naming the key.
def is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v):
    """A finite real number (inf and NaN are nonsense for every numeric field here)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check(ok, what):
    def check(key, v):
        if not ok(v):
            raise ConfigError(f"{key}={v!r} must be {what} (got {type(v).__name__})")
        return v
    return check


def choice(*choices):
    def check(key, v):
        if v not in choices:
            raise ConfigError(f"{key}={v!r} is not supported; use one of {list(choices)}")
        return v
    return check


def plain(v):
    """Deep copy of nested dict-likes (e.g. MindFormerConfig) as plain dicts / lists."""
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return copy.deepcopy(v)


def _ids_ok(v):
    return v is None or all(is_int(i) and i >= 0 for i in (v if isinstance(v, (list, tuple)) else [v]))


POSITIVE_INT = check(lambda v: is_int(v) and v >= 1, "a positive int")
NONNEG_INT = check(lambda v: is_int(v) and v >= 0, "an int >= 0")
POSITIVE_INT_OR_NONE = check(lambda v: v is None or is_int(v) and v >= 1, "null or a positive int")
INT = check(is_int, "an int")
POSITIVE = check(lambda v: is_num(v) and v > 0, "a finite number > 0")
NONNEG = check(lambda v: is_num(v) and v >= 0, "a finite number >= 0")
BOOL = check(lambda v: isinstance(v, bool), "true or false")
TOKEN_IDS = check(_ids_ok, "null, a token id (int >= 0) or a list of them")
STR_OR_NONE = check(lambda v: v is None or isinstance(v, str), "a string or null")
DTYPE = lambda key, v: dtype_name(v, key)  # noqa: E731
ANYTHING = lambda key, v: v  # noqa: E731


def dict_or_none(key, v):
    return plain(check(lambda x: x is None or isinstance(x, Mapping), "a dict or null")(key, v))


YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def rope_scaling(key, v):
    rope = dict_or_none(key, v)
    if rope is None:
        return None
    kind = rope.get("type", rope.get("rope_type"))
    if kind != "yarn":
        raise ConfigError(f"{key}: type {kind!r} is not supported; use a yarn dict or null")
    for name in YARN_KEYS:
        if name not in rope:
            raise ConfigError(f"{key}: yarn needs '{name}' (required: {', '.join(YARN_KEYS)})")
        check = POSITIVE_INT if name == "original_max_position_embeddings" else POSITIVE if name == "factor" else NONNEG
        check(f"{key}.{name}", rope[name])
    unknown = set(rope) - set(YARN_KEYS) - {"type", "rope_type"}
    if unknown:
        raise ConfigError(f"{key}: unknown yarn parameter(s) {sorted(unknown)}")
    return rope
