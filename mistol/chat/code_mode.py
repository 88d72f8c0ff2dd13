"""Code mode: the assistant answers by writing Python that mistol runs, with the person's yes.

When a reply's ```python block closes, generation pauses; `CodeRunner` shows the code, asks
(y / N / e to edit / a for always), runs it in the sandbox and returns the text that is
appended to the assistant's turn, in the form the model knows:
"\\nOutput:\\n```\\n...\\n```\\n". The model then goes on writing. Declining is the default.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MistolError
from ..sandbox.codeblocks import CodeBlock
from ..sandbox.sandbox import Sandbox, SandboxLimits, network_isolation_available

CODE_SYSTEM_PROMPT = (
    "You are Quentin, a useful assistant who writes short Python code to answer questions. "
    "Write the code in a ```python block; it runs on the user's machine and its output is shown "
    "to you. The code must print its result and must not read from input."
)

DECLINED = "(the user declined to run this code)"
MAX_CODE_ROUNDS = 8  # code blocks run within one reply, before the reply must end


@dataclass
class CodeOptions:
    auto_yes: bool = False  # --yes: run without asking
    limits: SandboxLimits | None = None


class CodeRunner:
    """Asks about, runs and reports the code blocks of one conversation (one sandbox)."""

    def __init__(self, options: CodeOptions, ask: Callable[[str], str] | None, notice: Callable[[str], None]):
        self.options = options
        self.limits = options.limits or SandboxLimits()
        self.ask = ask  # reads one answer from the person; None where nobody can be asked
        self.notice = notice
        self.always = options.auto_yes
        self._sandbox: Sandbox | None = None
        self._warned = False

    def handle(self, block: CodeBlock) -> str:
        """Decide about `block`, run it if allowed, and return its output for the model."""
        code = self.confirm(block.code)
        if code is None:
            return DECLINED
        try:
            result = self.sandbox().run(code)
        except MistolError as e:
            self.notice(f"could not run the code: {e}")
            return f"(the code could not be run: {e})"
        return result.output

    def confirm(self, code: str) -> str | None:
        """The code to run (maybe edited), or None when declined."""
        isolated = self.limits.allow_network or network_isolation_available()
        if not isolated and not self._warned:
            self.notice("WARNING: this system offers no network namespace, so code could reach the network. "
                        "Each block needs your explicit yes (or start with --allow-network).")
            self._warned = True
        if self.always and isolated:
            return code
        if self.ask is None:
            self.notice("(code not run: nobody to ask here; use --yes to run code without asking)"
                        if isolated else "(code not run: no network isolation; use --allow-network)")
            return None
        self.notice(_show(code))
        while True:
            answer = self.ask("Run this code on this machine? [y]es / [N]o / [e]dit / [a]lways: ").strip().lower()
            if answer in ("y", "yes"):
                break
            if answer in ("", "n", "no"):
                return None
            if answer in ("a", "always"):
                self.always = True
                break
            if answer in ("e", "edit"):
                edited = self.ask_edit(code)
                if edited is None or not edited.strip():
                    return None
                code = edited
                self.notice(_show(code))
                continue
        if not isolated:
            self.limits.allow_network = True  # the person said yes knowing it
        return code

    def ask_edit(self, code: str) -> str | None:
        try:
            from prompt_toolkit import prompt

            return prompt("edit (Esc then Enter to accept):\n", default=code, multiline=True)
        except (EOFError, KeyboardInterrupt):
            return None

    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(self.limits)
        return self._sandbox

    def reset(self) -> None:
        if self._sandbox is not None:
            self._sandbox.reset()

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def _show(code: str) -> str:
    """The code, syntax-highlighted on a terminal."""
    if sys.stderr.isatty():
        try:
            from rich.console import Console
            from rich.syntax import Syntax

            console = Console(stderr=True, force_terminal=True)
            with console.capture() as capture:
                console.print(Syntax(code, "python", theme="ansi_dark", line_numbers=False))
            return "The assistant wants to run:\n" + capture.get().rstrip("\n")
        except ImportError:
            pass
    return "The assistant wants to run:\n" + code
