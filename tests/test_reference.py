"""The numpy reference (tests/reference/numpy_dsv3.py) is right where transformers 4.51.3 is right.

These tests pin the test oracle itself: the MindSpore model is checked against ``forward_logits`` /
``route`` elsewhere, so the oracle must agree with transformers on everything transformers gets
right, and must differ from it exactly where transformers has a known bug (routing with negative
``e_score_correction_bias``).
"""
import copy
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests import hf_fixtures as fx  # noqa: E402
from tests.reference import numpy_dsv3 as ref  # noqa: E402

SEED = 1234


@pytest.fixture(scope="module")
def cfg():
    return fx.tiny_hf_config()


@pytest.fixture(scope="module")
def state(cfg):
    return fx.random_hf_state_dict(cfg, seed=SEED)


@pytest.fixture(scope="module")
def hf_model(cfg, state):
    return fx.build_hf_model(cfg, state)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(7).integers(0, 128, size=(2, 16))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.double().numpy()


# ----------------------------------------------------------------------------------- fixtures


def test_state_dict_matches_transformers_names_and_shapes(cfg, state, hf_model):
    hf_sd = hf_model.state_dict()
    main = {n: a for n, a in state.items() if not fx.is_mtp_name(n, cfg)}
    assert set(main) == set(hf_sd)
    for name, arr in main.items():
        assert tuple(hf_sd[name].shape) == arr.shape, name
        assert arr.dtype == np.float32
    mtp = sorted(n for n in state if fx.is_mtp_name(n, cfg))
    p = "model.layers.4."
    for must in ["embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                 "shared_head.norm.weight", "shared_head.head.weight", "self_attn.q_a_proj.weight",
                 "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight",
                 "mlp.shared_experts.up_proj.weight"]:
        assert p + must in mtp
    assert state[p + "eh_proj.weight"].shape == (64, 128)
    # released layout: the MTP embedding and head duplicate the main ones
    np.testing.assert_array_equal(state[p + "embed_tokens.weight"], state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(state[p + "shared_head.head.weight"], state["lm_head.weight"])
    # draws as specified
    b = state["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (b >= 0.05).all() and (b <= 0.5).all()
    assert abs(state["model.norm.weight"].mean() - 1.0) < 0.1
    shifted = fx.random_hf_state_dict(cfg, seed=SEED, bias_shift=-2.0)
    np.testing.assert_allclose(shifted["model.layers.1.mlp.gate.e_score_correction_bias"], b - 2.0, atol=1e-6)
    np.testing.assert_array_equal(shifted["lm_head.weight"], state["lm_head.weight"])


def test_save_folder_round_trip_and_from_pretrained(tmp_path, cfg, state, hf_model, ids):
    import json

    folder = tmp_path / "ckpt"
    fx.save_hf_folder(str(folder), cfg, state, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in state.values())
    cfg2, state2 = fx.load_hf_folder(str(folder))
    assert cfg2 == cfg
    assert set(state2) == set(state)
    for n in state:
        np.testing.assert_array_equal(state2[n], state[n])
    # the folder is a loadable HF checkpoint (MTP tensors are reported as unused, nothing is missing)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(folder), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    # same weights; fp32 kernels may group sums differently across the two models (~1e-6)
    np.testing.assert_allclose(_hf_logits(loaded, ids), _hf_logits(hf_model, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- full model


def test_forward_logits_match_transformers(cfg, state, hf_model, ids):
    want = _hf_logits(hf_model, ids)
    got = ref.forward_logits(cfg, state, ids)
    assert got.shape == (2, 16, cfg["vocab_size"])
    assert got.std() > 0.1, "logits too small for the comparison to mean anything"
    # every MoE layer really routes differently per token, so the comparison exercises routing
    assert np.abs(got - want).max() <= 1e-4


def test_forward_is_causal_prefix_consistent(cfg, state, ids):
    full = ref.forward_logits(cfg, state, ids)
    np.testing.assert_allclose(ref.forward_logits(cfg, state, ids[:, :5]), full[:, :5], atol=1e-10)


# ----------------------------------------------------------------------------------- RoPE / YaRN


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # a fractional ramp (pairs 1..3 blended) instead of the default all-or-nothing one
        {"rope_theta": 100.0, "max_position_embeddings": 1024,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}},
        {"qk_rope_head_dim": 16, "max_position_embeddings": 40 * 64,
         "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
        {"rope_scaling": None},
    ],
)
def test_yarn_matches_transformers(overrides):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = fx.tiny_hf_config(**overrides)
    hf_cfg = DeepseekV3Config.from_dict(copy.deepcopy(cfg))
    rot = DeepseekV3RotaryEmbedding(hf_cfg)
    np.testing.assert_allclose(ref.rope_inv_freq(cfg), rot.inv_freq.double().numpy(), rtol=1e-6)
    assert ref.rope_attention_factor(cfg) == pytest.approx(rot.attention_scaling, rel=1e-12)
    assert ref.softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf_cfg, 0).scaling, rel=1e-12)


def test_softmax_scale_671b_value():
    cfg = fx.tiny_hf_config(qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=163840,
                            rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert ref.softmax_scale(cfg) == pytest.approx(0.135234, abs=1e-6)


def test_interleaved_rope_equals_deinterleave_then_rotate_half():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    cfg = fx.tiny_hf_config()
    rng = np.random.default_rng(0)
    s, d = 6, cfg["qk_rope_head_dim"]
    q = rng.standard_normal((1, 3, s, d))
    k = rng.standard_normal((1, 1, s, d))
    cos, sin = ref.rope_cos_sin(cfg, np.arange(s))
    q_ref = ref.apply_rope_interleaved(q, cos, sin)
    k_ref = ref.apply_rope_interleaved(k, cos, sin)
    # transformers: cos/sin duplicated over halves, q/k de-interleaved to [evens | odds]
    cos_t = torch.from_numpy(np.concatenate([cos, cos], -1))[None]
    sin_t = torch.from_numpy(np.concatenate([sin, sin], -1))[None]
    q_t, k_t = apply_rotary_pos_emb_interleave(torch.from_numpy(q), torch.from_numpy(k), cos_t, sin_t)
    deint = np.r_[0:d:2, 1:d:2]
    np.testing.assert_allclose(q_ref[..., deint], q_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(k_ref[..., deint], k_t.numpy(), atol=1e-12)


# ----------------------------------------------------------------------------------- routing


def _brute_force_route(hidden, gate_weight, bias, cfg):
    """Per token, with plain Python lists: group scores, allowed experts, sort."""
    n_exp = gate_weight.shape[0]
    n_group, topk_group, k = cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    per = n_exp // n_group
    idx_out, w_out = [], []
    for x in np.asarray(hidden, dtype=np.float64):
        scores = [1.0 / (1.0 + np.exp(-float(np.dot(gate_weight[e], x)))) for e in range(n_exp)]
        biased = [scores[e] + float(bias[e]) for e in range(n_exp)]
        gscore = []
        for g in range(n_group):
            members = sorted((biased[e] for e in range(g * per, (g + 1) * per)), reverse=True)
            gscore.append(members[0] + members[1])
        kept = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        allowed = [e for g in kept for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -biased[e])[:k]
        w = [scores[e] for e in chosen]
        tot = sum(w)
        idx_out.append(chosen)
        w_out.append([v / tot * cfg["routed_scaling_factor"] for v in w])
    return np.array(idx_out), np.array(w_out)


@pytest.mark.parametrize("n_exp,n_group,topk_group,k", [(8, 4, 2, 2), (16, 4, 2, 4), (12, 3, 1, 3)])
def test_route_matches_brute_force_with_negative_biases(n_exp, n_group, topk_group, k):
    cfg = fx.tiny_hf_config(n_routed_experts=n_exp, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k)
    rng = np.random.default_rng(n_exp * 100 + k)
    hidden = rng.standard_normal((64, 32))
    gate = 0.3 * rng.standard_normal((n_exp, 32))
    bias = rng.uniform(-2.5, -1.5, size=n_exp)
    idx, w = ref.route(hidden, gate, bias, cfg)
    want_idx, want_w = _brute_force_route(hidden, gate, bias, cfg)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(w, want_w, rtol=1e-12)
    np.testing.assert_allclose(w.sum(-1), cfg["routed_scaling_factor"], rtol=1e-12)
    # the bias steers selection: without it, the choice changes for some token
    idx_nobias, _ = ref.route(hidden, gate, np.zeros(n_exp), cfg)
    assert (np.sort(idx_nobias, -1) != np.sort(idx, -1)).any()


def _kept_groups(hidden, gate_weight, bias, cfg):
    scores = 1.0 / (1.0 + np.exp(-(hidden @ gate_weight.T))) + bias
    g = scores.reshape(len(hidden), cfg["n_group"], -1)
    gscore = np.sort(g, -1)[..., -2:].sum(-1)
    return np.argsort(-gscore, -1)[:, : cfg["topk_group"]]


def _hf_route(gate_module, hidden):
    with torch.no_grad():
        idx, w = gate_module(torch.from_numpy(hidden.astype(np.float32)))
    idx, w = idx.numpy(), w.double().numpy()
    order = np.argsort(idx, -1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)


def test_route_matches_transformers_router_with_positive_biases(cfg, state, hf_model):
    hidden = np.random.default_rng(3).standard_normal((96, cfg["hidden_size"]))
    for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.gate."
        idx, w = ref.route(hidden, state[p + "weight"], state[p + "e_score_correction_bias"], cfg)
        order = np.argsort(idx, -1)
        hf_idx, hf_w = _hf_route(hf_model.model.layers[layer].mlp.gate, hidden)
        np.testing.assert_array_equal(np.take_along_axis(idx, order, -1), hf_idx)
        np.testing.assert_allclose(np.take_along_axis(w, order, -1), hf_w, atol=1e-5)


def test_transformers_router_escapes_dropped_groups_with_negative_biases(cfg, ids):
    """Documents the transformers 4.51.3 bug: dropped groups are masked with 0.0, not -inf.

    With every bias shifted by -2.0 all biased scores are negative, so transformers' 0.0-masked
    experts of *dropped* groups outrank every expert of the kept groups.
    """
    state = fx.random_hf_state_dict(cfg, seed=SEED, bias_shift=-2.0)
    model = fx.build_hf_model(cfg, state)
    hidden = np.random.default_rng(5).standard_normal((64, cfg["hidden_size"]))
    per = cfg["n_routed_experts"] // cfg["n_group"]
    hf_escapes = 0
    for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.gate."
        gw, b = state[p + "weight"].astype(np.float64), state[p + "e_score_correction_bias"].astype(np.float64)
        kept = _kept_groups(hidden, gw, b, cfg)
        idx, _ = ref.route(hidden, gw, b, cfg)
        hf_idx, _ = _hf_route(model.model.layers[layer].mlp.gate, hidden)
        for t in range(len(hidden)):
            assert set((idx[t] // per).tolist()) <= set(kept[t].tolist())
            hf_escapes += not set((hf_idx[t] // per).tolist()) <= set(kept[t].tolist())
    assert hf_escapes > 0
    # ...and it shows in the logits: the reference and transformers part ways
    assert np.abs(ref.forward_logits(cfg, state, ids) - _hf_logits(model, ids)).max() > 1e-2


# ----------------------------------------------------------------------------------- q_lora_rank None


def test_q_lora_rank_none_path():
    """q_lora_rank None (q = q_proj x) checked without transformers, which cannot build it.

    With q_lora_rank = hidden, q_a_proj = I and unit q_a_layernorm / input_layernorm weights, the
    input of q_a_layernorm is already RMS-normalised, so q_b(norm(q_a(x))) == q_b(x) up to eps
    (1e-12 here): the q_lora model must equal the q_lora_rank None model with q_proj = q_b_proj.
    Everything else (kv path, RoPE, MoE) is shared code, so this pins the only difference.
    """
    h = 64
    cfg_lora = fx.tiny_hf_config(q_lora_rank=h, rms_norm_eps=1e-12)
    cfg_none = fx.tiny_hf_config(q_lora_rank=None, rms_norm_eps=1e-12)
    s_lora = fx.random_hf_state_dict(cfg_lora, seed=11)
    s_none = {}
    for name, arr in s_lora.items():
        if ".q_a_proj." in name or ".q_a_layernorm." in name:
            continue
        s_none[name.replace(".q_b_proj.", ".q_proj.")] = arr
    for layer in range(cfg_lora["num_hidden_layers"] + 1):
        p = f"model.layers.{layer}."
        s_lora[p + "self_attn.q_a_proj.weight"] = np.eye(h, dtype=np.float32)
        s_lora[p + "self_attn.q_a_layernorm.weight"] = np.ones(h, np.float32)
        for s in (s_lora, s_none):
            s[p + "input_layernorm.weight"] = np.ones(h, np.float32)
    # the fixtures produce the real None layout
    shapes = fx.hf_tensor_shapes(cfg_none)
    assert set(shapes) == set(fx.random_hf_state_dict(cfg_none, seed=0)) == set(s_none)
    assert not any(".q_a_" in n or ".q_b_" in n for n in shapes)

    ids = np.random.default_rng(2).integers(0, 128, size=(2, 12))
    a = ref.forward_logits(cfg_lora, s_lora, ids)
    b = ref.forward_logits(cfg_none, s_none, ids)
    assert b.std() > 0.1
    np.testing.assert_allclose(b, a, atol=1e-8)
    # and q_proj is really what drives q on the None path
    s_none["model.layers.0.self_attn.q_proj.weight"] = s_none["model.layers.0.self_attn.q_proj.weight"] * 1.5
    assert np.abs(ref.forward_logits(cfg_none, s_none, ids) - b).max() > 1e-3


# ----------------------------------------------------------------------------------- MTP


def test_mtp_logits_shape_and_dependencies(cfg, state, ids):
    out = ref.mtp_logits(cfg, state, ids)
    assert out.shape == (2, 15, cfg["vocab_size"]) and np.isfinite(out).all() and out.std() > 0.1
    # position i sees tokens <= i+1 only
    ids2 = ids.copy()
    ids2[:, 10] = (ids2[:, 10] + 1) % cfg["vocab_size"]
    out2 = ref.mtp_logits(cfg, state, ids2)
    np.testing.assert_allclose(out2[:, :9], out[:, :9], atol=1e-10)
    assert np.abs(out2[:, 9] - out[:, 9]).max() > 1e-6
    # explicit hidden_last equals the default (main output after model.norm)
    h = ref.rms_norm(ref.forward_hidden(cfg, state, ids), state["model.norm.weight"].astype(np.float64), cfg["rms_norm_eps"])
    np.testing.assert_allclose(ref.mtp_logits(cfg, state, ids, hidden_last=h), out, atol=0)


def test_brute_force_helper_is_itself_group_limited():
    # guard the guard: every chosen expert of the brute force lies in a kept group
    cfg = fx.tiny_hf_config()
    rng = np.random.default_rng(9)
    hidden, gate, bias = rng.standard_normal((16, 8)), rng.standard_normal((8, 8)), rng.uniform(-3, -2, 8)
    idx, _ = _brute_force_route(hidden, gate, bias, cfg)
    kept = _kept_groups(hidden, gate, bias, cfg)
    for t, g in itertools.product(range(16), range(2)):
        assert idx[t, g] // 2 in kept[t]
