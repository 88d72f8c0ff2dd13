"""The chat's edges, in a real terminal (pexpect) and through pipes, with the demo model:
an edited block is what the conversation and its log keep, /reset forgets "always", notices
start on their own line, piped replies are apart, --resume shows where it left off, --verbose
counts the whole reply, and "always" asks again after a runaway number of blocks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mistol.chat.log import apply_event, replay
from mistol.sandbox.code_turn import CodeOptions, CodeRunner
from mistol.sandbox.sandbox import filesystem_isolation_available

RUN_QUESTION = "Run this code on this machine?"


def spawn(env, *args):
    pexpect = pytest.importorskip("pexpect")
    return pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", "demo", "-t", "0", *args],
                         env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1"}


def the_log(tmp_path):
    (log,) = (tmp_path / "mistol" / "chats").glob("*.jsonl")
    return log


@pytest.mark.slow
def test_an_edited_block_is_what_the_history_and_the_log_keep(env, tmp_path):
    import pexpect

    child = spawn(env)
    try:
        child.expect_exact(">>>")
        child.sendline("What is 37 * 48?")
        child.expect_exact(RUN_QUESTION)
        child.sendline("e")
        child.expect_exact("edit (Esc then Enter to accept)")
        child.send("\x15")  # Ctrl-U: the line before the cursor (the model's one-line block) goes
        child.send("print(1000 + 1)")
        child.send("\x1b\r")  # Esc, Enter: accept
        child.expect_exact(RUN_QUESTION)
        child.sendline("y")
        child.expect_exact("1001")
        child.expect_exact(">>>")
        # "a" then /reset: the next block is asked about again
        child.sendline("What is 12 * 11?")
        child.expect_exact(RUN_QUESTION)
        child.sendline("a")
        child.expect_exact("132")
        child.expect_exact(">>>")
        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.expect_exact(">>>")
        child.sendline("What is 9 * 9?")
        index = child.expect_exact([RUN_QUESTION, "81"])
        assert index == 0, "after /reset, [a]lways must not hold any more"
        child.sendline("n")
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    events = the_log(tmp_path).read_text()
    assert '"event": "edit"' in events
    # the log, replayed up to the reset, holds the edited code and its output; not the model's block
    lines = events.splitlines()
    upto_reset = lines[: next(i for i, line in enumerate(lines) if '"reset"' in line)]
    messages: list[dict] = []
    for line in upto_reset:
        apply_event(messages, json.loads(line))
    first_reply = messages[2]["content"]
    assert "print(1000 + 1)" in first_reply and "1001" in first_reply
    assert "37 * 48" not in first_reply.split("Output:")[0].split("```python")[-1]


@pytest.mark.slow
def test_notices_start_on_their_own_line(env):
    child = spawn(env)
    try:
        child.expect_exact(">>>")
        child.sendline("What is 37 * 48?")
        child.expect_exact("The assistant wants to run:")
        # what came just before the notice ends a line (no "```The assistant wants to run:")
        assert re.search(r"\n(\x1b\[[0-9;]*m)*$", child.before), repr(child.before[-40:])
        child.sendline("n")
        child.expect_exact(">>>")
    finally:
        child.close(force=True)


def test_piped_replies_are_apart_and_resume_shows_where_it_left_off(env, tmp_path):
    def chat(*args, text):
        return subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", "demo", "-t", "0", "--no-code",
                               "--max-tokens", "24", *args], input=text, capture_output=True, text=True, env=env,
                              timeout=300, check=True)

    out = chat(text="What is 2 + 2?\nWhat is 3 + 3?\n")
    replies = replay(the_log(tmp_path))
    first, second = (m["content"].strip() for m in replies if m["role"] == "assistant")
    assert f"{first}\n\n{second}" in out.stdout
    resumed = chat("--resume", text="/exit\n")
    assert ">>> What is 3 + 3?" in resumed.stdout and second[:40] in resumed.stdout
    assert "resuming" in resumed.stderr


@pytest.mark.slow
def test_verbose_counts_the_whole_reply(env, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", "demo", "-t", "0", "--yes", "-v"],
                         input="What is 37 * 48?\n", capture_output=True, text=True, env=env, timeout=300)
    if "code not run" in out.stderr:
        pytest.skip("no sandbox isolation here")
    (reported,) = re.findall(r"\((\d+) tokens, ", out.stderr)
    from mistol.engine import load_tokenizer

    tok = load_tokenizer("demo")
    reply = [m for m in replay(the_log(tmp_path)) if m["role"] == "assistant"][0]["content"]
    written, _, rest = reply.partition("\nOutput:\n```\n")
    after_output = rest.partition("\n```\n")[2]
    # both rounds: the code block before the run and the answer after it
    assert int(reported) >= len(tok.encode(written)) + len(tok.encode(after_output)) - 2


@pytest.mark.skipif(not filesystem_isolation_available(), reason="no sandbox isolation here")
def test_always_asks_again_after_a_runaway_number_of_blocks():
    answers = iter(["a", "n", "n"])
    asked, notices = [], []

    def ask(question):
        asked.append(question)
        return next(answers)

    runner = CodeRunner(CodeOptions(max_auto_runs=2), ask, notices.append)
    runner.limits.allow_network = True  # the check is about asking, not the network
    runner.new_reply()
    decided = [runner.confirm(f"print({i})") for i in range(5)]
    # 0: asked, "a"; 1 and 2 run alone; 3: asked again ("n"); 4: asked too ("always" was dropped)
    assert decided == ["print(0)", "print(1)", "print(2)", None, None]
    assert len(asked) == 3 and any("asking again" in n for n in notices)
