"""``DeepseekV3Tokenizer``: the DeepSeek-V3 / R1 ``tokenizer.json`` for stock MindFormers.

A MindFormers ``PreTrainedTokenizerFast`` (so ``pipeline("text_generation")``, ``Trainer`` and the
dataset loaders use it like any built-in tokenizer) over the ``tokenizers`` model in
``tokenizer.json``. It encodes exactly like ``transformers.AutoTokenizer`` on the same folder (a
``LlamaTokenizerFast`` that prepends BOS), and renders chats with the released V3 / R1 Jinja
templates (shipped verbatim, ``chat_templates.py``) in transformers' Jinja environment.

YAML::

    processor:
      tokenizer:
        type: DeepseekV3Tokenizer
        tokenizer_file: /path/to/DeepSeek-V3/tokenizer.json
        # tokenizer_config_file: optional; defaults to the tokenizer_config.json next to it
        # chat_template: v3 | r1   (optional; by default recognised from tokenizer_config.json)

Python::

    tok = DeepseekV3Tokenizer.from_pretrained("/path/to/DeepSeek-R1")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)

Differences from the MindFormers / transformers defaults worth knowing: ``padding_side`` is
``"right"`` (transformers' ``LlamaTokenizerFast`` pads left; MindFormers' ``generate`` expects right
padding), ``vocab_size`` is the base vocabulary (128,000, as in transformers) and ``len(tokenizer)``
counts the added tokens too (128,815). ``save_pretrained`` always writes the HuggingFace layout
(``tokenizer.json`` + ``tokenizer_config.json``) so the folder stays loadable by transformers.
"""
import json
import os

from tokenizers import Tokenizer, processors
from mindformers.models.tokenization_utils_fast import PreTrainedTokenizerFast
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .paths import find_data_file
from .chat_templates import (BOS_TOKEN, TEMPLATE_KINDS, check_template_text, detect_template_kind,
                             jinja_template_for, render_chat)

__all__ = ["DeepseekV3Tokenizer"]

EOS_TOKEN = "<｜end▁of▁sentence｜>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def _token_content(token):
    """A special token from tokenizer_config.json: a string or an ``{"__type": "AddedToken", ...}`` dict."""
    if isinstance(token, dict):
        return token.get("content")
    return None if token is None else str(token)


def _read_json(path, key):
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"DeepseekV3Tokenizer: {key} '{path}' is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"DeepseekV3Tokenizer: {key} '{path}' holds a JSON {type(data).__name__}, not an object")
    return data


def _load_backend(path):
    """The ``tokenizers`` model of a tokenizer.json; a file it cannot read is named in the error."""
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise ValueError(f"DeepseekV3Tokenizer: tokenizer_file '{path}' is not a valid tokenizer.json "
                         f"({e})") from None


def _check_special_tokens(backend, path, tokens):
    """Each special token must already be in the vocabulary: MindFormers would add a missing one as a
    new id the model never saw."""
    for name, token in tokens.items():
        if token is not None and backend.token_to_id(token) is None:
            raise ValueError(f"DeepseekV3Tokenizer: {name} {token!r} is not in the vocabulary of {path}; "
                             f"set {name} to a token of that file (the DeepSeek tokens are {BOS_TOKEN!r} and "
                             f"{EOS_TOKEN!r})")


def _resolve_tokenizer_file(tokenizer_file, vocab_file):
    # Upstream YAMLs set both vocab_file and tokenizer_file to tokenizer.json: accept either.
    key = "tokenizer_file"
    if tokenizer_file is None and vocab_file is not None and str(vocab_file).endswith(".json"):
        key, tokenizer_file = "vocab_file", vocab_file
    if tokenizer_file is None:
        raise ValueError("DeepseekV3Tokenizer: tokenizer_file is not set; point it at the checkpoint's "
                         "tokenizer.json (YAML: processor.tokenizer.tokenizer_file)")
    # a relative path missing from the working directory is taken from the plugin's data root (wheel installs)
    path = find_data_file(os.fspath(tokenizer_file))
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepseekV3Tokenizer: {key} '{path}' does not exist "
                                f"(YAML: processor.tokenizer.{key})")
    return os.path.realpath(path)


def _resolve_config_file(tokenizer_config_file, tokenizer_file):
    """``False``: no config. ``None``: the tokenizer_config.json next to tokenizer.json, if any."""
    if tokenizer_config_file is False:
        return None
    if tokenizer_config_file is None:
        sibling = os.path.join(os.path.dirname(tokenizer_file), TOKENIZER_CONFIG_FILE)
        return sibling if os.path.isfile(sibling) else None
    path = os.fspath(tokenizer_config_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepseekV3Tokenizer: tokenizer_config_file '{path}' does not exist "
                                f"(YAML: processor.tokenizer.tokenizer_config_file)")
    return path


def _first(*values):
    for value in values:
        if value is not None:
            return value
    return None


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class DeepseekV3Tokenizer(PreTrainedTokenizerFast):
    """The DeepSeek-V3 / DeepSeek-R1 tokenizer (byte-level BPE, 128,815 ids).

    Args:
        tokenizer_file (str): path of ``tokenizer.json`` (or of the folder holding it). ``vocab_file``
            is accepted as an alias, as upstream YAMLs use it.
        tokenizer_config_file (str, optional): path of ``tokenizer_config.json``. ``None`` (default)
            uses the one next to ``tokenizer_file`` when there is one; ``False`` uses none.
        add_bos_token (bool, optional): prepend BOS on ``encode``/``__call__`` with
            ``add_special_tokens=True``. Default: the config's, else ``True``.
        add_eos_token (bool, optional): append EOS likewise. Default: the config's, else ``False``.
        chat_template (str, optional): ``"v3"``, ``"r1"`` (the released templates, shipped with the
            package), a Jinja template, or ``None`` for the config's template.
        bos_token, eos_token, pad_token (str, optional): default to the config's, else
            ``<｜begin▁of▁sentence｜>``, ``<｜end▁of▁sentence｜>`` and the EOS token.
        padding_side (str): ``"right"`` (default) or ``"left"``.
        **kwargs: passed on to MindFormers' ``PreTrainedTokenizerFast`` (``model_max_length``,
            ``truncation_side``, ``clean_up_tokenization_spaces``, ...).

    Raises:
        FileNotFoundError: a file named by ``tokenizer_file`` / ``tokenizer_config_file`` is missing;
            the message names the key and the path.
    """

    # Empty on purpose: MindFormers' build_tokenizer insists on a `vocab_file` key in the YAML for
    # any tokenizer class that declares vocabulary files.
    vocab_files_names = {}
    model_input_names = ["input_ids", "attention_mask"]
    FILE_LIST = [TOKENIZER_CONFIG_FILE]
    padding_side = "right"

    def __init__(self, tokenizer_file=None, tokenizer_config_file=None, add_bos_token=None,
                 add_eos_token=None, chat_template=None, bos_token=None, eos_token=None, pad_token=None,
                 **kwargs):
        tokenizer_file = _resolve_tokenizer_file(tokenizer_file, kwargs.pop("vocab_file", None))
        config_path = _resolve_config_file(tokenizer_config_file, tokenizer_file)
        config = _read_json(config_path, "tokenizer_config_file") if config_path else {}

        bos_token = _first(bos_token, _token_content(config.get("bos_token")), BOS_TOKEN)
        eos_token = _first(eos_token, _token_content(config.get("eos_token")), EOS_TOKEN)
        pad_token = _first(pad_token, _token_content(config.get("pad_token")), eos_token)
        add_bos_token = bool(_first(add_bos_token, config.get("add_bos_token"), True))
        add_eos_token = bool(_first(add_eos_token, config.get("add_eos_token"), False))
        chat_template = self._resolve_chat_template(_first(chat_template, config.get("chat_template")))
        for key in ("model_max_length", "clean_up_tokenization_spaces"):
            if key in config and config[key] is not None:
                kwargs.setdefault(key, config[key])
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("name_or_path", os.path.dirname(tokenizer_file))
        for key in ("tokenizer_object", "from_slow", "__slow_tokenizer"):
            kwargs.pop(key, None)

        backend = _load_backend(tokenizer_file)
        _check_special_tokens(backend, tokenizer_file, {"bos_token": bos_token, "eos_token": eos_token,
                                                        "pad_token": pad_token})
        # Padding / truncation stored in the file would silently override ours: drop them.
        backend.no_padding()
        backend.no_truncation()
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        super().__init__(
            tokenizer_object=backend,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            unk_token=None,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            chat_template=chat_template,
            **kwargs,
        )
        self.tokenizer_file = tokenizer_file
        self.tokenizer_config_file = config_path
        for name in ("bos_token", "eos_token", "pad_token"):
            if self.convert_tokens_to_ids(getattr(self, name)) is None:
                raise ValueError(f"DeepseekV3Tokenizer: {name} {getattr(self, name)!r} is not in {tokenizer_file}")
        self.update_post_processor()

    @staticmethod
    def _resolve_chat_template(chat_template):
        if chat_template is None:
            return None
        if isinstance(chat_template, (list, tuple)):  # transformers' named templates: use "default"
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default")
            if chat_template is None:
                raise ValueError(f"chat_template lists no 'default' template (names: {sorted(map(str, named))})")
        if not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be 'v3', 'r1', a Jinja string or None, got {type(chat_template)}")
        if chat_template.lower() in TEMPLATE_KINDS:
            return jinja_template_for(chat_template.lower())
        return check_template_text(chat_template)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, name_or_path=None, *args, **kwargs):
        """Load from a folder holding ``tokenizer.json`` (and usually ``tokenizer_config.json``), or
        from a ``tokenizer.json`` path. Keyword arguments override the config."""
        if args:
            raise TypeError("DeepseekV3Tokenizer.from_pretrained takes keyword arguments only after the path")
        name_or_path = _first(kwargs.pop("pretrained_model_name_or_path", None), name_or_path)
        if name_or_path is None:
            raise ValueError("DeepseekV3Tokenizer.from_pretrained needs a folder or a tokenizer.json path")
        path = os.fspath(name_or_path)
        if os.path.isdir(path):
            kwargs.setdefault("tokenizer_config_file", None)
            return cls(tokenizer_file=os.path.join(path, TOKENIZER_FILE), **kwargs)
        if os.path.isfile(path):
            return cls(tokenizer_file=path, **kwargs)
        raise FileNotFoundError(f"DeepseekV3Tokenizer.from_pretrained: '{path}' is neither a folder nor a file")

    def save_pretrained(self, save_directory=None, save_name=None, file_format=None, save_json=True, **kwargs):
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (the HuggingFace layout, loadable by
        ``transformers.AutoTokenizer`` and by ``from_pretrained``), whatever ``file_format`` says.
        Returns the two paths."""
        del save_name, file_format, save_json
        if save_directory is None:
            raise ValueError("save_pretrained needs a save_directory")
        prefix = kwargs.pop("filename_prefix", None)
        prefix = f"{prefix}-" if prefix else ""
        os.makedirs(save_directory, exist_ok=True)
        backend = Tokenizer.from_str(self._tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        tokenizer_path = os.path.join(save_directory, prefix + TOKENIZER_FILE)
        backend.save(tokenizer_path)
        config = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "legacy": True,
            "model_max_length": self.model_max_length,
            # transformers has no DeepseekV3Tokenizer; this keeps the folder loadable there.
            "tokenizer_class": "LlamaTokenizerFast",
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config_path = os.path.join(save_directory, prefix + TOKENIZER_CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return tokenizer_path, config_path

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """The whole vocabulary lives in ``tokenizer.json``."""
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        path = os.path.join(save_directory, prefix + TOKENIZER_FILE)
        backend = Tokenizer.from_str(self._tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        backend.save(path)
        return (path,)

    # ------------------------------------------------------------------ special tokens
    def update_post_processor(self):
        """Make the backend add BOS / EOS as ``add_bos_token`` / ``add_eos_token`` say."""
        bos, eos = self.bos_token, self.eos_token
        if self.add_bos_token and bos is None:
            raise ValueError("add_bos_token = True but bos_token = None")
        if self.add_eos_token and eos is None:
            raise ValueError("add_eos_token = True but eos_token = None")
        def sequence(name, type_id):
            parts = [f"{bos}:{type_id}"] if self.add_bos_token else []
            parts.append(f"${name}:{type_id}")
            if self.add_eos_token:
                parts.append(f"{eos}:{type_id}")
            return " ".join(parts)

        single = sequence("A", 0)
        pair = f"{single} {sequence('B', 1)}"
        special = []
        if self.add_bos_token:
            special.append((bos, self.bos_token_id))
        if self.add_eos_token:
            special.append((eos, self.eos_token_id))
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                       special_tokens=special)

    @property
    def add_bos_token(self):
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value):
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self):
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value):
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """BOS/EOS around each sequence, as the post-processor does (used by ``prepare_for_model``)."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output = output + bos + list(token_ids_1) + eos
        return output

    # ------------------------------------------------------------------ chat
    @property
    def chat_template_kind(self):
        """``"v3"`` or ``"r1"`` when the chat template is one of those, else ``None``."""
        return detect_template_kind(self.chat_template) if self.chat_template else None

    def apply_chat_template(self, conversation=None, tools=None, documents=None, chat_template=None,
                            add_generation_prompt=False, continue_final_message=False, tokenize=True,
                            padding=False, truncation=False, max_length=None, return_tensors=None,
                            return_dict=False, tokenizer_kwargs=None, **kwargs):
        """Render a conversation (a list of ``{"role", "content"}`` dicts, or a list of them) with
        the V3 / R1 chat format, like ``transformers``' method of the same name.

        Every template is rendered by Jinja as transformers renders it (``chat_templates.py``);
        ``tools``, ``documents`` and extra keyword arguments reach the template (the V3 and R1
        templates do not show tool schemas). ``chat_template`` (``"v3"``, ``"r1"`` or Jinja)
        overrides the tokenizer's.
        Returns the string (``tokenize=False``), the ids (encoded without adding BOS again: the
        template writes it), or the ``BatchEncoding`` (``return_dict=True``).
        """
        if conversation is None:
            conversation = kwargs.pop("messages", None)
        if conversation is None:
            raise ValueError("apply_chat_template needs a conversation (a list of message dicts)")
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise TypeError(f"tools must be a list, got {type(tools).__name__}")
        template = self._resolve_chat_template(chat_template) if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("DeepseekV3Tokenizer has no chat template: pass chat_template='v3' or 'r1' "
                             "(or a tokenizer_config.json that has one)")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        if hasattr(conversation, "messages"):
            conversation = conversation.messages
        is_batched = (isinstance(conversation, (list, tuple)) and len(conversation) > 0
                      and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")))
        chats = conversation if is_batched else [conversation]
        variables = {**self.special_tokens_map, **kwargs}   # as transformers: kwargs override special tokens
        rendered = []
        for chat in chats:
            chat = chat.messages if hasattr(chat, "messages") else chat
            text = render_chat(template, chat, add_generation_prompt=add_generation_prompt, tools=tools,
                               documents=documents, **variables)
            if continue_final_message:
                text = self._cut_after_final_message(text, chat)
            rendered.append(text)
        if not is_batched:
            rendered = rendered[0]
        if not tokenize:
            return rendered
        out = self(rendered, padding=padding, truncation=truncation, max_length=max_length,
                   add_special_tokens=False, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]

    @staticmethod
    def _cut_after_final_message(text, chat):
        """transformers' ``continue_final_message``: end the prompt right after the last message's text."""
        final = chat[-1]["content"]
        if not isinstance(final, str) or final.strip() not in text:
            raise ValueError("continue_final_message is set but the final message does not appear in the "
                             "rendered chat (the template may drop part of it)")
        loc = text.rindex(final.strip())
        if text[loc:loc + len(final.lstrip())] == final:
            return text[:loc + len(final.lstrip())]
        return text[:loc + len(final.strip())]
