"""DeepSeek-V3 and DeepSeek-R1 chat rendering, written in Python.

The released checkpoints ship their chat format as a Jinja template in ``tokenizer_config.json``.
``render_v3`` and ``render_r1`` produce exactly what those two templates produce (as rendered by
``transformers``' ``apply_chat_template``), quirks included, so that prompts built here tokenize
to the ids the model was trained on. ``tests/test_tokenizer.py`` checks the equality against the
real files. Quirks of the originals that are kept on purpose:

* Every system message is hoisted to the front (after BOS), joined with a blank line.
* V3: an assistant turn with ``tool_calls`` is rendered only when its ``content`` is ``None``
  (with any other content the calls are dropped); ``<｜tool▁calls▁end｜><｜end▁of▁sentence｜>``
  follows each call after the first, and never follows a single call.
* V3 and R1: once a tool call was rendered, the first call of later assistant turns starts with
  ``"\\n<｜tool▁call▁begin｜>"`` (the template's ``ns.is_first`` is never reset), and the same goes
  for tool outputs (``ns.is_output_first``).
* R1: the text up to the last ``</think>`` of an assistant turn is dropped unless the turn follows
  tool outputs; the generation prompt is ``<｜Assistant｜><think>\\n``.

Where the Jinja template would fail (a missing ``content``, ``arguments`` that is not a string,
...), these functions raise as well: ``KeyError`` for a missing field, ``TypeError`` for a wrong
type.

``V3_CHAT_TEMPLATE`` and ``R1_CHAT_TEMPLATE`` are the Jinja sources, verbatim; they are written
back to ``tokenizer_config.json`` on save and used to recognise a template (``detect_template_kind``).
"""
import difflib
import functools
import re
from collections.abc import Mapping

__all__ = [
    "BOS_TOKEN",
    "V3_CHAT_TEMPLATE",
    "R1_CHAT_TEMPLATE",
    "TEMPLATE_KINDS",
    "check_template_text",
    "detect_template_kind",
    "jinja_template_for",
    "render_v3",
    "render_r1",
    "render_chat",
]

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"

# The Jinja sources of tokenizer_config.json ("chat_template"), verbatim: DeepSeek-V3 and DeepSeek-R1.
V3_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + "
    "tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + "
    "'\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    "{% endif %}"
)

R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}"
    "{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + "
    "'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    "{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}"
    "{% endif %}"
)

TEMPLATE_KINDS = ("v3", "r1")
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


class _Missing:
    """A field the message does not have (Jinja's Undefined)."""

    def __init__(self, where):
        self.where = where


def _get(obj, key, where):
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    return _Missing(f"{where}[{key!r}]")


def _text(value):
    """A value that the template concatenates to a string: it must be a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, _Missing):
        raise KeyError(f"chat template: {value.where} is missing")
    raise TypeError(f"chat template: expected a string, got {type(value).__name__}: {value!r}")


def _iter_tool_calls(message, where):
    calls = _get(message, "tool_calls", where)
    if isinstance(calls, _Missing):  # Jinja iterates an undefined value as empty
        return []
    if isinstance(calls, (str, Mapping)) or not hasattr(calls, "__iter__"):
        raise TypeError(f"chat template: {where}['tool_calls'] must be a list, got {type(calls).__name__}")
    return list(calls)


def _tool_call(tool, where):
    """``type<｜tool▁sep｜>name\\n```json\\narguments\\n```<｜tool▁call▁end｜>``"""
    function = _get(tool, "function", where)
    name = _text(_get(function, "name", f"{where}['function']"))
    arguments = _text(_get(function, "arguments", f"{where}['function']"))
    return _text(_get(tool, "type", where)) + SEP + name + "\n```json\n" + arguments + "\n```" + CALL_END


def _system_prompt(messages):
    prompt, first = "", True
    for i, message in enumerate(messages):
        if _get(message, "role", "message") == "system":
            content = _text(_get(message, "content", f"messages[{i}]"))
            prompt = prompt + content if first else prompt + "\n\n" + content
            first = False
    return prompt


def render_v3(messages, add_generation_prompt=False, bos_token=BOS_TOKEN):
    """The DeepSeek-V3 chat template (``V3_CHAT_TEMPLATE``), rendered in Python."""
    out = [_text(bos_token), _system_prompt(messages)]
    is_first, is_tool, is_output_first = False, False, True
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = _get(message, "role", where)
        content = _get(message, "content", where)
        if role == "user":
            is_tool = False
            out.append(USER + _text(content))
        elif role == "assistant" and content is None:
            is_tool = False
            for j, tool in enumerate(_iter_tool_calls(message, where)):
                call = _tool_call(tool, f"{where}['tool_calls'][{j}]")
                if not is_first:
                    out.append(ASSISTANT + CALLS_BEGIN + CALL_BEGIN + call)
                    is_first = True
                else:
                    out.append("\n" + CALL_BEGIN + call + CALLS_END + EOS)
        elif role == "assistant":
            if is_tool:
                out.append(OUTPUTS_END + _text(content) + EOS)
                is_tool = False
            else:
                out.append(ASSISTANT + _text(content) + EOS)
        elif role == "tool":
            is_tool = True
            if is_output_first:
                out.append(OUTPUTS_BEGIN + OUTPUT_BEGIN + _text(content) + OUTPUT_END)
                is_output_first = False
            else:
                out.append("\n" + OUTPUT_BEGIN + _text(content) + OUTPUT_END)
    if is_tool:
        out.append(OUTPUTS_END)
    if add_generation_prompt and not is_tool:
        out.append(ASSISTANT)
    return "".join(out)


def render_r1(messages, add_generation_prompt=False, bos_token=BOS_TOKEN):
    """The DeepSeek-R1 chat template (``R1_CHAT_TEMPLATE``), rendered in Python."""
    out = [_text(bos_token), _system_prompt(messages)]
    is_first, is_tool, is_output_first = False, False, True
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = _get(message, "role", where)
        content = _get(message, "content", where)
        if role == "user":
            is_tool = False
            out.append(USER + _text(content))
        elif role == "assistant" and isinstance(message, Mapping) and "tool_calls" in message:
            is_tool = False
            calls = message["tool_calls"]
            if calls is None or isinstance(calls, (str, Mapping)):
                raise TypeError(f"chat template: {where}['tool_calls'] must be a list, got {type(calls).__name__}")
            for j, tool in enumerate(calls):
                call = _tool_call(tool, f"{where}['tool_calls'][{j}]")
                if not is_first:
                    head = ASSISTANT if content is None else ASSISTANT + _text(content)
                    out.append(head + CALLS_BEGIN + CALL_BEGIN + call)
                    is_first = True
                else:
                    out.append("\n" + CALL_BEGIN + call)
            out.append(CALLS_END + EOS)
        elif role == "assistant":
            if is_tool:
                out.append(OUTPUTS_END + _text(content) + EOS)
                is_tool = False
            else:
                text = _text(content)
                if "</think>" in text:
                    text = text.split("</think>")[-1]
                out.append(ASSISTANT + text + EOS)
        elif role == "tool":
            is_tool = True
            if is_output_first:
                out.append(OUTPUTS_BEGIN + OUTPUT_BEGIN + _text(content) + OUTPUT_END)
                is_output_first = False
            else:
                out.append(OUTPUT_BEGIN + _text(content) + OUTPUT_END)
    if is_tool:
        out.append(OUTPUTS_END)
    if add_generation_prompt and not is_tool:
        out.append(ASSISTANT + "<think>\n")
    return "".join(out)


_RENDERERS = {"v3": render_v3, "r1": render_r1}


def render_chat(kind, messages, add_generation_prompt=False, bos_token=BOS_TOKEN):
    """Render ``messages`` (a list of ``{"role", "content", ...}`` dicts) with template ``kind``."""
    if kind not in _RENDERERS:
        raise ValueError(f"chat template kind must be one of {TEMPLATE_KINDS}, got {kind!r}")
    if isinstance(messages, (str, Mapping)) or not hasattr(messages, "__iter__"):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    return _RENDERERS[kind](list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token)
