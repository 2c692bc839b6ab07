"""The converter's per-rank plan (`dsv3-convert hf-to-ms --layout YAML`): which parameters, with which local
shapes and slices, each rank of a layout holds. Converter side: it asks the planner, which nothing in the
library imports (docs/en/architecture.md)."""
from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.ranks import rank_slices, read_layout
from mindformers_dsv3.config import ConfigError
from mindformers_dsv3.planner.plan import make_plan

__all__ = ["rank_plan"]


def rank_plan(config, entries, shapes, layout_path):
    """(Layout, [{ms name: (local shape, slices)} per rank]) for the entries of the name table.

    The planner checks the layout against the model (divisibility, stages) and raises LayoutError
    naming the key; that becomes a CheckpointError naming the YAML."""
    pc, run_mode, offset = read_layout(layout_path)
    try:
        # the batch size does not change any weight: one that every data-parallel layout divides
        cfg = type(config).from_hf_config(config.to_hf_dict(), seq_length=config.seq_length, parallel_config=pc,
                                          offset=offset, batch_size=int(pc.get("data_parallel", 1) or 1))
        params = [(e.ms, tuple(names.ms_shape(e, shapes)), "float32") for e in entries]
        p = make_plan(cfg, run_mode=run_mode, params=params)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"layout does not fit this checkpoint's model: {exc}", layout_path) from None
    ranks = []
    for r in range(p.layout.world):
        held = p.rank_shards(r)
        ranks.append({n: (tuple(s.local_shape), rank_slices(p.layout, r, n, s.local_shape)) for n, s in held.items()})
    return p.layout, ranks
