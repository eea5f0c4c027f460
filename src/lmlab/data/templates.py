"""SFT prompt templates: one record (a dict of columns) → text segments, each trainable or not.

Four formats, one interface (`PromptTemplate`):

- alpaca: instruction / input / output with the standard Stanford Alpaca prompt.
- prompt_completion: a user string with {column} placeholders, e.g. '### Question: "{input}"\\n ### Answer: {output}'.
  A placeholder at the very end names the completion column; without one the completion is `output`.
- chat: a list of {role, content} messages rendered by a Jinja chat template (the tokenizer's own, a built-in
  `chatml`, or one given in the recipe); assistant turns are trainable, everything else is not.
- text: raw text, every token trainable.

`segments(record)` is what training tokenizes; `render_for_generation(record)` is the prompt that generation and
serving send, rendered by the very same code, so train and inference see the same text. `to_dict()` is saved
with the run and `from_dict()` rebuilds the template without the tokenizer (the chat template's Jinja source and
the special-token strings it uses are part of the spec).

How assistant turns are found in a chat: if the template marks them with `{% generation %}` (the built-in chatml
does), transformers reports their character spans directly. Most shipped templates (SmolLM2's, Llama's, Qwen's)
have no such tags, so we render prefix by prefix: the text before assistant turn i is `render(messages[:i],
add_generation_prompt=True)` (exactly the prompt generation would send), and the turn ends where
`render(messages[:i+1])` ends. That works for any template that renders a conversation as the concatenation of
its turns; templates that rewrite earlier turns (e.g. drop past reasoning) are detected and refused with a fix.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lmlab.errors import LmlabError

Format = Literal["alpaca", "chat", "prompt_completion", "text"]

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# ChatML with {% generation %} tags around what the assistant writes (content + end-of-turn), so the trainable
# span comes straight from the renderer. Same text as the usual ChatML templates.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; `trainable` pieces carry loss (unless train_on_prompt puts loss everywhere)."""

    text: str
    trainable: bool


@dataclass
class PromptTemplate:
    """A serializable SFT template. Build one with `template_from_config`; see the module docstring."""

    format: Format
    columns: dict[str, str] = field(default_factory=dict)  # template name -> column in the data
    prompt_template: str | None = None  # prompt_completion: the prompt part (completion placeholder removed)
    completion_column: str | None = None  # alpaca / prompt_completion: template name of the completion
    text_column: str = "text"  # text: template name of the text
    messages_column: str = "messages"  # chat
    chat_template: str | None = None  # chat: Jinja source
    chat_template_name: str | None = None  # chat: 'chatml', 'tokenizer' or 'custom' (for reports)
    special_tokens: dict[str, str] = field(default_factory=dict)  # chat: bos_token etc., visible to the Jinja
    system_prompt: str | None = None  # chat: prepended when a conversation has no system message

    # ---------------------------------------------------------------------------------------- spec
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "columns": dict(self.columns),
            "prompt_template": self.prompt_template,
            "completion_column": self.completion_column,
            "text_column": self.text_column,
            "messages_column": self.messages_column,
            "chat_template": self.chat_template,
            "chat_template_name": self.chat_template_name,
            "special_tokens": dict(self.special_tokens),
            "system_prompt": self.system_prompt,
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> PromptTemplate:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        if unknown:
            raise LmlabError(f"template spec: unknown keys {unknown}; it was saved by a newer lmlab")
        return cls(**dict(spec))

    @property
    def name(self) -> str:
        """Short description for reports: 'alpaca', 'chat (chatml)', 'prompt_completion'."""
        return f"chat ({self.chat_template_name})" if self.format == "chat" else self.format

    # ------------------------------------------------------------------------------------ columns
    def required_columns(self) -> list[str]:
        """Template names every record must have (before the `columns` mapping)."""
        if self.format == "alpaca":
            return ["instruction", self.completion_column or "output"]
        if self.format == "prompt_completion":
            return [*_placeholders(self.prompt_template or ""), self.completion_column or "output"]
        if self.format == "text":
            return [self.text_column]
        return [self.messages_column]

    def optional_columns(self) -> list[str]:
        return ["input"] if self.format == "alpaca" else []

    def column(self, name: str) -> str:
        """The data column that holds template name `name`."""
        return self.columns.get(name, name)

    def _get(self, record: Mapping[str, Any], name: str, optional: bool = False) -> Any:
        col = self.column(name)
        if col not in record or record[col] is None:
            if optional:
                return ""
            raise LmlabError(f"column '{col}' is missing in a record; check data.columns")
        return record[col]

    # ---------------------------------------------------------------------------------- rendering
    def prompt_text(self, record: Mapping[str, Any]) -> str:
        """alpaca / prompt_completion / text: the prompt (empty for text)."""
        if self.format == "alpaca":
            instruction = _as_text(self._get(record, "instruction"))
            inp = _as_text(self._get(record, "input", optional=True))
            if inp.strip():
                return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
            return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        if self.format == "prompt_completion":
            return _fill(self.prompt_template or "", lambda name: _as_text(self._get(record, name)))
        if self.format == "text":
            return ""
        raise TypeError("prompt_text is not defined for chat; use segments() or render_for_generation()")

    def completion_text(self, record: Mapping[str, Any]) -> str:
        """alpaca / prompt_completion / text: the reference completion ('' when absent)."""
        if self.format == "text":
            return _as_text(self._get(record, self.text_column, optional=True))
        if self.format == "chat":
            messages = self.messages(record)
            return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""
        return _as_text(self._get(record, self.completion_column or "output", optional=True))

    def messages(
        self, record_or_messages: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> list[dict[str, str]]:
        """chat: the validated conversation of a record, system prompt prepended if configured."""
        raw = record_or_messages
        if isinstance(raw, Mapping):
            raw = self._get(raw, self.messages_column)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)  # csv files store conversations as JSON text
            except json.JSONDecodeError:
                raise LmlabError(
                    f"column '{self.column(self.messages_column)}': expected a list of {{role, content}} messages, "
                    "got text that is not JSON"
                ) from None
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise LmlabError(
                f"column '{self.column(self.messages_column)}': expected a list of {{role, content}} messages, "
                f"got {type(raw).__name__}"
            )
        messages = []
        for m in raw:
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                keys = sorted(m) if isinstance(m, Mapping) else type(m).__name__
                hint = (
                    " (ShareGPT style: map from/value to role/content first)"
                    if isinstance(m, Mapping) and "from" in m
                    else ""
                )
                raise LmlabError(
                    f"column '{self.column(self.messages_column)}': every message needs 'role' and 'content' "
                    f"(got {keys}){hint}"
                )
            if m["role"] not in CHAT_ROLES:
                raise LmlabError(
                    f"column '{self.column(self.messages_column)}': unknown chat role '{m['role']}'; "
                    f"roles must be one of {', '.join(CHAT_ROLES)} (rename it in the data)"
                )
            messages.append({"role": m["role"], "content": _as_text(m["content"])})
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        return _render(self._jinja(), messages, add_generation_prompt, self.special_tokens)

    def render_for_generation(
        self, record_or_messages: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> str:
        """The prompt text generation should send for a record (its reference completion, or a final assistant
        message, is left out) or for a list of chat messages. Tokenize it with `sft.encode_prompt`."""
        if self.format != "chat":
            if not isinstance(record_or_messages, Mapping):
                raise TypeError(f"a {self.format} template renders a record (dict), not a list of messages")
            return self.prompt_text(record_or_messages)
        messages = self.messages(record_or_messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.render_chat(messages, add_generation_prompt=True)

    def segments(self, record: Mapping[str, Any]) -> list[Segment]:
        """The whole training text of a record as segments; trainable = completion / assistant turns."""
        if self.format == "text":  # no prompt: the text starts the sequence, tokenized as a document start
            return [Segment(self.completion_text(record), True)]
        if self.format != "chat":
            return [Segment(self.prompt_text(record), False), Segment(self.completion_text(record), True)]
        return self.chat_segments(self.messages(record))

    def chat_segments(self, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
        jinja = self._jinja()
        full = _render(jinja, messages, False, self.special_tokens)
        spans = (
            _generation_spans(jinja, messages, self.special_tokens)
            if _has_generation_tags(jinja)
            else self._prefix_spans(messages, full)
        )
        out: list[Segment] = []
        cursor = 0
        for start, end in spans:
            # whitespace after the end-of-turn marker belongs to the template, not to what the model must say
            trimmed = len(full[start:end].rstrip())
            if start > cursor:
                out.append(Segment(full[cursor:start], False))
            out.append(Segment(full[start : start + trimmed], True))
            cursor = start + trimmed
        if cursor < len(full):
            out.append(Segment(full[cursor:], False))
        return out

    def _prefix_spans(self, messages: Sequence[Mapping[str, str]], full: str) -> list[tuple[int, int]]:
        spans = []
        consumed = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(self._jinja(), messages[:i], True, self.special_tokens)
            through = _render(self._jinja(), messages[: i + 1], False, self.special_tokens)
            if not (len(before) >= consumed and through.startswith(before) and full.startswith(through)):
                raise LmlabError(
                    f"data.chat_template: the {self.chat_template_name} template does not render a conversation "
                    f"turn by turn (at message {i}), so assistant turns cannot be located; "
                    "set data.chat_template: chatml, or give a template with {% generation %} tags"
                )
            spans.append((len(before), len(through)))
            consumed = len(through)
        return spans

    def end_of_turn(self) -> str:
        """chat: the text the template writes right after an assistant message ('<|im_end|>' for ChatML), '' if
        none. Generation can stop on it when it is not the tokenizer's EOS."""
        if self.format != "chat":
            return ""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\x00ANSWER\x00"}]
        try:
            segs = self.chat_segments(probe)
        except LmlabError:
            return ""
        for seg in segs:
            if seg.trainable and "\x00ANSWER\x00" in seg.text:
                return seg.text.split("\x00ANSWER\x00", 1)[1].strip()
        return ""

    def _jinja(self) -> str:
        if not self.chat_template:
            raise LmlabError("template spec: a chat template needs its Jinja source (chat_template)")
        return self.chat_template


# ------------------------------------------------------------------------------------------- building
def template_from_config(cfg: Any, tokenizer: Any | None = None) -> PromptTemplate:
    """Build the template a recipe's `data` section describes. `cfg` is a `DataConfig`; `tokenizer` supplies the
    chat template (and its special tokens) for chat data."""
    fmt = cfg.template
    if fmt is None:
        raise LmlabError("data.template: required for task sft; one of alpaca, chat, prompt_completion, text")
    columns = dict(cfg.columns)
    if fmt == "alpaca":
        return PromptTemplate("alpaca", columns=columns, completion_column="output")
    if fmt == "text":
        return PromptTemplate("text", columns=columns, text_column=cfg.text_column)
    if fmt == "prompt_completion":
        prompt, completion = split_prompt_template(cfg.prompt_template)
        return PromptTemplate(
            "prompt_completion", columns=columns, prompt_template=prompt, completion_column=completion
        )
    # chat
    name = cfg.chat_template
    specials = _special_token_strings(tokenizer)
    if name is None:
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(own, dict):  # several named templates: the default one is for chat
            own = own.get("default")
        jinja, label = (own, "tokenizer") if isinstance(own, str) and own else (CHATML_TEMPLATE, "chatml")
    elif name in BUILTIN_CHAT_TEMPLATES:
        jinja, label = BUILTIN_CHAT_TEMPLATES[name], name
    elif "{%" in name or "{{" in name:
        jinja, label = name, "custom"
    else:
        raise LmlabError(
            f"data.chat_template: unknown template '{name}'; use one of {', '.join(BUILTIN_CHAT_TEMPLATES)}, "
            "a Jinja template string, or leave it unset for the tokenizer's own"
        )
    _check_jinja(jinja)
    return PromptTemplate(
        "chat",
        columns=columns,
        chat_template=jinja,
        chat_template_name=label,
        special_tokens=specials,
        system_prompt=cfg.system_prompt,
    )


def last_user_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """A conversation as one prompt item for a template that is not chat: the last user message, after the system
    message(s) and a blank line. `lmlab serve` prompts such runs this way; exported preference pairs use it too."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise LmlabError("messages: no user message; this model answers the last user message")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return f"{system}\n\n{users[-1]}" if system else users[-1]


def split_prompt_template(text: str | None) -> tuple[str, str]:
    """'### Q: {input}\\n### A: {output}' -> ('### Q: {input}\\n### A: ', 'output'). Without a trailing
    placeholder the completion column is 'output'; without any template it is '{prompt}' + 'completion'."""
    if text is None:
        return "{prompt}", "completion"
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:
        raise LmlabError(
            f"data.prompt_template: not a valid template ({e}); write literal braces as {{{{ and }}}}"
        ) from None
    for _, name, spec, conv in parts:
        if name is not None and (name == "" or name.isdigit() or spec or conv):
            raise LmlabError(
                f"data.prompt_template: placeholder '{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}' "
                "must name a column, like {input}; write literal braces as {{ and }}"
            )
    if not _placeholders(text):
        raise LmlabError(
            "data.prompt_template: has no {column} placeholder; add one, e.g. '### Question: {input}\\n'"
        )
    last_literal, last_name, _, _ = parts[-1]
    if last_name is not None and last_literal is not None:
        # the template ends with a placeholder: that column is the completion
        prompt = "".join(
            lit.replace("{", "{{").replace("}", "}}") + (f"{{{n}}}" if n is not None else "")
            for lit, n, _, _ in parts[:-1]
        ) + last_literal.replace("{", "{{").replace("}", "}}")
        if not _placeholders(prompt):
            raise LmlabError(
                f"data.prompt_template: '{{{last_name}}}' ends the template so it is the completion, which leaves "
                "the prompt with no placeholder; add the prompt column, e.g. '### Question: {input}\\n### Answer: {output}'"
            )
        return prompt, last_name
    return text, "output"


# -------------------------------------------------------------------------------------------- helpers
def _placeholders(text: str) -> list[str]:
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(text) if name))


def _fill(template: str, value: Any) -> str:
    """str.format without its attribute/index syntax: values are inserted verbatim."""
    return "".join(
        lit + (value(name) if name is not None else "")
        for lit, name, _, _ in string.Formatter().parse(template)
    )


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _special_token_strings(tokenizer: Any | None) -> dict[str, str]:
    if tokenizer is None:
        return {}
    specials = getattr(tokenizer, "special_tokens_map", {}) or {}
    return {k: v for k, v in specials.items() if isinstance(v, str)}


def _has_generation_tags(jinja: str) -> bool:
    import re

    return re.search(r"\{%-?\s*generation\s*-?%\}", jinja) is not None


def _check_jinja(jinja: str) -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(jinja)
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        raise LmlabError(f"data.chat_template: not a valid Jinja template ({e})") from None


def _render(
    jinja: str,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[[dict(m) for m in messages]],
            chat_template=jinja,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except Exception as e:  # templates raise on conversations they refuse (raise_exception in Jinja)
        raise LmlabError(f"data.chat_template: the template refused a conversation ({e})") from None
    return rendered[0]


def _generation_spans(
    jinja: str, messages: Sequence[Mapping[str, str]], special_tokens: Mapping[str, str]
) -> list[tuple[int, int]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    _, indices = render_jinja_template(
        conversations=[[dict(m) for m in messages]],
        chat_template=jinja,
        return_assistant_tokens_mask=True,
        **special_tokens,
    )
    return [(int(s), int(e)) for s, e in indices[0]]
