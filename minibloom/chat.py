"""Chat templates of the BLOOM chat fine-tunes: a registry by name, auto-detection, and ``render(messages, template)``.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}`` dicts, as in transformers'
``apply_chat_template``. Each template turns it into the exact prompt string its model was fine-tuned on (the model
card formats, written out below), ending where the model should continue, and names the strings at which a reply
stops (besides the eos token).

=================  ==============================================================  ====================================
name               format                                                          models
=================  ==============================================================  ====================================
bloomz-sft-chat    ``</s>{user}<s>{assistant}</s>{user}<s>``                       cmarkea/bloomz-560m-sft-chat and its
                                                                                   bnb-4bit re-release (and the other
                                                                                   cmarkea *-sft-chat sizes)
oasst              ``<|prompter|>{user}</s><|assistant|>{assistant}</s>``          OpenAssistant bloom-zh-3b-chat
plain              the turns' texts concatenated                                   cmarkea/bloomz-3b-dpo-chat
bloomz             the instruction as a plain prompt; answers end with ``</s>``    bigscience/bloomz-*
play               ``ROMEO:\\n{user}\\n\\nJULIET:\\n{assistant}\\n\\n``                minibloom's Shakespeare default model
tokenizer          the Jinja ``chat_template`` of tokenizer_config.json            any model that ships one (needs jinja2)
=================  ==============================================================  ====================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import MinibloomError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Template:
    """``turn(role, content) -> str`` per message; ``generation_prompt`` is appended when the model should answer;
    ``stop`` strings end a reply (eos also ends it)."""

    name: str
    description: str
    turn: Callable[[str, str], str]
    generation_prompt: str = ""
    stop: tuple[str, ...] = ()
    models: tuple[str, ...] = field(default=())


def _sft_chat(role: str, content: str) -> str:
    return f"</s>{content}<s>" if role == "user" else content  # the next user turn's </s> closes a reply


def _oasst(role: str, content: str) -> str:
    tag = {"system": "<|system|>", "user": "<|prompter|>", "assistant": "<|assistant|>"}[role]
    return f"{tag}{content}</s>"


def _plain(role: str, content: str) -> str:
    return content


def _bloomz(role: str, content: str) -> str:
    return f"{content}</s>" if role == "assistant" else content


def _play(role: str, content: str) -> str:
    if role == "system":
        return f"{content}\n\n"
    return f"{'ROMEO' if role == 'user' else 'JULIET'}:\n{content}\n\n"


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("bloomz-sft-chat", "</s>{user}<s>{assistant}</s>{user}<s>", _sft_chat, "", ("</s>", "<s>"),
             ("cmarkea/bloomz-560m-sft-chat", "jpacifico/bloomz-560m-sft-chat-bnb-4bit")),
    Template("oasst", "<|prompter|>{user}</s><|assistant|>{assistant}</s>", _oasst, "<|assistant|>",
             ("</s>", "<|prompter|>", "<|assistant|>"), ("OpenAssistant/bloom-zh-3b-chat",)),
    Template("plain", "plain turns concatenated", _plain, "", (), ("cmarkea/bloomz-3b-dpo-chat",)),
    Template("bloomz", "instruction as a plain prompt (bloomz's xP3 style)", _bloomz, "", ("</s>",),
             ("bigscience/bloomz-560m", "bigscience/bloomz")),
    Template("play", "a dialogue in a play: ROMEO (you) and JULIET (the model)", _play, "JULIET:\n",
             ("\n\n", "ROMEO:"), ("weights/default",)),
)}
TOKENIZER = "tokenizer"  # the Jinja chat_template shipped in tokenizer_config.json


def names() -> list[str]:
    return [*TEMPLATES, TOKENIZER]


def check_messages(messages: Sequence[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MinibloomError(f"messages[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(messages: Sequence[dict], template: str | Template = "plain", add_generation_prompt: bool = True,
           tokenizer=None) -> str:
    """The prompt string for ``messages`` in ``template`` (a name from ``TEMPLATES``, ``"tokenizer"``, or a Template).

    ``add_generation_prompt`` appends what cues the model's reply (``<|assistant|>``, ``JULIET:\\n``...).
    ``"tokenizer"`` renders the tokenizer's own Jinja ``chat_template`` (needs ``tokenizer`` and jinja2).
    """
    msgs = check_messages(messages)
    if template == TOKENIZER:
        return _render_jinja(msgs, tokenizer, add_generation_prompt)
    t = get(template)
    text = "".join(t.turn(m["role"], m["content"]) for m in msgs)
    return text + t.generation_prompt if add_generation_prompt else text


def get(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise MinibloomError(f"template: unknown chat template {template!r} (choose from {', '.join(names())})")
    return TEMPLATES[template]


def stop_strings(template: str | Template) -> tuple[str, ...]:
    return () if template == TOKENIZER else get(template).stop


def _render_jinja(messages, tokenizer, add_generation_prompt: bool) -> str:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        raise MinibloomError("template 'tokenizer': this tokenizer_config.json has no chat_template")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MinibloomError("template 'tokenizer': rendering a Jinja chat_template needs jinja2 "
                             "(pip install jinja2), or pick a named template with --template") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    special = getattr(tokenizer, "special_tokens", {})
    try:
        return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **special)
    except jinja2.TemplateError as e:
        raise MinibloomError(f"template 'tokenizer': the chat_template does not render ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# Auto-detection

_NAME_RULES = (  # (regex on the lower-cased model id / path, template)
    (r"sft-chat", "bloomz-sft-chat"),
    (r"dpo-chat", "plain"),
    (r"oasst|open-?assistant|bloom-zh-.*chat", "oasst"),
    (r"bloomz", "bloomz"),
    (r"(^|[/\\])(default|shakespeare[^/\\]*)[/\\]?$", "play"),
)


def detect(name_or_path: str | None = None, tokenizer=None, default: str = "bloomz") -> str:
    """The template a model most likely wants: from its repo id / path (the seed models above), else from the
    tokenizer's ``chat_template`` (a registry name, a recognisable format, or any Jinja text -> ``"tokenizer"``),
    else ``default``."""
    if name_or_path:
        key = os.fspath(name_or_path).lower().replace("--", "/")
        for pattern, template in _NAME_RULES:
            if re.search(pattern, key):
                return template
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, str):
        if source in TEMPLATES:
            return source
        if "<|prompter|>" in source:
            return "oasst"
        return TOKENIZER
    if isinstance(source, list) and source:
        return TOKENIZER
    return default
