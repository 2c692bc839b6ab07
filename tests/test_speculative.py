"""Speculative decoding with the MTP layer (`model_config.num_speculative_tokens`, mindformers_dsv3/speculative.py).

References, independent of the speculative loop:
* greedy: plain stock greedy decoding of the same weights (tokens must be identical);
* cache: plain decoding teacher-forced with the same tokens, one token per step (tests/model_fixtures);
* sampling: the exact distribution of the first generated tokens, computed in numpy from the logits of a
  full forward (no cache) with stock's temperature / top-k / top-p rules; a chi-square test.
The demo-trained tiny model (stock Trainer, MTP loss) runs through pipeline, Trainer.predict and the stock
predict script.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from mindformers import AutoModel, Trainer, build_context, pipeline
from mindformers.models.build_tokenizer import build_tokenizer
from mindformers.modules.block_tables import BlockTables
from mindspore import Tensor

from mindformers_dsv3 import speculative
from mindformers_dsv3.config import ConfigError, DeepseekV3Config
from mindformers_dsv3.data import SyntheticLanguage
from tests import hf_fixtures as hf
from tests.model_fixtures import build_ms_model
from tests.training_fixtures import (FINETUNE_YAML, REGISTER_DIR, TOKENIZER_FILE, checkpoints, standalone_copy,
                                     training_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 1
PROMPTS = [[5, 9, 17, 3], [7, 8, 2, 14, 21, 30, 11, 12, 13], [20]]
NEW = 20


def padded(prompts):
    width = max(len(p) for p in prompts)
    return [list(p) + [PAD] * (width - len(p)) for p in prompts]


def as_lists(out):
    return [np.asarray(row).tolist() for row in out]


# ----------------------------------------------------------------------------- a random model
@pytest.fixture(scope="module")
def random_folder(tmp_path_factory):
    config = hf.tiny_hf_config(vocab_size=32)   # a small vocabulary: the random MTP layer guesses some tokens
    folder = tmp_path_factory.mktemp("random")
    hf.save_hf_folder(folder, config, hf.random_hf_state_dict(config, seed=1))
    return folder


@pytest.fixture(scope="module")
def plain(random_folder):
    return build_ms_model(random_folder, batch_size=3)


@pytest.fixture(scope="module", params=[1, 2], ids=["k1", "k2"])
def spec(request, random_folder):
    return build_ms_model(random_folder, batch_size=3, num_speculative_tokens=request.param)


@pytest.fixture(scope="module")
def plain_greedy(plain):
    # the second batch runs row 1 into seq_length (64): no EOS stops it
    batches = [(PROMPTS, {}), ([[30, 2, 2, 2, 7], [4] * 50, [9, 9]], {"eos_token_id": [-1]})]
    return batches, [as_lists(plain.generate(padded(b), max_new_tokens=NEW, do_sample=False, **kw))
                     for b, kw in batches]


def test_greedy_equals_plain_greedy_on_a_random_model(spec, plain_greedy):
    batches, expected = plain_greedy
    drafted = accepted = 0
    for (batch, kwargs), want in zip(batches, expected):
        got = as_lists(spec.generate(padded(batch), max_new_tokens=NEW, do_sample=False, **kwargs))
        assert got == want
        stats = spec.speculative_stats
        drafted, accepted = drafted + stats["num_drafted"], accepted + stats["num_accepted"]
        assert 1.0 <= stats["tokens_per_forward"] <= spec.config.num_speculative_tokens + 1
    assert 0 < accepted < drafted   # both paths taken: kept drafts and rejected ones
    assert len(expected[1][1]) == 64   # the row that reached seq_length


def test_greedy_stops_at_eos_and_max_length_as_plain(spec, plain):
    prompt = padded(PROMPTS)
    want = as_lists(plain.generate(prompt, max_length=12, do_sample=False, eos_token_id=[3, 12]))
    assert as_lists(spec.generate(prompt, max_length=12, do_sample=False, eos_token_id=[3, 12])) == want


def _plain_cache_rows(model, tokens):
    """Teacher-forced plain decoding of `tokens` (one per step after a one-token prompt): per layer, the cache
    rows of positions 0 .. len-2 (the last token is never written)."""
    cfg = model.config
    mgr = BlockTables(cfg.num_blocks, cfg.block_size, cfg.seq_length)
    mgr.init_cache_engine(1)
    lengths = np.array([1], np.int32)
    first = np.full((1, cfg.seq_length), PAD, np.int32)
    first[0, 0] = tokens[0]
    tables, slots = mgr.assemble_pa_full_inputs(cfg.seq_length, lengths, [False])
    model.set_cache_phase(prefill=True)
    model(Tensor(first), batch_valid_length=Tensor(lengths.reshape(1, -1)), block_tables=Tensor(tables),
          slot_mapping=Tensor(slots))
    model.set_cache_phase(prefill=False)
    for token in tokens[1:-1]:
        lengths = lengths + 1
        tables, slots = mgr.assemble_pa_inc_inputs(lengths, [False])
        model(Tensor(np.array([[token]], np.int32)), batch_valid_length=Tensor(lengths.reshape(1, -1)),
              block_tables=Tensor(tables), slot_mapping=Tensor(slots))
    model.set_cache_phase(prefill=True)
    rows = _rows(model, mgr.cache_engines[0].block_table, len(tokens) - 1)
    mgr.clear_cache()
    return rows


def _rows(model, table, count, caches=None):
    caches = caches if caches is not None else [layer.self_attn.latent_cache for layer in model.model.layers]
    pos = np.arange(count)
    slots = np.asarray(table)[pos // model.config.block_size] * model.config.block_size + pos % model.config.block_size
    return [cache.asnumpy()[slots] for cache in caches]


def test_cache_after_rejected_drafts_equals_plain_decoding(random_folder):
    """The loop run without its final cache release: the main cache of each sequence equals plain decoding's
    at every position (the rejected drafts' slots were rewritten), and the MTP cache equals one MTP pass over
    the final tokens."""
    model = build_ms_model(random_folder, batch_size=1, num_speculative_tokens=2)
    prompt = np.array([[5, 9, 17, 3]], np.int32)
    gen, processors, warpers = speculative.resolve(model, None, {"max_new_tokens": 24, "do_sample": False}, prompt,
                                                   None)
    decoder = speculative.speculative_decoder(model)
    try:
        (tokens,) = decoder.run(prompt, gen, processors, warpers, None)
        assert model.speculative_stats["num_accepted"] < model.speculative_stats["num_drafted"]   # rejections
        table = list(model.block_mgr.cache_engines[0].block_table)
        main = _rows(model, table, len(tokens) - 1)
        mtp_cache = model.model.mtp[0].layer.self_attn.latent_cache
        # the MTP cache is final up to the last step's first position: position p holds (h_p, token p + 1)
        mtp_count = int(decoder.mtp_valid[0])
        assert mtp_count > len(prompt[0])
        mtp_rows = _rows(model, table, mtp_count, [mtp_cache])[0]
    finally:
        model.block_mgr.clear_cache()
    plain_rows = _plain_cache_rows(build_ms_model(random_folder, batch_size=1), tokens.tolist())
    for layer, (got, want) in enumerate(zip(main, plain_rows)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"layer {layer}")
    # one MTP pass over the final tokens (prefill hidden states, one extend of every position)
    ids = np.full((1, model.config.seq_length), PAD, np.int32)
    ids[0, :len(tokens)] = tokens
    model._set_block_mgr(1, model.config.seq_length)
    try:
        lengths = np.array([len(tokens)], np.int64)
        _, slots = model.block_mgr.assemble_pa_full_inputs(model.config.seq_length, lengths, [False])
        _, hidden = decoder.prefill(Tensor(ids), Tensor(lengths.astype(np.int32)), Tensor(slots))
        decoder._extend(model.block_mgr, hidden, ids, np.zeros(1, np.int64), lengths - 1, {0})
        want = _rows(model, model.block_mgr.cache_engines[0].block_table, mtp_count, [mtp_cache])[0]
    finally:
        model.block_mgr.clear_cache()
    np.testing.assert_allclose(mtp_rows, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sampling keeps the distribution
def _stock_probs(logits, temperature, top_k, top_p):
    """Stock sampling's distribution (temperature, then top-k, then top-p), written out in numpy."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(x.shape, bool)
    keep[order[:top_k]] = True
    probs = np.exp(x - x.max()) * keep
    probs /= probs.sum()
    cum = np.cumsum(probs[order])
    nucleus = np.zeros(x.shape, bool)
    nucleus[order[cum < top_p]] = True
    nucleus[order[0]] = True
    probs = probs * nucleus
    return probs / probs.sum()


def _exact_joint(model, prompt, temperature, top_k, top_p, vocab):
    """P(t1, t2, t3) of plain sampling, from a full forward of every prefix."""
    seqs = [prompt] + [prompt + [a] for a in range(vocab)] + [prompt + [a, b] for a in range(vocab)
                                                              for b in range(vocab)]
    ids = np.full((len(seqs), model.config.seq_length), PAD, np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    logits = model.forward_logits(ids)
    dist = lambda i: _stock_probs(logits[i, len(seqs[i]) - 1], temperature, top_k, top_p)  # noqa: E731
    p1 = dist(0)
    joint = np.zeros((vocab,) * 3)
    for a in range(vocab):
        p2 = dist(1 + a)
        for b in range(vocab):
            joint[a, b] = p1[a] * p2[b] * dist(1 + vocab + a * vocab + b)
    return joint


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    config = hf.tiny_hf_config(vocab_size=8)
    folder = tmp_path_factory.mktemp("vocab8")
    hf.save_hf_folder(folder, config, hf.random_hf_state_dict(config, seed=4))
    return build_ms_model(folder, batch_size=16, seq_length=32, num_blocks=32, num_speculative_tokens=2)


def test_sampling_keeps_the_distribution(sampler):
    from scipy.stats import chisquare
    prompt, vocab, settings = [5, 2, 7], 8, dict(temperature=0.7, top_k=6, top_p=0.95)
    counts, drafted, accepted = np.zeros((vocab,) * 3), 0, 0
    for call in range(100):
        out = sampler.generate([prompt] * 16, max_new_tokens=3, do_sample=True, seed=1000 + call,
                               eos_token_id=[-1], **settings)
        for row in out:
            counts[tuple(int(t) for t in row[len(prompt):len(prompt) + 3])] += 1
        drafted += sampler.speculative_stats["num_drafted"]
        accepted += sampler.speculative_stats["num_accepted"]
    assert 0 < accepted < drafted
    n = counts.sum()

    def p_value(joint):
        expected = joint.reshape(-1) * n
        observed = counts.reshape(-1)
        assert observed[expected == 0].sum() == 0 or joint is not exact   # nothing outside top-k / top-p
        big = expected >= 5
        obs = np.append(observed[big], observed[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue

    exact = _exact_joint(sampler, prompt, vocab=vocab, **settings)
    assert p_value(exact) > 1e-3
    # the test can tell distributions apart: the same samples against temperature 1.0
    wrong = _exact_joint(sampler, prompt, vocab=vocab, temperature=1.0, top_k=6, top_p=0.95)
    assert p_value(wrong) < 1e-6


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("keys, words", [
    (dict(use_past=False), "use_past"),
    (dict(use_past=True, num_nextn_predict_layers=0), "num_nextn_predict_layers=0"),
])
def test_refused_without_cache_or_mtp(keys, words):
    with pytest.raises(ConfigError, match="num_speculative_tokens=2") as err:
        DeepseekV3Config(num_speculative_tokens=2, **keys)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_refused_through_the_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTER_PATH", REGISTER_DIR)
    monkeypatch.chdir(tmp_path)   # auto_register copies the shim under ./modules
    cfg = training_config(FINETUNE_YAML, tmp_path, num_speculative_tokens=1)   # training YAML: use_past False
    with pytest.raises(ConfigError, match="num_speculative_tokens=1 needs use_past"):
        AutoModel.from_config(cfg)


def test_planner_counts_the_mtp_cache():
    from mindformers_dsv3.planner.plan import make_plan
    base = dict(hf.tiny_hf_config(), use_past=True, seq_length=64, block_size=16, num_blocks=16,
                compute_dtype="float32", param_init_type="float32")
    plans = [make_plan(DeepseekV3Config(**base, num_speculative_tokens=k), devices=1, device_memory="64GB")
             for k in (0, 2)]
    off, on = (p.stages[-1] for p in plans)
    per_layer = (base["kv_lora_rank"] + base["qk_rope_head_dim"]) * 4
    assert on.cache_bytes_per_token - off.cache_bytes_per_token == per_layer * base["num_nextn_predict_layers"]
    assert on.weight_bytes == off.weight_bytes   # the MTP weights are counted either way
    assert any(name.startswith("model.mtp.") for s in off.shards for name in [s.name])


# ----------------------------------------------------------------------------- the demo-trained tiny model
TRAINED_NEW = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's model: configs/tiny/finetune_deepseek3_tiny.yaml as shipped (80 steps, MTP loss) through
    stock Trainer; yields (work folder, final checkpoint outside rank_0/, the synthetic language)."""
    path = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTER_PATH", REGISTER_DIR)
        mp.chdir(path)
        cfg = training_config(FINETUNE_YAML, path / "train")
        build_context(cfg)
        Trainer(cfg).train()
        found = checkpoints(cfg.output_dir)
        ckpt = standalone_copy(found[max(found)], path / "final")
        loader = cfg.train_dataset.data_loader
        yield path, ckpt, SyntheticLanguage(loader.vocab_size, seed=loader.seed, noise=loader.noise)


def _predict_config(path, k, batch_size=1):
    cfg = training_config(FINETUNE_YAML, path / f"predict_k{k}", use_past=True, batch_size=batch_size,
                          num_speculative_tokens=k, max_decode_length=64)
    cfg.run_mode = "predict"
    return cfg


def _trained_model(path, ckpt, k, batch_size):
    import mindspore as ms
    model = AutoModel.from_config(_predict_config(path, k, batch_size))
    ms.load_param_into_net(model, ms.load_checkpoint(ckpt, format="safetensors"))
    model.set_train(False)
    return model


def _language_prompts(language, words=(2, 4, 6)):
    return [language.decode(language.prompt(i, n)) for i, n in enumerate(words)]


def _expected(language, prompt, new):
    return prompt + " " + language.decode(language.continuation(language.encode(prompt), new))


def test_trained_model_greedy_equals_plain_through_generate_and_pipeline(trained):
    path, ckpt, language = trained
    tokenizer = build_tokenizer(_predict_config(path, 0).processor.tokenizer)
    prompts = _language_prompts(language)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) == 3   # ragged
    results = {}
    for k in (0, 1, 2):
        model = _trained_model(path, ckpt, k, batch_size=3)
        tokens = as_lists(model.generate(padded(ids), max_new_tokens=TRAINED_NEW, do_sample=False))
        generator = pipeline("text_generation", model=model, tokenizer=tokenizer)
        texts = [t for out in generator(prompts, max_new_tokens=TRAINED_NEW, do_sample=False)
                 for t in out["text_generation_text"]]
        results[k] = (tokens, texts, getattr(model, "speculative_stats", None))
    for k in (1, 2):
        assert results[k][:2] == results[0][:2]
        stats = results[k][2]
        assert stats["acceptance_rate"] >= 0.7, stats     # the trained MTP layer drafts well
        assert stats["tokens_per_forward"] > 1.5, stats
    assert results[0][1] == [_expected(language, p, TRAINED_NEW) for p in prompts]


def test_trained_model_through_trainer_predict(trained):
    path, ckpt, language = trained
    cfg = _predict_config(path, 2)
    cfg.load_checkpoint = ckpt
    cfg.model.model_config.max_decode_length = 1 + 4 + TRAINED_NEW   # BOS + prompt + new
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTER_PATH", REGISTER_DIR)
        mp.chdir(path)
        build_context(cfg)
        prompts = [language.decode(language.prompt(i, 4)) for i in range(2)]
        outputs = Trainer(cfg).predict(predict_checkpoint=ckpt, input_data=prompts)
    assert [o["text_generation_text"][0] for o in outputs] == [_expected(language, p, TRAINED_NEW) for p in prompts]


def test_trained_model_through_the_stock_predict_script(trained, tmp_path):
    """run_mindformer.py (MINDFORMERS_HOME) or its stand-in tests/dist/stock_predict.py on a predict YAML with the
    key (stock --options cannot set a boolean: `use_past=True` parses as False, so the YAML carries the keys)."""
    import json
    import yaml
    from mindformers import MindFormerConfig
    path, ckpt, language = trained
    home = os.environ.get("MINDFORMERS_HOME")
    script = os.path.join(home, "run_mindformer.py") if home else os.path.join(ROOT, "tests", "dist", "stock_predict.py")
    data = json.loads(json.dumps(MindFormerConfig(FINETUNE_YAML)))
    data["run_mode"] = "predict"
    data["processor"]["tokenizer"]["tokenizer_file"] = TOKENIZER_FILE
    data["model"]["model_config"].update(use_past=True, batch_size=1, max_decode_length=1 + 4 + TRAINED_NEW,
                                         num_speculative_tokens=2)
    config = tmp_path / "predict_speculative.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    prompt = language.decode(language.prompt(5, 4))
    cmd = [sys.executable, script, "--config", str(config), "--register_path", REGISTER_DIR,
           *(["--run_mode", "predict"] if home else []), "--load_checkpoint", ckpt, "--predict_data", prompt]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = (tmp_path / "text_generation_result.txt").read_text(encoding="utf-8")
    assert _expected(language, prompt, TRAINED_NEW) in result, result
    assert "speculative decoding (num_speculative_tokens=2)" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- msrun split inference
def test_msrun_split_predict_with_speculation_equals_plain(tmp_path, random_folder):
    """The shipped tiny predict YAML through the stock predict script: one process without speculation, then
    msrun TP=2 with num_speculative_tokens=2; the same text."""
    from tests.conftest import free_port, msrun_env
    home = os.environ.get("MINDFORMERS_HOME")
    script = os.path.join(home, "run_mindformer.py") if home else os.path.join(ROOT, "tests", "dist", "stock_predict.py")
    yaml = os.path.join(ROOT, "configs", "tiny", "predict_deepseek3_tiny.yaml")
    folder = tmp_path / "hf"
    config = hf.tiny_hf_config()   # the YAML's vocabulary (128)
    hf.save_hf_folder(folder, config, hf.random_hf_state_dict(config, seed=5))
    common = ["--config", yaml, "--register_path", REGISTER_DIR, "--predict_data", "bi bep bop"]
    texts = {}
    for name, launcher, extra in (
            ("plain", [sys.executable], []),
            ("msrun", [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
                       f"--master_port={free_port()}", "--join=True", f"--log_dir={tmp_path / 'logs'}"],
             ["--use_parallel", "True", "--options", f"model.model_config.checkpoint_name_or_path={folder}",
              "model.model_config.num_speculative_tokens=2", "parallel_config.model_parallel=2"])):
        work = tmp_path / name
        work.mkdir()
        options = extra if extra else ["--options", f"model.model_config.checkpoint_name_or_path={folder}"]
        proc = subprocess.run([*launcher, script, *common, *options], cwd=work, capture_output=True, text=True,
                              env=msrun_env(PYTHONPATH=ROOT), timeout=1500)
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-2000:])
        texts[name] = (work / "text_generation_result.txt").read_text(encoding="utf-8")
    assert "text_generation_text" in texts["plain"] and texts["msrun"] == texts["plain"]
    for rank in (0, 1):   # both ranks drafted and verified
        log = (tmp_path / "logs" / f"worker_{rank}.log").read_text(encoding="utf-8", errors="replace")
        assert "speculative decoding (num_speculative_tokens=2)" in log
