"""The chat loop: read a message, stream the reply, keep and save the conversation.

Input comes from prompt_toolkit on a terminal (history, editing, Esc then Enter for a new
line, pasted text kept whole) or line by line from a pipe (`echo hi | mistol chat`).
Ctrl-C during a reply stops it and keeps what was said; Ctrl-C or Ctrl-D at the prompt
leaves. Every message is written to the chat log as it happens. With tools (--tools), a
reply may call them first (user_tools.py): the calls and results are shown and kept.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import MistolError
from ..generation import speculation_note
from ..sampling import SamplingParams
from ..sandbox.code_turn import CodeRunner, CodeTurn, code_turn
from ..sandbox.visible import visible
from ..util import private_dir, private_file
from .log import ChatLog, data_dir, drop_last_exchange, replay, save_messages, set_system

DEFAULT_SYSTEM = "You are Hermes, a helpful, honest and concise assistant."

HELP = """\
Commands:
  /help           this help
  /system TEXT    set the system prompt
  /reset          start over (keeps the system prompt)
  /undo           drop the last exchange
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save (or a chat log)
  /exit           leave (Ctrl-D works too)
Keys: Enter sends, Esc then Enter adds a new line, Ctrl-C stops a reply."""


@dataclass
class ChatOptions:
    verbose: bool = False
    interactive: bool = True
    tool_choice: str = "auto"  # for the first reply of each turn, with tools


class ChatApp:
    def __init__(
        self, llm, params: SamplingParams, log: ChatLog, messages: list[dict], options: ChatOptions,
        code: CodeRunner | None = None, tools=None, approve=None,
    ):
        self.llm = llm
        self.params = params
        self.log = log
        self.messages = messages
        self.options = options
        self.code = code  # None: code blocks are shown, never run
        self.tools = tools  # a FunctionTools: the model may call them (then code blocks are not run)
        self.approve = approve  # a user_tools.CallApprover
        if approve is not None:
            approve.notice = self.notice
        if code is not None:
            code.notice = self.notice
        self._line_open = False  # the reply's last line on stdout has no newline yet
        self._logged = ""  # the reply as the log has it
        self.failed_replies = 0  # replies an error stopped (a piped chat then exits 1)

    # -- output --------------------------------------------------------------------------
    def notice(self, text: str) -> None:
        self._end_line()  # a notice starts on a line of its own, not after a closing fence
        print(f"\033[2m{text}\033[0m" if self.options.interactive else text, file=sys.stderr, flush=True)

    def _end_line(self) -> None:
        if self._line_open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._line_open = False

    def show_recent(self, exchanges: int = 2) -> None:
        """The end of a resumed conversation, so the person sees where it left off."""
        # (a tool's result, and a reply that only called tools, say nothing to show here)
        shown = [m for m in self.messages if m["role"] in ("user", "assistant")
                 and not (m.get("tool_calls") and not m["content"])][-2 * exchanges:]
        if not shown:
            return
        self.notice(f"... resuming ({_exchanges(self.messages)} message(s)); the last:")
        for m in shown:
            text = visible(m["content"].strip())
            if len(text) > 600:
                text = "... " + text[-600:]
            prefix = ">>> " if m["role"] == "user" else ""
            print(prefix + text, flush=True)

    # -- the loop ------------------------------------------------------------------------
    def run(self, lines: Iterator[str]) -> None:
        for line in lines:
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line.strip()):
                    return
            else:
                self.user_turn(line)

    def user_turn(self, text: str) -> None:
        self.add("user", text)
        self.reply()

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
        self.log.write("message", role=role, content=content)

    def reply(self) -> str:
        """Stream the assistant's reply and record it as it comes; in between, run the code
        blocks it writes (with the person's yes) and feed their output back."""
        if self.tools is not None:
            return self.tool_reply()
        self.add("assistant", "")
        message = self.messages[-1]
        self._logged = ""
        if self.code is not None:
            self.code.new_reply()
        turn = None
        try:
            run = self.code.run_block if self.code else None
            turn = code_turn(self.llm, self.messages, self.params, run, self._show)
        except KeyboardInterrupt:
            self._end_line()
            self.notice("[stopped]")
        except MistolError as e:  # (a message too long for the context, a server gone): said, and the chat goes on
            self.notice(f"error: {e}")
            self.failed_replies += 1
            if not message["content"]:
                self.messages.pop()  # nothing was said: do not keep an empty reply
                drop_last_exchange(self.messages)
                self.log.write("undo")
                return ""
        self._line_open = True
        self._end_line()
        if not self.options.interactive:
            sys.stdout.write("\n")  # piped: a blank line between replies
            sys.stdout.flush()
        self.report(turn)
        return message["content"]

    def tool_reply(self) -> str:
        """The reply with tools: the calls it makes, each asked about and run, then its answer,
        streamed. The messages it adds (calls, results, answer) go to the log as they come."""
        start = len(self.messages)
        logged = start
        answer = ""

        def log_new(*_) -> None:
            nonlocal logged
            for message in self.messages[logged:]:
                self.log.write("message", **message)
            logged = len(self.messages)

        def approve(call, arguments) -> bool:
            log_new()  # the call is in the log before it runs
            return self.approve(call, arguments)

        def on_result(call, result) -> None:
            self.approve.show_result(call, result)

        try:
            replies = self.llm.chat_with_tools(self.messages, self.tools, self.params, self.options.tool_choice,
                                               approve=approve, on_result=on_result, parallel_calls=False)
            for piece in replies:
                answer += piece
                self._show_answer(piece)
        except KeyboardInterrupt:
            self._end_line()
            self.notice("[stopped]")
            if not (self.messages[-1]["role"] == "assistant" and "tool_calls" not in self.messages[-1]
                    and len(self.messages) > start):
                self.messages.append({"role": "assistant", "content": answer})
        except MistolError as e:
            self.notice(f"error: {e}")
            self.failed_replies += 1
            if len(self.messages) == start:  # nothing was said: the question goes too
                drop_last_exchange(self.messages)
                self.log.write("undo")
                return ""
        log_new()
        self._line_open = True
        self._end_line()
        if not self.options.interactive:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.report()
        return self.messages[-1]["content"]

    def _show_answer(self, text: str) -> None:
        text = visible(text)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self._line_open = not text.endswith("\n")

    def _show(self, text: str, is_output: bool) -> None:
        content = self.messages[-1]["content"]
        before = content[: len(content) - len(text)]
        if before != self._logged:  # the person edited the code that ran: the log keeps the edit
            self.log.write("edit", content=before)
        self._logged = content
        self.log.write("delta", content=text)
        text = visible(text)  # the reply and the code's output: shown, never obeyed by the terminal
        if text:
            sys.stdout.write(f"\033[2m{text}\033[0m" if is_output and self.options.interactive else text)
            sys.stdout.flush()
            self._line_open = not text.endswith("\n")

    def report(self, turn: CodeTurn | None = None) -> None:
        if getattr(self.llm, "dropped", 0):
            self.notice(f"(context full: the {self.llm.dropped} oldest message(s) were left out of the prompt)")
        if self.options.verbose and turn is not None and turn.completion_tokens:
            ttft = f"{turn.time_to_first_token:.2f} s" if turn.time_to_first_token is not None else "-"
            self.notice(
                f"({turn.completion_tokens} tokens, {turn.tokens_per_second:.1f} tok/s, first token {ttft}, "
                f"{turn.prefilled_tokens} prompt tokens run{speculation_note(turn)})"
            )

    # -- slash commands ------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            print(HELP, file=sys.stderr)
        elif name == "/system":
            if not arg:
                current = self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else ""
                self.notice(f"system prompt: {current or '(none)'}")
            else:
                set_system(self.messages, arg)
                self.log.write("system", content=arg)
                self.notice("system prompt set")
        elif name == "/reset":
            self.messages[:] = [m for m in self.messages[:1] if m["role"] == "system"]
            self.log.write("reset")
            if self.code is not None:
                self.code.reset()
            if self.approve is not None:
                self.approve.reset()
            self.notice("conversation cleared")
        elif name == "/undo":
            if drop_last_exchange(self.messages):
                self.log.write("undo")
                self.notice("last exchange dropped")
            else:
                self.notice("nothing to undo")
        elif name == "/save":
            if not arg:
                self.notice("usage: /save FILE")
            else:
                self.save(arg)
        elif name == "/load":
            if not arg:
                self.notice("usage: /load FILE")
            else:
                self.load(arg)
        else:
            self.notice(f"unknown command {name}; /help lists them")
        return True


    def save(self, name: str) -> None:
        """/save: a failure is a one-line notice; the chat goes on."""
        try:
            save_messages(Path(name).expanduser(), self.messages)
        except MistolError as e:
            self.notice(f"not saved: {e}")
            return
        self.notice(f"saved to {name}")

    def load(self, name: str) -> None:
        """/load: a file that is not a chat is a one-line notice; one that would leave nothing
        of this conversation is loaded only after a yes (never when input is piped)."""
        try:
            loaded = replay(Path(name).expanduser())
        except MistolError as e:
            self.notice(f"not loaded: {e}")
            return
        if _exchanges(self.messages) and not _exchanges(loaded):
            had = f"{_exchanges(self.messages)} message(s)"
            if self.messages[0]["role"] == "system" and not loaded:
                had += " and the system prompt"
            warning = f"{name} holds no conversation: loading it would wipe this one ({had})"
            if not self.options.interactive:
                self.notice(f"not loaded: {warning}")
                return
            if ask_line(f"{warning}. Load it anyway? [y/N] ").strip().lower() not in ("y", "yes"):
                self.notice("not loaded")
                return
        self.messages[:] = loaded
        self.log.write("replace", messages=loaded)
        self.notice(f"loaded {len(loaded)} message(s) from {name}")


def _exchanges(messages: list[dict]) -> int:
    """How many messages are more than the system prompt."""
    return sum(m["role"] != "system" for m in messages)


# -- input -------------------------------------------------------------------------------
def terminal_lines() -> Iterator[str]:
    """Lines from an interactive prompt; ends on Ctrl-D or Ctrl-C."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    try:
        history = private_dir(data_dir()) / "history"
        private_file(history)  # what was typed: the owner's only
        kept = FileHistory(str(history))
    except OSError:  # no writable data directory: the arrow keys recall this session's lines only
        kept = InMemoryHistory()
    session = PromptSession(history=kept, key_bindings=bindings)
    while True:
        try:
            yield session.prompt(">>> ")
        except (EOFError, KeyboardInterrupt):
            return


def piped_lines() -> Iterator[str]:
    for line in sys.stdin:
        yield line.rstrip("\n")


def ask_line(question: str) -> str:
    """One answer typed at the terminal (Ctrl-C or Ctrl-D count as no)."""
    from prompt_toolkit import prompt

    try:
        return prompt(question)
    except (EOFError, KeyboardInterrupt):
        return "n"
