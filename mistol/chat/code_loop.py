"""One assistant turn that may run code: stream, stop at a closed ```python block, run it,
append its output to the turn, and let the model go on writing (`continue_last`).

Shared by the chat (`ChatApp`, which asks the person before each run) and `mistol math`
(which runs without asking, in the same sandbox with the same limits). The caller decides
what running a block means (`run`) and where the text goes (`show`); this module only
holds the loop, so both front ends stop and continue at exactly the same places.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..sampling import SamplingParams
from ..sandbox.codeblocks import CodeBlock, CodeBlockDetector, format_output, is_runnable
from .code_mode import MAX_CODE_ROUNDS


@dataclass
class CodeTurn:
    """What one turn did: the code it ran with each output, and the tokens it generated."""

    runs: list[tuple[str, str]] = field(default_factory=list)  # (code, output the model was shown)
    completion_tokens: int = 0
    finish_reason: str | None = None


def code_turn(
    llm,
    messages: list[dict],
    params: SamplingParams,
    run: Callable[[CodeBlock], str] | None,
    show: Callable[[str, bool], None] | None = None,
    max_rounds: int = MAX_CODE_ROUNDS,
) -> CodeTurn:
    """Write the assistant message `messages[-1]` (appending to its "content"), running the
    runnable code blocks it closes with `run` (None: blocks are written, never run).

    `show(text, is_output)` sees each piece as it is appended, the code's output with
    is_output=True. A KeyboardInterrupt or MistolError leaves the message as far as it got.
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
            block = stream_until_block(llm, messages, params, continue_last, say, detect=run is not None)
        finally:
            last = getattr(llm, "last", None)
            if last is not None:
                turn.completion_tokens += last.completion_tokens
                turn.finish_reason = last.finish_reason
        if block is None or run is None:
            break
        output = run(block)
        turn.runs.append((block.code, output))
        say(format_output(output), True)
        continue_last = True
    return turn


def stream_until_block(
    llm, messages: list[dict], params: SamplingParams, continue_last: bool,
    say: Callable[[str], None], detect: bool = True,
) -> CodeBlock | None:
    """Stream until the reply ends, or until a runnable code block closes (returned)."""
    context = messages if continue_last else messages[:-1]
    detector = CodeBlockDetector() if detect else None
    written = ""
    stream = llm.chat(context, params, continue_last=continue_last)
    try:
        for piece in stream:
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
