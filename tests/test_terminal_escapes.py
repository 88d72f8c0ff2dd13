"""Control characters in code and its output are shown on the terminal, never obeyed.

The attack: `print("evil ran")  # \\x1b[2K\\x1b[G` makes the run prompt show a blank line for
a block that runs, and output can rewrite what was shown the same way (or reorder it with
bidi overrides). Each front end is driven with real code in the real sandbox; what reaches
the terminal must hold no raw ESC, and what the model is shown must be what the code printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistol.sandbox.code_turn import CodeOptions, CodeRunner
from mistol.sandbox.sandbox import SandboxLimits, network_isolation_available
from mistol.sandbox.visible import visible
from test_code_chat import ScriptedLLM, make_app

ROOT = Path(__file__).resolve().parents[1]
LIMITS = SandboxLimits(timeout_s=10, allow_network=not network_isolation_available())
SPOOF = "\x1b[2K\x1b[G"
CODE = f'print("evil ran")  # {SPOOF}\nprint("\\x1b[2K\\x1b[Gall clear \\u202eevil\\u202c \\x9b31m\\r\\x07")'
PRINTED = f"evil ran\n{SPOOF}all clear \u202eevil\u202c \x9b31m\r\x07\n"
RAW = ["\x1b", "\x9b", "\r", "\x07", "\u202e", "\u202c"]


def test_visible_spells_out_controls_and_keeps_text():
    assert visible(SPOOF) == "\\x1b[2K\\x1b[G"
    assert visible("a\rb\x07\x00\x7f\x9b") == "a\\x0db\\x07\\x00\\x7f\\x9b"
    assert visible("\u202eabc\u202c\u2066x\u2069") == "\\u202eabc\\u202c\\u2066x\\u2069"
    text = "line one\n\tindented: é, 漢字, emoji 🙂, ``` fences ```\n"
    assert visible(text) == text


def test_the_run_prompt_shows_the_escapes_of_the_code():
    shown = []
    runner = CodeRunner(CodeOptions(limits=LIMITS), lambda question: "y", shown.append)
    try:
        output = runner.handle(_block(CODE))
    finally:
        runner.close()
    prompt = "\n".join(shown)
    assert not any(c in prompt for c in RAW), prompt
    assert "# \\x1b[2K\\x1b[G" in prompt
    assert output == PRINTED  # the model is shown what the code printed


def test_the_chat_shows_the_reply_and_the_output_with_escapes_written_out(tmp_path, capsys):
    llm = ScriptedLLM(f"Running it.\n```python\n{CODE}\n```", "Done.")
    app = make_app(tmp_path, llm, CodeRunner(CodeOptions(auto_yes=True, limits=LIMITS), None, lambda text: None))
    try:
        app.user_turn("go")
    finally:
        app.code.close()
    out = capsys.readouterr().out
    assert not any(c in out for c in RAW), repr(out)
    assert "\\x1b[2K\\x1b[Gall clear \\u202eevil" in out and "# \\x1b[2K\\x1b[G" in out
    assert PRINTED in app.messages[-1]["content"] and SPOOF in app.messages[-1]["content"]
    assert llm.calls[1][0][-1]["content"].endswith(PRINTED + "```\n")  # the model sees the raw text


def test_the_voice_display_shows_escapes_written_out():
    from mistol.voice.loop import BufferSink, EventLog, Responder

    class SilentTTS:
        def synthesize(self, text):
            from mistol.voice.audio import silence

            return silence(0.01, 16000)

    shown = []
    llm = ScriptedLLM(f"Look {SPOOF}here.\n```python\n{CODE}\n```", "Done.")
    runner = CodeRunner(CodeOptions(auto_yes=True, limits=LIMITS), None, lambda text: None)
    messages = [{"role": "user", "content": "go"}]
    try:
        Responder(llm, None, SilentTTS(), BufferSink(), EventLog(), code=runner, on_text=shown.append).respond(messages)
    finally:
        runner.close()
    display = "".join(shown)
    assert not any(c in display for c in RAW), repr(display)
    assert "Look \\x1b[2K\\x1b[Ghere." in display and "all clear \\u202eevil" in display
    assert PRINTED in messages[-1]["content"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_exec_on_a_terminal_writes_escapes_out_and_through_a_pipe_keeps_them(tmp_path):
    script = tmp_path / "spoof.py"
    script.write_text(CODE)
    network = [] if network_isolation_available() else ["--allow-network"]
    command = [sys.executable, "-m", "mistol", "exec", str(script), *network]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    leader, follower = os.openpty()
    proc = subprocess.Popen(command, stdout=follower, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(60) == 0, proc.stderr.read()
    text = shown.decode()
    assert "\x1b" not in text and "\x9b" not in text and "\u202e" not in text, repr(text)
    assert "\\x1b[2K\\x1b[Gall clear \\u202eevil" in text
    piped = subprocess.run(command, capture_output=True, cwd=ROOT, env=env, timeout=60)
    assert piped.stdout.decode() == PRINTED  # a pipe gets exactly what the model would be shown


def _block(code: str):
    from mistol.sandbox.codeblocks import CodeBlock

    return CodeBlock("python", code)


