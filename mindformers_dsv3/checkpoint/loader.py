"""Load a HuggingFace DeepSeek-V3 safetensors folder straight into our model.

Tensor by tensor through the name table: each MindSpore parameter is built from
its HF tensors (FP8 weights dequantized on the fly with their `weight_scale_inv`)
and set in place; nothing is copied to disk.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindformers_dsv3.checkpoint import names
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fp8 import FP8, dequantize_block_fp8
from mindformers_dsv3.checkpoint.safetensors_io import open_checkpoint

_NP_OF_MS = {ms.float32: np.float32, ms.float16: np.float16}


def read_hf_tensor(ckpt, name, dtype=np.float32):
    """One HF tensor as `dtype`, dequantizing FP8 with `<name>_scale_inv` when present."""
    scale_name = name + names.SCALE_SUFFIX
    array = ckpt.read(name)
    if scale_name in ckpt:
        array = dequantize_block_fp8(array, ckpt.read(scale_name), name=name)
    elif array.dtype == FP8:
        raise CheckpointError(f"FP8 tensor without its scale {scale_name!r}", ckpt.file_of(name), name)
    return array.astype(dtype, copy=False)


def _to_param_value(value, param):
    if param.dtype == ms.bfloat16:
        return Tensor(value.astype(np.float32)).astype(ms.bfloat16)
    return Tensor(value.astype(_NP_OF_MS.get(param.dtype, np.float32), copy=False))


def expected_hf_names(config, include_mtp=True):
    """All HF tensor names a checkpoint for `config` holds (MTP copies included, scales excluded)."""
    out = {n for e in names.expand(config, include_mtp) for n in e.hf}
    if include_mtp:
        out.update(names.shared_hf_names(config))
    return out


def load_hf_checkpoint(model, hf_dir, strict=True):
    """Fill `model`'s parameters from the HF folder `hf_dir`; returns the number of tensors read.

    Raises CheckpointError naming the tensor and file for a missing, unexpected or
    mis-shaped tensor. With strict=False, unexpected tensors are ignored.
    """
    config = model.config
    params = {p.name: p for p in model.get_parameters()}
    include_mtp = any(n.startswith("model.mtp.") for n in params)
    entries = names.expand(config, include_mtp)
    with open_checkpoint(hf_dir) as ckpt:
        present = set(ckpt.keys())
        expected = expected_hf_names(config, include_mtp)
        missing = sorted(n for n in expected if n not in present)
        if missing:
            raise CheckpointError(f"{len(missing)} tensor(s) missing, first {missing[:5]}",
                                  hf_dir, missing[0])
        scales = {n + names.SCALE_SUFFIX for n in expected}
        unexpected = sorted(n for n in present if n not in expected and n not in scales)
        if unexpected and strict:
            raise CheckpointError(f"{len(unexpected)} unexpected tensor(s), first {unexpected[:5]}",
                                  ckpt.file_of(unexpected[0]), unexpected[0])
        count = 0
        for entry in entries:
            param = params.get(entry.ms)
            if param is None:
                raise CheckpointError("no model parameter for this tensor; the name table and the "
                                      "model disagree", hf_dir, entry.ms)
            value = names.to_ms(entry, [read_hf_tensor(ckpt, n) for n in entry.hf], config)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"shape {tuple(value.shape)} after layout transform does not match model parameter "
                    f"{entry.ms!r} of shape {tuple(param.shape)}", ckpt.file_of(entry.hf[0]), entry.hf[0])
            param.set_data(_to_param_value(value, param))
            count += len(entry.hf)
    return count
