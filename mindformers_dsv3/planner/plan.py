"""Layout planner: checks a parallel layout against the model and prints what each device holds.

``plan(source, devices=None, device_memory=None)`` takes a YAML path, a MindFormerConfig / YAML dict
or a DeepseekV3Config (its ``parallel_config``), raises LayoutError (naming the keys) for an
invalid layout and returns a Plan: per pipeline stage the weight bytes by kind and dtype (W8A8 int8
+ scales included), the latent KV cache, an activation estimate, what is left and the verdict.

Parameter shapes come from the model itself, built without allocating memory
(``mindspore.nn.utils.no_init_parameters``); ``layout.param_rule`` shards them.  Memory model
(docs/en/parallel.md explains each term):

* usable = ``context.max_device_memory`` (MindSpore's pool; device memory - 3 GiB when unknown, or
  when only MindFormers' template default of 58GB is there and the device is smaller)
  - WORKSPACE (1 GiB: kernel workspace, communication buffers, graph constants, RoPE tables).
  The runtime reserve is device memory - usable.
* KV cache per token and rank = (kv_lora_rank + qk_rope_head_dim) x layers of the stage x
  compute-dtype bytes; the latent is shared by all heads, so every TP rank holds it whole.
* predict: weights + activations + allocated cache (num_blocks x block_size tokens) <= usable;
  tokens that fit = (usable - weights - activations) // cache bytes per token.
* train/finetune: weights (/ replicas with ``parallel.enable_parallel_optimizer``) + gradients
  (param dtype) + AdamW moments (2 x fp32, / replicas with the parallel optimizer) + activations, with
  the layers / parts ``recompute_config`` recomputes (``recompute.recompute_layers``, the decision the
  training build applies).
"""
import copy
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from mindformers_dsv3.config import ConfigError, DeepseekV3Config, plain, refuse_unimplemented
from mindformers_dsv3.parallel import activations
from mindformers_dsv3.parallel.recompute import read_recompute_config, recompute_config_of, recompute_layers
from mindformers_dsv3.parallel.layout import KINDS, Layout, LayoutError, layout_problems, local_shape, \
    param_rule, param_stages, stage_layers

__all__ = ["Plan", "StagePlan", "Shard", "plan", "validate_layout", "parse_size", "building_for_plan",
           "model_parameters", "no_init_model", "quant_settings", "GiB", "WORKSPACE", "DEFAULT_DEVICE_MEMORY"]

GiB = 1 << 30
DEFAULT_DEVICE_MEMORY = 64 * GiB     # Atlas 800T A2: 64 GB HBM per device
DEFAULT_POOL_MARGIN = 3 * GiB        # without context.max_device_memory: pool = device - 3 GiB (upstream 61 of 64)
WORKSPACE = 1 * GiB                  # inside the pool, never available to weights / cache / activations
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int32": 4, "int64": 8, "bool": 1}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_QUANT_KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
_QUANT_DEFAULTS = {"method": "w8a8", "weight_dtype": "int8", "activation_dtype": "int8",
                   "weight_granularity": "per_channel", "activation_granularity": "per_token",
                   "scale_dtype": "float32", "modules_to_not_convert": ["kv_b_proj"]}
_planning = threading.local()
_PARAM_CACHE = {}


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


def _dtype_name(dtype):
    name = str(dtype).lower()
    return {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(name, name)


# ----------------------------------------------------------------------------- parameters of the model
def building_for_plan():
    """True while the planner builds its no-init model (a model __init__ calling plan() can skip)."""
    return getattr(_planning, "active", False)


def no_init_model(config):
    """DeepseekV3ForCausalLM(config) as one whole rank, built without weight memory (no_init_parameters)."""
    from mindspore.nn.utils import no_init_parameters
    from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
    single = copy.deepcopy(config)
    single.parallel_config = None
    single.checkpoint_name_or_path = ""   # shapes only: a plan never reads weights
    _planning.active = True
    try:
        with no_init_parameters():
            return DeepseekV3ForCausalLM(single)
    finally:
        _planning.active = False


def model_parameters(config):
    """[(name, shape, dtype name)] of every parameter of DeepseekV3ForCausalLM(config), single rank.

    Built with no_init_parameters (no weight memory) from a copy without parallel_config; cached.
    """
    key = json.dumps([config.to_hf_dict(), config.param_init_type, config.compute_dtype, config.use_past,
                      config.num_blocks, config.block_size, config.seq_length], sort_keys=True, default=str)
    if key not in _PARAM_CACHE:
        model = no_init_model(config)
        _PARAM_CACHE[key] = [(name, tuple(int(d) for d in p.shape), _dtype_name(p.dtype))
                             for name, p in model.parameters_and_names()]
    return _PARAM_CACHE[key]


def quant_settings(quantization):
    """Normalised W8A8 settings of ``model_config.quantization`` (None: not quantized); errors name the key."""
    if quantization is None:
        return None
    key = "model_config.quantization"
    if not isinstance(quantization, dict):
        quantization = dict(quantization) if hasattr(quantization, "items") else quantization
    if not isinstance(quantization, dict):
        raise ConfigError(f"{key}={quantization!r} must be a dict such as {{method: w8a8}}")
    unknown = set(quantization) - set(_QUANT_DEFAULTS)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {sorted(unknown)}; known: {sorted(_QUANT_DEFAULTS)}")
    q = {**_QUANT_DEFAULTS, **quantization}
    fixed = {"method": "w8a8", "weight_dtype": "int8", "activation_dtype": "int8",
             "weight_granularity": "per_channel", "activation_granularity": "per_token"}
    for name, only in fixed.items():
        if str(q[name]).lower() != only:
            raise ConfigError(f"{key}.{name}={q[name]!r} is not supported; use {only!r}")
    q["scale_dtype"] = _dtype_name(q["scale_dtype"])
    if q["scale_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"{key}.scale_dtype={q['scale_dtype']!r} must be 'float32' or 'bfloat16'")
    q["modules_to_not_convert"] = list(q["modules_to_not_convert"] or [])
    return q


def _quantized(name, sub_kind, quant):
    if quant is None or sub_kind not in _QUANT_KINDS or name.endswith(".bias"):
        return False
    parts = set(name.split("."))
    return not any(m in parts for m in quant["modules_to_not_convert"])


# ----------------------------------------------------------------------------- plan objects
@dataclass
class Shard:
    """One parameter as one rank holds it (a W8A8 scale is its own Shard, name + '_scale')."""
    name: str
    kind: str
    global_shape: tuple
    local_shape: tuple
    dtype: str

    @property
    def bytes(self):
        return math.prod(self.local_shape) * _ITEMSIZE[self.dtype]

    @property
    def numel(self):
        return math.prod(self.local_shape)


@dataclass
class StagePlan:
    """What every rank of one pipeline stage holds (all ranks of a stage hold the same amounts)."""
    index: int
    layers: range
    shards: list = field(default_factory=list)
    cache_bytes_per_token: int = 0
    cache_tokens: int = 0            # allocated: num_blocks x block_size (predict with use_past)
    activation_bytes: int = 0
    activation_terms: dict = field(default_factory=dict)
    stored_weight_bytes: int = 0     # after optimizer-parallel sharding (training), else = weight_bytes
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    usable_bytes: int = 0

    @property
    def weights(self):
        """OrderedDict {(kind, dtype): bytes} in KINDS order."""
        out = OrderedDict()
        for kind in KINDS:
            for s in self.shards:
                if s.kind == kind:
                    out[(kind, s.dtype)] = out.get((kind, s.dtype), 0) + s.bytes
        return out

    def per_kind(self):
        """{kind: bytes} over dtypes, for comparing with a real rank's parameters."""
        out = OrderedDict()
        for (kind, _), b in self.weights.items():
            out[kind] = out.get(kind, 0) + b
        return out

    @property
    def weight_bytes(self):
        return sum(s.bytes for s in self.shards)

    @property
    def cache_bytes(self):
        return self.cache_bytes_per_token * self.cache_tokens

    @property
    def total_bytes(self):
        return self.stored_weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes \
            + self.cache_bytes

    @property
    def free_bytes(self):
        """Left for the KV cache (predict) / headroom (training) after everything but the cache."""
        return self.usable_bytes - (self.total_bytes - self.cache_bytes)

    @property
    def tokens_fit(self):
        if not self.cache_bytes_per_token:
            return 0
        return max(self.free_bytes, 0) // self.cache_bytes_per_token

    @property
    def fits(self):
        return self.total_bytes <= self.usable_bytes


@dataclass
class Plan:
    config: DeepseekV3Config
    layout: Layout
    run_mode: str
    devices: int
    device_memory: int
    pool: int
    quantization: dict
    stages: list
    source: str = ""
    settings: dict = field(default_factory=dict)

    @property
    def usable(self):
        return self.pool - WORKSPACE

    @property
    def reserve(self):
        """Runtime reserve: device memory outside the MindSpore pool + the workspace inside it."""
        return self.device_memory - self.usable

    @property
    def fits(self):
        return all(s.fits for s in self.stages)

    @property
    def worst(self):
        return max(self.stages, key=lambda s: s.total_bytes)

    def stage_of_rank(self, rank):
        return self.stages[self.layout.coords(rank)["stage"]]

    def rank_shards(self, rank):
        """{name: Shard} one rank holds (same shapes on every rank of a stage)."""
        return {s.name: s for s in self.stage_of_rank(rank).shards}

    def fit_problems(self):
        """Messages naming the keys to change when a stage does not fit ([] when all fit)."""
        out = []
        for s in self.stages:
            if s.fits:
                continue
            used = _fmt(s.total_bytes)
            where = f"stage {s.index}: " if len(self.stages) > 1 else ""
            needs = (f"{where}needs {used} per device ({_terms(s)}) but {_fmt(self.usable)} is usable "
                     f"(context.max_device_memory / --device-memory minus the {_fmt(WORKSPACE)} workspace)")
            if s.stored_weight_bytes + s.gradient_bytes + s.optimizer_bytes > self.usable:
                hint = ("raise parallel_config.model_parallel / expert_parallel / pipeline_stage, or use "
                        "W8A8 (model_config.quantization)")
            elif s.cache_bytes and s.total_bytes - s.cache_bytes <= self.usable:
                hint = (f"lower model_config.num_blocks (x block_size = {s.cache_tokens} tokens; "
                        f"{s.tokens_fit} fit)")
            else:
                hint = "lower model_config.seq_length / batch_size (or runner_config.batch_size), or recompute"
            out.append(f"does not fit: {needs}; {hint}")
        return out

    def check(self):
        """Raise LayoutError naming the keys unless every stage fits; returns self."""
        problems = self.fit_problems()
        if problems:
            raise LayoutError(problems)
        return self

    def to_dict(self):
        return {"source": self.source, "run_mode": self.run_mode, "devices": self.devices,
                "layout": {"dp": self.layout.dp, "mp": self.layout.mp, "pp": self.layout.pp, "ep": self.layout.ep,
                           "etp": self.layout.etp, "vocab_emb_dp": self.layout.vocab_emb_dp},
                "device_memory": self.device_memory, "pool": self.pool, "usable": self.usable,
                "quantization": self.quantization, "fits": self.fits,
                "stages": [{"index": s.index, "layers": [s.layers.start, s.layers.stop - 1],
                            "weights": {f"{k}/{d}": b for (k, d), b in s.weights.items()},
                            "weight_bytes": s.weight_bytes, "stored_weight_bytes": s.stored_weight_bytes,
                            "gradient_bytes": s.gradient_bytes, "optimizer_bytes": s.optimizer_bytes,
                            "cache_bytes_per_token": s.cache_bytes_per_token, "cache_tokens": s.cache_tokens,
                            "cache_bytes": s.cache_bytes, "activation_bytes": s.activation_bytes,
                            "activation_terms": s.activation_terms, "total_bytes": s.total_bytes,
                            "free_bytes": s.free_bytes, "tokens_fit": s.tokens_fit, "fits": s.fits}
                           for s in self.stages]}

    def report(self):
        from mindformers_dsv3.parallel.report import format_plan
        return format_plan(self)


def _fmt(n):
    return f"{n / GiB:.2f} GiB"


def _terms(s):
    parts = [f"weights {_fmt(s.stored_weight_bytes)}"]
    if s.gradient_bytes:
        parts += [f"gradients {_fmt(s.gradient_bytes)}", f"optimizer {_fmt(s.optimizer_bytes)}"]
    if s.cache_bytes:
        parts.append(f"KV cache {_fmt(s.cache_bytes)}")
    parts.append(f"activations {_fmt(s.activation_bytes)}")
    return " + ".join(parts)


# ----------------------------------------------------------------------------- reading the source
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


def _settings(source, run_mode, overrides):
    """Everything the planner reads, from a YAML (path / tree) or a DeepseekV3Config."""
    if isinstance(source, DeepseekV3Config):
        cfg = source
        refuse_unimplemented(cfg)  # what the model build refuses (config.py): the same message
        mode = run_mode or ("predict" if cfg.use_past else "train")
        return dict(config=cfg, parallel_config=cfg.parallel_config, run_mode=mode, offset=cfg.offset,
                    batch_size=cfg.batch_size, quantization=getattr(cfg, "quantization", None),
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
    quantization = mc.pop("quantization", None)
    config = DeepseekV3Config(**mc)
    mode = run_mode or tree.get("run_mode") or ("predict" if config.use_past else "train")
    training = mode in ("train", "finetune")
    parallel = tree.get("parallel") or {}
    recompute = read_recompute_config(tree.get("recompute_config"))
    return dict(config=config, parallel_config=tree.get("parallel_config"), run_mode=mode, offset=config.offset,
                batch_size=(tree.get("runner_config") or {}).get("batch_size", 1) if training else config.batch_size,
                quantization=quantization, max_device_memory=(tree.get("context") or {}).get("max_device_memory"),
                explicit_pool=explicit_pool, device_num=tree.get("device_num"), use_parallel=tree.get("use_parallel"),
                recompute=recompute,
                parallel_optimizer=bool(parallel.get("enable_parallel_optimizer", False)),
                grad_shard=bool((parallel.get("parallel_optimizer_config") or {}).get("gradient_accumulation_shard",
                                                                                       False)),
                source=os.fspath(source) if isinstance(source, (str, os.PathLike)) else "config")


def validate_layout(source, devices=None, run_mode=None, overrides=None):
    """The layout checks alone (no model build): raises LayoutError naming the keys; returns the Layout."""
    st = _settings(source, run_mode, overrides)
    return _validated(st, devices)[0]


def _validated(st, devices):
    config, training = st["config"], st["run_mode"] in ("train", "finetune")
    layout = Layout.from_parallel_config(st["parallel_config"], training=training)
    devices = devices if devices is not None else st["device_num"]
    quant = quant_settings(st["quantization"])
    problems = layout_problems(config, layout, devices=devices, offset=st["offset"], batch_size=st["batch_size"],
                               use_parallel=st["use_parallel"], recompute=st["recompute"])
    if quant and training:
        problems.append("model_config.quantization (W8A8) is for predict only; remove it for train/finetune")
    if not training and config.use_past and not problems:
        per_rank = st["batch_size"] // layout.dp * config.seq_length
        slots = config.num_blocks * config.block_size
        if slots < per_rank:
            problems.append(f"model_config.num_blocks * block_size = {slots} cache tokens cannot hold "
                            f"batch_size / data_parallel x seq_length = {per_rank} tokens")
    if problems:
        raise LayoutError(problems)
    return layout, quant, (devices if devices is not None else layout.world)


# ----------------------------------------------------------------------------- the plan
def plan(source, devices=None, device_memory=None, *, run_mode=None, overrides=None, params=None):
    """Check the layout and plan each device's memory.

    source: YAML path, MindFormerConfig / YAML dict (or a bare model_config dict), or DeepseekV3Config.
    devices: device count to match (default: the YAML's top-level ``device_num``, else dp*mp*pp).
    device_memory: bytes or '64GB' (default 64 GiB).  run_mode: overrides the YAML's.
    overrides: {'parallel_config.model_parallel': 16, ...} merged into a YAML before planning.
    params: [(name, shape, dtype)] of the single-rank model (default: built with no_init_parameters).
    Raises LayoutError for an invalid layout; a layout that does not fit gives ``Plan.fits`` False
    (``Plan.check()`` raises).
    """
    st = _settings(source, run_mode, overrides)
    config = st["config"]
    layout, quant, devices = _validated(st, devices)
    training = layout.training
    device_memory = parse_size(device_memory if device_memory is not None else DEFAULT_DEVICE_MEMORY)
    pool = device_memory - DEFAULT_POOL_MARGIN
    if st["max_device_memory"] is not None:
        requested = parse_size(st["max_device_memory"], "context.max_device_memory")
        if requested <= device_memory or st["explicit_pool"]:
            pool = requested
        if pool > device_memory:
            raise LayoutError([f"context.max_device_memory={st['max_device_memory']!r} exceeds the device memory "
                               f"{_fmt(device_memory)} (--device-memory)"])
    if pool <= WORKSPACE:
        raise LayoutError([f"context.max_device_memory / --device-memory leaves nothing after the "
                           f"{_fmt(WORKSPACE)} workspace"])
    ranges = stage_layers(config.num_hidden_layers, layout.pp, st["offset"] if layout.pp > 1 else None)
    stage_of_layer = {i: s for s, r in enumerate(ranges) for i in r}
    stages = [StagePlan(index=s, layers=r, usable_bytes=pool - WORKSPACE) for s, r in enumerate(ranges)]
    for name, shape, dtype in (params if params is not None else model_parameters(config)):
        kind, sub, place, spec = param_rule(name)
        if kind == "cache":
            continue
        try:
            local = local_shape(shape, spec, layout)
        except LayoutError as err:
            raise LayoutError([f"{name} {shape}: {p}" for p in err.problems]) from None
        shards = [Shard(name, kind, tuple(shape), local, dtype)]
        if _quantized(name, sub, quant):
            scale_global = shape[:1] + shape[2:] if len(shape) == 3 else shape[:1]
            scale_local = local[:1] + local[2:] if len(local) == 3 else local[:1]
            shards = [Shard(name, kind, tuple(shape), local, "int8"),
                      Shard(name + "_scale", kind, tuple(scale_global), tuple(scale_local), quant["scale_dtype"])]
        for s in param_stages(place, stage_of_layer, layout.pp):
            stages[s].shards.extend(shards)
    compute_bytes = _ITEMSIZE[_dtype_name(config.compute_dtype)]
    # the recompute decision the training build applies (recompute.py): one function for both
    decisions = {d.index: d for d in recompute_layers(config, st["recompute"], layout.pp, st["offset"])} \
        if training else {}
    for stage in stages:
        last = stage.index == layout.pp - 1
        stage.cache_bytes_per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * len(stage.layers) \
            * compute_bytes
        if training:
            stage.cache_bytes_per_token = 0
            _training_state(stage, layout, st)
            stage.activation_terms = activations.training(config, layout, stage.layers, stage.index, last,
                                                          st["batch_size"], decisions)
        else:
            stage.stored_weight_bytes = stage.weight_bytes
            stage.cache_tokens = config.num_blocks * config.block_size if config.use_past else 0
            stage.activation_terms = activations.predict(config, layout, stage.layers, last, st["batch_size"])
        stage.activation_bytes = int(stage.activation_terms["total"])
    return Plan(config=config, layout=layout, run_mode=st["run_mode"], devices=devices, device_memory=device_memory,
                pool=pool, quantization=quant, stages=stages, source=st["source"],
                settings={k: st[k] for k in ("batch_size", "recompute", "parallel_optimizer", "grad_shard",
                                             "offset", "max_device_memory")})


def _training_state(stage, layout, st):
    """Stored weights, gradients (param dtype) and AdamW moments (2 x fp32) of one training rank."""
    stored = grads = opt = 0
    for s in stage.shards:
        replicas = layout.expert_replicas if s.kind == "routed_experts" or (
            s.kind == "mtp" and ".experts." in s.name) else layout.dp
        shard = replicas if st["parallel_optimizer"] else 1
        stored += s.bytes // shard
        grads += s.bytes // (shard if st["grad_shard"] else 1)
        opt += 8 * s.numel // shard
    stage.stored_weight_bytes, stage.gradient_bytes, stage.optimizer_bytes = stored, grads, opt
