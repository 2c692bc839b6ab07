"""``recompute_config`` -> what MindSpore recomputes in a training build: ONE decision for the model and the planner.

MindFormers 1.7.0 semantics (``TransformerRecomputeConfig``, applied per layer as its ``LayerSetting`` does):

* ``recompute``: ``True`` recomputes every decoder layer (``cell.recompute(...)``: the layer keeps its input,
  everything inside is recomputed in the backward pass); a list with one entry per pipeline stage
  recomputes that many *first* layers of each stage (an entry ``True`` = the whole stage, ``False`` = 0).
* ``select_recompute`` (layers not recomputed whole): parts of a layer, by the sub-cell paths below.
  ``True`` / a per-stage list of layer counts = the default parts; a list of patterns = those parts in
  every layer; a dict ``{pattern: True | per-stage list}``.  A pattern is matched component by component
  (``\\.`` or ``.`` between components, each a regular expression, full match) against these parts:

  ==================== ====================================================================== =======
  part                 what is recomputed (the part keeps its input; its output is stored)    layers
  ==================== ====================================================================== =======
  self_attn            MLA: q/kv projections, RoPE, scores, softmax, probs x V (not o_proj out) all
  mlp                  dense layers: the SwiGLU MLP; MoE layers: the whole MoE (router too)   all
  mlp.shared_experts   the shared experts' SwiGLU MLP                                         MoE
  mlp.experts          the routed experts (dispatch, grouped matmuls, SwiGLU, combine)       MoE
  ==================== ====================================================================== =======

  The default parts are every SwiGLU MLP: ``mlp`` of dense layers and ``mlp.shared_experts`` of MoE
  layers (MindFormers' default patterns ``mlp.mul`` / ``mlp.activation_func.silu`` / their
  ``shared_experts`` twins, mapped onto our cells).  A part inside a selected part is not set again.
* MTP layers take the decision of the last decoder layer (as MindFormers' MTP block does); their
  decoder layer (``model.mtp.<j>.layer``) is the cell recomputed.
* ``mp_comm_recompute``, ``parallel_optimizer_comm_recompute``, ``recompute_slice_activation`` are passed to
  every ``cell.recompute`` call of a whole layer (MindSpore 2.7.1 accepts exactly these three; it only warns
  for ``parallel_optimizer_comm_recompute: True``, which zero3 replaces); select parts get
  ``mp_comm_recompute`` and ``parallel_optimizer_comm_recompute``.
* ``select_comm_recompute``, ``select_recompute_exclude``, ``select_comm_recompute_exclude`` must stay
  unset / False (not supported); any other key is an error naming it.

``recompute_layers(config, rc, pp, offset)`` is the decision function; ``apply_recompute(model, config)``
(the training-path hook, ``DeepseekV3ForCausalLM.apply_training_layout``) and ``planner.activations.training``
(the planner) both use it.
"""
import re
from dataclasses import dataclass

from mindformers_dsv3.config import ConfigError, plain
from mindformers_dsv3.parallel.layout import Layout, stage_layers

__all__ = ["KEY", "HONOURED", "UNSUPPORTED", "PARTS", "DEFAULT_PARTS_DOC", "RecomputeConfig", "LayerRecompute",
           "read_recompute_config", "recompute_config_of", "layer_parts", "recompute_layers", "apply_recompute"]

KEY = "recompute_config"
HONOURED = ("recompute", "select_recompute", "mp_comm_recompute", "parallel_optimizer_comm_recompute",
            "recompute_slice_activation")
UNSUPPORTED = ("select_comm_recompute", "select_recompute_exclude", "select_comm_recompute_exclude")
_DEFAULTS = {"recompute": False, "select_recompute": False, "mp_comm_recompute": True,
             "parallel_optimizer_comm_recompute": False, "recompute_slice_activation": False,
             "select_comm_recompute": False, "select_recompute_exclude": False, "select_comm_recompute_exclude": False}
_FLAGS = ("mp_comm_recompute", "parallel_optimizer_comm_recompute", "recompute_slice_activation")
# part path (relative to a decoder layer) -> what it is, per layer type
_DENSE_PARTS = {"self_attn": "attention", "mlp": "mlp"}
_MOE_PARTS = {"self_attn": "attention", "mlp": "moe", "mlp.shared_experts": "mlp", "mlp.experts": "routed_experts"}
PARTS = ("self_attn", "mlp", "mlp.shared_experts", "mlp.experts")
DEFAULT = "<default>"                 # pattern standing for the default parts (every SwiGLU MLP)
DEFAULT_PARTS_DOC = "every SwiGLU MLP: `mlp` of dense layers, `mlp.shared_experts` of MoE layers"


@dataclass(frozen=True)
class RecomputeConfig:
    """A validated recompute_config.  recompute: bool or a tuple (per stage) of layer counts; select:
    ((pattern, bool or per-stage tuple), ...) with DEFAULT standing for the default parts."""
    recompute: object = False
    select: tuple = ()
    mp_comm_recompute: bool = True
    parallel_optimizer_comm_recompute: bool = False
    recompute_slice_activation: bool = False

    @property
    def active(self):
        return bool(self.recompute) or any(bool(v) for _, v in self.select)

    def layer_kwargs(self):
        """Keyword arguments of ``Cell.recompute`` for a whole layer."""
        return {"mp_comm_recompute": self.mp_comm_recompute,
                "parallel_optimizer_comm_recompute": self.parallel_optimizer_comm_recompute,
                "recompute_slice_activation": self.recompute_slice_activation}

    def part_kwargs(self):
        return {"mp_comm_recompute": self.mp_comm_recompute,
                "parallel_optimizer_comm_recompute": self.parallel_optimizer_comm_recompute}

    def stage_problems(self, pp):
        """Per-stage lists whose length is not pipeline_stage (messages naming the keys)."""
        out = []
        lists = [("recompute", self.recompute)] + [
            ("select_recompute" + ("" if p == DEFAULT else f"[{p!r}]"), v) for p, v in self.select]
        for name, value in lists:
            if isinstance(value, tuple) and len(value) != pp:
                out.append(f"{KEY}.{name} has {len(value)} entries; parallel_config.pipeline_stage={pp} "
                           "needs one per stage")
        return out


@dataclass(frozen=True)
class LayerRecompute:
    """The decision for one decoder layer (index >= num_hidden_layers: MTP depth index - num_hidden_layers)."""
    index: int
    path: str          # the cell: model.layers.<i> or model.mtp.<j>.layer
    full: bool
    parts: tuple = ()  # recomputed sub-cells (paths relative to the layer) when not full

    @property
    def recomputed(self):
        return self.full or bool(self.parts)


# ----------------------------------------------------------------------------- reading recompute_config
def _get_fields(source):
    """{key: value} of a YAML dict / MindFormerConfig / TransformerRecomputeConfig (None: {})."""
    if source is None:
        return {}
    if hasattr(source, "items"):
        return {str(k): v for k, v in source.items()}
    if type(source).__name__ == "TransformerRecomputeConfig" or hasattr(source, "_recompute"):
        return {k: getattr(source, k) for k in _DEFAULTS if hasattr(source, k)}
    raise ConfigError(f"{KEY}={source!r} must be a mapping of recompute keys ({', '.join(HONOURED)})")



def _per_stage(value, name):
    """bool -> bool; a list of ints / bools -> tuple (True = the whole stage)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, bool):
                out.append(1 << 30 if item else 0)
            elif isinstance(item, int) and item >= 0:
                out.append(item)
            elif isinstance(item, (list, tuple)):
                raise ConfigError(f"{KEY}.{name}={value!r}: nested lists are for pp_interleave_num > 1, which "
                                  "this model does not support; give one layer count per pipeline stage")
            else:
                raise ConfigError(f"{KEY}.{name}={value!r}: entries must be layer counts (ints >= 0) or bools, "
                                  "one per pipeline stage")
        return tuple(out)
    raise ConfigError(f"{KEY}.{name}={value!r} must be True / False or a list with one layer count per "
                      "pipeline stage")


def _components(pattern):
    return pattern.split(r"\.") if r"\." in pattern else pattern.split(".")


def _matches(pattern, part):
    comps, names = _components(pattern), part.split(".")
    if len(comps) != len(names):
        return False
    try:
        return all(re.fullmatch(c, n) for c, n in zip(comps, names))
    except re.error:
        return False


def _check_pattern(pattern, name):
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{KEY}.{name}: pattern {pattern!r} must be a non-empty string")
    try:
        for c in _components(pattern):
            re.compile(c)
    except re.error as err:
        raise ConfigError(f"{KEY}.{name}: pattern {pattern!r} is not a regular expression ({err})") from None
    if not any(_matches(pattern, p) for p in PARTS):
        raise ConfigError(f"{KEY}.{name}: pattern {pattern!r} matches none of the parts this model recomputes: "
                          f"{', '.join(PARTS)} (docs/en/parallel.md, recompute)")


def _select(value):
    name = "select_recompute"
    if value is None:
        return ()
    if isinstance(value, bool):
        return ((DEFAULT, True),) if value else ()
    if hasattr(value, "items"):
        out = []
        for pattern, layers in value.items():
            _check_pattern(pattern, name)
            out.append((pattern, _per_stage(layers, f"{name}[{pattern!r}]")))
        return tuple(out)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        for pattern in value:
            _check_pattern(pattern, name)
        return tuple((p, True) for p in value)
    if isinstance(value, (list, tuple)):
        return ((DEFAULT, _per_stage(value, name)),)
    raise ConfigError(f"{KEY}.{name}={value!r} must be True / False, a per-stage list of layer counts, a list "
                      f"of part patterns or a dict {{pattern: True | per-stage list}}; parts: {', '.join(PARTS)}")


def read_recompute_config(source):
    """A RecomputeConfig from the YAML's ``recompute_config`` (dict, MindFormerConfig, TransformerRecomputeConfig
    or None).  Raises ConfigError naming the key for an unknown key or a wrong value."""
    fields = {k: plain(v) for k, v in _get_fields(source).items()}
    unknown = sorted(set(fields) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(f"{KEY}: unknown key(s) {unknown}; known: {', '.join(HONOURED + UNSUPPORTED)}")
    values = {**_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    for key in UNSUPPORTED:
        if values[key] not in (False, None, [], {}):
            raise ConfigError(f"{KEY}.{key}={values[key]!r} is not supported by this model (select parts with "
                              f"{KEY}.select_recompute); remove it or set it False")
    for key in _FLAGS:
        if not isinstance(values[key], bool):
            raise ConfigError(f"{KEY}.{key}={values[key]!r} must be True or False")
    return RecomputeConfig(recompute=_per_stage(values["recompute"], "recompute"),
                           select=_select(values["select_recompute"]),
                           **{k: values[k] for k in _FLAGS})


def recompute_config_of(parallel_config):
    """The RecomputeConfig a model build receives: MindFormers puts the YAML's recompute_config into
    ``parallel_config.recompute`` (TransformerOpParallelConfig); a dict parallel_config may carry it under
    ``recompute``.  None / absent: nothing recomputed."""
    if parallel_config is None:
        return RecomputeConfig()
    if hasattr(parallel_config, "items"):
        value = dict(parallel_config.items()).get("recompute")
    else:
        value = getattr(parallel_config, "recompute", None)
    if isinstance(value, bool):   # a bare bool (old MindFormers style): whole layers
        value = {"recompute": value}
    return read_recompute_config(value)


# ----------------------------------------------------------------------------- the decision
def layer_parts(config, index):
    """{part path: kind} of decoder layer `index` (MTP layers: num_hidden_layers + depth)."""
    if not config.is_moe_layer(index):
        return dict(_DENSE_PARTS)
    parts = dict(_MOE_PARTS)
    if not config.n_shared_experts:
        parts.pop("mlp.shared_experts")
    return parts


def _resolve(pattern, parts):
    if pattern == DEFAULT:
        return [p for p, kind in parts.items() if kind == "mlp"]
    return [p for p in parts if _matches(pattern, p)]


def _chosen(value, stage, position):
    if isinstance(value, tuple):
        return position < value[stage]
    return bool(value)


def recompute_layers(config, rc, pp=1, offset=None):
    """[LayerRecompute] for every decoder layer, then every MTP layer: THE decision (model and planner).

    config: DeepseekV3Config; rc: RecomputeConfig; pp / offset: the pipeline stages (stage_layers).
    Raises ConfigError naming the key when a per-stage list does not have pp entries.
    """
    problems = rc.stage_problems(pp)
    if problems:
        raise ConfigError("; ".join(problems))
    layers = config.num_hidden_layers
    where = {}
    for s, r in enumerate(stage_layers(layers, pp, offset if pp > 1 else None)):
        for pos, i in enumerate(r):
            where[i] = (s, pos)
    out = []
    ids = list(range(layers)) + [layers + j for j in range(config.num_nextn_predict_layers)]
    for i in ids:
        stage, pos = where[min(i, layers - 1)]   # MTP: the last decoder layer's decision
        path = f"model.layers.{i}" if i < layers else f"model.mtp.{i - layers}.layer"
        full = _chosen(rc.recompute, stage, pos)
        chosen = []
        if not full:
            parts = layer_parts(config, i)
            for pattern, value in rc.select:
                if _chosen(value, stage, pos):
                    chosen += [p for p in _resolve(pattern, parts) if p not in chosen]
            # a part inside a chosen part is recomputed with it (MindSpore configures a cell once)
            chosen = [p for p in chosen if not any(p.startswith(q + ".") for q in chosen)]
        out.append(LayerRecompute(i, path, full, tuple(sorted(chosen, key=PARTS.index))))
    return out


# ----------------------------------------------------------------------------- the build hook
def apply_recompute(model, config):
    """Training-build hook: ``cell.recompute`` on the layers / parts ``recompute_layers`` chooses.

    Skipped for predict builds (``use_past``).  Stand-alone, data-parallel and semi-auto / auto parallel
    builds alike.  Returns the [LayerRecompute] applied (None when skipped or nothing is recomputed).
    """
    if config.use_past:
        return None
    parallel_config = getattr(config, "parallel_config", None)
    rc = recompute_config_of(parallel_config)
    if not rc.active:
        return None
    layout = Layout.from_parallel_config(parallel_config, training=True)
    decisions = recompute_layers(config, rc, layout.pp, config.offset)
    cells = dict(model.cells_and_names())
    for d in decisions:
        if d.full:
            cells[d.path].recompute(**rc.layer_kwargs())
        for part in d.parts:
            cells[f"{d.path}.{part}"].recompute(**rc.part_kwargs())
    return decisions
