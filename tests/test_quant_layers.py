"""W8A8 layers (issue 12 item 2) against an independent numpy int reference written here: int64 sums of the
int8 codes, np.rint (half to even) for the roundings, ml_dtypes for the bfloat16 roundings. The integer
sums must be exact; outputs equal within float rounding. Every case runs the CPU kernel library (aot)
and the numpy fallback (pyfunc) of the seam, in graph mode."""
import ctypes

import ml_dtypes
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.kernels import GroupedQuantMatmul, QuantMatmul, cpu_kernel_library
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from mindformers_dsv3.quant.layers import QuantLinear
from tests.hf_fixtures import tiny_hf_config

BACKENDS = ["aot", "aot-plain", "numpy"]


@pytest.fixture(autouse=True, scope="module")
def graph_mode():
    ms.set_context(mode=0)
    yield


def _bf16(v):
    return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def ref_static(x, w, input_scale, input_offset, deq_scale, quant_bias):
    """Integer codes, int64 sums and the f32 output of the static scheme (reference section 2)."""
    r = _bf16(np.float32(1.0) / _bf16(input_scale[0]))
    o = np.float32(int(input_offset[0]))
    qx = np.clip(np.rint(x.astype(np.float32) * r + o), -128, 127).astype(np.int64)
    acc = qx @ w.astype(np.int64).T + quant_bias.astype(np.int64)
    return acc, acc.astype(np.float32) * deq_scale.astype(np.float32)


def ref_dynamic(x, w_kn, weight_scale):
    """w_kn (K, N); per-token scale s = max|x| / 127; y = f32(acc) * bf16(weight_scale) * s."""
    s = np.abs(x).max(-1, keepdims=True).astype(np.float32) / np.float32(127)
    qx = np.zeros(x.shape, np.int64)
    nz = s[:, 0] > 0
    qx[nz] = np.clip(np.rint(x[nz] / s[nz]), -128, 127).astype(np.int64)
    acc = qx @ w_kn.astype(np.int64)
    return acc, acc.astype(np.float32) * _bf16(weight_scale) * s


@pytest.fixture
def plain_loops(request):
    """aot-plain: the library's plain loops (the path of CPUs without AVX2) on this CPU too."""
    lib = cpu_kernel_library()
    if lib is not None:
        ctypes.CDLL(lib).dsv3_force_plain(1 if request.node.callspec.params["backend"] == "aot-plain" else 0)
    yield
    if lib is not None:
        ctypes.CDLL(lib).dsv3_force_plain(0)


def _backend(name):
    if name.startswith("aot") and cpu_kernel_library() is None:
        pytest.skip("no C++ compiler here")
    return None if name.startswith("aot") else "numpy"


def _close(y, ref, acc_scale):
    # float rounding only: a few ulps of the largest term
    tol = 4 * np.finfo(np.float32).eps * np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol)


@pytest.mark.usefixtures("plain_loops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_static_matches_int_reference(backend):
    rng = np.random.default_rng(0)
    m, k, n = 9, 300, 40                                # two blocks of 4 rows and one
    x = rng.normal(0, 2.0, (m, k)).astype(np.float32)
    x[0, :5] = [100.0, -100.0, 0.5, 1.5, -2.5]          # saturation and exact halves
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    w_scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    input_scale = np.array([0.03125], np.float32)      # 1/32: x * r lands on .5 exactly for x = 1.5/32
    x[1, :4] = np.array([0.5, 1.5, 2.5, -0.5], np.float32) / 32
    input_offset = np.array([-3.0], np.float32)
    deq = (input_scale * w_scale).astype(np.float32)
    qbias = rng.integers(-5000, 5000, n).astype(np.int32)
    y = QuantMatmul(True, _backend(backend))(Tensor(x), Tensor(w), Tensor(input_scale), Tensor(input_offset),
                                             Tensor(deq), Tensor(qbias)).asnumpy()
    acc, ref = ref_static(x, w, input_scale, input_offset, deq, qbias)
    np.testing.assert_array_equal(np.rint(y / deq).astype(np.int64), acc)   # the int32 sums, exactly
    _close(y, ref, deq)


@pytest.mark.usefixtures("plain_loops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_matches_int_reference(backend):
    rng = np.random.default_rng(1)
    m, k, n = 6, 257, 33
    x = rng.normal(0, 1.0, (m, k)).astype(np.float32)
    x[2] = 0.0                                          # an all-zero token: scale 0, output 0
    x[3, 7] = 50.0                                      # an outlier sets the token's scale
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    w_scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    y = QuantMatmul(False, _backend(backend))(Tensor(x), Tensor(w), Tensor(w_scale)).asnumpy()
    acc, ref = ref_dynamic(x, w.T, w_scale)
    s = np.abs(x).max(-1, keepdims=True).astype(np.float32) / np.float32(127)
    got = np.where(s > 0, y / np.where(s > 0, s, 1) / _bf16(w_scale), 0)
    np.testing.assert_array_equal(np.rint(got).astype(np.int64), acc)
    assert not y[2].any()
    _close(y, ref, None)


@pytest.mark.usefixtures("plain_loops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_experts_match_int_reference(backend):
    """Two grouped quant-matmuls as the experts run them: w13, SwiGLU, a fresh quantization, w2."""
    rng = np.random.default_rng(2)
    e, h, inter = 5, 49, 24                              # odd K (pairs of rows) and N past 16-wide blocks
    counts = np.array([3, 0, 9, 1, 0], np.int32)         # blocks of 4 rows, remainders; 9 rows: transposed path
    rows = int(counts.sum()) + 2                         # two rows past the groups: zeros
    x = rng.normal(0, 1.0, (rows, h)).astype(np.float32)
    w13 = rng.integers(-127, 128, (e, h, 2 * inter)).astype(np.int8)
    s13 = rng.uniform(1e-3, 1e-2, (e, 2 * inter)).astype(np.float32)
    w2 = rng.integers(-127, 128, (e, inter, h)).astype(np.int8)
    s2 = rng.uniform(1e-3, 1e-2, (e, h)).astype(np.float32)
    gmm = GroupedQuantMatmul(_backend(backend))
    gate_up = gmm(Tensor(x), Tensor(w13), Tensor(s13), Tensor(counts)).asnumpy()
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    act = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
    out = gmm(Tensor(act), Tensor(w2), Tensor(s2), Tensor(counts)).asnumpy()
    start = 0
    for g, c in enumerate(counts):
        if c:
            sl = slice(start, start + c)
            _, ref13 = ref_dynamic(x[sl], w13[g], s13[g])
            _close(gate_up[sl], ref13, None)
            _, ref2 = ref_dynamic(act[sl], w2[g], s2[g])      # fed our act: checks w2 alone
            _close(out[sl], ref2, None)
            start += c
    assert not gate_up[start:].any() and not out[start:].any()


def test_quant_linear_parameters():
    """The contract's names, dtypes and shapes (the loader and the planner rely on them)."""
    static = QuantLinear(24, 10, static=True)
    got = {p.name.split(".")[-1]: (p.dtype, p.shape) for p in static.get_parameters()}
    assert got == {"weight": (ms.int8, (10, 24)), "weight_scale": (ms.float32, (10,)),
                   "input_scale": (ms.float32, (1,)), "input_offset": (ms.float32, (1,)),
                   "deq_scale": (ms.float32, (10,)), "quant_bias": (ms.int32, (10,))}
    dynamic = QuantLinear(24, 10, static=False)
    assert {p.name.split(".")[-1] for p in dynamic.get_parameters()} == {"weight", "weight_scale"}
    x = np.random.default_rng(3).normal(size=(2, 3, 24)).astype(np.float32)
    y = static(Tensor(x)).asnumpy()
    params = {p.name.split(".")[-1]: p.asnumpy() for p in static.get_parameters()}
    _, ref = ref_static(x.reshape(6, 24), params["weight"], params["input_scale"], params["input_offset"],
                        params["deq_scale"], params["quant_bias"])
    _close(y.reshape(6, 10), ref, None)


UPSTREAM_BLOCK = {
    "quant_method": "ptq", "weight_dtype": "int8", "activation_dtype": "int8", "kvcache_dtype": "none",
    "outliers_suppression": "outlier-suppression+", "modules_to_not_convert": ["lm_head", "w2", "lkv2kv"],
    "algorithm_args": {},
    "layer_policies": {r".*\.feed_forward\..*": {
        "quant_method": "ptq", "activation_dtype": "int8", "weight_dtype": "int8", "kvcache_dtype": "none",
        "act_quant_granularity": "per_token", "weight_quant_granularity": "per_channel",
        "outliers_suppression": "None", "modules_to_not_convert": [], "algorithm_args": {}}},
}


def _tiny_quant_model(**overrides):
    hf = tiny_hf_config()
    hf["quantization_config"] = UPSTREAM_BLOCK
    config = DeepseekV3Config.from_hf_config(hf, compute_dtype="float32", param_init_type="float32",
                                             seq_length=16, **overrides)
    model = DeepseekV3ForCausalLM(config)
    model.set_train(False)
    return model


def test_tiny_quantized_model_builds_and_runs_in_graph_mode():
    np.random.seed(4)
    model = _tiny_quant_model()
    params = {p.name: p for p in model.get_parameters()}
    layer0, layer1 = "model.layers.0.", "model.layers.1."
    assert params[layer0 + "self_attn.q_a_proj.weight"].dtype == ms.int8
    assert params[layer0 + "self_attn.o_proj.quant_bias"].dtype == ms.int32
    assert params[layer0 + "self_attn.kv_b_proj.weight"].dtype == ms.float32      # FLOAT
    assert params[layer0 + "mlp.gate_up_proj.weight"].dtype == ms.int8             # dense, dynamic
    assert layer0 + "mlp.gate_up_proj.input_scale" not in params
    assert params[layer0 + "input_layernorm.bias"].shape == (64,)                  # outlier-suppression+
    assert params[layer0 + "self_attn.q_a_layernorm.bias"].shape == (32,)
    assert layer0 + "post_attention_layernorm.bias" not in params
    assert params[layer1 + "mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert params[layer1 + "mlp.experts.gate_up_scale"].shape == (8, 64)
    assert params[layer1 + "mlp.experts.down_proj"].dtype == ms.int8
    assert params[layer1 + "mlp.experts.down_scale"].shape == (8, 64)
    assert params[layer1 + "mlp.shared_experts.down_proj.weight_scale"].shape == (64,)
    assert params["lm_head.weight"].dtype == ms.float32
    assert params["model.mtp.0.layer.self_attn.q_a_proj.weight"].dtype == ms.float32   # MTP layer: FLOAT
    ids = np.random.default_rng(5).integers(0, 128, (2, 16)).astype(np.int32)
    logits = model.forward_logits(ids)
    assert logits.shape == (2, 16, 128) and np.isfinite(logits).all() and logits.std() > 0


def test_tiny_quantized_model_cached_decode_matches_full_forward():
    """Through the paged latent cache (prefill, then one token per step, as stock generate drives it) the
    quantized model gives the logits of its full causal forward: every activation quantization is per
    token (dynamic) or per tensor with a fixed scale (static), so no token's codes depend on the others."""
    from tests.model_fixtures import cached_step_logits
    np.random.seed(6)
    model = _tiny_quant_model(use_past=True, block_size=16, num_blocks=8, batch_size=2)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 128, 5), rng.integers(0, 128, 7)]
    steps = rng.integers(0, 128, (2, 3))
    cached = cached_step_logits(model, prompts, steps)
    for b, prompt in enumerate(prompts):
        full = model.forward_logits(np.concatenate([prompt, steps[b]])[None].astype(np.int32))[0]
        want = full[len(prompt) - 1:]
        np.testing.assert_allclose(cached[b], want, rtol=0, atol=2e-4 * np.abs(want).max())


@pytest.mark.usefixtures("plain_loops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_pairs_by_id_match_int_reference(backend):
    """Decode: each (token, expert) pair multiplies its own expert, unsorted; one row per token or per pair;
    an id outside the experts held gives a zero row (split inference)."""
    rng = np.random.default_rng(8)
    e, h, n_out, top_k = 4, 37, 21, 2
    x = rng.normal(0, 1.0, (3, h)).astype(np.float32)
    w = rng.integers(-127, 128, (e, h, n_out)).astype(np.int8)
    s = rng.uniform(1e-3, 1e-2, (e, n_out)).astype(np.float32)
    ids = np.array([2, 0, 3, 3, e, 1], np.int32)                # pair 4: held elsewhere
    gmm = GroupedQuantMatmul(_backend(backend))
    per_token = gmm.pairs(Tensor(x), Tensor(w), Tensor(s), Tensor(ids)).asnumpy()
    rows = np.repeat(x, top_k, 0)
    per_pair = gmm.pairs(Tensor(rows), Tensor(w), Tensor(s), Tensor(ids)).asnumpy()
    np.testing.assert_array_equal(per_token, per_pair)
    for p, g in enumerate(ids):
        if g >= e:
            assert not per_token[p].any()
            continue
        _, ref = ref_dynamic(rows[p:p + 1], w[g], s[g])
        _close(per_token[p:p + 1], ref, None)
