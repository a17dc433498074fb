"""``minibloom chat``: an interactive conversation that keeps its history, rendered with the model's chat template."""

from __future__ import annotations

import argparse
import sys

from ..errors import MinibloomError
from .generate import add_model_args, add_sampling_args, generation_options, load_model

EXAMPLES = """\
examples:
  minibloom chat                                             the default Shakespeare model: you are ROMEO
  minibloom chat --model cmarkea/bloomz-560m-sft-chat         template detected from the model id
  minibloom chat --model OpenAssistant/bloom-zh-3b-chat --template oasst --system "Be brief."
  printf 'Hello\\nHow are you?\\n' | minibloom chat --seed 0   scripted: one line per turn

templates (--template):
  bloomz-sft-chat  </s>{user}<s>{assistant}</s>{user}<s>          cmarkea/bloomz-*-sft-chat (+ bnb-4bit re-release)
  oasst            <|prompter|>{user}</s><|assistant|>{assistant}</s>   OpenAssistant/bloom-zh-3b-chat
  plain            the turns concatenated                         cmarkea/bloomz-3b-dpo-chat
  bloomz           the instruction as a plain prompt              bigscience/bloomz-*
  play             ROMEO:\\n{user}\\n\\nJULIET:\\n{assistant}\\n\\n     the default Shakespeare model
  tokenizer        the Jinja chat_template of tokenizer_config.json (needs jinja2)

in the chat: type a message and press Enter. Commands: /reset (forget the conversation), /show (print the prompt
the model sees), /help, /quit (or Ctrl-D).
"""
COMMANDS_HELP = "commands: /reset  forget the conversation | /show  print the prompt | /quit  leave | /help"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="talk with a chat model in the terminal (keeps the conversation)",
        description="An interactive chat: each line you type is a user turn; the whole conversation is rendered with "
                    "the model's chat template and the reply is printed as it is generated. Replies end at "
                    "</s> or at the template's stop string.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--template", metavar="T", default=None,
                   help="chat template name (see below); default: detected from the model id, path or "
                        "tokenizer_config.json")
    p.add_argument("--system", metavar="TEXT", default=None, help="a system message placed before the conversation")
    p.add_argument("--max-context", type=int, metavar="N", default=2048,
                   help="drop the oldest turns when the prompt plus the reply would exceed N tokens (default 2048)")
    add_sampling_args(p, "longest reply in tokens (default: the model's generation_config.json, else 100)")
    p.set_defaults(func=run)


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
    from ..generate import stream

    tok = model.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise MinibloomError("chat: the rendered prompt is empty")
    dec = tok.stream_decoder(skip_special_tokens=True)
    watch = StopWatcher(stops)
    text, stopped = [], False
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
    finally:
        gen.close()
    if not stopped:
        tail, _ = watch.feed(dec.flush())
        tail += watch.rest()
        out.write(tail)
        text.append(tail)
    out.write("\n")
    out.flush()
    return "".join(text)


def _read_line(stdin, stdout, interactive: bool) -> str | None:
    """One line of user input, or None at end of input. On a terminal, ``input()`` gives line editing."""
    if interactive and stdin is sys.stdin and stdout is sys.stdout:
        try:
            return input("you> ")
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write("you> ")
        stdout.flush()
    line = stdin.readline()
    return line or None


def chat_loop(model, template: str, opts: dict, stdin, stdout, system: str | None = None,
              max_context: int = 2048, interactive: bool = False) -> list[dict]:
    """Read user lines from ``stdin`` until EOF or /quit, answer each; return the conversation."""
    from .. import chat

    tok = model.tokenizer
    stops = chat.stop_strings(template)
    opts = with_stop_ids(opts, stop_token_ids(tok, stops))
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)

    def render(msgs):
        return chat.render(msgs, template, tokenizer=tok)

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
            stdout.write(repr(render(messages + [{"role": "user", "content": "…"}])) + "\n")
            continue
        messages.append({"role": "user", "content": line})
        messages = fit_context(messages, render, tok.encode, budget)
        if interactive:
            stdout.write("bot> ")
        answer = reply(model, render(messages), opts, stops, stdout)
        messages.append({"role": "assistant", "content": answer})


def run(args, stdin=None, stdout=None) -> int:
    from .. import chat

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    model = load_model(args)
    if model.tokenizer is None:
        raise MinibloomError(f"{model.path}: no tokenizer.json, so there is no way to chat with this checkpoint")
    template = args.template or chat.detect(args.model or model.path, model.tokenizer)
    if template not in chat.names():
        raise MinibloomError(f"--template: unknown chat template {template!r} (choose from {', '.join(chat.names())})")
    opts = generation_options(args, model)
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
    if interactive:
        print(f"{model!r}\nchat template: {template}. {COMMANDS_HELP}", file=sys.stderr)
    chat_loop(model, template, opts, stdin, stdout, system=args.system, max_context=args.max_context,
              interactive=interactive)
    return 0
