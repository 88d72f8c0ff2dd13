"""Tool (function) calls: the tools offered, the calls a reply makes, and the Hermes / Qwen format.

Two formats are known: Llama 3.1's own (tools_llama3.py), used when the model's chat template
is Llama 3.x's, and the Hermes / Qwen one below for every other model. tool_formats.py says
which; both give the same three things: the prompt (through `ChatTemplate.render(...,
tools=)`), the grammar a reply must match, and a `ToolCallParser` for the reply.

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


@dataclass(frozen=True)
class CallSyntax:
    """How a reply writes its calls, as `ToolCallParser` reads them: a reply that begins with
    `opener` is calls; `header` matches a call up to its arguments (group 1: the name); `end`
    follows the arguments, or (end_at_finish) the arguments run to the end of the reply but
    for a last `end`."""

    opener: str
    header: re.Pattern
    end: str
    end_at_finish: bool = False


# (?=\S): a header is known once its arguments begin, not while the space before them may follow
HERMES = CallSyntax(OPEN, re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,'
                                     r'\s*"arguments"\s*:\s*(?=\S)'), "}\n" + CLOSE)

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


def call_fields(call: dict) -> tuple[str, dict]:
    """The name and the arguments (a dict) of a call in a message, written flat ({name, arguments})
    or as OpenAI's API does ({function: {name, arguments}}); the arguments as a JSON string or a dict."""
    fn = call.get("function", call)
    name, arguments = fn.get("name"), fn.get("arguments", {})
    if not isinstance(name, str):
        raise MistolError("a tool call needs a function name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise MistolError(f"the arguments of a call to {name!r} are not JSON: {arguments[:80]!r}") from None
    if not isinstance(arguments, dict):
        raise MistolError(f"the arguments of a call to {name!r} must be a JSON object")
    return name, arguments


def call_text(name: str, arguments: dict | str) -> str:
    """One call as the model writes it (and as the grammar lays it out)."""
    name, arguments = call_fields({"name": name, "arguments": arguments})
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
            calls = "\n".join(call_text(*call_fields(c)) for c in m["tool_calls"])
            text = f"{m['content']}\n{calls}" if m.get("content") else calls
            out.append({"role": "assistant", "content": text})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def grammar(tools: Sequence[Tool], choice: str, parallel: bool = True) -> str:
    """The Lark grammar a reply must match. choice: "auto", "required", or a tool's name."""
    chosen = chosen_tools(tools, choice)
    rules = []
    for i, tool in enumerate(chosen):
        head = json.dumps(f'{{"name": "{tool.name}", "arguments": ')
        rules.append(f"call_{i}: {head} args_{i} \"}}\"\nargs_{i}: %json {json.dumps(arguments_schema(tool))}")
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


def chosen_tools(tools: Sequence[Tool], choice: str) -> list[Tool]:
    """The tools a reply may call under `choice` ("auto", "required", or a tool's name)."""
    chosen = [t for t in tools if t.name == choice] if choice not in ("auto", "required") else list(tools)
    if not chosen:
        raise MistolError(f"tool_choice names {choice!r}, which is not among the tools")
    return chosen


def arguments_schema(tool: Tool):
    """The tool's parameters schema, with JSON laid out as OpenAI writes it (see constraints.py)."""
    schema = dict(tool.parameters) if isinstance(tool.parameters, dict) else tool.parameters
    if isinstance(schema, dict):
        schema["x-guidance"] = {**JSON_DEFAULTS, **schema.get("x-guidance", {})}
    return schema


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


class ToolCallParser:
    """A reply, fed as it comes, read into text and calls. `feed` and `finish` return what is
    new: ("content", text), ("call", index) once a call's name is known, ("arguments", index, text)."""

    def __init__(self, syntax: CallSyntax = HERMES):
        self.syntax = syntax
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
                head, opener = self._buffer.lstrip(), self.syntax.opener
                if not head or (opener.startswith(head) and head != opener):
                    break  # not yet known
                self.mode = "calls" if head.startswith(opener) else "text"
                if self.mode == "calls":
                    self._buffer = head
            elif self.mode == "text":
                events.append(("content", self._buffer))
                self.content += self._buffer
                self._buffer = ""
            elif self._open is None:
                self._buffer = self._buffer.lstrip("\n")
                match = self.syntax.header.match(self._buffer)
                if match is None:
                    break
                self._open = ToolCall(f"call_{secrets.token_hex(12)}", match.group(1))
                self.calls.append(self._open)
                events.append(("call", len(self.calls) - 1))
                self._buffer = self._buffer[match.end():]
            elif self.syntax.end_at_finish:
                # the arguments run to the reply's end: hold back a last "}" (and what follows it)
                kept = self._buffer.rstrip()
                cut = len(kept) - 1 if kept.endswith(self.syntax.end) else len(kept)
                if cut > 0:
                    self._open.arguments += self._buffer[:cut]
                    events.append(("arguments", len(self.calls) - 1, self._buffer[:cut]))
                    self._buffer = self._buffer[cut:]
                break
            else:
                end_marker = self.syntax.end
                end = self._buffer.find(end_marker)
                cut = end if end >= 0 else len(self._buffer) - _partial_suffix(self._buffer, end_marker)
                if cut:
                    self._open.arguments += self._buffer[:cut]
                    events.append(("arguments", len(self.calls) - 1, self._buffer[:cut]))
                self._buffer = self._buffer[cut:]
                if end < 0:
                    break
                self._buffer = self._buffer[len(end_marker):]
                self._open = None
        return events

    def finish(self) -> list[tuple]:
        """The end of the reply: what was held back (a reply cut short keeps its partial call)."""
        events = []
        if self.mode is None and self._buffer.strip() and self.syntax.opener.startswith(self._buffer.strip()):
            self.mode, self._buffer = "calls", ""  # a call cut short before its opener was whole
        if self._buffer:
            if self.mode is None or self.mode == "text":
                self.mode = "text"
                events.append(("content", self._buffer))
                self.content += self._buffer
            elif self._open is not None:
                rest = self._buffer
                if self.syntax.end_at_finish:
                    rest = rest.rstrip()
                    rest = rest[: -len(self.syntax.end)] if rest.endswith(self.syntax.end) else rest
                if rest:
                    self._open.arguments += rest
                    events.append(("arguments", len(self.calls) - 1, rest))
            self._buffer = ""
        return events


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (held back: it may be the marker)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesFormat:
    """The Hermes / Qwen format: tools in the system prompt, calls in <tool_call> tags, results
    as a user turn of <tool_response>s; it works through any chat template."""

    name = "hermes"

    def messages(self, messages: Sequence[dict], tools: Sequence[Tool]) -> list[dict]:
        return render_messages(messages, tools)

    def grammar(self, tools: Sequence[Tool], choice: str, parallel: bool = True) -> str:
        return grammar(tools, choice, parallel)

    def parser(self) -> ToolCallParser:
        return ToolCallParser(HERMES)

