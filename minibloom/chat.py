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
play               ``ROMEO:\\n{user}\\n\\nJULIET:\\n{assistant}\\n\\n``                the Shakespeare default model
tokenizer          the Jinja ``chat_template`` of tokenizer_config.json            models shipping one (needs jinja2)
=================  ==============================================================  ====================================
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .chat_templates import template_for_name, template_for_source
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
    if not isinstance(messages, (list, tuple)):
        raise MinibloomError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
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


MAX_TEMPLATE_OUTPUT = 1 << 22  # characters a chat template may render (a long conversation is far below)
MAX_TEMPLATE_STEPS = 1 << 20  # iterations of range() loops, summed over one render
MAX_TEMPLATE_SECONDS = 10.0  # checked at every output chunk and every range() step


def _render_jinja(messages, tokenizer, add_generation_prompt: bool) -> str:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str):
        raise MinibloomError("template 'tokenizer': this tokenizer has no chat_template (a string, or a list of "
                             "{name, template} with a 'default')")
    where = f"template 'tokenizer' ({getattr(tokenizer, 'path', None) or 'chat_template'})"
    special = getattr(tokenizer, "special_tokens", {})
    return render_template(source, where, messages=messages, add_generation_prompt=add_generation_prompt, **special)


def render_template(source: str, where: str, **context) -> str:
    """Render an untrusted Jinja ``source`` in a sandbox with limits on output size, loop steps, time and recursion;
    every failure is a MinibloomError naming ``where``. (jinja2's sandbox blocks attribute escapes; it does not bound
    work: ``range(10**9)``, ``'a' * 10**10``, ``'%999999999s'|format``, nested loops or ``lipsum(10**8)``.)"""
    where = where if isinstance(where, str) else "chat_template"
    if not isinstance(source, str):
        raise MinibloomError(f"{where}: a chat_template must be a string of Jinja source, got {type(source).__name__}")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MinibloomError(f"{where}: rendering a Jinja chat_template needs jinja2 (pip install jinja2), or pick "
                             "a named template with --template") from None
    import time

    deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
    steps = [0]

    def tick():
        steps[0] += 1
        if steps[0] > MAX_TEMPLATE_STEPS:
            raise _Limit(f"loops ran more than {MAX_TEMPLATE_STEPS} steps")
        if not steps[0] % 1024 and time.monotonic() > deadline:
            raise _Limit(f"rendering took more than {MAX_TEMPLATE_SECONDS:.0f} s")

    def counted_range(*args):
        if any(not isinstance(a, int) or isinstance(a, bool) for a in args) or not 1 <= len(args) <= 3:
            raise _Limit(f"range{args!r}: expects 1 to 3 integers")
        for i in range(*args):
            tick()
            yield i

    def size(n: int) -> int:
        if n > MAX_TEMPLATE_OUTPUT:
            raise _Limit(f"a value of {n} characters or items (at most {MAX_TEMPLATE_OUTPUT})")
        return n

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        size(len(seq) * max(n, 0))
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise _Limit(f"exponent {right} (at most 1024)")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
                size(len(left) + len(right))
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
            for a in (*args, *kwargs.values()):
                if isinstance(a, (str, list, tuple)):
                    size(len(a))  # a macro doubling a string through its arguments
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            if isinstance(obj, str) and attribute in ("format", "format_map") and any(
                    int(w) > 10000 for w in re.findall(r"\{[^{}]*?:[^{}]*?(\d+)", obj)):
                raise _Limit("a format width over 10000")
            return super().getattr(obj, attribute)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(value, (str, list, tuple)):
                size(len(value))
            super().__setitem__(name, value)

    def bounded_format(value, *args, **kwargs):
        if isinstance(value, str) and any(int(w) > 10000 for w in re.findall(r"%[-#0 +]*(\d+)", value)):
            raise _Limit("a format width over 10000")
        return size(len(value % (kwargs or args))) and value % (kwargs or args)

    env = Limited(trim_blocks=True, lstrip_blocks=True, loader=None)
    env.globals["range"] = counted_range
    env.globals.pop("lipsum", None)
    env.globals["namespace"] = Namespace
    env.filters["format"] = bounded_format
    try:
        template = env.from_string(source)
        out, n = [], 0
        for chunk in template.generate(**context):
            n += len(chunk)
            size(n)
            if time.monotonic() > deadline:
                raise _Limit(f"rendering took more than {MAX_TEMPLATE_SECONDS:.0f} s")
            out.append(chunk)
        return "".join(out)
    except _Limit as e:
        raise MinibloomError(f"{where}: the chat_template exceeds a limit: {e}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except jinja2.TemplateError as e:
        raise MinibloomError(f"{where}: the chat_template does not render ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise MinibloomError(f"{where}: the chat_template recurses too deeply") from None
    except MemoryError:
        raise MinibloomError(f"{where}: the chat_template needs more memory than there is") from None
    except Exception as e:  # noqa: BLE001 - a template's own errors (1/0, 1 + 'a', a missing loader ...)
        raise MinibloomError(f"{where}: the chat_template fails ({type(e).__name__}: {str(e)[:200]})") from None


class _Limit(Exception):
    """A chat template went past one of the render limits."""


# ---------------------------------------------------------------------------------------------------------------
# Auto-detection


def detect(name_or_path: str | None = None, tokenizer=None, default: str = "bloomz") -> str:
    """The template a model most likely wants: from its repo id / path (the seed models above), else from the
    tokenizer's ``chat_template`` (a registry name, a recognisable format, or any Jinja text -> ``"tokenizer"``),
    else ``default``."""
    named = template_for_name(name_or_path)
    if named is not None:
        return named
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, str):
        if source in TEMPLATES:
            return source
        if template_for_source(source) is not None:  # a registry template written as Jinja (a converted GGUF)
            return template_for_source(source)
        if "<|prompter|>" in source:
            return "oasst"
        return TOKENIZER
    if isinstance(source, list) and source:
        return TOKENIZER
    return default


# ---- a conversation: the session behind ``minibloom chat`` ----------------------------------------------------
COMMANDS_HELP = "commands: /reset  forget the conversation | /show  print the prompt | /quit  leave | /help"
KNOWN_COMMANDS = ("/quit", "/exit", "/q", "/reset", "/help", "/show")


class StopWatcher:
    """Holds back text that could be the start of a stop string; reports when one appears.

    ``feed(piece) -> (text to print now, stopped)``; ``rest()`` releases the held tail at the end.
    """

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0  # longest suffix of buf that is a prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        out = self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out, False

    def rest(self) -> str:
        out, self.buf = self.buf, ""
        return out


def stop_token_ids(tokenizer, stops) -> list[int]:
    """Stop strings that are single tokens of the vocabulary (``</s>``, ``<|prompter|>`` ...) as ids: decoding skips
    special tokens, so these must stop generation by id, like eos."""
    ids = (tokenizer.token_to_id(s) for s in stops)
    return sorted({i for i in ids if i is not None})


def with_stop_ids(opts: dict, extra: list[int]) -> dict:
    eos = opts.get("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    return {**opts, "eos_token_id": sorted(set(eos) | set(extra))}


def fit_context(messages: list[dict], render, encode, budget: int) -> list[dict]:
    """Drop the oldest non-system turns until the rendered prompt fits in ``budget`` tokens (keep the last one)."""
    msgs = list(messages)
    while len(encode(render(msgs))) > budget:
        drop = next((i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"), None)
        if drop is None:
            break
        del msgs[drop]
    return msgs


def reply(model, prompt: str, opts: dict, stops, out) -> str:
    """Generate one reply to ``prompt``, printing it as it comes; return its text (stop string excluded)."""
    from .generate import stream

    tok = model.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise MinibloomError("chat: the rendered prompt is empty")
    dec = tok.stream_decoder(skip_special_tokens=True)
    watch = StopWatcher(stops)
    text, stopped, interrupted = [], False, False
    gen = stream(model, [ids], **opts)
    try:
        for nxt in gen:
            piece, stopped = watch.feed(dec.push(int(nxt[0])))
            if piece:
                out.write(piece)
                out.flush()
                text.append(piece)
            if stopped:
                break
    except KeyboardInterrupt:  # Ctrl-C stops this reply; the conversation goes on with what was said so far
        interrupted = True
        out.write(" [stopped]")
    finally:
        gen.close()
    if not stopped and not interrupted:
        tail, _ = watch.feed(dec.flush())
        tail += watch.rest()
        out.write(tail)
        text.append(tail)
    out.write("\n")
    out.flush()
    return "".join(text)


def _read_line(stdin, stdout, interactive: bool) -> str | None:
    """One line of user input, or None at end of input (Ctrl-D, or Ctrl-C at the prompt). On a terminal, ``input()``
    gives line editing. Input that is not UTF-8 is a MinibloomError."""
    try:
        if interactive and stdin is sys.stdin and stdout is sys.stdout:
            return input("you> ")
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        return line or None
    except (EOFError, KeyboardInterrupt):
        stdout.write("\n")
        return None
    except UnicodeDecodeError as e:
        raise MinibloomError(f"stdin: not UTF-8 text ({e.reason})") from None


def chat_loop(model, template: str, opts: dict, stdin, stdout, system: str | None = None,
              max_context: int = 2048, interactive: bool = False) -> list[dict]:
    """Read user lines from ``stdin`` until EOF or /quit, answer each; return the conversation."""
    tok = model.tokenizer
    stops = stop_strings(template)
    opts = with_stop_ids(opts, stop_token_ids(tok, stops))
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)

    def prompt_of(msgs):
        return render(msgs, template, tokenizer=tok)

    prompt_of(base + [{"role": "user", "content": "hello"}])  # a template that cannot render fails before any input

    budget = max(1, max_context - int(opts["max_new_tokens"]))
    while True:
        line = _read_line(stdin, stdout, interactive)
        if line is None:
            return messages
        line = line.rstrip("\r\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit", "/q"):
            return messages
        if cmd == "/reset":
            messages = list(base)
            stdout.write("(conversation cleared)\n")
            continue
        if cmd == "/help":
            stdout.write(COMMANDS_HELP + "\n")
            continue
        if cmd == "/show":
            stdout.write(repr(prompt_of(messages + [{"role": "user", "content": "…"}])) + "\n")
            continue
        if cmd.startswith("/") and cmd.split()[0] not in KNOWN_COMMANDS:
            stdout.write(f"(unknown command {cmd.split()[0]}; {COMMANDS_HELP})\n")
            continue
        messages.append({"role": "user", "content": line})
        messages = fit_context(messages, prompt_of, tok.encode, budget)
        if interactive:
            stdout.write("bot> ")
        answer = reply(model, prompt_of(messages), opts, stops, stdout)
        messages.append({"role": "assistant", "content": answer})
        if not interactive:
            stdout.write("\n")  # piped replies stay apart: a blank line after each
            stdout.flush()
