"""dsv3-quantize, the run: a float (BF16 / FP32) or FP8 HF folder -> an msModelSlim-layout W8A8 folder.

Streaming, layer by layer: only the calibration hidden states stay in memory between layers. Per decoder
layer: read its attention weights, run the float attention on the hidden states (calibrate.attention,
collecting the statistics), fold the smoothing, quantize and write the attention tensors; then the MLP one
expert at a time (read, run on the tokens routed to it, quantize, write, free). Each shard is one layer,
written through a temporary file and renamed (fsguard.atomic_write), its header planned before any value is
computed, so tensors go to disk as they are made. After each layer, the hidden states are saved beside it
(`calibration-hidden-LLLLL.npy`); both are recorded in the manifest (the dsv3-convert manifest format:
`dsv3-convert check OUT` verifies a finished folder). A rerun of the same command resumes after the last
recorded layer; a different command or input is refused. Every check on the input runs before the output
folder is touched; the input is only read.
"""
import hashlib
import json
import os
import signal
import time

import numpy as np

from mindformers_dsv3.checkpoint import fp8, names
from mindformers_dsv3.checkpoint.convert_plan import load_config
from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.fsguard import atomic_write, input_roots, open_regular
from mindformers_dsv3.checkpoint.hf_read import Reader
from mindformers_dsv3.checkpoint.safetensors_io import DTYPE_NAMES, DTYPES, open_checkpoint, write_index
from mindformers_dsv3.checkpoint.verify import (MANIFEST_FORMAT, MANIFEST_NAME, file_record, lock_output,
                                                remove_temporary, resume_state)
from mindformers_dsv3.quant import calibrate as cal
from mindformers_dsv3.quant import quantize as qz

SHARD = "quant_model_weight_w8a8_dynamic-{:05d}-of-{:05d}.safetensors"
INDEX = "quant_model_weight_w8a8_dynamic.safetensors.index.json"
DESCRIPTION = "quant_model_description.json"
HIDDEN = "calibration-hidden-{:05d}.npy"
AUX_MAX_BYTES = 64 << 20
ROWS_PER_STEP = 4  # calibration rows per attention call
_SKIP = {"config.json", "model.safetensors.index.json", MANIFEST_NAME, DESCRIPTION, INDEX}


# ----------------------------------------------------------------------------- input
def check_input(ckpt, config, include_mtp, block):
    """The loader's checks (names, shapes, float or FP8 dtypes, FP8 scales and their values); returns the
    {HF name: shape} the run reads."""
    shapes = names.hf_shapes(config, include_mtp=True)
    required = names.hf_shapes(config, include_mtp=include_mtp)
    sfx = names.SCALE_SUFFIX
    ckpt.check_names(required, allowed=lambda n: n in shapes or (n.endswith(sfx) and n[:-len(sfx)] in shapes),
                     what="HF tensor")
    for name in required:
        sname = name + sfx
        scale = (ckpt.dtype(sname), ckpt.shape(sname)) if sname in ckpt else None
        names.check_tensor(name, ckpt.dtype(name), ckpt.shape(name), shapes[name], scale, block,
                           ckpt.file_of(name), ckpt.file_of(sname) if scale else None)
        if scale:
            fp8.check_scale_values(ckpt.read(sname), ckpt.file_of(sname), sname)
    return required


def _float_name(ckpt, name):
    """Safetensors dtype a FLOAT tensor is written in: its own when float, BF16 when FP8."""
    dt = ckpt.dtype(name)
    return "BF16" if dt == fp8.FP8 else DTYPE_NAMES[dt]


def _suffix(name):
    return name.split(".", 3)[3] if name.startswith("model.layers.") else name


# ----------------------------------------------------------------------------- plan
def plan_shards(ckpt, config, required, smooth):
    """[(file, kind, layer, [(name, dtype, shape, type)])]: globals, one shard per decoder layer, the MTP layers."""
    layers, mtp, glob = {}, {}, []
    for name in required:
        m = name.split(".")
        layer = int(m[2]) if name.startswith("model.layers.") else -1
        (glob if layer < 0 else mtp.setdefault(layer, []) if layer >= config.num_hidden_layers
         else layers.setdefault(layer, [])).append(name)
    shards = [("globals", -1, [(n, _float_name(ckpt, n), tuple(ckpt.shape(n)), qz.FLOAT) for n in sorted(glob)])]
    for layer in sorted(layers):
        prefix = f"model.layers.{layer}."
        fdt = {_suffix(n): _float_name(ckpt, n) for n in layers[layer]}
        shards.append(("layer", layer, qz.attention_plan(config, prefix, fdt, smooth)
                       + qz.mlp_plan(config, layer, prefix, fdt)))
    for layer in sorted(mtp):
        shards.append(("mtp", layer, [(n, _float_name(ckpt, n), tuple(ckpt.shape(n)), qz.FLOAT)
                                      for n in sorted(mtp[layer])]))
    return [(SHARD.format(i + 1, len(shards)), kind, layer, tensors) for i, (kind, layer, tensors) in enumerate(shards)]


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes a planned safetensors file: header first, then each tensor in plan order (checked)."""

    def __init__(self, fh, tensors, path):
        self.fh, self.tensors, self.path, self.next = fh, tensors, path, 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, _ in tensors:
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        fh.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name, array):
        want = self.tensors[self.next]
        array = np.ascontiguousarray(np.asarray(array).astype(DTYPES[want[1]], copy=False))
        if name != want[0] or tuple(array.shape) != tuple(want[2]):
            raise CheckpointError(f"internal: produced {name} {array.shape}, planned {want[0]} {want[2]}",
                                  self.path, name)
        self.fh.write(array.tobytes())
        self.next += 1

    def close(self):
        if self.next != len(self.tensors):
            raise CheckpointError(f"internal: {self.next} of {len(self.tensors)} tensors written", self.path)


def _layer_weights(reader, prefix, suffixes):
    return {s: reader.tensor(prefix + s, np.float32) for s in suffixes if prefix + s in reader.ckpt}


def _attention_suffixes(config):
    q = (["self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"]
         if config.q_lora_rank else ["self_attn.q_proj.weight"])
    return ["input_layernorm.weight"] + q + ["self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                                            "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight"]


def _swiglu_write(out, reader, prefix, x):
    """Reads gate / up / down at `prefix`, writes their W8A8_DYNAMIC tensors, returns the float output on x."""
    w = {p: reader.tensor(f"{prefix}.{p}.weight", np.float32) for p in ("gate_proj", "up_proj", "down_proj")}
    for p in ("gate_proj", "up_proj", "down_proj"):
        for k, v in qz.dynamic_tensors(w[p]).items():
            out.write(f"{prefix}.{p}.{k}", v)
    return cal.swiglu(x, w["gate_proj"], w["up_proj"], w["down_proj"]) if x.shape[0] else x[:, :0] @ w["down_proj"].T


def run_layer(out, reader, config, layer, hidden, opts, cos_sin):
    """Quantizes decoder layer `layer` into `out` (a ShardWriter); returns the next hidden states (float)."""
    prefix = f"model.layers.{layer}."
    w = _layer_weights(reader, prefix, _attention_suffixes(config))
    stats, h = cal.Stats(), np.empty_like(hidden)
    for r in range(0, hidden.shape[0], ROWS_PER_STEP):
        h[r:r + ROWS_PER_STEP] = hidden[r:r + ROWS_PER_STEP] + cal.attention(w, hidden[r:r + ROWS_PER_STEP], config,
                                                                             cos_sin, stats)
    dtypes = {s: DTYPES[_float_name(reader.ckpt, prefix + s)] for s in w}
    for suffix, value, _ in qz.attention_tensors(w, stats, config, opts["smooth"], opts["alpha"], dtypes):
        out.write(prefix + suffix, value)
    del w
    norm = reader.tensor(prefix + "post_attention_layernorm.weight", np.float32)
    out.write(prefix + "post_attention_layernorm.weight", norm)
    x = (cal.rms_raw(h, config.rms_norm_eps) * norm).reshape(-1, h.shape[-1])
    if not config.is_moe_layer(layer):
        return h + _swiglu_write(out, reader, prefix + "mlp", x).reshape(h.shape)
    gate = reader.tensor(prefix + "mlp.gate.weight", np.float32)
    out.write(prefix + "mlp.gate.weight", gate)
    bias = None
    if config.topk_method == "noaux_tc":
        bias = reader.tensor(prefix + "mlp.gate.e_score_correction_bias", np.float32)
        out.write(prefix + "mlp.gate.e_score_correction_bias", bias)
    ids, weights = cal.route(x, gate, bias, config)
    moe = np.zeros_like(x)
    for e in range(config.n_routed_experts):
        tok, slot = np.nonzero(ids == e)
        y = _swiglu_write(out, reader, f"{prefix}mlp.experts.{e}", x[tok])
        moe[tok] += y * weights[tok, slot][:, None]  # a token picks an expert once
    if config.n_shared_experts:
        moe += _swiglu_write(out, reader, prefix + "mlp.shared_experts", x)
    return h + moe.reshape(h.shape)


def _copy_tensors(out, reader, tensors):
    for name, dtype, _, _ in tensors:
        out.write(name, reader.tensor(name, DTYPES[dtype]))


# ----------------------------------------------------------------------------- the folder
def _write_json(path, obj):
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode("utf-8")))


def _aux_files(src):
    roots, out = input_roots(src), []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (name in _SKIP or name.startswith(".") or name.endswith((".safetensors", ".json.tmp"))
                or name.startswith("quant_model_") or not os.path.isfile(path)
                or os.path.getsize(path) > AUX_MAX_BYTES):
            continue
        if os.path.realpath(path).startswith(roots[0] + os.sep):
            out.append(name)
    return out


def _copy_file(src, dst, name):
    with os.fdopen(open_regular(os.path.join(src, name), input_roots(src)), "rb") as fh:
        data = fh.read()
    atomic_write(os.path.join(dst, name), lambda out: out.write(data))


def description(shards, smooth, alpha):
    """The msModelSlim description: every tensor -> W8A8 / W8A8_DYNAMIC / FLOAT, and the top-level keys."""
    desc = {"model_quant_type": qz.DYNAMIC, "version": "1.0.0", "group_size": 0,
            "metadata": {"tool": "dsv3-quantize", "smooth": smooth, "alpha": alpha, "weight_clamp": [-127, 127],
                         "activation": "static per-tensor asymmetric (attention), dynamic per-token (mlp)"},
            "optional": {}}
    for _, _, _, tensors in shards:
        desc.update({name: kind for name, _, _, kind in tensors})
    return desc


def output_config(hf, include_mtp, any_fp8):
    out = {k: v for k, v in hf.items() if k != "quantization_config"}
    out.update(quantize="w8a8_dynamic", mla_quantize="w8a8")
    if any_fp8:
        out["torch_dtype"] = "bfloat16"
    if not include_mtp:
        out["num_nextn_predict_layers"] = 0
    return out


# ----------------------------------------------------------------------------- a run
def prepare(src, calib, tokenizer, smooth, alpha, samples, seq_len, include_mtp, config_path):
    """Every check on the input and the plan of the run (nothing written): a dict."""
    if smooth not in qz.SMOOTH_CHOICES:
        raise CheckpointError(f"--smooth {smooth!r}: choose one of {', '.join(qz.SMOOTH_CHOICES)}")
    with open_checkpoint(src) as ckpt:  # refuses pickles, validates the index and every header
        if not os.path.isdir(src):
            raise CheckpointError("the input must be a checkpoint folder (with its config.json)", src)
        config, hf = load_config(config_path or src)
        if hf.get("quantize") or any(n.startswith("quant_model_description") for n in os.listdir(src)):
            raise CheckpointError("already quantized (msModelSlim W8A8 folder): give the float or FP8 model", src)
        try:
            qc = hf.get("quantization_config")
            block = fp8.block_size_of(qc) if qc else fp8.DEFAULT_BLOCK
        except ValueError as exc:
            raise CheckpointError(str(exc), config_path or os.path.join(src, "config.json")) from None
        required = check_input(ckpt, config, include_mtp, block)
        shards = plan_shards(ckpt, config, required, smooth)
        layout_in = {os.path.basename(f.path): [os.path.getsize(f.path), f.metadata(),
                                                [[n, DTYPE_NAMES[f.dtype(n)], f.shape(n)] for n in f.keys()]]
                     for f in ckpt.files.values()}
        any_fp8 = any(ckpt.dtype(n) == fp8.FP8 for n in required)
    ids = cal.calibration_ids(cal.read_texts(calib), cal.tokenizer_file(src, tokenizer), config.vocab_size,
                              hf.get("bos_token_id"), samples, seq_len)
    out_config = output_config(hf, include_mtp, any_fp8)
    job_id = {"tool": "dsv3-quantize 1", "smooth": smooth, "alpha": alpha, "mtp": include_mtp,
              "input": _digest(layout_in), "calibration": hashlib.sha256(ids.tobytes()).hexdigest(),
              "calibration_shape": list(ids.shape), "plan": _digest([[f, t] for f, _, _, t in shards]),
              "config": _digest(out_config)}
    return dict(config=config, block=block, shards=shards, ids=ids, out_config=out_config, job_id=job_id,
                aux=_aux_files(src))


def _resume_point(shards, files, config):
    """Index in `shards` of the first decoder layer to (re)compute: after the leading layers whose shard and
    hidden states are both recorded."""
    layers = [(i, layer) for i, (f, kind, layer, _) in enumerate(shards) if kind == "layer"]
    start = 0
    for k, (i, layer) in enumerate(layers):
        if shards[i][0] not in files:
            break
        if HIDDEN.format(layer) in files:  # only the latest hidden states are kept
            start = k + 1
    return start, layers


def quantize(src, dst, calib, tokenizer=None, smooth=qz.DEFAULT_SMOOTH, alpha=qz.DEFAULT_ALPHA, samples=32,
             seq_len=256, include_mtp=True, config_path=None, progress=True, kill_at=None):
    """Runs dsv3-quantize; returns a summary dict. `kill_at` (tests): SIGKILL while writing that shard."""
    from tqdm import tqdm
    src, dst, t0 = os.fspath(src), os.fspath(dst), time.time()
    p = prepare(src, calib, tokenizer, smooth, alpha, samples, seq_len, include_mtp, config_path)
    config, shards, opts = p["config"], p["shards"], {"smooth": smooth, "alpha": alpha}
    lock = lock_output(src, dst)
    try:
        files = resume_state(dst, p["job_id"])
        resumed = [f for f, _, _, _ in shards if f in files]
        manifest = {"manifest": MANIFEST_FORMAT, "job": p["job_id"], "complete": False, "files": {}}

        def record(*names_):
            for n in names_:
                if os.path.exists(os.path.join(dst, n)):
                    files[n] = file_record(os.path.join(dst, n))
                else:
                    files.pop(n, None)
            manifest["files"] = dict(sorted(files.items()))
            _write_json(os.path.join(dst, MANIFEST_NAME), manifest)
        record()
        start, layers = _resume_point(shards, files, config)
        todo = [i for i, (f, kind, _, _) in enumerate(shards) if kind != "layer" and f not in files] \
            + [i for i, _ in layers[start:]]
        try:
            with open_checkpoint(src) as ckpt, tqdm(total=len(todo), unit="shard", desc="dsv3-quantize",
                                                    disable=not progress, dynamic_ncols=True) as bar:
                _run_shards(ckpt, dst, p, opts, sorted(todo), start, layers, record, bar, kill_at)
            _finish(src, dst, p, record, layers)
            manifest["complete"] = True
            record()
        except BaseException:
            remove_temporary(dst)
            raise
    finally:
        lock.release()
    written = sum(int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize for i in todo for _, d, s, _ in shards[i][3])
    return {"shards": len(shards), "resumed_shards": len(resumed), "tensors": sum(len(s[3]) for s in shards),
            "layers": len(layers), "calibration_tokens": int(p["ids"].size), "bytes_written": written,
            "seconds": time.time() - t0, "smooth": smooth}


def _run_shards(ckpt, dst, p, opts, todo, start, layers, record, bar, kill_at):
    config, shards = p["config"], p["shards"]
    hidden = None
    if start < len(layers) and any(shards[i][1] == "layer" for i in todo):
        if start == 0:
            with _reader(ckpt, ["model.embed_tokens.weight"], p["block"]) as reader:
                hidden = reader.tensor("model.embed_tokens.weight", np.float32)[p["ids"]]
        else:
            hidden = np.load(os.path.join(dst, HIDDEN.format(layers[start - 1][1])))
    cos_sin = cal.rope_cos_sin(config, p["ids"].shape[1])
    for i in todo:
        file, kind, layer, tensors = shards[i]
        path = os.path.join(dst, file)
        with _reader(ckpt, [t[0] for t in tensors if t[0] in ckpt], p["block"]) as reader:
            def fill(fh, reader=reader, tensors=tensors, path=path, kill=(i == kill_at)):
                nonlocal hidden
                out = _Killer(ShardWriter(fh, tensors, path)) if kill else ShardWriter(fh, tensors, path)
                if kind == "layer":
                    hidden = run_layer(out, reader, config, layer, hidden, opts, cos_sin)
                else:
                    _copy_tensors(out, reader, tensors)
                out.close()
            try:
                atomic_write(path, fill)
            except OSError as exc:
                raise CheckpointError(f"cannot write: {exc.strerror or exc}", path) from None
        if kind == "layer":
            name = HIDDEN.format(layer)
            atomic_write(os.path.join(dst, name), lambda fh: np.save(fh, hidden))
            previous = [HIDDEN.format(lay) for _, lay in layers if lay != layer]
            record(file, name)
            for old in previous:
                if os.path.exists(os.path.join(dst, old)):
                    os.unlink(os.path.join(dst, old))
            record(*previous)
        else:
            record(file)
        bar.update(1)


class _Killer:
    """Test hook: dies like `kill -9` once the first tensor of a shard is written."""

    def __init__(self, inner):
        self.inner = inner

    def write(self, name, array):
        self.inner.write(name, array)
        self.inner.fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def close(self):
        self.inner.close()


class _reader:  # noqa: N801  (a context manager around hf_read.Reader)
    def __init__(self, ckpt, tensor_names, block):
        self.reader = Reader(ckpt, block, [n for n in tensor_names if ckpt.dtype(n) == fp8.FP8])

    def __enter__(self):
        return self.reader

    def __exit__(self, *exc):
        self.reader.close()


def _finish(src, dst, p, record, layers):
    shards = p["shards"]
    weight_map = {name: f for f, _, _, tensors in shards for name, _, _, _ in tensors}
    total = sum(int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize for _, _, _, t in shards for _, d, s, _ in t)
    write_index(dst, weight_map, total, filename=INDEX)
    _write_json(os.path.join(dst, DESCRIPTION), description(shards, p["job_id"]["smooth"], p["job_id"]["alpha"]))
    _write_json(os.path.join(dst, "config.json"), p["out_config"])
    for name in p["aux"]:
        _copy_file(src, dst, name)
    hidden = [HIDDEN.format(layer) for _, layer in layers]
    for name in hidden:
        if os.path.exists(os.path.join(dst, name)):
            os.unlink(os.path.join(dst, name))
    record(*hidden, INDEX, DESCRIPTION, "config.json", *p["aux"])


def format_summary(s):
    from mindformers_dsv3.units import format_bytes
    return (f"dsv3-quantize: {s['tensors']:,} tensors in {s['shards']} shards ({s['resumed_shards']} already done), "
            f"{s['layers']} layers, smoothing {s['smooth']}, {s['calibration_tokens']:,} calibration tokens; "
            f"wrote {format_bytes(s['bytes_written'])} in {s['seconds']:.1f} s")
