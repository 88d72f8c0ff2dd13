"""`mistol exec FILE`: run a file the way the chat runs the model's code, and show the result.

It prints exactly the text the model would be shown after its code block, so the sandbox can
be tried (and its limits checked) without a model. The exit status says how the code ended:
0 when it ran to its end, 1 when it raised, was stopped or hit a limit (or mistol itself
could not run it), 124 when it ran past the time limit, as with timeout(1). On a terminal
the output's control characters are written out (ESC as \\x1b), not obeyed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MistolError
from ..sandbox.sandbox import RunResult, Sandbox, SandboxLimits
from ..sandbox.visible import visible
from . import COMMANDS

DESCRIPTION = (
    "Run FILE's Python code the way mistol runs the code a model writes in a chat: in a separate "
    "process, in a private temporary directory, without network access (unless --allow-network), "
    "with a time limit, a memory limit and a limit on processes. Prints what the model would be "
    "shown: stdout and stderr in the order written, the value of a last bare expression (as in "
    "a REPL), a traceback of the code's own frames, a long output cut in the middle."
)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    limits = SandboxLimits()
    p.add_argument("file", metavar="FILE", help="the Python file to run (- reads standard input)")
    p.add_argument("--timeout", type=_positive(float), default=limits.timeout_s, metavar="S",
                   help=f"stop the code after S seconds (default: {limits.timeout_s:g})")
    p.add_argument("--memory", type=_positive(int), default=limits.memory_mb, metavar="MB",
                   help=f"address space limit in MiB; past it the code gets MemoryError (default: {limits.memory_mb})")
    p.add_argument("--disk", "--code-disk", dest="disk", type=_positive(int), default=limits.disk_mb, metavar="MB",
                   help="MB for the files the code writes, in its directory and /tmp together; past it writes fail "
                   f"with 'No space left on device' (default: {limits.disk_mb})")
    p.add_argument("--allow-network", action="store_true",
                   help="let the code use the network (needed where the system allows no network namespace)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("exec", help=COMMANDS["exec"], description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(run=cmd_exec)
    return p


def cmd_exec(args) -> int:
    try:
        code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MistolError(f"{args.file}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MistolError(f"{args.file}: cannot read it as UTF-8 text ({e})") from None
    limits = SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory, disk_mb=args.disk,
                           allow_network=args.allow_network)
    with Sandbox(limits) as sandbox:
        result = sandbox.run(code)
    output = visible(result.output) if sys.stdout.isatty() else result.output
    sys.stdout.write(output if not output or output.endswith("\n") else output + "\n")
    sys.stdout.flush()
    return exit_status(result)


def exit_status(result: RunResult) -> int:
    """0: the code ran to its end; 124: it timed out; 1: it raised, crashed or was stopped."""
    if result.timed_out:
        return 124
    return 0 if result.ok else 1
