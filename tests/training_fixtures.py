"""Helpers for the training tests: the tiny training YAMLs, set up for a test directory.

Public API::

    FINETUNE_YAML, PRETRAIN_YAML, TOKENIZER_FILE, REGISTER_DIR
    training_config(yaml, workdir, steps=..., batch_size=..., save_steps=..., **model_keys)
        -> MindFormerConfig with output_dir = workdir/output and an absolute tokenizer path
    history(cfg) -> list of MoEMonitor records (one per step)
    checkpoints(output_dir) -> {step: path} of the safetensors CheckpointMonitor wrote (rank 0)
    standalone_copy(path, folder) -> a copy outside any rank_* folder (single-device loading needs it)
    mean(values)
"""
import glob
import json
import os
import re
import shutil

from mindformers import MindFormerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTER_DIR = os.path.join(ROOT, "register")
TINY_DIR = os.path.join(ROOT, "configs", "tiny")
FINETUNE_YAML = os.path.join(TINY_DIR, "finetune_deepseek3_tiny.yaml")
PRETRAIN_YAML = os.path.join(TINY_DIR, "pretrain_deepseek3_tiny.yaml")
TOKENIZER_FILE = os.path.join(TINY_DIR, "synthetic_tokenizer", "tokenizer.json")
MONITOR_INDEX = 1       # callbacks: [MFLossMonitor, MoEMonitor, CheckpointMonitor]
CHECKPOINT_INDEX = 2


def training_config(yaml, workdir, steps=None, batch_size=None, save_steps=None, **model_keys):
    """The YAML as run_mindformer.py reads it, with its outputs under `workdir`."""
    cfg = MindFormerConfig(yaml)
    workdir = os.path.abspath(workdir)
    cfg.output_dir = os.path.join(workdir, "output")
    cfg.processor.tokenizer.tokenizer_file = TOKENIZER_FILE
    assert cfg.callbacks[MONITOR_INDEX]["type"] == "MoEMonitor"
    assert cfg.callbacks[CHECKPOINT_INDEX]["type"] == "CheckpointMonitor"
    if batch_size is not None:
        cfg.runner_config.batch_size = batch_size
        cfg.model.model_config.batch_size = batch_size
    if steps is not None:
        cfg.train_dataset.data_loader.num_samples = steps * cfg.runner_config.batch_size
    if save_steps is not None:
        cfg.callbacks[CHECKPOINT_INDEX]["save_checkpoint_steps"] = save_steps
    for key, value in model_keys.items():
        cfg.model.model_config[key] = value
    return cfg


def history(cfg, rank=0):
    """MoEMonitor's per-step records of a run of `cfg` (its history_file is relative: under output_dir)."""
    name = cfg.callbacks[MONITOR_INDEX]["history_file"].replace("{rank}", str(rank))
    with open(os.path.join(cfg.output_dir, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def checkpoints(output_dir, rank=0):
    found = {}
    for path in glob.glob(os.path.join(output_dir, "checkpoint", f"rank_{rank}", "*.safetensors")):
        match = re.search(r"-(\d+)_(\d+)\.safetensors$", path)
        if match:
            found[int(match.group(2))] = path
    return found


def standalone_copy(path, folder):
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, os.path.basename(path))
    shutil.copyfile(path, dest)
    return dest


def mean(values):
    values = list(values)
    return sum(values) / len(values)
