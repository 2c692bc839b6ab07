"""DeepseekV3Config: one config for DeepSeek-V3 / R1, read from an HF config.json or a MindFormers YAML.

Attribute names are the HuggingFace ``config.json`` names.  A YAML ``model_config`` may also use the
upstream ``research/deepseek3`` names and a ``moe_config`` block (dict or MindFormers ``MoEConfig``);
``_ALIASES`` is the one table that maps them.  Keys that mean nothing here are accepted only when listed
in ``_IGNORED``; anything else raises ``ConfigError`` with the closest known name.  All checks run on
construction (``validate()`` re-runs them after a later mutation).
"""
import copy
import difflib
import json
import math
import os
from collections.abc import Mapping

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.modules.transformer.moe import MoEConfig
from mindformers.tools.register.template import MoEConfig as _TemplateMoEConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .config_values import (BOOL as _BOOL, DTYPE as _DTYPE, INT as _INT, NONNEG as _NONNEG,
                            NONNEG_INT as _N0, POSITIVE as _POS, POSITIVE_INT as _P,
                            POSITIVE_INT_OR_NONE as _P_OR_NONE, STR_OR_NONE as _STR_OR_NONE,
                            TOKEN_IDS as _IDS, ANYTHING as _ANYTHING, YARN_KEYS as _YARN_KEYS,
                            ConfigError, check as _check, choice as _choice, dict_or_none as _dict_or_none,
                            dtype_of, is_num as _is_num, plain, rope_scaling as _rope_scaling)
from .quant.config import QuantSpec, description_config, described_spec, read_description

__all__ = ["ConfigError", "DeepseekV3Config", "dtype_of", "refuse_unimplemented", "yarn_mscale"]


def yarn_mscale(scale, mscale=1.0):
    """YaRN attention magnitude correction: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


_HF, _RUN = True, False

# ----------------------------------------------------------------------------- the table of fields
# name: (default, check, is an HF config.json field).  HF defaults are the real DeepSeek-V3 671B
# config.json, except quantization_config (None: the defaults describe the bf16 model, not a checkpoint).
_FIELDS = {
    "vocab_size": (129280, _P, _HF),
    "hidden_size": (7168, _P, _HF),
    "intermediate_size": (18432, _P, _HF),
    "moe_intermediate_size": (2048, _P, _HF),
    "num_hidden_layers": (61, _P, _HF),
    "num_nextn_predict_layers": (1, _N0, _HF),
    "num_attention_heads": (128, _P, _HF),
    "num_key_value_heads": (None, _P_OR_NONE, _HF),  # None: = num_attention_heads (MLA)
    "n_shared_experts": (1, _N0, _HF),
    "n_routed_experts": (256, _P, _HF),
    "routed_scaling_factor": (2.5, _POS, _HF),
    "kv_lora_rank": (512, _P, _HF),
    "q_lora_rank": (1536, _P_OR_NONE, _HF),
    "qk_rope_head_dim": (64, _P, _HF),
    "v_head_dim": (128, _P, _HF),
    "qk_nope_head_dim": (128, _P, _HF),
    "topk_method": ("noaux_tc", _choice("noaux_tc", "greedy", "group_limited_greedy"), _HF),
    "n_group": (8, _P, _HF),
    "topk_group": (4, _P, _HF),
    "num_experts_per_tok": (8, _P, _HF),
    "moe_layer_freq": (1, _P, _HF),
    "first_k_dense_replace": (3, _N0, _HF),
    "norm_topk_prob": (True, _BOOL, _HF),
    "scoring_func": ("sigmoid", _choice("sigmoid", "softmax"), _HF),
    "hidden_act": ("silu", _choice("silu"), _HF),
    "max_position_embeddings": (163840, _P, _HF),
    "initializer_range": (0.02, _NONNEG, _HF),
    "rms_norm_eps": (1e-6, _POS, _HF),
    "rope_theta": (10000, _POS, _HF),
    "rope_scaling": ({"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "type": "yarn"}, _rope_scaling, _HF),
    "attention_bias": (False, _choice(False), _HF),
    "attention_dropout": (0.0, _check(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"), _HF),
    "tie_word_embeddings": (False, _BOOL, _HF),
    "bos_token_id": (0, _IDS, _HF),
    "eos_token_id": (1, _IDS, _HF),
    "pad_token_id": (1, _IDS, _HF),  # not in config.json; the tokenizer pads with EOS
    "quantization_config": (None, _dict_or_none, _HF),
    "aux_loss_alpha": (0.001, _NONNEG, _HF),
    "seq_aux": (True, _BOOL, _HF),
    "ep_size": (1, _P, _HF),
    "pretraining_tp": (1, _P, _HF),
    "use_cache": (True, _BOOL, _HF),
    # MindFormers runtime keys (stock generate / Trainer / build_model read or inject them)
    "batch_size": (1, _P, _RUN),
    "seq_length": (4096, _P, _RUN),
    "use_past": (False, _BOOL, _RUN),
    "is_dynamic": (False, _BOOL, _RUN),
    "num_blocks": (512, _P, _RUN),
    "block_size": (16, _P, _RUN),
    "compute_dtype": ("bfloat16", _DTYPE, _RUN),
    "param_init_type": ("bfloat16", _DTYPE, _RUN),
    "layernorm_compute_type": ("float32", _DTYPE, _RUN),
    "softmax_compute_type": ("float32", _DTYPE, _RUN),
    "rotary_dtype": ("float32", _DTYPE, _RUN),
    "router_dense_type": ("float32", _DTYPE, _RUN),
    "checkpoint_name_or_path": (None, _STR_OR_NONE, _RUN),
    "parallel_config": (None, _ANYTHING, _RUN),  # dict, TransformerOpParallelConfig or None: kept as given
    "repetition_penalty": (1.0, _POS, _RUN),
    "temperature": (1.0, _POS, _RUN),
    "max_decode_length": (1024, _P, _RUN),
    "top_k": (1, _N0, _RUN),
    "top_p": (1.0, _check(lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"), _RUN),
    "do_sample": (False, _BOOL, _RUN),
    "ignore_token_id": (-100, _INT, _RUN),
    "is_sample_acceleration": (False, _BOOL, _RUN),
    "mtp_loss_factor": (0.3, _NONNEG, _RUN),
    "num_speculative_tokens": (0, _N0, _RUN),  # MTP drafts per decode step (0: off; docs/en/generation.md)
    "bias_update_rate": (0.001, _NONNEG, _RUN),
    "seq_balance_loss_alpha": (0.0001, _NONNEG, _RUN),
    "return_extra_loss": (False, _BOOL, _RUN),
    "offset": (0, _ANYTHING, _RUN),  # pipeline-stage layer offsets (int or list), as upstream
    "dataset_config": (None, _ANYTHING, _RUN),  # injected by Trainer.train/finetune
    # injected by Trainer.train/finetune (None when the YAML has no top-level key)
    "calculate_per_token_loss": (False, _check(lambda v: v is None or isinstance(v, bool), "true, false or null"), _RUN),
    "disable_lazy_inline": (False, _BOOL, _RUN),  # set by Trainer when lazy inline is off
    "use_eod_attn_mask_compression": (False, _BOOL, _RUN),  # set by Trainer for compressed EOD masks
    "parallel_decoding_params": (None, _ANYTHING, _RUN),  # read by stock generate
    "pet_config": (None, _ANYTHING, _RUN),  # read by stock build_network (LoRA etc.)
}

# ----------------------------------------------------------------------------- the alias table
# other name -> field name, or (field name, value converter).  extend_method and
# aux_loss_types/aux_loss_factors combine two keys each and are handled in _upstream_pairs().
_ALIASES = {
    # upstream research/deepseek3 model_config names
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_position_embedding": "max_position_embeddings",
    "theta": "rope_theta",
    "mtp_depth": "num_nextn_predict_layers",
    "init_method_std": "initializer_range",
    "qkv_has_bias": "attention_bias",
    "scaling_factor": ("rope_scaling", lambda v: {"type": "yarn", **plain(v)} if isinstance(v, Mapping) else v),
    # MindFormers MoEConfig names (a moe_config block)
    "expert_num": "n_routed_experts",
    "num_experts_chosen": "num_experts_per_tok",
    "shared_expert_num": "n_shared_experts",
    "topk_bias_update_rate": "bias_update_rate",
    "balance_via_topk_bias": ("topk_method", lambda v: "noaux_tc" if v else "group_limited_greedy"),
    "use_gating_sigmoid": ("scoring_func", lambda v: "sigmoid" if v else "softmax"),
}

_ANY = object()
# Accepted keys with no effect here: key -> (why, the only value accepted, or _ANY).
_IGNORED = {key: (why, _ANY) for why, keys in {
    "MindFormers / transformers bookkeeping": ("type", "auto_register", "model_type", "_attn_implementation_autoset"),
    "kernels are chosen by mindformers_dsv3.kernels": (
        "use_flash_attention", "use_fused_rope", "use_fused_swiglu", "use_gmm", "use_fused_ops_topkrouter",
        "use_fused_ops_permute", "enable_gmm_safe_tokens"),
    "weights keep the checkpoint layout": ("qkv_concat", "ffn_concat"),
    "intermediate sizes are given explicitly": ("multiple_of",),
    "one dropless router (DeepSeek-V3 routing)": ("routing_policy", "capacity_factor", "callback_moe_droprate"),
    "TopkRouterV1 loss; use aux_loss_types/aux_loss_factors": ("aux_loss_factor",),
    "the parallel layout comes from parallel_config": (
        "expert_group_size", "expert_model_parallel", "ep_extend_tp", "comp_comm_parallel",
        "comp_comm_parallel_degree", "fine_grain_interleave", "input_sliced_sig"),
}.items() for key in keys}
_IGNORED["rope_interleave"] = ("checkpoint RoPE rows are interleaved; the loader handles it", True)
_IGNORED["z_loss_factor"] = ("router z-loss is not implemented", 0.0)
for _key in ("quantize", "mla_quantize"):   # msModelSlim config.json markers: the description file is read instead
    _IGNORED[_key] = ("msModelSlim marker; quant_model_description*.json sets quantization_config", _ANY)
# Stored verbatim: PretrainedConfig's own keys (handed to its __init__) and HF metadata
# (newer transformers write "dtype" for "torch_dtype"; it is stored as torch_dtype).
_BASE_KEYS = ("name_or_path", "_name_or_path", "_commit_hash", "pretrained_model_dir", "mindformers_version",
              "tokenizer_class", "architectures", "is_encoder_decoder", "quantization")
_PASSTHROUGH = _BASE_KEYS + ("auto_map", "transformers_version", "torch_dtype", "dtype")
# Derived keys transformers writes into config.json: accepted when consistent, then dropped.
_DERIVED = {"qk_head_dim": lambda f: f("qk_nope_head_dim") + f("qk_rope_head_dim"),
            "head_dim": lambda f: f("qk_rope_head_dim")}
_KNOWN = sorted(set(_FIELDS) | set(_ALIASES) | set(_IGNORED) | set(_PASSTHROUGH) | set(_DERIVED)
                | {"moe_config", "extend_method", "aux_loss_types", "aux_loss_factors"})


def _upstream_pairs(kw, where):
    """Turn extend_method + scaling_factor, aux_loss_types + aux_loss_factors into field keys (in place)."""
    if "extend_method" in kw:
        method, factors = kw.pop("extend_method"), kw.get("scaling_factor")
        if method in (None, "None"):
            if factors is not None:
                raise ConfigError(f"{where}scaling_factor: given, but extend_method is {method!r}; use 'YARN'")
            kw.pop("scaling_factor", None)
            kw["rope_scaling"] = None
        elif str(method).upper() != "YARN":
            raise ConfigError(f"{where}extend_method={method!r} is not supported; use 'YARN' or 'None'")
        elif not isinstance(factors, Mapping):
            raise ConfigError(f"{where}scaling_factor: extend_method 'YARN' needs a dict of {', '.join(_YARN_KEYS)}")
    if "aux_loss_types" in kw or "aux_loss_factors" in kw:
        types, factors = list(kw.pop("aux_loss_types", None) or []), list(kw.pop("aux_loss_factors", None) or [])
        if len(types) != len(factors):
            raise ConfigError(f"{where}aux_loss_types={types} and aux_loss_factors={factors} differ in length")
        for kind, factor in zip(types, factors):
            if kind != "expert":
                raise ConfigError(f"{where}aux_loss_types: {kind!r} is not supported (only 'expert', "
                                  "the sequence-wise balance loss)")
            kw["seq_balance_loss_alpha"] = factor


def _same(value, default):
    """Equality with a MoEConfig default: 1 differs from True; 'float32' matches mindspore.float32."""
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    return value == default or (isinstance(value, str) != isinstance(default, str)
                                and str(value).lower() == str(default).lower())


def _moe_items(moe):
    """(given, filled) settings of a moe_config.  A partial dict is given in full.  A MoEConfig object, or a
    complete MoEConfig dict (MindFormerConfig's template fills a top-level moe_config with every default),
    is given by its fields that differ from a fresh MoEConfig; its fields equal to a MoEConfig default are
    `filled`: MindFormers wrote them in, or the user did, and the two cannot be told apart (see
    ``_check_filled``).  A moe_config whose every field is a default (what Trainer injects when the YAML
    has none) gives nothing."""
    if moe is None:
        return {}, {}
    if not isinstance(moe, Mapping) and not hasattr(moe, "to_dict"):
        raise ConfigError(f"moe_config={moe!r} must be a dict or a MindFormers MoEConfig")
    default = MoEConfig().to_dict()
    template = _TemplateMoEConfig.apply(None)   # the YAML template's defaults differ in a few keys
    items = dict(moe) if isinstance(moe, Mapping) else moe.to_dict()
    if isinstance(moe, Mapping) and not set(default) <= set(items):
        return items, {}
    given = {k: v for k, v in items.items()
             if not any(k in d and _same(v, d[k]) for d in (default, template))}
    if not given:
        return {}, {}
    return given, {k: v for k, v in items.items() if k not in given}


def _check_filled(filled, fields):
    """A value of a filled moe_config equal to MindFormers' default is never dropped silently: it agrees with
    what the config uses, or another key sets the same field (model_config, or a non-default moe_config
    value: they take precedence), or it is refused, naming the key and how to say it unambiguously."""
    for key, value in filled.items():
        target = _ALIASES.get(key, key if key in _FIELDS else None)
        if target is None:   # a MoEConfig knob with no field here (ignored keys, loss pairs left None)
            continue
        name, mapped = (target, value) if isinstance(target, str) else (target[0], target[1](value))
        default = _FIELDS[name][0]
        if name in fields or _same(mapped, default):
            continue
        raise ConfigError(
            f"moe_config.{key}={value!r} equals MindFormers' default, which MindFormers also writes into a "
            f"top-level moe_config for every key the YAML leaves out, so it cannot be told from an unset key; "
            f"it would set {name}={mapped!r} instead of the default {default!r}: set {name} in model_config")


def _canonical(kwargs):
    """Resolve aliases; return ({field: checked value}, {passthrough key: value}).  Never mutates kwargs."""
    kw = dict(kwargs)
    moe_given, moe_filled = _moe_items(kw.pop("moe_config", None))
    sources = [("", kw), ("moe_config.", moe_given)]
    fields, origin, extra, derived = {}, {}, {}, {}
    for where, items in sources:
        _upstream_pairs(items, where)
        for key, value in items.items():
            label = where + key
            if key in _ALIASES:
                target = _ALIASES[key]
                name, value = (target, value) if isinstance(target, str) else (target[0], target[1](value))
            elif key in _FIELDS:
                name = key
            elif key in _IGNORED:
                why, only = _IGNORED[key]
                if only is not _ANY and value != only:
                    raise ConfigError(f"{label}={value!r} is not supported here ({why}); use {only!r} or drop it")
                continue
            elif key in _PASSTHROUGH:
                extra["torch_dtype" if key == "dtype" else key] = value
                continue
            elif key in _DERIVED:
                derived[label] = (key, value)
                continue
            else:
                close = difflib.get_close_matches(key, _KNOWN, n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"{label}: unknown DeepseekV3Config key{hint}")
            value = _FIELDS[name][1](label, value)
            if name in fields and fields[name] != value:
                raise ConfigError(f"{name}: conflicting values {origin[name]}={fields[name]!r} and {label}={value!r}")
            fields[name], origin[name] = value, label
    _check_filled(moe_filled, fields)
    get = lambda n: fields.get(n, _FIELDS[n][0])  # noqa: E731
    for label, (key, value) in derived.items():
        if value != _DERIVED[key](get):
            raise ConfigError(f"{label}={value!r} does not match the other fields (expected {_DERIVED[key](get)})")
    return fields, extra


def _default_seq_length(fields):
    """min(4096, max_position_embeddings), rounded down to a multiple of block_size under use_past."""
    get = lambda n: fields.get(n, _FIELDS[n][0])  # noqa: E731
    length = min(_FIELDS["seq_length"][0], _P("max_position_embeddings", get("max_position_embeddings")))
    block = _P("block_size", get("block_size"))
    return max(block, length - length % block) if get("use_past") is True else length


def _speculative_rules(config):
    """num_speculative_tokens drafts with the MTP layer and verifies through the latent cache."""
    k = config.num_speculative_tokens
    return [
        (not k or config.num_nextn_predict_layers > 0,
         f"num_speculative_tokens={k} needs the MTP layer, but num_nextn_predict_layers=0 (a checkpoint without "
         "MTP weights): set model_config.num_speculative_tokens: 0, or load a checkpoint with its MTP layer"),
        (not k or config.use_past,
         f"num_speculative_tokens={k} needs use_past: True (drafts are verified through the latent KV cache): "
         "set model_config.use_past: True, or model_config.num_speculative_tokens: 0"),
    ]


def refuse_unimplemented(config):
    """Raise ConfigError, naming the key, when ``config`` (a DeepseekV3Config or a ``model_config``
    mapping) asks for what the network cannot do yet. The one check of this kind: the model build
    and ``dsv3-plan`` both call it, so both refuse with the same message."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    old, qc = get("quantization"), get("quantization_config")
    # stock build_config copies quantization_config.quant_method into `quantization`: that one is accepted
    if old and not (isinstance(old, str) and isinstance(qc, Mapping) and old == qc.get("quant_method")):
        raise ConfigError("quantization: the old W8A8 block is not read; write model_config.quantization_config "
                          "(quant_method: ptq, the upstream block; see docs/en/quantization.md)")


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class DeepseekV3Config(PretrainedConfig):
    """DeepSeek-V3 / R1 config: HF config.json fields plus the MindFormers runtime keys (see ``_FIELDS``)."""

    model_type = "deepseek_v3"

    def __init__(self, **kwargs):
        fields, extra = _canonical(kwargs)
        base = {k: extra.pop(k) for k in _BASE_KEYS if k in extra}
        super().__init__(**base)
        for name, (default, _, _) in _FIELDS.items():
            value = fields.get(name, default)
            setattr(self, name, value if name == "parallel_config" else copy.deepcopy(value))
        for key, value in extra.items():
            setattr(self, key, copy.deepcopy(value))
        self.validate()

    # -- construction from / to HF config.json
    @classmethod
    def from_hf_config(cls, source, **overrides):
        """From an HF config.json: a folder holding it, its path, or its dict.  ``overrides`` win."""
        if isinstance(source, Mapping):
            hf = source
        else:
            path = os.fspath(source)
            path = os.path.join(path, "config.json") if os.path.isdir(path) else path
            with open(path, "r", encoding="utf-8") as f:
                hf = json.load(f)
        fields, extra = _canonical(hf)
        if not isinstance(source, Mapping) and os.path.isdir(os.fspath(source)):
            desc_path, desc = read_description(os.fspath(source))
            if desc is not None:   # msModelSlim W8A8 folder: the description sets the scheme tensor by tensor
                fields["quantization_config"] = description_config(desc, desc_path)
        over_fields, over_extra = _canonical(overrides)
        merged = {**extra, **fields, **over_extra, **over_fields}
        if "seq_length" not in merged:   # the 4096 default must not exceed a short model's positions
            merged["seq_length"] = _default_seq_length(merged)
        return cls(**merged)

    def to_hf_dict(self):
        """The HF config.json dict (transformers' DeepseekV3Config reads it)."""
        out = {"architectures": copy.deepcopy(self.__dict__.get("architectures") or ["DeepseekV3ForCausalLM"]),
               "model_type": self.model_type,
               "torch_dtype": self.__dict__.get("torch_dtype") or "bfloat16"}
        if self.__dict__.get("transformers_version"):
            out["transformers_version"] = self.__dict__["transformers_version"]
        for name, (_, _, is_hf) in _FIELDS.items():
            if is_hf and not (name == "quantization_config" and self.quantization_config is None):
                out[name] = copy.deepcopy(getattr(self, name))
        return out

    # -- derived, read-only
    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self):
        scale = self.qk_head_dim ** -0.5
        rope = self.rope_scaling
        if rope and rope.get("type", rope.get("rope_type")) == "yarn" and rope.get("mscale_all_dim"):
            scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
        return scale

    def is_moe_layer(self, i):
        """Whether layer ``i`` (0-based; MTP layers continue the numbering) has routed experts."""
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def num_dense_layers(self):
        return sum(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # -- validation
    def validate(self):
        """Check every field and the cross-field rules; normalises dtype names.  Raises ConfigError."""
        for name, (_, check, _) in _FIELDS.items():
            setattr(self, name, check(name, getattr(self, name)))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        g, experts, layers, heads = self.n_group, self.n_routed_experts, self.num_hidden_layers, self.num_attention_heads
        rules = [
            (experts % g == 0, f"n_routed_experts={experts} must be divisible by n_group={g}"),
            (self.topk_group <= g, f"topk_group={self.topk_group} must be <= n_group={g}"),
            (self.num_experts_per_tok <= self.topk_group * (experts // g),
             f"num_experts_per_tok={self.num_experts_per_tok} must be <= topk_group * (n_routed_experts // n_group)"
             f" = {self.topk_group * (experts // g)}"),
            (self.first_k_dense_replace <= layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be <= num_hidden_layers={layers}"),
            (self.num_key_value_heads == heads,
             f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads={heads} (MLA)"),
            (not self.use_past or self.seq_length % self.block_size == 0,
             f"seq_length={self.seq_length} must be a multiple of block_size={self.block_size} when use_past"),
            (self.seq_length <= self.max_position_embeddings,
             f"seq_length={self.seq_length} exceeds max_position_embeddings={self.max_position_embeddings}"),
        ]
        rules += _speculative_rules(self)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(self, name)
            outside = [i for i in (ids if isinstance(ids, (list, tuple)) else [ids]) if i is not None
                       and i >= self.vocab_size]
            rules.append((not outside, f"{name}={ids!r} is outside the vocabulary: ids run from 0 to "
                                       f"vocab_size - 1 = {self.vocab_size - 1}"))
        for ok, message in rules:
            if not ok:
                raise ConfigError(message)
        self.quant_spec()   # refuses a bad quantization_config, naming the key
        return self

    def quant_spec(self):
        """The W8A8 ``QuantSpec`` of ``quantization_config`` (quant/config.py), or None (not W8A8). With an
        msModelSlim ``checkpoint_name_or_path`` the folder's description decides, tensor by tensor, once
        the block agrees with it on every module's scheme (refused naming the module otherwise)."""
        spec = QuantSpec.from_config(self.quantization_config, self.num_hidden_layers)
        folder = self.checkpoint_name_or_path
        if spec is not None and spec.source == "ptq" and folder and os.path.isdir(folder):
            described, path = described_spec(folder, self.num_hidden_layers)
            if described is not None:
                spec = spec.agreeing(described, [self._quantizable(i) for i in range(self.num_hidden_layers)], path)
        return spec

    def _quantizable(self, i):
        """The quantizable modules decoder layer ``i`` has (quant/config.py LAYER_MODULES names)."""
        attn = ["self_attn.q_a_proj", "self_attn.q_b_proj"] if self.q_lora_rank else ["self_attn.q_proj"]
        attn += ["self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"]
        if not self.is_moe_layer(i):
            return attn + ["mlp.gate_up_proj", "mlp.down_proj"]
        shared = ["mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj"] if self.n_shared_experts else []
        return attn + shared + ["mlp.experts"]

    # -- MindFormers serialisation hooks: moe_config is input-only (absorbed into the fields above),
    # parallel_config may be a dict, an object or None.
    def _to_dict_helper(self, output):
        output.pop("moe_config", None)
        if hasattr(output.get("parallel_config"), "to_dict"):
            output["parallel_config"] = output["parallel_config"].to_dict()

    def _to_diff_dict_helper(self, serializable_config_dict):
        serializable_config_dict.pop("moe_config", None)
        if hasattr(self.parallel_config, "to_diff_dict"):
            diff = self.parallel_config.to_diff_dict()
            if diff:
                serializable_config_dict["parallel_config"] = diff
            else:
                serializable_config_dict.pop("parallel_config", None)
