"""Training layouts: ``parallel_config`` -> MindSpore sharding of the model's layers (Ascend).

A training build (``use_past: False``) in MindSpore's ``auto_parallel`` (with sharding propagation)
or ``semi_auto_parallel`` mode stays a whole-model program; MindSpore splits it over the devices from
strategies set here.  Every strategy comes from the planner's rules (``layout.param_rule``: the kind
and the split axes of each parameter, ``Layout.ways``: how many ways each axis is split), so the
per-device shapes MindSpore will allocate are the planner's ``Plan.rank_shards`` by construction, and
the planner's ``planner.sharding_check.check_against_plan`` proves it for a config (tests/test_sharding.py,
tiny and 671B).  The cells are recognised by their ``PARALLEL_ROLE`` class attribute (``ROLES``), so this
module needs nothing from the model package.

What is set (docs/en/parallel.md, section 9):

* parameters: one strategy per parameter, ``ways(axis)`` for each dim of its rule (mp for heads, dense
  and shared-expert widths, vocabulary unless ``vocab_emb_dp``; ep for the routed-expert dim; 1 for
  replicated dims).  Data parallel is implicit: a stage's ``dp x mp`` devices repeat what a strategy
  does not split.
* ops: the MatMul of every Linear gets ``((tokens, in_ways), (out_ways, in_ways))`` from its weight's
  strategy: column-parallel ``((dp, 1), (mp, 1))``, row-parallel ``((dp, mp), (1, mp))`` (with
  ``use_seq_parallel`` its output is reduce-scattered along the tokens, out ``((dp * mp, 1),)``),
  replicated ``((dp, 1), (1, 1))`` (``(dp * mp, 1)`` tokens with ``use_seq_parallel``); the router's
  MatMul is replicated the same way.
* cells whose parameters no primitive of ours fixes: ``Cell.shard(in_strategy, parameter_plan)`` on
  the embedding (ids ``(dp, 1)``, table by vocabulary), every RMSNorm (``(dp, sp, 1)``, sp = mp with
  ``use_seq_parallel``) and the routed experts (tokens ``(dp, 1)``, experts ``(ep, 1, 1)``).
  MindSpore's ``Cell.shard`` is a no-op unless communication is initialised with more than one device;
  then it is applied, else recorded (``TrainingSharding.deferred``).
* pipeline: ``cell.pipeline_stage`` for every decoder layer (``stage_layers`` with
  ``model_config.offset``), the embedding (stage 0), the final norm, lm_head and MTP (last stage).
  The stock trainer wraps the network in ``PipelineCell(micro_batch_num)`` when pp > 1.

``apply_training_sharding(model, config)`` is the training-path hook (``DeepseekV3ForCausalLM.apply_training_layout``,
which also applies ``recompute_config``: recompute.py); it shards nothing unless MindSpore's parallel mode is
semi-auto or auto and the config is a multi-device training build.
"""
import dataclasses
import math
import re
from dataclasses import dataclass, field

import mindspore as ms

from mindformers_dsv3.parallel.checks import layout_problems
from mindformers_dsv3.parallel.layout import Layout, LayoutError, local_shape, param_rule, param_stages, stage_layers

__all__ = ["PARALLEL_MODES", "ROLES", "ParamSharding", "OpSharding", "CellSharding", "TrainingSharding",
           "training_sharding", "apply_training_sharding", "effective_stage"]

PARALLEL_MODES = ("semi_auto_parallel", "auto_parallel")
# what a cell of the model is to the sharding: its class attribute PARALLEL_ROLE (modeling/layers.py, moe.py)
ROLES = ("linear", "router", "embedding", "norm", "routed_experts")


@dataclass(frozen=True)
class ParamSharding:
    """One parameter: its global shape, MindSpore strategy (ways per dim) and pipeline stages."""
    name: str
    kind: str
    shape: tuple
    strategy: tuple
    stages: tuple
    anchor: str = "propagation"   # what fixes it in MindSpore: "op <prim path>", "cell <path>" or "propagation"

    @property
    def local_shape(self):
        return tuple(d // w for d, w in zip(self.shape, self.strategy))


@dataclass(frozen=True)
class OpSharding:
    """A primitive's strategy: ``prim.shard(in_strategy, out_strategy)``."""
    path: str
    in_strategy: tuple
    out_strategy: tuple = None
    weight: str = ""              # the parameter this op's second input is


@dataclass(frozen=True)
class CellSharding:
    """``cell.shard(in_strategy, parameter_plan=...)`` (parameter names are the model's full names)."""
    path: str
    in_strategy: tuple
    parameter_plan: dict


@dataclass
class TrainingSharding:
    """Everything MindSpore is told for one model and layout (see the module doc)."""
    layout: Layout
    stage_ranges: list
    params: dict = field(default_factory=dict)        # name -> ParamSharding
    ops: dict = field(default_factory=dict)           # prim path -> OpSharding
    cells: dict = field(default_factory=dict)         # cell path -> CellSharding
    cell_stages: dict = field(default_factory=dict)   # cell path -> pipeline stage (pp > 1)
    applied: bool = False
    deferred: list = field(default_factory=list)      # cell shardings not applied (no communication)

    @property
    def stage_devices(self):
        return self.layout.dp * self.layout.mp

    def local_shapes(self, stage=None):
        """{name: per-device shape} of the parameters one device of `stage` holds (None: all stages)."""
        return {p.name: p.local_shape for p in self.params.values() if stage is None or stage in p.stages}

    def problems(self):
        """Consistency checks of the strategies themselves ([] = consistent)."""
        out = []
        n = self.stage_devices
        for p in self.params.values():
            if len(p.strategy) != len(p.shape):
                out.append(f"{p.name}: strategy {p.strategy} does not match shape {p.shape}")
            elif any(d % w for d, w in zip(p.shape, p.strategy)):
                out.append(f"{p.name}: strategy {p.strategy} does not divide shape {p.shape}")
            if n % math.prod(p.strategy):
                out.append(f"{p.name}: strategy {p.strategy} uses {math.prod(p.strategy)} devices, which does not "
                           f"divide the {n} devices of a stage")
        for op in self.ops.values():
            x, w = op.in_strategy
            if x[1] != w[1]:
                out.append(f"{op.path}: MatMul contracts a dim split {x[1]} ways with one split {w[1]} ways")
            if n % (x[0] * math.prod(w)):
                out.append(f"{op.path}: {op.in_strategy} does not fit the {n} devices of a stage")
            if op.weight and tuple(w) != self.params[op.weight].strategy:
                out.append(f"{op.path}: weight strategy {w} differs from {op.weight}'s {self.params[op.weight].strategy}")
            if op.out_strategy is not None and math.prod(op.out_strategy[0]) != x[0] * w[1]:
                out.append(f"{op.path}: out_strategy {op.out_strategy} is not a reduce-scatter of {op.in_strategy}")
        for cell in self.cells.values():
            for name, strategy in cell.parameter_plan.items():
                if tuple(strategy) != self.params[name].strategy:
                    out.append(f"{cell.path}: parameter_plan[{name}] = {strategy} differs from {self.params[name].strategy}")
        for p in self.params.values():
            stage = effective_stage(p.name, self.cell_stages)
            held = tuple(range(self.layout.pp)) if stage is None else (stage,)
            if self.layout.pp > 1 and held != p.stages:
                out.append(f"{p.name}: its cell runs in stage(s) {held} but the rule places it in {p.stages}")
        return out

    def apply(self, model):
        """Tag pipeline stages, set op strategies and (with communication) cell shardings on `model`."""
        cells = dict(model.cells_and_names())
        if self.layout.pp > 1:
            for path, stage in self.cell_stages.items():
                cells[path].pipeline_stage = stage
        for op in self.ops.values():
            owner, attr = op.path.rsplit(".", 1)
            prim = getattr(cells[owner], attr)
            if op.out_strategy is None:
                prim.shard(op.in_strategy)
            else:
                prim.shard(op.in_strategy, op.out_strategy)
        self.deferred = []
        for cell in self.cells.values():
            if _group_size() > 1:
                cells[cell.path].shard(in_strategy=cell.in_strategy, parameter_plan=dict(cell.parameter_plan))
            else:
                self.deferred.append(cell.path)
        self.applied = True
        return self

    def describe(self):
        """Per-parameter table (decoder layers folded: one row per name and strategy, with its layers)."""
        lo = self.layout
        lines = [f"sharding  dp {lo.dp} x mp {lo.mp} x pp {lo.pp}, expert_parallel {lo.ep}, use_seq_parallel "
                 f"{lo.use_seq_parallel}, vocab_emb_dp {lo.vocab_emb_dp}, micro_batch_num {lo.micro_batch_num} "
                 f"({lo.dp * lo.mp} devices per stage)",
                 f"  {'parameter':58s} {'kind':14s} {'global shape':22s} {'strategy':14s} {'per device':22s} "
                 f"{'layers':8s} {'stages':7s} fixed by"]
        rows = {}
        for p in self.params.values():
            m = re.match(r"^model\.layers\.(\d+)\.(.*)$", p.name)
            name, layer = (f"model.layers.*.{m.group(2)}", int(m.group(1))) if m else (p.name, None)
            anchor = re.sub(r"layers\.\d+\.", "layers.*.", p.anchor.split(" ")[0])
            key = (name, p.kind, p.shape, p.strategy, anchor)
            row = rows.setdefault(key, [[], set()])
            if layer is not None:
                row[0].append(layer)
            row[1].update(p.stages)
        for (name, kind, shape, strategy, anchor), (layers, stages) in rows.items():
            local = tuple(d // w for d, w in zip(shape, strategy))
            lines.append(f"  {name:58s} {kind:14s} {str(shape):22s} {str(strategy):14s} {str(local):22s} "
                         f"{_span(sorted(layers)) if layers else '-':8s} {_span(sorted(stages)):7s} {anchor}")
        return "\n".join(lines)


def _span(values):
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _group_size():
    try:
        from mindformers_dsv3.parallel.comm import comm_initialized
        if not comm_initialized():
            return 1
        from mindspore.communication import get_group_size
        return get_group_size()
    except Exception:  # pragma: no cover
        return 1


def effective_stage(name, cell_stages):
    """Stage of the innermost tagged cell holding parameter `name` (None: untagged, every stage)."""
    path = name
    while "." in path:
        path = path.rsplit(".", 1)[0]
        if path in cell_stages:
            return cell_stages[path]
    return None


def _stage_cell(name, place):
    """The cell tagged with the stage of a parameter of this place (None: not staged)."""
    if isinstance(place, tuple):
        return f"model.{'layers' if place[0] == 'layer' else 'mtp'}.{place[1]}"
    if place in ("first", "last"):
        return name.rsplit(".", 1)[0]
    return None


def _linear_op(path, weight, strategy, layout):
    out_ways, in_ways = strategy
    dp, mp, sp = layout.dp, layout.mp, layout.use_seq_parallel
    if out_ways > 1 and in_ways > 1:
        raise LayoutError([f"{weight}: a Linear split on both dims {strategy} is not a training layout"])
    if in_ways > 1:        # row-parallel: partial sums over mp; sequence parallel reduce-scatters them
        return OpSharding(path, ((dp, in_ways), (1, in_ways)), ((dp * in_ways, 1),) if sp else None, weight)
    if out_ways > 1:       # column-parallel: tokens gathered (from the sequence split) and whole
        return OpSharding(path, ((dp, 1), (out_ways, 1)), None, weight)
    tokens = dp * mp if sp else dp
    return OpSharding(path, ((tokens, 1), (1, 1)), None, weight)


def training_sharding(model, parallel_config, offset=None):
    """The TrainingSharding of `model` (a whole DeepseekV3ForCausalLM) for a training `parallel_config`.

    parallel_config: YAML dict, MindFormers TransformerOpParallelConfig or a Layout; offset:
    model_config.offset.  Raises LayoutError naming the keys when the layout does not suit the model.
    """
    if isinstance(parallel_config, Layout):
        layout = dataclasses.replace(parallel_config, training=True)
    else:
        layout = Layout.from_parallel_config(parallel_config, training=True)
    problems = layout_problems(model.config, layout, offset=offset)
    if problems:
        raise LayoutError(problems)
    ranges = stage_layers(model.config.num_hidden_layers, layout.pp, offset if layout.pp > 1 else None)
    stage_of_layer = {i: s for s, r in enumerate(ranges) for i in r}
    sh = TrainingSharding(layout=layout, stage_ranges=ranges)
    places = {}
    for name, param in model.parameters_and_names():
        kind, _, place, spec = param_rule(name)
        if kind == "cache":
            continue
        shape = tuple(int(d) for d in param.shape)
        try:
            local = local_shape(shape, spec, layout)
        except LayoutError as err:
            raise LayoutError([f"{name} {shape}: {p}" for p in err.problems]) from None
        strategy = tuple(d // l for d, l in zip(shape, local))
        sh.params[name] = ParamSharding(name, kind, shape, strategy, tuple(param_stages(place, stage_of_layer,
                                                                                        layout.pp)))
        places[name] = place
    dp, sp = layout.dp, layout.mp if layout.use_seq_parallel else 1
    anchors = {}
    for path, cell in model.cells_and_names():
        role = getattr(cell, "PARALLEL_ROLE", None)
        if role in ("linear", "router"):
            weight = f"{path}.weight"
            if role == "linear":
                op = _linear_op(f"{path}.matmul", weight, sh.params[weight].strategy, layout)
            else:
                op = OpSharding(f"{path}.matmul", ((dp * sp, 1), (1, 1)), None, weight)
            sh.ops[op.path] = op
            anchors[weight] = f"op {op.path}"
        elif role in ("embedding", "norm", "routed_experts"):
            names = [f"{path}.{n}" for n, _ in cell.parameters_and_names()]
            plan = {n: sh.params[n].strategy for n in names if n in sh.params}
            inputs = {"embedding": ((dp, 1),), "norm": ((dp, sp, 1),),
                      "routed_experts": ((dp, 1), (dp, 1), (dp, 1))}[role]
            sh.cells[path] = CellSharding(path, inputs, plan)
            anchors.update({n: f"cell {path}" for n in plan})
    for name, anchor in anchors.items():
        p = sh.params[name]
        sh.params[name] = ParamSharding(p.name, p.kind, p.shape, p.strategy, p.stages, anchor)
    if layout.pp > 1:
        for name, place in places.items():
            cell = _stage_cell(name, place)
            if cell is None:
                continue
            stage = sh.params[name].stages[0]
            if sh.cell_stages.setdefault(cell, stage) != stage:
                raise LayoutError([f"{cell}: parameters of two pipeline stages ({sh.cell_stages[cell]}, {stage})"])
    problems = sh.problems()
    if problems:
        raise LayoutError(problems)
    return sh


def apply_training_sharding(model, config):
    """Training-path hook: shard a multi-device training build for MindSpore's semi-auto / auto parallel.

    Returns the applied TrainingSharding, or None (predict builds, stand-alone / data-parallel modes,
    one device). The model calls it from ``apply_training_layout`` (with ``recompute.apply_recompute``).
    """
    if config.use_past:
        return None
    if ms.get_auto_parallel_context("parallel_mode") not in PARALLEL_MODES:
        return None
    parallel_config = getattr(config, "parallel_config", None)
    if Layout.from_parallel_config(parallel_config, training=True).world <= 1:
        return None
    return training_sharding(model, parallel_config, offset=config.offset).apply(model)
