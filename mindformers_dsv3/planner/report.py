"""Plain-text report of a Plan (the `dsv3-plan` output and the figures in docs/*/parallel.md)."""
import os


from mindformers_dsv3.planner.plan import cached_layers, make_plan
from mindformers_dsv3.units import format_bytes as gib, format_count as count

__all__ = ["format_plan", "summary_table", "doc_figures", "update_doc"]


def _layers(stage, plan):
    r = stage.layers
    text = f"layers {r.start}-{r.stop - 1}" if len(r) > 1 else f"layer {r.start}"
    extra = []
    if stage.index == 0:
        extra.append("embedding")
    if stage.index == len(plan.stages) - 1:
        extra += ["norm", "lm_head"]
        if plan.config.num_nextn_predict_layers:
            extra.append(f"{plan.config.num_nextn_predict_layers} MTP")
    return text + (" + " + ", ".join(extra) if extra else "")


def _header(plan):
    c, lo = plan.config, plan.layout
    quant = ("W8A8 (%s; int8 weights, per-channel float32 scales)" % ", ".join(plan.quantization["schemes"])
             if plan.quantization else str(c.param_init_type))
    lines = [f"config    {plan.source}",
             f"model     {c.num_hidden_layers} layers + {c.num_nextn_predict_layers} MTP, {c.n_routed_experts} "
             f"routed experts, {c.num_attention_heads} heads, vocab {c.vocab_size}; weights {quant}",
             f"run mode  {plan.run_mode}: data_parallel {lo.dp} x model_parallel {lo.mp} x pipeline_stage {lo.pp}"
             f" = {lo.world} devices" + (f" (target: {plan.devices})" if plan.devices != lo.world else ""),
             f"experts   expert_parallel {lo.ep}: {c.n_routed_experts // lo.ep} experts per rank"
             + (f", each split {lo.etp} ways (expert TP = dp*mp/ep)" if lo.etp > 1 else ", whole")
             + (f", {lo.expert_replicas} replicas" if lo.expert_replicas > 1 else ""),
             f"vocab     {'replicated (vocab_emb_dp)' if lo.vocab_emb_dp else f'split over model_parallel {lo.mp}'}",
             f"memory    device {gib(plan.device_memory)}, MindSpore pool (context.max_device_memory) "
             f"{gib(plan.pool)}, workspace {gib(plan.pool - plan.usable)} -> usable {gib(plan.usable)} "
             f"(runtime reserve {gib(plan.reserve)})"]
    if lo.pp == 1:
        lines.insert(2, f"per rank  {count(sum(s.numel for s in plan.stages[0].shards))} parameter values")
    return lines


def _stage_table(plan, stage):
    lines = [f"per device, stage {stage.index} of {len(plan.stages)} ({_layers(stage, plan)}):",
             f"  {'kind':<16}{'dtype':<10}{'params':>12}{'bytes':>16}"]
    numel = {}
    for s in stage.shards:
        numel[(s.kind, s.dtype)] = numel.get((s.kind, s.dtype), 0) + s.numel
    for (kind, dtype), b in stage.weights.items():
        lines.append(f"  {kind:<16}{dtype:<10}{count(numel[(kind, dtype)]):>12}{gib(b):>16}")
    lines.append(f"  {'weights':<38}{gib(stage.weight_bytes):>16}")
    if plan.layout.training:
        lines += [f"  {'weights stored (parallel optimizer)':<38}{gib(stage.stored_weight_bytes):>16}",
                  f"  {'gradients':<38}{gib(stage.gradient_bytes):>16}",
                  f"  {'optimizer (AdamW, 2 x fp32)':<38}{gib(stage.optimizer_bytes):>16}"]
        t = stage.activation_terms
        lines.append(f"  {'activations (estimate)':<38}{gib(stage.activation_bytes):>16}"
                     f"   {t['in_flight']} micro batches in flight x {t['tokens']} tokens, "
                     f"{t['recomputed_layers']} layers recomputed"
                     + (f", {t['select_recomputed_layers']} with parts recomputed" if t.get('select_recomputed_layers')
                        else ""))
    else:
        c = plan.config
        per_layer = c.kv_lora_rank + c.qk_rope_head_dim
        cached = cached_layers(c, stage.layers, stage.index == plan.layout.pp - 1)
        item = stage.cache_bytes_per_token // max(per_layer * cached, 1)
        lines.append(f"  {'KV cache / token':<38}{stage.cache_bytes_per_token:>12,} B   ({per_layer} x "
                     f"{cached} layers x {item} B; latent replicated on each TP rank)")
        lines.append(f"  {'KV cache allocated':<38}{gib(stage.cache_bytes):>16}   ({stage.cache_tokens:,} tokens = "
                     f"num_blocks x block_size)")
        t = stage.activation_terms
        lines.append(f"  {'activations (estimate)':<38}{gib(stage.activation_bytes):>16}   (prefill of "
                     f"{t['tokens']:,} tokens per rank)")
    lines.append(f"  {'total':<38}{gib(stage.total_bytes):>16}   of {gib(plan.usable)} usable")
    if not plan.layout.training:
        lines.append(f"  {'free for KV cache':<38}{gib(max(stage.free_bytes, 0)):>16}   -> "
                     f"{stage.tokens_fit:,} tokens fit")
    else:
        lines.append(f"  {'headroom':<38}{gib(stage.usable_bytes - stage.total_bytes):>16}")
    return lines


def format_plan(plan):
    lines = _header(plan)
    if len(plan.stages) > 1:
        lines.append("stages:")
        lines.append(f"  {'stage':<6}{'layers':<10}{'weights':>14}{'grads+opt':>14}{'activations':>14}"
                     f"{'total':>14}")
        for s in plan.stages:
            lines.append(f"  {s.index:<6}{f'{s.layers.start}-{s.layers.stop - 1}':<10}"
                         f"{gib(s.stored_weight_bytes):>14}{gib(s.gradient_bytes + s.optimizer_bytes):>14}"
                         f"{gib(s.activation_bytes):>14}{gib(s.total_bytes):>14}")
        lines.append("heaviest stage in detail:")
    lines += _stage_table(plan, plan.worst)
    problems = plan.fit_problems()
    if problems:
        lines += ["verdict   DOES NOT FIT"] + [f"  - {p}" for p in problems]
    else:
        worst = plan.worst
        lines.append(f"verdict   FITS: {gib(worst.total_bytes)} of {gib(plan.usable)} usable on the heaviest device")
    return "\n".join(lines)


def summary_table(plans):
    """One Markdown row per plan (the table in docs/*/parallel.md): the heaviest device of each."""
    head = ("| YAML | devices | dp x mp x pp | ep (expert TP) | weights / device | KV cache / token | activations "
            "| total / usable | left |\n|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for p in plans:
        s, lo = p.worst, p.layout
        if lo.training:
            cache, left = "-", f"{gib(s.usable_bytes - s.total_bytes)} headroom"
            weights = (f"{gib(s.weight_bytes)} shard; stored {gib(s.stored_weight_bytes)} + grads "
                       f"{gib(s.gradient_bytes)} + AdamW {gib(s.optimizer_bytes)}")
        else:
            cache, left = f"{s.cache_bytes_per_token:,} B", f"{s.tokens_fit:,} tokens"
            weights = gib(s.weight_bytes)
        name = p.source.split("configs/")[-1]
        rows.append(f"| `{name}` | {lo.world} | {lo.dp} x {lo.mp} x {lo.pp} | {lo.ep} ({lo.etp}) | {weights} | {cache} "
                    f"| {gib(s.activation_bytes)} | {gib(s.total_bytes)} / {gib(p.usable)} | {left} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the figures in docs/*/parallel.md
DOC_YAMLS = ("deepseek3_671b/predict_deepseek3_671b.yaml", "deepseek3_671b/predict_deepseek3_671b_w8a8.yaml",
             "deepseek_r1_671b/predict_deepseek_r1_671b.yaml",
             "deepseek3_671b/pretrain_deepseek3_671b.yaml", "deepseek3_671b/finetune_deepseek3_671b.yaml")
DOC_BEGIN = "<!-- dsv3-plan figures: python -m mindformers_dsv3.planner.report --update docs/en/parallel.md " \
            "docs/zh/parallel.md -->"
DOC_END = "<!-- end of dsv3-plan figures -->"
_ZH_HEAD = "| YAML | 设备数 | dp x mp x pp | ep（专家 TP） | 每卡权重 | 每 token KV 缓存 | 激活 | 总计 / 可用 | 剩余 |"
_SAME = {"en": "`finetune_deepseek3_671b.yaml` has the same layout and the same figures as the pretraining file "
               "(run mode `finetune`).",
         "zh": "`finetune_deepseek3_671b.yaml` 的布局与数字与预训练文件完全相同（运行模式为 `finetune`）。"}


def doc_figures(root, lang="en", device_memory="64GB"):
    """The generated part of docs/<lang>/parallel.md: summary table + each YAML's full report."""
    plans = []
    for rel in DOC_YAMLS:
        p = make_plan(os.path.join(root, "configs", rel), device_memory=device_memory)
        p.source = "configs/" + rel
        plans.append(p)
    summary = summary_table(plans)
    if lang == "zh":
        summary = _ZH_HEAD + "\n" + summary.split("\n", 1)[1]
    parts = [DOC_BEGIN, "", summary, ""]
    for rel, p in zip(DOC_YAMLS, plans):
        if rel.startswith("deepseek3_671b/finetune"):
            continue
        parts += [f"### `{rel.split('/')[-1]}`", "", "```",
                  f"$ dsv3-plan {p.source} --device-memory {device_memory}", format_plan(p), "```", ""]
    parts += [_SAME[lang], "", DOC_END]
    return "\n".join(parts)


def update_doc(path, root, check=False):
    """Rewrite the generated part of a parallel.md (between the markers); check=True: only compare."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
    new = text[:start] + doc_figures(root, "zh" if "/zh/" in path.replace("\\", "/") else "en") + text[end:]
    if not check and new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new == text


if __name__ == "__main__":
    import argparse
    import logging
    import sys
    from mindformers.tools.logger import get_logger
    get_logger().setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description="regenerate the planner figures in docs/*/parallel.md")
    parser.add_argument("--update", nargs="+", required=True, metavar="DOC")
    parser.add_argument("--check", action="store_true", help="exit 1 when a doc is stale, change nothing")
    args = parser.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    stale = [doc for doc in args.update if not update_doc(doc, repo, check=args.check)]
    for doc in stale:
        print(f"{doc}: {'stale' if args.check else 'updated'}")
    sys.exit(1 if stale and args.check else 0)
