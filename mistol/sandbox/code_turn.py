"""The assistant turn that may run code, shared by every front end (chat, duo, math, voice).

`code_turn` streams the reply; when a ```python block closes, generation pauses, the caller's
`run` decides about the block and runs it, and its output is appended to the turn in the form
the model knows ("\\nOutput:\\n```\\n...\\n```\\n"); the model then goes on writing
(`continue_last`), up to `MAX_CODE_ROUNDS` blocks. The caller says where the text goes
(`show`) and when to give up (`stopped`), so all front ends stop and continue at exactly the
same places.

`CodeRunner` is the usual `run`: it shows the code, asks (y / N / e to edit / a for always),
runs it in the conversation's sandbox and returns its output. Declining is the default. An
edited block replaces the model's block in the turn, so that the conversation (and its log)
holds the code that ran. "Always" lasts until the conversation is reset, and for at most
`max_auto_runs` blocks of one reply before the person is asked again (a runaway reply). The
web page runs its own loop in the browser and takes only `CODE_SYSTEM_PROMPT` from here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MistolError
from .codeblocks import CodeBlock, CodeBlockDetector, format_output, is_runnable
from .sandbox import Sandbox, SandboxLimits, filesystem_isolation_available, network_isolation_available
from .visible import visible

if TYPE_CHECKING:  # only named in annotations: the module stays free of torch
    from ..sampling import SamplingParams

CODE_SYSTEM_PROMPT = (
    "You are Quentin, a useful assistant who writes short Python code to answer questions. "
    "Write the code in a ```python block; it runs on the user's machine and its output is shown "
    "to you. The code must print its result and must not read from input."
)

DECLINED = "(the user declined to run this code)"
MAX_CODE_ROUNDS = 8  # code blocks run within one reply, before the reply must end
MAX_AUTO_RUNS = 5  # blocks of one reply that "always" runs before asking again


@dataclass
class Ran:
    """What `run` did with a block: the code that ran (the person may have edited it) and the
    output the model is shown."""

    code: str
    output: str


# -- the turn ----------------------------------------------------------------------------------
@dataclass
class CodeTurn:
    """What one turn did: the code it ran with each output, and the tokens it generated over
    all of its rounds (a reply with code is several generations)."""

    runs: list[tuple[str, str]] = field(default_factory=list)  # (code, output the model was shown)
    completion_tokens: int = 0
    prefilled_tokens: int = 0
    decode_seconds: float = 0.0
    draft_tokens: int = 0  # speculative guesses verified, and kept (see mistol.speculative)
    accepted_tokens: int = 0
    time_to_first_token: float | None = None  # of the first round
    finish_reason: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def code_turn(
    llm,
    messages: list[dict],
    params: SamplingParams,
    run: Callable[[CodeBlock], str | Ran] | None,
    show: Callable[[str, bool], None] | None = None,
    max_rounds: int = MAX_CODE_ROUNDS,
    stopped: Callable[[], bool] | None = None,
) -> CodeTurn:
    """Write the assistant message `messages[-1]` (appending to its "content"), running the
    runnable code blocks it closes with `run` (None: blocks are written, never run). `run`
    returns the output, or a `Ran` whose code replaces the block's when the person edited it.

    `show(text, is_output)` sees each piece as it is appended, the code's output with
    is_output=True. `stopped()` is asked before each piece and before each run: True ends the
    turn there (a voice barge-in). A KeyboardInterrupt or MistolError leaves the message as
    far as it got.
    """
    message = messages[-1]
    turn = CodeTurn()

    def say(text: str, is_output: bool = False) -> None:
        message["content"] += text
        if show is not None and text:
            show(text, is_output)

    continue_last = False
    for _ in range(max_rounds + 1):
        try:
            block = stream_until_block(llm, messages, params, continue_last, say, run is not None, stopped)
        finally:
            last = getattr(llm, "last", None)
            if last is not None:
                _add_round(turn, last)
        if block is None or run is None or (stopped is not None and stopped()):
            break
        ran = run(block)
        ran = ran if isinstance(ran, Ran) else Ran(block.code, ran)
        if ran.code != block.code:
            message["content"] = _with_code_replaced(message["content"], block.code, ran.code)
        turn.runs.append((ran.code, ran.output))
        say(format_output(ran.output), True)
        continue_last = True
    return turn


def _add_round(turn: CodeTurn, generation) -> None:
    if turn.time_to_first_token is None and not turn.completion_tokens:
        turn.time_to_first_token = generation.time_to_first_token
    turn.completion_tokens += generation.completion_tokens
    turn.prefilled_tokens += getattr(generation, "prefilled_tokens", 0)
    turn.decode_seconds += getattr(generation, "decode_seconds", 0.0)
    turn.draft_tokens += getattr(generation, "draft_tokens", 0)
    turn.accepted_tokens += getattr(generation, "accepted_tokens", 0)
    turn.finish_reason = generation.finish_reason


def _with_code_replaced(content: str, old: str, new: str) -> str:
    """`content` (ending with the block that closed) with the block's code `old` made `new`.
    A block whose code is not found as written (indented fences) is left as it was."""
    at = content.rfind(old)
    if at < 0 or content[at + len(old):].strip(" \n`~") != "":
        return content
    return content[:at] + new + content[at + len(old):]


def stream_until_block(
    llm, messages: list[dict], params: SamplingParams, continue_last: bool,
    say: Callable[[str], None], detect: bool = True, stopped: Callable[[], bool] | None = None,
) -> CodeBlock | None:
    """Stream until the reply ends, `stopped()` says so, or a runnable code block closes
    (returned)."""
    context = messages if continue_last else messages[:-1]
    detector = CodeBlockDetector() if detect else None
    written = ""
    stream = llm.chat(context, params, continue_last=continue_last)
    try:
        for piece in stream:
            if stopped is not None and stopped():
                return None
            if detector is not None:
                before, written = len(written), written + piece
                blocks = detector.feed(piece)
                if not blocks and detector.in_block and written.endswith("\n```"):
                    blocks = detector.finish()  # a closing fence: do not wait for its newline
                runnable = [b for b in blocks if is_runnable(b)]
                if runnable:
                    # Keep the reply up to the closing fence; the output brings its own newline.
                    end = runnable[0].end - (written[runnable[0].end - 1 : runnable[0].end] == "\n")
                    say(piece[: end - before])
                    return runnable[0]
            say(piece)
    finally:
        stream.close()
    return None


# -- asking and running ------------------------------------------------------------------------
@dataclass
class CodeOptions:
    auto_yes: bool = False  # --yes: run without asking
    limits: SandboxLimits | None = None
    max_auto_runs: int = MAX_AUTO_RUNS  # with "always" (not --yes), blocks per reply before asking again


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
        self._auto_runs = 0  # blocks "always" ran in the current reply

    def new_reply(self) -> None:
        """A new assistant reply begins (counts toward `max_auto_runs` start over)."""
        self._auto_runs = 0

    def handle(self, block: CodeBlock) -> str:
        """Decide about `block`, run it if allowed, and return its output for the model."""
        return self.run_block(block).output

    def run_block(self, block: CodeBlock) -> Ran:
        """Like `handle`, saying which code ran (the person may edit it before it runs)."""
        code = self.confirm(block.code)
        if code is None:
            return Ran(block.code, DECLINED)
        try:
            result = self.sandbox().run(code)
        except MistolError as e:
            self.notice(f"could not run the code: {e}")
            return Ran(code, f"(the code could not be run: {e})")
        return Ran(code, result.output)

    def confirm(self, code: str) -> str | None:
        """The code to run (maybe edited), or None when declined."""
        files = filesystem_isolation_available()
        network = self.limits.allow_network or network_isolation_available()
        isolated = network and files
        if not isolated and not self._warned:
            if not files:
                self.notice("WARNING: this system offers no mount namespace, so code could read and change your "
                            "files (Landlock, where there is one, limits that) and use your unix sockets. "
                            "Each block needs your explicit yes.")
            else:
                self.notice("WARNING: this system offers no network namespace, so code could reach the network. "
                            "Each block needs your explicit yes (or start with --allow-network).")
            self._warned = True
        if self.always and isolated:
            if self.options.auto_yes or self.ask is None or self._auto_runs < self.options.max_auto_runs:
                self._auto_runs += 1
                return code
            self.always = False  # a runaway reply: ask again
            self.notice(f"({self._auto_runs} blocks of this reply ran without asking; asking again)")
        if self.ask is None:
            self.notice("(code not run: nobody to ask here; use --yes to run code without asking)"
                        if isolated else "(code not run: no network isolation; use --allow-network)" if files
                        else "(code not run: nothing here keeps it from your files)")
            return None
        self.notice(_show(code))
        while True:
            answer = self.ask("Run this code on this machine? [y]es / [N]o / [e]dit / [a]lways: ").strip().lower()
            if answer in ("y", "yes"):
                break
            if answer in ("", "n", "no"):
                return None
            if answer in ("a", "always"):
                self.always, self._auto_runs = True, 0
                break
            if answer in ("e", "edit"):
                edited = self.ask_edit(code)
                if edited is None or not edited.strip():
                    return None
                code = edited
                self.notice(_show(code))
                continue
        if not network:
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
        """A new conversation: a fresh sandbox, and "always" forgotten (--yes stays)."""
        self.always = self.options.auto_yes
        self._auto_runs = 0
        if self._sandbox is not None:
            self._sandbox.reset()

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def _show(code: str) -> str:
    """The code, syntax-highlighted on a terminal, its control characters written out."""
    code = visible(code)
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
