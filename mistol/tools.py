"""Tool (function) calls in the Hermes / Qwen format, for models without a tool format of their own.

The model is shown the tools in its system prompt and answers a call as JSON inside tags,
the format Hermes 2 Pro and Qwen 2.5 were trained on (and which ChatML models follow):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A tool's result comes back as a user turn holding `<tool_response>...</tool_response>` (Qwen's
way: it needs no role that a chat template might not know). `render_messages` turns OpenAI's
messages (assistant `tool_calls`, `role: "tool"`) into such plain messages.

The reply is constrained (`grammar`, a Lark grammar for constraints.py): a call names one of the
tools and its arguments match that tool's JSON schema, so they always parse. With
`tool_choice` "auto" the reply is either text (not starting with "<") or calls; "required" and
a named function force calls. `ToolCallParser` reads a reply, streamed or whole, into text and
calls; the grammar fixes their layout, which is what lets it stream each call's arguments as
they are written.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from .constraints import JSON_DEFAULTS
from .errors import MistolError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEADER = re.compile(r'<tool_call>\n\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')
_END = "}\n" + CLOSE

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object"})

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise MistolError(f"tool name {self.name!r}: use 1 to 64 letters, digits, '_' or '-'")

    def signature(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def call_text(name: str, arguments: dict | str) -> str:
    """One call as the model writes it (and as the grammar lays it out)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise MistolError(f"the arguments of a call to {name!r} are not JSON: {arguments[:80]!r}") from None
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def render_messages(messages: Sequence[dict], tools: Sequence[Tool]) -> list[dict]:
    """OpenAI messages with tools, calls and results, as plain {role, content} messages."""
    out: list[dict] = []
    if tools:
        prompt = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t.signature(), ensure_ascii=False) for t in tools))
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # results of one turn's calls: one user turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        elif m.get("tool_calls"):
            calls = "\n".join(call_text(c["name"], c["arguments"]) for c in m["tool_calls"])
            text = f"{m['content']}\n{calls}" if m.get("content") else calls
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": m["role"], "content": m["content"] or ""})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def grammar(tools: Sequence[Tool], choice: str, parallel: bool = True) -> str:
    """The Lark grammar a reply must match. choice: "auto", "required", or a tool's name."""
    chosen = [t for t in tools if t.name == choice] if choice not in ("auto", "required") else list(tools)
    if not chosen:
        raise MistolError(f"tool_choice names {choice!r}, which is not among the tools")
    rules = []
    for i, tool in enumerate(chosen):
        schema = dict(tool.parameters) if isinstance(tool.parameters, dict) else tool.parameters
        if isinstance(schema, dict):
            schema["x-guidance"] = {**JSON_DEFAULTS, **schema.get("x-guidance", {})}
        head = json.dumps(f'{{"name": "{tool.name}", "arguments": ')
        rules.append(f"call_{i}: {head} args_{i} \"}}\"\nargs_{i}: %json {json.dumps(schema)}")
    single = parallel is False or choice not in ("auto", "required")
    lines = [
        "start: calls | TEXT" if choice == "auto" else "start: calls",
        "calls: call" if single else 'calls: call ("\\n" call)*',
        f"call: {json.dumps(OPEN + chr(10))} ({' | '.join(f'call_{i}' for i in range(len(chosen)))}) "
        f"{json.dumps(chr(10) + CLOSE)}",
        *rules,
    ]
    if choice == "auto":
        lines.append(r"TEXT: /\s*[^<\s][\s\S]*/")  # text, which never opens with a call's "<"
    return "\n".join(lines) + "\n"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


class ToolCallParser:
    """A reply, fed as it comes, read into text and calls. `feed` and `finish` return what is
    new: ("content", text), ("call", index) once a call's name is known, ("arguments", index, text)."""

    def __init__(self):
        self.mode: str | None = None  # "text" or "calls", once the reply shows which
        self.content = ""
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._open: ToolCall | None = None  # the call whose arguments are being written

    def feed(self, text: str) -> list[tuple]:
        self._buffer += text
        events: list[tuple] = []
        while self._buffer:
            if self.mode is None:
                head = self._buffer.lstrip()
                if not head or (OPEN.startswith(head) and head != OPEN):
                    break  # not yet known
                self.mode = "calls" if head.startswith(OPEN) else "text"
                if self.mode == "calls":
                    self._buffer = head
            elif self.mode == "text":
                events.append(("content", self._buffer))
                self.content += self._buffer
                self._buffer = ""
            elif self._open is None:
                self._buffer = self._buffer.lstrip("\n")
                match = _HEADER.match(self._buffer)
                if match is None:
                    break
                self._open = ToolCall(f"call_{secrets.token_hex(12)}", match.group(1))
                self.calls.append(self._open)
                events.append(("call", len(self.calls) - 1))
                self._buffer = self._buffer[match.end():]
            else:
                end = self._buffer.find(_END)
                cut = end if end >= 0 else len(self._buffer) - _partial_suffix(self._buffer, _END)
                if cut:
                    self._open.arguments += self._buffer[:cut]
                    events.append(("arguments", len(self.calls) - 1, self._buffer[:cut]))
                self._buffer = self._buffer[cut:]
                if end < 0:
                    break
                self._buffer = self._buffer[len(_END):]
                self._open = None
        return events

    def finish(self) -> list[tuple]:
        """The end of the reply: what was held back (a reply cut short keeps its partial call)."""
        events = []
        if self._buffer:
            if self.mode is None or self.mode == "text":
                self.mode = "text"
                events.append(("content", self._buffer))
                self.content += self._buffer
            elif self._open is not None:
                self._open.arguments += self._buffer
                events.append(("arguments", len(self.calls) - 1, self._buffer))
            self._buffer = ""
        return events


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (held back: it may be the marker)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
