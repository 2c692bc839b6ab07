"""Split ("frontend") inference on the CPU over msrun, against the single-process model.

Two msrun jobs (2 and 4 workers) run tests/dist/parallel_infer.py on one tiny HF folder; every layout
is selected by YAML keys alone (use_parallel, parallel_config). For each layout and rank:

* logits through the paged latent cache (prefill of ragged prompts, then teacher-forced decode) equal
  the single-process model's within 1e-5 (fp32), and stock greedy `generate` gives the same tokens;
  with data_parallel > 1 each rank decodes its own share of the batch, ranks asking for different
  numbers of new tokens (the lockstep keeps the collectives matched);
* the planner's per-rank weight bytes by kind, parameter shapes and KV cache bytes equal what the
  rank's model allocated;
* loading the unified checkpoint read exactly the rank's slices (name-table arithmetic) and no more:
  half of every sharded tensor on 2 ranks.

Layouts (DPxMPxEP): 1x2x1 (TP=2), 1x2x2 (TP=2 attention, EP=2 experts), 2x1x2 (data-parallel
attention 2, EP=2), 1x2x1v (TP=2 with vocab_emb_dp); 4 workers: 2x2x2 (DP2 x TP2 attention, experts
EP2 x expert-TP2), 1x4x2 (TP=4, EP=2 x expert-TP2). Plus in-process checks of the build-time layout
errors and of the loader's slicing (every rank's slices reassemble the whole model, FP8 included).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Parameter, Tensor

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint, read_hf_slice
from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
from mindformers_dsv3.config import ConfigError, DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from mindformers_dsv3.parallel.layout import Layout, LayoutError
from mindformers_dsv3.planner.plan import make_plan
from mindformers_dsv3.parallel.comm import ParallelContext
from tests import hf_fixtures as hf
from tests.conftest import free_port, msrun_env
from tests.model_fixtures import TINY_RUNTIME, build_ms_model, cached_step_logits
from tests.fp8_reference import dequantize_block_fp8, quantize_block_fp8
from tests.hf_fixtures import write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist", "parallel_infer.py")
TOL = 1e-5
NEW_TOKENS = (8, 5)          # new tokens asked by dp_rank 0 and 1 (layouts with data_parallel 2)
LAYOUTS_2 = ("1x2x1", "1x2x2", "2x1x2", "1x2x1v")
LAYOUTS_4 = ("2x2x2", "1x4x2")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = hf.tiny_hf_config()
    root = tmp_path_factory.mktemp("parallel")
    hf.save_hf_folder(root / "hf", config, hf.random_hf_state_dict(config, seed=0), shards=2)
    ids = np.random.RandomState(1).randint(2, config["vocab_size"], size=(2, 16))
    inputs = dict(batch=2, prompt0=ids[0, :9], prompt1=ids[1, :4], fed=np.stack([ids[0, 9:16], ids[1, 4:11]]),
                  new_tokens=np.array(NEW_TOKENS))
    np.savez(root / "inputs.npz", **inputs)
    return config, root, inputs


@pytest.fixture(scope="module")
def reference(tiny):
    """The single-process model: teacher-forced cached logits and greedy tokens (max new tokens)."""
    _, root, inputs = tiny
    model = build_ms_model(str(root / "hf"), batch_size=2)
    prompts = [inputs["prompt0"], inputs["prompt1"]]
    logits = cached_step_logits(model, prompts, inputs["fed"])
    out = model.generate([p.tolist() for p in prompts], max_new_tokens=max(NEW_TOKENS), do_sample=False,
                         eos_token_id=[-1])
    return {"logits": logits, "tokens": [np.asarray(t) for t in out]}


def run_msrun(workers, layouts, root, out, extra=(), timeout=1800):
    """Run the worker under msrun; returns OUT (raises with the workers' log tails on failure)."""
    bindir = os.path.dirname(sys.executable)
    env = msrun_env(PYTHONPATH=ROOT)
    logs = os.path.join(out, "logs")
    cmd = [os.path.join(bindir, "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
           f"--master_port={free_port()}", "--join=True", f"--log_dir={logs}", WORKER,
           "--hf", os.path.join(root, "hf"), "--inputs", os.path.join(root, "inputs.npz"), "--out", out,
           "--layouts", ",".join(layouts), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tails = []
        for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            with open(os.path.join(logs, name), encoding="utf-8", errors="replace") as f:
                lines = [l for l in f.read().splitlines() if "WARNING" not in l and "INFO" not in l]
            tails.append(f"== {name}\n" + "\n".join(lines[-25:]))
        raise AssertionError(f"msrun exited {proc.returncode}\n{proc.stdout[-2000:]}\n" + "\n".join(tails))
    return out


@pytest.fixture(scope="module")
def run2(tiny, tmp_path_factory):
    return run_msrun(2, LAYOUTS_2, str(tiny[1]), str(tmp_path_factory.mktemp("msrun2")))


@pytest.fixture(scope="module")
def run4(tiny, tmp_path_factory):
    return run_msrun(4, LAYOUTS_4, str(tiny[1]), str(tmp_path_factory.mktemp("msrun4")))


def rank_results(out, layout, world):
    results = []
    for r in range(world):
        with open(os.path.join(out, layout, f"rank{r}.json"), encoding="utf-8") as f:
            record = json.load(f)
        results.append((record, dict(np.load(os.path.join(out, layout, f"rank{r}.npz")))))
    return results


def check_layout(results, reference, layout):
    dp = int(layout.split("x")[0])
    for record, arrays in results:
        rank, rows = record["rank"], arrays["rows"]
        # logits through the cache, and greedy tokens
        diff = np.abs(arrays["logits"] - reference["logits"][rows]).max()
        assert diff <= TOL, f"{layout} rank {rank}: logits differ by {diff:.2e}"
        for i in rows:
            got, want = arrays[f"tokens{i}"], reference["tokens"][i]
            new = NEW_TOKENS[record["rank"] // (len(results) // dp)] if dp > 1 else max(NEW_TOKENS)
            assert len(got) == len(want) - max(NEW_TOKENS) + new, f"{layout} rank {rank}: {len(got)} tokens"
            np.testing.assert_array_equal(got, want[:len(got)], err_msg=f"{layout} rank {rank} prompt {i}")
        # the planner's figures for this rank = what the rank allocated
        planned, shapes = record["planned"], dict(record["allocated_shapes"])
        assert planned["per_kind"] == record["allocated"], f"{layout} rank {rank}"
        assert planned["cache_bytes"] == record["allocated_cache"] > 0
        cache = {n: shapes.pop(n) for n in list(shapes) if n.endswith("latent_cache")}
        assert planned["shapes"] == shapes and len(cache) == 4
        # the checkpoint: exactly this rank's slices
        reads = record["reads"]
        assert reads["exact_bytes_read"] == reads["expected_bytes"], f"{layout} rank {rank}: {reads}"
        assert reads["default_policy_bytes_read"] < reads["bytes_checkpoint"]


@pytest.mark.parametrize("layout", LAYOUTS_2)
def test_two_ranks_match_single_process(run2, reference, layout):
    results = rank_results(run2, layout, 2)
    check_layout(results, reference, layout)
    if layout != "2x1x2":
        assert all(len(a["rows"]) == 2 for _, a in results)    # tensor parallel: every rank the batch
    else:
        assert [list(a["rows"]) for _, a in results] == [[0], [1]]


def test_two_ranks_read_half_of_every_sharded_tensor(run2):
    for layout in LAYOUTS_2:
        for record, _ in rank_results(run2, layout, 2):
            reads = record["reads"]
            sharded_read = reads["exact_bytes_read"] - reads["replicated_bytes"]
            assert sharded_read * 2 == reads["sharded_total_bytes"], (layout, reads)
            assert reads["exact_bytes_read"] < 0.75 * reads["bytes_checkpoint"] or layout == "2x1x2"


@pytest.mark.parametrize("layout", LAYOUTS_4)
def test_four_ranks_match_single_process(run4, reference, layout):
    check_layout(rank_results(run4, layout, 4), reference, layout)


# ------------------------------------------------------------------ in-process: build-time checks
def _config(**parallel):
    return DeepseekV3Config.from_hf_config(hf.tiny_hf_config(), **TINY_RUNTIME, use_past=True,
                                           parallel_config=parallel)


def test_split_layout_without_communication_names_use_parallel():
    with pytest.raises(ConfigError, match="use_parallel: True") as err:
        DeepseekV3ForCausalLM(_config(data_parallel=1, model_parallel=2, expert_parallel=2))
    assert "msrun" in str(err.value)


def test_bad_layout_fails_at_build_naming_the_keys():
    with pytest.raises(LayoutError) as err:
        DeepseekV3ForCausalLM(_config(data_parallel=1, model_parallel=3, vocab_emb_dp=True))
    assert "num_attention_heads=4" in str(err.value) and "parallel_config.model_parallel=3" in str(err.value)
    with pytest.raises(LayoutError, match="n_routed_experts=8 is not divisible by parallel_config.expert_parallel=3"):
        DeepseekV3ForCausalLM(_config(data_parallel=3, model_parallel=1, expert_parallel=3))


def test_training_build_stays_whole():
    """use_past False (train / finetune): MindSpore's parallel modes split the model, not the model itself."""
    config = DeepseekV3Config.from_hf_config(hf.tiny_hf_config(), **TINY_RUNTIME, use_past=False,
                                             parallel_config={"data_parallel": 2, "model_parallel": 1})
    model = DeepseekV3ForCausalLM(config)
    assert model.parallel is None and model.lm_head.weight.shape == (128, 64)


# ------------------------------------------------------------------ in-process: the loader's slices
class _Shard:
    """What load_hf_checkpoint needs of one rank's model: config, parallel context, local parameters."""

    def __init__(self, config, par, shards):
        self.config, self.parallel = config, par
        self.params = [Parameter(Tensor(np.zeros(s.local_shape, np.float32)), name=n) for n, s in shards.items()]

    def get_parameters(self):
        return iter(self.params)


def _local_of(name, full, slices):
    """The expected local value of a parameter: fused [gate; up] keep their halves' rows."""
    index = tuple(slice(*s) if s else slice(None) for s in slices)
    fused_dim = 0 if name.endswith("gate_up_proj.weight") else 2 if name.endswith("experts.gate_up_proj") else None
    if fused_dim is None or slices[fused_dim] is None:
        return full[index]
    half = full.shape[fused_dim] // 2
    parts = np.split(full, [half], axis=fused_dim)
    a, b = slices[fused_dim]
    inner = list(index)
    inner[fused_dim] = slice(a // 2, b // 2)
    return np.concatenate([p[tuple(inner)] for p in parts], axis=fused_dim)


@pytest.mark.parametrize("layout", ["1x2x1", "2x1x2", "1x4x2", "2x2x4", "1x2x2v"])
def test_rank_slices_reassemble_the_whole_model(tiny, layout):
    cfg, root, _ = tiny
    dp, mp, ep = (int(x) for x in layout.rstrip("v").split("x"))
    config = DeepseekV3Config.from_hf_config(cfg, **TINY_RUNTIME, use_past=True)
    whole = DeepseekV3ForCausalLM(config)
    load_hf_checkpoint(whole, str(root / "hf"))
    full = {p.name: p.asnumpy() for p in whole.get_parameters()}
    parallel = dict(data_parallel=dp, model_parallel=mp, expert_parallel=ep, vocab_emb_dp=layout.endswith("v"))
    layout_obj = Layout.from_parallel_config(parallel)
    p = make_plan(DeepseekV3Config.from_hf_config(cfg, **TINY_RUNTIME, use_past=True, parallel_config=parallel),
             devices=dp * mp)
    split = set()
    for rank in range(dp * mp):
        par = ParallelContext(layout_obj, rank, dp * mp)
        shard = _Shard(config, par, p.rank_shards(rank))
        stats = {}
        load_hf_checkpoint(shard, str(root / "hf"), stats=stats)
        assert stats["bytes_read"] < stats["bytes_checkpoint"]
        for param in shard.params:
            slices = par.param_slices(param.name, tuple(param.shape))
            if slices is None:
                np.testing.assert_array_equal(param.asnumpy(), full[param.name], err_msg=param.name)
            else:
                split.add(param.name)
                np.testing.assert_array_equal(param.asnumpy(), _local_of(param.name, full[param.name], slices),
                                              err_msg=f"{param.name} rank {rank}")
    assert any("experts.down_proj" in n for n in split)


def test_fp8_slices_widen_to_whole_scale_blocks(tmp_path):
    rng = np.random.RandomState(0)
    q, s = quantize_block_fp8(rng.standard_normal((300, 260)).astype(np.float32))
    name = "model.layers.0.mlp.down_proj.weight"
    write_safetensors(str(tmp_path / "model.safetensors"), {name: q, name + names.SCALE_SUFFIX: s})
    want = dequantize_block_fp8(q, s)
    with open_checkpoint(str(tmp_path)) as ckpt:
        for axis, (a, b) in ((0, (100, 250)), (1, (130, 260)), (0, (0, 128)), (1, (5, 6))):
            got = read_hf_slice(ckpt, name, axis, a, b)
            cut = [slice(None), slice(None)]
            cut[axis] = slice(a, b)
            np.testing.assert_array_equal(got, want[tuple(cut)])
