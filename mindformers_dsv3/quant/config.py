"""W8A8 quantization settings: ``QuantSpec``, the one answer to "how is this module quantized?".

MindSpore-free (the planner and the tools call it on a plain dict). ``model_config.quantization_config``
takes one of three forms, each parsed here and nowhere else:

* upstream MindFormers / golden-stick (``quant_method: ptq``): ``weight_dtype``, ``activation_dtype``,
  ``kvcache_dtype``, ``outliers_suppression``, ``modules_to_not_convert``, ``algorithm_args``,
  ``act_quant_granularity``, ``weight_quant_granularity`` and ``layer_policies`` (regex -> the same keys,
  the first matching regex wins); module names in HF form (``self_attn.q_a_proj``, ``mlp.gate_proj``) or
  upstream form (``attention.q2l_proj``, ``feed_forward.w1``);
* msModelSlim (``quant_method: msmodelslim``): ``modules`` (HF module -> ``W8A8`` | ``W8A8_DYNAMIC`` |
  ``FLOAT``) and ``norm_bias`` (HF norm names), what ``description_config`` makes of a
  ``quant_model_description*.json`` (``DeepseekV3Config.from_hf_config(folder)`` calls it);
* an HF FP8 block (``quant_method: fp8``): a checkpoint format, not W8A8 (``QuantSpec.from_config`` -> None).

Schemes (docs/en/quantization.md): ``W8A8`` static per-tensor asymmetric activations, ``W8A8_DYNAMIC``
per-token symmetric activations, both int8 weights with per-channel scales; ``FLOAT`` unquantized.
"""
import re
from collections.abc import Mapping

__all__ = ["ConfigError", "QuantSpec", "layer_schemes", "LAYER_MODULES", "SCHEMES", "W8A8", "W8A8_DYNAMIC", "FLOAT", "description_config",
           "read_description", "upstream_name", "QUANTIZABLE", "NORM_BIAS_NORMS"]


class ConfigError(ValueError):
    """A bad config value; the message starts with the offending key."""


W8A8, W8A8_DYNAMIC, FLOAT = "W8A8", "W8A8_DYNAMIC", "FLOAT"
SCHEMES = (W8A8, W8A8_DYNAMIC, FLOAT)

# HF sub-module of a decoder layer -> upstream research/deepseek3 name (the quantizable Linears).
_UPSTREAM = {
    "self_attn.q_a_proj": "attention.q2l_proj", "self_attn.kv_a_proj_with_mqa": "attention.kv2l",
    "self_attn.q_b_proj": "attention.l2q_proj", "self_attn.kv_b_proj": "attention.lkv2kv",
    "self_attn.o_proj": "attention.wo", "self_attn.q_proj": "attention.q_proj",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "mlp.shared_experts.gate_proj": "feed_forward.shared_experts.w1",
    "mlp.shared_experts.up_proj": "feed_forward.shared_experts.w3",
    "mlp.shared_experts.down_proj": "feed_forward.shared_experts.w2",
    "mlp.experts.gate_proj": "feed_forward.routed_experts.ffn.w1",
    "mlp.experts.up_proj": "feed_forward.routed_experts.ffn.w3",
    "mlp.experts.down_proj": "feed_forward.routed_experts.ffn.w2",
}
QUANTIZABLE = tuple(_UPSTREAM)
# kv_b_proj is absorbed into the query and the output at decode: it stays FLOAT.
_FLOAT_ONLY = ("self_attn.kv_b_proj",)
_FUSED = {"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.shared_experts.gate_up_proj": ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
          "mlp.experts": ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")}
# norms that may carry a smoothing shift (bias), and the Linears that read them
NORM_BIAS_NORMS = {"input_layernorm": ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
                   "self_attn.q_a_layernorm": ("self_attn.q_b_proj",)}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")

_PTQ_KEYS = ("quant_method", "weight_dtype", "activation_dtype", "kvcache_dtype", "outliers_suppression",
             "modules_to_not_convert", "algorithm_args", "layer_policies", "act_quant_granularity",
             "weight_quant_granularity")
_POLICY_KEYS = tuple(k for k in _PTQ_KEYS if k != "layer_policies")
_SUPPRESSION = {"none": "none", "smooth": "smooth", "smoothquant": "smooth", "outlier-suppression+": "osp",
                "osp": "osp", "awq": "awq"}
_MSMODELSLIM_KEYS = ("quant_method", "model_quant_type", "modules", "norm_bias", "description_file")


def _none(value):
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "", "null"))


def upstream_name(hf_module):
    """``model.layers.3.self_attn.q_a_proj`` -> ``model.layers.3.attention.q2l_proj`` (None: no upstream form)."""
    m = _LAYER.match(hf_module)
    if not m or m.group(2) not in _UPSTREAM:
        return None
    return f"model.layers.{m.group(1)}.{_UPSTREAM[m.group(2)]}"


def _policy(key, raw, top=None):
    """Check one policy dict (the top level or a layer_policies entry); returns it normalised."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}={raw!r} must be a dict")
    allowed = _PTQ_KEYS if top is None else _POLICY_KEYS
    for name in raw:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}: unknown key; known: {', '.join(allowed)}")
    p = dict(top or {"weight_dtype": "int8", "activation_dtype": "int8", "kvcache_dtype": "none",
                     "outliers_suppression": "none", "modules_to_not_convert": [], "algorithm_args": {},
                     "act_quant_granularity": "per_tensor", "weight_quant_granularity": "per_channel"})
    p.pop("layer_policies", None)
    p.update({k: v for k, v in raw.items() if k != "layer_policies"})
    if str(p.get("quant_method", "ptq")).lower() != "ptq":
        raise ConfigError(f"{key}.quant_method={p['quant_method']!r} is not supported; use 'ptq'")
    weight = "none" if _none(p["weight_dtype"]) else str(p["weight_dtype"]).lower()
    act = "none" if _none(p["activation_dtype"]) else str(p["activation_dtype"]).lower()
    if weight not in ("int8", "none"):
        raise ConfigError(f"{key}.weight_dtype={p['weight_dtype']!r} is not supported; use 'int8' or 'none'")
    if act not in ("int8", "none"):
        raise ConfigError(f"{key}.activation_dtype={p['activation_dtype']!r} is not supported; use 'int8' or 'none'")
    if weight == "int8" and act == "none":
        raise ConfigError(f"{key}.activation_dtype: weight-only int8 (A16W8) is not implemented; use 'int8'")
    if weight == "none" and act == "int8":
        raise ConfigError(f"{key}: activation_dtype 'int8' with weight_dtype 'none' is contradictory")
    if not _none(p["kvcache_dtype"]):
        raise ConfigError(f"{key}.kvcache_dtype={p['kvcache_dtype']!r}: an int8 latent cache is not implemented; "
                          "use 'none'")
    supp = "none" if _none(p["outliers_suppression"]) else _SUPPRESSION.get(str(p["outliers_suppression"]).lower())
    if supp is None or supp == "awq":
        raise ConfigError(f"{key}.outliers_suppression={p['outliers_suppression']!r} is not supported; use one "
                          "of 'none', 'smooth', 'outlier-suppression+'")
    act_g = str(p["act_quant_granularity"]).lower()
    if act_g not in ("per_tensor", "per_token"):
        raise ConfigError(f"{key}.act_quant_granularity={p['act_quant_granularity']!r} is not supported; "
                          "use 'per_tensor' (static) or 'per_token' (dynamic)")
    if str(p["weight_quant_granularity"]).lower() != "per_channel":
        raise ConfigError(f"{key}.weight_quant_granularity={p['weight_quant_granularity']!r} is not supported; "
                          "use 'per_channel'")
    if act_g == "per_token" and supp == "osp":
        raise ConfigError(f"{key}: outliers_suppression 'outlier-suppression+' with act_quant_granularity "
                          "'per_token' is contradictory (the shift is folded into a static zero point)")
    skip = p["modules_to_not_convert"] or []
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"{key}.modules_to_not_convert={skip!r} must be a list of module names")
    if not isinstance(p["algorithm_args"] or {}, Mapping):
        raise ConfigError(f"{key}.algorithm_args={p['algorithm_args']!r} must be a dict")
    scheme = FLOAT if weight == "none" else (W8A8_DYNAMIC if act_g == "per_token" else W8A8)
    return {**p, "scheme": scheme, "suppression": supp, "skip": [s.strip(".") for s in skip]}


def _named(names, hf_module):
    """Whether a modules_to_not_convert entry names the module (last part, or a dotted tail, HF or upstream)."""
    forms = [hf_module] + [n for n in (upstream_name(hf_module),) if n]
    for form in forms:
        for name in names:
            if form == name or form.endswith("." + name):
                return True
    return False


class QuantSpec:
    """Scheme of every HF module of a W8A8 model; built by ``from_config``. ``scheme(name)`` and
    ``norm_bias(name)`` answer; ``layer_index`` >= ``num_hidden_layers`` (MTP) is FLOAT unless a
    description names it."""

    def __init__(self, num_hidden_layers=None, policies=None, modules=None, norm_biases=(), source="ptq"):
        self.num_hidden_layers = num_hidden_layers
        self.source = source
        self._policies = policies          # (top policy, [(regex, policy), ...]) for the ptq form
        self._modules = modules            # {hf module: scheme} for the msmodelslim form
        self._norm_biases = frozenset(norm_biases)
        self._cache = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, quantization_config, num_hidden_layers=None, key="quantization_config"):
        """QuantSpec of a ``quantization_config`` dict, or None (absent, or an FP8 checkpoint block)."""
        qc = quantization_config
        if qc is None:
            return None
        if not isinstance(qc, Mapping):
            raise ConfigError(f"{key}={qc!r} must be a dict")
        method = str(qc.get("quant_method", "")).lower()
        if method == "fp8":
            return None
        if method == "msmodelslim":
            return cls._from_msmodelslim(qc, num_hidden_layers, key)
        if method != "ptq":
            raise ConfigError(f"{key}.quant_method={qc.get('quant_method')!r} is not supported; use 'ptq' "
                              "(W8A8, the upstream golden-stick block), 'msmodelslim' or 'fp8'")
        top = _policy(key, qc)
        rules = []
        raw = qc.get("layer_policies") or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key}.layer_policies={raw!r} must be a dict of regex -> policy")
        for pattern, policy in raw.items():
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{key}.layer_policies[{pattern!r}]: not a regular expression ({err})") from None
            rules.append((regex, _policy(f"{key}.layer_policies[{pattern!r}]", policy, top)))
        spec = cls(num_hidden_layers, policies=(top, rules), source="ptq")
        spec._check_fused(range(num_hidden_layers or 1), key)
        return spec

    @classmethod
    def _from_msmodelslim(cls, qc, num_hidden_layers, key):
        for name in qc:
            if name not in _MSMODELSLIM_KEYS:
                raise ConfigError(f"{key}.{name}: unknown key; known: {', '.join(_MSMODELSLIM_KEYS)}")
        modules = qc.get("modules") or {}
        if not isinstance(modules, Mapping):
            raise ConfigError(f"{key}.modules must be a dict of HF module name -> scheme")
        checked = {}
        for module, scheme in modules.items():
            checked[module] = _check_module_scheme(f"{key}.modules[{module!r}]", module, scheme)
        biases = list(qc.get("norm_bias") or [])
        for norm in biases:
            _check_norm_bias(f"{key}.norm_bias", norm)
        spec = cls(num_hidden_layers, modules=checked, norm_biases=biases, source="msmodelslim")
        spec._check_fused(sorted({int(_LAYER.match(m).group(1)) for m in checked if _LAYER.match(m)}), key)
        return spec

    def _check_fused(self, layers, key):
        """Fused parts (gate|up, the three expert matrices) must share a scheme in every layer."""
        for layer in layers:
            for fused in _FUSED:
                self.scheme(f"model.layers.{layer}.{fused}", key=key)

    # ------------------------------------------------------------------ queries
    def _layer(self, hf_module):
        m = _LAYER.match(hf_module)
        return (int(m.group(1)), m.group(2)) if m else (None, None)

    def _ptq_scheme(self, hf_module):
        layer, sub = self._layer(hf_module)
        if sub not in QUANTIZABLE:
            return FLOAT
        if self.num_hidden_layers is not None and layer >= self.num_hidden_layers:
            return FLOAT                                   # MTP layers: FLOAT unless a description says so
        top, rules = self._policies
        policy = top
        forms = [hf_module, upstream_name(hf_module)]
        for regex, candidate in rules:
            if any(f and regex.fullmatch(f) for f in forms):
                policy = candidate
                break
        if sub in _FLOAT_ONLY or _named(policy["skip"], hf_module):
            return FLOAT
        return policy["scheme"]

    def _one(self, hf_module):
        if self._modules is None:
            return self._ptq_scheme(hf_module)
        return self._modules.get(hf_module, FLOAT)

    def scheme(self, hf_module, key="quantization_config"):
        """``W8A8`` | ``W8A8_DYNAMIC`` | ``FLOAT`` of an HF module (``model.layers.3.self_attn.q_a_proj``,
        ``model.layers.3.mlp.experts`` for all routed experts, ``...mlp.gate_up_proj`` for the fused
        gate|up). Raises ConfigError when parts of a fused module differ."""
        if hf_module in self._cache:
            return self._cache[hf_module]
        layer, sub = self._layer(hf_module)
        if sub in _FUSED:
            parts = {p: self._one(f"model.layers.{layer}.{p}") for p in _FUSED[sub]}
            if len(set(parts.values())) > 1:
                raise ConfigError(f"{key}: {hf_module} parts have different schemes {parts}; they are fused "
                                  "here, so they must share one")
            result = next(iter(parts.values()))
            if sub == "mlp.experts" and result == W8A8:
                raise ConfigError(f"{key}.act_quant_granularity: {hf_module} would be W8A8 static; routed "
                                  "experts are W8A8_DYNAMIC only here: give them 'per_token' (layer_policies "
                                  "'.*\\.feed_forward\\..*' or '.*\\.mlp\\..*', as docs/en/quantization.md)")
        else:
            result = self._one(hf_module)
        self._cache[hf_module] = result
        return result

    def norm_bias(self, hf_norm):
        """Whether a norm (``model.layers.3.input_layernorm``, ``...self_attn.q_a_layernorm``) carries a
        smoothing shift: rmsnorm(x) * w + bias. ptq form: outlier-suppression+ on a static reader."""
        if self._modules is not None:
            return hf_norm in self._norm_biases
        layer, sub = self._layer(hf_norm)
        if sub not in NORM_BIAS_NORMS:
            return False
        if self.num_hidden_layers is not None and layer >= self.num_hidden_layers:
            return False
        top, rules = self._policies
        for reader in NORM_BIAS_NORMS[sub]:
            name = f"model.layers.{layer}.{reader}"
            policy = next((p for r, p in rules if any(f and r.fullmatch(f) for f in (name, upstream_name(name)))),
                          top)
            if self.scheme(name) == W8A8 and policy["suppression"] == "osp":
                return True
        return False

    def agreeing(self, described, layer_modules, file):
        """`described` (the spec of a checkpoint's description file) when every module of the model
        (`layer_modules`: per decoder layer, the LAYER_MODULES it has) has the same scheme in both; the
        description also decides the norm biases and the MTP layers. Refuses naming the module and the
        file otherwise."""
        for i, modules in enumerate(layer_modules):
            for module in modules:
                name = f"model.layers.{i}.{module}"
                mine, theirs = self.scheme(name), described.scheme(name)
                if mine != theirs:
                    raise ConfigError(f"quantization_config: {name} is {mine} here but {theirs} in {file}; "
                                      "make the block agree with the checkpoint (or drop the block: "
                                      "from_hf_config reads the description)")
        return described

    def any_quantized(self, num_layers):
        """Whether any module of layers [0, num_layers) is quantized."""
        return any(self.scheme(f"model.layers.{i}.{s}") != FLOAT for i in range(num_layers) for s in QUANTIZABLE)


# the modules of one decoder layer as the model builds them (gate|up fused, routed experts as one)
LAYER_MODULES = ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_b_proj",
                 "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
                 "mlp.shared_experts.gate_up_proj", "mlp.shared_experts.down_proj", "mlp.experts")


def layer_schemes(spec, layer_idx):
    """{module of LAYER_MODULES: scheme, norm of NORM_BIAS_NORMS: has a bias} of decoder layer `layer_idx`
    (every module FLOAT, no bias, when `spec` is None)."""
    prefix = f"model.layers.{layer_idx}."
    out = {m: spec.scheme(prefix + m) if spec is not None else FLOAT for m in LAYER_MODULES}
    out.update({n: bool(spec is not None and spec.norm_bias(prefix + n)) for n in NORM_BIAS_NORMS})
    return out


def _check_module_scheme(key, module, scheme):
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}={scheme!r} is not supported; use one of {', '.join(SCHEMES)}")
    _, sub = (lambda m: (m.group(1), m.group(2)) if m else (None, None))(_LAYER.match(module))
    if scheme != FLOAT and sub not in QUANTIZABLE and sub not in _FUSED:
        raise ConfigError(f"{key}={scheme!r}: only attention and MLP projections are quantized here "
                          f"({module} must be FLOAT)")
    if scheme != FLOAT and sub in _FLOAT_ONLY:
        raise ConfigError(f"{key}={scheme!r}: kv_b_proj is absorbed into attention at decode and must be FLOAT")
    return scheme


def _check_norm_bias(key, norm):
    m = _LAYER.match(str(norm))
    if not m or m.group(2) not in NORM_BIAS_NORMS:
        raise ConfigError(f"{key}: {norm!r} cannot carry a bias; only input_layernorm and "
                          "self_attn.q_a_layernorm take a smoothing shift")


def description_config(description, file="quant_model_description.json"):
    """The ``quantization_config`` (msmodelslim form) of an msModelSlim description map (tensor name ->
    scheme), module by module. Refuses, naming the tensor and the file: an unknown scheme, a quantized
    tensor of a module that cannot be quantized, routed experts of one layer with different schemes
    or static, a bias on a norm that cannot take one."""
    if not isinstance(description, Mapping):
        raise ConfigError(f"{file}: must hold a JSON object of tensor name -> scheme")
    modules, experts, biases = {}, {}, []
    for tensor, scheme in description.items():
        if not isinstance(tensor, str) or "." not in tensor:
            continue                                       # top-level keys: model_quant_type, version, ...
        if isinstance(scheme, str) and scheme.upper() in SCHEMES:
            scheme = scheme.upper()
        elif isinstance(scheme, str):
            raise ConfigError(f"{file}: tensor '{tensor}': scheme {scheme!r} is not supported; use one of "
                              f"{', '.join(SCHEMES)}")
        else:
            continue
        if ".module." in tensor:
            continue                                       # older savers' duplicates of smoothed norms
        module, leaf = tensor.rsplit(".", 1)
        if leaf == "bias" and _LAYER.match(module) and _LAYER.match(module).group(2).endswith("layernorm"):
            _check_norm_bias(f"{file}: tensor '{tensor}'", module)
            biases.append(module)
            continue
        if leaf != "weight":
            continue
        em = _EXPERT.match(module)
        if em:
            layer_experts = f"model.layers.{em.group(1)}.mlp.experts"
            if experts.setdefault(layer_experts, scheme) != scheme:
                raise ConfigError(f"{file}: tensor '{tensor}' is {scheme} but other routed experts of layer "
                                  f"{em.group(1)} are {experts[layer_experts]}; all routed experts of a layer "
                                  "share one scheme")
            if scheme == W8A8:
                raise ConfigError(f"{file}: tensor '{tensor}': routed experts are W8A8_DYNAMIC or FLOAT here")
            for part in ("gate_proj", "up_proj", "down_proj"):
                modules[f"{layer_experts}.{part}"] = scheme
            continue
        modules[module] = _check_module_scheme(f"{file}: tensor '{tensor}'", module, scheme)
    out = {"quant_method": "msmodelslim", "model_quant_type": str(description.get("model_quant_type", "")),
           "modules": {m: s for m, s in sorted(modules.items()) if s != FLOAT}, "norm_bias": sorted(biases)}
    QuantSpec.from_config(out, key=file)
    return out


_DESCRIBED = {}


def described_spec(folder, num_hidden_layers=None):
    """(QuantSpec of the folder's description file, its path), or (None, None) without one; cached per
    file version (size, mtime)."""
    import os
    try:
        names = [n for n in os.listdir(folder) if n.startswith("quant_model_description") and n.endswith(".json")]
    except OSError:
        return None, None
    if len(names) != 1:
        return (None, None) if not names else read_description(folder)   # more than one: refused there
    path = os.path.join(folder, names[0])
    info = os.stat(path)
    key = (path, info.st_size, info.st_mtime_ns, num_hidden_layers)
    if key not in _DESCRIBED:
        _, desc = read_description(folder)
        _DESCRIBED.clear()
        _DESCRIBED[key] = QuantSpec.from_config(description_config(desc, path), num_hidden_layers, key=path)
    return _DESCRIBED[key], path


def read_description(folder):
    """(path, map) of the one ``quant_model_description*.json`` in ``folder``, or (None, None)."""
    import json
    import os
    found = sorted(n for n in os.listdir(folder) if n.startswith("quant_model_description") and n.endswith(".json"))
    if not found:
        return None, None
    if len(found) > 1:
        raise ConfigError(f"{folder}: more than one description file ({', '.join(found)}); keep one")
    path = os.path.join(folder, found[0])
    try:
        with open(path, "r", encoding="utf-8") as f:
            return path, json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot be read as JSON ({err})") from None
