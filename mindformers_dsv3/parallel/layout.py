"""Parallel layout: `parallel_config` -> which slice of every parameter a rank holds, and the checks.

Rules (one table, used by the planner and meant for the parallel model; docs/en/parallel.md):

* ranks: ``data_parallel (dp) x model_parallel (mp) x pipeline_stage (pp)``; rank
  ``r = (stage * dp + dp_rank) * mp + tp_rank`` (pipeline outermost, tensor parallel innermost).
* attention (MLA): heads split over mp. ``q_b_proj`` / ``q_proj`` / ``kv_b_proj`` column-parallel
  (rows = heads), ``o_proj`` row-parallel (all-reduce); the latent projections ``q_a_proj``,
  ``kv_a_proj_with_mqa`` and their norms are replicated (the latent is shared by all heads).
* dense MLP and shared experts: ``gate_up_proj`` column-parallel over mp (gate and up halves split
  separately), ``down_proj`` row-parallel.
* routed experts: ``expert_parallel (ep)`` splits the experts (each rank a contiguous block).
  Inference (frontend parallel): the ``dp*mp`` ranks of a stage together hold every expert once, so
  each expert's intermediate dim is split over ``etp = dp*mp/ep`` ranks (ep=1: pure tensor parallel,
  ep=dp*mp: whole experts).  Training (MindSpore semi-auto, MindFormers MoEV3): whole experts, each
  held by ``dp*mp/ep`` replicas.  Either way ``ep`` must divide ``dp*mp``.
* embedding and lm_head: vocab-parallel over mp, or replicated when ``vocab_emb_dp``.
* router, norms, MTP ``eh_proj`` / ``enorm`` / ``hnorm``: replicated.  The MTP block follows the
  decoder-layer rules.
* pipeline: stage s holds ``L // pp + offset[s]`` decoder layers (``sum(offset) == L % pp``, the
  stock MindFormers rule); stage 0 holds the embedding, the last stage the final norm, lm_head and
  the MTP layers (plus an embedding copy for MTP when pp > 1).
* data parallel replicates everything above.
"""
import re
from dataclasses import dataclass

from mindformers_dsv3.config import ConfigError

__all__ = ["Layout", "LayoutError", "param_rule", "param_stages", "local_shape", "stage_layers", "stage_offsets", "KINDS"]

KINDS = ("embedding", "attention", "norms", "dense_mlp", "router", "shared_experts", "routed_experts",
         "mtp", "lm_head", "other")


class LayoutError(ConfigError):
    """An invalid parallel layout; ``problems`` lists every violated rule, each naming its keys."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("invalid parallel layout:\n  - " + "\n  - ".join(self.problems))


def _get(source, key, default=None):
    if source is None:
        return default
    if isinstance(source, dict):
        value = source.get(key, default)
    else:
        value = getattr(source, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class Layout:
    """The parallel layout of one run.  ``training`` selects the expert rule (see module doc)."""
    dp: int = 1
    mp: int = 1
    pp: int = 1
    ep: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = False
    use_seq_parallel: bool = False
    context_parallel: int = 1
    training: bool = False

    @classmethod
    def from_parallel_config(cls, parallel_config, training=False):
        """From a YAML ``parallel_config`` dict or a MindFormers TransformerOpParallelConfig (None: 1 rank)."""
        pc = parallel_config
        return cls(dp=_get(pc, "data_parallel", 1), mp=_get(pc, "model_parallel", 1),
                   pp=_get(pc, "pipeline_stage", 1), ep=_get(pc, "expert_parallel", 1),
                   micro_batch_num=_get(pc, "micro_batch_num", 1),
                   vocab_emb_dp=bool(_get(pc, "vocab_emb_dp", False)),
                   use_seq_parallel=bool(_get(pc, "use_seq_parallel", False)),
                   context_parallel=_get(pc, "context_parallel", 1), training=bool(training))

    @property
    def world(self):
        return self.dp * self.mp * self.pp

    @property
    def stage_ranks(self):
        return self.dp * self.mp

    @property
    def etp(self):
        """Ways each routed expert's intermediate dim is split (1 in training)."""
        if self.training or self.ep <= 0 or self.stage_ranks % self.ep:
            return 1
        return self.stage_ranks // self.ep

    @property
    def expert_replicas(self):
        """Ranks of a stage holding the same routed-expert slice (1 in inference)."""
        if self.ep <= 0 or self.stage_ranks % self.ep:
            return 1
        return self.stage_ranks // (self.ep * self.etp)

    @property
    def vocab_ways(self):
        return 1 if self.vocab_emb_dp else self.mp

    def ways(self, axis):
        return {"mp": self.mp, "ep": self.ep, "etp": self.etp, "vocab": self.vocab_ways, None: 1}[axis]

    def index(self, rank, axis):
        """Rank `rank`'s index along a split axis name of param_rule (0 for None / an unsplit vocabulary)."""
        c = self.coords(rank)
        return {"mp": c["tp_rank"], "vocab": c["tp_rank"] if self.vocab_ways > 1 else 0, "ep": c["ep_rank"],
                "etp": c["etp_rank"], None: 0}[axis]

    def param_slices(self, rank, name, local_shape):
        """Per dim, the global (start, stop) rank `rank` holds of parameter `name` (its local shape given),
        None for a dim held whole; None when it holds the whole parameter. Follows param_rule."""
        spec = param_rule(name)[3]
        out = []
        for dim, size in enumerate(local_shape):
            axis = spec[dim] if spec and dim < len(spec) else None
            index = self.index(rank, axis)
            out.append((index * size, (index + 1) * size) if self.ways(axis) > 1 else None)
        return tuple(out) if any(s is not None for s in out) else None

    def coords(self, rank):
        """Coordinates of a global rank: stage, dp_rank, tp_rank and (inference) ep_rank, etp_rank.

        Experts: the stage's ranks in order l = dp_rank*mp + tp_rank; ep_rank = l // etp and
        etp_rank = l % etp (an expert's TP group is made of neighbouring ranks).  Training:
        ep_rank = l % ep (MindFormers MoEV3: inner_dp), no expert TP.
        """
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside 0..{self.world - 1}")
        stage, local = divmod(rank, self.stage_ranks)
        dp_rank, tp_rank = divmod(local, self.mp)
        if self.training:
            ep_rank, etp_rank = local % self.ep, 0
        else:
            ep_rank, etp_rank = divmod(local, self.etp)
        return {"stage": stage, "dp_rank": dp_rank, "tp_rank": tp_rank, "ep_rank": ep_rank, "etp_rank": etp_rank}


# ----------------------------------------------------------------------------- parameter rules
# (regex on the name inside a decoder layer / MTP block, kind, split axes per dim)
_LAYER_RULES = [
    (r"self_attn\.latent_cache$", "cache", None),
    # W8A8 vectors (quant/layers.py): per-tensor activation parameters replicated, [N] vectors follow their
    # weight's rows (column-parallel split, row-parallel whole), expert scales their experts
    (r"self_attn\.\w+\.(input_scale|input_offset)$", "attention", ()),
    (r"self_attn\.(q_b_proj|q_proj)\.(weight_scale|deq_scale|quant_bias)$", "attention", ("mp",)),
    (r"self_attn\.\w+\.(weight_scale|deq_scale|quant_bias)$", "attention", ()),
    (r"(layernorm|norm)\.bias$", "norms", ()),
    (r"mlp\.experts\.gate_up_scale$", "routed_experts", ("ep", "etp")),
    (r"mlp\.experts\.down_scale$", "routed_experts", ("ep", None)),
    (r"mlp\.shared_experts\.gate_up_proj\.(weight_scale|deq_scale|quant_bias)$", "shared_experts", ("mp",)),
    (r"mlp\.shared_experts\.\w+\.(weight_scale|deq_scale|quant_bias|input_scale|input_offset)$", "shared_experts", ()),
    (r"mlp\.gate_up_proj\.(weight_scale|deq_scale|quant_bias)$", "dense_mlp", ("mp",)),
    (r"mlp\.\w+\.(weight_scale|deq_scale|quant_bias|input_scale|input_offset)$", "dense_mlp", ()),
    (r"self_attn\.(q_b_proj|q_proj|kv_b_proj)\.weight$", "attention", ("mp", None)),
    (r"self_attn\.(q_b_proj|q_proj|kv_b_proj)\.bias$", "attention", ("mp",)),
    (r"self_attn\.o_proj\.weight$", "attention", (None, "mp")),
    (r"self_attn\.(q_a_proj|kv_a_proj_with_mqa|o_proj)\.(weight|bias)$", "attention", ()),
    (r"(layernorm|norm)\.weight$", "norms", ()),
    (r"mlp\.router\.", "router", ()),
    (r"mlp\.experts\.gate_up_proj$", "routed_experts", ("ep", None, "etp")),
    (r"mlp\.experts\.down_proj$", "routed_experts", ("ep", "etp", None)),
    (r"mlp\.shared_experts\.gate_up_proj\.weight$", "shared_experts", ("mp", None)),
    (r"mlp\.shared_experts\.down_proj\.weight$", "shared_experts", (None, "mp")),
    (r"mlp\.gate_up_proj\.weight$", "dense_mlp", ("mp", None)),
    (r"mlp\.down_proj\.weight$", "dense_mlp", (None, "mp")),
]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^model\.mtp\.(\d+)\.(.*)$")


def _layer_rule(inner):
    for pattern, kind, spec in _LAYER_RULES:
        if re.search(pattern, inner):
            return kind, spec
    return "other", ()


def param_rule(name):
    """(kind, sub_kind, place, split axes) of a parameter of DeepseekV3ForCausalLM.

    kind: one of KINDS or "cache" (the latent KV cache, planned separately); sub_kind: the
    decoder-layer kind of an MTP parameter (else = kind); place: ("layer", i), ("mtp", j),
    "first" (stage 0), "last" (the last stage) or "all" (every stage); split axes:
    one entry per dim ("mp", "ep", "etp", "vocab" or None), () = replicated.
    """
    m = _LAYER.match(name)
    if m:
        kind, spec = _layer_rule(m.group(2))
        return kind, kind, ("layer", int(m.group(1))), spec
    m = _MTP.match(name)
    if m:
        inner = m.group(2)
        sub, spec = (_layer_rule(inner[len("layer."):]) if inner.startswith("layer.") else ("mtp", ()))
        if sub == "cache":
            return "cache", "cache", ("mtp", int(m.group(1))), None
        return "mtp", sub, ("mtp", int(m.group(1))), spec
    if name == "model.embed_tokens.weight":
        return "embedding", "embedding", "first", ("vocab", None)
    if name == "lm_head.weight":
        return "lm_head", "lm_head", "last", ("vocab", None)
    if name == "model.norm.weight":
        return "norms", "norms", "last", ()
    return "other", "other", "all", ()


def param_stages(place, stage_of_layer, pp):
    """Pipeline stages holding a parameter of this place (param_rule): [s, ...].

    stage_of_layer: {decoder layer index: stage} (from stage_layers).  A decoder layer's parameters
    live in its stage, the embedding in stage 0 (MTP looks its tokens up there too: the lookup runs
    where the table is and its output is sent on), the final norm, lm_head and MTP in the last stage,
    model-level buffers ("all") in every stage.  The training sharding (sharding.py) tags the cells
    with the same stages.
    """
    if isinstance(place, tuple):
        return [stage_of_layer[place[1]]] if place[0] == "layer" else [pp - 1]
    if place == "first":
        return [0]
    if place == "last":
        return [pp - 1]
    return list(range(pp))


def local_shape(shape, spec, layout):
    """The shape one rank holds: each dim named in spec divided by its ways (checked divisible)."""
    out = list(shape)
    for dim, axis in enumerate(spec or ()):
        ways = layout.ways(axis)
        if out[dim] % ways:
            raise LayoutError([f"dim {dim} ({out[dim]}) of a parameter split over {axis} is not divisible "
                               f"by {ways}"])
        out[dim] //= ways
    return tuple(out)


# ----------------------------------------------------------------------------- pipeline
def stage_offsets(offset, pp):
    """Per-stage offsets as a list of pp ints (None when not given), or a problem string."""
    if offset in (None, 0, [], ()):
        return None
    if isinstance(offset, int) and not isinstance(offset, bool):
        return [offset] * pp
    if isinstance(offset, (list, tuple)) and all(isinstance(o, int) and not isinstance(o, bool) for o in offset):
        if len(offset) != pp:
            return (f"model_config.offset has {len(offset)} entries; parallel_config.pipeline_stage={pp} "
                    "needs one per stage")
        return list(offset)
    return (f"model_config.offset={offset!r} must be an int or a list of {pp} ints "
            "(interleaved pipelines are not supported)")


def stage_layers(num_layers, pp, offset=None):
    """Decoder layers of each stage as [range(...)]: L // pp + offset[s] each (stock MindFormers rule)."""
    offs = stage_offsets(offset, pp)
    if isinstance(offs, str):
        raise LayoutError([offs])
    counts = [num_layers // pp + (offs[s] if offs else 0) for s in range(pp)]
    if sum(counts) != num_layers or min(counts) < 1:
        raise LayoutError([f"model_config.offset={offset!r} gives stage sizes {counts} for num_hidden_layers="
                           f"{num_layers} over parallel_config.pipeline_stage={pp}"])
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out
