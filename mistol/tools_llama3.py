r"""Llama 3.1's tool format, written as its official chat template (Meta's tokenizer_config.json
for Llama 3.1 / 3.3 Instruct; 3.2's differs only in the date) writes it:

    <|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: ...<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, ... {tools, JSON}\n\n{text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>
    <|start_header_id|>ipython<|end_header_id|>\n\n"the tool's result"<|eot_id|>

The tools go into the first user message (the template's default `tools_in_user_message`); the
model answers a call as one JSON object and ends the turn with <|eom_id|> or <|eot_id|> (both
stop a reply); a tool's result comes back in an `ipython` turn. The template takes one call per
assistant message, so a reply here makes at most one.

The prompt is built here as pieces, not by running the model's template with the tools: the
message texts, the tools' JSON and the results stay plain text (never read for control tokens),
and models whose template is Llama 3's without the tool branches get the same prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime

from .errors import MistolError
from .pieces import known_pieces
from .tools import CallSyntax, Tool, ToolCallParser, arguments_schema, call_fields, chosen_tools

START, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
DEFAULT_DATE = "26 Jul 2024"  # the template's date_string when it is not given (3.1, 3.3)
USER_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
LLAMA3 = CallSyntax("{", re.compile(r'\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,'
                                    r'\s*"(?:parameters|arguments)"\s*:\s*(?=\S)'), "}", end_at_finish=True)


def is_llama3_template(template) -> bool:
    """The model's own template is Llama 3.x's (its header tokens), and the vocabulary has them."""
    source = template.jinja_source or ""
    tok = template.tokenizer
    return START in source and all(tok.token_id(t) is not None for t in (START, END_HEADER, EOT))


def call_text(name: str, arguments: dict) -> str:
    """One call as the template writes it (and the grammar lays it out)."""
    return f'{{"name": "{name}", "parameters": {json.dumps(arguments, ensure_ascii=False)}}}'


class Llama3Format:
    name = "llama3"

    def __init__(self, template):
        self.template = template
        source = template.jinja_source or ""
        # 3.2's template writes today's date; 3.1's and 3.3's a fixed one
        self.date = datetime.now().strftime("%d %b %Y") if "strftime_now" in source else DEFAULT_DATE

    def pieces(self, messages: Sequence[dict], tools: Sequence[Tool], gen_prompt: bool, continue_last: bool,
               reply_tokens=None) -> list:
        """The prompt as pieces (text and token ids; see chat_template.py), BOS first."""
        tok = self.template.tokenizer
        start, end, eot = (tok.token_id(t) for t in (START, END_HEADER, EOT))

        def header(role: str) -> list:
            return [start, role, end, "\n\n"]

        messages = list(messages)
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        out: list = [tok.bos_id] if tok.bos_id is not None else []
        environment = "Environment: ipython\n" if tools else ""
        out += [*header("system"),
                f"{environment}Cutting Knowledge Date: December 2023\nToday Date: {self.date}\n\n{system}", eot]
        if tools:
            if not messages:
                raise MistolError("Llama 3.1's tool format puts the tools in the first user message: there is none")
            signatures = "".join(json.dumps(t.signature(), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
            out += [*header("user"), USER_PREAMBLE + signatures + messages[0]["content"].strip(), eot]
            messages = messages[1:]
        for i, m in enumerate(messages):
            open_end = continue_last and i == len(messages) - 1
            if m.get("tool_calls"):
                if len(m["tool_calls"]) != 1:
                    raise MistolError(f"Llama 3.1's tool format takes one call per assistant message "
                                      f"(one has {len(m['tool_calls'])})")
                out += [*header("assistant"), *known_pieces(call_text(*call_fields(m["tool_calls"][0])), reply_tokens)]
            elif m["role"] in ("tool", "ipython"):
                # the template writes a result with `tojson`, which quotes a string too
                out += [*header("ipython"), json.dumps(m["content"], ensure_ascii=False)]
            else:
                text = m["content"] if open_end else m["content"].strip()
                text = text.lstrip()
                body = known_pieces(text, reply_tokens) if m["role"] == "assistant" else [text]
                out += [*header(m["role"]), *(p for p in body if p != "")]
            if not open_end:
                out.append(eot)
        if gen_prompt:
            out += header("assistant")
        return out

    def grammar(self, tools: Sequence[Tool], choice: str, parallel: bool = True) -> str:
        """The Lark grammar a reply must match: one call (or, with "auto", text not opening with "{")."""
        chosen = chosen_tools(tools, choice)
        rules = []
        for i, tool in enumerate(chosen):
            head = json.dumps(f'{{"name": "{tool.name}", "parameters": ')
            rules.append(f"call_{i}: {head} args_{i} \"}}\"\nargs_{i}: %json {json.dumps(arguments_schema(tool))}")
        lines = ["start: call | TEXT" if choice == "auto" else "start: call",
                 f"call: {' | '.join(f'call_{i}' for i in range(len(chosen)))}", *rules]
        if choice == "auto":
            lines.append(r"TEXT: /\s*[^{\s][\s\S]*/")
        return "\n".join(lines) + "\n"

    def parser(self) -> ToolCallParser:
        return ToolCallParser(LLAMA3)
