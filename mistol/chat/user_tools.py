"""`mistol chat --tools FILE.py`: the person's own Python functions as the model's tools.

The file's public functions (defined in it, names not starting with "_") are offered to the
model, each described by its signature and docstring (tool_functions.py). The file is the
person's own code: it runs in the chat's process, not in the sandbox, with their files and
network, as any script of theirs would. So each call is shown with its arguments and runs only
after a yes ([y]es / [N]o / [a]lways); `--yes` calls without asking, and with nobody to ask
(piped input without --yes) no call runs. A declined call is answered to the model as declined.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path

from ..errors import MistolError
from ..sandbox.visible import visible
from ..tool_functions import FunctionTools, ToolDefinitionError
from ..tools import ToolCall

MAX_SHOWN = 300  # characters of an argument or a result shown in the terminal


def load_tool_file(name: str) -> FunctionTools:
    """The public functions of the Python file `name`; a one-line `MistolError` saying what is wrong."""
    path = Path(name).expanduser()
    where = f"--tools {name}"
    if not path.is_file():
        raise MistolError(f"{where}: no such file" if not path.exists() else f"{where}: not a file")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MistolError(f"{where}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise MistolError(f"{where}: syntax error on line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # a NUL byte in the source
        raise MistolError(f"{where}: not Python source ({e})") from None
    module = types.ModuleType(f"mistol_tools_{abs(hash(str(path.resolve())))}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # where type hints and dataclasses look names up
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as e:
        del sys.modules[module.__name__]
        raise MistolError(f"{where}: running it raised {type(e).__name__}: {e}") from None
    functions = [obj for key, obj in vars(module).items()
                 if not key.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__]
    if not functions:
        raise MistolError(f"{where}: no functions found (the tools are the functions it defines, "
                          "with names not starting with '_')")
    try:
        return FunctionTools(functions)
    except ToolDefinitionError as e:
        raise MistolError(f"{where}: {e}") from None


def call_shown(call: ToolCall, arguments: dict) -> str:
    """A call as Python would write it, control characters made visible."""
    args = ", ".join(f"{key}={_short(repr(value))}" for key, value in arguments.items())
    return visible(f"{call.name}({args})")


def _short(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


class CallApprover:
    """Asks the person about each call (`approve(call, arguments)` of tool_loop.py)."""

    def __init__(self, auto_yes: bool, ask: Callable[[str], str] | None, notice: Callable[[str], None]):
        self.auto_yes = auto_yes
        self.ask = ask  # None where nobody can be asked
        self.notice = notice
        self.always = auto_yes

    def __call__(self, call: ToolCall, arguments: dict) -> bool:
        shown = call_shown(call, arguments)
        if self.always:
            self.notice(f"calling {shown}")
            return True
        if self.ask is None:
            self.notice(f"(not called: {shown}; nobody to ask here; use --yes to call the tools without asking)")
            return False
        self.notice(f"The assistant wants to call {shown}")
        while True:
            answer = self.ask("Call it? [y]es / [N]o / [a]lways: ").strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("", "n", "no"):
                return False
            if answer in ("a", "always"):
                self.always = True
                return True

    def reset(self) -> None:
        """A new conversation: "always" is forgotten (--yes stays)."""
        self.always = self.auto_yes

    def show_result(self, call: ToolCall, result: str) -> None:
        self.notice(f"{call.name} -> {_short(visible(result))}")
