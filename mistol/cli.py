"""The `mistol` command: the parser of every subcommand, and `main`.

Each subcommand is a module of mistol/commands/ with a `register(subparsers)`. Only the
module of the command being run is imported; the others are listed by name and one-line
help (`commands.COMMANDS`), so that `mistol --help` and `mistol X --help` answer at once.

Output meant for scripts goes to stdout; progress and logs go to stderr. Any
`MistolError` ends the command with a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .commands import COMMANDS
from .errors import MistolError


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `mistol` parser, with the full options of the command `argv` names (of every
    command when `argv` is None); the other commands have their name and help only."""
    parser = argparse.ArgumentParser(
        prog="mistol",
        description="A local, private assistant running Mistral/Llama-architecture models "
        "(OpenHermes 2.5 Mistral 7B by default) on your own machine.",
    )
    parser.add_argument("--version", action="version", version=f"mistol {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = _command_in(argv) if argv is not None else None
    for name, summary in COMMANDS.items():
        if argv is None or name == named:
            importlib.import_module(f"mistol.commands.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _command_in(argv: list[str]) -> str | None:
    # The top-level options take no value, so the command is the first word that is not one.
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if getattr(args, "prepare", None):  # e.g. fetching the model, before the command's imports
            args.prepare(args)
        return args.run(args)
    except MistolError as e:
        print(f"mistol: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mistol generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
