"""Build our MindSpore model from a tiny HuggingFace folder, and drive the stock cache contract."""
import numpy as np
from mindspore import Tensor
from mindformers.modules.block_tables import BlockTables

from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint
from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM

TINY_RUNTIME = dict(compute_dtype="float32", param_init_type="float32", seq_length=64,
                    block_size=16, num_blocks=16, batch_size=2)


def build_ms_model(hf_dir, **overrides):
    """Our model, fp32, with the weights of the HF folder `hf_dir`."""
    kwargs = dict(TINY_RUNTIME, use_past=True)
    kwargs.update(overrides)
    config = DeepseekV3Config.from_hf_config(hf_dir, **kwargs)
    model = DeepseekV3ForCausalLM(config)
    model.set_train(False)
    load_hf_checkpoint(model, hf_dir)
    return model


def cached_step_logits(model, prompts, steps):
    """Teacher-forced decode through the paged latent cache, exactly as stock `generate` calls it.

    prompts: list of 1-D int arrays (different lengths allowed); steps: (batch, n) tokens fed
    one by one after the prompts. Returns per sequence the logits of the last prompt position
    followed by those of each fed token: array (batch, n + 1, vocab).
    """
    cfg = model.config
    batch = len(prompts)
    mgr = BlockTables(cfg.num_blocks, cfg.block_size, cfg.seq_length)
    mgr.init_cache_engine(batch)
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    padded = np.zeros((batch, cfg.seq_length), dtype=np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    finished = [False] * batch
    block_tables, slots = mgr.assemble_pa_full_inputs(cfg.seq_length, lengths, finished)
    model.set_cache_phase(prefill=True)
    logits = model(Tensor(padded), batch_valid_length=Tensor(lengths.reshape(1, -1)),
                   block_tables=Tensor(block_tables), slot_mapping=Tensor(slots)).asnumpy()
    out = [logits.reshape(batch, -1)]  # the prefill returns the last valid position's logits only
    model.set_cache_phase(prefill=False)
    for t in range(steps.shape[1]):
        lengths = lengths + 1
        block_tables, slots = mgr.assemble_pa_inc_inputs(lengths, finished)
        step = model(Tensor(steps[:, t:t + 1].astype(np.int32)),
                     batch_valid_length=Tensor(lengths.reshape(1, -1)),
                     block_tables=Tensor(block_tables), slot_mapping=Tensor(slots)).asnumpy()
        out.append(step.reshape(batch, -1))
    mgr.clear_cache()
    model.set_cache_phase(prefill=True)
    return np.stack(out, axis=1)
