"""Parallel layouts: the planner (`plan`, `validate_layout`, the `dsv3-plan` CLI), the layout rules and the
training sharding for MindSpore's auto / semi-auto parallel (`training_sharding`, sharding.py) and the
recompute decision of `recompute_config` (`recompute_layers`, recompute.py: the training build and the planner).

`plan` builds the model without allocating its weights (no_init_parameters), once per architecture.
"""
from mindformers_dsv3.parallel.layout import KINDS, Layout, LayoutError, param_rule, stage_layers
from mindformers_dsv3.parallel.plan import Plan, StagePlan, Shard, building_for_plan, parse_size, plan, \
    validate_layout
from mindformers_dsv3.parallel.recompute import RecomputeConfig, read_recompute_config, recompute_layers
from mindformers_dsv3.parallel.sharding import TrainingSharding, check_against_plan, training_sharding

__all__ = ["KINDS", "Layout", "LayoutError", "Plan", "StagePlan", "Shard", "building_for_plan", "param_rule",
           "parse_size", "plan", "stage_layers", "validate_layout", "TrainingSharding", "training_sharding",
           "check_against_plan", "RecomputeConfig", "read_recompute_config", "recompute_layers"]
