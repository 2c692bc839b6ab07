"""DeepSeek-V3 and DeepSeek-R1 chat templates, rendered by Jinja as ``transformers`` renders them.

The released checkpoints ship their chat format as a Jinja template (``chat_template`` in
``tokenizer_config.json``). The two sources are shipped verbatim as package data
(``templates/deepseek_v3.jinja``, ``templates/deepseek_r1.jinja``) and every template, these two or
a user's own, is rendered in a Jinja environment set up like transformers' ``apply_chat_template``
(4.51): ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks``,
the ``loopcontrols`` extension and the ``{% generation %}`` block, the globals ``raise_exception`` and ``strftime_now``, and a
``tojson`` filter that does not escape HTML. So a prompt built here is the prompt transformers
builds from the same files, quirks of the templates included; ``tests/test_tokenizer.py`` checks
it against the real files. Where the template fails (a message without ``content``, tool-call
``arguments`` that are not a string), Jinja's error propagates, as in transformers.
"""
import datetime
import difflib
import functools
import json
import os
import re
from collections.abc import Mapping

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["BOS_TOKEN", "V3_CHAT_TEMPLATE", "R1_CHAT_TEMPLATE", "TEMPLATE_KINDS", "check_template_text",
           "compile_template", "detect_template_kind", "jinja_template_for", "render_chat"]

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
TEMPLATE_KINDS = ("v3", "r1")
_TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def _read_template(kind):
    # newline="": the V3 source has raw newlines inside string literals; keep every byte as shipped
    with open(os.path.join(_TEMPLATE_DIR, f"deepseek_{kind}.jinja"), "r", encoding="utf-8", newline="") as f:
        return f.read()


# The Jinja sources of the released tokenizer_config.json files ("chat_template"), verbatim.
V3_CHAT_TEMPLATE = _read_template("v3")
R1_CHAT_TEMPLATE = _read_template("r1")
_JINJA = {"v3": V3_CHAT_TEMPLATE, "r1": R1_CHAT_TEMPLATE}


def _fingerprint(template):
    # A newline inside a Jinja string literal means the same as the escape "\n" (the V3 file has
    # the former, the R1 file the latter); whitespace between tags renders to nothing here.
    return re.sub(r"\s+", "", template.replace("\n", "\\n"))


_FINGERPRINTS = {_fingerprint(src): kind for kind, src in _JINJA.items()}


@functools.lru_cache(maxsize=32)
def detect_template_kind(template):
    """``"v3"`` or ``"r1"`` when ``template`` is one of the two known Jinja templates (up to
    whitespace), else ``None``. The names themselves are accepted too."""
    if not isinstance(template, str):
        return None
    if template.lower() in TEMPLATE_KINDS:
        return template.lower()
    return _FINGERPRINTS.get(_fingerprint(template))


def check_template_text(template, key="chat_template"):
    """Refuse a string that is neither a kind name nor a Jinja template (no ``{{``, ``{%`` or ``{#``):
    Jinja would render it as literal text, so a typo of a kind name (``"deepseek-v3"``) would become
    the prompt. The message names the closest kind."""
    if template.lower() in TEMPLATE_KINDS or any(mark in template for mark in ("{{", "{%", "{#")):
        return template
    lowered = template.strip().lower()
    inside = [kind for kind in TEMPLATE_KINDS if kind in lowered]
    close = inside if len(inside) == 1 else difflib.get_close_matches(lowered, TEMPLATE_KINDS, n=1, cutoff=0.3)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{key}={template!r} is neither a template kind ({', '.join(map(repr, TEMPLATE_KINDS))}) nor a "
                     f"Jinja template (it has no {{{{ }}}} or {{% %}} markup: it would render as literal text){hint}")


def jinja_template_for(kind):
    """The verbatim Jinja source of ``kind`` (``"v3"`` or ``"r1"``)."""
    if kind not in _JINJA:
        raise ValueError(f"chat template kind must be one of {TEMPLATE_KINDS}, got {kind!r}")
    return _JINJA[kind]


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' ``tojson``: plain ``json.dumps`` (Jinja's own filter escapes ``<``, ``>``, ``&``, ``'``)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it for
    ``return_assistant_tokens_mask``, which is not offered here): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.lru_cache(maxsize=32)
def compile_template(source):
    """The compiled Jinja template of ``source``, in transformers' chat-template environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(template, messages, add_generation_prompt=False, bos_token=BOS_TOKEN, **variables):
    """Render ``messages`` (a list of ``{"role", "content", ...}`` dicts) with ``template``: a kind
    (``"v3"``, ``"r1"``) or a Jinja source. ``variables`` (``tools``, ``eos_token``, ...) are passed
    to the template as transformers passes them."""
    if isinstance(messages, (str, Mapping)) or not hasattr(messages, "__iter__"):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    source = jinja_template_for(template.lower()) if template.lower() in TEMPLATE_KINDS else template
    return compile_template(source).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                           bos_token=bos_token, **variables)
