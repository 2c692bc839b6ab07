"""msrun worker: split inference of an msModelSlim W8A8 folder, one process per rank.

tests/dist/parallel_infer.py with the model's `quantization_config` taken from the folder's
`quant_model_description*.json` (what DeepseekV3Config.from_hf_config does), as a user's W8A8 YAML
would carry it; each rank loads its slices of the unified folder through `checkpoint_name_or_path`.
Writes OUT/<layout>/rank<r>.npz (teacher-forced logits through the paged cache, greedy tokens). Same
arguments as parallel_infer.py (--hf is the W8A8 folder); the planner and allocation records are
left out (the W8A8 planner is checked elsewhere).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.dist import parallel_infer  # noqa: E402

_yaml_config = parallel_infer.yaml_config


def yaml_config(args, layout, out_dir):
    from mindformers_dsv3.quant.config import description_config, read_description
    cfg = _yaml_config(args, layout, out_dir)
    path, desc = read_description(args.hf)
    cfg.model.model_config.quantization_config = description_config(desc, path)
    return cfg


parallel_infer.yaml_config = yaml_config
parallel_infer.allocation = lambda model: ({}, 0, {})
parallel_infer.planned = lambda model, rank, world: {}
parallel_infer.checkpoint_reads = lambda model, hf_dir: dict(model.checkpoint_stats)

if __name__ == "__main__":
    sys.exit(parallel_infer.main())
