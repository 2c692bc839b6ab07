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

train / finetune (per micro batch N = batch_size x S tokens; sp = mp with use_seq_parallel else 1):
  attention layer part  = 2 h / sp + 2 rq + 2 rk + dr + hr (2 dq + dn + 3 dv)   values per token
  dense MLP part        = h / sp + 3 I / mp
  MoE part              = h / sp + k (h + 3 Im) / mp + 3 Is / mp + 8 E / c
  full layer            = N c (attention + MLP part);  recomputed layer = N c h / sp (its input only)
  in flight on stage s  = min(pp - s, micro_batch_num) micro batches (1F1B; 1 without pipeline)
  stage total = in_flight x sum(stored per layer) + one full layer (recompute / backward working set)
                + last stage: 2 x 4 N V / vocab_ways x (1 + MTP depth)   (fp32 logits and their grad)
  recompute_config.recompute: True = every layer, a list = that many (first) layers of each stage.
"""

__all__ = ["predict", "training"]


def _bytes(dtype):
    return {"float32": 4, "float16": 2, "bfloat16": 2}[str(dtype)]


def _dims(config, layout):
    c = _bytes(config.compute_dtype)
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
    """Stored activation values per token of layer i (attention + MLP / MoE part)."""
    c, hr, dq, rq = _dims(config, layout)
    h, mp = config.hidden_size, layout.mp
    sp = mp if layout.use_seq_parallel else 1
    attention = 2 * h / sp + 2 * rq + 2 * config.kv_lora_rank + config.qk_rope_head_dim \
        + hr * (2 * dq + config.qk_nope_head_dim + 3 * config.v_head_dim)
    if config.is_moe_layer(i):
        shared = config.moe_intermediate_size * config.n_shared_experts
        mlp = h / sp + config.num_experts_per_tok * (h + 3 * config.moe_intermediate_size) / mp \
            + 3 * shared / mp + 8 * config.n_routed_experts / c
    else:
        mlp = h / sp + 3 * config.intermediate_size / mp
    return attention + mlp


def training(config, layout, layers, stage, last, batch_size, recompute):
    """Activations one rank of a pipeline stage keeps during 1F1B training (see module doc)."""
    c = _bytes(config.compute_dtype)
    n = batch_size * config.seq_length
    sp = layout.mp if layout.use_seq_parallel else 1
    if isinstance(recompute, (list, tuple)):
        recomputed = int(recompute[stage])
    else:
        recomputed = len(layers) if recompute else 0
    ids = list(layers) + [config.num_hidden_layers + j for j in range(config.num_nextn_predict_layers if last else 0)]
    full = [n * c * _layer_values(config, layout, i) for i in ids]
    stored = [n * c * config.hidden_size / sp if pos < recomputed else full[pos] for pos in range(len(ids))]
    in_flight = min(layout.pp - stage, layout.micro_batch_num) if layout.pp > 1 else 1
    terms = {"in_flight": in_flight, "recomputed_layers": min(recomputed, len(ids)),
             "stored": in_flight * sum(stored), "working_layer": max(full),
             "logits": 2 * 4 * n * config.vocab_size // layout.vocab_ways * (1 + config.num_nextn_predict_layers)
             if last else 0}
    terms["total"] = terms["stored"] + terms["working_layer"] + terms["logits"]
    terms["tokens"] = n
    return terms
