"""Per-rank checkpoints: which slice of every parameter each rank of a parallel layout holds.

`dsv3-convert hf-to-ms --layout YAML` writes `rank_<r>/` folders holding exactly rank r's slices;
the model (`loader.load_hf_checkpoint`) loads its rank's folder. What a rank holds comes from the
planner (`convert_ranks.rank_plan`, converter side: the parameters of its pipeline stage with their
local shapes); where its slice starts comes from `Layout.param_slices`, the same function the split
model's `ParallelContext.param_slices` uses. Fused [gate; up] parameters keep the model's local layout: a rank's
slice is [gate rows; up rows] of its share (see `streaming.pieces`), not a plain cut of the fused
matrix.
"""
import os
import re

from .errors import CheckpointError

RANK_DIR = "rank_{}"
_RANK_DIR = re.compile(r"^rank_(\d+)$")
LAYOUT_KEYS = ("dp", "mp", "pp", "ep", "vocab_emb_dp", "training")


def read_layout(path):
    """(parallel_config dict, run_mode, offset) of a MindFormers YAML; CheckpointError naming the file."""
    try:
        from mindformers.tools.register.config import MindFormerConfig
        cfg = MindFormerConfig(os.fspath(path))
    except Exception as exc:  # noqa: BLE001  (yaml, OSError, MindFormers' own errors)
        raise CheckpointError(f"cannot read the layout YAML: {exc}", path) from None
    pc = cfg.get("parallel_config")
    if not pc:
        raise CheckpointError("the layout YAML has no parallel_config", path)
    pc = {k: v for k, v in dict(pc).items() if not hasattr(v, "items")}  # drop nested (recompute) blocks
    model_config = (cfg.get("model") or {}).get("model_config") or {}
    run_mode = cfg.get("run_mode") or ("predict" if model_config.get("use_past") else "train")
    return pc, run_mode, model_config.get("offset", 0)


def layout_record(layout):
    return {k: getattr(layout, k) for k in LAYOUT_KEYS} | {"world": layout.world}


def rank_slices(layout, rank, name, local_shape):
    """Per dim, the global (start, stop) rank `rank` holds of parameter `name` (local shape given), None
    for a dim held whole; None when it holds the whole parameter."""
    return layout.param_slices(rank, name, local_shape)


def rank_folders(folder):
    """{rank: path} of the rank_<r> folders in `folder` ({} when there are none)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return {}
    return {int(m.group(1)): os.path.join(folder, n) for n in entries
            if (m := _RANK_DIR.match(n)) and os.path.isdir(os.path.join(folder, n))}
