"""msrun worker: split (frontend-parallel) inference of a DeepSeek-V3 HF folder, one process per rank.

Used by tests/test_parallel_infer.py (checks) and bench/parallel.py (decode speed)::

    PATH=.venv/bin:$PATH msrun --worker_num=2 --local_worker_num=2 --master_port=PORT --join=True \\
        --log_dir=LOGS tests/dist/parallel_infer.py --hf HF_DIR --inputs IN.npz --out OUT \\
        --layouts 1x2x1,1x2x2,2x1x2

A layout is ``DPxMPxEP`` (data_parallel x model_parallel x expert_parallel), ``v`` at the end for
``vocab_emb_dp: True``. The model is built the stock way from configs/tiny/predict_deepseek3_tiny.yaml
with only YAML keys changed: ``use_parallel: True``, ``parallel_config``, the HF folder's
architecture and ``checkpoint_name_or_path`` (build_context -> build_parallel_config ->
build_network). Per layout, each rank writes ``OUT/<layout>/rank<r>.npz`` (teacher-forced logits
through the paged cache, greedy tokens) and ``rank<r>.json`` (parameter and cache bytes it
allocated and the planner's figures for it, checkpoint bytes read, timings).
"""
import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("MS_ALLOC_CONF", "enable_vmm:False")
os.environ["REGISTER_PATH"] = os.path.join(ROOT, "register")

import numpy as np  # noqa: E402

TINY_YAML = os.path.join(ROOT, "configs", "tiny", "predict_deepseek3_tiny.yaml")
_ITEMSIZE = {"Float32": 4, "Float16": 2, "BFloat16": 2}


def parse_layout(text):
    vocab_dp = text.endswith("v")
    dp, mp, ep = (int(x) for x in text.rstrip("v").split("x"))
    return dict(data_parallel=dp, model_parallel=mp, expert_parallel=ep, vocab_emb_dp=vocab_dp)


def yaml_config(args, layout, out_dir):
    """The tiny predict YAML with the keys a user changes for a split run."""
    from mindformers import MindFormerConfig
    cfg = MindFormerConfig(TINY_YAML)
    cfg.use_parallel = True
    cfg.output_dir = out_dir
    for key, value in layout.items():
        cfg.parallel_config[key] = value
    with open(os.path.join(args.hf, "config.json"), encoding="utf-8") as f:
        arch = json.load(f)
    mc = cfg.model.model_config
    for key, value in arch.items():
        if key not in ("architectures", "model_type", "torch_dtype", "transformers_version"):
            mc[key] = value
    mc.checkpoint_name_or_path = args.hf
    mc.batch_size = args.batch_size
    mc.seq_length = args.seq_length
    mc.max_decode_length = args.seq_length
    mc.num_blocks = args.num_blocks
    mc.block_size = args.block_size
    return cfg


def init_context(args, layout, out_dir):
    """Stock build_context, once per process: use_parallel: True -> mindspore.communication.init()."""
    from mindformers.core.context import build_context
    build_context(yaml_config(args, layout, out_dir))
    from mindspore.communication import get_group_size, get_rank
    return get_rank(), get_group_size()


def build(args, layout, out_dir):
    from mindformers.core.parallel_config import build_parallel_config
    from mindformers.models.build_model import build_network
    cfg = yaml_config(args, layout, out_dir)
    build_parallel_config(cfg)
    model = build_network(cfg.model, default_args={"parallel_config": cfg.parallel_config,
                                                   "moe_config": cfg.moe_config})
    model.set_train(False)
    return model


def allocation(model):
    """{kind: bytes} of the parameters this rank allocated (cache apart), cache bytes, {name: shape}."""
    from mindformers_dsv3.parallel.layout import param_rule
    kinds, cache, shapes = {}, 0, {}
    for p in model.get_parameters():
        nbytes = math.prod(p.shape) * _ITEMSIZE[str(p.dtype)]
        kind = param_rule(p.name)[0]
        if kind == "cache":
            cache += nbytes
        else:
            kinds[kind] = kinds.get(kind, 0) + nbytes
        shapes[p.name] = list(p.shape)
    return kinds, cache, shapes


def planned(model, rank, world):
    from mindformers_dsv3.planner.plan import make_plan
    p = make_plan(model.config, devices=world)
    stage = p.stage_of_rank(rank)
    shards = p.rank_shards(rank)
    return dict(per_kind=dict(stage.per_kind()), cache_bytes=stage.cache_bytes,
                shapes={n: list(s.local_shape) for n, s in shards.items()})


def checkpoint_reads(model, hf_dir):
    """Bytes a reload reads with exact slice reads, and what the name table says this rank needs."""
    from mindformers_dsv3.checkpoint import names, safetensors_io
    from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint
    from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint
    saved = safetensors_io.MIN_RUN_BYTES
    safetensors_io.MIN_RUN_BYTES = 1   # every column run read by itself: exactly the slice's bytes
    try:
        exact = {}
        load_hf_checkpoint(model, hf_dir, stats=exact)
    finally:
        safetensors_io.MIN_RUN_BYTES = saved
    par = model.parallel
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    need = whole = sharded_total = sharded_need = 0
    with open_checkpoint(hf_dir) as ckpt:
        for entry in names.expand(model.config, include_mtp):
            full = sum(ckpt.nbytes(n) for n in entry.hf)
            param = params[entry.ms]
            slices = par.param_slices(entry.ms, tuple(param.shape)) if par is not None else None
            if slices is None:
                need += full
                whole += full
            else:
                local = math.prod(param.shape) * ckpt.dtype(entry.hf[0]).itemsize
                need += local
                sharded_total += full
                sharded_need += local
    return dict(default_policy_bytes_read=model.checkpoint_stats.get("bytes_read"),
                bytes_checkpoint=model.checkpoint_stats.get("bytes_checkpoint"),
                exact_bytes_read=exact["bytes_read"], expected_bytes=need, replicated_bytes=whole,
                sharded_total_bytes=sharded_total, sharded_expected_bytes=sharded_need)


def run_layout(args, name, inputs, rank, world):
    from tests.model_fixtures import cached_step_logits
    out_dir = os.path.join(args.out, name)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    model = build(args, parse_layout(name), os.path.join(out_dir, f"output_rank{rank}"))
    build_s = time.perf_counter() - t0
    par = model.parallel
    record = {"layout": name, "rank": rank, "world": world, "build_s": build_s,
              "coords": par.describe() if par is not None else "whole model"}
    prompts = [inputs[f"prompt{i}"] for i in range(int(inputs["batch"]))]
    fed = inputs["fed"]
    new_tokens = [int(x) for x in inputs["new_tokens"]]
    local = par.dp_slice(list(range(len(prompts)))) if par is not None else list(range(len(prompts)))
    dp_rank = par.dp_rank if par is not None else 0
    arrays = {"rows": np.array(local)}
    record["local_batch"] = len(local)
    start = time.perf_counter() - build_s
    if not args.bench:
        kinds, cache, shapes = allocation(model)
        record.update(allocated=kinds, allocated_cache=cache, allocated_shapes=shapes,
                      planned=planned(model, rank, world), reads=checkpoint_reads(model, args.hf))
        t0 = time.perf_counter()
        arrays["logits"] = cached_step_logits(model, [prompts[i] for i in local], fed[local])
        record["teacher_forced_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate([prompts[i].tolist() for i in local], max_new_tokens=new_tokens[dp_rank],
                             do_sample=False, eos_token_id=[-1])
        record["generate_s"] = time.perf_counter() - t0
        for k, i in enumerate(local):
            arrays[f"tokens{i}"] = np.asarray(out[k])
    else:
        batch = [prompts[i].tolist() for i in local]

        def gen(n):
            t = time.perf_counter()
            model.generate(batch, max_new_tokens=n, do_sample=False, eos_token_id=[-1])
            return time.perf_counter() - t

        t0 = time.perf_counter()
        gen(2)                                   # compiles prefill and decode graphs
        record["first_call_s"] = time.perf_counter() - t0
        runs = []
        for _ in range(args.repeats):
            t1, tn = gen(1), gen(args.bench)
            runs.append({"generate1_s": t1, "generate_s": tn,
                         "decode_tok_s": len(batch) * (args.bench - 1) / max(tn - t1, 1e-9),
                         "tok_s": len(batch) * args.bench / tn})
        record["runs"] = runs
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **arrays)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print(f"[rank {rank}] {name}: done in {time.perf_counter() - start:.1f}s ({record['coords']})",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="HF DeepSeek-V3 folder (config.json + safetensors)")
    ap.add_argument("--inputs", required=True, help="npz: batch, prompt<i>, fed (batch, n), new_tokens (per dp)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", required=True, help="comma-separated DPxMPxEP[v]")
    ap.add_argument("--batch-size", type=int, default=2, dest="batch_size")
    ap.add_argument("--seq-length", type=int, default=64, dest="seq_length")
    ap.add_argument("--num-blocks", type=int, default=16, dest="num_blocks")
    ap.add_argument("--block-size", type=int, default=16, dest="block_size")
    ap.add_argument("--bench", type=int, default=0, help="decode benchmark: new tokens per timed generate")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    import mindspore as ms
    ms.set_seed(0)
    inputs = dict(np.load(args.inputs))
    layouts = args.layouts.split(",")
    os.makedirs(args.out, exist_ok=True)
    cwd = os.path.join(args.out, f"cwd_{os.getpid()}")  # auto_register writes ./modules: one per process
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    rank, world = init_context(args, parse_layout(layouts[0]), os.path.join(args.out, "context"))
    for name in layouts:
        run_layout(args, name, inputs, rank, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
