"""The `LLM` interface every front end talks to, and its in-process implementation.

`chat(messages, params)` streams the assistant's reply as text. `LocalLLM` keeps one
`Session` (one KV cache) for the conversation it serves, so each call runs only the tokens
the conversation gained since the last one. An OpenAI-compatible HTTP client implements
the same interface for remote servers.

Tools. Plain Python functions can be offered to a `LocalLLM` (tool_functions.py derives each
one's JSON schema from its signature and docstring):

    def get_weather(city: str) -> str:
        '''The weather in a city.'''
        ...

    answer = "".join(llm.chat(messages, tools=[get_weather]))     # the calls run, the answer streams
    for text in llm.chat_with_tools(messages, [get_weather]): ...  # same, `messages` gains the calls,
                                                                   # the results and the answer
    step = llm.tool_step(messages, [get_weather])                  # one reply: its text or its calls,
                                                                   # not run (`step.tool_calls`)

The calls are written in the model's tool format (Llama 3.1's or Hermes; tools.py), their
arguments constrained to the schema, the functions run in this process, and a function's
error goes back to the model as its result (tool_loop.py).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Mapping, Protocol

from .chat_template import ChatTemplate, Pieces, known_pieces
from .errors import MistolError
from .generation import Generation
from .sampling import SamplingParams
from .tool_loop import MAX_TOOL_ROUNDS, ToolStep, tool_rounds

if TYPE_CHECKING:  # the interface itself, and a remote server's client, need no torch
    from .engine import Engine

Message = Mapping[str, str]


class LLM(Protocol):
    last: Generation | None  # stats of the latest reply
    dropped: int  # messages left out of the latest prompt to fit the context

    def chat(
        self, messages: Sequence[Message], params: SamplingParams, continue_last: bool = False
    ) -> Iterator[str]: ...


class LocalLLM:
    """One conversation on the in-process engine (several may share one `Engine`)."""

    def __init__(self, engine: Engine, max_context: int | None = None, use_model_template: bool = True):
        self.engine = engine
        self.session = engine.new_session(max_context=max_context)
        self.template = ChatTemplate.for_tokenizer(engine.tokenizer, use_model_template)
        self.last: Generation | None = None
        self.dropped = 0
        self._reply_tokens: dict[str, Pieces] = {}
        self._grammar_vocab = None  # constraints.Grammars, built at the first call with tools

    @property
    def max_context(self) -> int:
        return self.session.max_context

    def prompt_ids(self, messages: Sequence[Message], continue_last: bool = False, tools: Sequence = ()) -> list[int]:
        return self.template.render(messages, continue_last=continue_last, reply_tokens=self._reply_tokens,
                                    tools=tools)

    def chat(
        self, messages: Sequence[Message], params: SamplingParams | None = None, continue_last: bool = False,
        tools: Sequence[Callable] | None = None, tool_choice: str = "auto", max_tool_rounds: int = MAX_TOOL_ROUNDS,
    ) -> Iterator[str]:
        """Stream the reply. With `tools` (Python functions), the model's calls are run and the
        final answer streams; `messages` is left as it is (see `chat_with_tools`)."""
        params = params or SamplingParams()
        if tools:
            yield from self.chat_with_tools(list(messages), tools, params, tool_choice, max_tool_rounds)
            return
        yield from self._stream(messages, params, continue_last)

    def chat_with_tools(
        self, messages: list[dict], tools, params: SamplingParams | None = None, tool_choice: str = "auto",
        max_rounds: int = MAX_TOOL_ROUNDS, approve: Callable | None = None, on_result: Callable | None = None,
        parallel_calls: bool = True,
    ) -> Iterator[str]:
        """Run a turn with tools (Python functions or a `FunctionTools`), appending the assistant's
        calls, the tools' results and its answer to `messages`; yields the answer's text.
        `tool_choice` ("auto", "required", a function's name) holds for the first reply;
        `approve(call, arguments)` may refuse a call (see tool_loop.py); `parallel_calls` False: one
        call per reply at most."""
        from .tool_functions import FunctionTools

        functions = tools if isinstance(tools, FunctionTools) else FunctionTools(tools)
        def step(messages, tools, params, choice):
            return self.tool_step_stream(messages, tools, params, choice, parallel_calls)

        yield from tool_rounds(step, messages, functions, params or SamplingParams(), tool_choice, max_rounds,
                               approve, on_result)

    def tool_step(self, messages: Sequence[Message], tools: Sequence, params: SamplingParams | None = None,
                  tool_choice: str = "auto", parallel_calls: bool = True) -> ToolStep:
        """One reply with `tools` offered (functions, `tools.Tool`s or OpenAI tool dicts): its
        text, or its calls, which are not run."""
        steps = self.tool_step_stream(messages, tools, params or SamplingParams(), tool_choice, parallel_calls)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def tool_step_stream(self, messages: Sequence[Message], tools: Sequence, params: SamplingParams,
                         tool_choice: str = "auto", parallel_calls: bool = True) -> Generator[str, None, ToolStep]:
        """`tool_step`, yielding the reply's text as it comes (a reply of calls yields none)."""
        from .constraints import Constraint
        from .tool_functions import as_tools

        offered = as_tools(tools) if tool_choice != "none" else []
        if not offered:
            text = yield from self._stream(messages, params, False)
            return ToolStep(text, [], self.last.finish_reason)
        fmt = self.template.tool_format
        grammars = self._grammars()
        lark = fmt.grammar(offered, tool_choice, parallel_calls)
        grammar = grammars.start(grammars.compile(Constraint("lark", lark)))
        parser = fmt.parser()
        for piece in self._stream(messages, params, False, offered, grammar):
            yield from (event[1] for event in parser.feed(piece) if event[0] == "content")
        yield from (event[1] for event in parser.finish() if event[0] == "content")
        calls, finish = parser.calls, self.last.finish_reason
        if finish == "length" and parser.mode == "calls" and not (calls and _is_json(calls[-1].arguments)):
            which = f"its call to {calls[-1].name}" if calls else "a call"
            raise MistolError(f"the reply reached max_tokens ({params.max_tokens}) in the middle of {which}; "
                              "give it more tokens")
        return ToolStep(parser.content, calls, finish)

    def _grammars(self):
        if self._grammar_vocab is None:
            from .constraints import Grammars

            self._grammar_vocab = Grammars(self.engine.tokenizer)
        return self._grammar_vocab

    def _stream(self, messages: Sequence[Message], params: SamplingParams, continue_last: bool, tools: Sequence = (),
                grammar=None) -> Generator[str, None, str]:
        """Stream the reply; returns its whole text."""
        messages = list(messages)
        prompt, kept = self._fit(messages, params.max_tokens, continue_last, tools)
        self.dropped = len(messages) - len(kept)
        stop_ids = sorted(set(params.stop_token_ids) | set(self.template.stop_ids))
        params = _with_stop_ids(params, stop_ids)
        result = Generation()
        self.last = result
        try:
            yield from self.session.stream(prompt, params, result, grammar=grammar)
        finally:
            self._remember(kept, result, continue_last)
        return result.text

    def save_cache(self, path) -> int:
        """Write the conversation's KV cache to `path` (see kv_file.py); its size in bytes."""
        from . import kv_file

        return kv_file.save(self.session, path, {"reply_tokens": self._reply_tokens})

    def restore_cache(self, path) -> str | None:
        """Take the KV cache saved at `path`; None when it was taken, else why not (the
        conversation then runs through the model again on the next turn)."""
        from . import kv_file

        extra, why_not = kv_file.restore(self.session, path)
        if extra is not None:
            replies = extra.get("reply_tokens")
            if isinstance(replies, dict):
                self._reply_tokens.update(replies)
        return why_not

    def _fit(self, messages: list, max_tokens: int, continue_last: bool,
             tools: Sequence = ()) -> tuple[list[int], list]:
        """Render, dropping the oldest messages after the system prompt until the prompt
        and the reply fit in the context (the caller's list keeps them all)."""
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            kept = messages[:first] + messages[first + dropped :]
            prompt = self.prompt_ids(kept, continue_last, tools)
            if len(prompt) + max_tokens <= self.max_context:
                return prompt, kept
            if len(kept) - first <= 1:
                self.session.check_fits(len(prompt), max_tokens)  # raises the clear error
            dropped += 1

    def _remember(self, messages: list, result: Generation, continue_last: bool) -> None:
        """Record the ids of the reply, so the next turn's prompt reuses them exactly."""
        ids = [t for t in result.token_ids if t not in self.template.stop_ids]
        if not ids or self.engine.tokenizer.decode(ids) != result.text:
            return  # e.g. cut by a stop string: let the next turn encode the text
        if continue_last:
            before = messages[-1]["content"]
            self._reply_tokens[before + result.text] = [*known_pieces(before, self._reply_tokens), *ids]
        else:
            self._reply_tokens[result.text] = ids


def _is_json(text: str) -> bool:
    import json

    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _with_stop_ids(params: SamplingParams, stop_ids: list[int]) -> SamplingParams:
    from dataclasses import replace

    return replace(params, stop_token_ids=stop_ids)


