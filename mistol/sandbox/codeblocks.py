"""Find fenced code blocks in a reply while it streams, so the chat can stop and run them.

Text arrives in pieces of any size (a fence's backticks may come one token at a time), so the
detector works on whole lines and keeps the unfinished last line for later. A block is
complete as soon as its closing fence line is: "```" and a newline, or "```" at the end of
the stream (`finish`).

What runs: only closed blocks fenced as ```python or ```py (python3, py3 too). Other
languages (```bash, ```json) are reported with their language but not run. A bare ``` is
not run either: models use it for output, shell sessions and plain text, and mistol itself
shows the code's output in a bare fence, which a model may imitate. A block still open when
the stream ends (the reply was cut off) is reported as not closed and is not run.

Fences follow CommonMark where it matters for model output: three or more backticks or
tildes, indented or not (inside list items); the closing fence uses the same character, at
least as many, and nothing else on its line; the opening fence's indentation is removed from
the code lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RUNNABLE_LANGUAGES = frozenset({"python", "py", "python3", "py3"})
_OPENING = re.compile(r"^([ \t]*)(`{3,}|~{3,})(.*)$")
_CLOSING = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*$")
_LANGUAGE = re.compile(r"[{.\s]*([\w+#-]*)")


@dataclass
class CodeBlock:
    language: str  # lower case, "" for a bare fence
    code: str  # the lines between the fences, without the last newline
    closed: bool = True  # False: the stream ended inside the block
    end: int = 0  # offset in the fed text just after the closing fence line


def is_runnable(block: CodeBlock) -> bool:
    return block.closed and block.language in RUNNABLE_LANGUAGES


def format_output(output: str) -> str:
    """How a run's output is appended to the assistant's turn, so the model continues after it."""
    if output.endswith("\n"):
        output = output[:-1]
    return f"\nOutput:\n```\n{output}\n```\n"


class CodeBlockDetector:
    """Feed streamed text; get each code block back as soon as its closing fence line ends."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._line = ""  # the unfinished last line
        self._offset = 0  # characters in the lines already handled
        self._fence = ""  # the opening fence while inside a block, else ""
        self._indent = 0
        self._language = ""
        self._code: list[str] = []

    @property
    def in_block(self) -> bool:
        return bool(self._fence)

    def feed(self, text: str) -> list[CodeBlock]:
        """The blocks that `text` completes (most often none)."""
        blocks = []
        self._line += text
        while (newline := self._line.find("\n")) >= 0:
            line, self._line = self._line[:newline], self._line[newline + 1:]
            self._offset += newline + 1
            if (block := self._handle(line)) is not None:
                blocks.append(block)
        return blocks

    def finish(self) -> list[CodeBlock]:
        """End of the stream: the last line may close a block; a block left open is reported.

        The detector is then empty again, ready for the next reply.
        """
        blocks = []
        if self._line:
            line, self._line = self._line, ""
            self._offset += len(line)
            if (block := self._handle(line)) is not None:
                blocks.append(block)
        if self._fence:
            blocks.append(CodeBlock(self._language, "\n".join(self._code), closed=False, end=self._offset))
        self._reset()
        return blocks

    def _handle(self, line: str) -> CodeBlock | None:
        line = line.removesuffix("\r")
        if not self._fence:
            m = _OPENING.match(line)
            if m and not (m[2][0] == "`" and "`" in m[3]):  # ```x``` on one line is inline code
                self._fence, self._indent = m[2], len(m[1])
                self._language = _LANGUAGE.match(m[3].strip())[1].lower()
                self._code = []
            return None
        m = _CLOSING.match(line)
        if m and m[1][0] == self._fence[0] and len(m[1]) >= len(self._fence):
            block = CodeBlock(self._language, "\n".join(self._code), closed=True, end=self._offset)
            self._fence, self._code = "", []
            return block
        self._code.append(_dedent(line, self._indent))
        return None


def _dedent(line: str, indent: int) -> str:
    """Remove up to `indent` leading blanks, the opening fence's indentation."""
    n = 0
    while n < indent and n < len(line) and line[n] in " \t":
        n += 1
    return line[n:]
