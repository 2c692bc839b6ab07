"""The memory plan: checks a parallel layout against the model and works out what each device holds.

``make_plan(source, devices=None, device_memory=None)`` takes a YAML path, a MindFormerConfig / YAML dict
or a DeepseekV3Config (its ``parallel_config``), raises LayoutError (naming the keys) for an
invalid layout and returns a Plan: per pipeline stage the weight bytes by kind and dtype (W8A8: the
quantized model's int8 weights, float32 scales and vectors, int32 biases), the latent KV cache, an
activation estimate, what is left and the verdict.

Parameter shapes and dtypes come from the model itself, built without allocating memory from a copy of the
config without parallel and checkpoint settings (shapes.py; a W8A8 config builds its quantized layers, so
the plan counts the parameters the build allocates); ``layout.param_rule`` shards them.  Memory model
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
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.parallel.layout import KINDS, Layout, LayoutError, local_shape, param_rule, param_stages, \
    stage_layers
from mindformers_dsv3.parallel.recompute import recompute_layers
from mindformers_dsv3.planner import activations
from mindformers_dsv3.planner.settings import read_settings, validated
from mindformers_dsv3.planner.shapes import model_parameters
from mindformers_dsv3.units import GiB, DTYPE_BYTES, dtype_bytes, format_bytes, parse_size

__all__ = ["Plan", "StagePlan", "Shard", "make_plan", "WORKSPACE", "DEFAULT_DEVICE_MEMORY"]

DEFAULT_DEVICE_MEMORY = 64 * GiB     # Atlas 800T A2: 64 GB HBM per device
DEFAULT_POOL_MARGIN = 3 * GiB        # without context.max_device_memory: pool = device - 3 GiB (upstream 61 of 64)
WORKSPACE = 1 * GiB                  # inside the pool, never available to weights / cache / activations


# ----------------------------------------------------------------------------- plan objects
@dataclass
class Shard:
    """One parameter as one rank holds it (W8A8: each int8 weight, scale and vector is its own parameter)."""
    name: str
    kind: str
    global_shape: tuple
    local_shape: tuple
    dtype: str

    @property
    def bytes(self):
        return math.prod(self.local_shape) * DTYPE_BYTES[self.dtype]

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
            used = format_bytes(s.total_bytes)
            where = f"stage {s.index}: " if len(self.stages) > 1 else ""
            needs = (f"{where}needs {used} per device ({_terms(s)}) but {format_bytes(self.usable)} is usable "
                     f"(context.max_device_memory / --device-memory minus the {format_bytes(WORKSPACE)} workspace)")
            if s.stored_weight_bytes + s.gradient_bytes + s.optimizer_bytes > self.usable:
                hint = ("raise parallel_config.model_parallel / expert_parallel / pipeline_stage, or use "
                        "W8A8 (model_config.quantization_config)")
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



def _terms(s):
    parts = [f"weights {format_bytes(s.stored_weight_bytes)}"]
    if s.gradient_bytes:
        parts += [f"gradients {format_bytes(s.gradient_bytes)}", f"optimizer {format_bytes(s.optimizer_bytes)}"]
    if s.cache_bytes:
        parts.append(f"KV cache {format_bytes(s.cache_bytes)}")
    parts.append(f"activations {format_bytes(s.activation_bytes)}")
    return " + ".join(parts)


# ----------------------------------------------------------------------------- the plan
def make_plan(source, devices=None, device_memory=None, *, run_mode=None, overrides=None, params=None):
    """Check the layout and plan each device's memory.

    source: YAML path, MindFormerConfig / YAML dict (or a bare model_config dict), or DeepseekV3Config.
    devices: device count to match (default: the YAML's top-level ``device_num``, else dp*mp*pp).
    device_memory: bytes or '64GB' (default 64 GiB).  run_mode: overrides the YAML's.
    overrides: {'parallel_config.model_parallel': 16, ...} merged into a YAML before planning.
    params: [(name, shape, dtype)] of the single-rank model (default: built with no_init_parameters).
    Raises LayoutError for an invalid layout; a layout that does not fit gives ``Plan.fits`` False
    (``Plan.check()`` raises).
    """
    st = read_settings(source, run_mode, overrides)
    config = st["config"]
    layout, quant, devices = validated(st, devices)
    training = layout.training
    device_memory = parse_size(device_memory if device_memory is not None else DEFAULT_DEVICE_MEMORY)
    pool = device_memory - DEFAULT_POOL_MARGIN
    if st["max_device_memory"] is not None:
        requested = parse_size(st["max_device_memory"], "context.max_device_memory")
        if requested <= device_memory or st["explicit_pool"]:
            pool = requested
        if pool > device_memory:
            raise LayoutError([f"context.max_device_memory={st['max_device_memory']!r} exceeds the device memory "
                               f"{format_bytes(device_memory)} (--device-memory)"])
    if pool <= WORKSPACE:
        raise LayoutError([f"context.max_device_memory / --device-memory leaves nothing after the "
                           f"{format_bytes(WORKSPACE)} workspace"])
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
        shards = [Shard(name, kind, tuple(shape), local, dtype)]   # W8A8: the model's own int8 / f32 / int32
        for s in param_stages(place, stage_of_layer, layout.pp):
            stages[s].shards.extend(shards)
    compute_bytes = dtype_bytes(config.compute_dtype)
    # the recompute decision the training build applies (recompute.py): one function for both
    decisions = {d.index: d for d in recompute_layers(config, st["recompute"], layout.pp, st["offset"])} \
        if training else {}
    for stage in stages:
        last = stage.index == layout.pp - 1
        stage.cache_bytes_per_token = (config.kv_lora_rank + config.qk_rope_head_dim) \
            * cached_layers(config, stage.layers, last) * compute_bytes
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


def cached_layers(config, layers, last):
    """Layers of a stage that hold a latent cache: its decoder layers, and on the last stage the MTP layers
    when they draft (speculative decoding, `num_speculative_tokens`: each keeps a cache of the same slots)."""
    drafting = config.num_nextn_predict_layers if last and getattr(config, "num_speculative_tokens", 0) else 0
    return len(layers) + drafting


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
