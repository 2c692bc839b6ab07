"""Activation estimates for the planner (bytes per rank); documented formulas, not measurements.

Symbols: h hidden_size, S seq_length, V vocab_size, E n_routed_experts, k num_experts_per_tok,
I intermediate_size, Im moe_intermediate_size, Is = Im x n_shared_experts, rq q_lora_rank (0 when
null), rk kv_lora_rank, dr qk_rope_head_dim, dn qk_nope_head_dim, dq = dn + dr, dv v_head_dim,
hr = heads / mp, c compute-dtype bytes.

predict (the prefill is the peak; decode handles one token per sequence):
  b = batch_size / dp sequences per rank, N = b x S tokens
  resident  = 2 N h c                                  (residual stream + layer input)
  attention = N c (rq + rk + dr + hr (2 dq + dn + 2 dv)) + 2 x 4 b hr S^2
              (q, k, v, output; fp32 scores + probabilities: the reference path materialises them)
  dense MLP = 3 N c I / mp
  MoE       = c (N dp h + P (h + 3 Im / etp) + 3 N Is / mp) + 8 N E,   P = N dp k / ep
              (tokens of all dp ranks gathered; P routed pairs on average per rank; fp32 router)
  logits    = 4 N V + c N V / mp                       (last stage: fp32 full-vocab logits)
  peak      = resident + max(attention, dense MLP, MoE, logits)

train / finetune (per micro batch N = batch_size x S tokens; sp = mp with use_seq_parallel else 1),
values per token, by part (the names of recompute.PARTS):
  layer input + the two norm outputs     = 3 h / sp
  self_attn (MLA inside)                 = 2 rq + 2 rk + dr + hr (2 dq + dn + 3 dv)
  mlp (dense SwiGLU)                     = 3 I / mp
  mlp.shared_experts (MoE)               = 3 Is / mp
  mlp.experts (MoE, routed pairs)        = k (h + 3 Im) / mp
  router (MoE, fp32 scores)              = 8 E / c          (freed with `mlp` = the whole MoE block)
  full layer            = N c x (sum of its parts)
  stored layer          = N c h / sp when recomputed whole (its input only), else the full layer less
                          the parts recomputed (select_recompute)
  in flight on stage s  = min(pp - s, micro_batch_num) micro batches (1F1B; 1 without pipeline)
  stage total = in_flight x sum(stored per layer) + one full layer (recompute / backward working set)
                + last stage: 2 x 4 N V / vocab_ways x (1 + MTP depth)   (fp32 logits and their grad)
  Which layers / parts are recomputed: parallel.recompute.recompute_layers, the decision the training build
  applies (recompute_config.recompute: True = every layer, a list = that many first layers of each
  stage; MTP layers follow the last decoder layer; select_recompute: parts of the other layers).
"""

from mindformers_dsv3.units import dtype_bytes

__all__ = ["predict", "training"]


def _dims(config, layout):
    c = dtype_bytes(config.compute_dtype)
    hr = config.num_attention_heads // layout.mp
    dq = config.qk_nope_head_dim + config.qk_rope_head_dim
    return c, hr, dq, config.q_lora_rank or 0


def predict(config, layout, layers, last, batch_size):
    """Peak prefill activations of one rank of a stage (see module doc); a dict of terms + 'total'."""
    c, hr, dq, rq = _dims(config, layout)
    h, seq = config.hidden_size, config.seq_length
    b = max(batch_size // layout.dp, 1)
    n = b * seq
    has_dense = any(not config.is_moe_layer(i) for i in layers)
    has_moe = any(config.is_moe_layer(i) for i in layers)
    terms = {"resident": 2 * n * h * c,
             "attention": n * c * (rq + config.kv_lora_rank + config.qk_rope_head_dim
                                   + hr * (2 * dq + config.qk_nope_head_dim + 2 * config.v_head_dim))
             + 2 * 4 * b * hr * seq * seq,
             "dense_mlp": 3 * n * c * config.intermediate_size // layout.mp if has_dense else 0,
             "moe": 0, "logits": 0}
    if has_moe:
        pairs = n * layout.dp * config.num_experts_per_tok // layout.ep
        shared = config.moe_intermediate_size * config.n_shared_experts
        terms["moe"] = c * (n * layout.dp * h + pairs * (h + 3 * config.moe_intermediate_size // layout.etp)
                            + 3 * n * shared // layout.mp) + 8 * n * config.n_routed_experts
    if last:
        terms["logits"] = 4 * n * config.vocab_size + c * n * config.vocab_size // layout.vocab_ways
    terms["total"] = terms["resident"] + max(terms["attention"], terms["dense_mlp"], terms["moe"], terms["logits"])
    terms["tokens"] = n
    return terms


def _layer_values(config, layout, i):
    """Stored activation values per token of layer i, by part: {part: values} (see the module doc).

    'input' is what a layer keeps when it is recomputed whole; 'self_attn', 'mlp', 'mlp.shared_experts',
    'mlp.experts' are what recomputing that part (recompute.PARTS) frees; 'rest' stays in any case.
    """
    c, hr, dq, rq = _dims(config, layout)
    h, mp = config.hidden_size, layout.mp
    sp = mp if layout.use_seq_parallel else 1
    out = {"input": h / sp,                                  # the layer's input (residual stream)
           "rest": h / sp + h / sp,                          # the two norms' outputs (inputs of the parts)
           "self_attn": 2 * rq + 2 * config.kv_lora_rank + config.qk_rope_head_dim
           + hr * (2 * dq + config.qk_nope_head_dim + 3 * config.v_head_dim)}
    if config.is_moe_layer(i):
        shared = config.moe_intermediate_size * config.n_shared_experts
        out["mlp.shared_experts"] = 3 * shared / mp
        out["mlp.experts"] = config.num_experts_per_tok * (h + 3 * config.moe_intermediate_size) / mp
        out["router"] = 8 * config.n_routed_experts / c
    else:
        out["mlp"] = 3 * config.intermediate_size / mp
    return out


def _stored_values(values, decision):
    """Values per token layer `decision` keeps (a recompute.LayerRecompute, None = nothing recomputed)."""
    if decision is not None and decision.full:
        return values["input"]
    freed = set(decision.parts) if decision is not None else set()
    if "mlp" in freed:                       # a MoE layer's `mlp` is the whole MoE block
        freed |= {"mlp.shared_experts", "mlp.experts", "router"}
    return sum(v for k, v in values.items() if k not in freed)


def training(config, layout, layers, stage, last, batch_size, decisions=None):
    """Activations one rank of a pipeline stage keeps during 1F1B training (see module doc).

    decisions: {layer index: recompute.LayerRecompute} from ``parallel.recompute.recompute_layers`` (MTP layers at
    num_hidden_layers + depth), the same decision the training build applies; None = nothing recomputed.
    """
    decisions = decisions or {}
    c = dtype_bytes(config.compute_dtype)
    n = batch_size * config.seq_length
    ids = list(layers) + [config.num_hidden_layers + j for j in range(config.num_nextn_predict_layers if last else 0)]
    values = [_layer_values(config, layout, i) for i in ids]
    full = [n * c * sum(v.values()) for v in values]
    stored = [n * c * _stored_values(v, decisions.get(i)) for i, v in zip(ids, values)]
    in_flight = min(layout.pp - stage, layout.micro_batch_num) if layout.pp > 1 else 1
    chosen = [decisions[i] for i in ids if i in decisions]
    terms = {"in_flight": in_flight, "recomputed_layers": sum(d.full for d in chosen),
             "select_recomputed_layers": sum(bool(d.parts) and not d.full for d in chosen),
             "stored": in_flight * sum(stored), "working_layer": max(full),
             "logits": 2 * 4 * n * config.vocab_size // layout.vocab_ways * (1 + config.num_nextn_predict_layers)
             if last else 0}
    terms["total"] = terms["stored"] + terms["working_layer"] + terms["logits"]
    terms["tokens"] = n
    return terms
