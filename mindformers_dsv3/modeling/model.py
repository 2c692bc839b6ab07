"""DeepSeek-V3 causal LM as a MindFormers PreTrainedModel (stock GenerationMixin contract)."""
import os
from contextlib import contextmanager

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.nn.utils import no_init_parameters
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from mindformers_dsv3.checkpoint import hooks
from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint
from mindformers_dsv3.config import ConfigError, DeepseekV3Config, dtype_of, refuse_unimplemented
from mindformers_dsv3.generation import HostGenerationMixin, host_argmax
from mindformers_dsv3.modeling.decoder import DecoderLayer
from mindformers_dsv3.modeling.layers import Embedding, Linear, RMSNorm
from mindformers_dsv3.modeling.mtp import MTPLayer
from mindformers_dsv3.modeling.rope import rope_tables
from mindformers_dsv3.parallel.checks import check_config_layout
from mindformers_dsv3.parallel.comm import GroupAllGather, GroupAllReduce, ParallelContext, comm_initialized
from mindformers_dsv3.parallel.layout import Layout
from mindformers_dsv3.parallel.recompute import apply_recompute
from mindformers_dsv3.parallel.sharding import apply_training_sharding
from mindformers_dsv3.units import dtype_bytes

MASK_VALUE = -1.0e9
PHASE_SUFFIX = "latent"


def latent_cache_bytes_per_token(config):
    """(kv_lora_rank + qk_rope_head_dim) values per layer in the compute dtype: 70,272 B for 671B bf16."""
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    return config.num_hidden_layers * per_layer * dtype_bytes(dtype_of(config.compute_dtype, "compute_dtype"))


def check_layout(config):
    """The layout of `config` checked with the config and the process count (errors name the keys); a layout
    of one rank needs no check. Predict configs (`use_past`) by the inference rules, others by the training
    rules (parallel/checks.py)."""
    layout = Layout.from_parallel_config(getattr(config, "parallel_config", None))
    if layout.world <= 1:
        return
    devices = None
    if comm_initialized():
        from mindspore.communication import get_group_size
        devices = get_group_size()
    check_config_layout(config, devices=devices)


def loads_checkpoint(config):
    """Whether building a model for `config` loads `checkpoint_name_or_path` (the planner builds from a copy
    without it)."""
    return bool(getattr(config, "checkpoint_name_or_path", None))


@contextmanager
def delayed_init(enabled=True):
    """Parameters made from initializers get no data inside (`no_init_parameters`) when `enabled`; the
    outer state is restored after (stock MindFormers may build the model inside its own no_init_parameters,
    which an inner one would otherwise switch off)."""
    outer = getattr(Parameter, "init_param", True)
    try:
        if enabled:
            with no_init_parameters():
                yield
        else:
            yield
    finally:
        Parameter.init_param = outer


class DeepseekV3Model(nn.Cell):
    """Embedding, decoder layers, final norm and the MTP modules (parameters only at inference)."""

    def __init__(self, config, param_dtype, compute_dtype, par=None):
        super().__init__()
        self.num_cache_slots = config.num_blocks * config.block_size if config.use_past else 0
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                      param_dtype, compute_dtype, par)
        self.layers = nn.CellList([
            DecoderLayer(config, i, self.num_cache_slots, param_dtype, compute_dtype, par)
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        self.mtp = nn.CellList([
            MTPLayer(config, config.num_hidden_layers + j, param_dtype, compute_dtype, par)
            for j in range(config.num_nextn_predict_layers)])


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    base_model_prefix = "model"


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class DeepseekV3ForCausalLM(HostGenerationMixin, DeepseekV3PreTrainedModel):
    """DeepSeek-V3 / R1 for causal LM.

    `construct` follows MindFormers' legacy signature so stock `generate` drives it:
    without `slot_mapping` it runs a full causal forward; with it, the first call
    (prefill, prompt padded to `seq_length`) fills the paged latent cache and each
    later call decodes one token per sequence with absorbed attention.
    Logits come back flattened to (batch * seq, vocab); a prefill returns only the last valid
    position of each sequence, (batch, vocab), the only row stock generate samples from.

    Split inference (frontend tensor / expert / data-parallel attention; docs/en/parallel.md) is
    selected by the config alone: `use_past: True` and a `parallel_config` of more than one rank
    under msrun with `use_parallel: True`. Each rank then builds only its shard (`self.parallel`
    holds its coordinates), its own latent cache, reads only its slices of the checkpoint, and
    returns whole logits. With data_parallel > 1 each rank generates its own share of the batch
    (`self.parallel.dp_slice(prompts)`); ranks step in lockstep (see `generate`).
    """

    def __init__(self, config: DeepseekV3Config = None):
        config = config if config is not None else DeepseekV3Config()
        super().__init__(config, auto_prefix=True)
        self.config = config
        param_dtype = dtype_of(config.param_init_type, "param_init_type")
        self.compute_dtype = dtype_of(config.compute_dtype, "compute_dtype")
        self.use_past = bool(config.use_past)
        self.is_first_iteration = True
        self.block_size = config.block_size
        self.vocab_size = config.vocab_size
        self.ignore_token_id = int(config.ignore_token_id)
        self.mtp_loss_factor = float(config.mtp_loss_factor)
        self.bias_update_rate = float(config.bias_update_rate)
        self.num_mtp = int(config.num_nextn_predict_layers)
        # lm, mtp and balance losses of the last training step (read by the loss callback)
        self.last_losses = Parameter(Tensor(np.zeros(3), ms.float32), requires_grad=False)
        refuse_unimplemented(config)
        # split inference: this rank's coordinates (the layout checked first; None for a whole model)
        self.parallel = par = ParallelContext.from_config(config)
        vocab_ways = par.vocab_ways if par is not None else 1
        # the parameters a checkpoint supplies get no data (no random init) before load_checkpoint fills them
        with delayed_init(loads_checkpoint(config)):
            self.model = DeepseekV3Model(config, param_dtype, self.compute_dtype, par)
            self.lm_head = Linear(config.hidden_size, config.vocab_size // vocab_ways, std=config.initializer_range,
                                  param_dtype=param_dtype, compute_dtype=self.compute_dtype)
        self.vocab_ways = vocab_ways
        self.gather_vocab = GroupAllGather(par.tp_group) if vocab_ways > 1 else None
        # data-parallel ranks step together (collectives in every MoE layer): see generate()
        self.lockstep = _Lockstep(self, par) if par is not None and par.dp > 1 else None
        cos, sin = rope_tables(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling,
                               config.seq_length)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)
        # stock GenerationMixin sets mint.argmax here (no CPU kernel; a device op per token anyway)
        self.argmax = host_argmax
        # Stock generate names its graphs "prefill"/"increment"; MindSpore runs a cached graph of
        # those two phases without checking input shapes, so a second batch size would reuse the
        # first one's graph. A phase suffix keeps the shape-checked compile cache.
        self._set_network_phase(PHASE_SUFFIX)
        # training layouts (recompute, MindSpore semi-auto / auto parallel): apply_training_layout, on the
        # training path
        self.sharding = self.recomputed = None
        self.training_layout_applied = False
        self.load_checkpoint(config)

    # ------------------------------------------------------------------ stock hooks
    def check_pipeline_stage(self):
        """Stock hook: MindFormers' Trainer calls it right after building the network (every run mode). The
        layout is checked with the config; a training build (`use_past: False`) gets its training layout."""
        if self.config.use_past:
            check_layout(self.config)
        else:
            self.apply_training_layout()  # checks the layout first

    def apply_training_layout(self):
        """Training path (check_pipeline_stage, DeepseekV3TrainOneStepCell): `recompute_config`
        (`self.recomputed`: the decisions, None when nothing is recomputed) and, in semi-auto / auto parallel
        over several devices, MindSpore's sharding (`self.sharding`). Once per model; returns the sharding."""
        if not self.training_layout_applied and not self.config.use_past:
            check_layout(self.config)
            self.recomputed = apply_recompute(self, self.config)
            self.sharding = apply_training_sharding(self, self.config)
            self.training_layout_applied = True
        return self.sharding

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": Tensor(input_ids.astype(np.int32))}

    def set_dynamic_inputs(self, **kwargs):
        """Stock generate calls this with `is_dynamic: True`; shapes stay static per compiled graph here."""

    def add_flags_custom(self, is_first_iteration):
        self.add_flags(is_first_iteration=is_first_iteration)

    def set_cache_phase(self, prefill):
        """Select the prefill or decode graph, as stock generate does before each call."""
        self.add_flags_custom(is_first_iteration=prefill)
        self.phase = f"{'prefill' if prefill else 'increment'}_{PHASE_SUFFIX}"

    # ------------------------------------------------------------------ positions and masks
    def _full_inputs(self, seq):
        cos = self.rope_cos[:seq].reshape(1, seq, -1)
        sin = self.rope_sin[:seq].reshape(1, seq, -1)
        pos = ops.arange(seq, dtype=ms.int32)
        causal = pos.reshape(-1, 1) >= pos.reshape(1, -1)
        mask = ops.where(causal, 0.0, MASK_VALUE).astype(ms.float32).reshape(1, 1, seq, seq)
        return cos, sin, mask

    def _prefill_writes(self, batch, seq, valid_length, slot_mapping):
        """Rows and slots to write: padded positions repeat the last valid token's write."""
        pos = ops.arange(seq, dtype=ms.int32).reshape(1, seq)
        last = ops.maximum(valid_length.reshape(batch, 1) - 1, 0)
        src = ops.arange(batch, dtype=ms.int32).reshape(batch, 1) * seq + ops.minimum(pos, last)
        src = src.reshape(-1)
        return src, ops.gather(slot_mapping.reshape(-1), src, 0)

    def _decode_inputs(self, batch, valid_length, block_tables):
        pos = valid_length - 1
        cos = ops.gather(self.rope_cos, pos, 0).reshape(batch, 1, -1)
        sin = ops.gather(self.rope_sin, pos, 0).reshape(batch, 1, -1)
        blocks = ops.maximum(block_tables, 0).reshape(batch, -1, 1) * self.block_size
        read_slots = (blocks + ops.arange(self.block_size, dtype=ms.int32).reshape(1, 1, -1)).reshape(batch, -1)
        seen = ops.arange(read_slots.shape[1], dtype=ms.int32).reshape(1, -1) < valid_length.reshape(-1, 1)
        mask = ops.where(seen, 0.0, MASK_VALUE).astype(ms.float32).reshape(batch, 1, 1, -1)
        return cos, sin, mask, read_slots

    # ------------------------------------------------------------------ forward
    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None,
                  zactivate_len=None, block_tables=None, slot_mapping=None):
        if self.training:
            return self.training_loss(input_ids, labels)
        batch, seq = input_ids.shape
        hidden = self.model.embed_tokens(input_ids)
        write_rows, write_slots, read_slots, last_rows = None, None, None, None
        if slot_mapping is None:
            cos, sin, mask = self._full_inputs(seq)
        else:
            valid_length = batch_valid_length.reshape(-1).astype(ms.int32)
            slot_mapping = slot_mapping.astype(ms.int32)
            if self.is_first_iteration:
                cos, sin, mask = self._full_inputs(seq)
                write_rows, write_slots = self._prefill_writes(batch, seq, valid_length, slot_mapping)
                # only the last valid position of each sequence is sampled after a prefill
                last_rows = ops.arange(batch, dtype=ms.int32) * seq + ops.maximum(valid_length - 1, 0)
            else:
                cos, sin, mask, read_slots = self._decode_inputs(batch, valid_length,
                                                                 block_tables.astype(ms.int32))
                write_slots = slot_mapping.reshape(-1)   # one token per sequence, rows in order
        for layer in self.model.layers:
            hidden, _ = layer(hidden, cos, sin, mask, write_rows, write_slots, read_slots)
        if last_rows is not None:
            hidden = ops.gather(hidden.reshape(batch * seq, -1), last_rows, 0).reshape(batch, 1, -1)
            seq = 1
        logits = self.head(self.model.norm(hidden))
        return logits.astype(ms.float32).reshape(batch * seq, self.vocab_size)

    def head(self, normed):
        """lm_head; vocabulary-parallel: each rank's (N, V / mp) slice all-gathered over tp -> (N, V)."""
        logits = self.lm_head(normed)
        if self.gather_vocab is None:
            return logits
        local = logits.shape[-1]
        flat = logits.reshape(-1, local)
        n = flat.shape[0]
        parts = self.gather_vocab(flat).reshape(self.vocab_ways, n, local)
        return parts.transpose(1, 0, 2).reshape(logits.shape[:-1] + (self.vocab_ways * local,))

    # ------------------------------------------------------------------ training
    def _cross_entropy(self, logits, labels):
        """Mean token NLL over labels != ignore_token_id, in float32."""
        labels = labels.reshape(-1)
        valid = (labels != self.ignore_token_id).astype(ms.float32)
        logp = ops.log_softmax(logits.reshape(-1, self.vocab_size).astype(ms.float32), -1)
        picked = ops.gather_elements(logp, 1, ops.maximum(labels, 0).reshape(-1, 1)).reshape(-1)
        return -(picked * valid).sum() / ops.maximum(valid.sum(), 1.0)

    def _shift_left(self, labels, steps):
        """labels[:, steps:] padded on the right with ignore_token_id."""
        if steps == 0:
            return labels
        pad = ops.full((labels.shape[0], steps), self.ignore_token_id, dtype=labels.dtype)
        return ops.concat((labels[:, steps:], pad), 1)

    def training_loss(self, input_ids, labels=None):
        """Next-token loss + mtp_loss_factor * mean MTP loss + sequence-wise balance loss.

        Without `labels`, `input_ids` holds seq_length + 1 tokens and is shifted. MTP depth d
        at position i reads token t_{i+d} and predicts t_{i+d+1}.
        """
        if labels is None:
            tokens, labels = input_ids[:, :-1], input_ids[:, 1:]
        else:
            tokens = input_ids
        seq = tokens.shape[1]
        cos, sin, mask = self._full_inputs(seq)
        hidden = self.model.embed_tokens(tokens)
        aux = Tensor(0.0, ms.float32)
        for layer in self.model.layers:
            hidden, layer_aux = layer(hidden, cos, sin, mask)
            aux = aux + layer_aux
        normed = self.model.norm(hidden)
        lm_loss = self._cross_entropy(self.head(normed), labels)
        mtp_loss = Tensor(0.0, ms.float32)
        previous = normed
        for depth, mtp in enumerate(self.model.mtp):
            fed = ops.maximum(self._shift_left(labels, depth), 0)
            previous, mtp_normed, layer_aux = mtp(previous, self.model.embed_tokens(fed), cos, sin, mask)
            mtp_loss = mtp_loss + self._cross_entropy(self.head(mtp_normed), self._shift_left(labels, depth + 1))
            aux = aux + layer_aux
        if self.num_mtp:
            mtp_loss = mtp_loss / self.num_mtp
        losses = ops.stack((lm_loss, mtp_loss, aux))
        loss = lm_loss + self.mtp_loss_factor * mtp_loss + aux
        return ops.depend(loss, ops.assign(self.last_losses, ops.stop_gradient(losses)))

    def update_expert_bias(self):
        """Aux-loss-free balancing step for every MoE layer; the train-step wrapper calls it."""
        done = Tensor(True)
        if self.bias_update_rate > 0:
            for layer in self.model.layers:
                if layer.is_moe:
                    done = ops.depend(done, layer.mlp.router.update_bias())
            for mtp in self.model.mtp:
                if mtp.layer.is_moe:
                    done = ops.depend(done, mtp.layer.mlp.router.update_bias())
        return done

    def expert_loads(self):
        """{layer index: tokens per expert in the last training step} (host side, for monitoring)."""
        loads = {}
        for i, layer in enumerate(self.model.layers):
            if layer.is_moe:
                loads[i] = layer.mlp.router.expert_load.asnumpy().copy()
        return loads

    # ------------------------------------------------------------------ data-parallel lockstep
    def forward(self, *args, **kwargs):
        """Stock generate's per-step call; with data_parallel > 1 each step is announced first."""
        if self.lockstep is not None:
            self.lockstep.step(kwargs)
        return super().forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """Stock generate (through HostGenerationMixin). With data_parallel > 1 every MoE layer
        exchanges tokens with the other dp ranks, so all ranks must run the same number of steps: a
        rank whose sequences finished keeps running idle decode steps (dummy tokens, no output)
        until every rank has finished. Each rank passes its own share of the prompts, all ranks the
        same number of prompts per call."""
        out = super().generate(*args, **kwargs)
        if self.lockstep is not None:
            self.lockstep.drain()
        return out

    # ------------------------------------------------------------------ checkpoint hooks (stock loaders)
    def convert_name(self, weight_name):
        return hooks.convert_name(self.config, weight_name, split=self.parallel is not None)

    def convert_weight_dict(self, source_dict, **kwargs):
        return hooks.convert_weight_dict(self.config, source_dict)

    def convert_map_dict(self, source_dict, **kwargs):
        return hooks.convert_map_dict(self.config, source_dict)

    def obtain_name_map(self, load_checkpoint_files):
        return hooks.hf_to_ms_names(self.config)

    def load_checkpoint(self, config):
        """`checkpoint_name_or_path`: an HF folder (FP8 or BF16) or a `dsv3-convert --layout` folder, streamed
        through our loader (each rank of a split model reads its slices), then the parameters no checkpoint
        holds (latent cache, ...) are initialised. Set but not a loadable folder: an error, never a random model."""
        path = config.checkpoint_name_or_path
        if not path:
            super().load_checkpoint(config)  # logs that the weights are not loaded
            return
        if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
            raise ConfigError(f"model_config.checkpoint_name_or_path={path!r} is not a folder: set it to a "
                              "HuggingFace DeepSeek-V3 folder (FP8 or BF16) or a folder written by `dsv3-convert "
                              "hf-to-ms --layout`, or leave it empty (model names and single files are not loaded)")
        self.checkpoint_stats = {}  # bytes_read (a split rank reads only its slices), bytes_checkpoint
        load_hf_checkpoint(self, os.fspath(path), stats=self.checkpoint_stats)
        self.init_parameters_data()  # what the checkpoint does not hold: caches, bookkeeping

    # ------------------------------------------------------------------ user helpers
    def forward_logits(self, input_ids):
        """Full causal forward without cache: int array (batch, seq) -> float32 (batch, seq, vocab)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {ids.shape}")
        if ids.shape[1] > self.config.seq_length:
            raise ValueError(f"input_ids has {ids.shape[1]} tokens, more than seq_length="
                             f"{self.config.seq_length}")
        self.phase = "forward_logits"
        out = self(Tensor(ids.astype(np.int32)))
        return out.asnumpy().reshape(ids.shape[0], ids.shape[1], self.vocab_size)

    def kv_cache_bytes_per_token(self):
        """Bytes of latent cache one token occupies, summed over the layers."""
        return latent_cache_bytes_per_token(self.config)

    def kv_cache_allocated_bytes(self):
        """Bytes the latent cache parameters really hold (0 without `use_past`)."""
        return sum(int(np.prod(p.shape)) * p.itemsize
                   for p in self.get_parameters() if p.name.endswith("latent_cache"))

    def kv_cache_capacity_tokens(self):
        return self.model.num_cache_slots


class _Flag(nn.Cell):
    def __init__(self, par):
        super().__init__()
        self.sum = GroupAllReduce(par.world_group)

    def construct(self, x):
        return self.sum(x)


class _Lockstep:
    """Keeps data-parallel ranks stepping together through stock generate.

    Before each model call every rank all-reduces 1 (running) or 0 (idle); after its own generate
    returns, a rank answers with idle decode steps until the sum is 0 (every rank done).
    """

    def __init__(self, model, par):
        self.model = model
        self.flag = _Flag(par)
        self.last = None

    def _vote(self, running):
        return int(round(float(self.flag(Tensor(np.array([1.0 if running else 0.0], np.float32))).asnumpy()[0])))

    def step(self, kwargs):
        ids = np.asarray(kwargs.get("input_ids"))
        tables = kwargs.get("block_tables")
        self.last = (ids.shape, None if tables is None else np.asarray(tables).shape, bool(kwargs.get("use_past")))
        self._vote(True)

    def drain(self):
        while self._vote(False):
            self._idle_step()

    def _idle_step(self):
        (batch, length), tables, use_past = self.last
        model = self.model
        if use_past and tables is not None:
            model.set_cache_phase(prefill=False)
            model(Tensor(np.zeros((batch, 1), np.int32)), batch_valid_length=Tensor(np.ones((1, batch), np.int32)),
                  block_tables=Tensor(np.zeros(tables, np.int32)), slot_mapping=Tensor(np.zeros(batch, np.int32)))
            model.set_cache_phase(prefill=True)
        else:
            model.phase = f"predict_{PHASE_SUFFIX}"
            model(Tensor(np.zeros((batch, length), np.int32)))
