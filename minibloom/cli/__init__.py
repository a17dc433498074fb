"""The ``minibloom`` command line. Each subcommand lives in ``minibloom/cli/<name>.py`` and defines
``add_parser(subparsers)`` (which sets ``func``); module-level imports there stay light so start-up is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import MinibloomError

COMMANDS = ("generate", "chat", "info", "download", "trace", "diff", "verify", "check", "compare", "calibrate", "bench",
            "train", "perplexity", "kl", "dequantize")


MODEL_HELP = ("checkpoint directory, .safetensors / .gguf file, name under weights/, or hub repo id "
              "(default: weights/default)")


def add_model_option(p, *, positional: bool = False, required: bool = False, help: str = MODEL_HELP) -> None:
    """``--model/-m M``, the same on every command; ``positional`` also accepts it as the first positional argument
    (the older spelling of ``info`` and ``download``)."""
    p.add_argument("--model", "-m", metavar="M", default=None, help=help + (" (required)" if required else ""))
    if positional:
        p.add_argument("model_positional", metavar="M", nargs="?", default=None, help="the same as --model")
    p.set_defaults(model_required=required)


def output_path(path: str, option: str) -> str:
    """An output file path that can be written: not a directory, in a directory that exists and is writable."""
    import os

    if os.path.isdir(path):
        raise MinibloomError(f"{option} {path}: is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise MinibloomError(f"{option} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise MinibloomError(f"{option} {path}: the directory {parent} is not writable")
    return path


def _merge_model(parser, args) -> None:
    """One ``args.model`` from ``--model`` and the positional spelling; a missing required model is a usage error."""
    pos = getattr(args, "model_positional", None)
    if pos is not None:
        if args.model is not None and args.model != pos:
            parser.error(f"the model is given twice: {pos!r} and --model {args.model!r}")
        args.model = pos
    if getattr(args, "model_required", False) and args.model is None:
        parser.error(f"{args.command}: give the model with --model M")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minibloom",
        description="Run, inspect and check BLOOM models with nothing but NumPy.",
        epilog="Run 'minibloom COMMAND --help' for each command's options. With no --model, the small Shakespeare "
               "model shipped in weights/default is used.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"minibloom {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an unexpected error (to attach to a bug report)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return parser


BUG_REPORT = ("This is a bug in minibloom: rerun with --debug (minibloom --debug COMMAND ...) and report the "
              "command with its traceback to the maintainers (the project's issue tracker).")


def _check_utf8(parser, argv) -> None:
    """Arguments the terminal could not decode arrive with lone surrogates: refuse them by position."""
    for i, a in enumerate(argv):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            shown = a.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            parser.error(f"argument {i + 1} ({shown!r}) is not valid UTF-8 text")


def parse(parser, argv) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported with the usage of the subcommand it was given to."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, getattr(args, "command", None))
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    _merge_model(_subparser(parser, args.command) or parser, args)
    return args


def _subparser(parser, name):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_utf8(parser, argv)
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MinibloomError as e:
        print(f"minibloom {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(f"minibloom {args.command}: unexpected {type(e).__name__}: {e}\n{BUG_REPORT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
