"""msrun worker (and single-process reference): finetune the tiny YAML through stock Trainer.

    msrun --worker_num=2 --local_worker_num=2 --master_port=P --join=True --log_dir=D \
        tests/dist/dp_train.py --out DIR --steps N --global-batch B --data-parallel 2
    python tests/dist/dp_train.py --out DIR --steps N --global-batch B      # one process, same data

With --data-parallel 2: use_parallel True, parallel_mode 0 (data parallel), data_parallel 2, each
rank reads every second sample (rank r: r, r + 2, ...) in batches of B / 2, so one step sees the
same B samples as the single process. Results land under DIR/output: CheckpointMonitor's
safetensors (checkpoint/rank_<r>/, weights after the last step) and MoEMonitor's per-step records
(moe_history_rank_<r>.jsonl). Each process works in its own folder under DIR (auto_register copies
the register/ shim into ./modules of the working directory).
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.environ.setdefault("GLOG_v", "3")
os.environ["REGISTER_PATH"] = os.path.join(ROOT, "register")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--data-parallel", type=int, default=1)
    args = parser.parse_args()

    from mindformers import Trainer, build_context
    from tests.training_fixtures import FINETUNE_YAML, training_config

    dp = args.data_parallel
    if args.global_batch % dp:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of --data-parallel {dp}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.chdir(tempfile.mkdtemp(prefix="cwd_", dir=out))
    cfg = training_config(FINETUNE_YAML, out, batch_size=args.global_batch // dp, save_steps=args.steps)
    cfg.train_dataset.data_loader.num_samples = args.steps * args.global_batch  # all ranks together
    if dp > 1:
        cfg.use_parallel = True
        cfg.parallel.parallel_mode = 0          # data parallel
        cfg.parallel.full_batch = False         # each rank reads its own shard
        cfg.parallel_config.data_parallel = dp
    build_context(cfg)
    Trainer(cfg).train()


if __name__ == "__main__":
    main()
