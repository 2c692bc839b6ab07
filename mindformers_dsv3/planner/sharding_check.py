"""The planner's view of a training layout: the TrainingSharding of a Plan (``dsv3-plan --sharding``) and the
proof that MindSpore's per-device shapes equal the plan's (tests/test_sharding.py)."""
from mindformers_dsv3.parallel.layout import LayoutError
from mindformers_dsv3.parallel.sharding import training_sharding
from mindformers_dsv3.planner.shapes import no_init_model

__all__ = ["check_against_plan", "sharding_of_plan"]


def check_against_plan(sharding, the_plan):
    """Differences between a TrainingSharding and the planner's Plan (same config): [] = equal.

    Per stage, the set of parameters one device holds and each one's per-device shape.
    """
    out = []
    if len(the_plan.stages) != sharding.layout.pp:
        return [f"{len(the_plan.stages)} planner stages vs pipeline_stage={sharding.layout.pp}"]
    for stage in the_plan.stages:
        if list(stage.layers) != list(sharding.stage_ranges[stage.index]):
            out.append(f"stage {stage.index}: planner layers {stage.layers} vs sharding {sharding.stage_ranges[stage.index]}")
        planned = {s.name: s.local_shape for s in stage.shards}
        ours = sharding.local_shapes(stage.index)
        for name in sorted(set(planned) | set(ours)):
            if planned.get(name) != ours.get(name):
                out.append(f"stage {stage.index}: {name}: planner {planned.get(name)} vs sharding {ours.get(name)}")
    return out


def sharding_of_plan(the_plan):
    """The TrainingSharding of a training Plan's config and layout (model built without weights)."""
    if not the_plan.layout.training:
        raise LayoutError([f"run_mode={the_plan.run_mode!r}: MindSpore sharding is for train / finetune "
                           "(predict splits the model itself: section 8 of docs/en/parallel.md)"])
    model = no_init_model(the_plan.config)
    return training_sharding(model, the_plan.layout, offset=the_plan.settings.get("offset"))
