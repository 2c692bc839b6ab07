"""`dsv3-convert hf-to-ms --layout YAML`: one folder of slices per rank, loaded by each rank's model.

On the tiny FP8 checkpoint (several shards, 128x128 scales with ragged edges) and a layout per case
(DPxMPxEP, `v` = vocab_emb_dp; `t` = a training YAML with two pipeline stages):

* every rank folder holds exactly the parameters the planner gives the rank, with its local shapes,
  and the slices reassemble the unified `hf-to-ms` output bit for bit (fused [gate; up] keep the
  model's local layout: the rank's gate rows, then its up rows);
* each rank's split model (`ParallelContext` of the layout) loads its folder through
  `load_hf_checkpoint`, the path `checkpoint_name_or_path` takes, and gets exactly the values it reads
  from the unified HF folder (whose logits the msrun tests compare with the single-process model);
* the output is byte-identical for 1 and 2 workers and after a SIGKILL mid-file and a rerun; `check`
  passes; a layout that does not fit the model, a model of another layout and a missing rank name
  the file / key.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mindspore import Parameter, Tensor

from mindformers_dsv3.checkpoint import names, transform
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint
from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.parallel.layout import Layout
from mindformers_dsv3.planner.plan import make_plan
from mindformers_dsv3.parallel.comm import ParallelContext
from tests import hf_fixtures as hf
from tests.model_fixtures import TINY_RUNTIME
from tests.test_convert import QC, digest, quantize_state, run, save_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny", "predict_deepseek3_tiny.yaml")
LAYOUTS = ["1x2x1", "2x1x2", "1x4x2", "1x2x2v"]


def layout_yaml(folder, spec, training=False):
    dp, mp, ep = (int(x) for x in spec.rstrip("v").split("x"))
    with open(TINY_YAML, encoding="utf-8") as fh:
        tree = yaml.safe_load(fh)
    tree["parallel_config"].update(data_parallel=dp, model_parallel=mp, expert_parallel=ep,
                                   vocab_emb_dp=spec.endswith("v"))
    if training:
        tree["run_mode"] = "train"
        tree["parallel_config"].update(pipeline_stage=2, micro_batch_num=2)
        tree["model"]["model_config"]["use_past"] = False
    path = os.path.join(folder, f"layout_{spec}{'_train' if training else ''}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(tree, fh)
    return path


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    config = hf.tiny_hf_config()
    state = hf.random_hf_state_dict(config, seed=0)
    root = tmp_path_factory.mktemp("ranks")
    save_folder(root / "hf", dict(config, quantization_config=QC, torch_dtype="bfloat16"), quantize_state(state))
    run("hf-to-ms", root / "hf", root / "unified", dtype="fp32")
    return config, root


def _parallel(spec):
    dp, mp, ep = (int(x) for x in spec.rstrip("v").split("x"))
    return dict(data_parallel=dp, model_parallel=mp, expert_parallel=ep, vocab_emb_dp=spec.endswith("v")), dp * mp


def _reassemble(pieces, fused_dim):
    """Rank slices [(slices, array)] of one parameter -> the whole (fused halves kept apart per rank)."""
    shape = [max(s[d][1] if s[d] else a.shape[d] for s, a in pieces) for d in range(pieces[0][1].ndim)]
    out = np.zeros(shape, pieces[0][1].dtype)
    for slices, a in pieces:
        idx = [slice(*s) if s else slice(None) for s in slices]
        if fused_dim is not None and slices[fused_dim]:
            lo, hi = slices[fused_dim]
            half, n = shape[fused_dim] // 2, (hi - lo) // 2
            for k, start in enumerate((lo // 2, half + lo // 2)):
                idx[fused_dim] = slice(start, start + n)
                part = [slice(None)] * a.ndim
                part[fused_dim] = slice(k * n, (k + 1) * n)
                out[tuple(idx)] = a[tuple(part)]
        else:
            out[tuple(idx)] = a
    return out


def _fused_dim(name):
    return 0 if name.endswith("gate_up_proj.weight") else 2 if name.endswith("experts.gate_up_proj") else None


@pytest.mark.parametrize("spec", LAYOUTS)
def test_rank_folders_hold_exactly_each_ranks_slices(tiny_fp8, tmp_path, spec):
    config, root = tiny_fp8
    out = tmp_path / "ranks"
    summary = run("hf-to-ms", root / "hf", out, dtype="fp32", layout=layout_yaml(tmp_path, spec))
    assert summary["files"] > 0 and transform.check(out)["verified"] == "sha256"
    parallel, world = _parallel(spec)
    p = make_plan(DeepseekV3Config.from_hf_config(config, **TINY_RUNTIME, use_past=True, parallel_config=parallel),
             devices=world)
    with open_checkpoint(root / "unified") as ckpt:
        unified = {n: ckpt.read(n) for n in ckpt.keys()}
    pieces = {}
    for rank in range(world):
        with open_checkpoint(out / f"rank_{rank}") as ckpt:
            held = p.rank_shards(rank)
            assert set(ckpt.keys()) == {n for n in held if n in unified}  # not caches, load counters
            par = ParallelContext(Layout.from_parallel_config(parallel), rank, world)
            for name in ckpt.keys():
                assert ckpt.shape(name) == tuple(held[name].local_shape), name
                slices = par.param_slices(name, ckpt.shape(name)) or [None] * len(ckpt.shape(name))
                pieces.setdefault(name, []).append((slices, ckpt.read(name)))
    assert set(pieces) == set(unified)
    split = 0
    for name, parts in pieces.items():
        split += any(any(s) for s, _ in parts)
        np.testing.assert_array_equal(_reassemble(parts, _fused_dim(name)), unified[name], err_msg=name)
    assert split > 0


class _RankModel:
    """What the loader needs of one rank's model: config, parallel context, local parameters."""

    def __init__(self, config, par, shards):
        self.config, self.parallel = config, par
        table = {e.ms for e in names.expand(config)}
        self.params = [Parameter(Tensor(np.zeros(s.local_shape, np.float32)), name=n) for n, s in shards.items()
                       if n in table]

    def get_parameters(self):
        return iter(self.params)


@pytest.mark.parametrize("spec", ["1x2x2", "1x4x2v"])
def test_each_rank_loads_its_folder_like_the_unified_checkpoint(tiny_fp8, tmp_path, spec):
    cfg, root = tiny_fp8
    out = tmp_path / "ranks"
    run("hf-to-ms", root / "hf", out, dtype="fp32", layout=layout_yaml(tmp_path, spec))
    parallel, world = _parallel(spec)
    config = DeepseekV3Config.from_hf_config(cfg, **TINY_RUNTIME, use_past=True, parallel_config=parallel)
    p, layout = make_plan(config, devices=world), Layout.from_parallel_config(parallel)
    for rank in range(world):
        par = ParallelContext(layout, rank, world)
        from_hf, from_ranks = _RankModel(config, par, p.rank_shards(rank)), _RankModel(config, par, p.rank_shards(rank))
        load_hf_checkpoint(from_hf, str(root / "hf"))
        stats = {}
        load_hf_checkpoint(from_ranks, str(out), stats=stats)  # the checkpoint_name_or_path route
        assert stats["bytes_read"] == stats["bytes_checkpoint"]
        for a, b in zip(from_hf.params, from_ranks.params):
            np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=f"{a.name} rank {rank}")
    # a model of another layout is refused, naming the keys
    other = ParallelContext(Layout.from_parallel_config(dict(parallel, model_parallel=1, data_parallel=world)), 0,
                            world)
    with pytest.raises(CheckpointError, match=r"rank_0.*index.*another parallel layout.*mp"):
        load_hf_checkpoint(_RankModel(config, other, p.rank_shards(0)), str(out))


def test_training_layout_with_pipeline_stages(tiny_fp8, tmp_path):
    config, root = tiny_fp8
    out = tmp_path / "ranks"
    run("hf-to-ms", root / "hf", out, dtype="bf16", layout=layout_yaml(tmp_path, "1x2x2", training=True))
    names0 = set(open_checkpoint(out / "rank_0").keys())
    names3 = set(open_checkpoint(out / "rank_3").keys())
    assert "model.embed_tokens.weight" in names0 and "lm_head.weight" in names3
    assert "lm_head.weight" not in names0 and not any(n.startswith("model.layers.0.") for n in names3)
    assert transform.check(out)["files"] > 0


def test_workers_and_kill_resume_are_byte_identical(tiny_fp8, tmp_path):
    _, root = tiny_fp8
    lay = layout_yaml(tmp_path, "1x2x2")
    run("hf-to-ms", root / "hf", tmp_path / "one", layout=lay)
    cmd = [sys.executable, "-m", "mindformers_dsv3.checkpoint", "hf-to-ms", str(root / "hf"), str(tmp_path / "two"),
           "--layout", lay, "--workers", "2", "--quiet"]
    killed = subprocess.run(cmd + ["--debug-kill-after", "3"], cwd=ROOT, start_new_session=True,
                            capture_output=True, text=True)
    assert killed.returncode != 0
    assert not os.path.isfile(tmp_path / "two" / "rank_1" / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="not finished"):
        transform.check(tmp_path / "two")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    assert transform.check(tmp_path / "two")["verified"] == "sha256"


def test_layout_errors_name_the_yaml_and_key(tiny_fp8, tmp_path):
    _, root = tiny_fp8
    bad = layout_yaml(tmp_path, "1x3x1")  # 4 heads do not split 3 ways
    with pytest.raises(CheckpointError, match=r"(?s)layout_1x3x1\.yaml.*num_attention_heads=4 is not "
                       r"divisible by parallel_config.model_parallel=3"):
        run("hf-to-ms", root / "hf", tmp_path / "bad", layout=bad)
    assert not os.path.exists(tmp_path / "bad")
    with pytest.raises(CheckpointError, match=r"nope\.yaml"):
        run("hf-to-ms", root / "hf", tmp_path / "bad", layout=str(tmp_path / "nope.yaml"))
    with pytest.raises(CheckpointError, match="hf-to-ms only"):
        run("fp8-to-bf16", root / "hf", tmp_path / "bad", layout=layout_yaml(tmp_path, "1x2x1"))
