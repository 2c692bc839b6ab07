"""Numerical parity of our MindSpore DeepSeek-V3 against independent references.

References: transformers' DeepseekV3ForCausalLM (fp32, same weights) where it is
right, and the numpy implementation in tests/reference where it is not (routing
with negative biases) or cannot be built (q_lora_rank: null).
"""
import numpy as np
import pytest
import torch
from mindspore import Tensor, ops
from mindspore.nn.utils import no_init_parameters

from mindformers_dsv3.checkpoint.errors import CheckpointError
from mindformers_dsv3.checkpoint.loader import load_hf_checkpoint
from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.modeling.model import DeepseekV3ForCausalLM
from tests import hf_fixtures as hf
from tests.model_fixtures import build_ms_model, cached_step_logits
from tests.reference import numpy_dsv3 as ref

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = hf.tiny_hf_config()
    state = hf.random_hf_state_dict(config, seed=0)
    folder = tmp_path_factory.mktemp("tiny_hf")
    hf.save_hf_folder(folder, config, state, shards=2)
    return config, state, folder


@pytest.fixture(scope="module")
def ours(tiny):
    return build_ms_model(tiny[2])


@pytest.fixture(scope="module")
def theirs(tiny):
    return hf.build_hf_model(tiny[0], tiny[1])


@pytest.fixture(scope="module")
def ids(tiny):
    return np.random.RandomState(1).randint(2, tiny[0]["vocab_size"], size=(2, 16))


@pytest.fixture(scope="module")
def reference_logits(theirs, ids):
    with torch.no_grad():
        return theirs(torch.tensor(ids)).logits.numpy()


def test_full_forward_matches_transformers(ours, ids, reference_logits):
    logits = ours.forward_logits(ids)
    assert reference_logits.std() > 0.5  # not a degenerate comparison
    np.testing.assert_allclose(logits, reference_logits, atol=TOL, rtol=0)


def test_cached_decode_matches_full_forward(ours, ids, reference_logits):
    """Prefill prompts of different lengths, then decode token by token through the latent cache."""
    prompts = [ids[0, :9], ids[1, :4]]
    fed = np.stack([ids[0, 9:16], ids[1, 4:11]])
    steps = cached_step_logits(ours, prompts, fed)
    np.testing.assert_allclose(steps[0], reference_logits[0, 8:16], atol=TOL, rtol=0)
    np.testing.assert_allclose(steps[1], reference_logits[1, 3:11], atol=TOL, rtol=0)


@pytest.mark.parametrize("use_past", [True, False])
def test_stock_greedy_generate_matches_transformers(ours, theirs, ids, use_past):
    prompt = ids[:1, :8]
    with torch.no_grad():
        expected = theirs.generate(torch.tensor(prompt), max_new_tokens=16, do_sample=False,
                                   min_new_tokens=16, eos_token_id=None)[0].numpy()
    got = ours.generate(prompt.tolist(), max_new_tokens=16, do_sample=False, use_past=use_past,
                        eos_token_id=[-1])
    assert len(expected) == 24
    np.testing.assert_array_equal(np.asarray(got[0]), expected)


def test_absorbed_attention_equals_naive(ours):
    attn = ours.model.layers[1].self_attn
    rng = np.random.RandomState(3)
    x = Tensor(rng.standard_normal((2, 10, ours.config.hidden_size)).astype(np.float32))
    cos, sin, mask = ours._full_inputs(10)
    q_nope, q_pe, latent, k_pe = attn.project(x, cos, sin)
    naive = attn.attend_naive(q_nope, q_pe, latent, k_pe, mask).asnumpy()
    absorbed = attn.attend_absorbed(q_nope, q_pe, ops.concat((latent, k_pe), -1), mask).asnumpy()
    assert np.abs(naive).max() > 0.1
    np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=0)


def test_q_lora_null_matches_numpy_reference(tmp_path):
    config = hf.tiny_hf_config(q_lora_rank=None)
    state = hf.random_hf_state_dict(config, seed=5)
    hf.save_hf_folder(tmp_path, config, state)
    model = build_ms_model(tmp_path, use_past=False)
    assert "model.layers.0.self_attn.q_proj.weight" in {p.name for p in model.get_parameters()}
    ids = np.random.RandomState(2).randint(2, config["vocab_size"], size=(2, 16))
    np.testing.assert_allclose(model.forward_logits(ids), ref.forward_logits(config, state, ids),
                               atol=TOL, rtol=0)


def test_negative_router_bias_never_picks_dropped_groups(tmp_path):
    """transformers 4.51.3 masks dropped groups with 0.0, so negative biases leak; ours masks with -inf."""
    config = hf.tiny_hf_config()
    state = hf.random_hf_state_dict(config, seed=7, bias_shift=-2.0)
    hf.save_hf_folder(tmp_path, config, state)
    model = build_ms_model(tmp_path, use_past=False)
    layer = 2
    router = model.model.layers[layer].mlp.router
    hidden = np.random.RandomState(4).standard_normal((64, config["hidden_size"])).astype(np.float32)
    got_ids, got_w, _ = router(Tensor(hidden))
    prefix = f"model.layers.{layer}.mlp.gate."
    want_ids, want_w = ref.route(hidden.astype(np.float64), state[prefix + "weight"],
                                 state[prefix + "e_score_correction_bias"], config)
    got_ids, got_w = got_ids.asnumpy(), got_w.asnumpy()
    order_got, order_want = np.argsort(got_ids, 1), np.argsort(want_ids, 1)
    np.testing.assert_array_equal(np.take_along_axis(got_ids, order_got, 1),
                                  np.take_along_axis(want_ids, order_want, 1))
    np.testing.assert_allclose(np.take_along_axis(got_w, order_got, 1),
                               np.take_along_axis(want_w, order_want, 1), atol=1e-6)
    ids = np.random.RandomState(2).randint(2, config["vocab_size"], size=(2, 16))
    np.testing.assert_allclose(model.forward_logits(ids), ref.forward_logits(config, state, ids),
                               atol=TOL, rtol=0)


def test_kv_cache_bytes_for_671b_without_allocating_weights():
    config = DeepseekV3Config.from_hf_config("tests/fixtures/deepseek_v3_config.json", use_past=True,
                                             compute_dtype="bfloat16", num_blocks=4, block_size=16)
    with no_init_parameters():
        model = DeepseekV3ForCausalLM(config)
    assert model.kv_cache_bytes_per_token() == 70272 == (512 + 64) * 61 * 2


def test_kv_cache_bytes_match_allocation(ours):
    caches = [p for p in ours.get_parameters() if p.name.endswith("latent_cache")]
    assert len(caches) == ours.config.num_hidden_layers
    allocated = sum(p.asnumpy().nbytes for p in caches)
    per_token = (ours.config.kv_lora_rank + ours.config.qk_rope_head_dim) * ours.config.num_hidden_layers * 4
    assert ours.kv_cache_bytes_per_token() == per_token
    assert allocated == per_token * ours.kv_cache_capacity_tokens()
    assert ours.kv_cache_capacity_tokens() == ours.config.num_blocks * ours.config.block_size


def test_forward_logits_rejects_overlong_input(ours):
    with pytest.raises(ValueError, match="seq_length"):
        ours.forward_logits(np.zeros((1, ours.config.seq_length + 1), dtype=np.int32))


# ------------------------------------------------------------------ loader errors
def _model_for(folder):
    config = DeepseekV3Config.from_hf_config(folder, compute_dtype="float32", param_init_type="float32",
                                             seq_length=32)
    return DeepseekV3ForCausalLM(config)


def test_loader_names_missing_tensor(tiny, tmp_path):
    config, state, _ = tiny
    broken = dict(state)
    del broken["model.layers.2.mlp.experts.3.up_proj.weight"]
    hf.save_hf_folder(tmp_path, config, broken)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        load_hf_checkpoint(_model_for(tmp_path), tmp_path)


def test_loader_names_unexpected_and_misshaped_tensor(tiny, tmp_path):
    config, state, _ = tiny
    extra = dict(state, **{"model.layers.0.self_attn.surprise.weight": np.zeros((2, 2), np.float32)})
    hf.save_hf_folder(tmp_path / "extra", config, extra)
    with pytest.raises(CheckpointError, match=r"surprise.*|.*surprise"):
        load_hf_checkpoint(_model_for(tmp_path / "extra"), tmp_path / "extra")
    bad = dict(state)
    bad["model.layers.1.self_attn.o_proj.weight"] = np.zeros((3, 5), np.float32)
    hf.save_hf_folder(tmp_path / "shape", config, bad)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*shape|shape.*o_proj") as err:
        load_hf_checkpoint(_model_for(tmp_path / "shape"), tmp_path / "shape")
    assert ".safetensors" in str(err.value)
