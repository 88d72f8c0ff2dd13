"""The streaming code-block detector and the output block appended after a run."""

from __future__ import annotations

from mistol.sandbox.codeblocks import CodeBlock, CodeBlockDetector, format_output, is_runnable

REPLY = "Let me compute it.\n```python\nx = 6 * 7\nprint(x)\n```\nThe answer follows.\n"
CLOSE_END = REPLY.index("```\nThe") + 4  # just after the closing fence line


def feed_all(pieces: list[str]) -> list[tuple[int, CodeBlock]]:
    """Feed the pieces; return (index of the piece that completed it, block) for each block."""
    detector = CodeBlockDetector()
    found = [(i, b) for i, piece in enumerate(pieces) for b in detector.feed(piece)]
    return found + [(len(pieces), b) for b in detector.finish()]


def test_a_python_block_in_one_piece():
    ((_, block),) = feed_all([REPLY])
    assert block == CodeBlock("python", "x = 6 * 7\nprint(x)", closed=True, end=CLOSE_END)
    assert is_runnable(block)


def test_split_into_two_pieces_at_every_position_the_block_comes_when_its_fence_line_ends():
    for cut in range(len(REPLY) + 1):
        pieces = [REPLY[:cut], REPLY[cut:]]
        ((index, block),) = feed_all(pieces)
        assert block.code == "x = 6 * 7\nprint(x)" and block.language == "python" and block.end == CLOSE_END
        assert index == (0 if cut >= CLOSE_END else 1), cut


def test_split_at_every_pair_of_positions():
    n = len(REPLY)
    for i in range(n + 1):
        for j in range(i, n + 1):
            found = feed_all([REPLY[:i], REPLY[i:j], REPLY[j:]])
            assert [(b.language, b.code, b.end) for _, b in found] == [("python", "x = 6 * 7\nprint(x)", CLOSE_END)]


def test_one_character_at_a_time_the_block_comes_with_the_newline_after_the_fence():
    found = feed_all(list(REPLY))
    assert [(i, b.code) for i, b in found] == [(CLOSE_END - 1, "x = 6 * 7\nprint(x)")]


def test_several_blocks_and_other_languages_are_reported_but_only_python_runs():
    reply = (
        "First:\n```py\na = 1\n```\nA shell command:\n```bash\nls -la\n```\n"
        "Data:\n```json\n{\"k\": 1}\n```\nPlain:\n```\njust text\n```\nAgain:\n```Python title=demo\nb = 2\n```\n"
    )
    blocks = [b for _, b in feed_all([reply[i:i + 3] for i in range(0, len(reply), 3)])]
    assert [(b.language, b.code) for b in blocks] == [
        ("py", "a = 1"), ("bash", "ls -la"), ("json", '{"k": 1}'), ("", "just text"), ("python", "b = 2"),
    ]
    assert [is_runnable(b) for b in blocks] == [True, False, False, False, True]


def test_an_unclosed_block_at_the_end_is_reported_as_not_closed_and_does_not_run():
    detector = CodeBlockDetector()
    assert detector.feed("Here:\n```python\nfor i in range(3):\n    print(") == []
    assert detector.in_block
    (block,) = detector.finish()
    assert block == CodeBlock("python", "for i in range(3):\n    print(", closed=False, end=len("Here:\n```python\nfor i in range(3):\n    print("))
    assert not is_runnable(block)
    assert not detector.in_block and detector.finish() == []  # ready for the next reply


def test_a_closing_fence_at_the_very_end_of_the_stream_closes_the_block():
    detector = CodeBlockDetector()
    assert detector.feed("```python\nprint(1)\n``") == []
    assert detector.feed("`") == []  # "```" might still become "````" or "```x"
    (block,) = detector.finish()
    assert block.closed and is_runnable(block) and block.code == "print(1)"


def test_fence_rules_indentation_longer_fences_tildes_and_inline_backticks():
    reply = (
        "1. Install:\n   ```python\n   import os\n   if True:\n       pass\n   ```\n"
        "````python\nprint('```')\n```\n````\n"
        "~~~py\nz = 3\n~~~\n"
        "Inline ```python x``` is not a fence.\n"
        "```python x``` is not one at the start of a line either.\n"
    )
    blocks = [b for _, b in feed_all([reply])]
    assert [(b.language, b.code) for b in blocks] == [
        ("python", "import os\nif True:\n    pass"),
        ("python", "print('```')\n```"),  # a shorter fence inside does not close it
        ("py", "z = 3"),
    ]


def test_a_fence_with_text_after_it_does_not_close_the_block():
    found = feed_all(["```python\ns = '''\n```py\n'''\n```\n"])
    assert [b.code for _, b in found] == ["s = '''\n```py\n'''"]


def test_crlf_line_ends():
    ((_, block),) = feed_all(["```python\r\nprint(1)\r\n```\r\n"])
    assert block.code == "print(1)" and block.closed


def test_format_output_is_the_block_appended_to_the_assistant_turn():
    assert format_output("42\n") == "\nOutput:\n```\n42\n```\n"
    assert format_output("42") == "\nOutput:\n```\n42\n```\n"
    assert format_output("a\nb\n\n") == "\nOutput:\n```\na\nb\n\n```\n"  # only one newline is dropped
    assert format_output("") == "\nOutput:\n```\n\n```\n"
