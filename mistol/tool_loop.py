"""The rounds of a reply that calls tools: the model calls, the functions run, their results go
back, and the model goes on until it answers in text.

`tool_rounds` drives any LLM with a `tool_step` generator (see llm.py): each round's reply is
either text, which ends the turn, or calls (their arguments fit the tool's schema: the grammar
sees to it), which are run and answered with `tool` messages. `tool_choice` holds for the first
round only (a forced call would otherwise repeat forever); later rounds are "auto", and the
last of `max_rounds` + 1 offers no tools at all, so that the turn always ends in an answer.
`approve(call, arguments)` may refuse a call (the chat asks the person): the model is then told
that the user declined it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from .tools import ToolCall

MAX_TOOL_ROUNDS = 8  # rounds of calls in one turn before the model must answer
DECLINED = "(the user declined this call)"


@dataclass
class ToolStep:
    """One reply of the model: its text, or the calls it makes (not yet run)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None

    def message(self) -> dict:
        """The reply as an assistant message (calls written as OpenAI's API writes them)."""
        message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls]
        return message


def tool_rounds(
    step: Callable[..., Generator[str, None, ToolStep]],
    messages: list[dict],
    functions,
    params,
    tool_choice: str = "auto",
    max_rounds: int = MAX_TOOL_ROUNDS,
    approve: Callable[[ToolCall, dict], bool] | None = None,
    on_result: Callable[[ToolCall, str], None] | None = None,
) -> Iterator[str]:
    """Run the turn, appending the assistant's messages and the tools' results to `messages`;
    yields the text of the final answer as it is written. `functions`: a `FunctionTools`;
    `step(messages, tools, params, tool_choice)` yields a reply's text and returns its `ToolStep`."""
    for round_ in range(max_rounds + 1):
        choice = "none" if round_ == max_rounds else tool_choice if round_ == 0 else "auto"
        reply = yield from step(messages, functions.tools, params, choice)
        messages.append(reply.message())
        if not reply.tool_calls:
            return
        for call in reply.tool_calls:
            result = run_call(functions, call, approve)
            if on_result is not None:
                on_result(call, result)
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})


def run_call(functions, call: ToolCall, approve=None) -> str:
    """The call's result, or why it did not run, as the model is shown it."""
    if approve is not None:
        try:
            arguments = functions.arguments(call)
        except ValueError as e:
            return f"error: the arguments are not valid JSON ({e})"
        if not approve(call, arguments):
            return DECLINED
    return functions.run(call)
