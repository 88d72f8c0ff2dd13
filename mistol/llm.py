"""The `LLM` interface every front end talks to, and its in-process implementation.

`chat(messages, params)` streams the assistant's reply as text. `LocalLLM` keeps one
`Session` (one KV cache) for the conversation it serves, so each call runs only the tokens
the conversation gained since the last one. An OpenAI-compatible HTTP client implements
the same interface for remote servers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Mapping, Protocol

from .chat_template import ChatTemplate, Pieces, known_pieces
from .generation import Generation
from .sampling import SamplingParams

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

    @property
    def max_context(self) -> int:
        return self.session.max_context

    def prompt_ids(self, messages: Sequence[Message], continue_last: bool = False) -> list[int]:
        return self.template.render(messages, continue_last=continue_last, reply_tokens=self._reply_tokens)

    def chat(
        self, messages: Sequence[Message], params: SamplingParams, continue_last: bool = False
    ) -> Iterator[str]:
        messages = list(messages)
        prompt, kept = self._fit(messages, params.max_tokens, continue_last)
        self.dropped = len(messages) - len(kept)
        stop_ids = sorted(set(params.stop_token_ids) | set(self.template.stop_ids))
        params = _with_stop_ids(params, stop_ids)
        result = Generation()
        self.last = result
        try:
            yield from self.session.stream(prompt, params, result)
        finally:
            self._remember(kept, result, continue_last)

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

    def _fit(self, messages: list, max_tokens: int, continue_last: bool) -> tuple[list[int], list]:
        """Render, dropping the oldest messages after the system prompt until the prompt
        and the reply fit in the context (the caller's list keeps them all)."""
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            kept = messages[:first] + messages[first + dropped :]
            prompt = self.prompt_ids(kept, continue_last)
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


def _with_stop_ids(params: SamplingParams, stop_ids: list[int]) -> SamplingParams:
    from dataclasses import replace

    return replace(params, stop_token_ids=stop_ids)


