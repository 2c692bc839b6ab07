"""Layout checks: every rule a ``parallel_config`` breaks for a model, as messages naming the keys.

``layout_problems`` is the one list of rules (the planner, the split-inference runtime and the training
layouts all call it); ``check_config_layout(config, devices)`` checks a DeepseekV3Config's own layout
with nothing but the config and the device count (raises LayoutError naming the keys).
"""
from mindformers_dsv3.parallel.layout import Layout, LayoutError, stage_offsets
from mindformers_dsv3.parallel.recompute import recompute_config_of

__all__ = ["layout_problems", "config_layout_problems", "check_config_layout"]

PC = "parallel_config."
_KEY_NAMES = {"dp": "data_parallel", "mp": "model_parallel", "pp": "pipeline_stage", "ep": "expert_parallel"}


def _positive(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _sizes(layout, devices, use_parallel):
    """Positive ints, the device count, use_parallel and context parallelism."""
    problems = []
    for key in ("dp", "mp", "pp", "ep", "micro_batch_num", "context_parallel"):
        value = getattr(layout, key)
        if not _positive(value):
            problems.append(f"{PC}{_KEY_NAMES.get(key, key)}={value!r} must be a positive int")
    if problems:
        return problems, False
    dp, mp, pp = layout.dp, layout.mp, layout.pp
    if devices is not None and layout.world != devices:
        problems.append(f"{PC}data_parallel * model_parallel * pipeline_stage = {dp} * {mp} * {pp} = "
                        f"{layout.world} does not equal the {devices} devices")
    if use_parallel is False and layout.world > 1:
        problems.append(f"use_parallel=False but {PC}data_parallel * model_parallel * pipeline_stage = "
                        f"{layout.world}; set use_parallel: True")
    if layout.context_parallel != 1:
        problems.append(f"{PC}context_parallel={layout.context_parallel} is not supported (use 1)")
    return problems, True


def _widths(config, layout):
    """Heads, MLP widths, experts and vocabulary against model / expert parallelism."""
    problems = []
    dp, mp, ep = layout.dp, layout.mp, layout.ep
    heads = config.num_attention_heads
    if heads % mp:
        problems.append(f"model_config.num_attention_heads={heads} is not divisible by {PC}model_parallel={mp}")
    if config.num_dense_layers and config.intermediate_size % mp:
        problems.append(f"model_config.intermediate_size={config.intermediate_size} (dense MLP) is not divisible "
                        f"by {PC}model_parallel={mp}")
    shared = config.moe_intermediate_size * config.n_shared_experts
    if shared and shared % mp:
        problems.append(f"model_config.moe_intermediate_size * n_shared_experts = {shared} (shared experts) is "
                        f"not divisible by {PC}model_parallel={mp}")
    experts = config.n_routed_experts
    if experts % ep:
        problems.append(f"model_config.n_routed_experts={experts} is not divisible by {PC}expert_parallel={ep}")
    if (dp * mp) % ep:
        problems.append(f"{PC}expert_parallel={ep} must divide {PC}data_parallel * model_parallel = {dp * mp} "
                        "(the ranks of a stage share the experts)")
    elif not layout.training and config.moe_intermediate_size % layout.etp:
        problems.append(f"model_config.moe_intermediate_size={config.moe_intermediate_size} is not divisible by "
                        f"the expert tensor parallelism {PC}data_parallel * model_parallel / expert_parallel = "
                        f"{layout.etp}")
    if not layout.vocab_emb_dp and config.vocab_size % mp:
        problems.append(f"model_config.vocab_size={config.vocab_size} is not divisible by {PC}model_parallel={mp} "
                        f"(or set {PC}vocab_emb_dp: True)")
    return problems


def _sequence_parallel(config, layout):
    mp, problems = layout.mp, []
    if layout.use_seq_parallel and mp == 1:
        problems.append(f"{PC}use_seq_parallel=True needs {PC}model_parallel > 1")
    if layout.use_seq_parallel and mp > 1 and config.seq_length % mp:
        problems.append(f"{PC}use_seq_parallel=True splits the sequence over {PC}model_parallel={mp}, but "
                        f"model_config.seq_length={config.seq_length} is not divisible by it")
    if layout.use_seq_parallel and not layout.training:
        problems.append(f"{PC}use_seq_parallel=True is a training setting; set it False for predict")
    return problems


def _pipeline(config, layout, offset):
    """Stages against the layers, model_config.offset and (training) micro_batch_num."""
    pp, layers, problems = layout.pp, config.num_hidden_layers, []
    if pp > layers:
        problems.append(f"{PC}pipeline_stage={pp} exceeds model_config.num_hidden_layers={layers}")
    elif pp > 1:
        offs = stage_offsets(offset, pp)
        if isinstance(offs, str):
            problems.append(offs)
        elif offs is None and layers % pp:
            problems.append(f"model_config.num_hidden_layers={layers} is not divisible by {PC}pipeline_stage={pp}; "
                            f"set model_config.offset to {pp} ints summing to {layers % pp}")
        elif offs is not None:
            counts = [layers // pp + o for o in offs]
            if sum(offs) != layers % pp:
                problems.append(f"model_config.offset={list(offs)} sums to {sum(offs)}; it must sum to "
                                f"num_hidden_layers % pipeline_stage = {layers} % {pp} = {layers % pp}")
            elif min(counts) < 1:
                problems.append(f"model_config.offset={list(offs)} leaves a pipeline stage without layers "
                                f"(stage sizes {counts})")
    if layout.training and pp > 1 and layout.micro_batch_num < pp:
        problems.append(f"{PC}micro_batch_num={layout.micro_batch_num} must be >= {PC}pipeline_stage={pp} "
                        "for training")
    return problems


def layout_problems(config, layout, devices=None, offset=None, batch_size=None, use_parallel=None,
                    recompute=None):
    """Every rule the layout breaks for this model, as messages naming the keys ([] = valid).

    config: DeepseekV3Config; devices: the device count to match (None: not checked); offset:
    model_config.offset; batch_size: model_config.batch_size (predict: sequences per call, split
    over dp); use_parallel: the YAML's top-level flag; recompute: a recompute.RecomputeConfig (per-stage
    lists checked against pipeline_stage) or the bare recompute_config.recompute value.
    """
    problems, sane = _sizes(layout, devices, use_parallel)
    if not sane:
        return problems
    problems += _widths(config, layout) + _sequence_parallel(config, layout) + _pipeline(config, layout, offset)
    pp, dp = layout.pp, layout.dp
    if recompute is not None and hasattr(recompute, "stage_problems"):
        problems += recompute.stage_problems(pp)
    elif isinstance(recompute, (list, tuple)) and len(recompute) != pp:
        problems.append(f"recompute_config.recompute has {len(recompute)} entries; {PC}pipeline_stage={pp} "
                        "needs one per stage")
    if not layout.training and batch_size is not None and batch_size % dp:
        problems.append(f"model_config.batch_size={batch_size} is not divisible by {PC}data_parallel={dp} "
                        "(each data-parallel rank decodes batch_size / data_parallel sequences)")
    return problems


def config_layout_problems(config, layout, devices=None, offset=None, batch_size=None, use_parallel=None,
                           recompute=None):
    """layout_problems, then (predict with a cache) whether the latent cache holds a batch."""
    problems = layout_problems(config, layout, devices=devices, offset=offset, batch_size=batch_size,
                               use_parallel=use_parallel, recompute=recompute)
    if not layout.training and config.use_past and not problems:
        per_rank = batch_size // layout.dp * config.seq_length
        slots = config.num_blocks * config.block_size
        if slots < per_rank:
            problems.append(f"model_config.num_blocks * block_size = {slots} cache tokens cannot hold "
                            f"batch_size / data_parallel x seq_length = {per_rank} tokens")
    return problems


def check_config_layout(config, devices=None):
    """Raise LayoutError naming the keys unless `config.parallel_config` suits the model; returns the Layout.

    A predict config (``use_past``) is checked with the inference rules, any other with the training rules;
    devices: the process count to match (None: not checked).
    """
    parallel_config = getattr(config, "parallel_config", None)
    layout = Layout.from_parallel_config(parallel_config, training=not config.use_past)
    problems = config_layout_problems(config, layout, devices=devices, offset=config.offset,
                                      batch_size=config.batch_size, recompute=recompute_config_of(parallel_config))
    if problems:
        raise LayoutError(problems)
    return layout
