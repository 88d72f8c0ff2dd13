"""Two agents in conversation: `mistol duo`.

Each agent is its own `LLM` — over the in-process engine that means its own `Session`,
its own KV cache — so one agent's prefill never touches the other's keys and values (the
failure of sharing one cache between two model instances). Agents may share one `Engine`
(one copy of the weights). Each sees its persona as the system prompt, the other's lines as
user turns and its own as assistant turns, so every turn feeds only the newest line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling import SamplingParams
from .sandbox.code_turn import CodeRunner, code_turn


@dataclass
class Agent:
    name: str
    persona: str
    llm: object  # an `LLM`
    messages: list[dict] = field(default_factory=list)


def agent_system_prompt(me: str, persona: str, other: str, topic: str) -> str:
    return (
        f"{persona.strip()}\n\n"
        f"You are {me}, talking with {other} about: {topic.strip()}\n"
        f"Speak only as {me}, in a few sentences each time; {other}'s lines reach you as messages."
    )


class Duo:
    """Alternating turns between agents `a` and `b`; `a` opens on the topic."""

    def __init__(
        self, a: Agent, b: Agent, topic: str, params: SamplingParams, stop_phrase: str | None = None,
        code: CodeRunner | None = None,
    ):
        self.agents = (a, b)
        self.code = code  # None: code blocks are text; else both agents' blocks run through it
        self.topic = topic
        self.params = params
        self.stop_phrase = stop_phrase.lower() if stop_phrase else None
        self.transcript: list[dict] = []  # {"speaker", "content"} in order
        a.messages = [{"role": "system", "content": agent_system_prompt(a.name, a.persona, b.name, topic)},
                      {"role": "user", "content": f"Let's talk about {topic.strip()}. You start."}]
        b.messages = [{"role": "system", "content": agent_system_prompt(b.name, b.persona, a.name, topic)}]
        self.turn = 0

    @property
    def speaker(self) -> Agent:
        return self.agents[self.turn % 2]

    @property
    def listener(self) -> Agent:
        return self.agents[(self.turn + 1) % 2]

    def step(self, show: Callable[[str, bool], None] | None = None) -> str:
        """Write the next line, passing each piece to `show(text, is_output)` as it comes;
        with a code runner, the speaker's ```python blocks run and their output feeds back.
        However it ends (Ctrl-C too), the line is recorded in both agents' views."""
        speaker, listener = self.speaker, self.listener
        message = {"role": "assistant", "content": ""}
        speaker.messages.append(message)  # the speaker keeps its line verbatim: its cache holds it
        try:
            code_turn(speaker.llm, speaker.messages, self.params, self.code.handle if self.code else None, show)
        finally:
            line = message["content"].strip()
            listener.messages.append({"role": "user", "content": line})
            self.transcript.append({"speaker": speaker.name, "content": line})
            self.turn += 1
        return line

    def finished(self) -> bool:
        """Whether the last line said the stop phrase."""
        if not self.stop_phrase or not self.transcript:
            return False
        return self.stop_phrase in self.transcript[-1]["content"].lower()
