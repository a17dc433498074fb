"""``minibloom chat``: an interactive conversation that keeps its history, rendered with the model's chat template."""

from __future__ import annotations

import argparse
import sys

from ..errors import MinibloomError
from ..chat import COMMANDS_HELP, chat_loop
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
